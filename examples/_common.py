"""Helpers shared by the examples: seeding, progress bars, confidence intervals, plots."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable, Sequence
from typing import Any

import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def progress(iterable: Iterable[Any], enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm progress bar (a plain iterator when disabled or tqdm is missing)."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # the examples still run, just without a bar
        return iterable
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the normal 95 % confidence interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def pyplot() -> Any:
    """matplotlib's pyplot on a file-only backend (the examples never open windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str) -> str:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
