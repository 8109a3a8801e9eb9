"""N-way K-shot image classification with MAML, on Omniglot or on generated glyphs.

The Omniglot setup of Finn et al. (2017): a 4-block conv net (3x3 conv with
64 filters, BatchNorm, ReLU, 2x2 max-pool) on 28x28 images, characters
rotated by multiples of 90 degrees counted as new classes, Adam as the meta
optimizer. Give ``--data-dir`` a folder in Omniglot's layout
(``images_background/<alphabet>/<character>/*.png``, optionally
``images_evaluation/...`` for test classes); without one, an Omniglot-like set
of random stroke characters is generated on the fly, each sample drawn with its
own jitter, so the example runs anywhere.

    python examples/maml_fewshot.py                        # generated glyphs, 5-way 1-shot
    python examples/maml_fewshot.py --data-dir ~/omniglot --iterations 20000 --meta-batch 32
    torchrun --nproc-per-node 2 examples/maml_fewshot.py   # meta-batch split over 2 processes
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import higher

try:
    from . import _common
except ImportError:  # run as a script
    import _common  # type: ignore[no-redef]

SIZE = 28


# -- data ----------------------------------------------------------------------------
def random_strokes(generator: torch.Generator) -> torch.Tensor:
    """Control points of a character: 1 to 3 cubic Bezier strokes, shape (3, 4, 2).

    Unused strokes are parked far outside the canvas, so every character has
    the same shape and a whole set renders in a few batched operations.
    """
    n = int(torch.randint(1, 4, (), generator=generator))
    start = 0.25 + 0.5 * torch.rand(3, 1, 2, generator=generator)
    steps = 0.25 * torch.randn(3, 3, 2, generator=generator)
    ctrl = torch.cat([start, start + steps.cumsum(1)], 1).clamp(0.15, 0.85)
    ctrl[n:] = 100.0
    return ctrl


_T = torch.linspace(0, 1, 32)[:, None]
_BEZIER = torch.cat([(1 - _T) ** 3, 3 * (1 - _T) ** 2 * _T, 3 * (1 - _T) * _T**2, _T**3], 1)
_AXIS = (torch.arange(SIZE) + 0.5) / SIZE


def render(ctrl: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draws characters from jittered control points (n, 3, 4, 2): (n, 1, 28, 28) in [0, 1]."""
    n = ctrl.shape[0]
    ctrl = ctrl + 0.02 * torch.randn(ctrl.shape, generator=generator)
    points = torch.einsum("pk,nskd->nspd", _BEZIER, ctrl).reshape(n, -1, 2) - 0.5
    angle = 0.15 * torch.randn(n, generator=generator)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    rot = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], 1).view(-1, 2, 2)
    shift = 0.06 * torch.randn(n, 1, 2, generator=generator)
    points = scale[:, None, None] * points @ rot.transpose(1, 2) + 0.5 + shift
    # A Gaussian blob at each stroke point is separable in x and y, so summing
    # them all is one batched matmul; 1 - exp(-density) saturates the ink.
    blob_x = torch.exp(-((_AXIS[None, None, :] - points[..., :1]) ** 2) / (2 * 0.025**2))
    blob_y = torch.exp(-((_AXIS[None, None, :] - points[..., 1:]) ** 2) / (2 * 0.025**2))
    density = blob_y.transpose(1, 2) @ blob_x  # (n, rows = y, cols = x)
    return (1 - torch.exp(-1.5 * density)).view(n, 1, SIZE, SIZE)


def generate_glyphs(num_chars: int, samples: int, seed: int) -> list[torch.Tensor]:
    """An Omniglot-like set: ``num_chars`` random characters, ``samples`` drawings each."""
    gen = torch.Generator().manual_seed(seed)
    chars = torch.stack([random_strokes(gen) for _ in range(num_chars)])
    ctrl = chars.repeat_interleave(samples, 0)
    images = torch.cat([render(chunk, gen) for chunk in ctrl.split(1000)])
    return list(images.view(num_chars, samples, 1, SIZE, SIZE))


