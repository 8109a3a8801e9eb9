"""Runs pytest with ``learn2learn`` (and every ``learn2learn.*``) imported as ``higher.learn2learn``.

Usage: ``python tests/learn2learn_alias.py <pytest arguments>``, from the folder
of learn2learn's own tests: they run unmodified, against this package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from typing import Any


class Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import learn2learn.X`` with the module ``higher.learn2learn.X``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == "learn2learn" or fullname.startswith("learn2learn."):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        return importlib.import_module("higher." + spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # already imported under its own name


def install() -> None:
    """Puts the alias first on ``sys.meta_path``."""
    sys.meta_path.insert(0, Alias())


if __name__ == "__main__":
    install()
    import pytest

    sys.exit(pytest.main(sys.argv[1:]))
