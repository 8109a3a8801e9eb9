"""Small data helpers: a support/query split, an endless iterator, a dataset held in tensors."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from .._paths import missing

__all__ = ["InfiniteIterator", "OnDeviceDataset", "TasksetSampler", "partition_task"]


def partition_task(
    data: torch.Tensor, labels: torch.Tensor, shots: int = 1
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Splits a classification task into a support set and a query set.

    Every class puts its first ``shots`` samples (in the order of ``data``) in
    the support set and the rest in the query set; classes come in ascending
    label order in both. Each class must hold the same number of samples.

    Args:
        data: the task's inputs, one per row.
        labels: their labels, shape ``(len(data),)``.
        shots: support samples per class (0: an empty support set, as in learn2learn).

    Returns:
        ``((support_data, support_labels), (query_data, query_labels))``.

    Raises:
        ValueError: ``data`` and ``labels`` differ in length, ``shots`` is
            negative, or the classes hold different numbers of samples.

    Example:
        >>> import torch
        >>> from higher.learn2learn.data import partition_task
        >>> (xs, ys), (xq, yq) = partition_task(torch.arange(6.0), torch.tensor([1, 0, 1, 0, 1, 0]))
        >>> xs.tolist(), ys.tolist(), xq.tolist(), yq.tolist()
        ([1.0, 0.0], [0, 1], [3.0, 5.0, 2.0, 4.0], [0, 0, 1, 1])
    """
    if data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"partition_task: `data` has {data.shape[0]} samples but `labels` has "
            f"{labels.shape[0]}; pass one label per sample"
        )
    if shots < 0:
        raise ValueError(f"partition_task: `shots` must be 0 or more, got {shots}")
    classes, counts = labels.unique(return_counts=True)
    if (counts != counts[0]).any():
        raise ValueError(
            f"partition_task: every class needs the same number of samples; the classes "
            f"{classes.tolist()} hold {counts.tolist()}"
        )
    per_class = int(counts[0])
    if shots > per_class:
        raise ValueError(
            f"partition_task: `shots`={shots} but each class holds only {per_class} "
            "samples; lower `shots`"
        )
    # Row i of `order` lists the sample indices of class i in their original order.
    order = torch.argsort(labels, stable=True).view(len(classes), per_class)
    support, query = order[:, :shots].reshape(-1), order[:, shots:].reshape(-1)
    return (data[support], labels[support]), (data[query], labels[query])


class InfiniteIterator:
    """Loops over an iterable for ever, starting it again each time it runs out.

    Args:
        dataloader: the iterable (typically a DataLoader) to loop over.

    Raises:
        ValueError: on ``next`` when the iterable yields nothing at all.

    Example:
        >>> from higher.learn2learn.data import InfiniteIterator
        >>> batches = InfiniteIterator([1, 2])
        >>> [next(batches) for _ in range(5)]
        [1, 2, 1, 2, 1]
    """

    def __init__(self, dataloader: Iterable[Any]) -> None:
        self.dataloader = dataloader
        self.iterator = iter(dataloader)

    def __iter__(self) -> InfiniteIterator:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.dataloader)
        try:
            return next(self.iterator)
        except StopIteration:
            # learn2learn spins for ever here; an empty loader is a bug to report.
            raise ValueError("InfiniteIterator: `dataloader` yields nothing") from None


class OnDeviceDataset(TensorDataset):
    """A whole dataset loaded into two tensors, optionally on a device.

    Reads every ``(x, y)`` sample of ``dataset`` once, stacks the inputs and
    the labels, and moves them to ``device``. On CPU while CUDA is available,
    the tensors are pinned for fast transfers. ``transform`` is applied to the
    input each time a sample is read.

    Args:
        dataset: the dataset to load; its samples are ``(tensor, label)``.
        device: where the tensors live (where they were built when None).
        transform: applied to each sample's input on indexing.

    Example:
        >>> import torch
        >>> from higher.learn2learn.data import OnDeviceDataset
        >>> data = torch.utils.data.TensorDataset(torch.arange(3.0), torch.tensor([0, 1, 0]))
        >>> held = OnDeviceDataset(data, transform=lambda x: 2 * x)
        >>> held[1]
        (tensor(2.), tensor(1))
    """

    def __init__(
        self,
        dataset: Dataset,
        device: torch.device | str | None = None,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        if (
            isinstance(dataset, TensorDataset)
            and type(dataset).__getitem__ is TensorDataset.__getitem__
        ):
            data, labels = dataset.tensors[0], dataset.tensors[1]
        else:
            xs, ys = [], []
            for i in range(len(dataset)):  # type: ignore[arg-type]
                x, y = dataset[i][:2]
                xs.append(torch.as_tensor(x))
                ys.append(y)
            data = torch.stack(xs)
            labels = torch.stack(ys) if isinstance(ys[0], torch.Tensor) else torch.tensor(ys)
        if device is not None:
            data, labels = data.to(device), labels.to(device)
        if data.device.type == "cpu" and torch.cuda.is_available():
            data, labels = data.pin_memory(), labels.pin_memory()
        super().__init__(data, labels)
        self.transform = transform
        if hasattr(dataset, "_bookkeeping_path"):
            self._bookkeeping_path = dataset._bookkeeping_path

    def __getitem__(self, index: Any) -> tuple[Any, ...]:
        x, y = self.tensors[0][index], self.tensors[1][index]
        if self.transform is not None:
            x = self.transform(x)
        return x, y


class TasksetSampler(torch.utils.data.Sampler):
    """A batch sampler whose batches are the sample indices of a taskset's tasks.

    ``DataLoader(dataset, batch_sampler=TasksetSampler(taskset))`` then loads
    one task per batch, in worker processes if asked. With ``num_tasks=-1`` it
    yields new tasks for ever; otherwise each of the taskset's tasks once per
    epoch (shuffled with Python's ``random`` when ``shuffle``), as learn2learn does.

    Args:
        taskset: a :class:`~higher.learn2learn.data.TaskDataset`.
        shuffle: visit the tasks in a random order each epoch.

    Example:
        >>> import higher.learn2learn as l2l
        >>> data = l2l.data.MetaDataset(
        ...     torch.utils.data.TensorDataset(torch.randn(8, 2), torch.arange(8) % 4))
        >>> tasks = l2l.data.TaskDataset(data, [l2l.data.transforms.NWays(data, 2)], num_tasks=3)
        >>> [len(b) for b in TasksetSampler(tasks, shuffle=False)]
        [4, 4, 4]
    """

    def __init__(self, taskset: Any, shuffle: bool = True) -> None:
        self.taskset = taskset
        self.shuffle = shuffle

    @staticmethod
    def description2indices(task_description: Any) -> list[int]:
        """The dataset indices of a task description."""
        return [dd.index for dd in task_description]

    def __iter__(self) -> Iterator[list[int]]:
        taskset = self.taskset
        if taskset.num_tasks == -1:
            while True:
                yield self.description2indices(taskset.sample_task_description())
        order = list(range(taskset.num_tasks))
        if self.shuffle:
            random.shuffle(order)
        for i in order:
            if i not in taskset.sampled_descriptions:
                taskset.sampled_descriptions[i] = taskset.sample_task_description()
            yield self.description2indices(taskset.sampled_descriptions[i])


def __getattr__(name: str) -> Any:
    return missing(__name__, name)
