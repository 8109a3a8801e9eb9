"""learn2learn's ``vision.benchmarks``: the standard few-shot tasksets, here Omniglot's.

:func:`get_tasksets` returns the train, validation and test tasksets of a
benchmark with the data and task transforms of the literature. Omniglot is
read from a folder (see :class:`~higher.learn2learn.vision.datasets.FullOmniglot`)
and downloaded only with ``download=True``. The other benchmarks of
learn2learn have no offline path and are refused with the alternative.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .._paths import missing
from ..data import FilteredMetaDataset, MetaDataset, OnDeviceDataset, TaskDataset
from ..data.transforms import ConsecutiveLabels, FusedNWaysKShots, LoadData, RemapLabels
from .datasets import _ALTERNATIVE, FullOmniglot, _pil_image
from .transforms import RandomClassRotation

__all__ = ["BenchmarkTasksets", "get_tasksets", "list_tasksets"]

# learn2learn's module paths below this one (``vision.benchmarks.*``) are made by ``_paths``.
__path__: list[str] = []

_REFUSED = ("mini-imagenet", "tiered-imagenet", "fc100", "cifarfs")


class BenchmarkTasksets(NamedTuple):
    """The three tasksets of a benchmark."""

    train: TaskDataset
    validation: TaskDataset
    test: TaskDataset


def list_tasksets() -> list[str]:
    """The names :func:`get_tasksets` accepts.

    Example:
        >>> from higher.learn2learn.vision.benchmarks import list_tasksets
        >>> list_tasksets()
        ['omniglot']
    """
    return ["omniglot"]


def _omniglot_image(image: Any) -> torch.Tensor:
    """An Omniglot PIL image as learn2learn's benchmark feeds it: 28x28, ink high, in [0, 1].

    Lanczos resampling to 28x28, scaled to [0, 1] and inverted, as
    torchvision's ``Resize(28, LANCZOS)``, ``ToTensor()`` and ``1 - x`` do,
    without torchvision. Returns a ``(1, 28, 28)`` float tensor.
    """
    image = image.convert("L").resize((28, 28), _pil_image().LANCZOS)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return 1.0 - pixels.view(1, 28, 28).float().div(255)


def _split(num_classes: int) -> tuple[int, int]:
    """Train and validation class counts: learn2learn's 1,100 / 100 of 1,623, else in proportion."""
    if num_classes == 1623:
        return 1100, 100
    if num_classes < 3:
        raise ValueError(
            f"get_tasksets('omniglot'): the folder holds {num_classes} characters; three "
            "splits need at least 3"
        )
    train = min(max(1, round(num_classes * 1100 / 1623)), num_classes - 2)
    validation = min(max(1, round(num_classes * 100 / 1623)), num_classes - train - 1)
    return train, validation


