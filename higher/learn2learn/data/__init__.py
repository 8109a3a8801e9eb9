"""learn2learn's ``data``: few-shot tasks from a classification dataset, in pure Python.

:class:`MetaDataset` indexes a dataset by label; a :class:`TaskDataset` draws
tasks from it through a list of task transforms (:mod:`.transforms`: ``NWays``,
``KShots``, ``LoadData``, ``RemapLabels``, ...). The names, signatures,
defaults and task semantics are learn2learn 0.2.0's; the code is plain Python
and torch (learn2learn compiles these modules with Cython, which is what stops
it installing on Python 3.11+), and it samples tasks faster than learn2learn's
compiled version (``benchmarks/learn2learn_tasks.py``). Differences are listed
in the "From learn2learn" guide.

Example:
    >>> import torch
    >>> import higher.learn2learn as l2l
    >>> data = l2l.data.MetaDataset(
    ...     torch.utils.data.TensorDataset(torch.randn(100, 4), torch.arange(100) % 10))
    >>> tasks = l2l.data.TaskDataset(data, [
    ...     l2l.data.transforms.NWays(data, n=5),
    ...     l2l.data.transforms.KShots(data, k=2),
    ...     l2l.data.transforms.LoadData(data),
    ...     l2l.data.transforms.RemapLabels(data),
    ... ], num_tasks=100)
    >>> x, y = tasks.sample()
    >>> x.shape, y.shape
    (torch.Size([10, 4]), torch.Size([10]))
"""

from typing import Any

from .._paths import missing
from . import transforms
from .description import DataDescription
from .meta_dataset import FilteredMetaDataset, MetaDataset, UnionMetaDataset
from .task_dataset import TaskDataset, Taskset
from .utils import InfiniteIterator, OnDeviceDataset, partition_task

__all__ = [
    "DataDescription",
    "FilteredMetaDataset",
    "InfiniteIterator",
    "MetaDataset",
    "OnDeviceDataset",
    "TaskDataset",
    "Taskset",
    "UnionMetaDataset",
    "partition_task",
    "transforms",
]


def __getattr__(name: str) -> Any:
    return missing(__name__, name)
