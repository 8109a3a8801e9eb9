"""higher's per-task path against the plain-tensor floor (issue 34).

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.floor                 # everything, 5 rounds
    OMP_NUM_THREADS=1 python -m benchmarks.floor --rounds 9 --workloads W1-sgd1,W1-sgd5
    OMP_NUM_THREADS=1 python -m benchmarks.floor --split-only    # per-task overhead only
    OMP_NUM_THREADS=1 python -m benchmarks.floor --baseline /tmp/old  # + a row for the
        # copy of higher in /tmp/old/higher (e.g. ``git archive HEAD~3 higher | tar -x -C /tmp/old``)
    python -m benchmarks.floor --smoke                           # a fast harness check

Three parts, all in one process on one thread (``torch.set_num_threads(1)``):

* **Outer steps.** Each workload's implementations (``floor`` where the
  workload is an SGD MLP, ``higher``, ``handwritten``) run interleaved, the
  order alternating each round, after their meta-gradients were checked
  against the hand-written loop in float64 (:func:`benchmarks.run.check_agreement`).
  Ratios are medians to the floor and to the hand-written ``functional_call`` loop.
  With ``--baseline DIR`` another copy of the library (``DIR/higher``, imported
  as ``higher_baseline``) runs as one more implementation, ``higher-baseline``:
  before and after a change, in the same process and rounds.
* **Patching.** ``monkeypatch`` of a model seen for the first time (cold: a new
  model each call, so nothing of it is cached) and of the same model again
  (warm), on W1's MLP and W2's conv net.
* **Per-task overhead split** on W1's MLP, each phase against what the floor
  does for it: patch (``monkeypatch``), optimizer set-up (``get_diff_optim``),
  forward (``fmodel(x)`` against ``F.linear`` on the list of weights) and step
  (``diffopt.step(loss)`` against ``autograd.grad`` plus the list update, the
  loss's forward excluded from both).

The clock is the thread's CPU time by default (``--clock cpu``): on a machine
shared with other work, wall time counts the time the thread waited for a core.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import higher

from .run import TOLERANCE, check_agreement, time_impls
from .workloads import WORKLOADS, FloorImpl, HandwrittenImpl, HigherImpl, Impl, Workload, mse

DEFAULT_WORKLOADS = "W1-sgd1,W1-sgd5,W2-conv,W4-lstm,W5-sgd1,W5-sgd5"
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.thread_time, "wall": time.perf_counter}


def load_baseline(directory: str) -> Any:
    """The copy of higher in ``directory/higher``, imported as ``higher_baseline``."""
    root = os.path.join(directory, "higher")
    spec = importlib.util.spec_from_file_location(
        "higher_baseline", os.path.join(root, "__init__.py"), submodule_search_locations=[root]
    )
    if spec is None or spec.loader is None:
        raise ValueError(f"--baseline: no package at {root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["higher_baseline"] = module
    spec.loader.exec_module(module)
    return module


class BaselineImpl(HigherImpl):
    """:class:`HigherImpl` on the copy of the library given with ``--baseline``."""

    name = "higher-baseline"
    lib: Any = None

    def meta_backward(self, tasks: list) -> None:
        w, n = self.w, len(tasks)
        for xs, ys, xq, yq in tasks:
            with self.lib.innerloop_ctx(
                self.model, self.inner_opt, copy_initial_weights=False, first_order=w.first_order
            ) as (fmodel, diffopt):
                for _ in range(w.inner_steps):
                    diffopt.step(w.loss_fn(fmodel(xs), ys))
                (w.loss_fn(fmodel(xq), yq) / n).backward()


def outer_steps(w: Workload, rounds: int, clock: Callable[[], float], tasks: int | None) -> dict:
    """Median seconds per outer step of each implementation, and the check's errors."""
    torch.manual_seed(0)
    base = w.make_model()
    all_tasks = w.make_tasks(torch.device("cpu"))
    if tasks is not None:
        all_tasks = all_tasks[:tasks]
    kinds: list[type[Impl]] = [HigherImpl, HandwrittenImpl]
    if BaselineImpl.lib is not None:
        kinds.insert(1, BaselineImpl)
    if FloorImpl.supports(w, base):
        kinds.insert(0, FloorImpl)
    impls = [cls(w, copy.deepcopy(base)) for cls in kinds]
    errors = check_agreement(impls, all_tasks)
    agreeing = [i for i in impls if errors[i.name] <= TOLERANCE]
    times = time_impls(agreeing, all_tasks, rounds, torch.device("cpu"), clock)
    return {
        "median": {k: statistics.median(v) for k, v in times.items()},
        "errors": errors,
    }


