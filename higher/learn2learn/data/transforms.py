"""Task transforms: each maps a task description to a new one.

A task description is a list of
:class:`~higher.learn2learn.data.DataDescription`, one per sample of the task:
the sample's index in the dataset and the list of functions that turn the
index into the sample (``LoadData`` adds the loading, ``RemapLabels``
the relabelling). A transform called with ``None`` starts from the whole
dataset. :class:`~higher.learn2learn.data.TaskDataset` runs its transforms in
order, then runs each description's functions and collates the samples.

``NWays`` and ``KShots`` called on ``None`` never build the descriptions of
the whole dataset: they draw from the label-to-indices map that
:class:`~higher.learn2learn.data.MetaDataset` built once, and only the chosen
samples get a description. Sampling is Python's :mod:`random` (seed it with
``random.seed``), as in learn2learn.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from torch.utils.data import TensorDataset

from .._paths import missing
from .description import DataDescription
from .meta_dataset import MetaDataset

__all__ = [
    "ConsecutiveLabels",
    "FilterLabels",
    "FusedNWaysKShots",
    "KShots",
    "LoadData",
    "NWays",
    "RemapLabels",
    "TaskTransform",
]

TaskDescription = list[DataDescription]


def _check_meta(dataset: Any, name: str) -> MetaDataset:
    if not isinstance(dataset, MetaDataset):
        raise TypeError(
            f"{name} needs a MetaDataset (it reads the dataset's labels); got "
            f"{type(dataset).__name__}: wrap it first, `dataset = MetaDataset(dataset)`"
        )
    return dataset


def _positive_int(value: Any, transform: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{transform}: `{name}` must be a positive int, got {value!r}")
    return value


class TaskTransform:
    """Base class of task transforms: holds the dataset and starts whole-dataset tasks.

    Args:
        dataset: the MetaDataset the descriptions index into.

    Example:
        >>> import torch
        >>> from higher.learn2learn.data import MetaDataset
        >>> from higher.learn2learn.data.transforms import TaskTransform
        >>> data = MetaDataset(torch.utils.data.TensorDataset(torch.zeros(3), torch.tensor([0, 1, 0])))
        >>> [d.index for d in TaskTransform(data).new_task()]
        [0, 1, 2]
    """

    def __init__(self, dataset: MetaDataset) -> None:
        self.dataset = dataset

    def new_task(self) -> TaskDescription:
        """A description of every sample of the dataset, in index order."""
        return [DataDescription(i) for i in range(len(self.dataset))]

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        raise NotImplementedError


def _group(
    dataset: MetaDataset, task_description: TaskDescription
) -> dict[Hashable, TaskDescription]:
    """The descriptions by label, labels in order of first appearance."""
    labels = dataset.indices_to_labels
    groups: dict[Hashable, TaskDescription] = {}
    for dd in task_description:
        label = labels[dd.index]
        group = groups.get(label)
        if group is None:
            groups[label] = [dd]
        else:
            group.append(dd)
    return groups


def _set_order(labels: Iterable[Hashable]) -> list[Hashable]:
    """The labels once each, in learn2learn's order: that of a set built from them.

    learn2learn draws classes from ``list(set(labels))``; for int labels CPython's
    set order depends only on the labels and their order, so the same random
    state draws the same classes here. Other labels (strings, whose set order
    changes with each run's hashing) keep their order of first appearance.
    """
    unique = list(dict.fromkeys(labels))
    if all(type(label) is int for label in unique):
        return list(set(unique))
    return unique


def _pick_ways(n: int, classes: Sequence[Hashable], transform: str, where: str) -> list[Hashable]:
    if n > len(classes):
        raise ValueError(
            f"{transform}: n={n} asks for more classes than {where} holds ({len(classes)}); "
            f"lower n to at most {len(classes)}, or use a dataset with more classes"
        )
    return random.sample(classes, n)


def _too_few_shots(transform: str, k: int, label: Hashable, available: int) -> ValueError:
    return ValueError(
        f"{transform}: k={k} asks for {k} samples of class {label!r}, which has only "
        f"{available}; lower k to at most {available}, or pass replacement=True"
    )


def _copy(dd: DataDescription) -> DataDescription:
    twin = DataDescription(dd.index)
    twin.transforms = list(dd.transforms)
    return twin


def _shots_of(
    items: Sequence[Any], k: int, replacement: bool, transform: str, label: Hashable
) -> list[Any]:
    if replacement:
        return random.choices(items, k=k)
    if k > len(items):
        raise _too_few_shots(transform, k, label, len(items))
    return random.sample(items, k)


def _draw(
    dataset: MetaDataset,
    labels: Sequence[Hashable],
    n: int,
    k: int,
    replacement: bool,
    transform: str,
) -> TaskDescription:
    """``n`` labels drawn from ``labels``, then ``k`` samples of each, straight from the maps.

    The same draw as ``KShots(NWays(None))``: the labels in a random order, each
    label's samples drawn uniformly, without building the descriptions of the
    samples that are not drawn.
    """
    by_label = dataset.labels_to_indices
    out: TaskDescription = []
    where = "the dataset" if transform == "NWays" else "filter_labels"
    for label in _pick_ways(n, labels, transform, where):
        items = by_label[label]
        if replacement and transform == "FusedNWaysKShots":
            # learn2learn's fused draw picks one by one (KShots's uses random.choices).
            picks = [random.choice(items) for _ in range(k)]
        else:
            kind = "KShots" if transform == "NWays" else transform
            picks = _shots_of(items, k, replacement, kind, label)
        out.extend(DataDescription(i) for i in picks)
    return out


def _nways_kshots(nways: NWays, kshots: KShots) -> TaskDescription:
    """``kshots(nways(None))``, drawn without describing the unchosen samples.

    :class:`~higher.learn2learn.data.TaskDataset` calls it for a list of
    transforms that starts with ``NWays`` then ``KShots`` on the same dataset.
    """
    return _draw(
        nways.dataset, nways.dataset.labels, nways.n, kshots.k, kshots.replacement, "NWays"
    )


class NWays(TaskTransform):
    """Keeps the samples of ``n`` labels drawn at random from the task's labels.

    On ``None`` it draws ``n`` of the dataset's labels and describes all their
    samples, label after label. On a description it keeps, in their order, the
    samples of ``n`` labels drawn from those present.

    Args:
        dataset: the MetaDataset.
        n: the number of labels (ways).

    Raises:
        ValueError: ``n`` is not positive, or exceeds the number of labels in
            the dataset (on creation) or in the description (on call).

    Example:
        >>> import random, torch
        >>> from higher.learn2learn.data import MetaDataset
        >>> from higher.learn2learn.data.transforms import NWays
        >>> data = MetaDataset(torch.utils.data.TensorDataset(torch.zeros(6), torch.tensor([0, 1, 2] * 2)))
        >>> _ = random.seed(0)
        >>> sorted({data.indices_to_labels[d.index] for d in NWays(data, n=2)(None)})
        [1, 2]
    """

    def __init__(self, dataset: MetaDataset, n: int = 2) -> None:
        super().__init__(_check_meta(dataset, "NWays"))
        self.n = _positive_int(n, "NWays", "n")
        if n > len(dataset.labels):
            _pick_ways(n, dataset.labels, "NWays", "the dataset")
        self.indices_to_labels = dataset.indices_to_labels

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        if task_description is None:
            by_label = self.dataset.labels_to_indices
            return [
                DataDescription(i)
                for label in _pick_ways(self.n, self.dataset.labels, "NWays", "the dataset")
                for i in by_label[label]
            ]
        labels = self.indices_to_labels
        present = _set_order(labels[dd.index] for dd in task_description)
        kept = set(_pick_ways(self.n, present, "NWays", "the task description"))
        return [dd for dd in task_description if labels[dd.index] in kept]


class KShots(TaskTransform):
    """Keeps ``k`` samples of each label present in the task.

    The result lists the labels in order of first appearance, ``k`` samples
    each, drawn at random. With ``replacement`` a sample can be drawn more than
    once (each draw gets its own copy of the description).

    Args:
        dataset: the MetaDataset.
        k: samples per label (shots).
        replacement: draw with replacement.

    Raises:
        ValueError: ``k`` is not positive, or a label has fewer than ``k``
            samples and ``replacement`` is False.

    Example:
        >>> import torch
        >>> from higher.learn2learn.data import MetaDataset
        >>> from higher.learn2learn.data.transforms import KShots
        >>> data = MetaDataset(torch.utils.data.TensorDataset(torch.zeros(6), torch.tensor([0, 1, 2] * 2)))
        >>> [data.indices_to_labels[d.index] for d in KShots(data, k=2)(None)]
        [0, 0, 1, 1, 2, 2]
    """

    def __init__(self, dataset: MetaDataset, k: int = 1, replacement: bool = False) -> None:
        super().__init__(_check_meta(dataset, "KShots"))
        self.k = _positive_int(k, "KShots", "k")
        self.replacement = replacement

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        k, replacement = self.k, self.replacement
        out: TaskDescription = []
        if task_description is None:
            for label, indices in self.dataset.labels_to_indices.items():
                picks = _shots_of(indices, k, replacement, "KShots", label)
                out.extend(DataDescription(i) for i in picks)
            return out
        for label, group in _group(self.dataset, task_description).items():
            picks = _shots_of(group, k, replacement, "KShots", label)
            out.extend(_copy(dd) for dd in picks) if replacement else out.extend(picks)
        return out


class FilterLabels(TaskTransform):
    """Keeps the samples whose label is in ``labels``.

    Args:
        dataset: the MetaDataset.
        labels: the labels to keep.

    Raises:
        ValueError: a label in ``labels`` is not in the dataset.

    Example:
        >>> import torch
        >>> from higher.learn2learn.data import MetaDataset
        >>> from higher.learn2learn.data.transforms import FilterLabels
        >>> data = MetaDataset(torch.utils.data.TensorDataset(torch.zeros(6), torch.tensor([0, 1, 2] * 2)))
        >>> [d.index for d in FilterLabels(data, [2, 0])(None)]
        [0, 2, 3, 5]
    """

    def __init__(self, dataset: MetaDataset, labels: Sequence[Hashable]) -> None:
        super().__init__(_check_meta(dataset, "FilterLabels"))
        self.labels = list(labels)
        missing = [label for label in self.labels if label not in dataset.labels_to_indices]
        if missing:
            raise ValueError(
                f"FilterLabels: labels {missing[:10]} are not in the dataset; pass labels "
                "from `dataset.labels`"
            )
        self._kept = set(self.labels)
        self.filtered_indices = sorted(
            i for label in self._kept for i in dataset.labels_to_indices[label]
        )

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        if task_description is None:
            return [DataDescription(i) for i in self.filtered_indices]
        labels, kept = self.dataset.indices_to_labels, self._kept
        return [dd for dd in task_description if labels[dd.index] in kept]


class FusedNWaysKShots(TaskTransform):
    """``FilterLabels``, ``NWays`` and ``KShots`` in one pass.

    Draws ``n`` labels among ``filter_labels`` (those present in the
    description, or in the dataset on ``None``), then ``k`` samples of each,
    label after label.

    Args:
        dataset: the MetaDataset.
        n: the number of labels (ways).
        k: samples per label (shots).
        replacement: draw the samples with replacement.
        filter_labels: the labels to draw from; all of the dataset's when None.

    Raises:
        ValueError: ``n`` or ``k`` is not positive, ``n`` exceeds the labels
            available, or a drawn label has fewer than ``k`` samples without
            ``replacement``.

    Example:
        >>> import torch
        >>> from higher.learn2learn.data import MetaDataset
        >>> from higher.learn2learn.data.transforms import FusedNWaysKShots
        >>> data = MetaDataset(torch.utils.data.TensorDataset(torch.zeros(9), torch.tensor([0, 1, 2] * 3)))
        >>> task = FusedNWaysKShots(data, n=2, k=3, filter_labels=[0, 1])(None)
        >>> sorted(data.indices_to_labels[d.index] for d in task)
        [0, 0, 0, 1, 1, 1]
    """

    def __init__(
        self,
        dataset: MetaDataset,
        n: int = 2,
        k: int = 1,
        replacement: bool = False,
        filter_labels: Sequence[Hashable] | None = None,
    ) -> None:
        super().__init__(_check_meta(dataset, "FusedNWaysKShots"))
        self.n = _positive_int(n, "FusedNWaysKShots", "n")
        self.k = _positive_int(k, "FusedNWaysKShots", "k")
        self.replacement = replacement
        self.filter_labels = list(dataset.labels if filter_labels is None else filter_labels)
        missing = [x for x in self.filter_labels if x not in dataset.labels_to_indices]
        if missing:
            raise ValueError(
                f"FusedNWaysKShots: filter_labels {missing[:10]} are not in the dataset; pass "
                "labels from `dataset.labels`"
            )
        if n > len(self.filter_labels):  # refused before any task (never draws here)
            _pick_ways(n, self.filter_labels, "FusedNWaysKShots", "filter_labels")
        self._kept = set(self.filter_labels)

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        n, k, replacement = self.n, self.k, self.replacement
        out: TaskDescription = []
        if task_description is None:
            return _draw(self.dataset, self.filter_labels, n, k, replacement, "FusedNWaysKShots")
        # On a description, learn2learn applies FilterLabels, NWays, then KShots.
        labels, kept = self.dataset.indices_to_labels, self._kept
        groups = _group(self.dataset, [dd for dd in task_description if labels[dd.index] in kept])
        where = "the task description (within filter_labels)"
        chosen = set(_pick_ways(n, _set_order(groups), "FusedNWaysKShots", where))
        for label in [label for label in groups if label in chosen]:
            picks = _shots_of(groups[label], k, replacement, "FusedNWaysKShots", label)
            out.extend(_copy(dd) for dd in picks) if replacement else out.extend(picks)
        return out


class LoadData(TaskTransform):
    """Adds the loading of each sample (``dataset[index]``) to its description.

    Args:
        dataset: the dataset to load from.

    Example:
        >>> import torch
        >>> from higher.learn2learn.data import DataDescription, MetaDataset
        >>> from higher.learn2learn.data.transforms import LoadData
        >>> data = MetaDataset(torch.utils.data.TensorDataset(torch.arange(3.0), torch.tensor([0, 1, 0])))
        >>> dd = LoadData(data)([DataDescription(2)])[0]
        >>> dd.transforms[0](dd.index)
        (tensor(2.), tensor(0))
    """

    def __init__(self, dataset: Any) -> None:
        super().__init__(dataset)
        # A MetaDataset that does not override indexing forwards to the dataset it
        # wraps: call that one directly, one Python call less per sample.
        while (
            isinstance(dataset, MetaDataset)
            and type(dataset).__getitem__ is MetaDataset.__getitem__
        ):
            dataset = dataset.dataset
        self._load: Callable[[int], Any] = dataset.__getitem__

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        if task_description is None:
            task_description = self.new_task()
        load = self._load
        for dd in task_description:
            dd.transforms.append(load)
        return task_description


class _TensorLoader:
    """``TensorDataset.__getitem__`` with its generator spelled out (a class, so it pickles).

    The generator is a third of the time of loading a sample.
    """

    __slots__ = ("dataset",)

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __call__(self, index: int) -> tuple[Any, ...]:
        tensors = self.dataset.tensors
        if len(tensors) == 2:
            return (tensors[0][index], tensors[1][index])
        return tuple(t[index] for t in tensors)


def _sort_key(labels: list[Hashable]) -> list[Hashable]:
    try:
        return sorted(labels)  # type: ignore[type-var]
    except TypeError:  # labels of mixed types: keep their order of appearance
        return labels


class RemapLabels(TaskTransform):
    """Renumbers the task's labels ``0, ..., ways - 1`` in the loaded samples.

    Adds to each description a function that replaces the second item of the
    loaded sample (its label) by the label's number in the task; it goes after
    ``LoadData``. As in learn2learn, int labels are numbered in the order of
    ``set(labels)`` (CPython's, deterministic for ints), shuffled with
    :mod:`random` first when ``shuffle``; other labels with ``shuffle=False``
    in ascending order (of first appearance when they cannot be sorted),
    where learn2learn's order changed with each run's string hashing.

    Args:
        dataset: the MetaDataset.
        shuffle: number the labels in random order.

    Example:
        >>> import torch
        >>> from higher.learn2learn.data import DataDescription, MetaDataset
        >>> from higher.learn2learn.data.transforms import LoadData, RemapLabels
        >>> data = MetaDataset(torch.utils.data.TensorDataset(torch.arange(4.0), torch.tensor([7, 3, 7, 3])))
        >>> task = RemapLabels(data, shuffle=False)(LoadData(data)([DataDescription(i) for i in range(4)]))
        >>> [dd.transforms[1](dd.transforms[0](dd.index))[1] for dd in task]
        [1, 0, 1, 0]
    """

    def __init__(self, dataset: MetaDataset, shuffle: bool = True) -> None:
        super().__init__(_check_meta(dataset, "RemapLabels"))
        self.shuffle = shuffle

    @staticmethod
    def remap(data: Sequence[Any], mapping: Callable[[Any], int]) -> list[Any]:
        """``data`` as a list with its second item (the label) replaced by ``mapping(label)``."""
        out = list(data)
        out[1] = mapping(out[1])
        return out

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        if task_description is None:
            task_description = self.new_task()
        labels = self.dataset.indices_to_labels
        # learn2learn numbers the labels in the iteration order of a set of them, then
        # shuffles that list: for int labels CPython's set order is deterministic, so the
        # same random state gives the same numbering as learn2learn's.
        present = _set_order(labels[dd.index] for dd in task_description)
        if self.shuffle:
            random.shuffle(present)
        elif not all(type(label) is int for label in present):
            present = _sort_key(present)  # learn2learn's set order changed from run to run
        remap = _Remap({label: i for i, label in enumerate(present)})
        for dd in task_description:
            dd.transforms.append(remap)
        return task_description


class _Remap:
    """One task's relabelling of loaded samples (a class so descriptions pickle)."""

    __slots__ = ("mapping",)

    def __init__(self, mapping: dict[Hashable, int]) -> None:
        self.mapping = mapping

    def __call__(self, data: Sequence[Any]) -> list[Any]:
        out = list(data)
        label = out[1]
        out[1] = self.mapping[label.item() if hasattr(label, "item") else label]
        return out


class ConsecutiveLabels(TaskTransform):
    """Orders the samples by label (stable), so each label's samples are contiguous.

    Before ``RemapLabels`` the groups come in the original labels' order, which
    is not the order of the new labels.

    Args:
        dataset: the MetaDataset.

    Example:
        >>> import torch
        >>> from higher.learn2learn.data import DataDescription, MetaDataset
        >>> from higher.learn2learn.data.transforms import ConsecutiveLabels
        >>> data = MetaDataset(torch.utils.data.TensorDataset(torch.zeros(4), torch.tensor([1, 0, 1, 0])))
        >>> [d.index for d in ConsecutiveLabels(data)([DataDescription(i) for i in range(4)])]
        [1, 3, 0, 2]
    """

    def __init__(self, dataset: MetaDataset) -> None:
        super().__init__(_check_meta(dataset, "ConsecutiveLabels"))

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        if task_description is None:
            task_description = self.new_task()
        labels = self.dataset.indices_to_labels
        return sorted(task_description, key=lambda dd: labels[dd.index])  # type: ignore[arg-type,return-value]


def __getattr__(name: str) -> Any:
    return missing(__name__, name)
