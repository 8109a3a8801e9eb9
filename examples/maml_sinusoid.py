"""Few-shot sinusoid regression with MAML, first-order MAML, Reptile or Meta-SGD.

The standard benchmark of Finn et al. (2017): each task is a sine wave with
amplitude in [0.1, 5.0] and phase in [0, pi] on x in [-5, 5]; a learner sees
K points of a new task, takes a few SGD steps and is scored on fresh points
of the same wave. An MLP 1-40-40-1 with ReLU is meta-trained so that those
few steps go far.

    python examples/maml_sinusoid.py                          # MAML, 10-shot, a few minutes
    python examples/maml_sinusoid.py --algorithm meta-sgd     # learned per-parameter inner lrs
    python examples/maml_sinusoid.py --iterations 70000       # the paper's budget
    python examples/maml_sinusoid.py --per-task-loop          # tasks one by one, not batched
    torchrun --nproc-per-node 2 examples/maml_sinusoid.py     # meta-batch split over 2 processes

It prints the mean squared error after adaptation on held-out tasks with a 95 %
confidence interval, next to a baseline pretrained on all tasks at once and
adapted the same way, and saves a plot of a few test tasks.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import higher

try:
    from . import _common
except ImportError:  # run as a script
    import _common  # type: ignore[no-redef]

ALGORITHMS = ("maml", "fomaml", "reptile", "meta-sgd")


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def sample_tasks(
    n: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Amplitudes and phases of ``n`` sinusoid tasks."""
    amp = 0.1 + 4.9 * torch.rand(n, generator=generator)
    phase = math.pi * torch.rand(n, generator=generator)
    return amp, phase


