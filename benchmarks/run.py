"""Runs the benchmark workloads and prints a markdown table.

Usage::

    python -m benchmarks                       # everything, on CUDA when present
    python -m benchmarks --workloads W1,W4 --repeats 11 --json out.json
    python -m benchmarks --smoke               # a fast check that the harness works
    python -m benchmarks --long-unroll         # checkpointed and implicit long inner loops
    python -m benchmarks --batched --workloads W1,W2   # adds the batched-tasks rows

Times are medians of the meta-gradient computation of one outer step (all
tasks' inner loops and the backward into the initial weights); the meta
optimizer's own step is the same for every implementation and left out. The
implementations run interleaved in one process, alternating their order, so
drifts in machine load hit all of them alike. Peak memory is measured in a
fresh subprocess per implementation: resident set size on CPU, CUDA's peak
allocation on GPU, above what the process held before the outer step.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import distributed
from ._measure import median_seconds as _median_seconds
from ._measure import reset_peak_rss as _reset_peak_rss
from ._measure import status_mb as _status_mb
from ._measure import sync as _sync
from .workloads import WORKLOADS, HandwrittenImpl, Impl, Workload, available_impls, batched_impls


def _meta_grads(impl: Impl, tasks: list) -> list[torch.Tensor]:
    impl.model.zero_grad(set_to_none=True)
    impl.meta_backward(tasks)
    # Frozen weights (W5-lora) get no meta-gradient.
    return [p.grad.detach().clone() for p in impl.model.parameters() if p.requires_grad]  # type: ignore[union-attr]


#: Largest relative meta-gradient error accepted, per dtype of the check. In
#: float64 the implementations agree to ~1e-15 on every workload. The most
#: ill-conditioned one, W2, amplifies rounding by up to ~1e5 (float32's 6e-8
#: became 2.8e-3 on one CPU), which bounds float64 near 1e-11: 1e-9 holds on any
#: machine and still refuses any real difference. A float32 check (only for
#: devices without float64) rests on the kernels' reduction order: W2 has been
#: seen at 2.8e-3, 1.6e-4 and 1e-6, so its verdict changes with the machine,
#: the thread count and the torch release.
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4}
TOLERANCE = TOLERANCES[torch.float64]


def cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating-point tensor in it cast to ``dtype``.

    Walks tensors and (nested) tuples, lists and dicts; integer tensors (class
    labels) and everything else are returned unchanged.
    """
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def check_agreement(
    impls: list[Impl], tasks: list, dtype: torch.dtype = torch.float64
) -> dict[str, float]:
    """Relative error of each implementation's meta-gradient against the hand-written one.

    The check runs on ``dtype`` copies of every implementation's model and of
    the tasks (``impl.with_model``, :func:`cast_floats`); the implementations
    themselves, and so their timing, keep their own dtype. In float64 the
    verdict does not depend on the machine: float32 rounding, whose reduction
    order changes with the thread count and the CPU's instruction set, is
    amplified past any fixed tolerance by an ill-conditioned inner loop.

    Args:
        impls: the implementations; one must be a :class:`HandwrittenImpl`.
        tasks: the meta-batch they all differentiate.
        dtype: the floating-point dtype of the check (float64 unless the
            device has none); its tolerance is ``TOLERANCES[dtype]``.

    Returns:
        Each implementation's name mapped to ``|g - g_ref| / |g_ref|`` over all
        parameters' meta-gradients.

    Raises:
        RuntimeError: higher disagrees (other implementations that disagree
            are reported and left out of the timing).
        ValueError: ``dtype`` has no tolerance, or no implementation is the
            hand-written reference.
    """
    if dtype not in TOLERANCES:
        raise ValueError(
            f"check_agreement: no tolerance for dtype {dtype}; use one of "
            f"{', '.join(str(d) for d in TOLERANCES)}"
        )
    if not any(isinstance(i, HandwrittenImpl) for i in impls):
        raise ValueError("check_agreement needs a HandwrittenImpl among impls as the reference")
    copies = [i.with_model(copy.deepcopy(i.model).to(dtype)) for i in impls]
    tasks = cast_floats(tasks, dtype)
    ref = _meta_grads(next(c for c in copies if isinstance(c, HandwrittenImpl)), tasks)
    errors = {}
    for impl in copies:
        try:
            grads = _meta_grads(impl, tasks)
        except (RuntimeError, ValueError):
            if impl.name == "higher":
                raise
            errors[impl.name] = math.inf  # cannot run this workload (vmap over an LSTM)
            continue
        num = sum(float((a - b).norm() ** 2) for a, b in zip(grads, ref)) ** 0.5
        den = sum(float(b.norm() ** 2) for b in ref) ** 0.5
        errors[impl.name] = num / max(den, 1e-30)
        if not errors[impl.name] <= TOLERANCES[dtype] and impl.name == "higher":  # NaN fails too
            raise RuntimeError(
                f"{impl.name}'s meta-gradient differs from the hand-written one in {dtype} "
                f"(relative error {errors[impl.name]:.2e} > {TOLERANCES[dtype]:.0e}); "
                "its timing would be meaningless"
            )
    return errors


