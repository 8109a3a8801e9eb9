"""Second-order attention in memory linear in the sequence length.

An inner step differentiates its forward with ``create_graph=True``, so every
graph-building forward of a patched module runs attention on a kernel with a
double backward. torch's math kernel is one, but it keeps the ``N x N`` scores
and probabilities of every head, and the inner gradient's graph keeps more.
This module's :func:`scaled_dot_product_attention` computes the same values
block by block, as flash attention does: its forward keeps ``q``, ``k``, ``v``,
the output and each row's log-sum-exp, and its backward and double backward
recompute the scores one block of rows at a time (the derivation is in
``higher/_compat/blockwise_attention.py``). Patched modules take it
automatically for sequences of at least :func:`get_attention_kernel`'s
threshold; :func:`set_attention_kernel` and :func:`attention_kernel` force
either kernel. See :doc:`/guides/long-sequences`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

from torch import Tensor

from ._compat import blockwise_attention, kernels

__all__ = [
    "DEFAULT_THRESHOLD",
    "attention_kernel",
    "get_attention_kernel",
    "scaled_dot_product_attention",
    "set_attention_kernel",
]

_KERNELS = ("auto", "math", "blockwise")

#: The sequence length from which ``"auto"`` takes the block-wise kernel.
DEFAULT_THRESHOLD: int = kernels.BLOCKWISE_THRESHOLD


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    block_size: int | None = None,
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``, exact, block by block.

    Takes the arguments of torch's function with its meaning: ``attn_mask``
    boolean (true attends) or additive, broadcast to ``(..., L, S)``, and
    differentiated when it requires grad (a learned position bias);
    ``is_causal`` (top-left aligned, as torch); ``scale`` (default
    ``1 / sqrt(E)``); ``enable_gqa`` (query head ``h`` reads key/value head
    ``h // (Hq / Hkv)``). Differentiable to every order: the first and second
    derivatives recompute block by block, a third one runs on plain attention
    with a warning. A row whose every key is masked gives zeros and zero
    gradients, as torch's math kernel. Shapes are checked as torch checks
    them (a mask must broadcast to ``(..., L, S)`` without widening it); a
    query or key length of 0 gives torch's result. float16 and bfloat16 inputs
    are computed in float32 and rounded once, as the math kernel does.

    Args:
        query: ``(..., L, E)``.
        key: ``(..., S, E)``.
        value: ``(..., S, Ev)``.
        attn_mask: boolean or of ``query``'s dtype, broadcastable to ``(..., L, S)``.
        dropout_p: must be 0: this kernel has no dropout (patched modules run
            the math kernel for attention with dropout).
        is_causal: mask out the keys after each query position.
        scale: the scores' factor; ``1 / sqrt(E)`` when None.
        enable_gqa: let ``query`` have a multiple of ``key``'s heads (dimension -3).
        block_size: query rows per block; by default about a million scores
            per block on a CPU and 16 million on an accelerator.

    Returns:
        ``(..., L, Ev)``, the attention output.

    Raises:
        ValueError: ``dropout_p`` not 0, ``block_size`` below 1, or a mask of a
            dtype torch refuses.
        RuntimeError: (a ``ValueError`` too) what torch refuses: a mask that
            does not broadcast to the scores' shape (the message quotes
            torch's), both ``attn_mask`` and ``is_causal``, keys and values of
            different lengths, query and key of different widths, head counts
            that do not broadcast or, with ``enable_gqa``, do not divide.

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(3, 1, 2, 10, 8, dtype=torch.float64).unbind(0)
        >>> out = scaled_dot_product_attention(q, k, v, is_causal=True, block_size=4)
        >>> want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> bool(torch.allclose(out, want, rtol=0, atol=1e-12))
        True
    """
    return blockwise_attention.attention(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        block_size=block_size,
    )


def get_attention_kernel() -> tuple[Literal["auto", "math", "blockwise"], int]:
    """The kernel that graph-building attention in patched modules takes, and the threshold.

    Returns:
        ``(kernel, threshold)``: ``kernel`` is ``"auto"`` (the block-wise
        kernel for calls whose query length times key length is at least
        ``threshold ** 2``, the math kernel below), ``"math"`` or ``"blockwise"``.

    Example:
        >>> get_attention_kernel() == ("auto", DEFAULT_THRESHOLD)
        True
    """
    kernel, threshold = kernels.attention_choice()
    return kernel, threshold  # type: ignore[return-value]


def set_attention_kernel(
    kernel: Literal["auto", "math", "blockwise"] = "auto", threshold: int | None = None
) -> None:
    """Chooses the kernel of attention in forwards that will be differentiated twice.

    It applies to every call of ``torch.nn.functional.scaled_dot_product_attention``
    that higher would otherwise run on the math kernel: the graph-building
    forwards of patched modules with second-order gradients, and batched
    mode's forwards under ``vmap``. Calls with dropout always take the math
    kernel, and so do calls inside ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``
    (torch's explicit choice, which has a double backward, is honoured); a
    torch choice that leaves a fused backend enabled leaves it to this switch.
    The choice holds for the whole process; set it around the outer
    backward too, where ``checkpoint=`` recomputes forwards.

    Args:
        kernel: ``"auto"`` picks by sequence length, ``"math"`` forces torch's
            math kernel (quadratic memory), ``"blockwise"`` forces
            :func:`scaled_dot_product_attention`.
        threshold: the sequence length from which ``"auto"`` takes the
            block-wise kernel; None keeps the current one.

    Raises:
        ValueError: an unknown ``kernel`` or a ``threshold`` below 1.

    Example:
        >>> set_attention_kernel("blockwise")
        >>> get_attention_kernel()[0]
        'blockwise'
        >>> set_attention_kernel("auto", threshold=DEFAULT_THRESHOLD)
    """
    if kernel not in _KERNELS:
        raise ValueError(f"kernel={kernel!r}: choose one of {', '.join(map(repr, _KERNELS))}")
    if threshold is None:
        threshold = kernels.attention_choice()[1]
    elif isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"threshold={threshold!r}: pass a sequence length, an int of at least 1")
    kernels.set_attention_choice(kernel, threshold)


@contextlib.contextmanager
def attention_kernel(
    kernel: Literal["auto", "math", "blockwise"] = "auto", threshold: int | None = None
) -> Iterator[None]:
    """:func:`set_attention_kernel` for a block, then back to the previous choice.

    Args:
        kernel: as in :func:`set_attention_kernel`.
        threshold: as in :func:`set_attention_kernel`.

    Example:
        >>> with attention_kernel("math"):
        ...     get_attention_kernel()[0]
        'math'
        >>> get_attention_kernel()[0]
        'auto'
    """
    before = kernels.attention_choice()
    set_attention_kernel(kernel, threshold)
    try:
        yield
    finally:
        kernels.set_attention_choice(*before)
