"""learn2learn's ``vision.transforms``: a random rotation per class, as a task transform."""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from ..data import MetaDataset
from ..data.description import DataDescription

__all__ = ["RandomClassRotation"]


class _Rotate:
    """Rotates the image (first item) of a loaded sample; the other items pass through."""

    __slots__ = ("degrees", "turns")

    def __init__(self, degrees: float) -> None:
        self.degrees = float(degrees)
        quarter = self.degrees / 90.0
        self.turns = int(quarter) % 4 if quarter.is_integer() else None
        if self.turns is None:
            _torchvision_rotate(self.degrees)  # fails now, not in the middle of training

    def __call__(self, data: Sequence[Any]) -> tuple[Any, ...]:
        image = data[0]
        if self.turns is None:
            image = _torchvision_rotate(self.degrees)(image, self.degrees)
        elif self.turns:
            image = torch.rot90(image, self.turns, dims=(-2, -1))
        return (image, *data[1:])


def _torchvision_rotate(degrees: float) -> Any:
    try:
        from torchvision.transforms.functional import rotate
    except ImportError as err:
        raise ImportError(
            f"RandomClassRotation: a rotation by {degrees} degrees (not a multiple of 90) "
            "needs torchvision, which is not installed: pip install torchvision"
        ) from err
    return rotate


class RandomClassRotation:
    """Rotates all images of a class by one angle drawn per class and task.

    A task transform: for each label in the task it draws one of ``degrees``
    (uniformly, with Python's :mod:`random`) and adds the rotation to the
    descriptions of that label's samples; it goes after ``LoadData``. Angles
    that are multiples of 90 rotate exactly (``torch.rot90``, counter-clockwise
    as torchvision's ``rotate``); other angles need torchvision.

    Args:
        dataset: the MetaDataset the descriptions index into.
        degrees: the angles to draw from.

    Example:
        >>> import torch
        >>> from higher.learn2learn.data import DataDescription, MetaDataset
        >>> from higher.learn2learn.vision.transforms import RandomClassRotation
        >>> data = MetaDataset(torch.utils.data.TensorDataset(torch.eye(2)[None].repeat(2, 1, 1), torch.tensor([0, 0])))
        >>> dd = RandomClassRotation(data, [90.0])([DataDescription(0)])[0]
        >>> dd.transforms[0](data[0])[0]
        tensor([[0., 1.],
                [1., 0.]])
    """

    def __init__(self, dataset: MetaDataset, degrees: Sequence[float]) -> None:
        self.dataset = dataset
        self.degrees = list(degrees)
        if not self.degrees:
            raise ValueError("RandomClassRotation: `degrees` is empty; pass e.g. [0, 90, 180, 270]")
        self._rotations = [_Rotate(d) for d in self.degrees]

    def __call__(self, task_description: list[DataDescription]) -> list[DataDescription]:
        labels = self.dataset.indices_to_labels
        chosen: dict[Hashable, _Rotate] = {}
        for dd in task_description:
            label = labels[dd.index]
            rotate = chosen.get(label)
            if rotate is None:
                rotate = chosen[label] = random.choice(self._rotations)
            dd.transforms.append(rotate)
        return task_description
