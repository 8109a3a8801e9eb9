"""An operation with no double backward is refused in ``diffopt.step``, naming it and the remedies.

Without the check the inner step succeeds and the outer backward fails with a
bare autograd message, or, for a custom Function whose backward is
``@once_differentiable`` fed a constant gradient, the meta-gradient silently
loses the second-order term.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

import higher
from higher._exact_activations import Hardsigmoid, hardsigmoid

REMEDIES = r"first_order=True.*track_higher_grads=False.*differentiable backward"


class OnceSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class Squared(nn.Module):
    def __init__(self, last: bool) -> None:
        super().__init__()
        self.lin, self.out, self.last = nn.Linear(3, 3), nn.Linear(3, 1), last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.last:  # the gradient flowing into the Function is constant: silent otherwise
            return OnceSquare.apply(self.out(self.lin(x)))
        return self.out(OnceSquare.apply(self.lin(x)))


@pytest.mark.parametrize("last", [False, True], ids=["inside", "last"])
def test_once_differentiable_function_is_named(last):
    model = Squared(last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    diffopt = higher.optim.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    with pytest.raises(RuntimeError, match=f"custom autograd.Function OnceSquare.*{REMEDIES}"):
        diffopt.step(fmodel(x).sum())


@pytest.mark.parametrize("setting", [{"first_order": True}, {"track_higher_grads": False}])
def test_the_remedies_work(setting):
    model = Squared(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, **setting) as (f, d):
        d.step(f(x).sum())
        d.step(f(x).sum())


def test_fused_attention_called_outside_a_patched_module_is_named():
    # Attention computed by the user's own code on the weights (not in a patched
    # forward, which would pick the math kernel): the fused CPU kernel.
    w = torch.randn(2, 1, 4, 8, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    diffopt = higher.optim.get_diff_optim(opt, [w])
    assert torch.autograd.grad(F.scaled_dot_product_attention(w, w, w).sum(), w)  # runs fused
    with pytest.raises(
        RuntimeError,
        match=r"through aten::_scaled_dot_product_flash_attention_for_cpu \(its backward, "
        rf"aten::_scaled_dot_product_flash_attention_for_cpu_backward, .*{REMEDIES}",
    ):
        diffopt.step(F.scaled_dot_product_attention(w, w, w).pow(2).sum(), params=[w])


class _Gated(nn.Module):
    """Squeeze-and-excitation as MobileNetV3 has it, the gate called functionally."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.conv, self.fc, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 4), nn.Linear(4, 1)
        self.gate = None if functional else nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        s = self.fc(h.mean((2, 3)))
        s = F.hardsigmoid(s) if self.gate is None else self.gate(s)
        return self.head((h * s[:, :, None, None]).mean((2, 3)))


def test_the_op_without_a_derivative_is_named_not_its_neighbour():
    # The error node's inputs are the gradient and the gate's input, a Linear's
    # output (a convolution's, in MobileNetV3): the op is named from its message.
    model = _Gated(functional=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    diffopt = higher.optim.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    with pytest.raises(RuntimeError) as caught:
        diffopt.step(fmodel(torch.randn(2, 3, 8, 8)).pow(2).sum())
    message = str(caught.value)
    assert re.search(
        rf"through aten::hardsigmoid \(its backward, aten::hardsigmoid_backward, has no derivative "
        rf"formula\), which has no double backward.*{REMEDIES}",
        message,
    ), message
    assert not re.search(r"\b(convolution|linear|addmm|mm|mul)", message, re.IGNORECASE), message


def test_hardsigmoid_modules_get_a_double_backward():
    model = _Gated(functional=False).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        assert type(fmodel.gate) is Hardsigmoid and isinstance(fmodel.gate, nn.Hardsigmoid)
        diffopt.step(fmodel(x).pow(2).sum())
        fmodel(x).pow(2).sum().backward()
    assert type(model.gate) is nn.Hardsigmoid  # the original keeps its class
    assert all(p.grad is not None for p in model.parameters())


#: Inputs at and around the kinks, where the gradient switches between 0 and 1/6.
KINKS = [
    -4.0,
    -3.0,
    -2.999999,
    -1.0,
    -0.0,
    0.0,
    1.0,
    2.999999,
    3.0,
    4.0,
    float("inf"),
    float("nan"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_exact_hardsigmoid_is_the_kernel_bit_for_bit(dtype, inplace):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(KINKS), torch.randn(1000, generator=g) * 4]).to(dtype)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]

    def value_and_gradient(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.clone().requires_grad_()
        y = module(leaf * 1)  # not a leaf: it may be written in place
        (dx,) = torch.autograd.grad(y, leaf, grad)
        return y.detach().view(bits), dx.view(bits)

    want = value_and_gradient(nn.Hardsigmoid(inplace))
    got = value_and_gradient(Hardsigmoid(inplace))
    assert torch.equal(got[0], want[0]), "value"
    assert torch.equal(got[1], want[1]), "gradient"


def test_exact_hardsigmoid_second_derivative():
    x = (torch.randn(64, dtype=torch.float64) * 4).requires_grad_()
    assert torch.autograd.gradgradcheck(hardsigmoid, (x,))
    # At the kinks too: the second derivatives are those of torch's
    # hardsigmoid_backward, linear in the gradient and zero in the input.
    k = torch.tensor(KINKS[:-2], dtype=torch.float64, requires_grad=True)
    v = torch.randn(k.shape, dtype=torch.float64, requires_grad=True)
    (dk,) = torch.autograd.grad(hardsigmoid(k), k, v, create_graph=True)
    w = torch.randn(k.shape, dtype=torch.float64)
    dv, dkk = torch.autograd.grad(dk, (v, k), w, allow_unused=True, materialize_grads=True)
    assert torch.equal(dv, torch.ops.aten.hardsigmoid_backward(w, k.detach()))
    assert torch.equal(dkk, torch.zeros_like(dkk))


def test_an_ordinary_model_passes_the_check_and_is_checked_once(monkeypatch):
    calls = []
    real = higher._compat.without_double_backward
    monkeypatch.setattr(
        higher._compat, "without_double_backward", lambda roots: calls.append(1) or real(roots)
    )
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(fmodel(x).pow(2).sum())
    assert calls == [1]
