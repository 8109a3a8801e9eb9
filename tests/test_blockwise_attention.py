"""Block-wise attention (higher.attention): exact against torch's math kernel, to every order.

The kernel is compared in float64 with ``F.scaled_dot_product_attention`` on
its math kernel (value, gradient and double backward, every mask kind, GQA,
scale, lengths that are not a multiple of the block, a single row, fully
masked rows), with ``gradcheck``/``gradgradcheck`` on small shapes, and through
MAML meta-gradients against a hand-written ``functional_call`` unroll. Every
model row of ``tests/test_models.py`` that calls attention is run again with
the block-wise kernel forced, in per-task, checkpoint and batched modes, at
that file's tolerances. A float32 case at torch's defaults is bounded as in
``tests/test_float32_matrix.py``; bfloat16 and float16 within 1.5 times the
math kernel's own error against float64. Masks of the wrong shape raise under
``innerloop_ctx`` at 512 tokens as plain torch raises, and
``sdpa_kernel(SDPBackend.MATH)`` is honoured. ``tests/test_fuzz_attention.py``
draws many more calls against the math kernel.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import test_models
import torch
import torch.nn.functional as F
from blockwise_attention_ranks import SelfAttention, problem
from test_models import _quiet_third_party  # noqa: F401  (autouse: quiet transformers)
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import higher
from higher import attention
from higher._compat import blockwise_attention

DT = torch.float64
TOL = 1e-9


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so that small shapes run several blocks."""
    monkeypatch.setattr(blockwise_attention, "BLOCK_ELEMENTS", {"cpu": 100})
    monkeypatch.setattr(blockwise_attention, "MIN_BLOCK_ROWS", 1)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach the block-wise kernel."""
    count = [0]
    kernel = blockwise_attention.attention

    def counting(*args, **kwargs):
        count[0] += 1
        return kernel(*args, **kwargs)

    monkeypatch.setattr(blockwise_attention, "attention", counting)
    return count


def math_sdpa(*args, **kwargs):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(*args, **kwargs)


def _randn(*shape, seed):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _sliding_window(n, window):
    i = torch.arange(n)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)


def _fully_masked_rows():
    mask = _randn(5, 7, seed=9) > 0
    mask[1] = False
    mask[4] = False
    return mask


def _padding_bias():
    bias = torch.zeros(2, 1, 1, 7, dtype=DT)
    bias[1, ..., 5:] = float("-inf")  # padded keys of the second sequence
    return bias


# (query shape, key shape, value width, keyword arguments, mask or None, mask requires grad)
CASES = {
    "plain": ((2, 3, 5, 4), (2, 3, 5, 4), 6, {}, None, False),
    "cross-lengths": ((2, 3, 5, 4), (2, 3, 7, 4), 3, {}, None, False),
    "causal": ((2, 3, 5, 4), (2, 3, 5, 4), 4, {"is_causal": True}, None, False),
    "causal-fewer-queries": ((1, 2, 4, 4), (1, 2, 7, 4), 4, {"is_causal": True}, None, False),
    "causal-more-queries": ((1, 2, 7, 4), (1, 2, 4, 4), 4, {"is_causal": True}, None, False),
    "bool-mask-fully-masked-rows": ((2, 3, 5, 4), (2, 3, 7, 4), 4, {}, "rows", False),
    "sliding-window": ((2, 2, 7, 4), (2, 2, 7, 4), 4, {}, "window", False),
    "additive": ((2, 3, 5, 4), (2, 3, 7, 4), 4, {}, "additive", False),
    "learned-bias": ((2, 3, 5, 4), (2, 3, 7, 4), 4, {}, "bias", True),
    "padding-bias-broadcast": ((2, 3, 5, 4), (2, 3, 7, 4), 4, {}, "padding", True),
    "gqa": ((2, 4, 5, 4), (2, 2, 5, 4), 4, {"enable_gqa": True}, None, False),
    "gqa-causal-scale": (
        (1, 6, 5, 4),
        (1, 2, 5, 4),
        4,
        {"enable_gqa": True, "is_causal": True, "scale": 0.3},
        None,
        False,
    ),
    "scale": ((2, 3, 5, 4), (2, 3, 5, 4), 4, {"scale": 1.7}, None, False),
    "one-row": ((2, 3, 1, 4), (2, 3, 1, 4), 4, {"is_causal": True}, None, False),
    "one-query": ((2, 3, 1, 4), (2, 3, 6, 4), 4, {}, None, False),
    "no-head-dimension": ((3, 5, 4), (3, 6, 4), 2, {}, None, False),
}


def _mask(kind):
    if kind is None:
        return None
    return {
        "rows": _fully_masked_rows,
        "window": lambda: _sliding_window(7, 3),
        "additive": lambda: _randn(5, 7, seed=5),
        "bias": lambda: 0.5 * _randn(3, 5, 7, seed=6),
        "padding": _padding_bias,
    }[kind]()


def _derivatives(fn, case):
    """Value, gradient and double backward (against random cotangents) of one case."""
    q_shape, k_shape, ev, kwargs, mask_kind, mask_grad = case
    q = _randn(*q_shape, seed=1).requires_grad_()
    k = _randn(*k_shape, seed=2).requires_grad_()
    v = _randn(*k_shape[:-1], ev, seed=3).requires_grad_()
    mask = _mask(mask_kind)
    inputs = [q, k, v]
    if mask_grad:
        mask.requires_grad_()
        inputs.append(mask)
    out = fn(q, k, v, attn_mask=mask, **kwargs)
    do = _randn(*out.shape, seed=4).requires_grad_()
    grads = torch.autograd.grad(out, inputs, do, create_graph=True)
    cotangents = [_randn(*g.shape, seed=10 + i) for i, g in enumerate(grads)]
    second = torch.autograd.grad(grads, [*inputs, do], cotangents, allow_unused=True)
    return [out, *grads, *second]


def test_small_blocks_split_the_rows(small_blocks):
    # The fixture's blocks leave a remainder: 5 rows of 7 keys and 6 heads in blocks of 2.
    assert blockwise_attention.block_rows(torch.zeros(2, 3, 5, 4), 7) == 2
    # By default a block holds at least MIN_BLOCK_ROWS rows, or all of them.
    blockwise_attention.MIN_BLOCK_ROWS = 64
    assert blockwise_attention.block_rows(torch.zeros(2, 3, 5, 4), 7) == 5


@pytest.mark.parametrize("name", CASES)
def test_value_gradient_and_double_backward_match_the_math_kernel(name, small_blocks):
    case = CASES[name]
    want = _derivatives(math_sdpa, case)
    got = _derivatives(attention.scaled_dot_product_attention, case)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"output {i}: one side has no gradient"
        if w is not None:
            assert w.isfinite().all(), "the reference should have no NaN here"
            torch.testing.assert_close(g, w, rtol=TOL, atol=TOL, msg=f"{name}: output {i}")


@pytest.mark.parametrize("kept", ["mask", "q", "k", "v", "q,mask"])
def test_double_backward_of_some_gradients_only(kept, small_blocks):
    """The outer gradient of only some of the inner gradients: the other cotangents of the
    double backward are None (its terms of W and U drop out)."""
    results = []
    for fn in (math_sdpa, attention.scaled_dot_product_attention):
        q, k, v = (_randn(2, 3, 5, 4, seed=s).requires_grad_() for s in (1, 2, 3))
        mask = (0.5 * _randn(3, 5, 5, seed=6)).requires_grad_()
        inputs = {"q": q, "k": k, "v": v, "mask": mask}
        out = fn(q, k, v, attn_mask=mask, is_causal=False)
        grads = torch.autograd.grad(
            out, list(inputs.values()), _randn(*out.shape, seed=4), create_graph=True
        )
        chosen = [g for name, g in zip(inputs, grads) if name in kept.split(",")]
        loss = sum((g * _randn(*g.shape, seed=10 + i)).sum() for i, g in enumerate(chosen))
        results.append(torch.autograd.grad(loss, list(inputs.values()), allow_unused=True))
    for i, (want, got) in enumerate(zip(*results)):
        assert got is not None or want is None, f"{kept}: input {i} has no gradient"
        if want is None:  # dv = P^T do does not depend on v: zeros here, None there
            want = torch.zeros_like(got)
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL, msg=f"{kept}: input {i}")


def test_fully_masked_rows_give_zeros_as_the_math_kernel(small_blocks):
    q, k, v = (_randn(1, 2, 5, 4, seed=s) for s in (1, 2, 3))
    mask = _fully_masked_rows()[:, :5]
    out = attention.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out[..., 1, :] == 0).all() and (out[..., 4, :] == 0).all()
    torch.testing.assert_close(out, math_sdpa(q, k, v, attn_mask=mask), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"mask": True}], ids=str)
def test_gradcheck_and_gradgradcheck(kwargs):
    q = _randn(1, 2, 5, 3, seed=1).requires_grad_()
    k = _randn(1, 2, 6, 3, seed=2).requires_grad_()
    v = _randn(1, 2, 6, 2, seed=3).requires_grad_()
    inputs = [q, k, v]
    if kwargs.pop("mask", False):
        inputs.append((0.3 * _randn(2, 5, 6, seed=4)).requires_grad_())

    def fn(q, k, v, mask=None):
        return attention.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, block_size=2, **kwargs
        )

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_third_derivative_is_exact_and_warns():
    q, k, v = (_randn(1, 2, 5, 3, seed=s).requires_grad_() for s in (1, 2, 3))
    results = []
    for fn, third in ((math_sdpa, False), (attention.scaled_dot_product_attention, True)):
        out = fn(q, k, v, is_causal=True)
        grads = torch.autograd.grad((out**2).sum(), (q, k, v), create_graph=True)
        if third:
            with pytest.warns(UserWarning, match="order three or more runs on plain attention"):
                second = torch.autograd.grad(
                    sum((g**2).sum() for g in grads), (q, k, v), create_graph=True
                )
        else:
            second = torch.autograd.grad(
                sum((g**2).sum() for g in grads), (q, k, v), create_graph=True
            )
        results.append(torch.autograd.grad(sum((g**3).sum() for g in second), (q, k, v)))
    for g, w in zip(*results):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)


def test_under_vmap(small_blocks):
    q, k, v = (_randn(3, 2, 5, 4, seed=s).requires_grad_() for s in (1, 2, 3))
    bias = (0.5 * _randn(3, 2, 5, 5, seed=4)).requires_grad_()
    results = []
    for fn in (math_sdpa, attention.scaled_dot_product_attention):
        out = torch.func.vmap(lambda q, k, v, b, fn=fn: fn(q, k, v, attn_mask=b))(q, k, v, bias)
        grads = torch.autograd.grad((out**2).sum(), (q, k, v, bias), create_graph=True)
        second = torch.autograd.grad(sum((g**2).sum() for g in grads), (q, k, v, bias))
        results.append([out, *grads, *second])
    for g, w in zip(*results):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)


# -- in patched modules -------------------------------------------------------------
def _maml_reference(model, tasks, steps, lr=0.1):
    params = dict(model.named_parameters())
    total = 0.0
    with sdpa_kernel([SDPBackend.MATH]):
        for xs, ys, xq, yq in tasks:
            fast = dict(params)
            for _ in range(steps):
                loss = F.mse_loss(functional_call(model, fast, (xs,)), ys)
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {k: p - lr * g for (k, p), g in zip(fast.items(), grads)}
            total = total + F.mse_loss(functional_call(model, fast, (xq,)), yq)
    return torch.autograd.grad(total, list(params.values()))


def _maml_higher(model, tasks, steps, mode, lr=0.1):
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if mode == "batched":
        xs, ys, xq, yq = (torch.stack(t) for t in zip(*tasks))
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, num_tasks=len(tasks)) as (
            fmodel,
            diffopt,
        ):
            for _ in range(steps):
                diffopt.step(((fmodel(xs) - ys) ** 2).flatten(1).mean(1))
            ((fmodel(xq) - yq) ** 2).flatten(1).mean(1).sum().backward()
        return [p.grad for p in model.parameters()]
    for xs, ys, xq, yq in tasks:
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=False, checkpoint=mode == "checkpoint"
        ) as (fmodel, diffopt):
            for _ in range(steps):
                if mode == "checkpoint":
                    diffopt.step(lambda xs=xs, ys=ys: F.mse_loss(fmodel(xs), ys))
                else:
                    diffopt.step(F.mse_loss(fmodel(xs), ys))
            F.mse_loss(fmodel(xq), yq).backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    "kind, steps, mode",
    [
        ("bias", 1, "per-task"),
        ("bias", 3, "per-task"),
        ("causal", 3, "checkpoint"),
        ("gqa", 1, "per-task"),
        ("bias", 3, "batched"),
        ("causal", 1, "batched"),
    ],
)
def test_maml_meta_gradient_through_the_blockwise_kernel(kind, steps, mode, small_blocks, calls):
    model, tasks = problem(kind)
    want = _maml_reference(model, tasks, steps)
    with attention.attention_kernel("blockwise"):
        got = _maml_higher(model, tasks, steps, mode)
    assert calls[0] > 0, "the block-wise kernel did not run"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)


# -- every attention row of tests/test_models.py through the new path -----------------
#: The rows of test_models.MODELS whose models call F.scaled_dot_product_attention.
ATTENTION_ROWS = [
    *(f"{name}-sdpa" for name in ("gpt2", "bert", "llama", "t5", "vit", "mistral")),
    "peft-lora-llama",
    "peft-dora-llama",
    "peft-prefix-llama",
    "mixtral",
    "swin",
    "beit",
    "timm-eva",
    "timm-vit",
]


@pytest.mark.parametrize("mode", test_models.MODES)
@pytest.mark.parametrize("name", ATTENTION_ROWS)
def test_model_rows_through_the_blockwise_kernel(name, mode, small_blocks, calls):
    test_models.model_and_tasks(name)  # builds outside the count (skips if a package is absent)
    with attention.attention_kernel("blockwise"):
        test_models.test_meta_gradient_matches_functional_call(name, mode)
    assert calls[0] > 0, f"{name} ran no attention through the block-wise kernel"


# -- the switch ---------------------------------------------------------------------
def _one_inner_step(model, x, **setting):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, **setting) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).mean())
        fmodel(x).pow(2).mean().backward()


@pytest.mark.parametrize(
    "kernel, threshold, setting, used",
    [
        ("auto", 7, {}, True),  # 7 x 7 scores: at the threshold
        ("auto", 8, {}, False),  # below it: the math kernel
        ("math", 1, {}, False),
        ("blockwise", 1000, {}, True),
        ("blockwise", 1, {"first_order": True}, False),  # no double backward: fused kernels
        ("blockwise", 1, {"track_higher_grads": False}, False),
    ],
)
def test_the_switch_and_the_threshold(kernel, threshold, setting, used, calls):
    model, tasks = problem("causal")
    with attention.attention_kernel(kernel, threshold=threshold):
        _one_inner_step(model, tasks[0][0], **setting)
    assert (calls[0] > 0) == used


def test_dropout_runs_on_the_math_kernel(calls):
    class Dropping(SelfAttention):
        def forward(self, x):
            q = k = v = self.q(x).view(*x.shape[:2], 2, -1).transpose(1, 2)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5).sum(1)

    model, tasks = problem("plain")
    model.__class__ = Dropping
    with attention.attention_kernel("blockwise"):
        _one_inner_step(model, tasks[0][0])
    assert calls[0] == 0


def test_attention_kernel_restores_the_previous_choice():
    before = attention.get_attention_kernel()
    with attention.attention_kernel("math", threshold=5):
        assert attention.get_attention_kernel() == ("math", 5)
        with attention.attention_kernel("blockwise"):
            assert attention.get_attention_kernel() == ("blockwise", 5)
        assert attention.get_attention_kernel() == ("math", 5)
    assert attention.get_attention_kernel() == before


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: attention.set_attention_kernel("flash"), "kernel='flash': choose one of"),
        (lambda: attention.set_attention_kernel("auto", threshold=0), "threshold=0"),
        (lambda: attention.set_attention_kernel("auto", threshold=2.5), "threshold=2.5"),
    ],
)
def test_bad_switch_arguments_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dropout_p": 0.1}, "dropout_p=0.1: higher's block-wise attention has no dropout"),
        ({"attn_mask": torch.ones(4, 4, dtype=torch.bool), "is_causal": True}, "not both"),
        (
            {"attn_mask": torch.zeros(4, 4, dtype=torch.float16)},
            "attn_mask has dtype torch.float16",
        ),
        ({"block_size": 0}, "block_size=0"),
        ({"enable_gqa": True, "key": torch.randn(1, 3, 4, 2)}, "4 query heads cannot share 3"),
    ],
)
def test_bad_kernel_arguments_are_refused(kwargs, match):
    q = torch.randn(1, 4 if "enable_gqa" in kwargs else 2, 4, 2, dtype=DT)
    k = kwargs.pop("key", q).to(DT)
    with pytest.raises(ValueError, match=match):
        attention.scaled_dot_product_attention(q, k, k, **kwargs)


# -- float32 at torch's defaults ----------------------------------------------------
EPS32 = torch.finfo(torch.float32).eps
C = 4  # as tests/test_float32_matrix.py: its module docstring says where the bound comes from


def _ulp_nudge(t, seed):
    g = torch.Generator().manual_seed(seed)
    up = torch.randint(0, 2, t.shape, generator=g).bool()
    return torch.where(up, torch.nextafter(t, t + 1), torch.nextafter(t, t - 1))


def _nudged(model, tasks, seed=7):
    twin = SelfAttention(model.kind)
    twin.load_state_dict(
        {k: _ulp_nudge(v, seed + i) for i, (k, v) in enumerate(model.state_dict().items())}
    )
    return twin, [
        tuple(_ulp_nudge(x, seed + 100 + 4 * i + j) for j, x in enumerate(t))
        for i, t in enumerate(tasks)
    ]


def _as64(model, tasks):
    twin = SelfAttention(model.kind).to(DT)
    twin.load_state_dict({k: v.to(DT) for k, v in model.state_dict().items()})
    return twin, [tuple(x.to(DT) for x in t) for t in tasks]


def test_float32_meta_gradient_at_defaults(small_blocks, calls):
    model, tasks = problem("bias", dtype=torch.float32)
    twin, twin_tasks = _nudged(model, tasks)
    truth = _maml_reference(*_as64(model, tasks), steps=2)
    truth_nudged = _maml_reference(*_as64(twin, twin_tasks), steps=2)
    ref32 = _maml_reference(model, tasks, steps=2)
    ref32_nudged = _maml_reference(twin, twin_tasks, steps=2)
    with attention.attention_kernel("blockwise"):
        got = _maml_higher(model, tasks, 2, "per-task")
    assert calls[0] > 0
    floor = EPS32 * math.sqrt(sum(float(t.norm()) ** 2 for t in truth))
    for name, g, t, tn, r, rn in zip(
        dict(model.named_parameters()), got, truth, truth_nudged, ref32, ref32_nudged
    ):
        scale = max(
            float((r.double() - t).norm()),
            float((rn.double() - tn).norm()),
            float((tn - t).norm()),
            floor,
        )
        err = float((g.double() - t).norm())
        assert err <= C * scale, f"{name}: error {err:.3g} is {err / scale:.1f} times {scale:.3g}"


# -- DistributedDataParallel --------------------------------------------------------
def test_ddp_meta_gradient_through_the_blockwise_kernel(tmp_path):
    import os

    import launch_ranks

    script = os.path.join(os.path.dirname(__file__), "blockwise_attention_ranks.py")
    # The timeout only turns a hang into a failure: two fresh interpreters importing
    # torch on a loaded machine took most of the former 120 s, and failed the suite once.
    ranks = launch_ranks.launch(script, [], tmp_path, world=2, timeout_s=900)
    model, tasks = problem("bias")
    want = _maml_reference(model, tasks, steps=2)  # summed over the two tasks
    for rank in ranks:
        assert rank["calls"] > 0, "the block-wise kernel did not run"
        for g, w in zip(rank["grads"], want):
            torch.testing.assert_close(g, w / 2, rtol=TOL, atol=TOL)  # DDP averages


# -- benchmarks/long_sequence.py's arithmetic ---------------------------------------
def test_benchmark_projects_memory_and_writes_the_table():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import long_sequence

    quadratic = [{"length": n, "peak_mb": 2 * n + n * n / 1000} for n in (1000, 2000)]
    assert long_sequence.project(quadratic, 4000, True) == pytest.approx(8000 + 16000)
    assert long_sequence.project(quadratic[:1], 4000, False) == pytest.approx(4 * 3000)
    assert long_sequence.project([], 2**10, True, heads_x_layers=8) == pytest.approx(240)
    results = {"math": [{"length": 1000, "peak_mb": 3000.0, "seconds": 1.5}], "blockwise": []}
    table = long_sequence.table(results, {("blockwise", 1000): 12.0}, [1000], ["math", "blockwise"])
    assert "| math, MB | 3,000 |" in table and "| blockwise, MB | (12)* |" in table
    assert "| math, s | 1.50 |" in table and "| blockwise, s | - |" in table


def test_benchmark_by_hand_step_is_the_same_meta_gradient(calls):
    """The benchmark's ``torch-func`` row (the step written by hand, for its memory) and
    ``checkpoint`` row compute the meta-gradient of higher's step, through the kernel."""
    pytest.importorskip("transformers")
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import long_sequence

    model = long_sequence.build(1, 16, 2).double()
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = {}
    for variant in ("blockwise", "torch-func", "checkpoint"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(model, "zero_grad", lambda set_to_none=True: None)
            long_sequence.step(model, tokens, variant)
        grads[variant] = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    for variant in ("torch-func", "checkpoint"):
        for g, w in zip(grads[variant], grads["blockwise"]):
            torch.testing.assert_close(g, w, rtol=TOL, atol=TOL, msg=variant)
    assert calls[0] >= 3 * 2  # every variant's support and query forwards
    phases = long_sequence.saved_by_phase(model, tokens)
    assert list(phases) == [
        "support forward",
        "inner backward (create_graph=True)",
        "query forward on the fast weights",
    ]


def test_autocast_runs_in_its_lower_precision_as_torch_attention(calls):
    # bfloat16 rounds at 4e-3: both kernels land about 1e-2 from the float64
    # meta-gradient; the block-wise one must be as close as the math kernel's
    # (within 1.5 times: both compute in float32 and round once), not merely finite.
    model, tasks = problem("causal", dtype=torch.float32)
    truth = _maml_reference(*_as64(model, [tasks[0]]), steps=1)
    errors = {}
    for kernel in ("math", "blockwise"):
        with attention.attention_kernel(kernel), torch.autocast("cpu", dtype=torch.bfloat16):
            got = _maml_higher(model, [tasks[0]], 1, "per-task")
        errors[kernel] = max(float((g.double() - t).norm() / t.norm()) for g, t in zip(got, truth))
    assert calls[0] > 0
    assert errors["blockwise"] <= 1.5 * errors["math"], errors


# -- half precision: the math kernel's accuracy ---------------------------------------
def _half_derivatives(fn, half, dtype, causal, seed=0):
    """Value, gradients and double backward on inputs rounded to ``half``, computed in
    ``dtype`` (``half``, or float64 from the same rounded values)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, dtype=DT, generator=g).to(half).double()

    q, k, v, do = randn(1, 2, 160, 16), randn(1, 2, 150, 16), randn(1, 2, 150, 8), None
    bias = None if causal else 0.5 * randn(2, 160, 150)
    do = randn(1, 2, 160, 8)
    cots = [randn(*t.shape) for t in (q, k, v, *([bias] if bias is not None else []))]
    leaves = [
        t.to(dtype).requires_grad_() for t in (q, k, v, *([bias] if bias is not None else []))
    ]
    do = do.to(dtype).requires_grad_()
    mask = leaves[3] if bias is not None else None
    out = fn(*leaves[:3], attn_mask=mask, is_causal=causal)
    grads = torch.autograd.grad(out, leaves, do, create_graph=True)
    second = torch.autograd.grad(grads, [*leaves, do], [c.to(dtype) for c in cots])
    return [t.detach().double() for t in (out, *grads, *second)]


@pytest.fixture(params=[False, True], ids=["upcast", "reduced"])
def half_reduction(request):
    """torch's switch that lets the math kernel compute half precision without upcasting
    (``allow_fp16_bf16_reduction_math_sdp``); the block-wise kernel upcasts either way."""
    before = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(request.param)
    yield request.param
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(before)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "learned-bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_is_as_accurate_as_the_math_kernel(dtype, causal, half_reduction):
    """bf16 and fp16 within 1.5 times the math kernel's own error against float64, in
    value, gradient and double backward (the kernel computes in float32 and rounds once,
    as the math kernel does; rounding the scores to half precision doubled the error).
    With torch's reduced-precision switch on, the math kernel's error grows, not this one's."""
    truth = _half_derivatives(math_sdpa, dtype, DT, causal)
    ref = _half_derivatives(math_sdpa, dtype, dtype, causal)

    def blockwise(*args, **kwargs):
        return attention.scaled_dot_product_attention(*args, block_size=32, **kwargs)

    got = _half_derivatives(blockwise, dtype, dtype, causal)
    for i, (g, r, t) in enumerate(zip(got, ref, truth)):
        err, err_math = float((g - t).norm()), float((r - t).norm())
        assert err_math > 0 and err <= 1.5 * err_math, f"output {i}: {err:.3g} vs {err_math:.3g}"


# -- masks of the wrong shape under innerloop_ctx, at the block-wise kernel's lengths --
class _MaskedAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum()


WRONG_MASKS = {
    "built-for-a-longer-sequence": (576, 576),
    "one-row-for-the-last-block": (385, 512),
    "more-keys": (512, 513),
    "wrong-3d": (3, 512, 512),
}


@pytest.mark.parametrize("kernel", ["auto", "math"])
@pytest.mark.parametrize("shape", WRONG_MASKS.values(), ids=list(WRONG_MASKS))
def test_a_wrong_mask_raises_under_innerloop_ctx_as_plain_torch(shape, kernel, calls):
    model = _MaskedAttention()
    x = torch.randn(1, 512, 8)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.2
    with pytest.raises(RuntimeError) as plain:
        model(x, mask)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        attention.attention_kernel(kernel),
        higher.innerloop_ctx(model, opt) as (fmodel, _),
        pytest.raises(RuntimeError) as patched,
    ):
        fmodel(x, mask)
    assert str(plain.value) in str(patched.value), "not torch's own words"
    assert (calls[0] > 0) == (kernel == "auto"), "512 tokens: the block-wise kernel's length"
    # A mask of the right shape (one row, broadcast over the queries) runs, and exactly.
    mask = torch.rand(1, 512, generator=torch.Generator().manual_seed(0)) > 0.2
    with attention.attention_kernel(kernel), higher.innerloop_ctx(model, opt) as (fmodel, _):
        torch.testing.assert_close(fmodel(x, mask), model(x, mask), rtol=1e-5, atol=1e-4)