def time_impls(
    impls: list[Impl],
    tasks: list,
    repeats: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of each implementation's outer step per round, rounds interleaved (the
    order alternating), after one warm-up each; ``clock`` reads the time."""
    times: dict[str, list[float]] = {i.name: [] for i in impls}
    for impl in impls:  # warm-up
        impl.meta_backward(tasks)
    for r in range(repeats):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            impl.model.zero_grad(set_to_none=True)
            _sync(device)
            start = clock()
            impl.meta_backward(tasks)
            _sync(device)
            times[impl.name].append(clock() - start)
    return times


def probe_memory(workload: str, impl_name: str, device: str) -> float:
    """Peak memory (MB) of one outer step above what the process held before it.

    A first outer step warms up (lazy imports, thread pools, allocator caches);
    the second is measured: CUDA's peak allocation on GPU; on CPU the peak
    resident set size after handing free heap memory back to the OS.
    """
    dev = torch.device(device)
    w = WORKLOADS[workload]
    torch.manual_seed(0)
    model = w.make_model().to(dev)
    impl_type = next(i for i in available_impls() + batched_impls() if i.name == impl_name)
    impl = impl_type(w, model)
    tasks = w.make_tasks(dev)
    impl.meta_backward(tasks)
    model.zero_grad(set_to_none=False)  # keep .grad allocated: not part of the peak
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        impl.meta_backward(tasks)
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    _reset_peak_rss()
    before = _status_mb("VmRSS")
    impl.meta_backward(tasks)
    return _status_mb("VmHWM") - before


def memory_in_subprocess(workload: str, impl_name: str, device: str) -> float | None:
    cmd = [sys.executable, "-m", "benchmarks.run", "--probe", workload, impl_name, device]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    except (subprocess.SubprocessError, OSError):
        return None
    return float(out.stdout.strip().splitlines()[-1])


def resnet18_like() -> nn.Module:
    """A ResNet-18-sized network (11.7M parameters) built without torchvision."""

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        class Basic(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(cout)
                self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(cout)
                self.down = (
                    nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                    if stride != 1 or cin != cout
                    else nn.Identity()
                )

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = torch.relu(self.bn1(self.conv1(x)))
                return torch.relu(self.bn2(self.conv2(out)) + self.down(x))

        return Basic()

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [block(cin, cout, stride), block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    return nn.Sequential(*layers)


def context_cost(device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """Cost of creating a context per task versus resetting one, on a ResNet-18-sized model."""
    import higher

    model = resnet18_like().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n_params = sum(p.numel() for p in model.parameters())

    def create(copy_weights: bool) -> Any:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=copy_weights) as (
            fmodel,
            diffopt,
        ):
            return fmodel, diffopt

    fmodel, diffopt = create(False)

    def reset() -> None:
        fmodel.reset(model, copy_initial_weights=False)
        diffopt.reset_state()

    cases = {
        "innerloop_ctx(copy_initial_weights=False)": lambda: create(False),
        "innerloop_ctx(copy_initial_weights=True)": lambda: create(True),
        "fmodel.reset(model) + diffopt.reset_state()": reset,
    }
    return [
        {"case": label, "params": n_params, "median_ms": 1e3 * _median_seconds(fn, repeats, device)}
        for label, fn in cases.items()
    ]


def forward_cost(device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """Per-call cost of a patched forward against functional_call and the plain module."""
    from torch.func import functional_call

    import higher

    from .workloads import conv_net, mlp

    rows = []
    for label, model, x in (
        ("MLP 1-40-40-1, batch 10", mlp(40)(), torch.randn(10, 1)),
        ("4-block conv net, batch 25", conv_net(), torch.randn(25, 1, 28, 28)),
    ):
        model, x = model.to(device), x.to(device)
        fmodel = higher.monkeypatch(model, copy_initial_weights=False)
        params = dict(model.named_parameters())
        calls = {
            "plain module": lambda m=model, x=x: m(x),
            "higher fmodel": lambda f=fmodel, x=x: f(x),
            "functional_call": lambda m=model, p=params, x=x: functional_call(m, p, (x,)),
        }
        inner = 200 if "MLP" in label else 5
        medians = {
            name: _median_seconds(call, repeats, device, inner) for name, call in calls.items()
        }
        for name, med in medians.items():
            rows.append(
                {
                    "model": label,
                    "call": name,
                    "median_us": 1e6 * med,
                    "ratio": med / medians["functional_call"],
                }
            )
    return rows


def profile(workload: str, device: torch.device, rows: int = 15) -> str:
    """torch.profiler's table of where one outer step of higher spends its time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from .workloads import HigherImpl

    w = WORKLOADS[workload]
    torch.manual_seed(0)
    impl = HigherImpl(w, w.make_model().to(device))
    tasks = w.make_tasks(device)
    impl.meta_backward(tasks)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        impl.meta_backward(tasks)
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def select(spec: str | None) -> list[Workload]:
    if not spec:
        return list(WORKLOADS.values())
    chosen = []
    for token in spec.split(","):
        matches = [w for w in WORKLOADS.values() if w.name == token or token in w.tags]
        if not matches:
            raise SystemExit(
                f"unknown workload '{token}'; choose from {', '.join(WORKLOADS)} or W1..W4"
            )
        chosen += [m for m in matches if m not in chosen]
    return chosen


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    results: list[dict[str, Any]] = []
    check_dtype: torch.dtype = getattr(torch, args.check_dtype)
    timed_dtypes: set[str] = set()
    for w in select(args.workloads):
        torch.manual_seed(0)
        base = w.make_model().to(device)
        kinds = available_impls() + (batched_impls() if args.batched else [])
        impls = [cls(w, copy.deepcopy(base)) for cls in kinds]
        tasks = w.make_tasks(device)
        if args.smoke:
            tasks = tasks[:2]
        errors = check_agreement(impls, tasks, check_dtype)
        agreeing = [i for i in impls if errors[i.name] <= TOLERANCES[check_dtype]]
        timed_dtypes.add(str(next(base.parameters()).dtype).removeprefix("torch."))
        times = time_impls(agreeing, tasks, args.repeats, device)
        ref = statistics.median(times["handwritten"])
        for impl in impls:
            if impl not in agreeing:
                row = {
                    "workload": w.name,
                    "impl": impl.name,
                    "median_s": None,
                    "ratio": None,
                    "peak_mb": None,
                    "rel_grad_error": errors[impl.name],
                    "repeats": 0,
                    "description": w.description,
                }
                results.append(row)
                print(_row(row), flush=True)
                continue
            med = statistics.median(times[impl.name])
            mem = None if args.no_memory else memory_in_subprocess(w.name, impl.name, args.device)
            row = {
                "workload": w.name,
                "description": w.description,
                "impl": impl.name,
                "median_s": med,
                "ratio": med / ref,
                "peak_mb": mem,
                "rel_grad_error": errors[impl.name],
                "repeats": args.repeats,
            }
            results.append(row)
            print(_row(row), flush=True)
    context = [] if args.smoke or args.no_context else context_cost(device, max(3, args.repeats))
    forward = [] if args.smoke or args.no_context else forward_cost(device, max(5, args.repeats))
    skip_ddp = args.smoke or args.no_distributed or not torch.distributed.is_available()
    ddp_row = None if skip_ddp else distributed.distributed_cost(max(3, args.repeats))
    return {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "timed_dtype": ", ".join(sorted(timed_dtypes)),
        "agreement": {"dtype": args.check_dtype, "tolerance": TOLERANCES[check_dtype]},
        "results": results,
        "context": context,
        "forward": forward,
        "distributed": ddp_row,
    }


