"""What ``torch.optim`` does with scalars and schedulers, so differentiable optimizers match it."""

from __future__ import annotations

import contextlib
import warnings
from array import array
from collections.abc import Iterator

import torch


def scalar_dtype() -> torch.dtype:
    """The dtype ``torch.optim`` uses for scalar state such as ``step``."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def round_like_scalar_state(value: float) -> float:
    """Rounds a Python float as torch.optim does when it stores it in a scalar tensor.

    torch keeps ``eta``, ``mu`` and ``mu_product`` as tensors of the scalar dtype
    and reads them back with ``.item()``; with a float32 default dtype that rounds
    the value, and matching torch step for step means rounding identically.
    """
    if scalar_dtype() == torch.float32:
        return array("f", (value,))[0]
    return value


@contextlib.contextmanager
def quiet_scheduler_order_warning() -> Iterator[None]:
    """Silences torch's "lr_scheduler.step() before optimizer.step()" warning.

    A differentiable optimizer steps instead of the torch optimizer that the
    scheduler watches, so the warning would be a false alarm.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        yield
