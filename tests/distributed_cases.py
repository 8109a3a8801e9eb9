"""Meta-learning under DistributedDataParallel: the per-rank side of test_distributed.py.

Run as ``python distributed_cases.py RANK WORLD_SIZE RENDEZVOUS_FILE OUT_DIR``; each
rank runs every case below, then the example runs of ``distributed_examples.py``,
then a case that breaks the process group on purpose (:func:`mismatch`), and
saves its meta-gradients, communication records and example results to
``OUT_DIR/rank{RANK}.pt``. The parent test computes the single-process
references with :func:`reference_grads` and compares.
"""

from __future__ import annotations

import contextlib
import gc
import pickle
import sys
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

INNER_STEPS = 2
INNER_LR = 0.3


class Net(nn.Module):
    """A small MLP, with BatchNorm (buffers) when ``bn``.

    ``spare`` is a parameter the forward uses only when ``use_spare`` is set
    (find_unused_parameters).
    """

    def __init__(self, spare: bool = False, bn: bool = False) -> None:
        super().__init__()
        norm = [nn.BatchNorm1d(8)] if bn else []
        self.body = nn.Sequential(nn.Linear(3, 8), *norm, nn.Tanh(), nn.Linear(8, 1))
        self.spare = nn.Linear(3, 1) if spare else None
        self.use_spare = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out + self.spare(x) if self.use_spare else out


def make_net(spare: bool = False, bn: bool = False) -> Net:
    torch.manual_seed(0)
    return Net(spare, bn).double()


def tasks(n: int) -> tuple[torch.Tensor, ...]:
    """Support and query sets of ``n`` regression tasks (the global meta-batch)."""
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(2, n, 5, 3, generator=g, dtype=torch.float64)
    w = torch.randn(n, 3, 1, generator=g, dtype=torch.float64)
    return xs, xs @ w, xq, xq @ w


def mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).mean()


def task_mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One mean squared error per task (batched mode)."""
    return ((pred - y) ** 2).mean(dim=(1, 2))


def reference_grads(
    net: nn.Module, n: int, first_order: bool = False, steps: list[int] | None = None
) -> list[torch.Tensor]:
    """Single-process meta-gradient of the mean query loss over ``n`` tasks.

    Task ``t`` takes ``steps[t]`` inner steps (``INNER_STEPS`` each by default).
    Written with ``torch.func.functional_call`` and plain autograd, independent
    of higher. Parameters the loss never reaches get a zero gradient.
    """
    steps = steps or [INNER_STEPS] * n
    names = [k for k, _ in net.named_parameters()]
    theta = [p.detach().clone().requires_grad_() for p in net.parameters()]
    xs, ys, xq, yq = tasks(n)
    total = torch.zeros((), dtype=torch.float64)
    for t in range(n):
        fast = list(theta)
        for _ in range(steps[t]):
            out = torch.func.functional_call(net, dict(zip(names, fast)), (xs[t],))
            grads = torch.autograd.grad(
                mse(out, ys[t]), fast, create_graph=not first_order, allow_unused=True
            )
            fast = [w if g is None else w - INNER_LR * g for w, g in zip(fast, grads)]
        out = torch.func.functional_call(net, dict(zip(names, fast)), (xq[t],))
        total = total + mse(out, yq[t]) / n
    grads = torch.autograd.grad(total, theta, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(theta, grads)]


class CommCounter:
    """A DDP communication hook that counts bucket all-reduces and delegates to torch's."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.last = 0

    # Unannotated: DDP checks a hook's annotations against the real classes.
    def hook(self, state, bucket):  # type: ignore[no-untyped-def]
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.calls.append(bucket.index())
        self.last += bucket.is_last()
        return allreduce_hook(state, bucket)


