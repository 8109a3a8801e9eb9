"""learn2learn 0.2.0's API on higher's core: ``import higher.learn2learn as l2l``.

learn2learn, the meta-learning library, does not install on Python 3.11 or
newer (its compiled extension includes a header that Python 3.11 removed).
This subpackage gives its programs the same names, signatures and defaults,
as a thin layer over higher: a learner's ``clone()`` is a patched copy of the
model on fast weights (:func:`higher.monkeypatch`), ``adapt()`` is a step of
higher's differentiable SGD (:mod:`higher.optim`), so every model higher
patches works (transformers, RNNs, BatchNorm, compiled models) and long
adaptations can be checkpointed (:mod:`higher.checkpoint`). The data and
vision modules are plain Python and torch. What differs from learn2learn, and
what is not provided (the Lightning modules, ``gym``, ``text``, MetaOptNet's
``qpth`` solver), is listed name by name in the "From learn2learn" guide.

Example:
    >>> import higher.learn2learn as l2l
    >>> maml = l2l.algorithms.MAML(nn.Linear(2, 1), lr=0.1)
    >>> learner = maml.clone()
    >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
    >>> learner.adapt(nn.functional.mse_loss(learner(x), y))
    >>> nn.functional.mse_loss(learner(x), y).backward()
    >>> maml.module.weight.grad is not None
    True
"""

from typing import Any

from . import _paths, algorithms, data, nn, optim, utils, vision
from . import gym as gym  # out of scope: each of its names says what to use instead
from . import text as text  # likewise
from ._paths import missing
from .utils import (
    accuracy,
    clone_distribution,
    clone_module,
    clone_named_parameters,
    clone_parameters,
    detach_distribution,
    detach_module,
    flatten_config,
    magic_box,
    update_module,
    warn_once,
)

__all__ = [
    "accuracy",
    "algorithms",
    "clone_distribution",
    "clone_module",
    "clone_named_parameters",
    "clone_parameters",
    "data",
    "detach_distribution",
    "detach_module",
    "flatten_config",
    "magic_box",
    "nn",
    "optim",
    "update_module",
    "utils",
    "vision",
    "warn_once",
]

#: The learn2learn release whose API this package follows.
__version__ = "0.2.0"
_paths.install()


def __getattr__(name: str) -> Any:
    return missing(__name__, name)
