"""Long inner loops: peak memory and time of plain, checkpointed and implicit meta-gradients.

Usage::

    python -m benchmarks.long_unroll                 # or: python -m benchmarks --long-unroll
    python -m benchmarks.long_unroll --cases W3-200 --repeats 5
    python -m benchmarks.long_unroll --smoke         # harness check: tiny, no memory

Each case is one task's meta-gradient on the W3 MLP (1-256-256-1, SGD) or the
W2 conv net (4 conv blocks with BatchNorm, 5-way 1-shot, SGD), computed by

* ``plain``: ``diffopt.step(loss)``, the whole unroll kept for the backward;
* ``ckpt-1`` / ``ckpt-k``: ``innerloop_ctx(..., checkpoint=...)`` with one or
  ``k`` steps per recomputed segment; the meta-gradient must equal ``plain``'s;
* ``imaml``: the inner loop with ``track_higher_grads=False`` and a proximal
  term, then :func:`higher.implicit.imaml_grad` (a different meta-gradient:
  iMAML's, so no error is reported against ``plain``).

Times are medians over interleaved repeats; peak memory is measured in a fresh
subprocess per variant, as in :mod:`benchmarks.run`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import higher
from higher.implicit import imaml_grad, proximal_term

from ._measure import reset_peak_rss as _reset_peak_rss
from ._measure import status_mb as _status_mb
from ._measure import sync as _sync
from .workloads import WORKLOADS


@dataclass
class Case:
    name: str
    description: str
    workload: str  # the model, data, loss and inner learning rate come from it
    steps: int
    variants: tuple[str, ...]


CASES = {
    c.name: c
    for c in [
        Case(
            "W3-50",
            "MLP 1-256-256-1, 50 SGD steps",
            "W3-unroll50",
            50,
            ("plain", "ckpt-1", "ckpt-10"),
        ),
        Case(
            "W3-200",
            "MLP 1-256-256-1, 200 SGD steps",
            "W3-unroll200",
            200,
            ("plain", "ckpt-1", "ckpt-10", "ckpt-14"),
        ),
        Case(
            "conv-50",
            "4-block conv net + BatchNorm, 5-way 1-shot, 50 SGD steps",
            "W2-conv",
            50,
            ("plain", "ckpt-1", "ckpt-7"),
        ),
        Case(
            "imaml-10",
            "MLP 1-256-256-1, 10 steps, iMAML (lam=1, 10 CG iterations)",
            "W3-unroll10",
            10,
            ("plain", "imaml"),
        ),
        Case(
            "imaml-100",
            "MLP 1-256-256-1, 100 steps, iMAML (lam=1, 10 CG iterations)",
            "W3-unroll10",
            100,
            ("plain", "imaml"),
        ),
    ]
}
IMAML_LAM = 1.0
#: Fix glibc's mmap threshold in the memory subprocesses (see memory_in_subprocess).
MALLOC_ENV = True


def meta_backward(case: Case, variant: str, model: nn.Module, task: Any) -> dict[str, Any]:
    """Leaves the meta-gradient of one task in ``model``'s ``.grad``; returns solver info."""
    w = WORKLOADS[case.workload]
    xs, ys, xq, yq = task
    opt = torch.optim.SGD(model.parameters(), lr=w.inner_lr)
    if variant == "imaml":
        theta = list(model.parameters())
        with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
            for _ in range(case.steps):
                prox = proximal_term(fmodel.fast_params, theta, IMAML_LAM)
                diffopt.step(w.loss_fn(fmodel(xs), ys) + prox)
            grads, report = imaml_grad(
                lambda p: w.loss_fn(fmodel(xs, params=p), ys),
                lambda p: w.loss_fn(fmodel(xq, params=p), yq),
                fmodel,
                theta,
                IMAML_LAM,
                max_iter=10,
                tol=0.0,
            )
        for p, g in zip(theta, grads):
            p.grad = g if p.grad is None else p.grad + g  # type: ignore[operator]
        return {"cg_iterations": report.iterations, "residual": report.residual}
    checkpoint: bool | int = False if variant == "plain" else int(variant.split("-")[1])
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, checkpoint=checkpoint) as (
        fmodel,
        diffopt,
    ):
        for _ in range(case.steps):
            if checkpoint:
                diffopt.step(lambda: w.loss_fn(fmodel(xs), ys))
            else:
                diffopt.step(w.loss_fn(fmodel(xs), ys))
        w.loss_fn(fmodel(xq), yq).backward()
    return {}


