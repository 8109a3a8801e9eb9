"""MAML in its smallest form: learn an initialisation for 2-D linear regression.

Each task is y = x . a + b with a, b drawn uniformly from [-1, 1]. A single
nn.Linear(2, 1) is adapted to a task with a few SGD steps on ten support points;
MAML learns the initial weights from which those steps do best on ten query
points. Read this file first: the whole idea is the `innerloop_ctx` block.

    python examples/maml_linear.py
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import nn

import higher

try:
    from . import _common
except ImportError:  # run as a script
    import _common  # type: ignore[no-redef]


def sample_task(n_points: int = 20) -> tuple[torch.Tensor, ...]:
    a, b = torch.rand(2, 1) * 2 - 1, torch.rand(1) * 2 - 1
    x = torch.randn(n_points, 2)
    y = x @ a + b
    return x[:10], y[:10], x[10:], y[10:]  # support, query


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    _common.require("matplotlib")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--tasks-per-iteration", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--inner-lr", type=float, default=0.3)
    parser.add_argument("--meta-lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="out/maml_linear.png")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    _common.seed_everything(args.seed)

    model = nn.Linear(2, 1)
    meta_opt = torch.optim.Adam(model.parameters(), lr=args.meta_lr)
    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    before, after = [], []

    for it in _common.progress(range(args.iterations), args.progress):
        meta_opt.zero_grad()
        loss_before = loss_after = 0.0
        for _ in range(args.tasks_per_iteration):
            xs, ys, xq, yq = sample_task()
            # fmodel runs on fast weights; diffopt.step returns new ones, with history.
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
                fmodel,
                diffopt,
            ):
                loss_before += nn.functional.mse_loss(fmodel(xq), yq).item()
                for _ in range(args.inner_steps):
                    diffopt.step(nn.functional.mse_loss(fmodel(xs), ys))
                query_loss = nn.functional.mse_loss(fmodel(xq), yq)
                # The meta-gradient flows through the inner steps back to model's weights.
                (query_loss / args.tasks_per_iteration).backward()
                loss_after += query_loss.item()
        meta_opt.step()
        before.append(loss_before / args.tasks_per_iteration)
        after.append(loss_after / args.tasks_per_iteration)
        every = max(1, args.iterations // 10)
        if (it + 1) % every == 0 or it == args.iterations - 1:
            b, a = (sum(v[-every:]) / len(v[-every:]) for v in (before, after))
            print(f"iteration {it + 1:4d}: query loss before adaptation {b:.3f}, after {a:.3f}")

    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(before, label="query loss before adaptation")
    ax.plot(after, label=f"after {args.inner_steps} inner step(s)")
    ax.set_xlabel("meta-iteration")
    ax.set_yscale("log")
    ax.legend()
    print(f"plot: {_common.save_figure(fig, args.plot)}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
