"""Meta-gradients through differentiable optimizers, overrides and errors."""

from __future__ import annotations

import pytest
import torch
from optim_cases import CASE_IDS, CASES
from torch import nn

import higher
from higher.optim import PerParameter

INNER_STEPS = 3


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def data():
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(5, 2), mk(5, 1), mk(5, 2), mk(5, 1)


def learnable_inputs(case, opt):
    """Tensors for the case's learnable hyperparameters, and how to override with them."""
    group = opt.param_groups[0]
    tensors, override = [], {}
    for key in case.learnable:
        value = group[key]
        if isinstance(value, tuple):
            pair = tuple(
                torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for v in value
            )
            tensors += pair
            override[key] = pair
        else:
            t = torch.tensor(float(value), dtype=torch.float64, requires_grad=True)
            tensors.append(t)
            override[key] = t
    return tensors, override


def unrolled_loss(case, model, opt, params, hyper_override, steps=INNER_STEPS):
    x, y, xq, yq = data()
    fmodel = higher.monkeypatch(model)
    diffopt = higher.optim.get_diff_optim(opt, model.parameters(), override=hyper_override)
    for _ in range(steps):
        params = diffopt.step(((fmodel(x, params=params) - y) ** 2).mean(), params=params)
    return ((fmodel(xq, params=params) - yq) ** 2).mean()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck_initial_weights_and_hyperparameters(case):
    model = tiny_model()
    opt = case.opt_type(model.parameters(), **case.kwargs)
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    hyper, _ = learnable_inputs(case, opt)
    n = len(params)

    def f(*inputs):
        ps = list(inputs[:n])
        hs = list(inputs[n:])
        override, k = {}, 0
        for key in case.learnable:
            if isinstance(opt.param_groups[0][key], tuple):
                override[key] = (hs[k], hs[k + 1])
                k += 2
            else:
                override[key] = hs[k]
                k += 1
        return unrolled_loss(case, model, opt, ps, override)

    assert torch.autograd.gradcheck(f, params + hyper, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "opt_type",
    [
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.RMSprop,
        torch.optim.Adagrad,
        torch.optim.Adadelta,
        torch.optim.Adamax,
    ],
)
def test_dead_unit_gives_finite_exact_meta_gradient(opt_type):
    # Hidden unit 0 never fires: its weights get exactly zero gradients and
    # sqrt(second moment) sits at sqrt(0).
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = -5.0
    kwargs = (
        {"lr": 0.01} if opt_type is not torch.optim.RAdam else {"lr": 0.01, "betas": (0.9, 0.5)}
    )
    if opt_type is torch.optim.RMSprop:
        kwargs["centered"] = True
    opt = opt_type(model.parameters(), **kwargs)
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    case = type("C", (), {})()
    loss = unrolled_loss(case, model, opt, params, None)
    grads = torch.autograd.grad(loss, params)
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.autograd.gradcheck(
        lambda *ps: unrolled_loss(case, model, opt, list(ps), None), params, eps=1e-6, atol=1e-6
    )


def test_track_higher_grads_false_returns_detached_leaves():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        x, y, _, _ = data()
        for _ in range(3):
            new = diffopt.step(((fmodel(x) - y) ** 2).mean())
        assert all(p.is_leaf and p.requires_grad for p in new)
        assert all(
            v.grad_fn is None for st in diffopt.state for v in st.values() if torch.is_tensor(v)
        )
        assert len(list(fmodel.parameters(time=0))) == 4
        assert len(fmodel._higher_history) == 1


def test_grad_callback_receives_and_replaces_gradients():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []

    def clip(grads):
        seen.append(len(grads))
        return [None if g is None else g.clamp(-1e-3, 1e-3) for g in grads]

    fmodel = higher.monkeypatch(model)
    diffopt = higher.optim.get_diff_optim(
        opt, model.parameters(), fmodel=fmodel, grad_callback=clip
    )
    x, y, _, _ = data()
    before = [p.clone() for p in fmodel.fast_params]
    diffopt.step(((fmodel(x) - y) ** 2).mean())
    assert seen == [4]
    for a, b in zip(before, fmodel.fast_params):
        assert (a - b).abs().max() <= 1e-3 + 1e-12


