"""RAdam: Adam with a rectified adaptive learning rate."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._ops import Scalar, ema, ema_sq, prepare, safe_sqrt
from .base import DifferentiableOptimizer


def radam_update(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    *,
    lr: Scalar,
    beta1: Scalar = 0.9,
    beta2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """One RAdam step, as ``torch.optim.RAdam`` takes it.

    With ``m``, ``v`` as in Adam, ``rho_inf = 2 / (1 - beta2) - 1`` and
    ``rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)``: while ``rho_t <= 5``,
    ``p <- p - lr m / (1 - beta1^t)``; after, the adaptive step is multiplied by
    the rectification ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf -
    4)(rho_inf - 2) rho_t))``: ``p <- p - lr m / (1 - beta1^t) * r_t *
    sqrt(1 - beta2^t) / (sqrt(v) + eps)``. The switch at ``rho_t = 5`` is a
    discontinuity in the hyperparameters; with a tensor ``beta2`` it is taken
    on the device (both branches are computed), never read on the host.

    Example:
        >>> p, _ = radam_update(torch.zeros(1), torch.ones(1), {}, lr=0.1)
        >>> round(p.item(), 6)
        -0.1
    """
    p, g = prepare(
        p, g, weight_decay=weight_decay, maximize=maximize, decoupled=decoupled_weight_decay, lr=lr
    )
    step = state.get("step", 0.0) + 1
    m = ema(state.get("exp_avg"), g, beta1)
    v = ema_sq(state.get("exp_avg_sq"), g, beta2)
    new_state = {**state, "step": step, "exp_avg": m, "exp_avg_sq": v}
    bias_correction2 = 1 - beta2**step
    m_hat = m / (1 - beta1**step)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    if not isinstance(rho_t, Tensor):
        if rho_t > 5.0:
            return p - _rectified(m_hat * lr, v, eps, bias_correction2, rho_t, rho_inf), new_state
        return p - m_hat * lr, new_state
    # A tensor beta2: both branches, chosen on the device without a host sync.
    # The branch not taken sees harmless stand-ins (rho = 6), so that its zero
    # gradient cannot turn NaN through a negative square root.
    rectify = rho_t > 5.0
    rho_t = torch.where(rectify, rho_t, 6.0)
    rho_inf = torch.where(rectify, rho_inf, 6.0)
    plain = m_hat * lr
    rectified = _rectified(plain, v, eps, bias_correction2, rho_t, rho_inf)
    return p - torch.where(rectify, rectified, plain), new_state


def _rectified(
    step: Tensor, v: Tensor, eps: Scalar, bias_correction2: Scalar, rho_t: Scalar, rho_inf: Scalar
) -> Tensor:
    """``step * sqrt(1 - beta2^t) / (sqrt(v) + eps) * r_t``, in torch's order of operations."""
    rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
    adaptive = bias_correction2**0.5 / safe_sqrt(v).add(eps)
    return step * adaptive * rect


class DifferentiableRAdam(DifferentiableOptimizer):
    """Differentiable ``torch.optim.RAdam``; the update rule is :func:`radam_update`."""

    torch_type = torch.optim.RAdam
    hyperparameters = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "maximize")
    pair_hyperparameters = {"betas": ("beta1", "beta2")}
    update = staticmethod(radam_update)
