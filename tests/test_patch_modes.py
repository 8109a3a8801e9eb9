"""Every public method of a patched module behaves the same per task and batched.

Batched mode extends the per-task core, overriding only how a call runs and how
weights and buffers are laid out. These tests drive one batched module and one
per-task module per task through the same sequence of public calls, on a model
with BatchNorm (floating-point and integer buffers), plain and wrapped in
``DistributedDataParallel``, and compare weights and buffers after each call.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import higher

N = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.bn(self.lin(x))))


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net().double()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    return net


@pytest.fixture
def ddp_group(tmp_path):
    """A one-process gloo group, so that models can be wrapped in DDP in this process."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch built without torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(net: nn.Module, ddp: bool) -> nn.Module:
    return nn.parallel.DistributedDataParallel(net) if ddp else net


def check_same(batched, per_task) -> None:
    """Task ``i`` of the batched module equals the ``i``-th per-task module."""
    for i, single in enumerate(per_task):
        for b, s in zip(batched.fast_params, single.fast_params):
            torch.testing.assert_close(b[i], s, rtol=1e-12, atol=1e-12)
        for (name, b), (_, s) in zip(batched.named_buffers(), single.named_buffers()):
            got = b[i] if b.is_floating_point() else b
            torch.testing.assert_close(got, s, rtol=1e-12, atol=1e-12, msg=name)


def step_all(batched, per_task, xs) -> None:
    """The same step for the batched module and for each per-task one; then compare."""
    step(batched, xs)
    for i, f in enumerate(per_task):
        step(f, xs[i])
    check_same(batched, per_task)


def set_tracking(modules, value: bool) -> None:
    for f in modules:
        f.track_higher_grads = value


def step(fmodel, x, lr: float = 0.1) -> None:
    """One SGD step by hand through the public API (update_params)."""
    loss = fmodel(x).pow(2).mean(tuple(range(1, x.dim())) if x.dim() == 3 else None)
    grads = torch.autograd.grad(loss.sum(), fmodel.fast_params, create_graph=True)
    fmodel.update_params([p - lr * g for p, g in zip(fmodel.fast_params, grads)])


@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "ddp"])
def test_every_public_method_in_both_modes(ddp, request):
    if ddp:
        request.getfixturevalue("ddp_group")
    model = wrap(make_net(), ddp)
    xs = torch.randn(N, 8, 4, dtype=torch.float64)
    batched = higher.monkeypatch(model, copy_initial_weights=False, num_tasks=N)
    per_task = [higher.monkeypatch(model, copy_initial_weights=False) for _ in range(N)]
    check_same(batched, per_task)

    # Calls, with and without params=, in train mode (buffers advance).
    step_all(batched, per_task, xs)
    out = batched(xs, params=batched.fast_params)
    for i, f in enumerate(per_task):
        torch.testing.assert_close(out[i], f(xs[i], params=f.fast_params), rtol=1e-12, atol=1e-12)
    check_same(batched, per_task)

    # The history: parameters(time=...), init_fast_params.
    for i, f in enumerate(per_task):
        for b, s in zip(batched.parameters(time=0), f.parameters(time=0)):
            torch.testing.assert_close(b[i], s)
        assert len(list(batched.parameters(time=1))) == len(list(f.parameters(time=1)))
    assert [p.shape[1:] for p in batched.init_fast_params] == [
        p.shape for p in per_task[0].init_fast_params
    ]

    # Test mode, then detach_: same values, no graph.
    set_tracking([batched, *per_task], False)
    step_all(batched, per_task, xs)
    batched.detach_()
    for f in per_task:
        f.detach_()
    assert all(p.grad_fn is None for p in batched.fast_params)
    check_same(batched, per_task)

    # Copies keep everything.
    check_same(copy.deepcopy(batched), [copy.deepcopy(f) for f in per_task])
    if not ddp:  # a DDP-built patched model refuses pickling by design
        check_same(pickle.loads(pickle.dumps(batched)), per_task)

    # write_back, into the DDP wrapper itself when there is one.
    for i, f in enumerate(per_task):
        target_b, target_s = wrap(make_net(), ddp), wrap(make_net(), ddp)
        batched.write_back(target_b, task=i)
        f.write_back(target_s)
        for (name, b), (_, s) in zip(target_b.state_dict().items(), target_s.state_dict().items()):
            torch.testing.assert_close(b, s, rtol=1e-12, atol=1e-12, msg=name)
        # The buffers really moved (the batched DDP path once copied none).
        local = target_b.module if ddp else target_b
        torch.testing.assert_close(local.bn.running_mean, f.bn.running_mean)
        assert not torch.equal(local.bn.running_mean, make_net().bn.running_mean)

    # reset from a module (the DDP wrapper too) and from tensors.
    with torch.no_grad():  # (a DDP model can only be reset onto the DDP model it was built from)
        (model.module if ddp else model).bn.running_mean.add_(3.0)
    batched.reset(model, copy_initial_weights=False)
    for f in per_task:
        f.reset(model, copy_initial_weights=False)
    check_same(batched, per_task)
    torch.testing.assert_close(batched.bn.running_mean[0], per_task[0].bn.running_mean)
    assert torch.equal(
        per_task[0].bn.running_mean, (model.module if ddp else model).bn.running_mean
    )
    set_tracking([batched, *per_task], True)
    step_all(batched, per_task, xs)
    tensors = [p.detach().clone() for p in per_task[0].fast_params]
    batched.reset(tensors)
    for f in per_task:
        f.reset(tensors)
    check_same(batched, per_task)


def test_reset_onto_ddp_arms_both_modes(ddp_group):
    # A local copy reset onto DDP's own parameters must average the meta-gradient:
    # both modes arm the DDP bookkeeping the same way.
    model = wrap(make_net(), True)
    for num_tasks in (None, N):
        fmodel = higher.monkeypatch(make_net(), num_tasks=num_tasks)
        assert fmodel._higher_ddp is None
        fmodel.reset(model, copy_initial_weights=False)
        assert fmodel._higher_ddp.ddp is model


def test_write_back_task_errors():
    batched = higher.monkeypatch(make_net(), num_tasks=N)
    with pytest.raises(ValueError, match=r"needs the task to write: write_back\(module, task=i\)"):
        batched.write_back(make_net())
    with pytest.raises(ValueError, match="task=3 is out of range for num_tasks=3"):
        batched.write_back(make_net(), task=3)
    with pytest.raises(ValueError, match="module has 2 parameters, the patched module 6"):
        batched.write_back(nn.Linear(2, 1), task=0)
