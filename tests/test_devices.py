"""Every tensor the optimizers create lives on the device and dtype of its parameters.

There is no GPU here, so the parameters go to the ``meta`` device instead:
tensors there have a device, a dtype and a shape but no values. Two things then
show a CPU default that a GPU run would trip on: a :class:`TorchFunctionMode`
that records every tensor a torch function returns during the steps (anything
not on ``meta`` was created on the CPU by default), and the ``meta`` device
itself, which refuses to read a value back to the host (``.item()``, ``bool``,
a tensor passed where torch wants a number), so a host sync fails loudly.
"""

from __future__ import annotations

import pytest
import torch
from optim_cases import CASE_IDS, CASES
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import higher

META = torch.device("meta")
F64 = torch.float64
STEPS = 3
# Ops whose tensor operands must share a device on some torch releases: a
# CPU-scalar hyperparameter must reach them on the parameters' device.
SAME_DEVICE_OPS = frozenset({"addcmul", "addcdiv", "clamp", "lerp"})


class RecordDevices(TorchFunctionMode):
    """Records every tensor that a torch function returns off ``device``, and
    every call of a same-device op whose tensor operands sit on several devices."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.elsewhere: list[str] = []
        self.mixed: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in SAME_DEVICE_OPS:
            devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            if len(devices) > 1:
                self.mixed.append(f"{name} on {sorted(map(str, devices))}")
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self.elsewhere.append(f"{name} -> {t.device} {tuple(t.shape)}")
        return out


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)


def two_group_optimizer(case, model: nn.Module) -> torch.optim.Optimizer:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return case.opt_type([{"params": weights}, {"params": biases}], **case.kwargs)


def run_steps(model, opt, override, data, mode=None):
    with higher.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
        for x, y in data:
            if mode is None:
                diffopt.step(((fmodel(x) - y) ** 2).mean())
            else:
                with mode:
                    diffopt.step(((fmodel(x) - y) ** 2).mean())
        return list(fmodel.fast_params), diffopt.state


def batches(device=None, n=STEPS):
    return [
        (torch.randn(6, 3, dtype=F64, device=device), torch.randn(6, 2, dtype=F64, device=device))
        for _ in range(n)
    ]


def state_tensors(state):
    return [(i, k, v) for i, st in enumerate(state) for k, v in st.items() if torch.is_tensor(v)]


@pytest.mark.parametrize("hyper", ["numbers", "tensors"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_steps_on_meta_create_nothing_elsewhere(case, hyper):
    model = make_model().to(META)
    opt = two_group_optimizer(case, model)
    override = None
    if hyper == "tensors":
        override = higher.optim.get_trainable_opt_params(opt)
        for key, values in override.items():
            for value in tree_leaves(values):
                assert (value.device, value.dtype) == (META, F64), key
    mode = RecordDevices(META)
    params, state = run_steps(model, opt, override, batches(META), mode)
    assert mode.elsewhere == [], f"tensors created off the parameters' device: {mode.elsewhere}"
    assert all(p.device == META and p.dtype == F64 for p in params)
    for i, key, value in state_tensors(state):
        assert value.device == META, f"state[{i}][{key!r}] is on {value.device}"
        if value.is_floating_point():
            assert value.dtype == F64, f"state[{i}][{key!r}] is {value.dtype}"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_scalar_hyperparameters_beside_another_device(case):
    # Hand-made torch.tensor(0.1) hyperparameters beside an accelerator's
    # parameters: torch's arithmetic takes such CPU scalars, so they must work,
    # and never reach an op that wants every operand on one device.
    model = make_model().to(META)
    opt = two_group_optimizer(case, model)
    override = higher.optim.get_trainable_opt_params(opt, device="cpu")
    mode = RecordDevices(META)
    params, state = run_steps(model, opt, override, batches(META), mode)
    assert mode.mixed == [], f"same-device ops given several devices: {mode.mixed}"
    assert all(p.device == META for p in params)
    for i, key, value in state_tensors(state):
        # Scalars derived from the hyperparameters alone (ASGD's eta) stay where
        # those are; everything of a parameter's shape lives with the parameter.
        assert value.device == META or value.dim() == 0, f"state[{i}][{key!r}]"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_trainable_hyperparameters_take_the_same_steps(case):
    # get_trainable_opt_params gives float64 tensors for a float64 model: the
    # steps equal those taken with the numbers (float64 scalar state, so that
    # torch's float32 rounding of eta, mu and mu_product is out of the picture).
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        model = make_model()
        data = batches()
        opt = two_group_optimizer(case, model)
        override = higher.optim.get_trainable_opt_params(opt)
        plain, plain_state = run_steps(model, opt, None, data)
        learned, learned_state = run_steps(model, opt, override, data)
    finally:
        torch.set_default_dtype(old)
    for a, b in zip(learned, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for ours, theirs in zip(learned_state, plain_state):
        # A tensor momentum takes part even at zero (it may need a gradient).
        assert set(ours) - set(theirs) <= {"momentum_buffer"} and set(theirs) <= set(ours)
        for key in theirs:
            torch.testing.assert_close(
                torch.as_tensor(ours[key], dtype=F64),
                torch.as_tensor(theirs[key], dtype=F64),
                rtol=1e-12,
                atol=1e-14,
                msg=key,
            )


def test_get_trainable_opt_params_follows_each_group():
    def leaf(*shape, **where):
        return torch.zeros(*shape, **where).requires_grad_()

    opt = torch.optim.Adam(
        [
            {"params": [leaf(2, 2, dtype=F64), leaf(2, dtype=F64)]},
            {"params": [leaf(2)], "lr": 0.5},
            {"params": [leaf(2, device=META)]},
            # Several devices: CPU scalars (torch's arithmetic takes them beside
            # any device), in the widest floating dtype.
            {"params": [leaf(2, dtype=torch.float16), leaf(2, dtype=F64, device=META)]},
        ],
        lr=0.1,
    )
    hyper = higher.optim.get_trainable_opt_params(opt)
    placed = [(lr.device.type, lr.dtype) for lr in hyper["lr"]]
    assert placed == [("cpu", F64), ("cpu", torch.float32), ("meta", torch.float32), ("cpu", F64)]
    # float64 keeps the number exactly: a float64 run stays as exact as with floats.
    assert [lr.item() for lr in hyper["lr"][:2]] == [0.1, 0.5]
    assert all(b.device == META and b.requires_grad for b in hyper["betas"][2])
    explicit = higher.optim.get_trainable_opt_params(opt, device="cpu", dtype=torch.float16)
    assert {(lr.device.type, lr.dtype) for lr in explicit["lr"]} == {("cpu", torch.float16)}