class CollectiveLog(TorchDispatchMode):
    """Records every collective this process issues, with the phase the test was in.

    Collectives go through the ``c10d`` operators, from Python and from DDP's C++
    reducer alike (its all-reduces run in the backward, on this thread on CPU).
    """

    def __init__(self) -> None:
        super().__init__()
        self.phase = ""
        self.entries: list[tuple[str, str, tuple[tuple[int, ...], ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.namespace == "c10d":
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            shapes = tuple(tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor))
            self.entries.append((self.phase, str(func), shapes))
        return func(*args, **(kwargs or {}))

    def take(self) -> list[tuple[str, str, tuple[tuple[int, ...], ...]]]:
        entries, self.entries = self.entries, []
        return entries


class ReducerProbe:
    """Stands in for ``ddp.reducer``: counts ``prepare_for_backward`` calls and the
    autograd nodes the reducer's unused-parameter search walks from their outputs."""

    def __init__(self, ddp: nn.Module) -> None:
        self.reducer = ddp.reducer
        self.calls = 0
        self.walked = 0
        ddp.reducer = self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reducer, name)

    def prepare_for_backward(self, outputs: list[torch.Tensor]) -> None:
        self.calls += 1
        seen: set[Any] = set()
        queue = [t.grad_fn for t in outputs if t.grad_fn is not None]
        while queue:  # as the reducer's search: every node reachable from the outputs
            for node, _ in queue.pop().next_functions:
                if node is not None and node not in seen:
                    seen.add(node)
                    queue.append(node)
        self.walked += len(seen)
        self.reducer.prepare_for_backward(outputs)


def _maml_task(ddp: nn.Module, opt: Any, t: int, scale: float, **kwargs: Any) -> None:
    import higher

    xs, ys, xq, yq = _DATA
    with higher.innerloop_ctx(ddp, opt, copy_initial_weights=False, **kwargs) as (fmodel, diffopt):
        for _ in range(INNER_STEPS):
            diffopt.step(mse(fmodel(xs[t]), ys[t]))
        (mse(fmodel(xq[t]), yq[t]) * scale).backward()


_DATA: tuple[torch.Tensor, ...] = ()


def _has_init_sync() -> bool:
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    return "init_sync" in inspect.signature(DDP).parameters


def grads_of(module: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


# -- uneven work across ranks ------------------------------------------------------
UNEVEN_TASKS = 5  # split 3 + 2 over two ranks
UNEVEN_STEPS = [1 + t % 3 for t in range(UNEVEN_TASKS)]  # inner steps of task t


def _uneven_task(ddp: nn.Module, opt: Any, t: int, log: CollectiveLog) -> torch.Tensor:
    import higher

    xs, ys, xq, yq = _DATA
    log.phase = "patch"
    with higher.innerloop_ctx(ddp, opt, copy_initial_weights=False) as (fmodel, diffopt):
        log.phase = "inner"
        for _ in range(UNEVEN_STEPS[t]):
            diffopt.step(mse(fmodel(xs[t]), ys[t]))
        log.phase = "query"
        return mse(fmodel(xq[t]), yq[t])


def uneven(rank: int, world: int) -> dict[str, Any]:
    """Ranks with different numbers of tasks and of inner steps, on a net with buffers.

    Three meta-iterations: the query losses summed and one backward, every task
    but the last under ``no_sync``, the sum again. Also records the collectives
    of plain DDP training (one forward, one backward per iteration) on the same
    net for comparison.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    global _DATA
    _DATA = tasks(UNEVEN_TASKS)
    mine = list(range(rank, UNEVEN_TASKS, world))
    weight = world / UNEVEN_TASKS
    ddp = DDP(make_net(bn=True), bucket_cap_mb=1e-4)
    opt = torch.optim.SGD(ddp.parameters(), lr=INNER_LR)
    grads, ours = [], []
    with CollectiveLog() as log:
        for pattern in ("sum", "no_sync", "sum"):
            ddp.zero_grad()
            if pattern == "sum":
                total = sum(_uneven_task(ddp, opt, t, log) * weight for t in mine)
                log.phase = "backward"
                total.backward()  # type: ignore[union-attr]
            for i, t in enumerate(mine if pattern == "no_sync" else []):
                last = i == len(mine) - 1
                with contextlib.nullcontext() if last else ddp.no_sync():
                    loss = _uneven_task(ddp, opt, t, log) * weight
                    log.phase = "backward"
                    loss.backward()
            grads.append(grads_of(ddp))
            ours.append(log.take())

        plain = DDP(make_net(bn=True), bucket_cap_mb=1e-4)
        xs, ys, _, _ = _DATA
        log.take()  # DDP's construction broadcasts the module's state
        plain_log = []
        for _ in range(3):
            log.phase = "patch"
            out = plain(xs[rank])
            log.phase = "backward"
            mse(out, ys[rank]).backward()
            plain_log.append(log.take())
    return {"grads": grads, "collectives": ours, "plain": plain_log}


LONG_UNROLL = 12


def long_unroll(rank: int, world: int) -> dict[int, dict[str, Any]]:
    """find_unused_parameters=True, short and long unrolls: what the reducer walks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import higher

    xs, ys, xq, yq = tasks(world)
    out = {}
    for steps in (INNER_STEPS, LONG_UNROLL):
        ddp = DDP(make_net(spare=True), find_unused_parameters=True)
        probe = ReducerProbe(ddp)
        opt = torch.optim.SGD(ddp.parameters(), lr=INNER_LR)
        with higher.innerloop_ctx(ddp, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(mse(fmodel(xs[rank]), ys[rank]))
            mse(fmodel(xq[rank]), yq[rank]).backward()
        out[steps] = {"grads": grads_of(ddp), "prepares": probe.calls, "walked": probe.walked}
    return out


def checkpointed(rank: int, world: int) -> dict[bool, list[torch.Tensor | None]]:
    """A checkpointed unroll, whose outer backward replays patched forwards."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import higher

    xs, ys, xq, yq = tasks(world)
    out = {}
    for find_unused in (False, True):
        # A parameter the loss never reaches is what find_unused_parameters is for.
        ddp = DDP(make_net(spare=find_unused), find_unused_parameters=find_unused)
        opt = torch.optim.SGD(ddp.parameters(), lr=INNER_LR)
        with higher.innerloop_ctx(ddp, opt, copy_initial_weights=False, checkpoint=True) as (
            fmodel,
            diffopt,
        ):
            for _ in range(INNER_STEPS):
                diffopt.step(lambda: mse(fmodel(xs[rank]), ys[rank]))
            mse(fmodel(xq[rank]), yq[rank]).backward()
        out[find_unused] = grads_of(ddp)
    return out


def _spare_task(ddp: nn.Module, rank: int) -> str:
    """One task on a net with a spare parameter, DDP without find_unused_parameters.

    Returns the error the backward raised ("" when it raised none).
    """
    import higher

    xs, ys, xq, yq = tasks(2)
    opt = torch.optim.SGD(ddp.parameters(), lr=INNER_LR)
    try:
        with higher.innerloop_ctx(ddp, opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step(mse(fmodel(xs[rank]), ys[rank]))
            mse(fmodel(xq[rank]), yq[rank]).backward()
    except RuntimeError as e:
        return str(e)
    return ""


def unused_everywhere(rank: int) -> str:
    """No rank uses the spare parameter: every rank raises, before communicating."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return _spare_task(DDP(make_net(spare=True)), rank)


def mismatch(rank: int) -> str:
    """Only rank 1 uses the spare parameter: the ranks would all-reduce different buckets.

    Rank 0 raises at once and leaves the process group, which makes rank 1's
    waiting all-reduce fail instead of hanging. Run last: it ends the group.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = make_net(spare=True)
    net.use_spare = rank == 1
    error = _spare_task(DDP(net), rank)
    gc.collect()  # the DDP models of all cases hold the group; it closes with the last
    with contextlib.suppress(RuntimeError):
        dist.destroy_process_group()
    return error


def run(rank: int, world: int) -> dict[str, Any]:
    """Every case on this rank; returns what the parent compares."""
    import pytest
    from torch.nn.parallel import DistributedDataParallel as DDP

    import higher

    global _DATA
    out: dict[str, Any] = {}

    # One task per rank, torch's built-in all-reduce.
    _DATA = tasks(world)
    ddp = DDP(make_net())
    opt = torch.optim.SGD(ddp.parameters(), lr=INNER_LR)
    _maml_task(ddp, opt, rank, 1.0)
    out["one_task"] = grads_of(ddp)

    # Three tasks per rank, the first two under no_sync; several buckets, two
    # meta-iterations (DDP rebuilds its buckets after the first), counting
    # all-reduces in the inner loop, under no_sync and in the synced backward.
    per_rank = 3
    _DATA = tasks(world * per_rank)
    ddp = DDP(make_net(), bucket_cap_mb=1e-4)
    counter = CommCounter()
    ddp.register_comm_hook(None, counter.hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=INNER_LR)
    counts = []
    for _ in range(2):
        ddp.zero_grad()
        before = len(counter.calls)
        with ddp.no_sync():
            for i in range(per_rank - 1):
                _maml_task(ddp, opt, rank * per_rank + i, 1 / per_rank)
        silent = len(counter.calls) - before
        counter.last = 0
        xs, ys, xq, yq = _DATA
        t = rank * per_rank + per_rank - 1
        with higher.innerloop_ctx(ddp, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(INNER_STEPS):
                diffopt.step(mse(fmodel(xs[t]), ys[t]))
            inner = len(counter.calls) - before - silent
            calls = len(counter.calls)
            (mse(fmodel(xq[t]), yq[t]) / per_rank).backward()
        outer = counter.calls[calls:]
        counts.append({"no_sync": silent, "inner": inner, "outer": outer, "last": counter.last})
    out["no_sync"] = grads_of(ddp)
    out["counts"] = counts

    # Batched tasks: this rank's three tasks as one inner loop, under both strategies.
    xs, ys, xq, yq = _DATA
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    for strategy in ("vmap", "loop"):
        ddp = DDP(make_net())
        counter = CommCounter()
        ddp.register_comm_hook(None, counter.hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=INNER_LR)
        with higher.innerloop_ctx(ddp, opt, copy_initial_weights=False, num_tasks=per_rank) as (
            fmodel,
            diffopt,
        ):
            fmodel.task_strategy = strategy
            for _ in range(INNER_STEPS):
                diffopt.step(task_mse(fmodel(xs[mine]), ys[mine]))
            inner = len(counter.calls)
            (task_mse(fmodel(xq[mine]), yq[mine]).sum() / per_rank).backward()
        out[f"batched_{strategy}"] = {
            "grads": grads_of(ddp),
            "inner": inner,
            "outer": len(counter.calls) - inner,
        }

    # find_unused_parameters=True with a parameter the loss never reaches.
    _DATA = tasks(world)
    ddp = DDP(make_net(spare=True), find_unused_parameters=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=INNER_LR)
    _maml_task(ddp, opt, rank, 1.0)
    out["unused"] = grads_of(ddp)

    # First-order MAML.
    ddp = DDP(make_net())
    opt = torch.optim.SGD(ddp.parameters(), lr=INNER_LR)
    _maml_task(ddp, opt, rank, 1.0, first_order=True)
    out["first_order"] = grads_of(ddp)

    # make_functional on the DDP model, fast weights passed per call.
    ddp = DDP(make_net())
    fmodel = higher.make_functional(ddp)
    xs, ys, xq, yq = _DATA
    fast = list(ddp.parameters())
    for _ in range(INNER_STEPS):
        loss = mse(fmodel(xs[rank], params=fast), ys[rank])
        grads = torch.autograd.grad(loss, fast, create_graph=True)
        fast = [w - INNER_LR * g for w, g in zip(fast, grads)]
    mse(fmodel(xq[rank], params=fast), yq[rank]).backward()
    out["make_functional"] = grads_of(ddp)

    # reset() onto DDP's parameters arms a patched model built as a local copy.
    ddp = DDP(make_net())
    fmodel = higher.monkeypatch(ddp)
    fmodel.reset(ddp, copy_initial_weights=False)
    fast = fmodel.fast_params
    for _ in range(INNER_STEPS):
        grads = torch.autograd.grad(mse(fmodel(xs[rank]), ys[rank]), fast, create_graph=True)
        fast = [w - INNER_LR * g for w, g in zip(fast, grads)]
        fmodel.update_params(fast)
    mse(fmodel(xq[rank]), yq[rank]).backward()
    out["reset"] = grads_of(ddp)
    with pytest.raises(TypeError, match=r"cannot be pickled; write_back\(\)"):
        pickle.dumps(fmodel)

    # copy_initial_weights=True: a local copy; nothing reaches DDP, nothing is sent.
    ddp = DDP(make_net())
    counter = CommCounter()
    ddp.register_comm_hook(None, counter.hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=INNER_LR)
    with higher.innerloop_ctx(ddp, opt) as (fmodel, diffopt):
        assert isinstance(fmodel, Net)
        diffopt.step(mse(fmodel(xs[rank]), ys[rank]))
        mse(fmodel(xq[rank]), yq[rank]).backward()
    out["copied"] = {"grads": grads_of(ddp), "calls": len(counter.calls)}

    # Buffers: rank 0's are broadcast once when patching, as a DDP forward would;
    # write_back(ddp) writes into the wrapped module.
    bn = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    bn[1].running_mean.fill_(float(rank + 1))
    ddp = DDP(bn, init_sync=False) if _has_init_sync() else DDP(bn)
    fmodel = higher.monkeypatch(ddp, copy_initial_weights=False)
    patched_mean = fmodel[1].running_mean.clone()
    fmodel(xs[rank])
    fmodel.write_back(ddp)
    out["buffers"] = {
        "patched": patched_mean,
        "fmodel": fmodel[1].running_mean.clone(),
        "written": bn[1].running_mean.clone(),
    }

    out["uneven"] = uneven(rank, world)
    out["long_unroll"] = long_unroll(rank, world)
    out["checkpoint"] = checkpointed(rank, world)
    out["unused_everywhere"] = unused_everywhere(rank)

    # What cannot work says so.
    with pytest.raises(ValueError, match=r"static_graph=True is not supported"):
        higher.monkeypatch(DDP(make_net(), static_graph=True), copy_initial_weights=False)
    return out


def main(argv: list[str]) -> None:
    from launch_ranks import run_rank

    def everything(rank: int, world: int, out_dir: str) -> dict:
        import distributed_examples

        result = run(rank, world)
        result["examples"] = distributed_examples.run(out_dir)
        result["mismatch"] = mismatch(rank)
        return result

    run_rank(argv, everything)


if __name__ == "__main__":
    main(sys.argv[1:])
