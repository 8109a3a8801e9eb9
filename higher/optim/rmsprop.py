"""RMSprop, plain and centered, with optional momentum."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._ops import Scalar, active, ema, ema_sq, prepare, safe_sqrt, sub_scaled, sub_scaled_ratio
from .base import DifferentiableOptimizer


def rmsprop_update(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    *,
    lr: Scalar,
    alpha: Scalar = 0.99,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    momentum: Scalar = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """One RMSprop step, as ``torch.optim.RMSprop`` takes it.

    ``v <- alpha v + (1 - alpha) g^2``; centered: ``c <- alpha c + (1 - alpha)
    g`` and ``d = sqrt(v - c^2) + eps``, else ``d = sqrt(v) + eps``; with
    momentum ``b <- momentum b + g / d`` and ``p <- p - lr b``, else ``p <- p -
    lr g / d``.

    Example:
        >>> p, state = rmsprop_update(torch.zeros(1), torch.ones(1), {}, lr=0.1, alpha=0.0)
        >>> round(p.item(), 6)
        -0.1
    """
    p, g = prepare(p, g, weight_decay=weight_decay, maximize=maximize)
    step = state.get("step", 0.0) + 1
    square_avg = ema_sq(state.get("square_avg"), g, alpha)
    new_state = {**state, "step": step, "square_avg": square_avg}
    if centered:
        grad_avg = ema(state.get("grad_avg"), g, alpha)
        new_state["grad_avg"] = grad_avg
        avg = safe_sqrt(torch.addcmul(square_avg, grad_avg, grad_avg, value=-1))
    else:
        avg = safe_sqrt(square_avg)
    avg = avg.add(eps)
    if active(momentum):
        buf = state.get("momentum_buffer")
        buf = g / avg if buf is None else torch.addcdiv(buf * momentum, g, avg)
        new_state["momentum_buffer"] = buf
        return sub_scaled(p, buf, lr), new_state
    return sub_scaled_ratio(p, g, avg, lr), new_state


class DifferentiableRMSprop(DifferentiableOptimizer):
    """Differentiable ``torch.optim.RMSprop``; the update rule is :func:`rmsprop_update`."""

    torch_type = torch.optim.RMSprop
    hyperparameters = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")
    update = staticmethod(rmsprop_update)
