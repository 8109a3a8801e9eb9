"""Differential fuzzing of the block-wise attention kernel against torch's math kernel.

Each example draws a call of ``F.scaled_dot_product_attention``: batch and head
dimensions (broadcast between query, key and value, or grouped with
``enable_gqa``), query and key lengths (0, 1, around the block size, more
queries than keys and fewer), head dimensions, a mask (none, boolean or
additive, of any broadcastable shape or of a shape that does not fit, with
fully masked rows, requiring grad or not), ``is_causal``, ``scale``, dtype and
CPU autocast; and a block size. The same call runs on torch's math kernel and
on :func:`higher.attention.scaled_dot_product_attention`:

* where torch refuses the call, the kernel must refuse it too;
* where torch accepts it, the value, the gradients and the double backward
  (against random cotangents) must match: in float64 to ``1e-9``; in lower
  precisions, within 1.5 times the math kernel's own error against float64
  computed from the same rounded inputs (plus a few units of the dtype's
  rounding, since tiny cases can land exactly).

hypothesis runs derandomized (a fixed sequence of examples, no example
database), so a CI run is deterministic; a failure prints the falsifying
example, whose ``seed`` field regenerates every tensor. ``HIGHER_FUZZ_EXAMPLES``
sets the number of examples (CI: a few seconds' worth; nightly, e.g. 2000).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from higher import attention
from higher._compat.blockwise_attention import AttentionInputError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("HIGHER_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
F64_TOL = 1e-9
EPS32 = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Case:
    """One call: shapes, options and the seed of every tensor (replays a failure)."""

    seed: int
    lead_q: tuple[int, ...]
    lead_k: tuple[int, ...]
    lead_v: tuple[int, ...]
    n: int
    m: int
    e: int
    ev: int
    block: int
    dtype: torch.dtype
    autocast: bool
    mask: str  # "none", "bool", "additive"
    mask_shape: tuple[int, ...] | None
    mask_grad: bool
    masked_rows: bool
    causal: bool
    scale: float | None
    gqa: bool
    e_k: int  # the key's head dimension: e, or a wrong one
    m_v: int  # the value's length: m, or a wrong one


def _length(draw, block: int) -> int:
    # Not 0 first: hypothesis draws the first choice most often (and shrinks towards it).
    return draw(st.sampled_from([block + 1, block, block - 1, 1, 2 * block + 1, 7, 0]))


@st.composite
def cases(draw) -> Case:
    block = draw(st.integers(1, 5))
    n, m = max(0, _length(draw, block)), max(0, _length(draw, block))
    # Batch and head dimensions: 0 to 2 of them, shared, broadcast (1) or grouped.
    ndim = draw(st.integers(0, 2))
    gqa = ndim >= 1 and draw(st.booleans())
    batch = tuple(draw(st.lists(st.integers(1, 2), min_size=ndim, max_size=ndim)))
    lead_q = lead_k = lead_v = batch
    if gqa:
        heads = draw(st.sampled_from([2, 4, 6]))
        k_heads = draw(st.sampled_from([h for h in (1, 2, 3, 4) if heads % h == 0] + [3, 4]))
        v_heads = draw(st.sampled_from([k_heads, 1, heads]))
        lead_q, lead_k, lead_v = (
            (*batch[:-1], heads),
            (*batch[:-1], k_heads),
            (*batch[:-1], v_heads),
        )
    elif ndim and draw(st.booleans()):  # broadcast a dimension of key and value, or not
        i = draw(st.integers(0, ndim - 1))
        lead_k = lead_v = tuple(1 if j == i else s for j, s in enumerate(batch))
    e, ev = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(DTYPES))
    autocast = dtype == torch.float32 and draw(st.booleans())
    kind = draw(st.sampled_from(["additive", "bool", "none"]))
    mask_shape = None
    if kind != "none":
        scores = (*torch.broadcast_shapes(lead_q, lead_k, lead_v), n, m) if not gqa else None
        scores = scores or (*lead_q, n, m)
        # Any broadcastable shape: a suffix of the scores' dimensions, each full or 1.
        keep = draw(st.integers(0, len(scores)))
        shape = [s if draw(st.booleans()) else 1 for s in scores[len(scores) - keep :]]
        bad = draw(st.sampled_from(["fits", "fits", "fits", "longer", "shorter", "extra"]))
        if bad in ("longer", "shorter") and shape:
            i = draw(st.integers(0, len(shape) - 1))
            full = scores[len(scores) - len(shape) + i]
            shape[i] = full + 1 if bad == "longer" else max(0, full - 1)
            if shape[i] in (1, full):  # still broadcastable: make it clearly wrong
                shape[i] = full + 2
        elif bad == "extra":
            shape = [2, *scores]
        mask_shape = tuple(shape)
    return Case(
        seed=draw(st.integers(0, 2**31 - 1)),
        lead_q=lead_q,
        lead_k=lead_k,
        lead_v=lead_v,
        n=n,
        m=m,
        e=e,
        ev=ev,
        block=block,
        dtype=dtype,
        autocast=autocast,
        mask=kind,
        mask_shape=mask_shape,
        mask_grad=kind == "additive" and draw(st.booleans()),
        masked_rows=kind != "none" and draw(st.booleans()),
        causal=draw(st.booleans())
        if kind == "none"
        else draw(st.sampled_from([False] * 5 + [True])),
        scale=draw(st.sampled_from([None, None, 0.3, 1.7])),
        gqa=gqa,
        e_k=e if draw(st.integers(0, 19)) else e + 1,
        m_v=m if draw(st.integers(0, 19)) else m + 1,
    )


def inputs(case: Case) -> dict[str, torch.Tensor | None]:
    """The float64 tensors of a case, then rounded to its dtype and back (so that
    float64 computes the exact result of the rounded inputs)."""
    g = torch.Generator().manual_seed(case.seed)

    def randn(*shape: int) -> torch.Tensor:
        t = torch.randn(shape, dtype=torch.float64, generator=g)
        return t.to(case.dtype).double()

    t: dict[str, torch.Tensor | None] = {
        "q": randn(*case.lead_q, case.n, case.e),
        "k": randn(*case.lead_k, case.m, case.e_k),
        "v": randn(*case.lead_v, case.m_v, case.ev),
        "mask": None,
    }
    if case.mask_shape is not None:
        shape = case.mask_shape
        if case.mask == "bool":
            mask = torch.rand(shape, generator=g) > 0.3
            if case.masked_rows and len(shape) >= 2 and shape[-2] > 0:
                mask[..., 0, :] = False
        else:
            mask = randn(*shape)
            if case.masked_rows and len(shape) >= 1 and shape[-1] > 0:
                mask[..., torch.rand(shape[-1], generator=g) < 0.3] = float("-inf")
                if len(shape) >= 2 and shape[-2] > 0:
                    mask[..., 0, :] = float("-inf")  # a fully masked row (or all rows)
        t["mask"] = mask
    return t


def math_sdpa(*args, **kwargs):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(*args, **kwargs)


def derivatives(fn, case: Case, dtype: torch.dtype, **extra):
    """Value, gradients and double backward of ``fn`` on the case's inputs in ``dtype``;
    or the exception ``fn`` raised."""
    t = inputs(case)
    q, k, v = (t[name].to(dtype).requires_grad_() for name in ("q", "k", "v"))
    mask = t["mask"]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype).requires_grad_(case.mask_grad)
    leaves = [q, k, v, *([mask] if case.mask_grad else [])]
    kwargs = {"attn_mask": mask, "is_causal": case.causal, "scale": case.scale}
    if case.gqa:
        kwargs["enable_gqa"] = True
    g = torch.Generator().manual_seed(case.seed + 1)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.autocast):
            out = fn(q, k, v, **kwargs, **extra)
    except (RuntimeError, ValueError, IndexError) as error:
        return error
    do = torch.randn(out.shape, dtype=torch.float64, generator=g).to(out.dtype)
    do.requires_grad_()
    grads = torch.autograd.grad(out, leaves, do, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(x) if d is None else d for d, x in zip(grads, leaves)]
    cotangents = [torch.randn(x.shape, dtype=torch.float64, generator=g).to(x.dtype) for x in grads]
    used = [(x, c) for x, c in zip(grads, cotangents) if x.requires_grad]
    second = [None] * (len(leaves) + 1)
    if used:
        second = torch.autograd.grad(
            [x for x, _ in used], [*leaves, do], [c for _, c in used], allow_unused=True
        )
    second = [torch.zeros_like(x) if s is None else s for s, x in zip(second, [*leaves, do])]
    return [t.detach() for t in (out, *grads, *second)]


def blockwise(case: Case):
    return lambda *a, **kw: attention.scaled_dot_product_attention(*a, block_size=case.block, **kw)


def _names(case: Case) -> list[str]:
    leaves = ["q", "k", "v", *(["mask"] if case.mask_grad else [])]
    return ["out", *(f"d{x}" for x in leaves), *(f"dd{x}" for x in [*leaves, "do"])]


def check(case: Case) -> None:
    """The block-wise kernel against the math kernel on one case (the module docstring)."""
    want = derivatives(math_sdpa, case, case.dtype)
    got = derivatives(blockwise(case), case, case.dtype)
    if case.e_k != case.e or case.m_v != case.m:
        # Keys of another width, or values of another length: torch lets some of these
        # through when a length is 0 (its empty products check nothing); refused here.
        assert isinstance(got, Exception), "the kernel ran with keys or values that do not fit"
        return
    if isinstance(want, Exception):
        assert isinstance(got, Exception), f"torch refuses this call ({want}), the kernel ran"
        assert isinstance(got, (RuntimeError, ValueError)), f"unexpected {type(got).__name__}"
        return
    if isinstance(got, AttentionInputError) and 0 in (case.n, case.m):
        # torch checks less when a length is 0 (a mask together with is_causal, a
        # mask of any shape); the kernel checks such calls as any other.
        return
    assert not isinstance(got, Exception), f"torch runs this call, the kernel raised: {got!r}"
    names = _names(case)
    if case.dtype == torch.float64 and not case.autocast:
        for name, g, w in zip(names, got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, f"{name}: {g.shape} {w.shape}"
            torch.testing.assert_close(
                g, w, rtol=F64_TOL, atol=F64_TOL, msg=lambda m, name=name: f"{name}: {m}"
            )
        return
    # Lower precision: against float64 on the same rounded inputs (autocast: bf16 ones).
    truth_case = case
    if case.autocast:
        truth_case = Case(**{**case.__dict__, "dtype": torch.bfloat16, "autocast": False})
    truth = derivatives(math_sdpa, truth_case, torch.float64)
    low = torch.bfloat16 if case.autocast else case.dtype
    eps = torch.finfo(low).eps
    # The case's scale, per element: a gradient that is 0 in exact arithmetic (one key)
    # comes out of dP - D as roundings of the size of dP and D, not of the gradient.
    rms = max((float(t.norm()) / math.sqrt(t.numel()) for t in truth if t.numel()), default=0.0)
    for name, g, w, t in zip(names, got, want, truth):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}: {g.shape} {w.shape}"
        err_math = float((w.double() - t).norm())
        err = float((g.double() - t).norm())
        # Cases so small that the math kernel happens to land (almost) exactly: a few
        # roundings of the dtype, and float32's for every term of the sums (Higham's
        # bound for sums of n terms grows as n eps), of the result and of the case's scale.
        terms = case.n + case.m + case.e + case.ev
        floor = (4 * eps + terms * EPS32) * (float(t.norm()) + math.sqrt(t.numel()) * rms)
        assert math.isfinite(err) == math.isfinite(err_math), f"{name}: {err} vs {err_math}"
        if math.isfinite(err_math):
            assert err <= 1.5 * err_math + floor, (
                f"{name}: error {err:.3g} against float64, the math kernel's {err_math:.3g}"
            )


@FUZZ
@given(cases())
def test_blockwise_matches_the_math_kernel(case):
    check(case)


# -- cases the fuzzer must reach, pinned (and a replay of any falsifying example) ----------
def _case(**fields) -> Case:
    base = dict(
        seed=1,
        lead_q=(2, 2),
        lead_k=(2, 2),
        lead_v=(2, 2),
        n=5,
        m=7,
        e=3,
        ev=4,
        block=2,
        dtype=torch.float64,
        autocast=False,
        mask="none",
        mask_shape=None,
        mask_grad=False,
        masked_rows=False,
        causal=False,
        scale=None,
        gqa=False,
    )
    base.update(fields)
    base.setdefault("e_k", base["e"])
    base.setdefault("m_v", base["m"])
    return Case(**base)


PINNED = {
    "mask-for-a-longer-sequence": _case(mask="bool", mask_shape=(6, 7)),
    "mask-for-more-keys": _case(mask="additive", mask_shape=(5, 8)),
    "one-mask-row-for-the-last-block": _case(mask="bool", mask_shape=(3, 7)),
    "wrong-3d-mask": _case(mask="additive", mask_shape=(3, 5, 7)),
    "mask-with-more-dimensions": _case(mask="bool", mask_shape=(2, 2, 2, 5, 7)),
    "padding-mask-row": _case(mask="additive", mask_shape=(2, 1, 1, 7), mask_grad=True),
    "fully-masked-rows": _case(mask="bool", mask_shape=(5, 7), masked_rows=True),
    "additive-inf-rows-grad": _case(
        mask="additive", mask_shape=(2, 5, 7), masked_rows=True, mask_grad=True
    ),
    "no-queries": _case(n=0, mask="bool", mask_shape=(0, 7)),
    "no-keys": _case(m=0, causal=True),
    "no-keys-additive": _case(m=0, mask="additive", mask_shape=(5, 0), mask_grad=True),
    "gqa-value-heads-differ": _case(lead_q=(1, 4), lead_k=(1, 2), lead_v=(1, 1), gqa=True),
    "gqa-indivisible": _case(lead_q=(1, 4), lead_k=(1, 3), lead_v=(1, 3), gqa=True),
    "gqa-without-heads": _case(lead_q=(), lead_k=(), lead_v=(), gqa=True),
    "heads-without-gqa": _case(lead_q=(1, 4), lead_k=(1, 2), lead_v=(1, 2)),
    "causal-more-queries": _case(n=7, m=3, causal=True, block=3),
    "mask-and-causal": _case(mask="bool", mask_shape=(5, 7), causal=True),
    "wrong-key-dim": _case(e_k=4),
    "wrong-value-length": _case(m_v=8),
    "bf16": _case(dtype=torch.bfloat16, mask="additive", mask_shape=(5, 7), mask_grad=True),
    "fp16-causal": _case(dtype=torch.float16, causal=True, scale=0.3),
    "float32-autocast": _case(dtype=torch.float32, autocast=True, mask="bool", mask_shape=(7,)),
}


@pytest.mark.parametrize("name", PINNED)
def test_pinned_case(name):
    check(PINNED[name])
