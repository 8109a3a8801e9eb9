"""learn2learn's MAML-on-Omniglot program, run by higher.learn2learn.

The training code below is written against learn2learn's API, in the shape
of learn2learn's own Omniglot example: ``get_tasksets('omniglot')`` for the
train / validation / test tasks, ``MAML(model, lr, first_order)``, a
``clone()`` per task, ``adapt()`` on the support half of the task and the loss
of the query half backpropagated into the model. It runs on learn2learn
unchanged but for the import line::

    import learn2learn as l2l            # Python <= 3.10 only
    import higher.learn2learn as l2l     # here

Give ``--data-dir`` a folder in Omniglot's layout
(``images_background/<alphabet>/<character>/*.png``, optionally
``images_evaluation``; the layout ``examples/maml_fewshot.py`` reads); without
one, the generated glyphs of ``maml_fewshot.py`` are written in that layout to
a temporary folder, so the example runs anywhere.

    python examples/l2l_maml_omniglot.py                        # generated glyphs, 5-way 1-shot
    python examples/l2l_maml_omniglot.py --data-dir ~/omniglot --iterations 60000 --meta-batch 32
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import higher.learn2learn as l2l

try:
    from . import _common, maml_fewshot
except ImportError:  # run as a script
    import _common  # type: ignore[no-redef]
    import maml_fewshot  # type: ignore[no-redef]


def write_glyph_folder(root: str, num_chars: int, samples: int, seed: int) -> str:
    """Generated glyphs saved in Omniglot's layout: black strokes on white, 105x105 PNGs."""
    from PIL import Image

    characters = maml_fewshot.generate_glyphs(num_chars, samples, seed)
    for c, images in enumerate(characters):
        folder = os.path.join(
            root, "images_background", f"Alphabet_{c // 20:03d}", f"character{c % 20 + 1:02d}"
        )
        os.makedirs(folder)
        large = F.interpolate(images, size=(105, 105), mode="bilinear", align_corners=False)
        pixels = ((1 - large.clamp(0, 1)) * 255).round().to(torch.uint8)
        for d, image in enumerate(pixels):
            png = Image.frombytes("L", (105, 105), image.numpy().tobytes())
            png.save(os.path.join(folder, f"{c:04d}_{d:02d}.png"))
    return root


# -- learn2learn's loop: everything below uses learn2learn's API only -------------------------
def fast_adapt(batch, learner, loss_fn, adaptation_steps, shots, ways, device):
    """Adapts a clone on the task's support samples; returns the query loss and accuracy."""
    data, labels = (t.to(device) for t in batch)
    # get_tasksets keeps each class's 2 * shots samples together: alternate
    # samples go to the support and the query set, shots of each class in each.
    support = torch.zeros(data.size(0), dtype=torch.bool, device=device)
    support[::2] = True
    for _ in range(adaptation_steps):
        learner.adapt(loss_fn(learner(data[support]), labels[support]))
    predictions = learner(data[~support])
    query_loss = loss_fn(predictions, labels[~support])
    return query_loss, l2l.utils.accuracy(predictions, labels[~support])


