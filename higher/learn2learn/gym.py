"""learn2learn's ``gym``: not provided; its names raise an error naming the alternative.

The module exists so that ``l2l.gym.X``, ``import higher.learn2learn.gym`` and
``from higher.learn2learn.gym import X`` all say what to use instead.
"""

from __future__ import annotations

from typing import Any

from ._paths import missing
from ._refused import GYM, refuse

__all__: list[str] = []

# learn2learn's module paths below this one (``gym.*``) are made by ``_paths``.
__path__: list[str] = []

#: learn2learn 0.2.0's public names of the module.
NAMES = ("AsyncVectorEnv", "MetaEnv")


def __getattr__(name: str) -> Any:
    if name in NAMES:
        refuse("learn2learn.gym", name, GYM)
    return missing(__name__, name)
