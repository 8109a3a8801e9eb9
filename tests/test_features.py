"""First-order mode, truncation, write-back, schedules and the gradient-testing helper."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import higher
from higher.testing import MetaGradientError, check_meta_gradient


def mlp():
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def batch(n=10, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(n, 2, dtype=torch.float64, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def mse(model, xy):
    x, y = xy
    return ((model(x) - y) ** 2).mean()


# -- first-order mode --------------------------------------------------------------
@pytest.mark.parametrize(
    "opt_type,kwargs",
    [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.5}), (torch.optim.Adam, {"lr": 0.05})],
)
def test_first_order_gives_the_query_gradient_at_the_adapted_weights(opt_type, kwargs):
    model = mlp()
    twin = copy.deepcopy(model)
    support, query = batch(seed=1), batch(seed=2)
    opt = opt_type(model.parameters(), **kwargs)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, first_order=True) as (
        fmodel,
        diffopt,
    ):
        for _ in range(3):
            diffopt.step(mse(fmodel, support))
        mse(fmodel, query).backward()
        assert len(fmodel._higher_history) == 2  # initial and current only
    # Reference: plain torch training, then the query gradient at the result.
    twin_opt = opt_type(twin.parameters(), **kwargs)
    for _ in range(3):
        twin_opt.zero_grad()
        mse(twin, support).backward()
        twin_opt.step()
    twin_opt.zero_grad()
    mse(twin, query).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)


def test_test_mode_leaves_meta_parameters_without_gradient():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=False) as (
        fmodel,
        diffopt,
    ):
        diffopt.step(mse(fmodel, batch()))
        mse(fmodel, batch()).backward()
    assert all(p.grad is None for p in model.parameters())


# -- truncation --------------------------------------------------------------------
def test_truncated_windows_match_reference_and_free_old_graphs():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    support, query = batch(seed=3), batch(seed=4)
    k = 3
    fmodel = higher.monkeypatch(model)
    diffopt = higher.optim.get_diff_optim(
        opt, model.parameters(), fmodel=fmodel, override={"lr": lr}
    )
    old = None
    for window in range(5):
        start = [p.detach().clone() for p in fmodel.fast_params]
        start_state = diffopt.state_dict()
        for _ in range(k):
            diffopt.step(mse(fmodel, support))
        (g,) = torch.autograd.grad(mse(fmodel, query), lr)
        assert len(fmodel._higher_history) == k + 1
        fmodel.detach_()
        diffopt.detach_()
        # Reference: the same window from the same values, alone.
        ref_model = higher.monkeypatch(model)
        ref_model.update_params([p.requires_grad_() for p in start])
        ref_opt = higher.optim.get_diff_optim(opt, model.parameters(), fmodel=ref_model)
        ref_opt.load_state_dict(start_state)
        for _ in range(k):
            ref_opt.step(mse(ref_model, support), override={"lr": lr})
        (g_ref,) = torch.autograd.grad(mse(ref_model, query), lr)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-13)
        if window == 1:
            old = weakref.ref(diffopt.state[0]["exp_avg"])
    gc.collect()
    assert old() is None  # graphs of past windows are gone: memory stays bounded


# -- write-back and round trips ----------------------------------------------------
def bn_model():
    # No bias right before BatchNorm: its gradient is rounding noise, which Adam amplifies.
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.BatchNorm1d(6), nn.Linear(6, 1)).double()


def test_write_back_then_plain_torch_equals_plain_torch_all_along():
    model = bn_model()
    twin = copy.deepcopy(model)
    data = [batch(seed=s) for s in range(6)]
    opt = torch.optim.Adam(model.parameters(), lr=0.05, amsgrad=True)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.05, amsgrad=True)
    for xy in data:
        twin_opt.zero_grad()
        mse(twin, xy).backward()
        twin_opt.step()
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for xy in data[:4]:
            diffopt.step(mse(fmodel, xy))
        fmodel.write_back(model)
        diffopt.write_back(opt)
    for xy in data[4:]:
        opt.zero_grad()
        mse(model, xy).backward()
        opt.step()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in twin_opt.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=1e-9, atol=1e-12)


def test_state_dict_round_trip_continues_identically():
    model = mlp()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9, centered=True)
    data = [batch(seed=s) for s in range(4)]
    f1 = higher.monkeypatch(model)
    d1 = higher.optim.get_diff_optim(opt, model.parameters(), fmodel=f1)
    for xy in data[:2]:
        d1.step(mse(f1, xy))
    saved = d1.state_dict()
    f2 = higher.monkeypatch(model)
    f2.update_params([p.detach().clone().requires_grad_() for p in f1.fast_params])
    d2 = higher.optim.get_diff_optim(
        torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9, centered=True),
        model.parameters(),
        fmodel=f2,
    )
    d2.load_state_dict(saved)
    for xy in data[2:]:
        d1.step(mse(f1, xy))
        d2.step(mse(f2, xy))
    for a, b in zip(f1.fast_params, f2.fast_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="state_dict has 2 param groups, the optimizer has 1"):
        d2.load_state_dict({"state": {}, "param_groups": saved["param_groups"] * 2})


def test_reset_reuses_the_patched_module_and_optimizer():
    model = bn_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    tasks = [batch(seed=s) for s in (7, 8)]
    losses_fresh = []
    for xy in tasks:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(mse(fmodel, xy))
            losses_fresh.append(mse(fmodel, xy))
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    diffopt = higher.optim.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    for xy, expected in zip(tasks, losses_fresh):
        fmodel.reset(model, copy_initial_weights=False)
        diffopt.reset_state()
        for _ in range(2):
            diffopt.step(mse(fmodel, xy))
        torch.testing.assert_close(mse(fmodel, xy), expected, rtol=0, atol=0)
        assert fmodel.init_fast_params[0] is model[0].weight


def test_write_back_errors():
    fmodel = higher.monkeypatch(mlp())
    with pytest.raises(
        ValueError, match="write_back: module has 2 parameters, the patched module 4"
    ):
        fmodel.write_back(nn.Linear(2, 1))
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diffopt = higher.optim.get_diff_optim(
        opt, model.parameters(), override={"lr": [[0.1, 0.2, 0.3, 0.4]]}
    )
    with pytest.raises(
        ValueError, match="write_back: param group 0 has per-parameter values for 'lr'"
    ):
        diffopt.write_back(opt)


# -- schedules -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "opt_type,kwargs,make_sched",
    [
        (
            torch.optim.SGD,
            {"lr": 0.1, "momentum": 0.9},
            lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5),
        ),
        (
            torch.optim.Adam,
            {"lr": 0.01},
            lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=8),
        ),
        (
            torch.optim.SGD,
            {"lr": 0.1},
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
        ),
    ],
    ids=["steplr-sgd", "onecycle-adam-betas", "cosine-sgd"],
)
def test_scheduler_drives_the_inner_loop_step_for_step(opt_type, kwargs, make_sched):
    model = mlp()
    twin = copy.deepcopy(model)
    data = [batch(seed=s) for s in range(7)]
    twin_opt = opt_type(twin.parameters(), **kwargs)
    twin_sched = make_sched(twin_opt)
    opt = opt_type(model.parameters(), **kwargs)
    sched = make_sched(opt)
    fmodel = higher.monkeypatch(model)
    diffopt = higher.optim.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    diffopt.attach_scheduler(sched)
    for xy in data:
        twin_opt.zero_grad()
        mse(twin, xy).backward()
        twin_opt.step()
        twin_sched.step()
        diffopt.step(mse(fmodel, xy))
        assert diffopt.param_groups[0]["lr"] == twin_opt.param_groups[0]["lr"]
        for p, q in zip(fmodel.fast_params, twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


# -- the gradient-testing helper ------------------------------------------------------
class _WrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, g):
        return g * 2.5  # should be 3


def maml_outer_loss(model, lr, wrong=False):
    support, query = batch(seed=11), batch(seed=12)

    def outer_loss():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": lr}) as (
            fmodel,
            diffopt,
        ):
            for _ in range(2):
                diffopt.step(mse(fmodel, support))
            out = mse(fmodel, query)
            return _WrongBackward.apply(out) if wrong else out

    return outer_loss


def test_check_meta_gradient_passes_on_correct_code():
    model = mlp()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    report = check_meta_gradient(
        maml_outer_loss(model, lr), {**dict(model.named_parameters()), "lr": lr}
    )
    assert report.ok, str(report)
    assert report.checked == sum(p.numel() for p in model.parameters()) + 1
    assert str(report).startswith("meta-gradient OK")


def test_check_meta_gradient_reports_the_worst_mismatch():
    model = mlp()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    inputs = {"lr": lr, **dict(model.named_parameters())}
    report = check_meta_gradient(maml_outer_loss(model, lr, wrong=True), inputs, max_entries=10)
    assert not report.ok and report.checked == 10
    assert "MISMATCH" in str(report) and report.worst_input in inputs
    assert report.analytic == pytest.approx(report.numeric * 2.5 / 3, rel=1e-4)
    with pytest.raises(MetaGradientError, match="meta-gradient MISMATCH"):
        check_meta_gradient(maml_outer_loss(model, lr, wrong=True), inputs, raise_on_failure=True)


def test_check_meta_gradient_requires_float64_leaves():
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match="'weight' is torch.float32"):
        check_meta_gradient(lambda: model(torch.ones(1, 2)).sum(), model)
