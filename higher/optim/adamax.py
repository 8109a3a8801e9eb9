"""Adamax: Adam with an infinity-norm second moment."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._ops import Scalar, ema, prepare, sub_scaled_ratio
from .base import DifferentiableOptimizer


def adamax_update(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    *,
    lr: Scalar,
    beta1: Scalar = 0.9,
    beta2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    maximize: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """One Adamax step, as ``torch.optim.Adamax`` takes it.

    ``m <- beta1 m + (1 - beta1) g``, ``u <- max(beta2 u, |g| + eps)``,
    ``p <- p - lr / (1 - beta1^t) * m / u``. The ``max`` is not differentiable
    where both sides tie; autograd then splits the gradient between them.

    Example:
        >>> p, _ = adamax_update(torch.zeros(1), torch.ones(1), {}, lr=0.1, eps=0.0)
        >>> round(p.item(), 6)
        -0.1
    """
    p, g = prepare(p, g, weight_decay=weight_decay, maximize=maximize)
    step = state.get("step", 0.0) + 1
    m = ema(state.get("exp_avg"), g, beta1)
    u = g.abs().add(eps)
    u_prev = state.get("exp_inf")
    if u_prev is not None:
        u = torch.maximum(u_prev * beta2, u)
    clr = lr / (1 - beta1**step)
    return sub_scaled_ratio(p, m, u, clr), {**state, "step": step, "exp_avg": m, "exp_inf": u}


class DifferentiableAdamax(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adamax``; the update rule is :func:`adamax_update`."""

    torch_type = torch.optim.Adamax
    hyperparameters = ("lr", "betas", "eps", "weight_decay", "maximize")
    pair_hyperparameters = {"betas": ("beta1", "beta2")}
    update = staticmethod(adamax_update)
