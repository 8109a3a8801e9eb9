"""NAdam: Adam with Nesterov momentum and a momentum-decay schedule."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _compat
from ._ops import Scalar, ema, ema_sq, prepare, safe_sqrt
from .base import DifferentiableOptimizer


def nadam_update(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    *,
    lr: Scalar,
    beta1: Scalar = 0.9,
    beta2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    momentum_decay: Scalar = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """One NAdam step, as ``torch.optim.NAdam`` takes it.

    ``mu_t = beta1 (1 - 0.5 * 0.96^(t * momentum_decay))``, ``mu_product``
    accumulates ``mu_t``; with ``m`` and ``v`` as in Adam and ``d = sqrt(v / (1 -
    beta2^t)) + eps``: ``p <- p - lr (1 - mu_t) / (1 - prod_t) g / d - lr
    mu_{t+1} / (1 - prod_t mu_{t+1}) m / d``. With number hyperparameters
    ``mu_product`` is a Python float rounded exactly as torch rounds its scalar
    tensor (no device round trip; torch's own tensor, after an import, is read
    once at the next step); with a tensor ``beta1`` or ``momentum_decay`` it is
    a tensor where they live, in the graph.

    Example:
        >>> p, state = nadam_update(torch.zeros(1), torch.ones(1), {}, lr=0.1)
        >>> sorted(state), state["mu_product"] < 1
        (['exp_avg', 'exp_avg_sq', 'mu_product', 'step'], True)
    """
    p, g = prepare(
        p, g, weight_decay=weight_decay, maximize=maximize, decoupled=decoupled_weight_decay, lr=lr
    )
    step = state.get("step", 0.0) + 1
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    mu_product = state.get("mu_product", 1.0)
    if isinstance(mu_product, Tensor) and not (mu_product.requires_grad or isinstance(mu, Tensor)):
        # torch's own (imported): read once, a float from here on. Not declared as
        # scalar_state, so that a tensor product and its graph are never cast to floats.
        mu_product = mu_product.item()
    if isinstance(mu, Tensor) or isinstance(mu_product, Tensor):
        mu_product = mu_product * mu
    else:
        # torch multiplies its scalar-dtype tensor by mu rounded to that dtype;
        # the product of two such numbers is exact in a double, then rounded once.
        rounded = _compat.round_like_scalar_state
        mu_product = rounded(mu_product * rounded(mu))
    m = ema(state.get("exp_avg"), g, beta1)
    v = ema_sq(state.get("exp_avg_sq"), g, beta2)
    denom = safe_sqrt(v / (1 - beta2**step)).add(eps)
    coef_g = lr * (1.0 - mu) / (1.0 - mu_product)
    coef_m = lr * mu_next / (1.0 - mu_product * mu_next)
    if isinstance(coef_g, Tensor) or isinstance(coef_m, Tensor):
        new_p = p - coef_g * g / denom - coef_m * m / denom
    else:
        new_p = torch.addcdiv(p, g, denom, value=-coef_g).addcdiv(m, denom, value=-coef_m)
    new_state = {**state, "step": step, "mu_product": mu_product, "exp_avg": m, "exp_avg_sq": v}
    return new_p, new_state


class DifferentiableNAdam(DifferentiableOptimizer):
    """Differentiable ``torch.optim.NAdam``; the update rule is :func:`nadam_update`."""

    torch_type = torch.optim.NAdam
    hyperparameters = (
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "momentum_decay",
        "decoupled_weight_decay",
        "maximize",
    )
    pair_hyperparameters = {"betas": ("beta1", "beta2")}
    update = staticmethod(nadam_update)
