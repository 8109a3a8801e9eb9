"""One outer step of W2 with its meta-batch split over processes (DDP, gloo, CPU).

Two processes with one thread each take two of W2's four tasks each;
DistributedDataParallel averages the meta-gradient in the outer backward. The
reference is one process with two threads doing all four tasks, the same total
work on the same cores. Reported: median step times, the speed-up, and the
all-reduce share measured two ways: the step's extra time over the same step
with every task under ``no_sync`` (what communication costs end to end), and
the time from each bucket's all-reduce launch to its completion, summed (it
overlaps the backward, so it bounds the cost from above).

    python -m benchmarks.distributed [--repeats 7] [--world 2]

``--unroll 10,50,200`` measures instead what ``find_unused_parameters=True``
adds to an outer step as the inner loop grows (W1's MLP, one task per rank,
that many SGD steps): DDP's search for unused parameters, done once per outer
backward over the parameters, should cost the same whatever the unroll.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from .workloads import WORKLOADS, HigherImpl

WORKLOAD = "W2-conv"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _step(workload: str, ddp: Any, opt: Any, tasks: list, total: int, sync: bool) -> None:
    """This rank's share of one outer step; DDP all-reduces in the last backward."""
    import higher

    w = WORKLOADS[workload]
    ddp.zero_grad(set_to_none=True)
    for i, (xs, ys, xq, yq) in enumerate(tasks):
        local = not sync or i < len(tasks) - 1
        with (
            ddp.no_sync() if local else contextlib.nullcontext(),
            higher.innerloop_ctx(ddp, opt, copy_initial_weights=False) as (fmodel, diffopt),
        ):
            for _ in range(w.inner_steps):
                diffopt.step(w.loss_fn(fmodel(xs), ys))
            (w.loss_fn(fmodel(xq), yq) * (ddp.process_group.size() / total)).backward()


