"""Every module path of learn2learn 0.2.0 imports under higher.learn2learn, with its names.

The paths and names are read from learn2learn's source distribution
(:mod:`learn2learn_sdist`), so none can be missed: each ``.py``/``.pyx`` module of
its package. A name resolves to the same object as in the enclosing modules
here, or, when out of scope, raises ``NotImplementedError`` saying what to use.
"""

from __future__ import annotations

import ast
import importlib

import pytest
from learn2learn_sdist import learn2learn_sdist


def _paths_and_names() -> dict[str, set[str]]:
    package = learn2learn_sdist() / "learn2learn"
    found: dict[str, set[str]] = {}
    for source in sorted([*package.rglob("*.py"), *package.rglob("*.pyx")]):
        parts = list(source.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        tree = ast.parse(source.read_text(), str(source)) if source.suffix == ".py" else None
        names: set[str] = set()
        for node in tree.body if tree else []:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("learn2learn")
            ):  # names it takes from learn2learn itself (others are not its API)
                names.update(a.asname or a.name for a in node.names if a.name != "*")
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        found[".".join(parts)] = {n for n in names if not n.startswith("_")}
    return found


def test_every_module_path_imports_and_resolves_to_the_same_objects():
    checked, missing = 0, []
    for path, names in _paths_and_names().items():
        module = importlib.import_module("higher." + path)
        parents = [
            importlib.import_module("higher." + ".".join(path.split(".")[:i]))
            for i in range(path.count(".") + 1, 0, -1)
        ][1:]
        # Module constants (download URLs, split tables, EPS) are internals, not provided.
        for name in sorted(n for n in names if not n.isupper()):
            try:
                value = getattr(module, name)
            except NotImplementedError as err:
                assert "is not supported" in str(err) or "is not provided" in str(err), err
                continue
            except AttributeError:
                missing.append(f"{path}.{name}")
                continue
            for parent in parents:
                if name in vars(parent):
                    assert value is vars(parent)[name], f"{path}.{name}"
                    break
            checked += 1
    assert not missing, f"learn2learn names missing here: {missing}"
    assert checked > 150


def test_deep_paths_refer_to_the_top_level_objects():
    import higher.learn2learn as l2l
    from higher.learn2learn.algorithms.base_learner import BaseLearner
    from higher.learn2learn.nn.metalayers import MetaModule

    assert BaseLearner is l2l.algorithms.BaseLearner and MetaModule is l2l.nn.MetaModule
    assert l2l.algorithms.maml.maml_update is l2l.algorithms.maml_update  # read, not imported
    assert l2l.optim.update_rules.differentiable_sgd.update_module is l2l.update_module
    assert l2l.data.transforms.CythonNWays is l2l.data.transforms.NWays
    with pytest.raises(NotImplementedError, match="gym.*gymnasium"):
        from higher.learn2learn.gym.envs.mujoco import AntDirectionEnv  # noqa: F401
    with pytest.raises(NotImplementedError, match="Lightning"):
        _ = l2l.algorithms.lightning.lightning_maml.LightningMAML
    with pytest.raises(NotImplementedError, match="Downloading is out of scope|downloading"):
        _ = l2l.vision.datasets.mini_imagenet.download_pkl
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = l2l.nn.metalayers.nonexistent
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("higher.learn2learn.algorithms.nonexistent")
