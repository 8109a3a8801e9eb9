"""Adagrad."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._ops import Scalar, prepare, safe_sqrt, sub_scaled_ratio
from .base import DifferentiableOptimizer


def adagrad_update(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    *,
    lr: Scalar,
    lr_decay: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    initial_accumulator_value: Scalar = 0.0,
    eps: Scalar = 1e-10,
    maximize: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """One Adagrad step, as ``torch.optim.Adagrad`` takes it.

    ``s <- s + g^2`` (``s`` starts at ``initial_accumulator_value``), ``p <- p
    - lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)``.

    Example:
        >>> p, state = adagrad_update(torch.zeros(1), torch.ones(1), {}, lr=0.1, eps=0.0)
        >>> round(p.item(), 6), state["sum"].item()
        (-0.1, 1.0)
    """
    p, g = prepare(p, g, weight_decay=weight_decay, maximize=maximize)
    step = state.get("step", 0.0) + 1
    clr = lr / (1 + (step - 1) * lr_decay)
    total = state.get("sum")
    if total is None:
        if isinstance(initial_accumulator_value, Tensor):  # keeps its graph, reads nothing
            total = torch.zeros_like(p) + initial_accumulator_value
        else:
            total = torch.full_like(p, initial_accumulator_value)
    total = torch.addcmul(total, g, g)
    std = safe_sqrt(total).add(eps)
    return sub_scaled_ratio(p, g, std, clr), {**state, "step": step, "sum": total}


class DifferentiableAdagrad(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adagrad``; the update rule is :func:`adagrad_update`."""

    torch_type = torch.optim.Adagrad
    hyperparameters = (
        "lr",
        "lr_decay",
        "weight_decay",
        "initial_accumulator_value",
        "eps",
        "maximize",
    )
    update = staticmethod(adagrad_update)
