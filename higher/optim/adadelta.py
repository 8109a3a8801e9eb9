"""Adadelta."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._ops import Scalar, ema_sq, prepare, safe_sqrt, sub_scaled
from .base import DifferentiableOptimizer


def adadelta_update(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    *,
    lr: Scalar = 1.0,
    rho: Scalar = 0.9,
    eps: Scalar = 1e-6,
    weight_decay: Scalar = 0.0,
    maximize: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """One Adadelta step, as ``torch.optim.Adadelta`` takes it.

    ``v <- rho v + (1 - rho) g^2``, ``d = sqrt(a + eps) / sqrt(v + eps) * g``,
    ``a <- rho a + (1 - rho) d^2``, ``p <- p - lr d``.

    Example:
        >>> p, state = adadelta_update(torch.zeros(1), torch.ones(1), {}, eps=1.0)
        >>> sorted(state)
        ['acc_delta', 'square_avg', 'step']
    """
    p, g = prepare(p, g, weight_decay=weight_decay, maximize=maximize)
    step = state.get("step", 0.0) + 1
    square_avg = ema_sq(state.get("square_avg"), g, rho)
    std = safe_sqrt(square_avg.add(eps))
    acc_delta = state.get("acc_delta")
    if acc_delta is None:
        acc_delta = torch.zeros_like(p)
    delta = safe_sqrt(acc_delta.add(eps)).div(std).mul(g)
    acc_delta = ema_sq(acc_delta, delta, rho)
    new_state = {**state, "step": step, "square_avg": square_avg, "acc_delta": acc_delta}
    return sub_scaled(p, delta, lr), new_state


class DifferentiableAdadelta(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adadelta``; the update rule is :func:`adadelta_update`."""

    torch_type = torch.optim.Adadelta
    hyperparameters = ("lr", "rho", "eps", "weight_decay", "maximize")
    update = staticmethod(adadelta_update)