def sample_points(
    amp: torch.Tensor, phase: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` points of each task: x of shape (tasks, k, 1) and its y."""
    x = torch.rand(len(amp), k, 1, generator=generator) * 10 - 5
    return x, amp[:, None, None] * torch.sin(x - phase[:, None, None])


def mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).mean()


def adapt(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float | list[torch.Tensor],
    track: bool,
    first_order: bool = False,
    num_tasks: int | None = None,
) -> Any:
    """Fine-tunes a patched copy of ``model`` on (x, y); returns the patched copy.

    ``lr`` is a number, or one tensor per parameter (Meta-SGD). With
    ``num_tasks`` all tasks adapt at once (batched mode): x and y have a
    leading task dimension.
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr if isinstance(lr, float) else 0.0)
    override = None if isinstance(lr, float) else {"lr": [lr]}
    with higher.innerloop_ctx(
        model,
        opt,
        copy_initial_weights=False,
        track_higher_grads=track,
        first_order=first_order,
        override=override,
        num_tasks=num_tasks,
    ) as (fmodel, diffopt):
        loss = mse if num_tasks is None else task_mse
        for _ in range(steps):
            diffopt.step(loss(fmodel(x), y))
    return fmodel


def task_mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One mean squared error per task, for tensors of shape (tasks, k, 1)."""
    return ((pred - y) ** 2).mean(dim=(1, 2))


def meta_step_batched(
    model: nn.Module,
    learner: nn.Module,
    lrs: list[torch.Tensor] | None,
    data: tuple[torch.Tensor, ...],
    args: argparse.Namespace,
) -> float:
    """Accumulates the meta-gradient of all tasks at once; returns the summed query loss.

    ``learner`` is ``model``, or its DDP wrapper under torchrun.
    """
    xs, ys, xq, yq = data
    n, weight = len(xs), _common.task_weight(args.meta_batch)
    if args.algorithm == "reptile":
        fmodel = adapt(model, xs, ys, args.inner_steps, args.inner_lr, False, num_tasks=n)
        for p, q in zip(model.parameters(), fmodel.fast_params):
            delta = (p.detach() - q.detach()).sum(0) * weight
            p.grad = delta if p.grad is None else p.grad + delta
        with torch.no_grad():
            return task_mse(fmodel(xq), yq).sum().item()
    lr = lrs if lrs is not None else args.inner_lr
    first_order = args.algorithm == "fomaml"
    fmodel = adapt(learner, xs, ys, args.inner_steps, lr, True, first_order, num_tasks=n)
    losses = task_mse(fmodel(xq), yq)
    (losses.sum() * weight).backward()
    return losses.sum().item()


def meta_train(
    args: argparse.Namespace, device: torch.device
) -> tuple[nn.Module, Any, list[float]]:
    model = make_model().to(device)
    learner = _common.data_parallel(model, device)  # DDP under torchrun
    lrs: list[torch.Tensor] | None = None
    meta_params = list(model.parameters())
    if args.algorithm == "meta-sgd":
        # Meta-SGD draws its initial per-parameter learning rates from [0.005, 0.1].
        lrs = [(0.005 + 0.095 * torch.rand_like(p)).requires_grad_() for p in model.parameters()]
        meta_params += lrs
    meta_opt = torch.optim.Adam(meta_params, lr=args.meta_lr)
    curve = []
    bar = _common.progress(range(args.iterations), args.progress, desc=args.algorithm)
    for it in bar:
        amp, phase = sample_tasks(args.meta_batch)
        xs, ys = (t.to(device) for t in sample_points(amp, phase, args.shots))
        xq, yq = (t.to(device) for t in sample_points(amp, phase, args.shots))
        meta_opt.zero_grad()
        total = 0.0
        if not args.per_task_loop:  # this rank's share of the meta-batch as one inner loop
            mine = _common.my_indices(args.meta_batch)
            data = (xs[mine], ys[mine], xq[mine], yq[mine])
            total = meta_step_batched(model, learner, lrs, data, args)
        for i in _common.my_share(range(args.meta_batch), learner) if args.per_task_loop else ():
            if args.algorithm == "reptile":
                fmodel = adapt(model, xs[i], ys[i], args.inner_steps, args.inner_lr, track=False)
                # Reptile's meta-gradient: the step from the initial to the adapted weights.
                for p, q in zip(model.parameters(), fmodel.fast_params):
                    delta = (p.detach() - q.detach()) * _common.task_weight(args.meta_batch)
                    p.grad = delta if p.grad is None else p.grad + delta
                with torch.no_grad():
                    total += mse(fmodel(xq[i]), yq[i]).item()
                continue
            fmodel = adapt(
                learner,
                xs[i],
                ys[i],
                args.inner_steps,
                lrs if lrs is not None else args.inner_lr,
                track=True,
                first_order=args.algorithm == "fomaml",
            )
            loss = mse(fmodel(xq[i]), yq[i])
            (loss * _common.task_weight(args.meta_batch)).backward()
            total += loss.item()
        _common.average_grads(model.parameters() if args.algorithm == "reptile" else lrs or [])
        meta_opt.step()
        curve.append(_common.global_sum(total)[0] / args.meta_batch)
        if args.progress and it % 50 == 0 and hasattr(bar, "set_postfix"):
            bar.set_postfix(query_mse=f"{sum(curve[-50:]) / len(curve[-50:]):.3f}")
    return model, lrs, curve


def pretrain_baseline(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The same network trained on all tasks pooled, with no meta-learning."""
    model = make_model().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.meta_lr)
    steps = args.baseline_iterations if args.baseline_iterations is not None else args.iterations
    for _ in _common.progress(range(steps), args.progress, desc="baseline"):
        amp, phase = sample_tasks(args.meta_batch)
        x, y = (t.to(device) for t in sample_points(amp, phase, args.shots))
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    return model


def evaluate(
    model: nn.Module,
    lrs: list[torch.Tensor] | None,
    args: argparse.Namespace,
    device: torch.device,
) -> list[float]:
    """Post-adaptation MSE on held-out tasks (a fixed seed, apart from training's)."""
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    amp, phase = sample_tasks(args.eval_tasks, gen)
    xs, ys = (t.to(device) for t in sample_points(amp, phase, args.shots, gen))
    xq, yq = (t.to(device) for t in sample_points(amp, phase, 100, gen))
    lr = [t.detach() for t in lrs] if lrs is not None else args.inner_lr
    if not args.per_task_loop:  # every held-out task at once
        fmodel = adapt(model, xs, ys, args.eval_steps, lr, track=False, num_tasks=len(xs))
        with torch.no_grad():
            return task_mse(fmodel(xq), yq).tolist()
    errors = []
    for i in range(args.eval_tasks):
        fmodel = adapt(model, xs[i], ys[i], args.eval_steps, lr, track=False)
        with torch.no_grad():
            errors.append(mse(fmodel(xq[i]), yq[i]).item())
    return errors


def plot(model, lrs, baseline, args, device, path: str) -> str:
    plt = _common.pyplot()
    gen = torch.Generator().manual_seed(20_000 + args.seed)
    amp, phase = sample_tasks(4, gen)
    xs, ys = (t.to(device) for t in sample_points(amp, phase, args.shots, gen))
    grid = torch.linspace(-5, 5, 200, device=device)[:, None]
    lr = [t.detach() for t in lrs] if lrs is not None else args.inner_lr
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for i, ax in enumerate(axes.flat):
        adapted = adapt(model, xs[i], ys[i], args.eval_steps, lr, track=False)
        adapted_base = adapt(baseline, xs[i], ys[i], args.eval_steps, args.inner_lr, track=False)
        with torch.no_grad():
            truth = amp[i] * torch.sin(grid.cpu() - phase[i])
            ax.plot(grid.cpu(), truth, "k-", lw=2, label="truth")
            ax.plot(grid.cpu(), model(grid).cpu(), "C0--", label="meta-learned init")
            ax.plot(
                grid.cpu(), adapted(grid).cpu(), "C0-", label=f"after {args.eval_steps} step(s)"
            )
            ax.plot(
                grid.cpu(), adapted_base(grid).cpu(), "C3:", label="pretrained baseline, adapted"
            )
            ax.scatter(
                xs[i].cpu(), ys[i].cpu(), c="C1", zorder=3, label=f"{args.shots} support points"
            )
        ax.set_title(f"amplitude {amp[i]:.2f}, phase {phase[i]:.2f}")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{args.algorithm}, {args.shots}-shot sinusoid regression")
    return _common.save_figure(fig, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithm", choices=ALGORITHMS, default="maml")
    p.add_argument(
        "--shots", type=int, default=10, help="K: support (and training query) points per task"
    )
    p.add_argument(
        "--inner-steps", type=int, default=1, help="inner SGD steps during meta-training"
    )
    p.add_argument(
        "--eval-steps", type=int, help="adaptation steps at test time (default: --inner-steps)"
    )
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--meta-lr", type=float, default=0.001)
    p.add_argument("--meta-batch", type=int, default=25, help="tasks per meta-update")
    p.add_argument("--iterations", type=int, default=6000, help="meta-updates")
    p.add_argument(
        "--baseline-iterations", type=int, help="baseline updates (default: --iterations)"
    )
    p.add_argument("--eval-tasks", type=int, default=1000, help="held-out tasks to evaluate on")
    p.add_argument("--device", default=_common.default_device())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="out/maml_sinusoid.png", help="where to save the figure")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )
    p.add_argument(
        "--per-task-loop",
        action="store_true",
        help="adapt to one task after another instead of all tasks at once (batched mode)",
    )
    args = p.parse_args(argv)
    if args.eval_steps is None:
        args.eval_steps = args.inner_steps
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    _common.require("matplotlib")
    _common.seed_everything(args.seed)
    device = _common.setup_distributed(torch.device(args.device))
    args.progress = args.progress and _common.is_main()
    start = time.perf_counter()
    model, lrs, curve = meta_train(args, device)
    if not _common.end_distributed():  # under torchrun, rank 0 evaluates, prints and plots
        return {"train_curve": curve, "model": model}
    baseline = pretrain_baseline(args, device)
    errors = evaluate(model, lrs, args, device)
    base_errors = evaluate(baseline, None, args, device)
    mean, ci = _common.mean_ci95(errors)
    base_mean, base_ci = _common.mean_ci95(base_errors)
    path = plot(model, lrs, baseline, args, device, args.plot)
    elapsed = time.perf_counter() - start
    print(
        f"{args.algorithm}, {args.shots}-shot, {args.inner_steps} inner step(s), "
        f"{args.iterations} meta-updates, {elapsed:.0f} s on {device}"
    )
    print(f"  after {args.eval_steps} adaptation step(s), {args.eval_tasks} held-out tasks:")
    print(f"    {args.algorithm:<10} MSE {mean:.3f} ± {ci:.3f} (95% CI)")
    print(f"    {'baseline':<10} MSE {base_mean:.3f} ± {base_ci:.3f} (pretrained, same adaptation)")
    if lrs is not None:
        mean_lr = sum(float(t.detach().abs().mean()) for t in lrs) / len(lrs)
        print(f"  learned per-parameter learning rates: mean |lr| {mean_lr:.4f}")
    print(f"  plot: {path}")
    return {
        "mse": mean,
        "mse_ci95": ci,
        "baseline_mse": base_mean,
        "baseline_ci95": base_ci,
        "train_curve": curve,
        "model": model,
        "plot": path,
        "seconds": elapsed,
    }


if __name__ == "__main__":
    main()
