"""Hyperparameter learning: tune an optimizer's learning rate and momentum by hypergradient.

A small MLP is trained from a fixed initialisation for a fixed number of SGD
steps. The validation loss after those steps is a differentiable function of
the learning rate and momentum (passed to the differentiable optimizer as
tensors through ``override``), so both can be learned with Adam on the
hypergradient. The plot shows them settle.

    python examples/learned_lr.py
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import higher

try:
    from . import _common
except ImportError:  # run as a script
    import _common  # type: ignore[no-redef]


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 1, generator=generator) * 4 - 2
    return x, torch.sin(3 * x) + 0.1 * torch.randn(n, 1, generator=generator)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    _common.require("matplotlib")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hyper-iterations", type=int, default=150)
    parser.add_argument("--inner-steps", type=int, default=30, help="training steps per evaluation")
    parser.add_argument("--init-lr", type=float, default=0.01)
    parser.add_argument("--init-momentum", type=float, default=0.5)
    parser.add_argument(
        "--hyper-lr", type=float, default=0.05, help="Adam's lr on log-lr and logit-momentum"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="out/learned_lr.png")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    _common.seed_everything(args.seed)

    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = make_data(64, gen)
    x_val, y_val = make_data(256, gen)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=args.init_lr, momentum=args.init_momentum)

    # Unconstrained parametrisation: lr = exp(log_lr) > 0, momentum = sigmoid(logit) in (0, 1).
    log_lr = torch.tensor(math.log(args.init_lr), requires_grad=True)
    logit_m = torch.tensor(
        math.log(args.init_momentum / (1 - args.init_momentum)), requires_grad=True
    )
    hyper_opt = torch.optim.Adam([log_lr, logit_m], lr=args.hyper_lr)
    history: dict[str, list[float]] = {"lr": [], "momentum": [], "val_loss": []}

    for _ in _common.progress(range(args.hyper_iterations), args.progress, desc="hyper-steps"):
        lr, momentum = log_lr.exp(), torch.sigmoid(logit_m)
        # copy_initial_weights=True: every evaluation trains from the same start.
        with higher.innerloop_ctx(model, opt, override={"lr": lr, "momentum": momentum}) as (
            fmodel,
            diffopt,
        ):
            for _ in range(args.inner_steps):
                diffopt.step(nn.functional.mse_loss(fmodel(x_train), y_train))
            val_loss = nn.functional.mse_loss(fmodel(x_val), y_val)
        hyper_opt.zero_grad()
        val_loss.backward()
        hyper_opt.step()
        history["lr"].append(lr.item())
        history["momentum"].append(momentum.item())
        history["val_loss"].append(val_loss.item())

    last = slice(-max(1, args.hyper_iterations // 10), None)
    drift = {k: max(v[last]) - min(v[last]) for k, v in history.items()}
    print(
        f"validation loss after {args.inner_steps} steps: {history['val_loss'][0]:.4f} with "
        f"lr={args.init_lr}, momentum={args.init_momentum} -> {history['val_loss'][-1]:.4f}"
    )
    print(
        f"learned lr {history['lr'][-1]:.4f} (range over the last 10%: {drift['lr']:.4f}), "
        f"momentum {history['momentum'][-1]:.4f} (range {drift['momentum']:.4f})"
    )

    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key in zip(axes, ("lr", "momentum", "val_loss")):
        ax.plot(history[key])
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("hyper-iteration")
    axes[2].set_yscale("log")
    print(f"plot: {_common.save_figure(fig, args.plot)}")
    return {**history, "drift": drift}


if __name__ == "__main__":
    main()
