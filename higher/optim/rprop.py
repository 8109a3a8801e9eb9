"""Rprop: resilient back-propagation, driven by gradient signs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._ops import Scalar, clamp
from .base import DifferentiableOptimizer


def rprop_update(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    *,
    lr: Scalar = 1e-2,
    etaminus: Scalar = 0.5,
    etaplus: Scalar = 1.2,
    step_size_min: Scalar = 1e-6,
    step_size_max: Scalar = 50.0,
    maximize: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """One Rprop step, as ``torch.optim.Rprop`` takes it.

    Per entry, the step size (starting at ``lr``) is multiplied by ``etaplus``
    when the gradient kept its sign, by ``etaminus`` when it flipped (and that
    entry's gradient is then taken as 0), and clamped to ``[step_size_min,
    step_size_max]``; ``p <- p - sign(g) * step_size``. ``sign`` has a zero
    derivative, so meta-gradients flow only through the identity path and the
    step sizes (``lr``, ``etas``).

    Example:
        >>> p, state = rprop_update(torch.zeros(2), torch.tensor([1.0, -2.0]), {}, lr=0.5)
        >>> p.tolist()
        [-0.5, 0.5]
    """
    if maximize:
        g = -g
    step = state.get("step", 0.0) + 1
    prev = state.get("prev")
    step_size = state.get("step_size")
    if step_size is None:
        step_size = torch.ones_like(p) * lr if isinstance(lr, Tensor) else torch.full_like(p, lr)
    if prev is None:
        flipped = None
        factor: Any = 1.0
    else:
        sign = (g * prev).sign()
        flipped = sign < 0
        factor = torch.where(sign > 0, etaplus, torch.where(flipped, etaminus, torch.ones_like(g)))
    step_size = clamp(step_size * factor, step_size_min, step_size_max)
    if flipped is not None:
        g = torch.where(flipped, torch.zeros_like(g), g)
    new_p = torch.addcmul(p, g.sign(), step_size, value=-1)
    return new_p, {**state, "step": step, "prev": g, "step_size": step_size}


class DifferentiableRprop(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Rprop``; the update rule is :func:`rprop_update`."""

    torch_type = torch.optim.Rprop
    hyperparameters = ("lr", "etas", "step_sizes", "maximize")
    pair_hyperparameters = {
        "etas": ("etaminus", "etaplus"),
        "step_sizes": ("step_size_min", "step_size_max"),
    }
    update = staticmethod(rprop_update)