def _median_us(fns: dict[str, Callable[[], Any]], rounds: int, inner: int, clock: Any) -> dict:
    """Median microseconds per call of each function, rounds interleaved."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            fn = fns[k]
            start = clock()
            for _ in range(inner):
                fn()
            times[k].append((clock() - start) / inner * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def patch_cost(rounds: int, clock: Any, inner: int) -> dict[str, float]:
    """``monkeypatch`` of a new model (cold) and of the same model again (warm), in us."""
    out = {}
    for name in ("W1-sgd1", "W2-conv"):
        w = WORKLOADS[name]
        models = [w.make_model() for _ in range(rounds * inner + 1)]
        fresh = iter(models)
        same = models[0]
        res = _median_us(
            {
                "cold": lambda it=fresh: higher.monkeypatch(next(it), copy_initial_weights=False),
                "warm": lambda m=same: higher.monkeypatch(m, copy_initial_weights=False),
            },
            rounds,
            inner,
            clock,
        )
        out[f"{name.split('-')[0]} cold"] = res["cold"]
        out[f"{name.split('-')[0]} warm"] = res["warm"]
    return out


def overhead_split(rounds: int, clock: Any, inner: int) -> dict[str, float]:
    """Per-task time of each phase on W1's MLP, higher's and the floor's, in us."""
    w = WORKLOADS["W1-sgd1"]
    torch.manual_seed(0)
    model = w.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=w.inner_lr)
    floor = FloorImpl(w, model)
    xs, ys, _, _ = w.make_tasks(torch.device("cpu"))[0]
    params = list(model.parameters())
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    diffopt = higher.optim.get_diff_optim(opt, params, fmodel=fmodel)
    lr = w.inner_lr
    loss_h = [mse(fmodel(xs), ys)]
    loss_f = [mse(floor.forward(xs, params), ys)]

    def step_h() -> None:
        fmodel._higher_history.clear()  # every step starts from the initial weights
        fmodel._higher_assign(params)
        fmodel._higher_history.append(params)
        diffopt.step(loss_h[0])
        loss_h[0] = mse(fmodel(xs, params=params), ys)  # the next step's loss (not timed apart)

    def step_f() -> None:
        grads = torch.autograd.grad(loss_f[0], params, create_graph=True)
        [torch.add(p, g, alpha=-lr) for p, g in zip(params, grads)]
        loss_f[0] = mse(floor.forward(xs, params), ys)

    def loss_fwd_h() -> None:
        mse(fmodel(xs, params=params), ys)

    def loss_fwd_f() -> None:
        mse(floor.forward(xs, params), ys)

    res = _median_us(
        {
            "patch": lambda: higher.monkeypatch(model, copy_initial_weights=False),
            "optimizer set-up": lambda: higher.optim.get_diff_optim(opt, params, fmodel=fmodel),
            "forward": lambda: fmodel(xs),
            "forward floor": lambda: floor.forward(xs, params),
            "step+loss": step_h,
            "step+loss floor": step_f,
            "loss": loss_fwd_h,
            "loss floor": loss_fwd_f,
        },
        rounds,
        inner,
        clock,
    )
    # The step alone: the step with its next loss, less that loss (same subtraction for both).
    res["step"] = res.pop("step+loss") - res.pop("loss")
    res["step floor"] = res.pop("step+loss floor") - res.pop("loss floor")
    return res


def markdown(results: dict[str, Any], rounds: int, clock: str) -> str:
    lines = [
        f"torch {torch.__version__}, one thread, {rounds} interleaved rounds, clock: {clock}",
        "",
        "| workload | implementation | median ms / outer step | ratio to floor "
        "| ratio to functional_call | rel. meta-grad error (float64) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.get("outer", {}).items():
        med, err = r["median"], r["errors"]
        for impl, t in med.items():
            to_floor = f"{t / med['floor']:.3f}" if "floor" in med else "-"
            lines.append(
                f"| {name} | {impl} | {t * 1e3:.2f} | {to_floor} | "
                f"{t / med['handwritten']:.3f} | {err[impl]:.1e} |"
            )
    if "patch" in results:
        lines += ["", "| monkeypatch | median us |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in results["patch"].items()]
    if "split" in results:
        s = results["split"]
        lines += ["", "| per-task phase (W1 MLP) | higher us | floor us | overhead us |"]
        lines.append("|---|---|---|---|")
        for phase in ("patch", "optimizer set-up", "forward", "step"):
            mine = s[phase]
            theirs = s.get(f"{phase} floor", 0.0)
            lines.append(f"| {phase} | {mine:.1f} | {theirs:.1f} | {mine - theirs:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--inner", type=int, default=200, help="calls per round of a phase")
    parser.add_argument("--split-only", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="W1-sgd1, 2 tasks, 1 round")
    parser.add_argument("--baseline", metavar="DIR", help="also time the higher in DIR/higher")
    parser.add_argument("--no-split", action="store_true", help="skip patch cost and split")
    args = parser.parse_args(argv)
    if args.baseline:
        BaselineImpl.lib = load_baseline(args.baseline)
    torch.set_num_threads(1)
    clock = CLOCKS[args.clock]
    results: dict[str, Any] = {}
    names = [] if args.split_only else args.workloads.split(",")
    tasks = None
    if args.smoke:
        names, tasks, args.rounds, args.inner = ["W1-sgd1"], 2, 1, 2
    results["outer"] = {
        name: outer_steps(WORKLOADS[name], args.rounds, clock, tasks)
        for name in names
        if name in WORKLOADS
    }
    if not args.no_split:
        results["patch"] = patch_cost(args.rounds, clock, max(1, args.inner // 10))
        results["split"] = overhead_split(args.rounds, clock, args.inner)
    print(markdown(results, args.rounds, args.clock))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
