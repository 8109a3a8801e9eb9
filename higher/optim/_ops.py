"""Out-of-place building blocks shared by the update rules.

Every hyperparameter may be a Python number or a tensor (possibly requiring
grad, possibly of a parameter's shape). With a number we use the fused
``alpha=``/``value=`` forms that cost a single kernel; a tensor has to enter
the graph as an ordinary operand.

None of these helpers reads a tensor's value on the host: a tensor
hyperparameter on an accelerator costs no synchronisation. A zero-dimensional
tensor on the CPU beside parameters on an accelerator (a hand-made
``torch.tensor(0.1)``) is accepted too: the helpers then take forms that
accept such a "CPU scalar" operand.
"""

from __future__ import annotations

import torch
from torch import Tensor

Scalar = float | Tensor


def active(x: Scalar | bool) -> bool:
    """Whether an optional term (weight decay, momentum) takes part in the update.

    A tensor always does: it may be zero now yet need a gradient.
    """
    return isinstance(x, Tensor) or x != 0


def prepare(
    p: Tensor,
    g: Tensor,
    *,
    weight_decay: Scalar,
    maximize: bool,
    decoupled: bool = False,
    lr: Scalar = 0.0,
) -> tuple[Tensor, Tensor]:
    """The opening of every torch.optim update: the ascent sign, then weight decay.

    Coupled decay adds ``weight_decay * p`` to the gradient; decoupled decay
    (AdamW) scales the parameter by ``1 - lr * weight_decay`` instead.
    Returns the new ``(p, g)``.
    """
    if maximize:
        g = -g
    if active(weight_decay):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = add_scaled(g, p, weight_decay)
    return p, g


def add_scaled(x: Tensor, y: Tensor, scale: Scalar) -> Tensor:
    """``x + scale * y``."""
    if isinstance(scale, Tensor):
        # addcmul refuses a CPU operand beside CUDA ones on some torch releases.
        return x + y * scale if scale.device != x.device else torch.addcmul(x, y, scale)
    return torch.add(x, y, alpha=scale)


def sub_scaled(x: Tensor, y: Tensor, scale: Scalar) -> Tensor:
    """``x - scale * y``."""
    if isinstance(scale, Tensor):
        return x - y * scale if scale.device != x.device else torch.addcmul(x, y, scale, value=-1)
    return torch.add(x, y, alpha=-scale)


def sub_scaled_ratio(x: Tensor, num: Tensor, den: Tensor, scale: Scalar) -> Tensor:
    """``x - scale * num / den``."""
    if isinstance(scale, Tensor):
        return x - scale * (num / den)
    return torch.addcdiv(x, num, den, value=-scale)


def ema(avg: Tensor | None, x: Tensor, decay: Scalar) -> Tensor:
    """``decay * avg + (1 - decay) * x``, with ``avg = 0`` when None (torch's lerp)."""
    if avg is None:
        return x * (1 - decay)
    if isinstance(decay, Tensor):
        return avg + (x - avg) * (1 - decay)
    return torch.lerp(avg, x, 1 - decay)


def ema_sq(avg: Tensor | None, x: Tensor, decay: Scalar) -> Tensor:
    """``decay * avg + (1 - decay) * x * x``, with ``avg = 0`` when None."""
    if isinstance(decay, Tensor):
        sq = x * x * (1 - decay)
        return sq if avg is None else avg * decay + sq
    if avg is None:
        return torch.mul(x, x).mul(1 - decay)
    return torch.addcmul(avg * decay, x, x, value=1 - decay)


def clamp(x: Tensor, low: Scalar, high: Scalar) -> Tensor:
    """``torch.clamp(x, low, high)`` for any mix of number and tensor bounds.

    ``torch.clamp`` takes two numbers or two tensors on ``x``'s device. Other
    mixes (a number and a tensor, a CPU scalar beside an accelerator) get the
    same values and the same gradients (ties go to ``x``, ``high`` wins when
    ``low > high``) from two ``where``.
    """
    both_numbers = not isinstance(low, Tensor) and not isinstance(high, Tensor)
    both_here = all(isinstance(b, Tensor) and b.device == x.device for b in (low, high))
    if both_numbers or both_here:
        return torch.clamp(x, low, high)  # type: ignore[arg-type]
    x = torch.where(x < low, low, x)
    return torch.where(x > high, high, x)


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` whose derivative is 0, not inf, where ``x == 0``.

    A parameter whose gradient is exactly zero (a dead ReLU unit) has a zero
    second moment; the derivative of ``sqrt`` there is infinite and a
    meta-gradient turns NaN through ``inf * 0``. Clamping to the smallest
    normal number changes no value that reaches the update (it vanishes next to
    any ``eps``) and gives those entries a zero derivative. Exact elsewhere.
    Use it for the ``sqrt`` of a moving average in your own update rules.

    Example:
        >>> v = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> safe_sqrt(v).sum().backward()
        >>> v.grad.tolist()
        [0.0, 0.25]
    """
    if not x.requires_grad:
        return x.sqrt()
    return x.clamp_min(torch.finfo(x.dtype).tiny).sqrt()
