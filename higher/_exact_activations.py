"""Activation modules given the double backward that torch's kernels lack.

The meta-gradient differentiates an inner step's gradient, so every operation
of a patched forward needs a derivative of its backward. Of the activation
modules, ``nn.Hardsigmoid`` has none in torch (``aten::hardsigmoid_backward``
has no derivative formula; measured on 2.13 and 2.14, see
``docs/guides/patched-modules.md``), and it sits in every squeeze-and-excitation
block of torchvision's MobileNetV3. :func:`higher.monkeypatch` gives the copy
of each such module the class in :data:`EXACT_ACTIVATIONS`, as it does for
``nn.MultiheadAttention``: the copy's forward returns torch's kernel's value
and first derivative, bit for bit, and adds the second derivative, at no cost
per forward beyond a few elementwise operations. ``nn.Hardswish`` needs no
such class: torch differentiates ``hardswish_backward``. A functional call
(``F.hardsigmoid`` in a model's own code) still runs the kernel, and the first
differentiable step refuses it, naming it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EXACT_ACTIVATIONS", "Hardsigmoid", "hardsigmoid"]

#: The slope torch's kernels use, ``1.0f / 6.0f``: a float32 constant in every
#: dtype (in float64 the gradient is ``grad * 0.1666666716337204``, not
#: ``grad / 6``). Multiplying by it as a Python float rounds as the kernel does:
#: float64 exactly, float32 and reduced precision after converting it to float32.
_ONE_SIXTH = float(torch.tensor(1.0 / 6.0, dtype=torch.float32))


def hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """``F.hardsigmoid`` with a double backward, equal to it in value and gradient.

    The value is torch's kernel's, computed on the detached input. The
    gradient comes from ``where(-3 < x < 3, x * c, 0)`` (``c`` the kernel's
    slope) added as ``s - s.detach()``, which is exactly zero: its backward is
    ``where(-3 < x < 3, grad, 0) * c``, the kernel's ``hardsigmoid_backward``
    operation for operation (zero at the kinks -3 and 3, as there), and it is
    made of differentiable operations, so the meta-gradient gets the second
    derivative too (``c`` inside the open interval for the incoming gradient,
    zero for the input: the function is piecewise linear).

    Args:
        input: any floating-point tensor.
        inplace: write the result into ``input`` and return it, as
            ``F.hardsigmoid(input, inplace=True)`` does.

    Returns:
        ``clamp(input + 3, 0, 6) / 6``, rounded as torch's kernel rounds it.

    Example:
        >>> x = torch.tensor([-3.0, 0.0, 1.5], requires_grad=True)
        >>> (g,) = torch.autograd.grad(hardsigmoid(x).sum(), x, create_graph=True)
        >>> torch.equal(g, torch.autograd.grad(F.hardsigmoid(x).sum(), x)[0])
        True
        >>> torch.autograd.grad((g * x).sum(), x)[0]  # the kernel would raise here
        tensor([0.0000, 0.1667, 0.1667])
    """
    if not torch.is_grad_enabled():  # no graph: the kernel itself
        return F.hardsigmoid(input, inplace)
    value = F.hardsigmoid(input.detach())
    # The comparisons are strict as in the kernel; the condition is all that
    # ``where`` keeps for the backward, so an in-place write to ``input`` is safe.
    slope = torch.where((input > -3) & (input < 3), input * _ONE_SIXTH, 0.0)
    out = value + (slope - slope.detach())
    return input.copy_(out) if inplace else out


class Hardsigmoid(nn.Hardsigmoid):
    """``nn.Hardsigmoid`` whose forward is :func:`hardsigmoid`: differentiable twice.

    The patched copy of an ``nn.Hardsigmoid`` gets this class; nothing else
    about the module changes.
    """

    def forward(self, input: Tensor) -> Tensor:
        return hardsigmoid(input, self.inplace)


#: The class of each activation module's patched copy, keyed by the exact
#: class of the original (a user's subclass keeps its own forward).
EXACT_ACTIVATIONS: dict[type[nn.Module], type[nn.Module]] = {nn.Hardsigmoid: Hardsigmoid}
