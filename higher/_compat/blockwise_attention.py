r"""Exact attention block by block, with a double backward that recomputes block by block.

``F.scaled_dot_product_attention``'s math kernel keeps the ``N x M`` scores and
probabilities of every head for its backward, and the graph of that backward
(built when an inner step differentiates with ``create_graph=True``) keeps more.
This kernel keeps ``O((N + M) d)`` per head: ``q``, ``k``, ``v``, the mask the
caller passed, the output and each row's log-sum-exp; its backward and its
double backward recompute the scores of one block of query rows at a time. It
is written in torch operations only, so it runs wherever torch does, and under
``torch.func.vmap`` (batched mode) through generated vmap rules.
:mod:`.kernels` sends graph-building attention here; :mod:`higher.attention`
is its public face.

Notation (one batch entry and head; the code carries leading dimensions along)
-------------------------------------------------------------------------------
``q`` is ``N x E``, ``k`` is ``M x E``, ``v`` is ``M x Ev``, ``s`` the scale,
``B`` the additive mask (a boolean mask is ``0`` where true and ``-inf``
elsewhere; ``is_causal`` adds ``-inf`` above the diagonal)::

    S = s q k^T + B        lse_i = log sum_j exp S_ij        P = exp(S - lse)
    o = P v

A row whose every score is ``-inf`` gets ``lse_i = 0`` here, hence ``P_i = 0``
and ``o_i = 0`` with zero gradients: what the math kernel (its "safe softmax")
gives.

Backward (:class:`_Backward`'s forward). Given ``do = dL/do``::

    dP = do v^T                  D_i = sum_j P_ij dP_ij = rowsum(do * o)_i
    dS = P * (dP - D)            (the softmax's backward)
    dq = s dS k     dk = s dS^T q     dv = P^T do     dB = dS (summed to B's shape)

Double backward (:class:`_Backward`'s backward). The backward is a function of
``(q, k, v, do, B)``; ``o`` and ``lse`` are passed to it detached, as cached
values, so its own backward must account for their dependence on
``q, k, B`` (through ``P``) and on ``do, v`` (through ``D``) by hand: every
``P`` below is ``softmax(S)`` and every ``D`` is ``sum_j P_ij dP_ij``. Given the
cotangents ``gq, gk, gv, gB`` of ``dq, dk, dv, dB``, the scalar to differentiate is::

    L = <gq, dq> + <gk, dk> + <gv, dv> + <gB, dB>
      = <dS, W> + <P, U>  + (terms bilinear in dS and gq, gk)
    with  W = s (gq k^T + q gk^T) + gB     U = do gv^T

The bilinear terms are ``<gq, s dS k>`` and ``<gk, s dS^T q>`` read with
``dS`` fixed, and give ``q̄ += s dS gk`` and ``k̄ += s dS^T gq``. Write
``L1 = sum_ij P_ij (dP_ij - D_i) W_ij + P_ij U_ij`` and, row by row,
``C_i = sum_j P_ij W_ij``. Then, holding ``P`` fixed, through ``dP``
(``D`` depends on ``dP``)::

    dP̄ = P * (W - C)             dō += dP̄ v        v̄ += dP̄^T do

and, holding ``dP`` fixed, through ``P`` (``D`` depends on ``P``)::

    P̄ = (dP - D) * W - dP * C + U
    S̄ = P * (P̄ - E)  with E_i = sum_j P_ij P̄_ij      (the softmax's backward again)
    q̄ += s S̄ k        k̄ += s S̄^T q        B̄ = S̄ (summed to B's shape)

and through ``U``: ``dō += P gv``. The code writes ``dP_d = dP - D``, so that
``P̄ = dP_d (W - C) - D C + U`` and ``dP̄ = P (W - C)`` share ``W - C``; and it
drops ``- D C``: ``P̄`` reaches the result only through ``S̄``, and the
softmax's backward ignores a constant added to a row of ``P̄`` (``E`` takes it
back, as ``sum_j P_ij = 1``; a fully masked row has ``P = 0``). Every term
needs one row of ``S`` at a time
and the row statistics ``D, C, E``; a block of whole rows has them, so each
pass (forward, backward, double backward) visits every block of rows once, and
accumulates into ``k̄``, ``v̄`` and the mask's gradient.

Orders past two. When the double backward itself builds a graph (the outer
gradient taken with ``create_graph=True``), it rebuilds the quadratic graph of
plain attention over the saved inputs and differentiates that twice: exact to
every order, at the math kernel's memory, with a :class:`UserWarning`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

_NEG_INF = float("-inf")

#: Elements of one block's score tensor (rows x keys x leading dimensions). A
#: block's working set is a handful of such tensors: on a CPU it is sized for
#: the caches, on an accelerator for enough parallel work per kernel launch.
BLOCK_ELEMENTS = {"cpu": 1 << 19}
_DEFAULT_BLOCK_ELEMENTS = 1 << 24


#: Fewest rows per block: fewer blocks cost more in Python and in accumulating
#: the keys' gradients than the larger working set costs (128 rows of scores per
#: head stay linear in the length). Measured on a CPU at 4,096 tokens: one MAML
#: step 5% faster than with 64 rows, at the same peak memory from 2k to 8k tokens.
MIN_BLOCK_ROWS = 128


def block_rows(query: Tensor, keys: int) -> int:
    """Rows of ``query`` per block: a block's scores hold about ``BLOCK_ELEMENTS`` elements."""
    budget = BLOCK_ELEMENTS.get(query.device.type, _DEFAULT_BLOCK_ELEMENTS)
    lead = math.prod(query.shape[:-2])
    rows = max(MIN_BLOCK_ROWS, budget // max(1, lead * keys))
    return max(1, min(query.shape[-2], rows))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax statistics of half-precision inputs in float32, as fused kernels keep them.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Blocks:
    """The row blocks of one call: the keys each block sees and its slice of the mask."""

    def __init__(self, n: int, m: int, mask: Tensor | None, causal: bool, rows: int) -> None:
        self.n, self.m, self.mask, self.causal, self.rows = n, m, mask, causal, rows
        # A mask broadcast along rows (a padding mask) or keys has size 1 there.
        self.mask_rows = mask is not None and mask.shape[-2] != 1
        self.mask_keys = mask is not None and mask.shape[-1] != 1

    def __iter__(self) -> Any:
        for i0 in range(0, self.n, self.rows):
            i1 = min(self.n, i0 + self.rows)
            # Top-left causal alignment, as the math kernel: row i sees keys j <= i.
            yield i0, i1, min(i1, self.m) if self.causal else self.m

    def mask_block(self, i0: int, i1: int, end: int) -> Tensor | None:
        mask = self.mask
        if mask is None:
            return None
        if self.mask_rows:
            mask = mask[..., i0:i1, :]
        return mask[..., :end] if self.mask_keys else mask

    def scores(
        self,
        q: Tensor,
        k: Tensor,
        scale: float,
        i0: int,
        i1: int,
        end: int,
        ws: _Workspace | None = None,
    ) -> Tensor:
        """``S`` for rows ``i0:i1`` and keys ``:end`` (``q`` and ``k`` already sliced),
        into ``ws``'s first buffer when given."""
        s = _mm(q * scale, k.transpose(-2, -1), ws, 0)
        mask = self.mask_block(i0, i1, end)
        if mask is not None:
            # In place only into the workspace, and where the mask does not widen s.
            own = ws is not None and ws.bufs is not None
            own = own and torch.broadcast_shapes(s.shape, mask.shape) == s.shape
            if mask.dtype == torch.bool:
                s = s.masked_fill_(~mask, _NEG_INF) if own else s.masked_fill(~mask, _NEG_INF)
            else:
                s = s.add_(mask) if own else s + mask
        if self.causal and end > i0 + 1:
            # Keys before i0 are seen by every row of the block: mask only the
            # diagonal tile (keys i0:end), where key i0 + c is after row i0 + r when c > r.
            above = torch.ones(i1 - i0, end - i0, dtype=torch.bool, device=s.device).triu_(1)
            s[..., i0:end].masked_fill_(above, _NEG_INF)  # s is this block's own; vmap-safe
        return s


class _Workspace:
    """Block-sized buffers that the blocks of one pass reuse, outside ``vmap``.

    A fresh block-sized tensor costs about an elementwise pass over it (the
    allocator takes fresh pages from the system and gives them back), so each
    block's ``rows x keys`` matrices go into the same few buffers; with
    ``enabled`` false (under ``vmap``, or when the block's matrices change dtype)
    ``bufs`` is None and every operation allocates its result.
    """

    def __init__(self, enabled: bool, like: Tensor, keys: int, rows: int, count: int) -> None:
        size = math.prod(like.shape[:-2]) * min(rows, like.shape[-2]) * keys
        self.bufs = (
            [torch.empty(size, dtype=like.dtype, device=like.device) for _ in range(count)]
            if enabled
            else None
        )

    def get(self, i: int, shape: tuple[int, ...]) -> Tensor | None:
        """Buffer ``i`` as a contiguous tensor of ``shape`` (None: allocate instead)."""
        if self.bufs is None:
            return None
        n = math.prod(shape)
        if n > self.bufs[i].numel():  # a broadcast wider than the inputs: allocate
            return None
        return self.bufs[i][:n].view(shape)


def _mm(a: Tensor, b: Tensor, ws: _Workspace | None, i: int) -> Tensor:
    """``a @ b``, into buffer ``i`` of ``ws`` when there is one."""
    if ws is None or ws.bufs is None:
        return torch.matmul(a, b)
    shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    out = ws.get(i, shape)
    return torch.matmul(a, b) if out is None else torch.matmul(a, b, out=out)


def _times(a: Tensor, b: Tensor, ws: _Workspace, i: int) -> Tensor:
    """``a * b`` (of ``a``'s shape), into buffer ``i`` of ``ws`` when there is one."""
    out = ws.get(i, tuple(a.shape))
    return a * b if out is None else torch.mul(a, b, out=out)


def _sub(a: Tensor, b: Tensor, in_place: bool) -> Tensor:
    return a.sub_(b) if in_place else a - b


def _mul(a: Tensor, b: Tensor, in_place: bool) -> Tensor:
    return a.mul_(b) if in_place else a * b


def _in_place(*tensors: Tensor | None) -> bool:
    """Whether accumulators and a block's own temporaries may be updated in place:
    not under ``vmap``, where an unbatched target cannot take a batched operand."""
    return not any(t is not None and torch._C._functorch.is_batchedtensor(t) for t in tensors)


def _add_rows(acc: Tensor, part: Tensor, end: int, in_place: bool, alpha: float = 1.0) -> Tensor:
    """``acc`` with ``alpha * part`` added to its first ``end`` rows."""
    if in_place:
        acc[..., :end, :].add_(part, alpha=alpha)
        return acc
    part = part * alpha if alpha != 1.0 else part
    if end == acc.shape[-2]:
        return acc + part
    return torch.cat([acc[..., :end, :] + part, acc[..., end:, :]], dim=-2)


class _MaskGrad:
    """Gathers the gradient of an additive mask, block by block, in the mask's own shape."""

    def __init__(self, blocks: _Blocks, mask: Tensor) -> None:
        self.blocks, self.mask = blocks, mask
        self.pieces: list[Tensor] = []
        self.total: Tensor | None = None

    def add(self, part: Tensor, i0: int, i1: int, end: int) -> None:
        blocks, mask = self.blocks, self.mask
        shape = list(mask.shape)
        shape[-2] = i1 - i0 if blocks.mask_rows else 1
        shape[-1] = end if blocks.mask_keys else 1
        # part may live in a workspace buffer that the next block overwrites.
        part = part.clone() if list(part.shape) == shape else part.sum_to_size(shape)
        if blocks.mask_keys and end < mask.shape[-1]:
            part = torch.nn.functional.pad(part, (0, mask.shape[-1] - end))
        if blocks.mask_rows:
            self.pieces.append(part)
        else:
            self.total = part if self.total is None else self.total + part

    def result(self) -> Tensor:
        out = torch.cat(self.pieces, dim=-2) if self.pieces else self.total
        assert out is not None
        return out.to(self.mask.dtype)


class _Forward(torch.autograd.Function):
    """``o, lse = attention(q, k, v, mask)``; keeps the inputs, ``o`` and ``lse``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool, rows: int
    ) -> tuple[Tensor, Tensor]:
        blocks = _Blocks(q.shape[-2], k.shape[-2], mask, causal, rows)
        cdt = _compute_dtype(q.dtype)
        ws = _Workspace(_in_place(q, k, v, mask) and cdt == q.dtype, q, k.shape[-2], rows, 1)
        outs, lses = [], []
        for i0, i1, end in blocks:
            s = blocks.scores(q[..., i0:i1, :], k[..., :end, :], scale, i0, i1, end, ws)
            s = s.to(cdt)
            # One exponential per score: o = (exp(S - m) v) / l and lse = m + log l,
            # with m the row's maximum and l = rowsum(exp(S - m)) >= 1 (0 when masked).
            m = s.amax(dim=-1, keepdim=True)
            m = m.masked_fill(m == _NEG_INF, 0.0)  # fully masked rows: exp(S - 0) = 0
            e = s.sub_(m).exp_()  # in place: m comes from s, so has its batching
            sums = e.sum(dim=-1, keepdim=True)
            empty = sums == 0
            out = torch.matmul(e.to(v.dtype), v[..., :end, :])
            outs.append(out / sums.masked_fill(empty, 1.0).to(out.dtype))
            lses.append(m + torch.log(sums).masked_fill_(empty, 0.0))  # 0 where masked
        return torch.cat(outs, dim=-2), torch.cat(lses, dim=-2)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        q, k, v, mask, scale, causal, rows = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, mask, o, lse)
        ctx.args = (scale, causal, rows)

    @staticmethod
    def backward(ctx: Any, do: Tensor, _dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, mask, o, lse = ctx.saved_tensors
        mask_grad = mask is not None and ctx.needs_input_grad[3]
        grads = _Backward.apply(q, k, v, mask, do, o.detach(), lse.detach(), *ctx.args, mask_grad)
        dmask = grads[3] if mask_grad else None
        return grads[0], grads[1], grads[2], dmask, None, None, None


class _Backward(torch.autograd.Function):
    """``dq, dk, dv[, dmask]`` of :class:`_Forward`, itself differentiable (module docstring)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        do: Tensor,
        o: Tensor,
        lse: Tensor,
        scale: float,
        causal: bool,
        rows: int,
        mask_grad: bool,
    ) -> tuple[Tensor, ...]:
        blocks = _Blocks(q.shape[-2], k.shape[-2], mask, causal, rows)
        d_all = (do * o).sum(-1, keepdim=True).to(lse.dtype)
        dqs = []
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        in_place = _in_place(q, k, v, mask, do, o, lse)
        ws = _Workspace(in_place and lse.dtype == q.dtype, q, k.shape[-2], rows, 2)
        dmask = _MaskGrad(blocks, mask) if mask_grad and mask is not None else None
        for i0, i1, end in blocks:
            qb, dob, kb, vb = q[..., i0:i1, :], do[..., i0:i1, :], k[..., :end, :], v[..., :end, :]
            p = blocks.scores(qb, kb, scale, i0, i1, end, ws).to(lse.dtype)
            p = p.sub_(lse[..., i0:i1, :]).exp_()  # lse comes from the scores: same batching
            dp = _mm(dob, vb.transpose(-2, -1), ws, 1).to(lse.dtype)
            ds = _mul(_sub(dp, d_all[..., i0:i1, :], in_place), p, in_place)
            dv = _add_rows(dv, torch.matmul(p.to(v.dtype).transpose(-2, -1), dob), end, in_place)
            ds_ = ds.to(q.dtype)
            dqs.append(torch.matmul(ds_, kb).mul_(scale))
            dk = _add_rows(dk, torch.matmul(ds_.transpose(-2, -1), qb), end, in_place, scale)
            if dmask is not None:
                dmask.add(ds, i0, i1, end)
        grads = (torch.cat(dqs, dim=-2), dk, dv)
        return (*grads, dmask.result()) if dmask is not None else grads

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        q, k, v, mask, do, o, lse, scale, causal, rows, mask_grad = inputs
        ctx.save_for_backward(q, k, v, mask, do, o, lse)
        ctx.args = (scale, causal, rows, mask_grad)

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, mask, do, o, lse = ctx.saved_tensors
        scale, causal, rows, mask_grad = ctx.args
        gq, gk, gv = cotangents[:3]
        gmask = cotangents[3] if mask_grad else None
        mask_needs_grad = ctx.needs_input_grad[3]
        if torch.is_grad_enabled():
            grads = _third_order(q, k, v, mask, do, scale, causal, (gq, gk, gv, gmask))
        else:
            grads = _double_backward(
                q, k, v, mask, do, o, lse, (scale, causal, rows, mask_needs_grad), gq, gk, gv, gmask
            )
        gq_, gk_, gv_, gdo, gm = grads
        return gq_, gk_, gv_, gm, gdo, None, None, None, None, None, None