def _row(r: dict[str, Any]) -> str:
    mem = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
    if r["median_s"] is None and math.isinf(r["rel_grad_error"]):
        timing = "not timed: cannot run | -"
    elif r["median_s"] is None:
        timing = "not timed: meta-gradient disagrees | -"
    else:
        timing = f"{r['median_s'] * 1e3:.2f} | {r['ratio']:.3f}"
    return f"| {r['workload']} | {r['impl']} | {timing} | {mem} | {r['rel_grad_error']:.1e} |"


def markdown(report: dict[str, Any]) -> str:
    agree = report["agreement"]
    lines = [
        f"device: {report['device']}, torch {report['torch']}, {report['threads']} threads",
        "",
        f"Timed in {report['timed_dtype']}; meta-gradients checked against the hand-written "
        f"one in {agree['dtype']} (relative error at most {agree['tolerance']:.0e}).",
        "",
        "| workload | implementation | median ms / outer step | ratio to hand-written | peak MB "
        f"| rel. meta-grad error ({agree['dtype']}) |",
        "|---|---|---|---|---|---|",
        *(_row(r) for r in report["results"]),
    ]
    if report["context"]:
        n = report["context"][0]["params"]
        lines += [
            "",
            f"Context cost on a ResNet-18-sized model ({n / 1e6:.1f}M parameters):",
            "",
            "| operation | median ms |",
            "|---|---|",
            *(f"| {c['case']} | {c['median_ms']:.2f} |" for c in report["context"]),
        ]
    if report.get("forward"):
        lines += [
            "",
            "Forward pass alone (ratio to functional_call on the same module):",
            "",
            "| model | call | median us | ratio |",
            "|---|---|---|---|",
            *(
                f"| {r['model']} | {r['call']} | {r['median_us']:.1f} | {r['ratio']:.2f} |"
                for r in report["forward"]
            ),
        ]
    if report.get("distributed"):
        lines += ["", distributed.markdown(report["distributed"])]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", help="comma-separated names (W1-sgd5) or groups (W1)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny run: 2 tasks, no context cost")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument(
        "--batched",
        action="store_true",
        help="add batched-tasks rows: higher-batched, higher-batched-vmap, handwritten-vmap",
    )
    parser.add_argument(
        "--check-dtype",
        choices=[str(d).removeprefix("torch.") for d in TOLERANCES],
        default="float64",
        help="dtype of the meta-gradient agreement check (float32 only for devices without float64)",
    )
    parser.add_argument(
        "--no-context", action="store_true", help="skip the context-cost and forward-cost tables"
    )
    parser.add_argument(
        "--no-distributed", action="store_true", help="skip the 2-process DDP row (W2)"
    )
    parser.add_argument(
        "--profile", metavar="WORKLOAD", help="print torch.profiler's table for higher and exit"
    )
    parser.add_argument(
        "--probe", nargs=3, metavar=("WORKLOAD", "IMPL", "DEVICE"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--long-unroll",
        action="store_true",
        help="run benchmarks.long_unroll (checkpointed and implicit long inner loops) instead; "
        "the other arguments go to it (python -m benchmarks dispatches it)",
    )
    args = parser.parse_args(argv)
    if args.long_unroll:
        parser.error("--long-unroll is dispatched by python -m benchmarks (benchmarks.__main__)")
    if args.probe:
        print(probe_memory(*args.probe))
        return 0
    if args.profile:
        print(profile(args.profile, torch.device(args.device)))
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    report = run(args)
    print()
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
