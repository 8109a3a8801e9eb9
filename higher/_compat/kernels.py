"""Kernel choice: the attention backends' and cuDNN's flags, and attention with a double backward.

The fused attention kernels and cuDNN's RNN kernels have a backward but no
double backward; a forward that an inner step differentiates with
``create_graph=True`` must avoid them. Its attention runs on the math kernel,
or, for long sequences, on the block-wise kernel of
:mod:`.blockwise_attention`, whose memory grows linearly in the sequence
length; :mod:`higher.attention` holds the public switch between them.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch

from . import blockwise_attention
from .forward import double_graph_forward


def _sdp_flag(name: str) -> tuple[Callable[[], bool], Callable[[bool], None]] | None:
    get = getattr(torch._C, f"_get_{name}_sdp_enabled", None)
    set_ = getattr(torch._C, f"_set_sdp_use_{name}", None)
    return None if get is None or set_ is None else (get, set_)


# The enabled flags of the scaled_dot_product_attention backends: the fused ones
# (flash, memory-efficient, cuDNN, the one a device extension may register),
# none of which has a double backward, then the math one, built from
# differentiable primitives, which has.
_FUSED_SDP = [f for f in map(_sdp_flag, ("flash", "mem_efficient", "cudnn", "overrideable")) if f]
_SDP = [*_FUSED_SDP, *filter(None, [_sdp_flag("math")])]
_MATH_ONLY = tuple(flag not in _FUSED_SDP for flag in _SDP)


class BackendFlags:
    """The enabled flags of the attention backends and of cuDNN, set for a block.

    Made with no arguments it records all of them as they are now, so that a
    recomputation (a checkpointed block, recomputed once per backward that
    reaches it) picks the kernels its first run picked: other kernels save
    other tensors, and may lack a double backward. Given ``sdp`` (one flag per
    attention backend) or ``cudnn``, it sets those and leaves the others alone. Entering sets the flags, exiting puts
    back what was there, also when the block raises; it may be entered again.
    The flags are read and set directly: entering
    ``torch.nn.attention.sdpa_kernel`` costs about 40 times as much.

    Example:
        >>> flags = BackendFlags()
        >>> with flags:
        ...     pass
        >>> flags.flags == BackendFlags().flags
        True
    """

    __slots__ = ("_saved", "flags")

    def __init__(self, sdp: tuple[bool, ...] | None = None, cudnn: bool | None = None) -> None:
        if sdp is None and cudnn is None:
            sdp, cudnn = sdp_flags(), torch._C._get_cudnn_enabled()
        #: The attention backends' flags and cuDNN's to set; None leaves them alone.
        self.flags = (sdp, cudnn)
        self._saved: list[tuple[tuple[bool, ...] | None, bool | None]] = []

    def __enter__(self) -> None:
        sdp, cudnn = self.flags
        self._saved.append(
            (
                None if sdp is None else sdp_flags(),
                None if cudnn is None else torch._C._get_cudnn_enabled(),
            )
        )
        _set_flags(self.flags)

    def __exit__(self, *exc: object) -> None:
        _set_flags(self._saved.pop())


class DoubleBackwardKernels(BackendFlags):
    """Runs a block with ``F.scaled_dot_product_attention`` on its math backend only.

    The fused backends implement a backward but no double backward, so a
    meta-gradient through them fails; the math backend is built from
    differentiable primitives.

    Example:
        >>> q = torch.randn(1, 2, 4, 8)
        >>> with DoubleBackwardKernels():
        ...     out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        >>> out.shape
        torch.Size([1, 2, 4, 8])
    """

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(_MATH_ONLY)

    def __enter__(self) -> None:
        # Remember the flags as the caller had them: inside, they read as if the
        # user had chosen the math kernel (see user_chose_math).
        _outer_flags.stack.append(sdp_flags())
        super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        _outer_flags.stack.pop()


class _OuterFlags(threading.local):
    def __init__(self) -> None:
        self.stack: list[tuple[bool, ...]] = []  # the flags at each DoubleBackwardKernels entry


_outer_flags = _OuterFlags()


def user_chose_math() -> bool:
    """Whether the caller's backend flags allow the math kernel only, as
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` sets them.

    That choice has a double backward, so graph-building attention honours it
    over :mod:`higher.attention`'s switch. Flags that higher itself set
    (:class:`DoubleBackwardKernels`, around ``nn.MultiheadAttention``) do not count.
    """
    stack = _outer_flags.stack
    return (stack[0] if stack else sdp_flags()) == _MATH_ONLY


class CudnnOff(BackendFlags):
    """Runs a block with cuDNN off: its RNN kernels have no double backward (the native ones have)."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(None, False)


# -- attention on the math kernel: forwards differentiated twice, forwards under vmap ---
# Setting the backend flags around every forward costs about 6 us (a dozen calls
# into C++), a tenth of a small MLP's forward, and most models call no attention
# at all; swapping the function in and out of torch.nn.functional at each
# forward costs as much again, since every change of a module's globals
# invalidates the interpreter's caches for all of that module's functions. So
# when the first patched module is made, torch.nn.functional's
# scaled_dot_product_attention (the name its callers look up at each call:
# transformers, timm, nn.MultiheadAttention through
# F.multi_head_attention_forward) becomes a wrapper, for good, which sets the
# flags around the call when this thread runs a forward that will be
# differentiated twice, and otherwise, and under torch.compile, calls the
# function it wraps. Code that took the function before the first patched
# module was made (``from torch.nn.functional import
# scaled_dot_product_attention``) keeps the fused kernels; the first inner step
# then names the operation in its error.
_functional = torch.nn.functional


class _AttentionState(threading.local):
    def __init__(self) -> None:
        self.depth = 0  # how many MATH_ATTENTION blocks this thread is in


_attention_state = _AttentionState()
_attention_lock = threading.Lock()
_attention_wrapped: list[Any] = []


def wrap_attention() -> None:
    """Makes ``F.scaled_dot_product_attention`` the wrapper described above (once, for good)."""
    if _attention_wrapped:  # every patch asks; the lock is only for the first time
        return
    with _attention_lock:
        if _attention_wrapped:
            return
        original = _functional.scaled_dot_product_attention
        _attention_wrapped.append(original)

        @functools.wraps(original)
        def scaled_dot_product_attention(*args: Any, **kwargs: Any) -> Any:
            if (
                _attention_state.depth or double_graph_forward()
            ) and not torch.compiler.is_compiling():
                if (
                    _choice.kernel != "math"
                    and _blockwise_fits(args, kwargs)
                    and not user_chose_math()
                ):
                    return blockwise_attention.attention(*args, **kwargs)
                with DoubleBackwardKernels():
                    return original(*args, **kwargs)
            return original(*args, **kwargs)

        _functional.scaled_dot_product_attention = scaled_dot_product_attention


class _Choice:
    """Which kernel graph-building attention takes, process-wide (see :mod:`higher.attention`)."""

    __slots__ = ("kernel", "threshold")

    def __init__(self) -> None:
        self.kernel = "auto"  # "auto" | "math" | "blockwise"
        self.threshold = BLOCKWISE_THRESHOLD


#: The sequence length from which "auto" takes the block-wise kernel: measured
#: with benchmarks/long_sequence.py (docs/guides/long-sequences.md).
BLOCKWISE_THRESHOLD = 512
_choice = _Choice()


def attention_choice() -> tuple[str, int]:
    """The kernel graph-building attention takes ("auto", "math", "blockwise") and the threshold."""
    return _choice.kernel, _choice.threshold


def set_attention_choice(kernel: str, threshold: int) -> None:
    """Sets what :func:`attention_choice` returns (checked by the public setter)."""
    _choice.kernel, _choice.threshold = kernel, threshold


def _blockwise_fits(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether this call of attention takes the block-wise kernel under the current choice.

    Calls it does not take: dropout (it has none), nested tensors, and a mask
    given together with ``is_causal`` (torch's own error then says why). Under
    "auto", the call's scores must hold at least ``threshold ** 2`` entries per
    head: self-attention over at least ``threshold`` tokens.
    """
    n = len(args)
    query = args[0] if n else kwargs.get("query")
    key = args[1] if n > 1 else kwargs.get("key")
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
        return False
    if query.is_nested or key.is_nested:
        return False
    if _choice.kernel == "auto":  # short sequences first: the common case leaves at once
        threshold = _choice.threshold
        if query.shape[-2] * key.shape[-2] < threshold * threshold:
            return False
    if args[4] if n > 4 else kwargs.get("dropout_p", 0.0):
        return False
    return (args[3] if n > 3 else kwargs.get("attn_mask")) is None or not (
        args[5] if n > 5 else kwargs.get("is_causal", False)
    )


class _MathAttention:
    __slots__ = ()

    def __enter__(self) -> None:
        # The wrapper is installed when a patched module is made (model_checkpoint.install).
        _attention_state.depth += 1

    def __exit__(self, *exc: object) -> None:
        _attention_state.depth -= 1


#: While active in a thread (it may be entered again), every call of
#: ``torch.nn.functional.scaled_dot_product_attention`` in that thread runs on
#: the math kernel, or on the block-wise one for long sequences: the kernels
#: with a double backward, and the ones ``vmap`` can batch (the fused kernels
#: have no batching rule: vmap would loop over the tasks, with a warning).
MATH_ATTENTION = _MathAttention()


def math_attention_active() -> bool:
    """Whether attention runs on a kernel with a double backward in this thread now: inside
    :data:`MATH_ATTENTION`, or inside a patched forward whose graph is differentiated twice."""
    return _attention_state.depth > 0 or double_graph_forward()


def sdp_flags() -> tuple[bool, ...]:
    """The current enabled flags of every scaled_dot_product_attention backend."""
    return tuple([get() for get, _ in _SDP])


def _set_flags(flags: tuple[tuple[bool, ...] | None, bool | None]) -> None:
    sdp, cudnn = flags
    if sdp is not None:
        for (_, set_), value in zip(_SDP, sdp):
            set_(value)
    if cudnn is not None:
        torch._C._set_cudnn_enabled(cudnn)
