"""Runs maml_sinusoid's ``main()`` on one rank of a process group (test_distributed.py).

``distributed_cases.py`` calls :func:`run` once its process group is up (from a
rendezvous file, where torchrun would set it up from its environment); the
example finds the group through ``_common`` and splits its meta-batch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import maml_sinusoid  # noqa: E402

# MAML goes through DDP; Meta-SGD also through _common.average_grads (its lrs).
SINUSOID_ALGORITHMS = ("maml", "meta-sgd")


def sinusoid_args(algorithm: str, plot: str) -> list[str]:
    return [
        *("--algorithm", algorithm, "--iterations", "3", "--meta-batch", "5"),
        *("--inner-steps", "2", "--eval-tasks", "2", "--baseline-iterations", "1"),
        *("--device", "cpu", "--plot", plot, "--no-progress"),
    ]


def summary(result: dict) -> dict:
    weights = [p.detach().clone() for p in result["model"].parameters()]
    return {"weights": weights, "curve": result["train_curve"]}


def _no_plot(*args: object) -> str:
    return ""


def run(
    out_dir: str, algorithms: Sequence[str] = SINUSOID_ALGORITHMS, plot: bool = True
) -> dict[str, dict]:
    """Every algorithm's run on this rank, in float64 so that 1e-9 comparisons hold.

    ``plot=False`` skips the figure (the slowest part of a short run).
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    real_plot = maml_sinusoid.plot
    if not plot:
        maml_sinusoid.plot = _no_plot
    try:
        return {
            algorithm: summary(
                maml_sinusoid.main(sinusoid_args(algorithm, f"{out_dir}/sin-{algorithm}.png"))
            )
            for algorithm in algorithms
        }
    finally:
        maml_sinusoid.plot = real_plot
        torch.set_default_dtype(old)