def test_override_shared_and_per_group():
    model = tiny_model()
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    opt = torch.optim.SGD([{"params": weights}, {"params": biases}], lr=0.1)
    lr_w = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    lr_b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    diffopt = higher.optim.get_diff_optim(opt, model.parameters(), override={"lr": [lr_w, lr_b]})
    assert diffopt.param_groups[0]["lr"] is lr_w and diffopt.param_groups[1]["lr"] is lr_b
    diffopt = higher.optim.get_diff_optim(opt, model.parameters(), override={"lr": [lr_w]})
    assert all(g["lr"] is lr_w for g in diffopt.param_groups)
    diffopt = higher.optim.get_diff_optim(opt, model.parameters(), override={"lr": lr_b})
    assert all(g["lr"] is lr_b for g in diffopt.param_groups)


def test_per_parameter_learning_rates_match_reference_and_get_exact_gradients():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lrs = [
        torch.full_like(p, 0.1).add_(torch.rand_like(p) * 0.1).requires_grad_()
        for p in model.parameters()
    ]
    x, y, xq, yq = data()
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    diffopt = higher.optim.get_diff_optim(
        opt, model.parameters(), fmodel=fmodel, override={"lr": [lrs]}
    )
    assert type(diffopt.param_groups[0]["lr"]) is PerParameter
    diffopt.step(((fmodel(x) - y) ** 2).mean())
    # Reference: Meta-SGD written by hand.
    params = list(model.parameters())
    grads = torch.autograd.grad(
        (
            (
                torch.func.functional_call(
                    model, dict(zip(dict(model.named_parameters()), params)), (x,)
                )
                - y
            )
            ** 2
        ).mean(),
        params,
        create_graph=True,
    )
    ref = [p - lr * g for p, lr, g in zip(params, lrs, grads)]
    for a, b in zip(fmodel.fast_params, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    q = ((fmodel(xq) - yq) ** 2).mean()
    q_ref = (
        (
            torch.func.functional_call(model, dict(zip(dict(model.named_parameters()), ref)), (xq,))
            - yq
        )
        ** 2
    ).mean()
    g1 = torch.autograd.grad(q, lrs)
    g2 = torch.autograd.grad(q_ref, lrs)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    def f(*ls):
        d = higher.optim.get_diff_optim(opt, model.parameters(), override={"lr": [list(ls)]})
        p = [t.detach().requires_grad_() for t in model.parameters()]
        for _ in range(2):
            p = d.step(((fmodel(x, params=p) - y) ** 2).mean(), params=p)
        return ((fmodel(xq, params=p) - yq) ** 2).mean()

    assert torch.autograd.gradcheck(f, lrs, eps=1e-6, atol=1e-6)


def test_per_step_learnable_schedule():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.tensor([0.1, 0.05, 0.02], dtype=torch.float64, requires_grad=True)
    x, y, xq, yq = data()

    def f(sched):
        fmodel = higher.monkeypatch(model)
        diffopt = higher.optim.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
        for t in range(3):
            diffopt.step(((fmodel(x) - y) ** 2).mean(), override={"lr": sched[t]})
        return ((fmodel(xq) - yq) ** 2).mean()

    loss = f(schedule)
    (g,) = torch.autograd.grad(loss, schedule)
    assert (g != 0).all()
    assert torch.autograd.gradcheck(f, (schedule,), eps=1e-6, atol=1e-6)


class TestErrors:
    def test_unregistered_optimizer(self):
        class MyOpt(torch.optim.SGD):
            pass

        model = tiny_model()
        with pytest.raises(
            ValueError,
            match=r"no differentiable optimizer is registered for .*MyOpt.*register_optim",
        ):
            higher.optim.get_diff_optim(MyOpt(model.parameters(), lr=0.1), model.parameters())

    def test_register_optim_makes_it_work_and_checks_types(self):
        class MyOpt(torch.optim.SGD):
            pass

        higher.optim.register_optim(MyOpt, higher.optim.DifferentiableSGD)
        model = tiny_model()
        d = higher.optim.get_diff_optim(MyOpt(model.parameters(), lr=0.1), model.parameters())
        assert isinstance(d, higher.optim.DifferentiableSGD)
        with pytest.raises(TypeError, match="DifferentiableOptimizer subclass"):
            higher.optim.register_optim(MyOpt, object)
        with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
            higher.optim.register_optim(int, higher.optim.DifferentiableSGD)

    def test_non_scalar_loss(self):
        model = tiny_model()
        fmodel = higher.monkeypatch(model)
        d = higher.optim.get_diff_optim(
            torch.optim.SGD(model.parameters(), lr=0.1), model.parameters(), fmodel=fmodel
        )
        with pytest.raises(ValueError, match=r"loss must be a scalar tensor.*\(5, 1\)"):
            d.step(fmodel(torch.randn(5, 2, dtype=torch.float64)))

    def test_override_length(self):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(
            ValueError, match=r"override\['lr'\] has 3 values but the optimizer has 1 param group"
        ):
            higher.optim.get_diff_optim(opt, model.parameters(), override={"lr": [0.1, 0.2, 0.3]})

    def test_per_parameter_length(self):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(
            ValueError, match=r"param group 0 gives 2 per-parameter values, but the group has 4"
        ):
            higher.optim.get_diff_optim(opt, model.parameters(), override={"lr": [[0.1, 0.2]]})

    def test_unknown_override_key(self):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(KeyError, match="DifferentiableSGD has no hyperparameter 'betas'"):
            higher.optim.get_diff_optim(opt, model.parameters(), override={"betas": (0.9, 0.99)})

    def test_invalid_hyperparameter_in_torch_wording(self):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
            higher.optim.get_diff_optim(opt, model.parameters(), override={"lr": -1.0})
        with pytest.raises(ValueError, match="Invalid momentum value: -0.5"):
            higher.optim.get_diff_optim(opt, model.parameters(), override={"momentum": [-0.5]})

    def test_parameter_missing_from_reference(self):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(
            ValueError,
            match=r"param_groups\[0\] of the SGD optimizer holds a parameter of shape \(3, 2\)",
        ):
            higher.optim.get_diff_optim(opt, list(model.parameters())[1:])

    def test_sparse_gradients(self):
        emb = nn.Embedding(5, 2, sparse=True).double()
        opt = torch.optim.SGD(emb.parameters(), lr=0.1)
        femb = higher.monkeypatch(emb)
        d = higher.optim.get_diff_optim(
            opt, emb.parameters(), fmodel=femb, track_higher_grads=False
        )
        femb.track_higher_grads = False
        with pytest.raises(
            RuntimeError,
            match=r"DifferentiableSGD does not support sparse gradients \(parameter 0\)",
        ):
            d.step(femb(torch.tensor([1, 2])).sum())

    def test_unsupported_boolean_option(self):
        from higher.optim.base import check_group_options

        with pytest.raises(
            ValueError, match="DifferentiableSGD does not support the option lookahead=True"
        ):
            check_group_options("DifferentiableSGD", {"lookahead": True}, ("lr",))
        check_group_options(
            "DifferentiableSGD", {"foreach": True, "fused": True, "initial_lr": 0.1}, ("lr",)
        )

    def test_complex_parameters(self):
        z = torch.zeros(2, dtype=torch.complex128, requires_grad=True)
        opt = torch.optim.Adam([z], lr=0.1)
        with pytest.raises(
            ValueError,
            match=r"DifferentiableAdam does not support complex parameters \(reference_params\[0\] is torch.complex128\)",
        ):
            higher.optim.get_diff_optim(opt, [z])

    def test_grad_callback_must_keep_the_length(self):
        model = tiny_model()
        fmodel = higher.monkeypatch(model)
        d = higher.optim.get_diff_optim(
            torch.optim.SGD(model.parameters(), lr=0.1), model.parameters(), fmodel=fmodel
        )
        with pytest.raises(ValueError, match="grad_callback must return 4 gradients .*got 2"):
            d.step(
                fmodel(torch.randn(3, 2, dtype=torch.float64)).sum(), grad_callback=lambda g: g[:2]
            )

    def test_step_without_params_or_fmodel(self):
        model = tiny_model()
        d = higher.optim.get_diff_optim(
            torch.optim.SGD(model.parameters(), lr=0.1), model.parameters()
        )
        with pytest.raises(ValueError, match="step\\(\\) needs params when no fmodel is attached"):
            d.step(torch.zeros((), requires_grad=True))


def test_create_diff_optim_and_trainable_params_roundtrip():
    model = tiny_model()
    fmodel = higher.monkeypatch(model)
    d = higher.optim.create_diff_optim(
        torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.9)}, fmodel=fmodel
    )
    assert isinstance(d, higher.optim.DifferentiableAdam)
    x, y, _, _ = data()
    d.step(((fmodel(x) - y) ** 2).mean())
    assert d.state[0]["step"] == 1.0
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    trainable = higher.optim.get_trainable_opt_params(opt)
    assert set(trainable) == {"lr", "betas", "eps", "weight_decay"}
    assert isinstance(trainable["betas"][0], tuple) and trainable["betas"][0][0].requires_grad
    d2 = higher.optim.get_diff_optim(opt, model.parameters(), override=trainable)
    assert d2.param_groups[0]["lr"] is trainable["lr"][0]
    trainable["lr"][0].data.fill_(0.5)
    higher.optim.apply_trainable_opt_params(opt, trainable)
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["betas"] == pytest.approx(
        (0.8, 0.9)
    )