def _double_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    do: Tensor,
    o: Tensor,
    lse: Tensor,
    args: tuple[float, bool, int, bool],
    gq: Tensor | None,
    gk: Tensor | None,
    gv: Tensor | None,
    gmask: Tensor | None,
) -> tuple[Tensor | None, ...]:
    """The cotangents of ``q, k, v, do, mask`` (the module docstring's derivation)."""
    scale, causal, rows, mask_needs_grad = args
    blocks = _Blocks(q.shape[-2], k.shape[-2], mask, causal, rows)
    cdt = lse.dtype
    d_all = (do * o).sum(-1, keepdim=True).to(cdt)
    bq, bdo = [], []
    bk, bv = torch.zeros_like(k), torch.zeros_like(v)
    in_place = _in_place(q, k, v, mask, do, o, lse, gq, gk, gv, gmask)
    bmask = _MaskGrad(blocks, mask) if mask is not None and mask_needs_grad else None
    gm_blocks = None if gmask is None else _Blocks(q.shape[-2], k.shape[-2], gmask, causal, rows)
    # W = s (gq k^T + q gk^T) in one product: [gq, q] [k, gk]^T (twice the inner size).
    w_rows: Tensor | None = None
    w_keys: Tensor | None = None
    if gq is not None and gk is not None:
        w_rows, w_keys = torch.cat([gq, q], dim=-1) * scale, torch.cat([k, gk], dim=-1)
    elif gq is not None:
        w_rows, w_keys = gq * scale, k
    elif gk is not None:
        w_rows, w_keys = q * scale, gk
    # Buffers: 0 P, 1 dP_d then P̄ then S̄, 2 dS, 3 W then U, 4 P W then dP̄.
    ws = _Workspace(in_place and cdt == q.dtype, q, k.shape[-2], rows, 5)
    for i0, i1, end in blocks:
        qb, dob, kb, vb = q[..., i0:i1, :], do[..., i0:i1, :], k[..., :end, :], v[..., :end, :]
        p = blocks.scores(qb, kb, scale, i0, i1, end, ws).to(cdt)
        p = p.sub_(lse[..., i0:i1, :]).exp_()
        d = d_all[..., i0:i1, :]
        dp_d = _sub(_mm(dob, vb.transpose(-2, -1), ws, 1).to(cdt), d, in_place)
        ds = _times(p, dp_d, ws, 2)
        w = None
        if w_rows is not None and w_keys is not None:
            w = _mm(w_rows[..., i0:i1, :], w_keys[..., :end, :].transpose(-2, -1), ws, 3)
        if gm_blocks is not None:
            gmb = gm_blocks.mask_block(i0, i1, end)
            # A copy either way: W is updated in place below, and gmb is the cotangent.
            w = (torch.zeros_like(p) if w is None else w) + gmb  # type: ignore[operator]
        w = torch.zeros_like(p) if w is None else w.to(cdt)
        pw = _times(p, w, ws, 4)
        c = pw.sum(-1, keepdim=True)
        # With dP = dP_d + D: P̄ = dP_d (W - C) - D C + U and dP̄ = P (W - C) = P W - P C.
        # P̄ only feeds S̄ = P (P̄ - E), which a row constant as - D C leaves alone.
        dp_bar = pw.addcmul_(p, c, value=-1) if in_place else p * (w - c)
        p_bar = _mul(dp_d, _sub(w, c, in_place), in_place)  # into dP_d's storage
        if gv is not None:  # + U, computed into W's storage (W is spent)
            u = _mm(dob, gv[..., :end, :].transpose(-2, -1), ws, 3).to(cdt)
            p_bar = p_bar.add_(u) if in_place else p_bar + u
        pp = _mul(p_bar, p, in_place)
        e = pp.sum(-1, keepdim=True)
        s_bar = pp.addcmul_(p, e, value=-1) if in_place else pp - p * e
        s_bar_, dp_bar_, ds_ = s_bar.to(q.dtype), dp_bar.to(q.dtype), ds.to(q.dtype)

        q_bar = torch.matmul(s_bar_, kb)
        k_bar = torch.matmul(s_bar_.transpose(-2, -1), qb)
        if gk is not None:
            q_bar = q_bar + torch.matmul(ds_, gk[..., :end, :])
        if gq is not None:
            k_bar = k_bar + torch.matmul(ds_.transpose(-2, -1), gq[..., i0:i1, :])
        bq.append(q_bar * scale)
        bk = _add_rows(bk, k_bar, end, in_place, scale)
        bv = _add_rows(bv, torch.matmul(dp_bar_.transpose(-2, -1), dob), end, in_place)
        do_bar = torch.matmul(dp_bar_, vb)
        if gv is not None:
            do_bar = do_bar + torch.matmul(p.to(gv.dtype), gv[..., :end, :])
        bdo.append(do_bar)
        if bmask is not None:
            bmask.add(s_bar, i0, i1, end)
    return (
        torch.cat(bq, dim=-2),
        bk,
        bv,
        torch.cat(bdo, dim=-2),
        bmask.result() if bmask is not None else None,
    )


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool
) -> Tensor:
    """Plain attention on the whole ``N x M`` scores, twice differentiable (quadratic memory)."""
    blocks = _Blocks(q.shape[-2], k.shape[-2], mask, causal, q.shape[-2])
    s = blocks.scores(q, k, scale, 0, q.shape[-2], k.shape[-2])
    s = s.to(_compute_dtype(s.dtype))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    lse = lse.masked_fill(lse == _NEG_INF, 0.0)
    return torch.matmul(torch.exp(s - lse).to(v.dtype), v)


