"""Task sampling of ``higher.learn2learn.data`` beside learn2learn 0.2.0's compiled version.

Measures tasks per second of
``TaskDataset(MetaDataset(ds), [NWays(5), KShots(2), LoadData, RemapLabels])``
on an in-memory Omniglot-sized dataset (1,623 classes x 20 images of 28x28,
a ``TensorDataset``), and the time to build the ``MetaDataset``. When
learn2learn is importable (its last release installs on Python <= 3.10 only),
both run in the same process, in interleaved rounds, on one thread::

    python -m benchmarks.learn2learn_tasks
    PYTHONPATH=. /path/to/py310-venv-with-learn2learn/python -m benchmarks.learn2learn_tasks

Both sample with Python's ``random``; the figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from higher.learn2learn import data as ours


def _learn2learn() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import learn2learn  # type: ignore[import-not-found]
    except ImportError:
        return None
    return learn2learn.data


def omniglot_sized(classes: int = 1623, per_class: int = 20, size: int = 28) -> Any:
    """An in-memory dataset of Omniglot's shape: random images, labels class after class."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(classes * per_class, 1, size, size, generator=gen)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return torch.utils.data.TensorDataset(images, labels)


def taskset(lib: Any, dataset: Any, ways: int, shots: int) -> Any:
    meta = lib.MetaDataset(dataset)
    t = lib.transforms
    return lib.TaskDataset(
        meta, [t.NWays(meta, ways), t.KShots(meta, shots), t.LoadData(meta), t.RemapLabels(meta)]
    )


def build_seconds(lib: Any, dataset: Any) -> float:
    start = time.perf_counter()
    lib.MetaDataset(dataset)
    return time.perf_counter() - start


def tasks_per_second(tasks: Any, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        tasks.sample()
    return count / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--tasks", type=int, default=2000, help="tasks sampled per round")
    p.add_argument("--classes", type=int, default=1623)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=2)
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    random.seed(0)
    dataset = omniglot_sized(args.classes)
    libs = {"higher.learn2learn": ours}
    theirs = _learn2learn()
    if theirs is not None:
        libs["learn2learn 0.2.0"] = theirs
    sets = {name: taskset(lib, dataset, args.ways, args.shots) for name, lib in libs.items()}
    for tasks in sets.values():  # warm-up
        tasks_per_second(tasks, 200)
    rates: dict[str, list[float]] = {name: [] for name in libs}
    builds: dict[str, list[float]] = {name: [] for name in libs}
    for r in range(args.rounds):
        order = list(libs) if r % 2 == 0 else list(reversed(libs))
        for name in order:
            rates[name].append(tasks_per_second(sets[name], args.tasks))
            builds[name].append(build_seconds(libs[name], dataset))
    result = {
        name: {
            "tasks_per_s": statistics.median(rates[name]),
            "build_s": statistics.median(builds[name]),
        }
        for name in libs
    }
    print(
        f"{args.ways}-way {args.shots}-shot tasks from {args.classes} classes x 20 images of "
        f"28x28; Python {sys.version.split()[0]}, torch {torch.__version__}, 1 thread, "
        f"medians of {args.rounds} interleaved rounds of {args.tasks} tasks\n"
    )
    print("| implementation | tasks/s | MetaDataset build |")
    print("|---|---:|---:|")
    for name, row in result.items():
        print(f"| {name} | {row['tasks_per_s']:,.0f} | {1000 * row['build_s']:.1f} ms |")
    if theirs is not None:
        ratio = (
            result["higher.learn2learn"]["tasks_per_s"] / result["learn2learn 0.2.0"]["tasks_per_s"]
        )
        print(f"\nhigher.learn2learn samples {ratio:.2f}x learn2learn's rate")
    else:
        print("\n(learn2learn is not importable here: only higher.learn2learn's column)")
    return result


if __name__ == "__main__":
    main()