def worker(rank: int, world: int, rendezvous: str, out: str, repeats: int, workload: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    w = WORKLOADS[workload]
    torch.manual_seed(0)
    ddp = DistributedDataParallel(w.make_model())
    comm: list[float] = []

    # Unannotated: DDP checks a hook's annotations against the real classes.
    def timed_allreduce(state, bucket):  # type: ignore[no-untyped-def]
        # Averages like DDP's default, and records launch-to-completion time.
        start = time.perf_counter()
        fut = dist.all_reduce(bucket.buffer() / world, async_op=True).get_future()

        def done(f):  # type: ignore[no-untyped-def]
            comm.append(time.perf_counter() - start)
            return f.value()[0]

        return fut.then(done)

    ddp.register_comm_hook(None, timed_allreduce)
    opt = torch.optim.SGD(ddp.parameters(), lr=w.inner_lr)
    all_tasks = w.make_tasks(torch.device("cpu"))
    mine = all_tasks[rank::world]
    times: dict[bool, list[float]] = {True: [], False: []}
    comm_per_step = []
    for sync in (True, False):
        _step(workload, ddp, opt, mine, len(all_tasks), sync)  # warm-up (and DDP's bucket rebuild)
    for r in range(repeats):
        for sync in (True, False) if r % 2 == 0 else (False, True):
            dist.barrier()
            comm.clear()
            start = time.perf_counter()
            _step(workload, ddp, opt, mine, len(all_tasks), sync)
            times[sync].append(time.perf_counter() - start)
            if sync:
                comm_per_step.append(sum(comm))
    _step(workload, ddp, opt, mine, len(all_tasks), True)
    grads = [p.grad.clone() for p in ddp.parameters() if p.grad is not None]
    dist.destroy_process_group()
    torch.save(
        {"sync": times[True], "no_sync": times[False], "comm": comm_per_step, "grads": grads},
        f"{out}/rank{rank}.pt",
    )


UNROLL_WORKLOAD = "W1-sgd1"


def unroll_worker(
    rank: int, world: int, rendezvous: str, out: str, repeats: int, steps: list[int]
) -> None:
    """Times one outer step per unroll length, without and with find_unused_parameters."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import higher

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    w = WORKLOADS[UNROLL_WORKLOAD]
    xs, ys, xq, yq = w.make_tasks(torch.device("cpu"))[rank]
    rows = []
    for k in steps:
        times: dict[bool, list[float]] = {False: [], True: []}
        models = {}
        for find_unused in (False, True):
            torch.manual_seed(0)
            models[find_unused] = DistributedDataParallel(
                w.make_model(), find_unused_parameters=find_unused
            )
        for r in range(repeats + 1):  # the first round warms up
            for find_unused in (False, True) if r % 2 == 0 else (True, False):
                ddp = models[find_unused]
                opt = torch.optim.SGD(ddp.parameters(), lr=w.inner_lr)
                ddp.zero_grad(set_to_none=True)
                dist.barrier()
                start = time.perf_counter()
                with higher.innerloop_ctx(ddp, opt, copy_initial_weights=False) as (f, diffopt):
                    for _ in range(k):
                        diffopt.step(w.loss_fn(f(xs), ys))
                    w.loss_fn(f(xq), yq).backward()
                if r:
                    times[find_unused].append(time.perf_counter() - start)
        rows.append({"steps": k, "plain": times[False], "find_unused": times[True]})
    dist.destroy_process_group()
    torch.save(rows, f"{out}/rank{rank}.pt")


def _launch(mode: str, args: list[str], world: int, timeout_s: float) -> list[Any]:
    """Runs ``python -m benchmarks.distributed MODE RANK WORLD RDV OUT *ARGS`` on each rank.

    Returns what each rank saved to ``OUT/rank{RANK}.pt``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "benchmarks.distributed", mode]
        procs = [
            subprocess.Popen(
                [*cmd, str(r), str(world), f"{tmp}/rdv", tmp, *args],
                cwd=ROOT,
                env=env,
            )
            for r in range(world)
        ]
        try:
            codes = [p.wait(timeout=timeout_s) for p in procs]
        finally:
            for p in procs:
                p.kill()
        if any(codes):
            raise RuntimeError(f"distributed benchmark workers exited with {codes}")
        return [torch.load(f"{tmp}/rank{r}.pt") for r in range(world)]


def unroll_cost(
    steps: Sequence[int], repeats: int, world: int = 2, timeout_s: float = 900
) -> list[dict[str, Any]]:
    """Median outer-step times per unroll length, the slowest rank's, with and without
    ``find_unused_parameters``."""
    ranks = _launch("--unroll-worker", [str(repeats), ",".join(map(str, steps))], world, timeout_s)
    rows = []
    for i, k in enumerate(steps):
        plain = max(statistics.median(r[i]["plain"]) for r in ranks)
        unused = max(statistics.median(r[i]["find_unused"]) for r in ranks)
        rows.append({"steps": k, "plain_s": plain, "find_unused_s": unused})
    return rows


def unroll_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{UNROLL_WORKLOAD}'s model, one task per process, one outer step "
        "(DDP, gloo, 1 thread each):",
        "",
        "| inner steps | step, ms | with find_unused_parameters, ms | difference, ms |",
        "|---|---|---|---|",
    ]
    for row in rows:
        plain, unused = row["plain_s"] * 1e3, row["find_unused_s"] * 1e3
        lines.append(f"| {row['steps']} | {plain:.1f} | {unused:.1f} | {unused - plain:+.1f} |")
    return "\n".join(lines)


def _single_process(
    workload: str, threads: int, repeats: int
) -> tuple[list[float], list[torch.Tensor]]:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = WORKLOADS[workload]
        torch.manual_seed(0)
        impl = HigherImpl(w, w.make_model())
        tasks = w.make_tasks(torch.device("cpu"))
        impl.meta_backward(tasks)
        times = []
        for _ in range(repeats):
            impl.model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            impl.meta_backward(tasks)
            times.append(time.perf_counter() - start)
        return times, [p.grad.clone() for p in impl.model.parameters() if p.grad is not None]
    finally:
        torch.set_num_threads(old)


