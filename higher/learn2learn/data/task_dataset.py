"""``TaskDataset``: tasks drawn from a dataset by a list of task transforms.

A task is sampled in two stages: the transforms turn ``None`` into a task
description (which samples, and how to load them), then each description is
run and the samples are collated. With ``num_tasks`` positive, the description
of task ``i`` is drawn once and kept, so ``taskset[i]`` is the same task every
time (its random parts, such as rotations applied in the loading functions,
are drawn again).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from .._paths import missing
from .description import DataDescription
from .meta_dataset import MetaDataset
from .transforms import KShots, NWays, _nways_kshots

__all__ = ["DataDescription", "TaskDataset", "Taskset"]

TaskDescription = list[DataDescription]


def _collate(samples: list[Any]) -> Any:
    """``default_collate``, with a short path for the usual ``(tensor, label)`` samples.

    The short path gives default_collate's exact result (a list of the stacked
    inputs and the labels' tensor) without its per-sample type dispatch. In a
    DataLoader worker, default_collate itself runs, for its shared-memory output.
    """
    pairs = all(type(s) in (list, tuple) and len(s) == 2 for s in samples)
    if samples and pairs and get_worker_info() is None:
        xs, ys = zip(*samples)
        label_kind = type(ys[0])
        if (
            all(type(x) is torch.Tensor for x in xs)
            and label_kind in (int, torch.Tensor)
            and all(type(y) is label_kind for y in ys)
        ):
            labels = torch.tensor(ys) if label_kind is int else torch.stack(ys)
            return [torch.stack(xs), labels]
    return default_collate(samples)


class TaskDataset:
    """Tasks drawn from a dataset by a list of task transforms.

    Each task starts as ``None``; every transform of ``task_transforms`` maps
    the description so far to a new one; then every sample of the description
    is loaded and ``task_collate`` gathers them (by default into
    ``[inputs, labels]``).

    With ``num_tasks=-1`` every task is new and ``len(taskset)`` is 1;
    iterating never ends. With ``num_tasks`` positive, task ``i``'s description
    is drawn the first time it is asked for and kept (``sampled_descriptions``),
    and iterating yields tasks ``0`` to ``num_tasks - 1``.

    Args:
        dataset: a MetaDataset (other datasets are wrapped in one).
        task_transforms: the task transforms, applied in order (a single
            transform is taken as a list of one).
        num_tasks: the number of distinct tasks, or -1 for a fresh task each time.
        task_collate: gathers a task's samples; ``default_collate`` when None.

    Raises:
        ValueError: ``num_tasks`` is neither -1 nor positive.

    Example:
        >>> import torch
        >>> from higher.learn2learn.data import MetaDataset, TaskDataset
        >>> from higher.learn2learn.data.transforms import KShots, LoadData, NWays, RemapLabels
        >>> data = MetaDataset(
        ...     torch.utils.data.TensorDataset(torch.randn(40, 3), torch.arange(40) % 8))
        >>> tasks = TaskDataset(
        ...     data, [NWays(data, n=5), KShots(data, k=2), LoadData(data), RemapLabels(data)])
        >>> x, y = tasks.sample()
        >>> x.shape, sorted(y.tolist())
        (torch.Size([10, 3]), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    """

    def __init__(
        self,
        dataset: Dataset,
        task_transforms: Sequence[Callable[..., Any]] | Callable[..., Any] | None = None,
        num_tasks: int = -1,
        task_collate: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
            raise ValueError(
                f"num_tasks must be an int, -1 (infinity) or positive; got {num_tasks!r}"
            )
        if num_tasks < -1 or num_tasks == 0:
            raise ValueError(f"num_tasks needs to be -1 (infinity) or positive; got {num_tasks}")
        self.dataset = dataset if isinstance(dataset, MetaDataset) else MetaDataset(dataset)
        if task_transforms is None:
            task_transforms = []
        elif callable(task_transforms):
            task_transforms = [task_transforms]
        self.task_transforms = list(task_transforms)
        self.num_tasks = num_tasks
        self.task_collate = _collate if task_collate is None else task_collate
        self.sampled_descriptions: dict[int, TaskDescription] = {}
        self._task_id = 0

    def sample_task_description(self) -> TaskDescription:
        """A new task description: ``None`` through every task transform."""
        transforms = self.task_transforms
        description = None
        if (
            len(transforms) > 1
            and type(transforms[0]) is NWays
            and type(transforms[1]) is KShots
            and transforms[0].dataset is transforms[1].dataset
        ):
            # The usual start: the same draw, without describing all of the
            # chosen classes' samples first (a third of the sampling time).
            description = _nways_kshots(transforms[0], transforms[1])
            transforms = transforms[2:]
        for transform in transforms:
            description = transform(description)
        if description is None:
            raise ValueError(
                "TaskDataset has no task_transforms, so a task has no samples; pass e.g. "
                "[NWays(dataset, n), KShots(dataset, k), LoadData(dataset), RemapLabels(dataset)]"
            )
        return description

    def get_task(self, task_description: TaskDescription) -> Any:
        """Loads the samples of a description (each through its functions) and collates them."""
        samples = []
        for dd in task_description:
            data: Any = dd.index
            for fn in dd.transforms:
                data = fn(data)
            samples.append(data)
        return self.task_collate(samples)

    def sample(self) -> Any:
        """A random task: a new one, or one of the ``num_tasks`` kept ones."""
        return self[random.randint(0, len(self) - 1)]

    def __len__(self) -> int:
        return 1 if self.num_tasks == -1 else self.num_tasks

    def __getitem__(self, i: int) -> Any:
        if self.num_tasks == -1:
            return self.get_task(self.sample_task_description())
        description = self.sampled_descriptions.get(i)
        if description is None:
            description = self.sampled_descriptions[i] = self.sample_task_description()
        return self.get_task(description)

    def __iter__(self) -> Iterator[Any]:
        self._task_id = 0
        return self

    def __next__(self) -> Any:
        if self.num_tasks == -1 or self._task_id < self.num_tasks:
            task = self[self._task_id]
            self._task_id += 1
            return task
        raise StopIteration

    def __add__(self, other: Any) -> Any:
        raise NotImplementedError("adding TaskDatasets is not supported (as in learn2learn)")


Taskset = TaskDataset


def __getattr__(name: str) -> Any:
    return missing(__name__, name)
