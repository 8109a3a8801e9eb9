"""The learn2learn 0.2.0 names this package does not provide, and how it refuses them.

Each refusal raises ``NotImplementedError`` naming the alternative. Not an
``AttributeError``: ``from module import name`` would replace its message by a
bare "cannot import name".
"""

from __future__ import annotations

from typing import NoReturn


def refuse(module: str, name: str, reason: str) -> NoReturn:
    """Raises the error for ``module.name``, which is not provided for ``reason``."""
    raise NotImplementedError(f"{module}.{name} is not supported by higher.learn2learn: {reason}")


def missing(module: str, name: str) -> NoReturn:
    """Raises the usual error for a name that does not exist at all."""
    raise AttributeError(f"module {module!r} has no attribute {name!r}")


GYM = (
    "learn2learn.gym (meta-reinforcement-learning environments on the unmaintained gym) is "
    "out of scope; use gymnasium environments and adapt policies with "
    "higher.learn2learn.algorithms.MAML"
)
TEXT = (
    "learn2learn.text (the NewsClassification dataset) is out of scope; load the data "
    "yourself and sample tasks with higher.learn2learn.data.TaskDataset"
)
