"""No inner step and no solver iteration reads a tensor back to the host.

On an accelerator, reading a value (``.item()``, ``.tolist()``, ``bool(t)``,
``float(t)``...) waits for every queued kernel: one such read per parameter per
step serialises the inner loop. A spy replaces those methods of
``torch.Tensor`` with counting wrappers and the tests demand zero calls per
step for every built-in optimizer and option, with numbers or tensors (that
require grad) as hyperparameters, and from a torch optimizer's warm state.
Reads inside torch's C++ (a tensor passed where torch wants a number) bypass
the spy; tests/test_devices.py catches those on the ``meta`` device, which
refuses them.

Documented exceptions: the implicit solvers check convergence on the host every
``check_every`` iterations, and read their report once at the end.
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from optim_cases import CASE_IDS, CASES
from torch import nn

import higher
from higher.implicit import implicit_grad

F64 = torch.float64
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


class HostReads:
    """Counts host reads of tensors, by method and by the calling line."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.active = False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in READS:
            monkeypatch.setattr(
                torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name))
            )

    def _counting(self, name, original):
        def read(tensor, *args, **kwargs):
            if self.active:
                caller = sys._getframe(1)
                where = f"{caller.f_code.co_filename.rsplit('/', 1)[-1]}:{caller.f_lineno}"
                self.calls[f"{name} at {where}"] += 1
            return original(tensor, *args, **kwargs)

        return read

    def __enter__(self) -> HostReads:
        self.calls.clear()
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False

    @property
    def total(self) -> int:
        return sum(self.calls.values())


@pytest.fixture
def host_reads(monkeypatch) -> HostReads:
    spy = HostReads()
    spy.install(monkeypatch)
    return spy


def test_the_spy_sees_each_kind_of_read(host_reads):
    t = torch.tensor([1.5])
    with host_reads:
        _ = t.item(), t.tolist(), bool(t), float(t), int(t)
    assert sorted(k.split(" ")[0] for k in host_reads.calls) == sorted(READS[:-1])


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)


