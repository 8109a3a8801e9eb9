"""An operation with no double backward is refused in ``diffopt.step``, naming it and the remedies.

Without the check the inner step succeeds and the outer backward fails with a
bare autograd message, or, for a custom Function whose backward is
``@once_differentiable`` fed a constant gradient, the meta-gradient silently
loses the second-order term.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

import higher

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
        RuntimeError, match=f"double backward of ScaledDotProductFlashAttentionForCpu .*{REMEDIES}"
    ):
        diffopt.step(F.scaled_dot_product_attention(w, w, w).pow(2).sum(), params=[w])


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