def load_image(path: str) -> torch.Tensor:
    """One Omniglot PNG as a (1, 28, 28) tensor, ink high, area-resampled."""
    from matplotlib import image

    pixels = torch.as_tensor(image.imread(path), dtype=torch.float32)
    if pixels.dim() == 3:  # RGB(A): average the colour channels
        pixels = pixels[..., :3].mean(-1)
    if pixels.max() > 1:
        pixels = pixels / 255.0
    ink = 1.0 - pixels  # Omniglot draws black strokes on white
    return F.interpolate(ink[None, None], size=(SIZE, SIZE), mode="area")[0]


def load_characters(root: str) -> list[torch.Tensor]:
    """Every character under ``root/<alphabet>/<character>/*.png``, in sorted order."""
    chars = []
    for alphabet in sorted(os.listdir(root)):
        a_dir = os.path.join(root, alphabet)
        if not os.path.isdir(a_dir):
            continue
        for character in sorted(os.listdir(a_dir)):
            c_dir = os.path.join(a_dir, character)
            files = sorted(f for f in os.listdir(c_dir) if f.lower().endswith(".png"))
            if files:
                chars.append(torch.stack([load_image(os.path.join(c_dir, f)) for f in files]))
    return chars


def load_omniglot(data_dir: str, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Train and test characters from a folder in Omniglot's layout.

    ``images_background`` trains and ``images_evaluation`` tests, as in the
    standard split; with only ``images_background``, its characters are split
    80/20 at random (seeded).
    """
    background = os.path.join(data_dir, "images_background")
    if not os.path.isdir(background):
        raise FileNotFoundError(f"{data_dir} has no images_background folder (Omniglot's layout)")
    train = load_characters(background)
    evaluation = os.path.join(data_dir, "images_evaluation")
    if os.path.isdir(evaluation):
        return train, load_characters(evaluation)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = max(1, int(0.8 * len(train)))
    return [train[i] for i in order[:cut]], [train[i] for i in order[cut:]]


class TaskSampler:
    """Draws N-way K-shot tasks; each character in 4 rotations counts as 4 classes."""

    def __init__(self, characters: list[torch.Tensor], seed: int) -> None:
        self.characters = characters
        self.classes = [(c, r) for c in range(len(characters)) for r in range(4)]
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, ways: int, shots: int, queries: int) -> tuple[torch.Tensor, ...]:
        picks = torch.randperm(len(self.classes), generator=self.gen)[:ways].tolist()
        xs, xq = [], []
        for c, r in (self.classes[i] for i in picks):
            images = self.characters[c]
            order = torch.randperm(len(images), generator=self.gen)[: shots + queries]
            chosen = torch.rot90(images[order], r, dims=(2, 3))
            xs.append(chosen[:shots])
            xq.append(chosen[shots:])
        labels = torch.arange(ways)
        return (
            torch.cat(xs),
            labels.repeat_interleave(shots),
            torch.cat(xq),
            labels.repeat_interleave(queries),
        )


# -- model and training ---------------------------------------------------------------
def conv_net(ways: int) -> nn.Module:
    def block(cin: int) -> list[nn.Module]:
        # Batch statistics at train and test time, as in MAML.
        return [
            nn.Conv2d(cin, 64, 3, padding=1),
            nn.BatchNorm2d(64, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *block(1), *block(64), *block(64), *block(64), nn.Flatten(), nn.Linear(64, ways)
    )


def run_task(model, inner_opt, task, steps, device, train: bool) -> tuple[torch.Tensor, float]:
    """Adapts to one task; returns the query loss (with meta-graph if ``train``) and accuracy."""
    xs, ys, xq, yq = (t.to(device) for t in task)
    with higher.innerloop_ctx(
        model, inner_opt, copy_initial_weights=False, track_higher_grads=train
    ) as (
        fmodel,
        diffopt,
    ):
        for _ in range(steps):
            diffopt.step(F.cross_entropy(fmodel(xs), ys))
        logits = fmodel(xq)
        loss = F.cross_entropy(logits, yq)
    return loss, (logits.argmax(1) == yq).float().mean().item()


def run_tasks_batched(
    model, inner_opt, tasks, steps, device, train: bool
) -> tuple[torch.Tensor, list[float]]:
    """Adapts to all ``tasks`` at once (batched mode); returns per-task query losses and accuracies."""
    xs, ys, xq, yq = (torch.stack(parts).to(device) for parts in zip(*tasks))
    with higher.innerloop_ctx(
        model,
        inner_opt,
        copy_initial_weights=False,
        track_higher_grads=train,
        num_tasks=len(tasks),
    ) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(task_cross_entropy(fmodel(xs), ys))
        logits = fmodel(xq)
        losses = task_cross_entropy(logits, yq)
    return losses, (logits.argmax(-1) == yq).float().mean(1).tolist()


def task_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One cross-entropy per task, for logits of shape (tasks, examples, ways)."""
    flat = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return flat.view(labels.shape).mean(1)


def evaluate(model, inner_opt, sampler, args, device, tasks: int) -> list[float]:
    accs: list[float] = []
    while not args.per_task_loop and len(accs) < tasks:  # a meta-batch of tasks at a time
        chunk = [
            sampler.sample(args.ways, args.shots, args.queries)
            for _ in range(min(args.meta_batch, tasks - len(accs)))
        ]
        accs += run_tasks_batched(model, inner_opt, chunk, args.eval_steps, device, False)[1]
    for _ in range(tasks) if args.per_task_loop else ():
        task = sampler.sample(args.ways, args.shots, args.queries)
        accs.append(run_task(model, inner_opt, task, args.eval_steps, device, train=False)[1])
    return accs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="folder in Omniglot's layout; generated glyphs when omitted")
    p.add_argument(
        "--num-chars", type=int, default=600, help="generated characters (no --data-dir)"
    )
    p.add_argument(
        "--samples-per-char", type=int, default=20, help="drawings of each generated character"
    )
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=5, help="query images per class")
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--eval-steps", type=int, default=3)
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--meta-lr", type=float, default=0.001)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument(
        "--eval-every", type=int, default=50, help="validation every this many iterations"
    )
    p.add_argument("--eval-tasks", type=int, default=300, help="meta-test tasks")
    p.add_argument("--device", default=_common.default_device())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="out/maml_fewshot.png")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--per-task-loop",
        action="store_true",
        help="adapt to one task after another instead of all tasks at once (batched mode)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    _common.require("matplotlib")
    _common.seed_everything(args.seed)
    device = _common.setup_distributed(torch.device(args.device))
    args.progress = args.progress and _common.is_main()
    start = time.perf_counter()
    if args.data_dir:
        train_chars, test_chars = load_omniglot(args.data_dir, args.seed)
        source = f"Omniglot from {args.data_dir}"
    else:
        chars = generate_glyphs(args.num_chars, args.samples_per_char, args.seed)
        cut = int(0.8 * len(chars))
        train_chars, test_chars = chars[:cut], chars[cut:]
        source = f"{len(chars)} generated glyph characters"
    # Validation classes come out of the training classes; test classes stay unseen.
    cut = max(1, int(0.9 * len(train_chars)))
    train_chars, val_chars = train_chars[:cut], train_chars[cut:] or train_chars[-1:]
    if min(len(train_chars), len(val_chars), len(test_chars)) * 4 < args.ways:
        raise SystemExit(f"not enough classes for {args.ways}-way tasks in {source}")
    train_tasks = TaskSampler(train_chars, args.seed)
    val_tasks = TaskSampler(val_chars, args.seed + 1)
    test_tasks = TaskSampler(test_chars, args.seed + 2)

    model = conv_net(args.ways).to(device)
    learner = _common.data_parallel(model, device)  # DDP under torchrun
    meta_opt = torch.optim.Adam(model.parameters(), lr=args.meta_lr)
    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    curve: dict[str, list] = {"iteration": [], "train_acc": [], "train_loss": [], "val": []}
    bar = _common.progress(range(args.iterations), args.progress, desc="meta-train")
    for it in bar:
        meta_opt.zero_grad()
        loss_sum = acc_sum = 0.0
        tasks = [
            train_tasks.sample(args.ways, args.shots, args.queries) for _ in range(args.meta_batch)
        ]
        if not args.per_task_loop:  # this rank's share of the meta-batch as one inner loop
            mine = [tasks[i] for i in _common.my_indices(args.meta_batch)]
            losses, accs = run_tasks_batched(
                learner, inner_opt, mine, args.inner_steps, device, True
            )
            (losses.sum() * _common.task_weight(args.meta_batch)).backward()
            loss_sum, acc_sum = losses.sum().item(), sum(accs)
        for task in _common.my_share(tasks, learner) if args.per_task_loop else ():
            loss, acc = run_task(learner, inner_opt, task, args.inner_steps, device, train=True)
            (loss * _common.task_weight(args.meta_batch)).backward()
            loss_sum += loss.item()
            acc_sum += acc
        meta_opt.step()
        loss_sum, acc_sum = _common.global_sum(loss_sum, acc_sum)
        curve["iteration"].append(it)
        curve["train_loss"].append(loss_sum / args.meta_batch)
        curve["train_acc"].append(acc_sum / args.meta_batch)
        if _common.is_main() and ((it + 1) % args.eval_every == 0 or it == args.iterations - 1):
            val = evaluate(model, inner_opt, val_tasks, args, device, tasks=50)
            curve["val"].append((it, sum(val) / len(val)))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(val_acc=f"{curve['val'][-1][1]:.3f}")

    del learner  # its DDP reducer holds the process group that end_distributed takes down
    if not _common.end_distributed():  # under torchrun, rank 0 evaluates, prints and plots
        return {"curve": curve, "model": model}
    accs = evaluate(model, inner_opt, test_tasks, args, device, args.eval_tasks)
    mean, ci = _common.mean_ci95(accs)
    elapsed = time.perf_counter() - start
    print(
        f"MAML {args.ways}-way {args.shots}-shot on {source}: {args.iterations} meta-updates, "
        f"{elapsed:.0f} s on {device}"
    )
    print(
        f"  meta-test accuracy after {args.eval_steps} step(s): {100 * mean:.1f}% ± {100 * ci:.1f}% "
        f"(95% CI, {args.eval_tasks} tasks; chance {100 / args.ways:.0f}%)"
    )

    plt = _common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, math.ceil(args.iterations / 50))
    acc = curve["train_acc"]
    smooth = [
        sum(acc[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(acc))
    ]
    ax1.plot(curve["iteration"], smooth, label="train query accuracy (smoothed)")
    if curve["val"]:
        ax1.plot(*zip(*curve["val"]), "o-", label="validation accuracy (validation classes)")
    ax1.axhline(1 / args.ways, color="gray", ls=":", label="chance")
    ax1.set_xlabel("meta-iteration")
    ax1.legend()
    ax2.plot(curve["iteration"], curve["train_loss"])
    ax2.set_title("train query loss")
    ax2.set_xlabel("meta-iteration")
    fig.suptitle(f"MAML {args.ways}-way {args.shots}-shot, {source}")
    path = _common.save_figure(fig, args.plot)
    print(f"  plot: {path}")
    return {
        "accuracy": mean,
        "ci95": ci,
        "curve": curve,
        "model": model,
        "plot": path,
        "seconds": elapsed,
    }


if __name__ == "__main__":
    main()
