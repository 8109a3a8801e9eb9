"""learn2learn's ``text``: not provided; its names raise an error naming the alternative.

The module exists so that ``l2l.text.X``, ``import higher.learn2learn.text`` and
``from higher.learn2learn.text import X`` all say what to use instead.
"""

from __future__ import annotations

from typing import NoReturn

from ._refused import TEXT, missing, refuse

__all__: list[str] = []

#: learn2learn 0.2.0's public names of the module.
NAMES = ("datasets",)


def __getattr__(name: str) -> NoReturn:
    if name in NAMES:
        refuse("learn2learn.text", name, TEXT)
    missing(__name__, name)
