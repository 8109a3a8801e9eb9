"""The outer step of ``higher.learn2learn.MAML`` against learn2learn's, a hand-written loop and
``innerloop_ctx``.

Usage (learn2learn 0.2.0 installs only on Python <= 3.10; higher is pure Python, so both
import in its environment)::

    L2L=$(../shared/learn2learn/venv.sh)   # a Python 3.10 venv with learn2learn
    OMP_NUM_THREADS=1 PYTHONPATH=. $L2L -m benchmarks.learn2learn --repeats 21
    ... --clock cpu                            # CPU time: on a machine shared with other work
    python -m benchmarks.learn2learn --smoke   # without learn2learn: its column is left out

Rows: W1 (MAML on sinusoids, :mod:`benchmarks.workloads`) at 1 and 5 SGD steps,
and an Omniglot-shaped MAML (the 4-block conv net with BatchNorm of W2 on 28x28
images, 5-way 1-shot, one query per class, meta-batch 32, one step at lr 0.4:
learn2learn's own ``maml_omniglot`` example). Each implementation computes the
meta-gradient of one outer step written as its users write it:

* ``higher.learn2learn``: ``learner = maml.clone()``, ``learner.adapt(loss)``;
* ``learn2learn``: the same program with ``import learn2learn as l2l``;
* ``innerloop_ctx``: higher's own API (``benchmarks.workloads.HigherImpl``);
* ``handwritten``: ``torch.func.functional_call`` and ``torch.autograd.grad``,
  the reference of every ratio.

Before timing, every meta-gradient is compared with the hand-written one on
float64 copies (relative error at most 1e-9, or the implementation is not
timed). Times are medians over interleaved rounds on one thread, of wall time or
(``--clock cpu``) of the process's CPU time.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .run import check_agreement, time_impls
from .workloads import (
    WORKLOADS,
    HandwrittenImpl,
    HigherImpl,
    Impl,
    Workload,
    conv_net,
    fewshot_tasks,
)

OMNIGLOT = Workload(
    "omniglot-conv",
    "MAML 5-way 1-shot, 4-block conv net + BatchNorm on 28x28, meta-batch 32, 1 SGD step",
    conv_net,
    fewshot_tasks(32, 5, 1, 1),
    nn.functional.cross_entropy,
    "sgd",
    0.4,
    1,
)
ROWS = {"W1-sgd1": WORKLOADS["W1-sgd1"], "W1-sgd5": WORKLOADS["W1-sgd5"], OMNIGLOT.name: OMNIGLOT}


class _ClonesImpl(Impl):
    """The learn2learn way: a ``MAML`` wrapper, one ``clone()`` per task, ``adapt()`` steps."""

    library = ""

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        super().__init__(workload, model)
        l2l: Any = importlib.import_module(self.library)
        self.maml = l2l.algorithms.MAML(
            model, lr=workload.inner_lr, first_order=workload.first_order
        )

    def meta_backward(self, tasks: list[Any]) -> None:
        w, n = self.w, len(tasks)
        for xs, ys, xq, yq in tasks:
            learner = self.maml.clone()
            for _ in range(w.inner_steps):
                learner.adapt(w.loss_fn(learner(xs), ys))
            (w.loss_fn(learner(xq), yq) / n).backward()


class HigherL2LImpl(_ClonesImpl):
    name = "higher.learn2learn"
    library = "higher.learn2learn"


class L2LImpl(_ClonesImpl):
    name = "learn2learn"
    library = "learn2learn"


class InnerloopImpl(HigherImpl):
    name = "innerloop_ctx"


def has_learn2learn() -> bool:
    """Whether the real learn2learn imports here (it needs Python <= 3.10)."""
    if importlib.util.find_spec("learn2learn") is None:
        return False
    try:
        importlib.import_module("learn2learn")
    except Exception:  # a broken install (a missing dependency) counts as absent
        return False
    return True


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(
    impls: list[Impl], tasks: list[Any], repeats: int, clock: str
) -> dict[str, float]:
    """Median seconds of each implementation's outer step, rounds interleaved (order alternating).

    ``clock="cpu"`` counts this process's CPU time instead of wall time: on a
    machine shared with other work (more runnable threads than cores), wall
    time mostly measures waiting for a core, CPU time the work itself.
    """
    times = time_impls(impls, tasks, repeats, torch.device("cpu"), clock=CLOCKS[clock])
    return {k: statistics.median(v) for k, v in times.items()}


def measure(
    workload: Workload,
    repeats: int,
    with_l2l: bool,
    num_tasks: int | None = None,
    clock: str = "wall",
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = workload.make_model()
    kinds: list[type[Impl]] = [HandwrittenImpl, HigherL2LImpl, InnerloopImpl]
    if with_l2l:
        kinds.append(L2LImpl)
    impls = [k(workload, copy.deepcopy(model)) for k in kinds]
    tasks = workload.make_tasks(torch.device("cpu"))[:num_tasks]
    errors = check_agreement(impls, tasks)
    timed = [i for i in impls if errors[i.name] <= 1e-9]
    times = time_interleaved(timed, tasks, repeats, clock)
    base = times["handwritten"]
    l2l = times.get("learn2learn")
    rows = []
    for impl in impls:
        t = times.get(impl.name)
        rows.append(
            {
                "workload": workload.name,
                "impl": impl.name,
                "ms": None if t is None else 1e3 * t,
                "vs_handwritten": None if t is None else t / base,
                "vs_learn2learn": None if t is None or l2l is None else t / l2l,
                "error": errors[impl.name],
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        "| workload | implementation | ms | x hand-written | x learn2learn | float64 error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['impl']} | {num(r['ms'], '.2f')} | "
            f"{num(r['vs_handwritten'], '.3f')} | {num(r['vs_learn2learn'], '.3f')} | "
            f"{r['error']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or this process's CPU time (on a machine shared with other work)",
    )
    parser.add_argument("--smoke", action="store_true", help="a quick check of the harness")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with_l2l = has_learn2learn()
    names = ["W1-sgd1"] if args.smoke else args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    repeats = 1 if args.smoke else args.repeats
    num_tasks = 3 if args.smoke else None  # the smoke run checks the harness, not the times
    rows = [r for n in names for r in measure(ROWS[n], repeats, with_l2l, num_tasks, args.clock)]
    print(
        f"torch {torch.__version__}, Python {sys.version.split()[0]}, 1 thread, "
        f"learn2learn {'present' if with_l2l else 'absent (its column is left out)'}, "
        f"medians of {repeats} interleaved rounds, {args.clock} clock\n"
    )
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
