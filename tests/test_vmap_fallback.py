"""Batched mode runs the tasks one by one when vmap cannot batch a forward, and only then.

For each kind of forward that ``torch.func.vmap`` refuses, with the message
torch really raises, batched mode must fall back to the task loop with a
warning and give the per-task loop's meta-gradients (float64, 1e-10). A
genuine error in a forward must raise as it does in the per-task loop, with no
warning, and leave the strategy at ``"vmap"``: among them errors whose message
vmap also gives for what it cannot batch, which batched mode settles by
running the tasks one by one. ``higher._compat.vmap`` lists the messages.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import higher
from higher._compat import vmap_cannot_batch

# The for-loop fallback of an operator without a batching rule warns that it is slow.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

N, STEPS, LR = 2, 2, 0.1
FALLBACK = "vmap cannot batch this forward .*one after another"

Op = Callable[[nn.Module, Tensor, Tensor], Tensor]


class _CtxInForward(torch.autograd.Function):
    """An old-style Function (ctx in forward): torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class _NoVmapRule(torch.autograd.Function):
    """A torch.func-style Function without a vmap rule."""

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def _nonzero_rows(x: Tensor) -> Tensor:
    """The rows to update, as a mixture-of-experts layer gathers an expert's tokens."""
    return (x[:, 0] > 0).nonzero().squeeze(1)


def _positive_rows(x: Tensor) -> Tensor:
    return torch.argwhere(x[:, 0] > 0).squeeze(1)  # 2 in task 0, 5 in task 1 (see _data)


def _boolean_mask(h: Tensor) -> Tensor:
    out = h.clone()
    mask = h > 0
    out[mask] = h[mask] ** 2
    return out


def _weight_gradient(m: nn.Module, h: Tensor) -> Tensor:
    (g,) = torch.autograd.grad(h.pow(2).sum(), m.lin.weight, create_graph=True)
    return h + g.sum()


#: Forwards vmap refuses: the operation after a layer (h: its output, x: the
#: input), and a fragment of vmap's message. Every one runs on a single task.
REFUSED: dict[str, tuple[Op, str]] = {
    "nonzero": (
        lambda m, h, x: h.index_add(0, _nonzero_rows(x), h[_nonzero_rows(x)].tanh()),
        "dynamic shape. attempted to vmap over aten::nonzero",
    ),
    "boolean-mask": (lambda m, h, x: _boolean_mask(h), "indexing with a boolean mask"),
    "masked-select": (
        lambda m, h, x: h + h.masked_select(h > 0).sum(),
        "vmap over `mask` in torch.masked_select",
    ),
    "unique": (lambda m, h, x: h * torch.unique(h.detach() > 0).numel(), "aten::_unique2"),
    "item": (lambda m, h, x: h * h.detach().abs().max().item(), "calling .item()"),
    "control-flow": (
        lambda m, h, x: torch.tanh(h) if bool((h > 0).any()) else h,
        "data-dependent control flow",
    ),
    "inplace-into-unbatched": (
        lambda m, h, x: m.seen.mul_(h.detach().mean(0)) * 0 + h,
        "vmap: inplace arithmetic(self, *extra_args) is not possible",
    ),
    "no-batching-rule": (
        lambda m, h, x: h * (2.0 if torch.equal(h, h) else 1.0),
        "batching rule not implemented for aten::equal",
    ),
    "clone-channels-last": (
        lambda m, h, x: h.view(1, *h.shape, 1).clone(memory_format=torch.channels_last).view_as(h),
        "tensor.clone(memory_format) inside vmap",
    ),
    "contiguous-channels-last": (
        lambda m, h, x: (
            h.view(1, *h.shape, 1).contiguous(memory_format=torch.channels_last).view_as(h)
        ),
        "querying is_contiguous inside of vmap",
    ),
    "data": (lambda m, h, x: h + h.data.abs() * 0, "accessing `data` under vmap transform"),
    "tolist": (lambda m, h, x: h * len(h.detach().sum(1).tolist()), "doesn't have storage"),
    "function-ctx-in-forward": (
        lambda m, h, x: _CtxInForward.apply(h),
        "autograd.function with functorch transforms",
    ),
    "function-without-vmap-rule": (
        lambda m, h, x: _NoVmapRule.apply(h),
        "does not have vmap support",
    ),
    "requires-grad": (
        lambda m, h, x: h + h.detach().requires_grad_() * 0,
        "transformed by a functorch transform",
    ),
    "allclose": (
        lambda m, h, x: h * (2.0 if torch.allclose(h, h) else 1.0),
        "vmap over torch.allclose",
    ),
    "one-hot": (
        lambda m, h, x: h + F.one_hot((x[:, 0] > 1e9).long()).to(h.dtype),
        "when vmap-ing torch.nn.functional.one_hot",
    ),
    "batch-norm-unbatched-statistics": (
        lambda m, h, x: torch.batch_norm(h, None, None, m.seen, m.seen + 1, True, 0.1, 1e-5, False),
        "batch norm got a batched tensor as input",
    ),
    # Messages genuine errors share: the task loop settles them.
    "loop-fallback-varying-shape": (
        lambda m, h, x: h.index_add(0, _positive_rows(x), h[_positive_rows(x)].tanh()),
        "stack expects each tensor to be equal size",
    ),
    "inplace-broadcast-into-unbatched": (
        lambda m, h, x: m.seen.add_(h.detach().mean(0)) * 0 + h,
        "doesn't match the broadcast shape",
    ),
    "autograd-grad-in-forward": (
        lambda m, h, x: _weight_gradient(m, h),
        "does not require grad and does not have a grad_fn",
    ),
}

