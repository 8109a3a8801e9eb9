"""``higher._exact_norms.ExactBatchNorm`` against finite differences and primitive ops.

Torch 2.13's native batch norm differentiates wrongly for some input and gradient
layouts; patched modules run ``F.batch_norm`` inside ``ExactBatchNorm``, which keeps the
native kernel on canonical layouts in eval mode (the gradient made canonical) and uses
primitive ops otherwise.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from higher._exact_norms import ExactBatchNorm, batch_norm

DT = torch.float64


def _strided(shape: tuple[int, ...], rng: random.Random) -> torch.Tensor:
    """A tensor with a random dense layout; size-1 dims get odd strides half the time."""
    order = list(range(len(shape)))
    rng.shuffle(order)
    strides, step = [0] * len(shape), 1
    for d in reversed(order):
        strides[d], step = step, step * shape[d]
    for d, size in enumerate(shape):
        if size == 1 and rng.random() < 0.5:
            strides[d] = rng.choice([1, 2, 7, 100])
    values = torch.randn(shape, dtype=DT)
    return torch.empty_strided(shape, strides, dtype=DT).copy_(values)


def _grads(fn, x, w, b, training, g, h):
    stats = torch.linspace(-0.5, 0.5, x.size(1), dtype=DT), torch.linspace(0.5, 1.5, x.size(1))
    y = fn(x, stats[0].clone(), stats[1].to(DT), w, b, training, 0.1, 1e-5)
    first = torch.autograd.grad(y, (x, w, b), g, create_graph=True)
    pairs = [(t, v) for t, v in zip(first, h) if t.requires_grad]
    second = torch.autograd.grad([t for t, _ in pairs], (x, w), [v for _, v in pairs])
    return (y, *first, *second)


def test_matches_primitive_ops_on_random_layouts_first_and_second_order() -> None:
    rng = random.Random(0)
    torch.manual_seed(0)

    def exact(*args):
        with ExactBatchNorm():
            return F.batch_norm(*args)

    for _ in range(150):
        nd = rng.choice([2, 3, 4, 5])
        shape = (
            rng.choice([1, 2, 3]),
            rng.choice([2, 4]),
            *[rng.choice([1, 2, 3]) for _ in range(nd - 2)],
        )
        x = _strided(shape, rng)
        if nd == 4 and rng.random() < 0.3:
            x = x.clone(memory_format=torch.channels_last)
        x.requires_grad_()
        w = torch.randn(shape[1], dtype=DT, requires_grad=True)
        b = torch.randn(shape[1], dtype=DT, requires_grad=True)
        training = rng.random() < 0.5 and x.numel() > shape[1]
        g = _strided(shape, rng)
        if nd == 4 and rng.random() < 0.3:
            g = g.clone(memory_format=torch.channels_last)
        h = [
            _strided(x.shape, rng),
            torch.randn(shape[1], dtype=DT),
            torch.randn(shape[1], dtype=DT),
        ]
        ours = _grads(exact, x, w, b, training, g, h)
        theirs = _grads(batch_norm, x, w, b, training, g, h)
        for a, c in zip(ours, theirs):
            torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12, msg=f"{shape} {x.stride()}")


@pytest.mark.parametrize(
    "layout", ["contiguous", "channels_last", "permuted_size_one"], ids=lambda s: s
)
@pytest.mark.parametrize("training", [False, True])
def test_gradgradcheck_with_a_permuted_gradient(layout: str, training: bool) -> None:
    """Against finite differences; the gradient reaching batch norm has another layout
    than its input (the native kernel then reads it wrongly)."""
    torch.manual_seed(0)
    if layout == "permuted_size_one":
        x = torch.randn(2, 5, 4, dtype=DT).transpose(1, 2).unsqueeze(-1)
    else:
        x = torch.randn(2, 4, 5, 1, dtype=DT)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(4, dtype=DT, requires_grad=True)
    b = torch.randn(4, dtype=DT, requires_grad=True)
    mean, var = torch.randn(4, dtype=DT), torch.rand(4, dtype=DT) + 0.5

    def f(x, w, b):
        with ExactBatchNorm():
            y = F.batch_norm(x, mean.clone(), var.clone(), w, b, training)
        # A channels-last gradient for a contiguous input and the converse.
        out = y.contiguous() if layout == "channels_last" else y.permute(0, 2, 3, 1)
        return out.pow(2).tanh()

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_without_a_graph_the_native_kernel_runs() -> None:
    x = torch.randn(2, 5, 4).transpose(1, 2).unsqueeze(-1)
    calls = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    with Spy(), ExactBatchNorm(), torch.no_grad():
        F.batch_norm(x, torch.zeros(4), torch.ones(4))
    # Primitive ops would pass through the outer mode as mean/var/rsqrt calls.
    assert torch.rsqrt not in calls and torch.Tensor.rsqrt not in calls