def _third_order(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    do: Tensor,
    scale: float,
    causal: bool,
    cotangents: tuple[Tensor | None, ...],
) -> tuple[Tensor | None, ...]:
    """The double backward as a graph, for a further derivative: plain attention, twice."""
    warnings.warn(
        "higher's block-wise attention: a derivative of order three or more runs on "
        "plain attention (memory quadratic in the sequence length)",
        UserWarning,
        stacklevel=2,
    )
    with_mask = mask is not None and mask.dtype != torch.bool

    def backward(q: Tensor, k: Tensor, v: Tensor, do: Tensor, *m: Tensor) -> tuple[Tensor, ...]:
        def forward(q: Tensor, k: Tensor, v: Tensor, *m: Tensor) -> Tensor:
            return reference_attention(q, k, v, m[0] if m else mask, scale, causal)

        return torch.func.vjp(forward, q, k, v, *m)[1](do)

    # torch.func keeps q, k, v, do and the mask apart: autograd.grad would also
    # follow do's own dependence on q, k, v. Its results stay differentiable.
    primals = (q, k, v, do, *([mask] if with_mask else []))
    outputs, vjp, *_ = torch.func.vjp(backward, *primals)
    used = [c if c is not None else torch.zeros_like(x) for c, x in zip(cotangents, outputs)]
    grads = vjp(tuple(used))
    return (*grads[:4], grads[4] if with_mask else None)