#: Refusals that cannot take part in a meta-gradient comparison: random
#: (rrelu) or writing gradients of their own (backward() in a forward).
REFUSED_ONLY_CLASSIFIED: dict[str, tuple[Callable[[Tensor], object], str]] = {
    "rrelu": (lambda t: F.rrelu(t, training=True), "vmap: we do not yet support aten::rrelu"),
    "where-one-argument": (lambda t: torch.where(t > 0)[0], "attempted to vmap over aten::where"),
    "no-returns": (
        lambda t: torch._assert_async((t > -1e9).all()),
        "batching rule not implemented for aten::_assert_async",
    ),
    "backward": (
        lambda t: (t * torch.ones(t.shape, requires_grad=True)).sum().backward(),
        "backward() called inside a functorch transform",
    ),
}

#: Genuine errors: they raise in the per-task loop as well.
GENUINE: dict[str, tuple[Op, type[Exception], str]] = {
    "matmul-shapes": (
        lambda m, h, x: h @ torch.ones(3, 3, dtype=h.dtype),
        RuntimeError,
        "size|shape",
    ),
    "dtype": (lambda m, h, x: h @ torch.ones(4, 4, dtype=torch.float32), RuntimeError, "type"),
    "view": (lambda m, h, x: h.view(5, -1), RuntimeError, "invalid for input"),
    "index": (lambda m, h, x: h[:, 9], IndexError, "out of bounds"),
    # vmap words these as it words some refusals: the loop raises them again.
    "stack": (lambda m, h, x: torch.stack([h, h[:1]]), RuntimeError, "equal size"),
    "inplace-broadcast": (lambda m, h, x: h.clone()[0].add_(h), RuntimeError, "broadcast shape"),
    "gradient-of-a-constant": (
        lambda m, h, x: h + torch.autograd.grad(h.detach().sum(), m.lin.weight)[0].sum(),
        RuntimeError,
        "does not require grad",
    ),
}


class Probe(nn.Module):
    def __init__(self, op: Op) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.out = nn.Linear(4, 1)
        self.op = op
        self.seen = torch.ones(4, dtype=torch.float64)  # a tensor attribute, not a buffer

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        return self.out(self.op(self, h, x))


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 7, 3, generator=g, dtype=torch.float64)
    x[..., 0] = x[..., 0].abs()
    x[0, 2:, 0] *= -1  # task 0: 2 rows with a positive first feature; task 1: all 7
    return x, torch.randn(N, 7, 1, generator=g, dtype=torch.float64)


def _model(op: Op) -> Probe:
    torch.manual_seed(0)
    return Probe(op).double()


def _per_task(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for i in range(N):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (f, d):
            for _ in range(STEPS):
                d.step(F.mse_loss(f(x[i]), y[i]))
            F.mse_loss(f(x[i]), y[i]).backward()
    return [p.grad.clone() for p in model.parameters()]


def _batched(
    model: nn.Module, x: Tensor, y: Tensor, checkpoint: bool = False
) -> tuple[list[Tensor], str]:
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with higher.innerloop_ctx(
        model, opt, copy_initial_weights=False, num_tasks=N, checkpoint=checkpoint
    ) as (f, d):
        assert f.task_strategy == "vmap"
        for _ in range(STEPS):
            d.step(lambda: ((f(x) - y) ** 2).mean((1, 2)))
        ((f(x) - y) ** 2).mean((1, 2)).sum().backward()
        strategy = f.task_strategy
    return [p.grad.clone() for p in model.parameters()], strategy


@pytest.mark.parametrize("kind", list(REFUSED))
def test_vmap_refusal_is_recognised(kind):
    op, fragment = REFUSED[kind]
    model = _model(op)
    x, _ = _data()
    with pytest.raises(Exception) as caught:  # which one is checked below
        torch.func.vmap(model)(x)
    assert fragment in str(caught.value).lower(), f"torch words it otherwise: {caught.value}"
    assert vmap_cannot_batch(caught.value)


@pytest.mark.parametrize("kind", list(REFUSED_ONLY_CLASSIFIED))
def test_other_vmap_refusals_are_recognised(kind):
    op, fragment = REFUSED_ONLY_CLASSIFIED[kind]
    with pytest.raises(RuntimeError) as caught:
        torch.func.vmap(op, randomness="different")(torch.randn(N, 5))
    assert fragment in str(caught.value).lower(), f"torch words it otherwise: {caught.value}"
    assert vmap_cannot_batch(caught.value)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["", "checkpoint"])
@pytest.mark.parametrize("kind", list(REFUSED))
def test_forward_vmap_refuses_falls_back_to_the_loop_exactly(kind, checkpoint):
    # Checkpointed, the failed attempt happens inside the first step and its
    # saved tensors must not count: the replay runs the loop alone.
    op, _ = REFUSED[kind]
    x, y = _data()
    want = _per_task(_model(op), x, y)
    with pytest.warns(UserWarning, match=FALLBACK):
        got, strategy = _batched(_model(op), x, y, checkpoint)
    assert strategy == "loop"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", list(GENUINE))
def test_genuine_errors_raise_without_falling_back(kind):
    op, error, match = GENUINE[kind]
    x, y = _data()
    with pytest.raises(error, match=match):
        _per_task(_model(op), x, y)
    model = _model(op)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, num_tasks=N) as (f, _):
        with pytest.raises(error, match=match):  # and no warning: warnings are errors here
            f(x)
        assert f.task_strategy == "vmap"