def batches(n: int):
    return [(torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)) for _ in range(n)]


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("start", ["numbers", "tensors", "warm-torch-state"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_no_host_read_in_an_inner_step(case, start, host_reads):
    model = make_model()
    opt = case.opt_type(model.parameters(), **case.kwargs)
    if start == "warm-torch-state":  # state imported from torch (read once, at construction)
        for x, y in batches(2):
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
    override = higher.optim.get_trainable_opt_params(opt) if start == "tensors" else None
    with higher.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
        data = batches(4)
        if start == "warm-torch-state":
            with host_reads:
                diffopt.step(loss_fn(fmodel, *data.pop(0)))
            # The one exception: NAdam reads torch's mu_product tensor once, at the
            # first step after the import (torch keeps it on the CPU).
            readers = {where.split(" at ")[1].split(":")[0] for where in host_reads.calls}
            assert readers <= ({"nadam.py"} if case.opt_type is torch.optim.NAdam else set())
        with host_reads:
            for x, y in data:
                diffopt.step(loss_fn(fmodel, x, y))
        assert host_reads.calls == {}, f"host reads in {case.name} steps: {dict(host_reads.calls)}"
        # Still differentiable end to end.
        meta_loss = loss_fn(fmodel, *batches(1)[0])
        inputs = list(fmodel.parameters(time=0))
        if override is not None:
            inputs.append(override["lr"][0])
        grads = torch.autograd.grad(meta_loss, inputs, allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)


# -- data-dependent branches, taken on the device -------------------------------------
def unroll(opt_type, kwargs, override, steps, params=None):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(F64)
    opt = opt_type(model.parameters(), **kwargs)
    fmodel = higher.monkeypatch(model)
    diffopt = higher.optim.get_diff_optim(opt, model.parameters(), override=override)
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x, y = torch.randn(5, 2, dtype=F64), torch.randn(5, 1, dtype=F64)
    for _ in range(steps):
        params = diffopt.step(((fmodel(x, params=params) - y) ** 2).mean(), params=params)
    return ((fmodel(x, params=params) - y) ** 2).mean(), params


def test_radam_switch_with_tensor_beta2_is_exact():
    # beta2 = 0.8: rho_t stays below 5 for six steps (crossing 2 and 4, where the
    # rectification's square root has a negative argument) and passes it at seven.
    kwargs = {"lr": 0.05, "betas": (0.9, 0.8)}
    _, plain = unroll(torch.optim.RAdam, kwargs, None, 9)
    betas = tuple(torch.tensor(b, dtype=F64, requires_grad=True) for b in kwargs["betas"])
    loss, learned = unroll(torch.optim.RAdam, kwargs, {"betas": betas}, 9)
    for a, b in zip(learned, plain):  # tensor betas take unfused ops: equal to rounding
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert all(torch.isfinite(g) for g in torch.autograd.grad(loss, betas))
    for steps in (4, 9):  # before the switch, and across it
        assert torch.autograd.gradcheck(
            lambda b1, b2, n=steps: unroll(torch.optim.RAdam, kwargs, {"betas": (b1, b2)}, n)[0],
            betas,
            eps=1e-6,
            atol=1e-6,
            rtol=1e-4,
        )


def test_asgd_tensor_t0_matches_the_number():
    kwargs = {"lr": 0.05, "lambd": 0.01, "alpha": 0.5, "t0": 2.0}
    _, plain = unroll(torch.optim.ASGD, kwargs, None, 5)
    t0 = torch.tensor(2.0, dtype=F64, requires_grad=True)
    _, learned = unroll(torch.optim.ASGD, kwargs, {"t0": t0}, 5)
    for a, b in zip(learned, plain):
        assert torch.equal(a, b)


def test_tensor_hyperparameters_torch_would_read_as_numbers():
    # Rprop: a number and a tensor as step_sizes (torch.clamp takes two of a
    # kind); Adagrad: a tensor initial_accumulator_value (torch.full_like would
    # read it on the host and drop its gradient).
    high = torch.tensor(0.011, dtype=F64, requires_grad=True)  # binds from step 2
    kwargs = {"lr": 0.01, "step_sizes": (1e-6, 0.011)}
    _, plain = unroll(torch.optim.Rprop, kwargs, None, 3)
    loss, mixed = unroll(torch.optim.Rprop, kwargs, {"step_sizes": (1e-6, high)}, 3)
    for a, b in zip(mixed, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert torch.autograd.grad(loss, high)[0] != 0
    start = torch.tensor(0.5, dtype=F64, requires_grad=True)
    kwargs = {"lr": 0.1, "initial_accumulator_value": 0.5}
    _, plain = unroll(torch.optim.Adagrad, kwargs, None, 2)
    loss, learned = unroll(torch.optim.Adagrad, kwargs, {"initial_accumulator_value": start}, 2)
    for a, b in zip(learned, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(
        lambda v: unroll(torch.optim.Adagrad, kwargs, {"initial_accumulator_value": v}, 2)[0],
        (start,),
        eps=1e-6,
        atol=1e-6,
        rtol=1e-4,
    )


@pytest.mark.parametrize("opt_type", [torch.optim.NAdam, torch.optim.ASGD])
def test_float_scalar_state_round_trips_through_torch(opt_type):
    # NAdam's mu_product, ASGD's eta and mu are floats here, tensors in torch.
    kwargs = {"lr": 0.05, "t0": 1.0} if opt_type is torch.optim.ASGD else {"lr": 0.05}
    model = make_model()
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    opt, twin_opt = opt_type(model.parameters(), **kwargs), opt_type(twin.parameters(), **kwargs)
    data = batches(5)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for x, y in data[:3]:
            diffopt.step(loss_fn(fmodel, x, y))
        fmodel.write_back(model)
        diffopt.write_back(opt)
    # torch goes on from the written-back state as the twin does from its own.
    for t, (x, y) in enumerate(data):
        for m, o in ((model, opt), (twin, twin_opt)) if t >= 3 else ((twin, twin_opt),):
            o.zero_grad()
            loss_fn(m, x, y).backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def test_nadam_product_keeps_its_graph_in_a_classic_subclass():
    # mu_product is not declared scalar state: a classic (_update) subclass
    # must not see its tensor, and its graph, cast to a float.
    class ClassicNAdam(higher.optim.DifferentiableNAdam):
        def _update(self, grouped_grads, **kwargs):
            super()._update(grouped_grads)

    def meta_grad(cls):
        torch.manual_seed(0)
        model = nn.Linear(2, 1).to(F64)
        beta1 = torch.tensor(0.9, dtype=F64, requires_grad=True)
        opt = torch.optim.NAdam(model.parameters(), lr=0.1)
        diffopt = cls(opt, model.parameters(), override={"betas": [(beta1, 0.999)]})
        fmodel = higher.monkeypatch(model)
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        x = torch.randn(4, 2, dtype=F64)
        for _ in range(3):
            params = diffopt.step(fmodel(x, params=params).pow(2).mean(), params=params)
        return torch.autograd.grad(fmodel(x, params=params).pow(2).mean(), beta1)[0]

    torch.testing.assert_close(
        meta_grad(ClassicNAdam), meta_grad(higher.optim.DifferentiableNAdam), rtol=1e-12, atol=0
    )


# -- the implicit solvers --------------------------------------------------------------
def ridge(n: int = 6, spread: float = 0.0):
    g = torch.Generator().manual_seed(5)
    X = torch.randn(30, n, generator=g, dtype=F64)
    X = X * torch.logspace(0, spread, n, dtype=F64)  # a wider spectrum takes more steps
    y = torch.randn(30, generator=g, dtype=F64)
    lam = torch.tensor(0.3, dtype=F64, requires_grad=True)
    A = X.T @ X + lam.detach() * torch.eye(n, dtype=F64)
    w = torch.linalg.solve(A, X.T @ y)

    def inner(p):
        return 0.5 * ((X @ p[0] - y) ** 2).sum() + 0.5 * lam * (p[0] ** 2).sum()

    def outer(p):
        return 0.5 * ((X @ p[0] - 1.0) ** 2).sum()

    top = float(torch.linalg.eigvalsh(A).max())
    return inner, outer, [w], [lam], top


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_solvers_read_the_host_once_per_check(method, host_reads):
    inner, outer, w, lam, top = ridge(spread=1.5)
    settings = {"method": method, "max_iter": 13, "tol": 1e-30}
    if method == "neumann":
        settings["step_size"] = 1 / top
    with host_reads:
        _, report = implicit_grad(inner, outer, w, lam, check_every=4, **settings)
    assert not report.converged and report.iterations == 13
    # Checks after iterations 4, 8 and 12, and the report.
    assert host_reads.total == 4, dict(host_reads.calls)
    with host_reads:  # tol=0: a fixed budget, no check at all by default
        implicit_grad(inner, outer, w, lam, **{**settings, "tol": 0.0})
    assert host_reads.total == 1, dict(host_reads.calls)


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_solver_results_do_not_depend_on_check_every(method):
    inner, outer, w, lam, top = ridge(spread=1.5 if method == "cg" else 0.0)
    settings = {"method": method, "max_iter": 400, "tol": 1e-9}
    if method == "neumann":
        settings["step_size"] = 1 / top
    (g1,), r1 = implicit_grad(inner, outer, w, lam, check_every=1, **settings)
    assert r1.converged and 1 < r1.iterations < settings["max_iter"]
    for every in (2, 3, 7, 1000):  # checks that land past convergence mask the extra iterations
        (g,), r = implicit_grad(inner, outer, w, lam, check_every=every, **settings)
        assert torch.equal(g, g1) and r == r1, every


def test_cg_stops_at_negative_curvature_between_checks():
    # An indefinite system: CG meets p^T H p <= 0 on its first direction.
    w = [torch.zeros(2, dtype=F64)]
    scale = torch.tensor(1.0, dtype=F64, requires_grad=True)

    def inner(p):
        return -0.5 * (p[0] ** 2).sum() + scale * p[0].sum()

    def outer(p):
        return p[0].sum()

    (g,), report = implicit_grad(inner, outer, w, [scale], check_every=5, max_iter=9)
    assert report.iterations == 1 and not report.converged
    assert torch.equal(g, torch.zeros((), dtype=F64))


def test_check_every_is_validated():
    inner, outer, w, lam, _ = ridge()
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="check_every must be a positive int or None"):
            implicit_grad(inner, outer, w, lam, check_every=bad)
