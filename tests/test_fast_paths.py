"""The per-task fast paths (issue 34) compute exactly what the general paths compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import higher
from higher.optim import DifferentiableSGD, sgd_update


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, n, generator=g, dtype=torch.float64) for n in (2, 1, 2, 1)]


def reference_meta_grads(model, steps, lr, frozen=()):
    """MAML with plain SGD written with functional_call; the frozen names keep their values."""
    xs, ys, xq, yq = data()
    names = [k for k, p in model.named_parameters() if k not in frozen]
    fast = [p for k, p in model.named_parameters() if k not in frozen]
    for _ in range(steps):
        loss = ((functional_call(model, dict(zip(names, fast)), (xs,)) - ys) ** 2).mean()
        grads = torch.autograd.grad(loss, fast, create_graph=True)
        fast = [p - lr * g for p, g in zip(fast, grads)]
    out = functional_call(model, dict(zip(names, fast)), (xq,))
    return torch.autograd.grad(
        ((out - yq) ** 2).mean(), [p for _, p in model.named_parameters() if _ not in frozen]
    )


def higher_meta_grads(model, opt, steps):
    xs, ys, xq, yq = data()
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(((fmodel(xs) - ys) ** 2).mean())
        loss = ((fmodel(xq) - yq) ** 2).mean()
        trainable = [p for p in model.parameters() if p.requires_grad]
        return torch.autograd.grad(loss, trainable)


@pytest.mark.parametrize("steps", [1, 3])
def test_plain_sgd_group_rule_matches_reference(steps):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got = higher_meta_grads(model, opt, steps)
    want = reference_meta_grads(model, steps, 0.1)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_plain_sgd_group_rule_equals_per_tensor_rule_bitwise():
    class PerTensorSGD(DifferentiableSGD):
        update_group = None

    model = mlp()
    opt = torch.optim.SGD(
        [
            {"params": list(model[0].parameters())},
            {"params": list(model[2].parameters()), "lr": 0.3},
        ],
        lr=0.1,
    )
    fast = higher_meta_grads(model, opt, 3)
    higher.register_optim(torch.optim.SGD, PerTensorSGD)
    try:
        slow = higher_meta_grads(model, opt, 3)
    finally:
        higher.register_optim(torch.optim.SGD, DifferentiableSGD)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_group_rule_skips_frozen_weights():
    model = mlp()
    model[0].bias.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    got = higher_meta_grads(model, opt, 2)
    want = reference_meta_grads(model, 2, 0.1, frozen=("0.bias",))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.9},
        {"weight_decay": 0.1},
        {"maximize": True},
        {"nesterov": True, "momentum": 0.5},
    ],
)
def test_other_sgd_settings_take_the_per_tensor_rule(options):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, **options)
    params = list(model.parameters())
    grads = [torch.ones_like(p) for p in params]
    diffopt = higher.optim.get_diff_optim(opt, params)
    new = diffopt.step(sum((p * g).sum() for p, g in zip(params, grads)), params=params)
    args = {"lr": 0.1, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0}
    args.update(options)
    for p, g, n in zip(params, grads, new):
        torch.testing.assert_close(n, sgd_update(p, g, {}, **args)[0], rtol=0, atol=0)


def test_a_subclass_with_its_own_rule_does_not_inherit_the_group_rule():
    def halved(p, g, state, **hyper):
        return sgd_update(p, 0.5 * g, state, **hyper)

    class HalfSGD(DifferentiableSGD):
        update = staticmethod(halved)

    assert HalfSGD.update_group is None
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    diffopt = HalfSGD(torch.optim.SGD([p], lr=1.0), [p])
    (new,) = diffopt.step((2 * p).sum(), params=[p])
    assert new.tolist() == [-1.0, -1.0]


def test_tensor_learning_rate_keeps_its_gradient():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    xs, ys, xq, yq = data()
    with higher.innerloop_ctx(model, opt, override={"lr": lr}) as (fmodel, diffopt):
        diffopt.step(((fmodel(xs) - ys) ** 2).mean())
        ((fmodel(xq) - yq) ** 2).mean().backward()
    assert lr.grad is not None and lr.grad != 0


def nested() -> nn.Module:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    return nn.Sequential(nn.Linear(2, 4), inner, nn.Dropout(0.0), nn.Linear(4, 1)).double()


def test_sequential_forward_matches_functional_call():
    model = nested()
    fmodel = higher.monkeypatch(model)
    x = data()[0]
    params = [p * 1.5 for p in model.parameters()]
    names = [k for k, _ in model.named_parameters()]
    assert fmodel._higher_lean
    assert torch.equal(
        fmodel(x, params=params), functional_call(model, dict(zip(names, params)), (x,))
    )


@pytest.mark.parametrize("where", ["child", "nested child", "root", "global"])
def test_sequential_forward_runs_hooks(where):
    model = nested()
    fmodel = higher.monkeypatch(model)
    x = data()[0]
    plain = fmodel(x)
    target = {"child": fmodel[0], "nested child": fmodel[1][0], "root": fmodel}.get(where)

    def hook(module, args, out):
        return out + 1.0

    if target is None:
        handle = nn.modules.module.register_module_forward_hook(hook)
    else:
        handle = target.register_forward_hook(hook)
    try:
        hooked = fmodel(x)
    finally:
        handle.remove()
    assert not torch.equal(hooked, plain)
    expected = model(x) if where != "global" else None  # the original is unhooked
    if target is not None:
        target_orig = {"child": model[0], "nested child": model[1][0], "root": model}[where]
        with torch.no_grad():
            h = target_orig.register_forward_hook(hook)
            try:
                expected = model(x)
            finally:
                h.remove()
        torch.testing.assert_close(hooked, expected, rtol=0, atol=0)


def test_sequential_subclass_keeps_its_own_forward():
    class Doubling(nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = Doubling(nn.Linear(2, 1)).double()
    fmodel = higher.monkeypatch(model)
    assert not fmodel._higher_lean
    x = data()[0]
    torch.testing.assert_close(fmodel(x), model(x), rtol=0, atol=0)


def test_sequential_forward_honours_train_and_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.5), nn.Linear(8, 1)).double()
    fmodel = higher.monkeypatch(model)
    x = data()[0]
    fmodel.eval()
    torch.testing.assert_close(fmodel(x), model.eval()(x), rtol=0, atol=0)
    fmodel.train()
    torch.manual_seed(3)
    a = fmodel(x)
    torch.manual_seed(3)
    torch.testing.assert_close(a, model.train()(x), rtol=0, atol=0)


def test_sequential_child_with_its_own_call_is_called_through_it():
    class Scaled(nn.Linear):
        def __call__(self, x):
            return 3 * super().__call__(x)

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(2, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    fmodel = higher.monkeypatch(model)
    x = data()[0]
    torch.testing.assert_close(fmodel(x), model(x), rtol=0, atol=0)


def test_fx_trace_through_a_patched_sequential_records_its_modules():
    class Outer(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    fmodel = higher.monkeypatch(nested())
    graph = torch.fx.Tracer().trace(Outer(fmodel))
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    assert calls == ["inner.0", "inner.1.0", "inner.1.1", "inner.2", "inner.3"]


def _lean_linears():
    """Linear children the lean forward must not run as ``F.linear`` on its slots, each
    with what differs from a plain Linear."""
    torch.manual_seed(0)

    class Shifted(nn.Linear):  # a subclass: its own forward
        def forward(self, x):
            return super().forward(x) + 1.0

    class OwnCallImpl(nn.Linear):  # what nn.Module.__call__ runs, overridden
        def _call_impl(self, *args, **kwargs):
            return 2 * super()._call_impl(*args, **kwargs)

    instance_forward = nn.Linear(2, 2)
    instance_forward.forward = lambda x: x * 0.5  # an instance's own forward
    no_bias = nn.Linear(2, 2, bias=False)
    plain_weight = nn.Linear(2, 2)
    w = plain_weight.weight.detach().double()  # .double() on the model skips a plain attribute
    del plain_weight.weight
    plain_weight.weight = w  # a plain tensor attribute, no parameter: the forward reads it
    return {
        "subclass": Shifted(2, 2),
        "own _call_impl": OwnCallImpl(2, 2),
        "instance forward": instance_forward,
        "no bias": no_bias,
        "weight not a parameter": plain_weight,
    }


@pytest.mark.parametrize("case", list(_lean_linears()))
def test_sequential_linear_children_run_as_their_module_runs(case):
    child = _lean_linears()[case]
    model = nn.Sequential(nn.Linear(2, 2), child, nn.Tanh(), nn.Linear(2, 1)).double()
    fmodel = higher.monkeypatch(model)
    assert fmodel._higher_lean
    x = data()[0]
    params = [p * 1.25 for p in model.parameters()]
    names = [k for k, _ in model.named_parameters()]
    expected = functional_call(model, dict(zip(names, params)), (x,))
    torch.testing.assert_close(fmodel(x, params=params), expected, rtol=0, atol=0)


def test_sequential_linear_forward_patched_on_the_class_is_honoured(monkeypatch):
    model = nested()
    fmodel = higher.monkeypatch(model)
    x = data()[0]
    plain = fmodel(x)
    original = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: 2 * original(self, x))
    torch.testing.assert_close(fmodel(x), model(x), rtol=0, atol=0)
    assert not torch.equal(fmodel(x), plain)


def test_copies_of_a_class_laid_out_differently_are_each_exact():
    """The copy's short way, keyed on a class's layout, falls back for a module laid out
    otherwise (an attribute added, one removed, a hook), and each copy stays its own."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1)).double()
    higher.monkeypatch(base)  # records Linear's layout
    base[1].scale = [2.0]  # a mutable attribute the layout lacks
    del base[2].in_features
    calls = []
    base[0].register_forward_hook(lambda m, a, out: calls.append(1))
    fmodel = higher.monkeypatch(base)
    assert fmodel[1].scale == [2.0] and fmodel[1].scale is not base[1].scale
    assert "in_features" not in fmodel[2].__dict__
    assert "in_features" in fmodel[0].__dict__
    fmodel(data()[0])
    assert calls == [1]  # the hook was copied
    fmodel[0]._forward_hooks.clear()
    fmodel(data()[0])
    assert calls == [1] and len(base[0]._forward_hooks) == 1  # the original keeps its hook
    for original, copy_ in zip(base.modules(), fmodel.modules()):
        assert copy_ is not original
        for key in ("_forward_hooks", "_forward_pre_hooks", "_parameters", "_buffers"):
            assert copy_.__dict__[key] is not original.__dict__[key]


