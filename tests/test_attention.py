"""Attention inside patched modules: kernels with a double backward exactly when needed.

Models call ``F.scaled_dot_product_attention`` themselves (transformers' sdpa
attention, timm's fused attention, user code). Its fused kernels have no double
backward, so a patched module whose forward will be differentiated twice must
run them on the math kernel, and keep the fused kernels everywhere else.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import higher
from higher import _compat

FUSED = "_scaled_dot_product_flash_attention_for_cpu"


class OpSpy(TorchDispatchMode):
    """Records the names of the aten ops that run."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


class SelfAttention(nn.Module):
    """Attention written as model code writes it, with a learned additive bias
    (T5's relative position bias), so the mask requires grad."""

    def __init__(self, dim: int = 8, heads: int = 2, seq: int = 5, bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.bias = nn.Parameter(0.1 * torch.randn(heads, seq, seq)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if self.bias is None else self.bias.unsqueeze(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


def fused_used(fn) -> bool:
    spy = OpSpy()
    with spy:
        fn()
    return FUSED in spy.ops


def test_the_fused_kernel_is_what_plain_pytorch_picks_here():
    # Guards the tests below: they mean something only where torch picks the
    # fused kernel by default.
    model = SelfAttention(bias=False)
    assert fused_used(lambda: model(torch.randn(2, 5, 8)))


@pytest.mark.parametrize(
    "setting, fused",
    [
        ({}, False),
        ({"first_order": True}, True),
        ({"track_higher_grads": False}, True),
    ],
    ids=["second-order", "first-order", "test-mode"],
)
def test_kernel_selection_follows_the_need_for_a_double_backward(setting, fused):
    model = SelfAttention(bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 5, 8)
    flags = _compat.sdp_flags()
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, **setting) as (f, d):
        assert fused_used(lambda: f(x)) is fused
        d.step(f(x).pow(2).mean())
        with torch.no_grad():
            assert fused_used(lambda: f(x))  # no graph at all: fused
    assert _compat.sdp_flags() == flags  # the global flags are left as they were


def test_flags_are_restored_when_the_forward_raises():
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    flags = _compat.sdp_flags()
    fmodel = higher.monkeypatch(Failing())
    with pytest.raises(RuntimeError, match="boom"):
        fmodel(torch.ones(1, 2))
    assert _compat.sdp_flags() == flags


def _meta_gradient_reference(model, x, xq, lr, steps):
    """Hand-written MAML with torch.func.functional_call (math kernel throughout)."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    with _compat.DoubleBackwardKernels():
        fast = params
        for _ in range(steps):
            out = torch.func.functional_call(model, dict(zip(names, fast)), (x,))
            grads = torch.autograd.grad(out.pow(2).mean(), fast, create_graph=True)
            fast = [p - lr * g for p, g in zip(fast, grads)]
        query = torch.func.functional_call(model, dict(zip(names, fast)), (xq,))
        return torch.autograd.grad(query.pow(2).mean(), params)


@pytest.mark.parametrize("mode", ["per-task", "checkpoint", "batched"])
def test_meta_gradient_through_user_attention_with_a_learned_mask(mode):
    torch.manual_seed(0)
    model = SelfAttention().double()
    x, xq = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    lr, steps = 0.3, 2
    reference = _meta_gradient_reference(model, x, xq, lr, steps)

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = 2 if mode == "batched" else None
    xs, xqs = (x, xq) if n is None else (x.expand(n, *x.shape), xq.expand(n, *xq.shape))

    def loss(inputs: torch.Tensor) -> torch.Tensor:
        out = fmodel(inputs)
        return out.pow(2).mean() if n is None else out.pow(2).mean((1, 2, 3))

    with higher.innerloop_ctx(
        model, opt, copy_initial_weights=False, checkpoint=mode == "checkpoint", num_tasks=n
    ) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(lambda: loss(xs))
        meta = torch.autograd.grad(loss(xqs).sum(), list(model.parameters()))
    scale = 1 if n is None else n  # every task is the same task here
    for name, a, b in zip([k for k, _ in model.named_parameters()], meta, reference):
        torch.testing.assert_close(a, scale * b, rtol=1e-9, atol=1e-12, msg=name)


def test_transformer_encoder_layer_fast_path_off_and_exact():
    # nn.TransformerEncoderLayer calls the fused MHA fast path in eval mode
    # without grad; with grad it goes through F.multi_head_attention_forward.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with higher.innerloop_ctx(layer, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).mean())
        fmodel(x).pow(2).mean().backward()
    assert all(p.grad is not None for p in layer.parameters())


# -- RNNs: cuDNN has no double backward ------------------------------------------------
class Recurrent(nn.Module):
    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = kind(3, 4, batch_first=True)
        self.cudnn_seen: list[bool] = []
        self.rnn.register_forward_pre_hook(lambda m, a: self.cudnn_seen.append(cudnn_enabled()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0].sum(-1)


def cudnn_enabled() -> bool:
    return torch.backends.cudnn.enabled


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda k: k.__name__)
@pytest.mark.parametrize(
    "setting, cudnn_on_in_steps",
    [({}, False), ({"first_order": True}, True), ({"track_higher_grads": False}, True)],
    ids=["second-order", "first-order", "test-mode"],
)
def test_cudnn_is_off_exactly_for_forwards_differentiated_twice(kind, setting, cudnn_on_in_steps):
    # A spy on what the RNN sees: on CUDA, cuDNN's RNN kernels have no double
    # backward, so they must be off exactly when one is needed.
    model = Recurrent(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 5, 3)
    assert cudnn_enabled()
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, **setting) as (f, d):
        d.step(f(x).pow(2).mean())
        with torch.no_grad():
            f(x)
        f(x).pow(2).mean().backward()
    assert model.cudnn_seen == [cudnn_on_in_steps, True, cudnn_on_in_steps]
    assert cudnn_enabled()  # restored


def test_flat_weights_warning_is_silenced_selectively():
    message = "RNN module weights are not part of single contiguous chunk of memory"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with _compat.quiet_flat_weights_warning():
            warnings.warn(message, stacklevel=1)
            warnings.warn("something else", stacklevel=1)
        warnings.warn(message, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else", message]
