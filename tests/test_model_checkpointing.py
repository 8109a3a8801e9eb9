"""Models that checkpoint inside their own forward have exact meta-gradients.

``torch.utils.checkpoint`` recomputes a block when a backward reaches it, and
the recomputation reads the module's weights at that time. In an unrolled
inner loop the outer backward reaches step ``k``'s blocks when the module holds
the last step's fast weights: without care the meta-gradient is silently wrong
(by up to 60 % per element on the MLP below). A patched module makes each
recomputation see the fast weights of the forward that first ran it, and runs
reentrant checkpoints (which cannot run under an inner step's
``torch.autograd.grad``) as non-reentrant ones. The reference is the same model
with checkpointing off.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import higher

F64 = torch.float64


class Blocky(nn.Module):
    """An MLP whose middle block is checkpointed (``mode`` None: not checkpointed)."""

    def __init__(self, mode: str | None) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.out = nn.Linear(8, 1)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        if self.mode is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.mode == "reentrant")
        return self.out(h)


def make(mode: str | None) -> Blocky:
    torch.manual_seed(0)
    return Blocky(mode).double()


def meta_grads(model: nn.Module, mode: str, steps: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, xq = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    n = 2 if mode.startswith("batched") else None
    if n is not None:
        x, xq = torch.stack([x, 2 * x]), torch.stack([xq, -xq])

    def loss(inputs):
        out = fmodel(inputs).pow(2)
        return out.mean() if n is None else out.mean((1, 2))

    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    with higher.innerloop_ctx(
        model, opt, copy_initial_weights=False, checkpoint=mode == "checkpoint", num_tasks=n
    ) as (fmodel, diffopt):
        if mode == "batched-loop":  # tasks one after another: real recomputation
            fmodel.task_strategy = "loop"
        for _ in range(steps):
            diffopt.step(lambda: loss(x))
        return list(torch.autograd.grad(loss(xq).sum(), params))


@pytest.mark.parametrize("mode", ["per-task", "checkpoint", "batched", "batched-loop"])
@pytest.mark.parametrize("kind", ["non-reentrant", "reentrant"])
def test_checkpointed_block_is_exact(kind, mode):
    expected = meta_grads(make(None), mode)
    if mode == "batched":
        with pytest.warns(UserWarning, match="runs without recomputation"):
            got = meta_grads(make(kind), mode)
    else:
        got = meta_grads(make(kind), mode)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_the_trap_is_real_without_a_patched_module():
    # The same unroll written with torch.func.functional_call by hand: the
    # recomputation reads the module's own weights (the last ones it was given
    # through functional_call are gone), so the result differs from the exact one.
    def by_hand(model: nn.Module) -> list[torch.Tensor]:
        names = [n for n, _ in model.named_parameters()]
        params = list(model.parameters())
        g = torch.Generator().manual_seed(1)
        x, xq = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
        fast = params
        for _ in range(3):
            out = torch.func.functional_call(model, dict(zip(names, fast)), (x,))
            grads = torch.autograd.grad(out.pow(2).mean(), fast, create_graph=True)
            fast = [p - 0.5 * g for p, g in zip(fast, grads)]
        query = torch.func.functional_call(model, dict(zip(names, fast)), (xq,)).pow(2).mean()
        return list(torch.autograd.grad(query, params))

    exact = by_hand(make(None))
    trapped = by_hand(make("non-reentrant"))
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(trapped, exact))
    for a, b in zip(meta_grads(make("non-reentrant"), "per-task"), exact):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_checkpoint_outside_patched_modules_is_untouched():
    # The wrapping of torch.utils.checkpoint is inert outside a patched forward.
    model = make("reentrant")
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    higher.monkeypatch(model)(x).sum().backward()  # wraps the entry points
    out = model(x).sum()
    out.backward()
    with pytest.raises(RuntimeError, match=r"(incompatible|not compatible) with \.grad"):
        torch.autograd.grad(model(x).sum(), x)  # torch's own reentrant refusal, as before


transformers = pytest.importorskip("transformers", reason="transformers is not installed")


@pytest.fixture(autouse=False)
def quiet_transformers():
    transformers.logging.set_verbosity_error()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_transformers_gradient_checkpointing_is_exact(reentrant, quiet_transformers):
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=30, n_positions=8,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    ids = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(0))

    def grads(enable: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).double().train()
        if enable:  # named gradient_checkpointing_enable before transformers 5.x
            enable_checkpointing = getattr(
                model, "activation_checkpointing_enable", model.gradient_checkpointing_enable
            )
            enable_checkpointing({"use_reentrant": reentrant})
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=0.1)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(fmodel(input_ids=ids, labels=ids).loss)
            return list(torch.autograd.grad(fmodel(input_ids=ids, labels=ids).loss, params))

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_the_installed_torch_reaches_the_checkpoint_hook():
    # torch has moved checkpoint()'s internals before (2.14 dispatches to a new
    # _impl with another signature); a torch whose calls bypass the hook would
    # give silently wrong meta-gradients, so the hook is probed when installed.
    model = make("non-reentrant")
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, _):
        fmodel(torch.ones(2, 3, dtype=F64))  # installs the hook
    assert higher._compat.checkpoint_hooked()


def test_a_torch_that_bypasses_the_hook_is_named_in_a_warning(monkeypatch):
    module = torch.utils.checkpoint
    for name in (
        "_checkpoint_without_reentrant_generator_impl",
        "_checkpoint_without_reentrant_generator",
        "CheckpointFunction",
    ):
        if hasattr(module, name):  # put back after the test
            monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(higher._compat.model_checkpoint, "_CHECKPOINT_ENTRIES", {})
    monkeypatch.setattr(higher._compat.model_checkpoint, "checkpoint_hooked", lambda: False)
    with pytest.warns(UserWarning, match="gradient_checkpointing_disable"):
        higher._compat.model_checkpoint._wrap_checkpoint_entries()