def _random_sequential(rng: torch.Generator, dtype: torch.dtype) -> nn.Sequential:
    """Linear layers of widths 1 to 4 (bias or not), activations, a nested Sequential."""
    widths = [int(torch.randint(1, 5, (1,), generator=rng)) for _ in range(4)]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        bias = bool(torch.randint(0, 2, (1,), generator=rng))
        layer = nn.Linear(a, b, bias=bias)
        act = [nn.ReLU(), nn.Tanh(), nn.Identity()][int(torch.randint(0, 3, (1,), generator=rng))]
        layers += [nn.Sequential(layer, act)] if i == 1 else [layer, act]
    return nn.Sequential(*layers).to(dtype)


@pytest.mark.parametrize("seed", range(12))
def test_lean_sequential_forward_matches_functional_call_on_random_models(seed):
    """The lean forward (children's forwards, Linear as F.linear on its slots) against
    functional_call over random widths, biases, batch sizes 0 and 1, and dtypes: the
    value, its gradient, and a meta-gradient through one SGD step."""
    rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dtype = (torch.float32, torch.float64)[seed % 2]
    model = _random_sequential(rng, dtype)
    names = [k for k, _ in model.named_parameters()]
    batch = (0, 1, 5)[seed % 3]
    width = model[0].in_features
    x = torch.randn(batch, width, generator=rng, dtype=dtype)
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    assert fmodel._higher_lean
    params = [(p * 1.5).detach().requires_grad_() for p in model.parameters()]
    out = fmodel(x, params=params)
    ref = functional_call(model, dict(zip(names, params)), (x,))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.autograd.grad(out.pow(2).sum(), params, allow_unused=True)
    r = torch.autograd.grad(ref.pow(2).sum(), params, allow_unused=True)
    for a, b in zip(g, r):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (f, diffopt):
        diffopt.step(f(x).pow(2).mean() if batch else f(x).sum())
        meta = torch.autograd.grad(f(x).sum(), list(model.parameters()), allow_unused=True)
    fast = list(model.parameters())
    loss = functional_call(model, dict(zip(names, fast)), (x,))
    inner = torch.autograd.grad(
        loss.pow(2).mean() if batch else loss.sum(), fast, create_graph=True, allow_unused=True
    )
    fast = [p if d is None else p - 0.1 * d for p, d in zip(fast, inner)]
    expected = torch.autograd.grad(
        functional_call(model, dict(zip(names, fast)), (x,)).sum(),
        list(model.parameters()),
        allow_unused=True,
    )
    for a, b in zip(meta, expected):
        if a is None or b is None:
            assert a is None or not a.any()
            assert b is None or not b.any()
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
