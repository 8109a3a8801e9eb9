"""Stochastic gradient descent, with momentum and Nesterov momentum."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._ops import Scalar, active, add_scaled, prepare, sub_scaled
from .base import DifferentiableOptimizer


def sgd_update(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    *,
    lr: Scalar,
    momentum: Scalar = 0.0,
    dampening: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """One SGD step, as ``torch.optim.SGD`` takes it.

    ``g <- g + weight_decay * p``; with momentum ``b <- momentum * b + (1 -
    dampening) * g`` (``b <- g`` on the first step) and ``g <- b`` or, with
    Nesterov, ``g <- g + momentum * b``; then ``p <- p - lr * g``. Unlike torch,
    the first momentum buffer keeps its graph.

    Example:
        >>> p, state = sgd_update(torch.ones(2), torch.ones(2), {}, lr=0.5)
        >>> p.tolist()
        [0.5, 0.5]
    """
    p, g = prepare(p, g, weight_decay=weight_decay, maximize=maximize)
    if active(momentum):
        buf = state.get("momentum_buffer")
        buf = g if buf is None else add_scaled(buf * momentum, g, 1 - dampening)
        state = {**state, "momentum_buffer": buf}
        g = add_scaled(g, buf, momentum) if nesterov else buf
    return sub_scaled(p, g, lr), state


def sgd_update_group(
    params: list[Tensor],
    grads: list[Tensor | None],
    states: list[dict[str, Any]],
    positions: list[int],
    *,
    lr: Scalar,
    momentum: Scalar = 0.0,
    dampening: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> bool:
    """:func:`sgd_update` over a param group, for plain SGD with a number as ``lr``.

    Plain SGD (no momentum, weight decay or ascent) is ``p - lr * g``, one
    ``torch.add(p, g, alpha=-lr)`` per parameter, as :func:`sgd_update` takes
    it: the same kernel, so the same values and graph. Returns False (nothing
    done) for every other setting, which :func:`sgd_update` then takes.
    """
    # active(momentum) and active(weight_decay), inlined: this runs at every step.
    if (
        maximize
        or isinstance(lr, Tensor)
        or isinstance(momentum, Tensor)
        or isinstance(weight_decay, Tensor)
        or momentum != 0
        or weight_decay != 0
    ):
        return False
    alpha = -lr
    add = torch.add
    for i in positions:
        g = grads[i]
        if g is not None:
            params[i] = add(params[i], g, alpha=alpha)
    return True


class DifferentiableSGD(DifferentiableOptimizer):
    """Differentiable ``torch.optim.SGD``; the update rule is :func:`sgd_update`."""

    torch_type = torch.optim.SGD
    hyperparameters = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    update = staticmethod(sgd_update)
    update_group = staticmethod(sgd_update_group)
