"""Code written for facebookresearch/higher runs unchanged.

Custom optimizers written the way the original README says (override
``_update``), the original's public names and signatures, and
``higher.utils.flatten``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections import OrderedDict, namedtuple

import pytest
import torch
from torch import nn

import higher
import higher.optim
import higher.patch
import higher.utils
from higher.optim import DifferentiableOptimizer


# -- optimizers written as the original README says ----------------------------------
class MySGD(torch.optim.SGD):
    """A "new" torch optimizer; its twin below is written by hand."""


class DifferentiableMySGD(DifferentiableOptimizer):
    # The README's recipe applied to torch's SGD with momentum.
    def _update(self, grouped_grads, **kwargs):
        zipped = zip(self.param_groups, grouped_grads)
        for group_idx, (group, grads) in enumerate(zipped):
            weight_decay = group["weight_decay"]
            momentum = group["momentum"]
            dampening = group["dampening"]
            nesterov = group["nesterov"]
            for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                if weight_decay != 0:
                    g = g + weight_decay * p
                if momentum != 0:
                    param_state = self.state[group_idx][p_idx]
                    if "momentum_buffer" not in param_state:
                        buf = param_state["momentum_buffer"] = g
                    else:
                        buf = param_state["momentum_buffer"]
                        buf = buf * momentum + (1 - dampening) * g
                        param_state["momentum_buffer"] = buf
                    g = g + momentum * buf if nesterov else buf
                group["params"][p_idx] = p - group["lr"] * g


class MyAdam(torch.optim.Adam):
    pass


class DifferentiableMyAdam(DifferentiableOptimizer):
    # Step counter, lazily initialised state and the original's masking helper.
    def _update(self, grouped_grads, **kwargs):
        zipped = zip(self.param_groups, grouped_grads)
        for group_idx, (group, grads) in enumerate(zipped):
            beta1, beta2 = group["betas"]
            for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                state = self.state[group_idx][p_idx]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                state["exp_avg"] = exp_avg = state["exp_avg"] * beta1 + (1 - beta1) * g
                state["exp_avg_sq"] = exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g
                higher.optim._maybe_mask(exp_avg_sq, exp_avg_sq == 0)
                denom = exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** state["step"]) + group["eps"]
                step_size = group["lr"] / (1 - beta1 ** state["step"])
                group["params"][p_idx] = p - step_size * (exp_avg / denom)


higher.register_optim(MySGD, DifferentiableMySGD)
higher.register_optim(MyAdam, DifferentiableMyAdam)

SGD_KWARGS = {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}


def mlp():
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def batch(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, dtype=torch.float64, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def mse(model, xy, params=None):
    x, y = xy
    out = model(x) if params is None else model(x, params=params)
    return ((out - y) ** 2).mean()


def two_groups(model, opt_type, **kwargs):
    first, last = model[0], model[2]
    groups = [{"params": first.parameters()}, {"params": last.parameters(), "lr": 0.05}]
    return opt_type(groups, **kwargs)


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# -- the _update contract --------------------------------------------------------------
@pytest.mark.parametrize("nesterov", [False, True])
def test_readme_style_sgd_matches_torch_step_by_step(nesterov):
    kwargs = {**SGD_KWARGS, "dampening": 0.0} if nesterov else SGD_KWARGS
    model = mlp()
    twin = copy.deepcopy(model)
    opt = two_groups(model, MySGD, nesterov=nesterov, **kwargs)
    twin_opt = two_groups(twin, torch.optim.SGD, nesterov=nesterov, **kwargs)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        assert type(diffopt) is DifferentiableMySGD
        for t in range(4):
            diffopt.step(mse(fmodel, batch(t)))
            twin_opt.zero_grad()
            mse(twin, batch(t)).backward()
            twin_opt.step()
            for p, q in zip(fmodel.parameters(), twin.parameters()):
                assert_close(p, q)
            # The original's layout: group["params"] holds the new fast weights,
            # state[group_idx][p_idx] the state of that parameter.
            for gi, (group, twin_group) in enumerate(
                zip(diffopt.param_groups, twin_opt.param_groups)
            ):
                for pi, (p, q) in enumerate(zip(group["params"], twin_group["params"])):
                    assert_close(p, q)
                    assert_close(
                        diffopt.state[gi][pi]["momentum_buffer"],
                        twin_opt.state[q]["momentum_buffer"],
                    )


def test_readme_style_adam_matches_torch_and_builtin_meta_gradient():
    model = mlp()
    twin = copy.deepcopy(model)
    opt = MyAdam(model.parameters(), lr=0.05)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.05)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for t in range(3):
            diffopt.step(mse(fmodel, batch(t)))
            twin_opt.zero_grad()
            mse(twin, batch(t)).backward()
            twin_opt.step()
            for p, q in zip(fmodel.parameters(), twin.parameters()):
                assert_close(p, q)
        assert diffopt.state[0][0]["step"] == 3
        mse(fmodel, batch(9)).backward()
    # The same unrolled run with the built-in twin gives the same meta-gradient.
    ref = copy.deepcopy(twin)
    ref.load_state_dict(model.state_dict())
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    with higher.innerloop_ctx(ref, ref_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for t in range(3):
            diffopt.step(mse(fmodel, batch(t)))
        mse(fmodel, batch(9)).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p.grad, q.grad)


def test_warm_torch_state_is_continued():
    model = mlp()
    twin = copy.deepcopy(model)
    opt, twin_opt = (
        MySGD(model.parameters(), **SGD_KWARGS),
        torch.optim.SGD(twin.parameters(), **SGD_KWARGS),
    )
    for m, o in ((model, opt), (twin, twin_opt)):
        for t in range(2):
            o.zero_grad()
            mse(m, batch(t)).backward()
            o.step()
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        assert_close(
            diffopt.state[0][0]["momentum_buffer"],
            twin_opt.state[twin[0].weight]["momentum_buffer"],
        )
        diffopt.step(mse(fmodel, batch(5)))
    twin_opt.zero_grad()
    mse(twin, batch(5)).backward()
    twin_opt.step()
    for p, q in zip(fmodel.parameters(), twin.parameters()):
        assert_close(p, q)


def test_override_tensor_gets_the_exact_gradient():
    model = mlp()
    init = [p.detach().clone() for p in model.parameters()]

    def outer_loss(lr, momentum):
        opt = two_groups(model, MySGD, **SGD_KWARGS)
        # One value per group, as the original takes it: lr for group 0 only.
        override = {"lr": [lr, 0.05], "momentum": [momentum]}
        diffopt = higher.optim.get_diff_optim(opt, model.parameters(), override=override)
        params = [p.clone().requires_grad_() for p in init]
        for t in range(3):
            params = diffopt.step(mse(fmodel, batch(t), params), params=params)
            assert diffopt.param_groups[0]["lr"] is lr
        return mse(fmodel, batch(9), params)

    fmodel = higher.monkeypatch(model)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    momentum = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(outer_loss, (lr, momentum), eps=1e-6, atol=1e-8, rtol=1e-6)
    # ... and the same gradient as the built-in optimizer with the same override.
    g_classic = torch.autograd.grad(outer_loss(lr, momentum), (lr, momentum))
    opt = two_groups(model, torch.optim.SGD, **SGD_KWARGS)
    override = {"lr": [lr, 0.05], "momentum": [momentum]}
    diffopt = higher.optim.get_diff_optim(opt, model.parameters(), override=override)
    params = [p.clone().requires_grad_() for p in init]
    for t in range(3):
        params = diffopt.step(mse(fmodel, batch(t), params), params=params)
    g_builtin = torch.autograd.grad(mse(fmodel, batch(9), params), (lr, momentum))
    for a, b in zip(g_classic, g_builtin):
        assert_close(a, b)


def run_both(options, callback=None, steps=3):
    """Meta-gradients and final weights of the README-style and the built-in SGD."""
    results = []
    for opt_type in (MySGD, torch.optim.SGD):
        torch.manual_seed(0)
        model = mlp()
        opt = opt_type(model.parameters(), **SGD_KWARGS)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, **options) as (
            fmodel,
            diffopt,
        ):
            for t in range(steps):
                diffopt.step(mse(fmodel, batch(t)), grad_callback=callback)
            final = list(fmodel.parameters())
            if options.get("track_higher_grads", True):
                mse(fmodel, batch(9)).backward()
        results.append((final, [p.grad for p in model.parameters()], diffopt))
    return results


def test_first_order_matches_the_builtin_optimizer():
    (p1, g1, _), (p2, g2, _) = run_both({"first_order": True})
    for a, b in zip(p1 + g1, p2 + g2):
        assert_close(a, b)


def test_grad_callback_matches_the_builtin_optimizer():
    def clip(grads):
        return [None if g is None else g.clamp(-0.05, 0.05) for g in grads]

    (p1, g1, _), (p2, g2, _) = run_both({}, callback=clip)
    for a, b in zip(p1 + g1, p2 + g2):
        assert_close(a, b)


@pytest.mark.parametrize(
    "options",
    [{"checkpoint": 2}, {"num_tasks": 3}, {"num_tasks": 3, "checkpoint": 2}],
    ids=["checkpoint", "batched", "batched-checkpoint"],
)
def test_checkpointed_and_batched_loops_match_the_builtin_optimizer(options):
    n = options.get("num_tasks")
    results = []
    for opt_type in (MySGD, torch.optim.SGD):
        torch.manual_seed(0)
        model = mlp()
        opt = two_groups(model, opt_type, **SGD_KWARGS)
        data = [batch(t) for t in range(3)]
        if n is not None:  # a different batch per task: shift the inputs per task
            data = [(torch.stack([x + i for i in range(n)]), torch.stack([y] * n)) for x, y in data]
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, **options) as (
            fmodel,
            diffopt,
        ):

            def loss_of(x, y):
                err = (fmodel(x) - y) ** 2
                return err.mean() if n is None else err.mean(dim=(1, 2))

            for x, y in data:
                diffopt.step(functools.partial(loss_of, x, y))
            loss = loss_of(*data[0]).sum()
            loss.backward()
        results.append([p.grad for p in model.parameters()])
    for a, b in zip(*results):
        assert_close(a, b)


def test_test_mode_keeps_no_graph():
    (p1, _, diffopt), (p2, _, _) = run_both({"track_higher_grads": False})
    for a, b in zip(p1, p2):
        assert_close(a, b)
        assert a.grad_fn is None and a.requires_grad
    for group in diffopt.param_groups:
        assert all(p.grad_fn is None for p in group["params"])
    assert all(st["momentum_buffer"].grad_fn is None for st in diffopt.state[0].values())


def test_detach_cuts_state_and_groups():
    model = mlp()
    with higher.innerloop_ctx(model, MySGD(model.parameters(), **SGD_KWARGS)) as (fmodel, diffopt):
        diffopt.step(mse(fmodel, batch(0)))
        diffopt.step(mse(fmodel, batch(1)))
        assert diffopt.state[0][0]["momentum_buffer"].grad_fn is not None
        assert diffopt.detach_() is diffopt
        assert all(st["momentum_buffer"].grad_fn is None for st in diffopt.state[0].values())
        assert all(p.grad_fn is None for p in diffopt.param_groups[0]["params"])
        diffopt.reset_state()
        assert len(diffopt.state[0]) == 0 and 0 not in diffopt.state[0]
        assert diffopt.state[0][0] == {}


def test_state_dict_and_write_back_continue_in_torch():
    model = mlp()
    twin = copy.deepcopy(model)
    opt = two_groups(model, MySGD, **SGD_KWARGS)
    twin_opt = two_groups(twin, torch.optim.SGD, **SGD_KWARGS)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for t in range(3):
            diffopt.step(mse(fmodel, batch(t)))
            twin_opt.zero_grad()
            mse(twin, batch(t)).backward()
            twin_opt.step()
        fmodel.write_back(model)
        diffopt.write_back(opt)
        saved = diffopt.state_dict()
    # Plain torch goes on from the written-back state exactly as the twin does.
    for t in range(3, 5):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            mse(m, batch(t)).backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p, q)
    # A fresh differentiable optimizer loaded from the checkpoint has that state.
    fresh = higher.optim.get_diff_optim(opt, model.parameters())
    fresh.reset_state()
    fresh.load_state_dict(saved)
    assert_close(fresh.state[1][0]["momentum_buffer"], saved["state"][2]["momentum_buffer"])
    assert fresh.state_dict()["param_groups"] == saved["param_groups"]


def test_scheduler_drives_a_readme_style_optimizer():
    model = mlp()
    twin = copy.deepcopy(model)
    opt, twin_opt = (
        MySGD(model.parameters(), **SGD_KWARGS),
        torch.optim.SGD(twin.parameters(), **SGD_KWARGS),
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    twin_sched = torch.optim.lr_scheduler.StepLR(twin_opt, step_size=1, gamma=0.5)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.attach_scheduler(sched)
        for t in range(3):
            diffopt.step(mse(fmodel, batch(t)))
            twin_opt.zero_grad()
            mse(twin, batch(t)).backward()
            twin_opt.step()
            twin_sched.step()
            assert diffopt.param_groups[0]["lr"] == twin_opt.param_groups[0]["lr"]
    for p, q in zip(fmodel.parameters(), twin.parameters()):
        assert_close(p, q)


def test_frozen_parameter_is_left_alone():
    model = mlp()
    model[2].bias.requires_grad_(False)
    with higher.innerloop_ctx(model, MySGD(model.parameters(), **SGD_KWARGS)) as (fmodel, diffopt):
        new = diffopt.step(mse(fmodel, batch(0)))
    assert_close(new[-1], model[2].bias)
    assert len(diffopt.state[0]) == 3


def test_subclass_of_a_builtin_can_extend_its_update():
    class ClippedAdam(higher.optim.DifferentiableAdam):
        def _update(self, grouped_grads, **kwargs):
            clipped = [
                [None if g is None else g.clamp(-0.1, 0.1) for g in gs] for gs in grouped_grads
            ]
            super()._update(clipped, **kwargs)

    def clip(grads):
        return [None if g is None else g.clamp(-0.1, 0.1) for g in grads]

    model = mlp()
    twin = copy.deepcopy(model)
    opt, twin_opt = (
        torch.optim.Adam(model.parameters(), lr=0.05),
        torch.optim.Adam(twin.parameters(), lr=0.05),
    )
    for m, o in ((model, opt), (twin, twin_opt)):  # warm: torch's tensor step is imported
        o.zero_grad()
        mse(m, batch(0)).backward()
        o.step()
    fmodel = higher.monkeypatch(model)
    diffopt = ClippedAdam(opt, model.parameters(), fmodel=fmodel)
    assert ClippedAdam._uses_update_hook and not higher.optim.DifferentiableAdam._uses_update_hook
    for t in range(1, 4):
        diffopt.step(mse(fmodel, batch(t)))
        twin_opt.zero_grad()
        mse(twin, batch(t)).backward()
        for p in twin.parameters():
            p.grad = clip([p.grad])[0]
        twin_opt.step()
    for p, q in zip(fmodel.parameters(), twin.parameters()):
        assert_close(p, q)


# -- the update-rule path, as README shows it ---------------------------------------------
class MyOpt(torch.optim.Optimizer):
    """A torch optimizer: gradient steps normalised by a running RMS."""

    def __init__(self, params, lr=0.01, beta=0.9):
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if "v" not in state:
                    state["v"] = g * g
                else:
                    state["v"].mul_(group["beta"]).addcmul_(g, g, value=1 - group["beta"])
                p.addcdiv_(g, state["v"].sqrt().add_(1e-8), value=-group["lr"])


def my_update(p, g, state, *, lr, beta=0.9):
    v = g * g if "v" not in state else beta * state["v"] + (1 - beta) * g * g
    return p - lr * g / (higher.optim.safe_sqrt(v) + 1e-8), {**state, "v": v}


class DifferentiableMyOpt(DifferentiableOptimizer):
    torch_type = MyOpt
    hyperparameters = ("lr", "beta")
    update = staticmethod(my_update)


higher.register_optim(MyOpt, DifferentiableMyOpt)


def test_readme_update_rule_matches_its_torch_optimizer_and_takes_overrides():
    model = mlp()
    twin = copy.deepcopy(model)
    opt = two_groups(model, MyOpt, lr=0.02, beta=0.8)
    twin_opt = two_groups(twin, MyOpt, lr=0.02, beta=0.8)
    assert not DifferentiableMyOpt._uses_update_hook
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        assert type(diffopt) is DifferentiableMyOpt
        for t in range(3):
            diffopt.step(mse(fmodel, batch(t)))
            twin_opt.zero_grad()
            mse(twin, batch(t)).backward()
            twin_opt.step()
            for p, q in zip(fmodel.parameters(), twin.parameters()):
                assert_close(p, q)

    def outer_loss(beta):
        opt = MyOpt(model.parameters(), lr=0.02)
        with higher.innerloop_ctx(model, opt, override={"beta": beta}) as (fmodel, diffopt):
            for t in range(3):
                diffopt.step(mse(fmodel, batch(t)))
            return mse(fmodel, batch(9))

    beta = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(outer_loss, (beta,), eps=1e-6, atol=1e-8, rtol=1e-6)


# -- errors -----------------------------------------------------------------------------
def test_classic_errors():
    model = mlp()
    opt = MySGD(model.parameters(), **SGD_KWARGS)

    class NoRule(DifferentiableOptimizer):
        pass

    with pytest.raises(
        TypeError, match=r"NoRule must define an update rule .* or override _update"
    ):
        NoRule(opt, model.parameters())

    class Forgets(DifferentiableOptimizer):
        def _update(self, grouped_grads, **kwargs):
            self.param_groups[0]["params"][1] = None

    fmodel = higher.monkeypatch(model)
    with pytest.raises(
        ValueError, match=r"Forgets._update left param_groups\[0\]\['params'\]\[1\] as NoneType"
    ):
        Forgets(opt, model.parameters(), fmodel=fmodel).step(mse(fmodel, batch(0)))

    class Replaces(DifferentiableOptimizer):
        def _update(self, grouped_grads, **kwargs):
            self.param_groups[0]["params"] = []

    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\] must stay a list of 4"):
        Replaces(opt, model.parameters(), fmodel=fmodel).step(mse(fmodel, batch(0)))

    diffopt = DifferentiableMySGD(opt, model.parameters())
    with pytest.raises(KeyError, match="no hyperparameter 'lr_typo'.*lr, momentum"):
        diffopt._apply_override({"lr_typo": [0.1]})
    with pytest.raises(ValueError, match=r"override\['lr'\] has 3 values .* 1 param group"):
        diffopt._apply_override({"lr": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        diffopt._apply_override({"lr": -1.0})
    with pytest.raises(KeyError, match=r"4 parameters has no entry 7 \(expected a p_idx in 0..3\)"):
        diffopt.state[0][7]
    with pytest.raises(TypeError, match="a parameter's state must be a dict, got list"):
        diffopt.state[0][0] = []
    with pytest.raises(RuntimeError, match="only called for classes that override it"):
        higher.optim.get_diff_optim(
            torch.optim.SGD(model.parameters(), lr=0.1), model.parameters()
        )._update([])


# -- names -------------------------------------------------------------------------------
# Every public (non-underscore) name of facebookresearch/higher 0.2.1's
# higher, higher.patch, higher.optim and higher.utils, with the positional
# parameters of its functions (None: not checked), plus the private names its
# README points optimizer authors to.
ORIGINAL_API = {
    "higher": {
        "create_diff_optim": None,
        "get_diff_optim": None,
        "innerloop_ctx": [
            "model",
            "opt",
            "device",
            "copy_initial_weights",
            "override",
            "track_higher_grads",
        ],
        "monkeypatch": None,
        "optim": None,
        "patch": None,
        "register_optim": None,
        "utils": None,
    },
    "higher.patch": {
        "buffer_sync": ["module", "fmodule", "device"],
        "make_functional": ["module", "encapsulator"],
        "monkeypatch": ["module", "device", "copy_initial_weights", "track_higher_grads"],
        "_MonkeyPatchBase": None,
    },
    "higher.optim": {
        "DifferentiableASGD": None,
        "DifferentiableAdadelta": None,
        "DifferentiableAdagrad": None,
        "DifferentiableAdam": None,
        "DifferentiableAdamW": None,
        "DifferentiableAdamax": None,
        "DifferentiableOptimizer": [
            "other",
            "reference_params",
            "fmodel",
            "device",
            "override",
            "grad_callback",
            "track_higher_grads",
        ],
        "DifferentiableRMSprop": None,
        "DifferentiableRprop": None,
        "DifferentiableSGD": None,
        "apply_trainable_opt_params": ["opt", "override"],
        "create_diff_optim": [
            "opt_type",
            "opt_kwargs",
            "params",
            "fmodel",
            "device",
            "override",
            "track_higher_grads",
        ],
        "get_diff_optim": [
            "opt",
            "reference_params",
            "fmodel",
            "device",
            "override",
            "track_higher_grads",
        ],
        "get_trainable_opt_params": ["opt", "device"],
        "register_optim": ["optim_type", "diff_optim_type"],
        # Named by the original README, or used by code written for it:
        "_get_mask_closure": ["mask"],
        "_maybe_mask": ["tensor", "mask"],
        "DifferentiableOptimizer.step": ["loss", "params", "override", "grad_callback"],
        "DifferentiableOptimizer._update": ["grouped_grads"],
    },
    "higher.utils": {
        "flatten": ["x"],
        "get_func_params": ["module", "device", "safe_copy"],
    },
}


def positional_names(obj):
    fn = obj.__init__ if isinstance(obj, type) else obj
    params = inspect.signature(fn).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.name != "self"]


@pytest.mark.parametrize("module_name", sorted(ORIGINAL_API))
def test_every_public_name_of_the_original_exists_with_its_signature(module_name):
    module = {
        "higher": higher,
        "higher.patch": higher.patch,
        "higher.optim": higher.optim,
        "higher.utils": higher.utils,
    }[module_name]

    def lookup(name):
        obj = module
        for part in name.split("."):
            obj = getattr(obj, part, None)
        return obj

    missing = sorted(name for name in ORIGINAL_API[module_name] if lookup(name) is None)
    assert not missing, f"{module_name} lacks {missing}"
    for name, positional in ORIGINAL_API[module_name].items():
        if positional is not None:
            ours = positional_names(lookup(name))
            assert ours[: len(positional)] == positional, f"{module_name}.{name}: {ours}"


def test_top_level_names_are_the_same_objects():
    assert higher.get_diff_optim is higher.optim.get_diff_optim
    assert higher.create_diff_optim is higher.optim.create_diff_optim
    assert higher.register_optim is higher.optim.register_optim
    assert higher.monkeypatch is higher.patch.monkeypatch
    assert {"get_diff_optim", "create_diff_optim", "register_optim"} <= set(higher.__all__)


def test_register_optim_is_picked_by_get_and_create():
    model = mlp()
    diffopt = higher.get_diff_optim(MySGD(model.parameters(), lr=0.1), model.parameters())
    assert type(diffopt) is DifferentiableMySGD
    fmodel = higher.monkeypatch(model)
    diffopt = higher.create_diff_optim(MySGD, {"lr": 0.1, "momentum": 0.5}, fmodel=fmodel)
    assert type(diffopt) is DifferentiableMySGD
    diffopt.step(mse(fmodel, batch(0)))
    assert "momentum_buffer" in diffopt.state[0][0]


def test_create_diff_optim_takes_param_groups():
    model = mlp()
    fmodel = higher.monkeypatch(model)
    groups = [{"params": list(model[0].parameters())}, {"params": model[2].parameters(), "lr": 0.5}]
    diffopt = higher.create_diff_optim(torch.optim.SGD, {"lr": 0.1}, params=groups, fmodel=fmodel)
    assert [g["lr"] for g in diffopt.param_groups] == [0.1, 0.5]
    new = diffopt.step(mse(fmodel, batch(0)))
    grads = torch.autograd.grad(mse(model, batch(0)), list(model.parameters()))
    lrs = [0.1, 0.1, 0.5, 0.5]
    for p, q, g, lr in zip(new, model.parameters(), grads, lrs):
        assert_close(p, q - lr * g)
    with pytest.raises(ValueError, match="param group 1 has no 'params' key"):
        higher.create_diff_optim(torch.optim.SGD, {"lr": 0.1}, params=[{"params": []}, {"lr": 1}])


# -- helpers -----------------------------------------------------------------------------
def test_flatten_follows_the_original():
    t = torch.zeros(2)
    Pair = namedtuple("Pair", "a b")
    nested = {"b": [1, (2, 3)], "a": OrderedDict(x=4, y={"z": [5]}), "c": Pair(6, [7])}
    assert higher.utils.flatten(nested) == [1, 2, 3, 4, 5, 6, 7]  # insertion order, keys dropped
    assert higher.utils.flatten([[], {}, (), set()]) == []
    assert higher.utils.flatten({5}) == [5]
    assert higher.utils.flatten([1, [2, [3, [4]]]]) == [1, 2, 3, 4]
    leaves = higher.utils.flatten(["ab", None, frozenset({1}), t])
    assert leaves[:3] == ["ab", None, frozenset({1})] and leaves[3] is t
    assert higher.utils.flatten(0.5) == [0.5]


def test_mask_closure_keeps_sqrt_gradients_finite_to_second_order():
    x = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    v = x * x  # a second moment that is 0 at a dead entry
    higher.optim._maybe_mask(v, v == 0)
    (g,) = torch.autograd.grad(v.sqrt().sum(), x, create_graph=True)
    assert g.tolist() == [0.0, 1.0]  # d|x|/dx, with the dead entry's NaN masked to 0
    (h,) = torch.autograd.grad(g.sum(), x)
    assert torch.isfinite(h).all() and h.tolist() == [0.0, 0.0]
    # Without the mask the same computation gives NaN.
    x2 = x.detach().requires_grad_()
    (g2,) = torch.autograd.grad((x2 * x2).sqrt().sum(), x2)
    assert math.isnan(g2[0].item())


def test_trainable_params_round_trip_keeps_each_entry_type():
    # The original's test suite: torch keeps Adam's default weight_decay as the
    # int 0, and a get/apply round trip must leave it an int.
    opt = torch.optim.Adam(nn.Linear(2, 1).parameters(), lr=0.1)
    before = {k: type(v) for k, v in opt.param_groups[0].items() if k != "params"}
    higher.optim.apply_trainable_opt_params(opt, higher.optim.get_trainable_opt_params(opt))
    after = {k: type(v) for k, v in opt.param_groups[0].items() if k != "params"}
    assert after == before and opt.param_groups[0]["weight_decay"] == 0
    assert all(type(b) is float for b in opt.param_groups[0]["betas"])
    # A learned value is never truncated to fit an int entry.
    learned = higher.optim.get_trainable_opt_params(opt)
    learned["weight_decay"][0].data.fill_(0.25)
    higher.optim.apply_trainable_opt_params(opt, learned)
    assert opt.param_groups[0]["weight_decay"] == 0.25