class AttentionInputError(ValueError, RuntimeError):
    """Inputs that torch's ``scaled_dot_product_attention`` refuses too.

    A ``ValueError`` (a bad argument) that is also a ``RuntimeError``, the class
    torch raises for the same input, so that code catching torch's error still does.
    """


def _check_mask(mask: Tensor, scores: tuple[int, ...]) -> None:
    """Refuses a mask that does not broadcast to the scores' shape without widening it,
    as the math kernel's ``scores + mask`` refuses it (a mask made for a longer sequence,
    one row for many, more batch dimensions)."""
    shape = tuple(mask.shape)
    fits = len(shape) <= len(scores) and all(
        m in (1, s) for m, s in zip(reversed(shape), reversed(scores))
    )
    if fits:
        return
    try:
        wider = torch.broadcast_shapes(scores, shape)
        why = f"output with shape {list(scores)} doesn't match the broadcast shape {list(wider)}"
    except RuntimeError:
        try:  # torch's own words for the mismatch: it raises before allocating anything
            torch.zeros(()).expand(scores) + torch.zeros(()).expand(shape)
            why = "they do not broadcast"
        except RuntimeError as error:
            why = str(error)
    raise AttentionInputError(
        f"attn_mask of shape {shape} does not broadcast to the attention scores' shape "
        f"{scores} (batch dimensions, query length {scores[-2]}, key length {scores[-1]}): "
        f"{why}. Build the mask for these shapes (size 1 where it is shared)"
    )


