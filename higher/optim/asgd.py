"""ASGD: averaged stochastic gradient descent."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _compat
from ._ops import Scalar, prepare, sub_scaled
from .base import DifferentiableOptimizer


def asgd_update(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    *,
    lr: Scalar = 1e-2,
    lambd: Scalar = 1e-4,
    alpha: Scalar = 0.75,
    t0: Scalar = 1e6,
    weight_decay: Scalar = 0.0,
    maximize: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """One ASGD step, as ``torch.optim.ASGD`` takes it.

    ``p <- p (1 - lambd eta) - eta g``; the average ``ax`` follows ``ax <- ax +
    mu (p - ax)`` (``ax <- p`` while ``mu = 1``); then ``eta <- lr / (1 + lambd lr
    t)^alpha`` and ``mu <- 1 / max(1, t - t0)``. With a number ``lr``, ``eta``
    and ``mu`` are Python floats rounded to torch's scalar dtype as torch rounds
    them; a tensor ``lr`` or ``t0`` makes them tensors where it lives (the
    comparisons with ``t0`` then happen there, with no host sync).

    Example:
        >>> p, state = asgd_update(torch.zeros(1), torch.ones(1), {}, lr=0.5, lambd=0.0)
        >>> p.item(), state["ax"].item()
        (-0.5, -0.5)
    """
    p, g = prepare(p, g, weight_decay=weight_decay, maximize=maximize)
    step = state.get("step", 0.0) + 1
    eta = state.get("eta")
    if eta is None:
        eta = lr if isinstance(lr, Tensor) else _compat.round_like_scalar_state(lr)
    mu = state.get("mu", 1.0)
    p = sub_scaled(p * (1 - lambd * eta), g, eta)
    ax = state.get("ax")
    if isinstance(mu, Tensor):  # from a tensor t0: mu == 1 is decided on the device
        averaged = p * mu if ax is None else ax + (p - ax) * mu
        ax = torch.where(mu == 1, p, averaged)
    elif mu != 1:
        ax = p * mu if ax is None else ax + (p - ax) * mu
    else:
        ax = p
    new_eta = lr / ((1 + lambd * lr * step) ** alpha)
    if not isinstance(new_eta, Tensor):
        new_eta = _compat.round_like_scalar_state(new_eta)
    # t0 is a threshold on the step count: it has no useful derivative. A tensor
    # t0 is compared where it lives; mu is rounded as torch rounds it (to its
    # scalar dtype) and kept in t0's dtype.
    if isinstance(t0, Tensor):
        mu = 1 / torch.clamp(step - t0.detach(), min=1)
        new_mu: Scalar = mu.to(_compat.scalar_dtype()).to(mu.dtype)
    else:
        new_mu = _compat.round_like_scalar_state(1 / max(1, step - t0))
    return p, {**state, "step": step, "eta": new_eta, "mu": new_mu, "ax": ax}


class DifferentiableASGD(DifferentiableOptimizer):
    """Differentiable ``torch.optim.ASGD``; the update rule is :func:`asgd_update`."""

    torch_type = torch.optim.ASGD
    hyperparameters = ("lr", "lambd", "alpha", "t0", "weight_decay", "maximize")
    scalar_state = frozenset({"step", "eta", "mu"})
    update = staticmethod(asgd_update)