@pytest.fixture
def float64_default():
    # With a float32 default dtype torch rounds NAdam's mu_product and ASGD's eta
    # to float32, which the number path mirrors; tensor hyperparameters keep
    # their own float64. A float64 default makes both paths exact.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_hyperparameter_as_a_tensor_takes_the_same_steps_and_gets_gradients(
    case, float64_default
):
    model = tiny_model()
    opt = case.opt_type(model.parameters(), **case.kwargs)
    trainable = higher.optim.get_trainable_opt_params(opt, dtype=torch.float64)
    known = higher.optim.get_diff_optim(opt, model.parameters()).hyperparameters
    trainable = {k: v for k, v in trainable.items() if k in known}
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    with_tensors = unrolled_loss(case, model, opt, params, trainable)
    with_numbers = unrolled_loss(case, model, opt, params, None)
    torch.testing.assert_close(with_tensors, with_numbers, rtol=1e-12, atol=1e-14)
    leaves = [
        t for vs in trainable.values() for v in vs for t in (v if isinstance(v, tuple) else (v,))
    ]
    grads = torch.autograd.grad(with_tensors, leaves, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert grads[0] is not None and grads[0] != 0  # lr comes first and always matters


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_update_rules_never_mutate_their_inputs(case):
    model = tiny_model()
    opt = case.opt_type(model.parameters(), **case.kwargs)
    diffopt = higher.optim.get_diff_optim(opt, model.parameters())
    p = torch.randn(3, 2, dtype=torch.float64)
    state: dict = {}
    for _ in range(3):
        g = torch.randn_like(p)
        snapshot = [
            (t, t._version, t.clone()) for t in (p, g, *state.values()) if torch.is_tensor(t)
        ]
        frozen_state = dict(state)
        new_p, state = diffopt.update(p, g, state, **diffopt._kernel_args(diffopt.param_groups[0]))
        for t, version, value in snapshot:
            assert t._version == version and torch.equal(t, value)
        assert new_p is not p
        assert all(frozen_state[k] is v for k, v in frozen_state.items())
        p = new_p


# eps is tiny next to a finite-difference step, and ASGD's t0 is a step-count
# threshold; every other hyperparameter is smooth where the cases sit.
_NOT_GRADCHECKED = {"eps", "t0"}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck_every_hyperparameter(case, float64_default):
    model = tiny_model()
    opt = case.opt_type(model.parameters(), **case.kwargs)
    known = higher.optim.get_diff_optim(opt, model.parameters()).hyperparameters
    values = {
        k: v[0]
        for k, v in higher.optim.get_trainable_opt_params(opt, dtype=torch.float64).items()
        if k in known and k not in _NOT_GRADCHECKED
    }
    keys = list(values)
    flat = [t for k in keys for t in (values[k] if isinstance(values[k], tuple) else (values[k],))]
    params = [p.detach().clone() for p in model.parameters()]

    def f(*leaves):
        override, i = {}, 0
        for k in keys:
            if isinstance(values[k], tuple):
                override[k], i = tuple(leaves[i : i + 2]), i + 2
            else:
                override[k], i = leaves[i], i + 1
        return unrolled_loss(
            case, model, opt, [p.clone().requires_grad_() for p in params], override
        )

    assert torch.autograd.gradcheck(f, flat, eps=1e-6, atol=1e-6, rtol=1e-4)