# -- torch's own backend choice -------------------------------------------------------
@pytest.mark.parametrize("mode", ["per-task", "checkpoint", "batched"])
def test_an_explicit_math_backend_is_honoured(mode, small_blocks, calls):
    """``sdpa_kernel(SDPBackend.MATH)`` around the inner loop: torch's math kernel runs,
    whatever higher.attention's switch says (it has a double backward)."""
    model, tasks = problem("bias")
    want = _maml_reference(model, tasks, 2)
    with attention.attention_kernel("blockwise"), sdpa_kernel([SDPBackend.MATH]):
        got = _maml_higher(model, tasks, 2, mode)
    assert calls[0] == 0, "the block-wise kernel ran inside sdpa_kernel(SDPBackend.MATH)"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)
    # A choice that leaves a fused kernel (no double backward) open leaves it to higher.
    with (
        attention.attention_kernel("blockwise"),
        sdpa_kernel([SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]),
    ):
        _maml_higher(model, tasks, 1, mode)
    assert calls[0] > 0


class _Mha(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("user_math", [False, True])
def test_multihead_attention_flags_set_by_higher_are_not_a_user_choice(user_math, calls):
    """higher runs ``nn.MultiheadAttention`` with the math backend's flags itself; that
    does not count as the user's choice of the math kernel, the user's own does."""
    model = _Mha().double()
    x = torch.randn(2, 7, 8, dtype=DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    chosen = sdpa_kernel([SDPBackend.MATH]) if user_math else contextlib.nullcontext()
    with (
        attention.attention_kernel("blockwise"),
        chosen,
        higher.innerloop_ctx(model, opt) as (fmodel, diffopt),
    ):
        diffopt.step(fmodel(x).pow(2).mean())
    assert (calls[0] > 0) != user_math
