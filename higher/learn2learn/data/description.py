"""``DataDescription``: one sample of a task, as an index and the functions that load it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["DataDescription"]


class DataDescription:
    """One sample of a task description: its index and the functions applied to it.

    ``transforms`` starts empty; task transforms such as ``LoadData`` and
    ``RemapLabels`` append to it, and the task dataset applies the functions in
    order, starting from ``index``.

    Args:
        index: the sample's index in the dataset.

    Example:
        >>> from higher.learn2learn.data import DataDescription
        >>> dd = DataDescription(4)
        >>> dd.transforms.append(lambda i: i * 10)
        >>> dd.index, dd.transforms[0](dd.index)
        (4, 40)
    """

    __slots__ = ("index", "transforms")

    def __init__(self, index: int) -> None:
        self.index = index
        self.transforms: list[Callable[[Any], Any]] = []

    def __repr__(self) -> str:
        return f"DataDescription(index={self.index}, transforms={len(self.transforms)})"