def train(args: argparse.Namespace, root: str, device: torch.device) -> dict[str, Any]:
    tasksets = l2l.vision.benchmarks.get_tasksets(
        "omniglot",
        train_ways=args.ways,
        train_samples=2 * args.shots,
        test_ways=args.ways,
        test_samples=2 * args.shots,
        num_tasks=args.num_tasks,
        root=root,
    )
    if args.model == "fc":
        model = l2l.vision.models.OmniglotFC(28**2, args.ways)
    else:
        model = l2l.vision.models.OmniglotCNN(args.ways)
    model.to(device)
    maml = l2l.algorithms.MAML(model, lr=args.fast_lr, first_order=args.first_order)
    opt = torch.optim.Adam(maml.parameters(), args.meta_lr)
    loss_fn = nn.CrossEntropyLoss(reduction="mean")

    curve: dict[str, list[float]] = {"train_acc": [], "valid_acc": [], "train_loss": []}
    bar = _common.progress(range(args.iterations), args.progress, desc="meta-train")
    for _ in bar:
        opt.zero_grad()
        train_loss = train_acc = valid_acc = 0.0
        for _ in range(args.meta_batch):
            learner = maml.clone()
            batch = tasksets.train.sample()
            loss, acc = fast_adapt(
                batch, learner, loss_fn, args.adaptation_steps, args.shots, args.ways, device
            )
            loss.backward()
            train_loss += loss.item()
            train_acc += acc.item()

            learner = maml.clone()
            batch = tasksets.validation.sample()
            _, acc = fast_adapt(
                batch, learner, loss_fn, args.adaptation_steps, args.shots, args.ways, device
            )
            valid_acc += acc.item()
        for p in maml.parameters():  # the meta-gradient is the meta-batch mean
            p.grad.data.mul_(1.0 / args.meta_batch)
        opt.step()
        curve["train_loss"].append(train_loss / args.meta_batch)
        curve["train_acc"].append(train_acc / args.meta_batch)
        curve["valid_acc"].append(valid_acc / args.meta_batch)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(valid_acc=f"{curve['valid_acc'][-1]:.3f}")

    test_accs = []
    for _ in range(args.test_tasks):
        learner = maml.clone()
        batch = tasksets.test.sample()
        _, acc = fast_adapt(
            batch, learner, loss_fn, args.adaptation_steps, args.shots, args.ways, device
        )
        test_accs.append(acc.item())
    return {"curve": curve, "test_accs": test_accs, "model": model}


# -- the example's command line, data and report ------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="folder in Omniglot's layout; generated glyphs when omitted")
    p.add_argument("--num-chars", type=int, default=200, help="generated characters")
    p.add_argument("--samples-per-char", type=int, default=20, help="drawings of each")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--model", choices=["fc", "cnn"], default="fc", help="OmniglotFC or OmniglotCNN")
    p.add_argument("--fast-lr", type=float, default=0.5, help="MAML's adaptation lr")
    p.add_argument("--meta-lr", type=float, default=0.003)
    p.add_argument("--adaptation-steps", type=int, default=1)
    p.add_argument("--first-order", action="store_true")
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--num-tasks", type=int, default=20000, help="tasks per taskset (-1: endless)")
    p.add_argument("--test-tasks", type=int, default=200)
    p.add_argument("--device", default=_common.default_device())
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--plot", default="out/l2l_maml_omniglot.png")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    _common.require("matplotlib", "PIL")
    random.seed(args.seed)  # the tasksets sample with Python's random, as learn2learn's
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_dir:
            root, source = args.data_dir, f"Omniglot from {args.data_dir}"
        else:
            root = write_glyph_folder(tmp, args.num_chars, args.samples_per_char, args.seed)
            source = f"{args.num_chars} generated glyph characters"
        result = train(args, root, device)
    mean, ci = _common.mean_ci95(result["test_accs"])
    elapsed = time.perf_counter() - start
    print(
        f"learn2learn's MAML loop on higher.learn2learn, {args.ways}-way {args.shots}-shot on "
        f"{source}: {args.iterations} meta-updates, {elapsed:.0f} s on {device}"
    )
    print(
        f"  meta-test accuracy: {100 * mean:.1f}% ± {100 * ci:.1f}% (95% CI, "
        f"{args.test_tasks} tasks; chance {100 / args.ways:.0f}%)"
    )
    curve = result["curve"]
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve["train_acc"], label="train query accuracy")
    ax.plot(curve["valid_acc"], label="validation query accuracy")
    ax.axhline(1 / args.ways, color="gray", ls=":", label="chance")
    ax.set_xlabel("meta-iteration")
    ax.legend()
    ax.set_title(f"MAML {args.ways}-way {args.shots}-shot, {source}")
    path = _common.save_figure(fig, args.plot)
    print(f"  plot: {path}")
    return {**result, "accuracy": mean, "ci95": ci, "plot": path, "seconds": elapsed}


if __name__ == "__main__":
    main()
