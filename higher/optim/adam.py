"""Adam and AdamW."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ._ops import Scalar, ema, ema_sq, prepare, safe_sqrt, sub_scaled_ratio
from .base import DifferentiableOptimizer


def adam_update(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    *,
    lr: Scalar,
    beta1: Scalar = 0.9,
    beta2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """One Adam (or AdamW) step, as ``torch.optim.Adam`` takes it.

    With ``t`` the step count: ``m <- beta1 m + (1 - beta1) g``,
    ``v <- beta2 v + (1 - beta2) g^2``, ``p <- p - lr / (1 - beta1^t) * m /
    (sqrt(v) / sqrt(1 - beta2^t) + eps)``; with AMSGrad ``v`` in the
    denominator is the running maximum ``max_exp_avg_sq``. Weight decay is added
    to ``g``, or with ``decoupled_weight_decay`` (AdamW) multiplies ``p`` by
    ``1 - lr * weight_decay`` first. ``sqrt`` has a zero derivative at 0 (see
    :func:`~higher.optim._ops.safe_sqrt`).

    Example:
        >>> p, state = adam_update(torch.zeros(1), torch.ones(1), {}, lr=0.1)
        >>> round(p.item(), 6), state["step"]
        (-0.1, 1.0)
    """
    p, g = prepare(
        p, g, weight_decay=weight_decay, maximize=maximize, decoupled=decoupled_weight_decay, lr=lr
    )
    step = state.get("step", 0.0) + 1
    m = ema(state.get("exp_avg"), g, beta1)
    v = ema_sq(state.get("exp_avg_sq"), g, beta2)
    new_state = {**state, "step": step, "exp_avg": m, "exp_avg_sq": v}
    if amsgrad:
        v_max = state.get("max_exp_avg_sq")
        v = v if v_max is None else torch.maximum(v_max, v)
        new_state["max_exp_avg_sq"] = v
    step_size = lr / (1 - beta1**step)
    denom = safe_sqrt(v).div((1 - beta2**step) ** 0.5).add(eps)
    return sub_scaled_ratio(p, m, denom, step_size), new_state


class DifferentiableAdam(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adam``; the update rule is :func:`adam_update`."""

    torch_type: ClassVar[type[torch.optim.Optimizer]] = torch.optim.Adam
    hyperparameters = (
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "amsgrad",
        "maximize",
        "decoupled_weight_decay",
    )
    pair_hyperparameters = {"betas": ("beta1", "beta2")}
    update = staticmethod(adam_update)


class DifferentiableAdamW(DifferentiableAdam):
    """Differentiable ``torch.optim.AdamW``: :func:`adam_update` with decoupled decay."""

    torch_type = torch.optim.AdamW
    kernel_defaults = {"decoupled_weight_decay": True}
