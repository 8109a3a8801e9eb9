"""Helpers shared by the examples: seeding, progress bars, confidence intervals, plots,
and the plumbing that lets them run unchanged under ``torchrun`` (one meta-batch
split over processes, DistributedDataParallel averaging the meta-gradient)."""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib.util
import math
import os
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import distributed as dist
from torch import nn

T = TypeVar("T")


# The pip distribution of each optional module the examples import, where the names differ.
_DISTRIBUTIONS = {"PIL": "pillow"}


def require(*modules: str, extra: str = "examples") -> None:
    """Stops the example at start, naming the pip extra, when an optional module is missing.

    Called first thing in ``main``, so that a missing plotting or model
    library ends the run before minutes of training rather than after.
    """
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a missing parent package, or an import blocked
            found = False
        if not found or (name in sys.modules and sys.modules[name] is None):
            missing.append(name)
    if missing:
        names = " ".join(_DISTRIBUTIONS.get(m, m) for m in missing)
        caller = sys._getframe(1).f_globals.get("__file__")
        script = os.path.basename(caller) if caller else "this example"
        raise SystemExit(
            f"{script} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            "not installed: "
            f'pip install -e ".[{extra}]" (or pip install {names})'
        )


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


# -- distributed (torchrun) --------------------------------------------------------
# Every rank draws the whole meta-batch from the same seed, so the random streams
# match a single-process run, and then works on its own share of the tasks.


_OWN_GROUP = False  # whether setup_distributed made the process group (torchrun)


def setup_distributed(device: torch.device) -> torch.device:
    """Joins the process group when launched by torchrun; returns this rank's device.

    Without torchrun (no ``WORLD_SIZE`` in the environment) nothing happens. A
    group set up by the caller (as the tests do) is used as it is. Pair it with
    :func:`end_distributed` once training is done.
    """
    global _OWN_GROUP
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        _OWN_GROUP = True
        atexit.register(_abandon_group)
    if dist.is_initialized() and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def end_distributed() -> bool:
    """Leaves torchrun's process group after training; True on the process that carries on.

    Every rank calls it at the same point, with its DDP model released (the
    DDP reducer holds the process group). The ranks then take the group down
    together: a garbage collection frees DDP models and patched models still
    held in reference cycles, a barrier waits until no rank is communicating,
    and ``destroy_process_group`` shuts the backend down while every peer is
    still connected. Leaving that to interpreter exit, after the other ranks
    have gone, is what made a rank abort now and then (gloo's teardown race).
    Rank 0 then evaluates and plots on its own. A group set up by the caller is
    left as it is.
    """
    global _OWN_GROUP
    main = is_main()
    if _OWN_GROUP and dist.is_initialized():
        gc.collect()
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()
        dist.destroy_process_group()
        _OWN_GROUP = False
    return main


def _abandon_group() -> None:
    # At exit after a failure, without a barrier: a peer may be stuck in a
    # collective, and torchrun stops the other ranks anyway.
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that prints, evaluates and plots (rank 0, or the only one)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when running distributed."""
    if not dist.is_initialized():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def my_indices(meta_batch: int) -> list[int]:
    """The indices of this rank's tasks in the meta-batch (round-robin).

    Every rank must get at least one task.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = list(range(rank, meta_batch, world_size()))
    if not mine:
        raise SystemExit(f"the meta-batch ({meta_batch} tasks) is smaller than the world size")
    return mine


def my_share(tasks: Sequence[T], learner: nn.Module) -> Iterator[T]:
    """This rank's tasks of the meta-batch, all but the last under ``no_sync``.

    DDP then all-reduces the meta-gradient once per meta-batch, in the backward of
    this rank's last task.
    """
    mine = [tasks[i] for i in my_indices(len(tasks))]
    for i, task in enumerate(mine):
        last = i == len(mine) - 1
        skip_sync = getattr(learner, "no_sync", None)
        with contextlib.nullcontext() if last or skip_sync is None else skip_sync():
            yield task


def task_weight(meta_batch: int) -> float:
    """The weight of one task's loss, so that DDP's mean over ranks is the meta-batch mean."""
    return world_size() / meta_batch


def average_grads(params: Iterable[torch.Tensor]) -> None:
    """Averages over ranks the gradients that DDP does not see.

    DDP averages the gradients of the parameters it wraps; Meta-SGD's learning
    rates and Reptile's hand-made gradients live outside it.
    """
    if world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


def global_sum(*values: float) -> tuple[float, ...]:
    """Sums per-rank numbers (training losses, accuracies) over ranks, for logging."""
    if world_size() == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return tuple(total.tolist())
