"""Every differentiable optimizer takes the very step its torch.optim twin takes."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_cases import CASE_IDS, CASES
from torch import nn

import higher

STEPS = 8


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def batches(n: int = STEPS):
    return [
        (torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64))
        for _ in range(n)
    ]


def loss_fn(out, y):
    return ((out - y) ** 2).mean()


def groups_of(model: nn.Module, kwargs: dict, two_groups: bool):
    if not two_groups:
        return list(model.parameters())
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    lr = kwargs.get("lr", 0.01)
    return [{"params": weights}, {"params": biases, "lr": lr * 0.5}]


def assert_state_equal(ours: dict, theirs: dict, where: str) -> None:
    assert set(ours) == set(theirs), f"{where}: state keys {sorted(ours)} != {sorted(theirs)}"
    for key, value in theirs.items():
        mine = ours[key]
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            assert float(mine) == pytest.approx(float(value), rel=1e-12, abs=0), f"{where}: {key}"
        else:
            torch.testing.assert_close(mine, value, rtol=1e-9, atol=1e-11, msg=f"{where}: {key}")


def run_parity(case, two_groups: bool, warm_steps: int = 0):
    model = make_model()
    twin = copy.deepcopy(model)
    data = batches(warm_steps + STEPS)
    opt_ref = case.opt_type(groups_of(twin, case.kwargs, two_groups), **case.kwargs)
    opt_src = case.opt_type(groups_of(model, case.kwargs, two_groups), **case.kwargs)
    for x, y in data[:warm_steps]:  # warm the source optimizer and the reference alike
        for m, o in ((model, opt_src), (twin, opt_ref)):
            o.zero_grad()
            loss_fn(m(x), y).backward()
            o.step()
    fmodel = higher.monkeypatch(model)
    diffopt = higher.optim.get_diff_optim(opt_src, model.parameters(), fmodel=fmodel)
    for t, (x, y) in enumerate(data[warm_steps:]):
        opt_ref.zero_grad()
        loss_fn(twin(x), y).backward()
        opt_ref.step()
        diffopt.step(loss_fn(fmodel(x), y))
        for i, (p, q) in enumerate(zip(fmodel.fast_params, twin.parameters())):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=f"step {t} param {i}")
            assert_state_equal(diffopt.state[i], opt_ref.state[q], f"step {t} param {i}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parity_one_group(case):
    run_parity(case, two_groups=False)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parity_two_groups(case):
    run_parity(case, two_groups=True)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parity_from_warm_torch_state(case):
    run_parity(case, two_groups=False, warm_steps=3)


def test_parity_with_float64_default_dtype():
    # torch then keeps scalar state (step, eta, mu, mu_product) in float64.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for case in CASES:
            if case.opt_type in (torch.optim.ASGD, torch.optim.NAdam):
                run_parity(case, two_groups=False)
    finally:
        torch.set_default_dtype(old)


def test_float32_step_counter_keeps_precision():
    # Far into training torch's float32 step counter is still exact; bias
    # corrections must come from its exact value.
    case = next(c for c in CASES if c.name == "adam")
    model = make_model()
    twin = copy.deepcopy(model)
    opt_src = case.opt_type(model.parameters(), **case.kwargs)
    opt_ref = case.opt_type(twin.parameters(), **case.kwargs)
    x, y = batches(1)[0]
    for m, o in ((model, opt_src), (twin, opt_ref)):
        o.zero_grad()
        loss_fn(m(x), y).backward()
        o.step()
        for st in o.state.values():
            st["step"].fill_(12345.0)
    fmodel = higher.monkeypatch(model)
    diffopt = higher.optim.get_diff_optim(opt_src, model.parameters(), fmodel=fmodel)
    for _ in range(3):
        opt_ref.zero_grad()
        loss_fn(twin(x), y).backward()
        opt_ref.step()
        diffopt.step(loss_fn(fmodel(x), y))
    for p, q in zip(fmodel.fast_params, twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_unused_and_frozen_parameters_are_skipped():
    model = nn.ModuleDict({"used": nn.Linear(3, 1), "unused": nn.Linear(3, 1)}).double()
    model["used"].bias.requires_grad_(False)
    twin = copy.deepcopy(model)
    opt_src = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
    opt_ref = torch.optim.Adam(twin.parameters(), lr=0.1, weight_decay=0.1)
    fmodel = higher.monkeypatch(model)
    diffopt = higher.optim.get_diff_optim(opt_src, model.parameters(), fmodel=fmodel)
    x = torch.randn(4, 3, dtype=torch.float64)
    for _ in range(3):
        opt_ref.zero_grad()
        twin["used"](x).pow(2).mean().backward()
        opt_ref.step()
        diffopt.step(fmodel["used"](x).pow(2).mean())
    for name, q in zip(dict(model.named_parameters()), twin.parameters()):
        i = list(dict(model.named_parameters())).index(name)
        torch.testing.assert_close(fmodel.fast_params[i], q, rtol=1e-9, atol=1e-11)
    assert diffopt.state[1] == {}  # frozen bias: no state, as torch keeps none
    assert diffopt.state[2] == {} and diffopt.state[3] == {}
    assert torch.equal(fmodel.fast_params[2], model["unused"].weight)


def test_lr_as_plain_tensor_in_torch_group():
    model = make_model()
    twin = copy.deepcopy(model)
    opt_src = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1), momentum=0.9)
    opt_ref = torch.optim.SGD(twin.parameters(), lr=torch.tensor(0.1), momentum=0.9)
    fmodel = higher.monkeypatch(model)
    diffopt = higher.optim.get_diff_optim(opt_src, model.parameters(), fmodel=fmodel)
    for x, y in batches(3):
        opt_ref.zero_grad()
        loss_fn(twin(x), y).backward()
        opt_ref.step()
        diffopt.step(loss_fn(fmodel(x), y))
    for p, q in zip(fmodel.fast_params, twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)
