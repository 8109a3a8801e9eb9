"""Per-rank memory of one outer step with sharded fast weights (FSDP2) against DDP.

One MAML outer step (``--steps`` inner Adam steps, then the outer backward) on
a deep MLP of wide layers in float32 with a small batch, so that weights and
optimizer state dominate, run as:

* ``single``: one process, the plain model;
* ``ddp``: the model wrapped in ``DistributedDataParallel`` on 1, 2 and 4
  ranks (every rank holds whole fast weights);
* ``fsdp``: the model sharded with ``fully_shard`` (each layer and the root)
  on 1, 2 and 4 ranks (every rank holds its shards).

Reported per rank: the bytes of the fast weights and the inner optimizer's
state held at the end of the inner loop (one set: the history keeps one per
step), the peak of tensor storage allocated during the step and alive at once,
and the median wall time of a step. The peak is tracked at the dispatcher: a
``TorchDispatchMode`` notes every storage an operation creates and drops it
when Python frees it; it counts every tensor autograd saves or makes, is exact
and repeatable, and excludes the model's own parameters and the data. (RSS on
CPU moves with the allocator's caching and the other processes of a shared
machine, and the dispatch mode slows the step, so time is measured without it.)

    python -m benchmarks.fsdp_memory [--width 512] [--depth 8] [--steps 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 2**20


class StoragePeak(TorchDispatchMode):
    """The most bytes of storage created under this mode and alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0
        self._refs: list[Any] = []

    def _note(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # no valid storage (a DTensor's wrapper)
            return
        if ptr == 0 or ptr in self.live:
            return
        size = storage.nbytes()
        self.live[ptr] = size
        self.now += size
        self.peak = max(self.peak, self.now)
        self._refs.append(weakref.ref(storage, lambda _, p=ptr: self._free(p)))

    def _free(self, ptr: int) -> None:
        size = self.live.pop(ptr, 0)
        self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_sparse:
                self._note(t)
        return out


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def outer_step(model: nn.Module, data: tuple[torch.Tensor, ...], steps: int) -> int:
    """One MAML outer step; returns the bytes of fast weights and state after the inner loop."""
    import higher

    xs, ys, xq, yq = data
    model.zero_grad(set_to_none=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.mse_loss(fmodel(xs), ys))
        held = sum(p.numel() * p.element_size() for p in fmodel.fast_params)
        for state in diffopt.state:
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    held += v.numel() * v.element_size()
        F.mse_loss(fmodel(xq), yq).backward()
    return held


def worker(rank: int, world: int, rendezvous: str, out: str, mode: str, args: Any) -> None:
    torch.set_num_threads(1)
    model = make_model(args.width, args.depth)
    if mode != "single":
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world
        )
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(rank)
    data = tuple(torch.randn(args.batch, args.width, generator=g) for _ in range(4))
    outer_step(model, data, args.steps)  # warm-up
    probe = StoragePeak()
    with probe:
        held = outer_step(model, data, args.steps)
    del probe._refs
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outer_step(model, data, args.steps)
        times.append(time.perf_counter() - start)
    result = {"held": held, "peak": probe.peak, "time": statistics.median(times)}
    with open(f"{out}/{mode}{world}-{rank}.json", "w") as f:
        json.dump(result, f)
    if mode != "single":
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def run(mode: str, world: int, args: Any, tmp: str) -> list[dict[str, float]]:
    rendezvous = os.path.join(tmp, f"rdv-{mode}{world}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    flags = [f"--{k}={v}" for k, v in vars(args).items() if k != "worker"]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.fsdp_memory",
                *flags,
                "--worker",
                f"{r},{world},{rendezvous},{tmp},{mode}",
            ],
            env=env,
            cwd=ROOT,
        )
        for r in range(world)
    ]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise RuntimeError(f"{mode} on {world} ranks failed")
    out = []
    for r in range(world):
        with open(f"{tmp}/{mode}{world}-{r}.json") as f:
            out.append(json.load(f))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rank, world, rendezvous, out, mode = args.worker.split(",")
        worker(int(rank), int(world), rendezvous, out, mode, args)
        return
    params = args.depth * (args.width * args.width + args.width)
    print(
        f"{args.depth} x Linear({args.width}, {args.width}), {params / 1e6:.2f} M float32 "
        f"parameters ({params * 4 / MB:.1f} MB), batch {args.batch}, {args.steps} inner "
        "Adam steps + outer backward; per rank (max over ranks)\n"
    )
    print("| run | ranks | fast weights + Adam state (MB) | peak step allocations (MB) | s/step |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mode, world in [("single", 1), *((m, w) for m in ("ddp", "fsdp") for w in (1, 2, 4))]:
            ranks = run(mode, world, args, tmp)
            held = max(r["held"] for r in ranks) / MB
            peak = max(r["peak"] for r in ranks) / MB
            step = statistics.median(r["time"] for r in ranks)
            print(f"| {mode} | {world} | {held:.1f} | {peak:.1f} | {step:.3f} |", flush=True)


if __name__ == "__main__":
    main()
