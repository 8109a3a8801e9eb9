"""Normalization layers written from primitive ops, for forwards run under ``vmap``.

Batched mode (:mod:`higher.batched`) runs a module's forward under
``torch.func.vmap``. In torch 2.13 the batching of ``F.batch_norm`` and
``F.instance_norm`` gives wrong gradients and meta-gradients, silently (a
relative error of order one in our tests), while the same maths written from
``mean``, ``var`` and ``rsqrt`` is batched exactly. :class:`ExactNorms` is a
torch function mode that, while active, answers calls to those functions with
the formulations below; every other call runs unchanged.

Outside ``vmap`` too, torch 2.13's native batch norm gets gradients wrong,
first order and second, in training and eval mode alike, when its input or the
gradient of its output has strides that are not the canonical ones of their
shape (a size-1 dimension with an unusual stride: the input of ``BatchNorm2d``
after ``x.transpose(1, 2).unsqueeze(-1)``, or after a ``Conv2d`` or
``GroupNorm`` that keeps such a layout), while its output is right. With a
canonical input (contiguous, or channels-last as ``.contiguous(memory_format=
torch.channels_last)`` makes it) and a gradient of the same layout it is
exact. :class:`ExactBatchNorm` keeps the native kernel there in eval mode,
making the gradient canonical on its way in, and uses the primitive-op
formulation for every other layout and in training mode; patched modules run
their forward inside it, and their batch-norm submodules (called directly)
too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def _affine(
    out: Tensor, weight: Tensor | None, bias: Tensor | None, shape: Sequence[int]
) -> Tensor:
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def _update_running(running: Tensor | None, value: Tensor, momentum: float) -> None:
    if running is not None:
        with torch.no_grad():
            running.mul_(1 - momentum).add_(value.detach() * momentum)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.batch_norm`` from primitive ops (channels on dim 1)."""
    shape = [1, -1] + [1] * (input.dim() - 2)
    if training:
        dims = [0, *range(2, input.dim())]
        n = input.numel() // input.size(1)
        if n <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{tuple(input.shape)}"
            )
        mean = input.mean(dims)
        var = input.var(dims, correction=0)
        _update_running(running_mean, mean, momentum)
        _update_running(running_var, var * (n / (n - 1)), momentum)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm in eval mode needs running_mean and running_var")
        mean, var = running_mean, running_var
    out = (input - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    return _affine(out, weight, bias, shape)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.instance_norm`` from primitive ops (per sample and channel)."""
    shape = [1, -1] + [1] * (input.dim() - 2)
    if use_input_stats:
        dims = list(range(2, input.dim()))
        n = input[0, 0].numel()
        mean = input.mean(dims, keepdim=True)
        var = input.var(dims, correction=0, keepdim=True)
        # torch updates the running statistics with their mean over the samples.
        flat = [input.size(0), input.size(1)]
        _update_running(running_mean, mean.reshape(flat).mean(0), momentum)
        if n > 1:
            _update_running(running_var, (var * (n / (n - 1))).reshape(flat).mean(0), momentum)
        out = (input - mean) * torch.rsqrt(var + eps)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("instance_norm without input statistics needs running statistics")
        out = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _affine(out, weight, bias, shape)


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm`` from primitive ops (over the trailing ``normalized_shape``)."""
    dims = list(range(input.dim() - len(normalized_shape), input.dim()))
    mean = input.mean(dims, keepdim=True)
    var = input.var(dims, correction=0, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


_REPLACEMENTS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.batch_norm: batch_norm,
    F.instance_norm: instance_norm,
    F.layer_norm: layer_norm,
}


def _needs_graph(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [*args[:1], *args[3:5], kwargs.get("input"), kwargs.get("weight"), kwargs.get("bias")]
    return any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _canonical_strides(t: Tensor, channels_last: bool) -> tuple[int, ...]:
    """The strides ``t.contiguous(memory_format=...)`` gives a fresh tensor of its shape."""
    order = [0, 2, 3, 1] if channels_last else list(range(t.dim()))
    strides = [0] * t.dim()
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= t.size(d)
    return tuple(strides)


def _native_layout(t: Tensor) -> torch.memory_format | None:
    """The memory format whose canonical strides ``t`` has; None for any other layout."""
    if t.stride() == _canonical_strides(t, channels_last=False):
        return torch.contiguous_format
    if t.dim() == 4 and t.stride() == _canonical_strides(t, channels_last=True):
        return torch.channels_last
    return None


def _native_batch_norm(
    func: Callable[..., Tensor],
    fmt: torch.memory_format,
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> Tensor:
    out = func(*args, **kwargs)
    if out.requires_grad:
        strides = _canonical_strides(out, channels_last=fmt == torch.channels_last)

        # The kernel reads the gradient as if it had the canonical layout. (A
        # gradcheck's hooks may be handed no gradient at all.)
        def canonical(grad: Tensor | None) -> Tensor | None:
            if grad is None or grad.stride() == strides:
                return grad
            return grad.clone(memory_format=fmt)

        out.register_hook(canonical)
    return out


class ExactBatchNorm(TorchFunctionMode):
    """While active, an ``F.batch_norm`` that builds a graph differentiates exactly.

    Torch's native kernel computes wrong gradients for some input and gradient
    layouts (see the module's docstring). On a canonical input it runs (in training
    mode only on the module's own running statistics, not views), and the gradient
    reaching it is made canonical; on any other layout, and under
    ``torch.func`` transforms, :func:`batch_norm` runs instead. Without a
    graph the native kernel always runs.

    Example:
        >>> bn = nn.BatchNorm2d(4).eval()
        >>> x = torch.randn(5, 3, 4).transpose(1, 2).unsqueeze(-1).requires_grad_()
        >>> with ExactBatchNorm():
        ...     y = bn(x)
        >>> torch.allclose(y, bn(x), atol=1e-6)
        True
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is not F.batch_norm or not _needs_graph(args, kwargs):
            return func(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        training = args[5] if len(args) > 5 else kwargs.get("training", False)
        fmt = None
        # In training mode the kernel saves the running statistics for its backward
        # and updates them in place: per-task statistics, views of one tensor in
        # batched loop mode, would then fail autograd's version check. A module's own
        # statistics (or none) are fine.
        stats = args[1] if len(args) > 1 else kwargs.get("running_mean")
        own_stats = not training or stats is None or stats._base is None
        if own_stats and not torch._C._functorch.is_functorch_wrapped_tensor(x):
            fmt = _native_layout(x)
        if fmt is None:
            return batch_norm(*args, **kwargs)
        return _native_batch_norm(func, fmt, args, kwargs)


class ExactNorms(TorchFunctionMode):
    """While active, ``F.batch_norm``, ``F.instance_norm`` and ``F.layer_norm``
    run as the primitive-op formulations of this module.

    Example:
        >>> bn = nn.BatchNorm1d(3)
        >>> x = torch.randn(4, 3)
        >>> with ExactNorms():
        ...     y = bn(x)
        >>> torch.allclose(y, nn.BatchNorm1d(3)(x), atol=1e-6)
        True
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return _REPLACEMENTS.get(func, func)(*args, **(kwargs or {}))


class _ExactBatchNormForward:
    """Runs a batch-norm module's forward inside :class:`ExactBatchNorm`: for a submodule
    of a patched model called directly (``fmodel[0](x)``), not through the root's call."""

    def forward(self, input: Tensor) -> Tensor:
        with ExactBatchNorm():
            return super().forward(input)  # type: ignore[misc]


class BatchNorm1d(_ExactBatchNormForward, torch.nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose forward differentiates exactly (:class:`ExactBatchNorm`)."""


class BatchNorm2d(_ExactBatchNormForward, torch.nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose forward differentiates exactly (:class:`ExactBatchNorm`)."""


class BatchNorm3d(_ExactBatchNormForward, torch.nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose forward differentiates exactly (:class:`ExactBatchNorm`)."""


#: The class :func:`higher.monkeypatch` gives the copy of each batch-norm submodule.
EXACT_BATCH_NORMS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
