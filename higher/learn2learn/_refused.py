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


GYM = (
    "learn2learn.gym (meta-reinforcement-learning environments on the unmaintained gym) is "
    "out of scope; use gymnasium environments and adapt policies with "
    "higher.learn2learn.algorithms.MAML"
)
LIGHTNING = (
    "PyTorch Lightning modules are out of scope; call clone() and adapt() of MAML or MetaSGD "
    "in your own LightningModule's training_step, or write the loop in plain PyTorch"
)
TEXT = (
    "learn2learn.text (the NewsClassification dataset) is out of scope; load the data "
    "yourself and sample tasks with higher.learn2learn.data.TaskDataset"
)
