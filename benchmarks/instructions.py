"""W1's per-task path in executed instructions: higher against the plain-tensor floor.

Usage::

    python -m benchmarks.instructions                          # higher and the floor
    python -m benchmarks.instructions --baseline /tmp/old      # + another copy of higher
    python -m benchmarks.instructions --calls 5 --warmup 5     # a quick look

On a shared machine the timed benchmarks (:mod:`benchmarks.floor`) move by
tens of per cent from run to run, more than the differences they are asked
to resolve. Instructions executed do not: this script runs each scenario
under ``valgrind --tool=callgrind`` in one process, with instrumentation off
during imports and counting switched on around the measured calls only
(callgrind's client requests, through a three-function C library compiled
here with ``gcc``), so the counts repeat to a fraction of a per cent.
Instructions are not time (an interpreter's instructions and a kernel's run
at different rates), so report both.

Scenarios, on W1's MLP (1-40-40-1, inner SGD at lr 0.01, 10 points per
task), per call: one task at 1 and at 5 inner steps (``innerloop_ctx``, the
steps, the query loss's backward) against the floor's same task
(:class:`benchmarks.workloads.FloorImpl`'s code); ``monkeypatch``;
``get_diff_optim``; one forward; one step with its loss's forward. Needs
valgrind and gcc; says so and exits with 2 without them.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

_CONTROL_C = r"""
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void cg_zero(void) { CALLGRIND_ZERO_STATS; }
void cg_dump(const char *name) { CALLGRIND_DUMP_STATS_AT(name); }
"""


def scenarios(baseline: str | None) -> dict[str, Callable[[], Any]]:
    """The measured calls, by name (``lib:what``; ``floor:what`` for plain tensor code)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import higher

    from .floor import load_baseline

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xs, ys, xq, yq = (torch.randn(10, 1) for _ in range(4))
    params = list(model.parameters())

    def forward(x: torch.Tensor, w: list[torch.Tensor]) -> torch.Tensor:
        return F.linear(torch.relu(F.linear(torch.relu(F.linear(x, w[0], w[1])), w[2], w[3])), w[4], w[5])  # fmt: skip

    def floor_task(steps: int) -> None:
        fast = params
        for _ in range(steps):
            grads = torch.autograd.grad(F.mse_loss(forward(xs, fast), ys), fast, create_graph=True)
            fast = [torch.add(p, g, alpha=-0.01) for p, g in zip(fast, grads)]
        (F.mse_loss(forward(xq, fast), yq) / 25).backward()

    def floor_step() -> None:
        grads = torch.autograd.grad(F.mse_loss(forward(xs, params), ys), params, create_graph=True)
        [torch.add(p, g, alpha=-0.01) for p, g in zip(params, grads)]

    out: dict[str, Callable[[], Any]] = {
        "floor:task1": lambda: floor_task(1),
        "floor:task5": lambda: floor_task(5),
        "floor:forward": lambda: forward(xs, params),
        "floor:step": floor_step,
    }
    libs = [("higher", higher)]
    if baseline is not None:
        libs.append(("baseline", load_baseline(baseline)))
    for name, lib in libs:

        def task(steps: int, lib: Any = lib) -> None:
            with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(F.mse_loss(fmodel(xs), ys))
                (F.mse_loss(fmodel(xq), yq) / 25).backward()

        fmodel = lib.monkeypatch(model, copy_initial_weights=False)
        diffopt = lib.optim.get_diff_optim(opt, params, fmodel=fmodel)

        def step(fmodel: Any = fmodel, diffopt: Any = diffopt) -> None:
            fmodel.update_params(params)  # every step from the same weights
            diffopt.step(F.mse_loss(fmodel(xs), ys))

        out.update(
            {
                f"{name}:task1": lambda task=task: task(1),
                f"{name}:task5": lambda task=task: task(5),
                f"{name}:patch": lambda lib=lib: lib.monkeypatch(model, copy_initial_weights=False),
                f"{name}:set-up": lambda lib=lib, f=fmodel: lib.optim.get_diff_optim(
                    opt, params, fmodel=f
                ),
                f"{name}:forward": lambda f=fmodel: f(xs),
                f"{name}:step": step,
            }
        )
    return out


def _child(args: argparse.Namespace) -> None:
    """Inside valgrind: warm each scenario up, then count ``--calls`` calls of it."""
    import ctypes

    control = ctypes.CDLL(args.control)
    todo = scenarios(args.baseline)
    control.cg_start()
    for name, fn in todo.items():
        for _ in range(args.warmup):
            fn()
        control.cg_zero()
        for _ in range(args.calls):
            fn()
        control.cg_dump(name.encode())


def _counts(directory: pathlib.Path) -> dict[str, int]:
    """Instructions per dump, by the name each dump was taken with."""
    out = {}
    for path in directory.glob("cg.out*"):
        name = total = None
        for line in path.read_text().splitlines():
            if line.startswith("desc: Trigger: Client Request: "):
                name = line.split(": ", 3)[-1]
            elif line.startswith(("summary:", "totals:")) and total is None:
                total = int(line.split()[1])
        if name is not None and total is not None:
            out[name] = total
    return out


def table(counts: dict[str, float]) -> str:
    """Markdown: instructions per call, and each library's ratio to the floor."""
    libs = sorted({k.split(":")[0] for k in counts} - {"floor"}, key=lambda s: s != "higher")
    rows = ["| per call | floor | " + " | ".join(libs) + " |", "|---" * (2 + len(libs)) + "|"]
    for what in ("task1", "task5", "forward", "step", "patch", "set-up"):
        floor = counts.get(f"floor:{what}")
        cells = [f"{floor / 1e3:,.0f}k" if floor else "-"]
        for lib in libs:
            n = counts.get(f"{lib}:{what}")
            cell = "-" if n is None else f"{n / 1e3:,.0f}k"
            if n is not None and floor:
                cell += f" ({n / floor:.3f}x)"
            cells.append(cell)
        rows.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="also count the higher in DIR/higher")
    parser.add_argument("--calls", type=int, default=20, help="counted calls per scenario")
    parser.add_argument("--warmup", type=int, default=30, help="uncounted calls before them")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--control", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    missing = [tool for tool in ("valgrind", "gcc") if shutil.which(tool) is None]
    if missing:
        print(f"benchmarks.instructions needs {' and '.join(missing)} on PATH", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        (work / "control.c").write_text(_CONTROL_C)
        control = work / "libcontrol.so"
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O1", "-o", str(control), str(work / "control.c")],
            check=True,
        )
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={work}/cg.out.%p",
            sys.executable, "-m", "benchmarks.instructions", "--child",
            f"--control={control}", f"--calls={args.calls}", f"--warmup={args.warmup}",
        ]  # fmt: skip
        if args.baseline:
            command.append(f"--baseline={args.baseline}")
        root = pathlib.Path(__file__).resolve().parents[1]  # this checkout's higher
        path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return done.returncode
        counts = {k: v / args.calls for k, v in _counts(work).items()}
    print(
        f"instructions per call, {args.calls} calls after {args.warmup} warm-up calls, one thread"
    )
    print()
    print(table(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