def _refused_tasksets(name: str) -> Any:
    """learn2learn's ``<name>_tasksets`` of a benchmark with no offline path here."""

    def tasksets(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{name}_tasksets is not provided: {_ALTERNATIVE}")

    tasksets.__name__ = tasksets.__qualname__ = f"{name}_tasksets"
    tasksets.__doc__ = f"Refused: learn2learn's {name} benchmark has no offline path here."
    return tasksets


mini_imagenet_tasksets = _refused_tasksets("mini_imagenet")
tiered_imagenet_tasksets = _refused_tasksets("tiered_imagenet")
fc100_tasksets = _refused_tasksets("fc100")
cifarfs_tasksets = _refused_tasksets("cifarfs")


def omniglot_tasksets(
    train_ways: int,
    train_samples: int,
    test_ways: int,
    test_samples: int,
    root: str,
    device: torch.device | str | None = None,
    download: bool = False,
    transform: Callable[[Any], Any] | None = None,
) -> tuple[list[MetaDataset], list[list[Any]]]:
    """learn2learn's Omniglot benchmark: ``([train, validation, test] datasets, their task
    transforms)``, which :func:`get_tasksets` ("omniglot") builds its tasksets from."""
    data: Any = FullOmniglot(root, transform=transform or _omniglot_image, download=download)
    if device is not None:
        data = OnDeviceDataset(data, device=device)
    dataset = MetaDataset(data)
    classes = list(dataset.labels)
    random.shuffle(classes)
    n_train, n_val = _split(len(classes))
    splits: list[MetaDataset] = [
        FilteredMetaDataset(dataset, classes[:n_train]),
        FilteredMetaDataset(dataset, classes[n_train : n_train + n_val]),
        FilteredMetaDataset(dataset, classes[n_train + n_val :]),
    ]
    transforms: list[list[Any]] = []
    for split, (ways, samples) in zip(
        splits,
        [(train_ways, train_samples), (test_ways, test_samples), (test_ways, test_samples)],
    ):
        transforms.append(
            [
                FusedNWaysKShots(split, n=ways, k=samples),
                LoadData(split),
                RemapLabels(split),
                ConsecutiveLabels(split),
                RandomClassRotation(split, [0.0, 90.0, 180.0, 270.0]),
            ]
        )
    return splits, transforms


def get_tasksets(
    name: str,
    train_ways: int = 5,
    train_samples: int = 10,
    test_ways: int = 5,
    test_samples: int = 10,
    num_tasks: int = -1,
    root: str = "~/data",
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> BenchmarkTasksets:
    """The train, validation and test tasksets of a few-shot benchmark.

    For ``'omniglot'``: images resized to 28x28 with ink high; the classes
    shuffled with Python's :mod:`random` and split 1,100 / 100 / 423 (in
    proportion for a folder with another number of characters); each task
    ``ways`` classes of ``samples`` images each (support and query together),
    labels ``0..ways-1`` with each class's samples contiguous, and each class
    rotated by a random multiple of 90 degrees. Each split's transforms draw
    from that split's classes only.

    Args:
        name: the benchmark; see :func:`list_tasksets`.
        train_ways: classes per training task.
        train_samples: samples per class in a training task.
        test_ways: classes per validation and test task.
        test_samples: samples per class in a validation and test task.
        num_tasks: tasks per taskset (-1: a new task each time).
        root: where the data is (see :class:`~higher.learn2learn.vision.datasets.FullOmniglot`).
        device: when given, the whole dataset is loaded once into tensors on it.
        **kwargs: ``download=True`` downloads Omniglot into ``root`` when it is
            not there; ``transform`` replaces the image transform.

    Raises:
        NotImplementedError: a benchmark of learn2learn without an offline path.
        ValueError: an unknown name.
        FileNotFoundError: no Omniglot under ``root`` and ``download`` not set.

    Example:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from higher.learn2learn.vision.benchmarks import get_tasksets
        >>> root = tempfile.mkdtemp()
        >>> for c in range(3):
        ...     folder = os.path.join(root, "images_background", "Alphabet", f"c{c}")
        ...     os.makedirs(folder)
        ...     for d in range(2):
        ...         Image.new("L", (105, 105), 255).save(os.path.join(folder, f"{d}.png"))
        >>> tasksets = get_tasksets("omniglot", 1, 2, 1, 2, root=root)
        >>> x, y = tasksets.train.sample()
        >>> x.shape, y.tolist()
        (torch.Size([2, 1, 28, 28]), [0, 0])
    """
    if name in _REFUSED:
        raise NotImplementedError(f"get_tasksets({name!r}) is not provided: {_ALTERNATIVE}")
    if name != "omniglot":
        raise ValueError(f"get_tasksets: unknown benchmark {name!r}; known: {list_tasksets()}")
    unknown = set(kwargs) - {"download", "transform"}
    if unknown:
        raise TypeError(f"get_tasksets('omniglot') got unexpected arguments {sorted(unknown)}")
    datasets, transforms = omniglot_tasksets(
        train_ways, train_samples, test_ways, test_samples, root, device, **kwargs
    )
    return BenchmarkTasksets(
        *(
            TaskDataset(dataset, task_transforms=t, num_tasks=num_tasks)
            for dataset, t in zip(datasets, transforms)
        )
    )


def __getattr__(name: str) -> Any:
    return missing(__name__, name)