def distributed_cost(
    repeats: int, world: int = 2, workload: str = WORKLOAD, timeout_s: float = 900
) -> dict[str, Any]:
    """Times an outer step on ``world`` one-thread processes and on one process.

    The one-process reference is timed before and after the distributed run, so
    that a change in the machine's load hits both sides.
    """
    half = max(1, repeats // 2)
    before, _ = _single_process(workload, world, half)
    serial, _ = _single_process(workload, 1, half)
    ranks = _launch("--worker", [str(repeats), workload], world, timeout_s)
    after, ref = _single_process(workload, world, max(1, repeats - half))
    serial += _single_process(workload, 1, max(1, repeats - half))[0]
    single = statistics.median(before + after)
    # Every rank waits for the slowest at the all-reduce: the step takes the max.
    step = max(statistics.median(r["sync"]) for r in ranks)
    local = max(statistics.median(r["no_sync"]) for r in ranks)
    comm = max(statistics.median(r["comm"]) for r in ranks)
    num = sum(float((a - b).norm() ** 2) for a, b in zip(ranks[0]["grads"], ref)) ** 0.5
    den = sum(float(b.norm() ** 2) for b in ref) ** 0.5
    return {
        "workload": workload,
        "world": world,
        "repeats": repeats,
        "single_s": single,
        "serial_s": statistics.median(serial),
        "distributed_s": step,
        "no_sync_s": local,
        "speedup": single / step,
        "allreduce_share": max(step - local, 0.0) / step,
        "allreduce_hook_share": comm / step,
        "rel_grad_error": num / max(den, 1e-30),
    }


def markdown(row: dict[str, Any]) -> str:
    world = row["world"]
    return "\n".join(
        [
            f"{row['workload']}, one outer step, meta-batch split over {world} processes "
            f"(DDP, gloo, 1 thread each) against 1 process with {world} threads:",
            "",
            f"| 1 process, {world} threads, ms | DDP, ms | speed-up "
            "| 1 process, 1 thread, ms | speed-up over it | all-reduce share (vs no_sync) "
            "| all-reduce in flight (hook) | rel. meta-grad error |",
            "|---|---|---|---|---|---|---|---|",
            f"| {row['single_s'] * 1e3:.1f} | {row['distributed_s'] * 1e3:.1f} "
            f"| {row['speedup']:.2f}x | {row['serial_s'] * 1e3:.1f} "
            f"| {row['serial_s'] / row['distributed_s']:.2f}x "
            f"| {100 * row['allreduce_share']:.1f} % "
            f"| {100 * row['allreduce_hook_share']:.1f} % | {row['rel_grad_error']:.1e} |",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.distributed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--workload", default=WORKLOAD)
    parser.add_argument(
        "--unroll",
        help="comma-separated inner-step counts: time find_unused_parameters against them",
    )
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--unroll-worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rank, world, rendezvous, out, repeats, workload = args.worker
        worker(int(rank), int(world), rendezvous, out, int(repeats), workload)
        return 0
    if args.unroll_worker:
        rank, world, rendezvous, out, repeats, steps = args.unroll_worker
        unroll_worker(int(rank), int(world), rendezvous, out, int(repeats), _ints(steps))
        return 0
    if args.unroll:
        print(unroll_markdown(unroll_cost(_ints(args.unroll), args.repeats, args.world)))
        return 0
    print(markdown(distributed_cost(args.repeats, args.world, args.workload)))
    return 0


def _ints(text: str) -> list[int]:
    return [int(k) for k in text.split(",")]


if __name__ == "__main__":
    raise SystemExit(main())