def _heads(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """``key`` and ``value`` with query head ``h`` reading head ``h // (Hq / Hkv)``,
    as the math kernel's ``repeat_interleave`` under ``enable_gqa``."""
    if query.dim() < 3 or key.dim() < 3 or value.dim() < 3:
        raise AttentionInputError(
            "enable_gqa=True needs a head dimension (-3) in query, key and value; got "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    heads, k_heads, v_heads = query.shape[-3], key.shape[-3], value.shape[-3]
    if heads % k_heads or heads % v_heads:
        raise AttentionInputError(
            f"enable_gqa: {heads} query heads cannot share {k_heads} key and {v_heads} "
            "value heads (each must divide the query's)"
        )
    if k_heads != heads:
        key = key.repeat_interleave(heads // k_heads, dim=-3)
    if v_heads != heads:
        value = value.repeat_interleave(heads // v_heads, dim=-3)
    return key, value


def attention(
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
    """``F.scaled_dot_product_attention``'s value, computed block by block (see the module).

    Inputs the math kernel refuses raise :class:`AttentionInputError`; an empty
    query or key length gives the math kernel's result (empty, or zeros).
    """
    if dropout_p != 0.0:
        raise ValueError(
            f"dropout_p={dropout_p}: higher's block-wise attention has no dropout; "
            "pass dropout_p=0.0, or call torch.nn.functional.scaled_dot_product_attention"
        )
    if is_causal and attn_mask is not None:
        raise AttentionInputError("pass attn_mask or is_causal=True, not both (as torch requires)")
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise AttentionInputError(
            "query, key and value must have at least 2 dimensions: (..., L, E); got "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if key.shape[-2] != value.shape[-2] or query.shape[-1] != key.shape[-1]:
        raise AttentionInputError(
            f"shapes do not fit: query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)} (key and value need the same length, "
            "query and key the same embedding size)"
        )
    if enable_gqa:
        key, value = _heads(query, key, value)
    if not query.shape[:-2] == key.shape[:-2] == value.shape[:-2]:
        try:
            lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
        except RuntimeError as error:
            raise AttentionInputError(
                f"the batch and head dimensions of query {tuple(query.shape)}, key "
                f"{tuple(key.shape)} and value {tuple(value.shape)} do not broadcast "
                f"({error}); pass enable_gqa=True for fewer key/value heads"
            ) from None
        query = query.expand(*lead, *query.shape[-2:])
        key = key.expand(*lead, *key.shape[-2:])
        value = value.expand(*lead, *value.shape[-2:])
    mask = attn_mask
    if mask is not None:
        allowed = (torch.bool, query.dtype, torch.float32)
        if mask.dtype not in allowed or (
            mask.dtype == torch.float32 and not query.is_floating_point()
        ):
            raise ValueError(
                f"attn_mask has dtype {mask.dtype}: pass a boolean mask, or one of the "
                f"query's dtype {query.dtype} or float32 (as torch)"
            )
        _check_mask(mask, (*query.shape[:-1], key.shape[-2]))
        if mask.dtype != torch.bool and mask.dtype != _compute_dtype(query.dtype):
            # A float32 mask of a float64 query: added in the scores' precision.
            mask = mask.to(_compute_dtype(query.dtype))
        while mask.dim() < query.dim():
            mask = mask.unsqueeze(0)
    scale_ = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    rows = block_size if block_size is not None else block_rows(query, key.shape[-2])
    if rows < 1:
        raise ValueError(f"block_size={block_size}: a block needs at least one row")
    device_type = query.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # As autocast runs torch's attention: in its lower precision. The
        # kernel then runs without autocast, as its backward will.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _run(query, key, value, mask, scale_, bool(is_causal), int(rows))
    return _run(query, key, value, mask, scale_, bool(is_causal), int(rows))


def _run(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool, rows: int
) -> Tensor:
    if q.dtype in (torch.float16, torch.bfloat16):
        # As the math kernel: inputs in float32, one rounding of the output and of
        # each gradient. Rounding the scores, dP or the weights to half precision
        # inside the kernel doubled its error against float64; the float32 copies
        # of q, k and v are linear in the length. (torch's
        # allow_fp16_bf16_reduction_math_sdp lets the math kernel skip this for
        # speed; this kernel keeps float32, at least as accurate.)
        dtype = q.dtype
        up = [t if t is None or t.dtype == torch.bool else t.float() for t in (q, k, v, mask)]
        return _run(*up, scale, causal, rows).to(dtype)  # type: ignore[arg-type]
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        # No scores to keep: plain attention gives the empty output (no queries)
        # or zeros (no keys, every row fully masked), as the math kernel.
        return reference_attention(q, k, v, mask, scale, causal)
    return _Forward.apply(q, k, v, mask, scale, causal, rows)[0]