def _setup(case: Case, device: torch.device) -> tuple[nn.Module, Any]:
    w = WORKLOADS[case.workload]
    torch.manual_seed(0)
    model = w.make_model().to(device)
    return model, w.make_tasks(device)[0]


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]


def probe_memory(case_name: str, variant: str, device: str) -> float:
    """Peak memory (MB) of one meta-gradient above what the process held before it."""
    dev = torch.device(device)
    case = CASES[case_name]
    model, task = _setup(case, dev)
    meta_backward(case, variant, model, task)  # warm-up
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        meta_backward(case, variant, model, task)
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    _reset_peak_rss()
    before = _status_mb("VmRSS")
    meta_backward(case, variant, model, task)
    return _status_mb("VmHWM") - before


def memory_in_subprocess(case: str, variant: str, device: str) -> float | None:
    cmd = [sys.executable, "-m", "benchmarks.long_unroll", "--probe", case, variant, device]
    env = dict(os.environ)
    if MALLOC_ENV:
        # glibc raises its mmap threshold as large blocks are freed, after which
        # freed tensors stay in the heap and count in the RSS: a fixed threshold
        # makes the CPU peak follow the bytes actually alive. Same for all variants.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900, env=env)
    except (subprocess.SubprocessError, OSError):
        return None
    return float(out.stdout.strip().splitlines()[-1])


def run_case(case: Case, device: torch.device, repeats: int, memory: bool) -> list[dict[str, Any]]:
    models = {}
    task = None
    for v in case.variants:
        models[v], task = _setup(case, device)
    grads, info = {}, {}
    for v in case.variants:  # warm-up, and the meta-gradients to compare
        models[v].zero_grad(set_to_none=True)
        info[v] = meta_backward(case, v, models[v], task)
        grads[v] = _grads(models[v])
    times: dict[str, list[float]] = {v: [] for v in case.variants}
    for r in range(repeats):
        for v in case.variants if r % 2 == 0 else case.variants[::-1]:
            models[v].zero_grad(set_to_none=True)
            _sync(device)
            start = time.perf_counter()
            meta_backward(case, v, models[v], task)
            _sync(device)
            times[v].append(time.perf_counter() - start)
    ref_time = statistics.median(times["plain"])
    rows = []
    for v in case.variants:
        error = None
        if v != "imaml":
            num = sum(float((a - b).norm() ** 2) for a, b in zip(grads[v], grads["plain"]))
            den = sum(float(b.norm() ** 2) for b in grads["plain"])
            error = (num / max(den, 1e-30)) ** 0.5
        med = statistics.median(times[v])
        rows.append(
            {
                "case": case.name,
                "description": case.description,
                "variant": v,
                "median_s": med,
                "time_ratio": med / ref_time,
                "peak_mb": memory_in_subprocess(case.name, v, str(device)) if memory else None,
                "rel_grad_error": error,
                **info[v],
            }
        )
    plain_mb = rows[0]["peak_mb"]
    for row in rows:
        mb = row["peak_mb"]
        row["memory_ratio"] = None if mb is None or not plain_mb else mb / plain_mb
        print(_row(row), flush=True)
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['case']} | {r['variant']} | {r['median_s'] * 1e3:.1f} | {r['time_ratio']:.2f} | "
        f"{_fmt(r['peak_mb'], '.1f')} | {_fmt(r['memory_ratio'], '.2f')} | "
        f"{_fmt(r['rel_grad_error'], '.1e')} |"
    )


HEADER = [
    "| case | variant | median ms | time / plain | peak MB | memory / plain | rel. meta-grad error vs plain |",
    "|---|---|---|---|---|---|---|",
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.long_unroll", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--smoke", action="store_true", help="5 inner steps, 1 repeat, no memory")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="measure memory with glibc's default (adaptive) mmap threshold",
    )
    parser.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(probe_memory(*args.probe))
        return 0
    global MALLOC_ENV
    MALLOC_ENV = not args.default_malloc
    names = args.cases.split(",") if args.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    device = torch.device(args.device)
    print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("\n".join(HEADER), flush=True)
    rows = []
    for name in names:
        case = CASES[name]
        if args.smoke:
            case = Case(case.name, case.description, case.workload, 5, case.variants)
        repeats = 1 if args.smoke else args.repeats
        rows += run_case(case, device, repeats, memory=not (args.no_memory or args.smoke))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "torch": torch.__version__, "rows": rows}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
