"""learn2learn's ``gym``: not provided; its names raise an error naming the alternative.

The module exists so that ``l2l.gym.X``, ``import higher.learn2learn.gym`` and
``from higher.learn2learn.gym import X`` all say what to use instead.
"""

from __future__ import annotations

from typing import NoReturn

from ._refused import GYM, missing, refuse

__all__: list[str] = []

#: learn2learn 0.2.0's public names of the module.
NAMES = ("AsyncVectorEnv", "MetaEnv", "async_vec_env", "envs")


def __getattr__(name: str) -> NoReturn:
    if name in NAMES:
        refuse("learn2learn.gym", name, GYM)
    missing(__name__, name)
