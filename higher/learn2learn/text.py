"""learn2learn's ``text``: not provided; its names raise an error naming the alternative.

The module exists so that ``l2l.text.X``, ``import higher.learn2learn.text`` and
``from higher.learn2learn.text import X`` all say what to use instead.
"""

from __future__ import annotations

from typing import Any

from ._paths import missing
from ._refused import TEXT, refuse

__all__: list[str] = []

# learn2learn's module paths below this one (``text.*``) are made by ``_paths``.
__path__: list[str] = []

#: learn2learn 0.2.0's public names of the module.
NAMES: tuple[str, ...] = ()  # its one name, datasets, is a module path


def __getattr__(name: str) -> Any:
    if name in NAMES:
        refuse("learn2learn.text", name, TEXT)
    return missing(__name__, name)
