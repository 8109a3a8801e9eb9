"""learn2learn 0.2.0's module paths, each resolving to this package's objects.

learn2learn's programs import from deep paths (``learn2learn.algorithms.maml``,
``learn2learn.nn.metalayers``, ``learn2learn.vision.models.resnet12``). This
package keeps one module per area, so those paths are made at import time from
the table below: each is a module whose names are read from the module that
implements them here, so that ``higher.learn2learn.algorithms.maml.MAML is
higher.learn2learn.algorithms.MAML``. Paths of what is out of scope (Lightning,
``gym``, ``text``) import, and their names raise the error naming the alternative.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

from ._refused import GYM, LIGHTNING, TEXT, refuse

PREFIX = "higher.learn2learn."

# Each path of learn2learn 0.2.0's package tree that this package has no file for:
# (the module here whose names it gives, its public names). Names of learn2learn's
# modules that are submodules need no entry: they are imported when read.
PATHS: dict[str, tuple[str, tuple[str, ...]]] = {
    "_version": ("", ("__version__",)),
    "algorithms.base_learner": ("algorithms", ("BaseLearner",)),
    "algorithms.gbml": ("algorithms", ("GBML",)),
    "algorithms.maml": (
        "algorithms",
        ("BaseLearner", "MAML", "clone_module", "maml_update", "update_module"),
    ),
    "algorithms.meta_sgd": (
        "algorithms",
        ("BaseLearner", "MetaSGD", "clone_module", "clone_parameters", "meta_sgd_update"),
    ),
    "data.samplers": ("data.utils", ("TasksetSampler",)),
    "nn.kroneckers": (
        "nn",
        ("KroneckerLSTM", "KroneckerLinear", "KroneckerRNN", "kronecker_addmm"),
    ),
    "nn.metalayers": ("nn", ("MetaModule", "ParameterTransform")),
    "nn.metalayers.metamodule": ("nn", ("MetaModule",)),
    "nn.metalayers.parameter_transform": ("nn", ("ParameterTransform",)),
    "nn.metaoptnet": ("nn", ("SVClassifier", "kronecker", "onehot", "svm_logits")),
    "nn.misc": ("nn", ("Flatten", "Lambda", "Scale", "freeze", "unfreeze")),
    "nn.protonet": ("nn", ("PrototypicalClassifier", "compute_prototypes")),
    "optim.learnable_optimizer": ("optim", ("LearnableOptimizer",)),
    "optim.parameter_update": ("optim", ("ParameterUpdate",)),
    "optim.update_rules": ("optim", ("DifferentiableSGD",)),
    "optim.update_rules.differentiable_sgd": ("optim", ("DifferentiableSGD", "update_module")),
    "optim.transforms.kronecker_transform": (
        "optim.transforms",
        ("KroneckerTransform", "get_kronecker_dims"),
    ),
    "optim.transforms.metacurvature_transform": ("optim.transforms", ("MetaCurvatureTransform",)),
    "optim.transforms.module_transform": (
        "optim.transforms",
        ("ModuleTransform", "ReshapedTransform"),
    ),
    "optim.transforms.transform_dictionary": ("optim.transforms", ("TransformDictionary",)),
    "vision.models.cnn4": (
        "vision.models",
        (
            "CNN4",
            "CNN4Backbone",
            "ConvBase",
            "ConvBlock",
            "LinearBlock",
            "MiniImagenetCNN",
            "OmniglotCNN",
            "OmniglotFC",
            "fc_init_",
            "maml_init_",
            "truncated_normal_",
        ),
    ),
    "vision.models.resnet12": (
        "vision._resnet12",
        ("BasicBlock", "DropBlock", "ResNet12", "ResNet12Backbone", "conv3x3"),
    ),
    "vision.models.wrn28": (
        "vision._wrn28",
        ("WRN28", "WRN28Backbone", "WideResNet", "conv3x3", "conv_init", "wide_basic"),
    ),
}
# learn2learn's dataset modules also hold their download helpers (refused below).
_GDRIVE = ("download_file", "download_file_from_google_drive")
_DATASET_EXTRAS = {
    "cifarfs": _GDRIVE,
    "cu_birds200": _GDRIVE,
    "describable_textures": ("download_file",),
    "fc100": _GDRIVE,
    "fgvc_fungi": ("download_file",),
    "mini_imagenet": (*_GDRIVE, "download_pkl", "index_classes"),
    "quickdraw": ("download_file",),
    "tiered_imagenet": _GDRIVE,
    "vgg_flowers": ("download_file",),
}
_BENCHMARKS = ("cifarfs", "fc100", "mini_imagenet", "omniglot", "tiered_imagenet")
for _b in _BENCHMARKS:
    _transforms = ("NWays", "KShots", "LoadData", "RemapLabels", "ConsecutiveLabels")
    _names = (f"{_b}_tasksets",) if _b == "omniglot" else (f"{_b}_tasksets", *_transforms)
    PATHS[f"vision.benchmarks.{_b}_benchmark"] = ("vision.benchmarks", _names)
for _d, _cls in {
    "cifarfs": "CIFARFS",
    "cu_birds200": "CUBirds200",
    "describable_textures": "DescribableTextures",
    "fc100": "FC100",
    "fgvc_aircraft": "FGVCAircraft",
    "fgvc_fungi": "FGVCFungi",
    "full_omniglot": "FullOmniglot",
    "mini_imagenet": "MiniImagenet",
    "quickdraw": "Quickdraw",
    "tiered_imagenet": "TieredImagenet",
    "vgg_flowers": "VGGFlower102",
}.items():
    PATHS[f"vision.datasets.{_d}"] = ("vision.datasets", (_cls, *_DATASET_EXTRAS.get(_d, ())))

# Out-of-scope paths: every name raises the area's error.
_GYM_TREE = {
    "gym.async_vec_env": ("AsyncVectorEnv", "SubprocVecEnv"),
    "gym.envs": ("SubprocVecEnv", "meta_env", "subproc_vec_env"),
    "gym.envs.meta_env": ("MetaEnv",),
    "gym.envs.subproc_vec_env": ("EnvWorker", "SubprocVecEnv"),
    "gym.envs.metaworld": ("MetaWorldML1", "MetaWorldML10", "MetaWorldML45"),
    "gym.envs.metaworld.metaworld": ("MetaWorldML1", "MetaWorldML10", "MetaWorldML45"),
    "gym.envs.mujoco": (
        "AntDirectionEnv",
        "AntForwardBackwardEnv",
        "HalfCheetahForwardBackwardEnv",
        "HumanoidDirectionEnv",
        "HumanoidForwardBackwardEnv",
    ),
    "gym.envs.mujoco.ant_direction": ("AntDirectionEnv",),
    "gym.envs.mujoco.ant_forward_backward": ("AntForwardBackwardEnv",),
    "gym.envs.mujoco.dummy_mujoco_env": ("MujocoEnv",),
    "gym.envs.mujoco.halfcheetah_forward_backward": ("HalfCheetahForwardBackwardEnv",),
    "gym.envs.mujoco.humanoid_direction": ("HumanoidDirectionEnv",),
    "gym.envs.mujoco.humanoid_forward_backward": ("HumanoidForwardBackwardEnv",),
    "gym.envs.particles": ("Particles2DEnv",),
    "gym.envs.particles.particles_2d": ("Particles2DEnv",),
}
_LIGHTNING_NAMES = (
    "LightningANIL",
    "LightningEpisodicModule",
    "LightningMAML",
    "LightningMetaOptNet",
    "LightningPrototypicalNetworks",
)
REFUSED_PATHS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{path: (GYM, names) for path, names in _GYM_TREE.items()},
    "text.datasets": (TEXT, ("NewsClassification",)),
    "text.datasets.news_classification": (TEXT, ("NewsClassification",)),
    "algorithms.lightning": (LIGHTNING, _LIGHTNING_NAMES),
    "utils.lightning": (LIGHTNING, ("TrackTestAccuracyCallback", "EpisodicBatcher")),
}
for _m in ("anil", "episodic_module", "maml", "metaoptnet", "protonet"):
    REFUSED_PATHS[f"algorithms.lightning.lightning_{_m}"] = (LIGHTNING, _LIGHTNING_NAMES)

# Names of learn2learn's deep paths that are its internals, absent here, with what to do.
_NO_DOWNLOADS = (
    "downloading is out of scope (the tests and this package make no network calls); "
    "fetch the file yourself, e.g. with urllib.request.urlretrieve"
)
_SVM = (
    "MetaOptNet's SVM head needs the qpth QP solver, which is out of scope; use "
    "PrototypicalClassifier, or solve the QP with qpth or cvxpylayers in your own module"
)
REFUSED_NAMES = {
    "download_file": _NO_DOWNLOADS,
    "download_file_from_google_drive": _NO_DOWNLOADS,
    "download_pkl": _NO_DOWNLOADS,
    "get_confirm_token": _NO_DOWNLOADS,
    "save_response_content": _NO_DOWNLOADS,
    "index_classes": _NO_DOWNLOADS,
    "kronecker": _SVM,
    "onehot": _SVM,
    "svm_logits": _SVM,
}
# learn2learn's internals of its modules that are files here as well.
_DOWNLOADS = ("download_file", "download_file_from_google_drive")
REFUSED_IN = {
    PREFIX + "data.utils": (*_DOWNLOADS, "get_confirm_token", "save_response_content"),
    PREFIX + "vision.models": ("download_file",),
}
# learn2learn's Cython classes, whose pure-Python subclasses are the same here.
ALIASES = {
    PREFIX + "data.transforms": {
        "CythonNWays": "NWays",
        "CythonKShots": "KShots",
        "CythonFilterLabels": "FilterLabels",
        "CythonFusedNWaysKShots": "FusedNWaysKShots",
    },
    PREFIX + "data.task_dataset": {"CythonTaskDataset": "TaskDataset"},
}
# Which paths each parent has, for reading them as attributes (``l2l.algorithms.maml``).
_CHILDREN: dict[str, set[str]] = {}
for _p in (*PATHS, *REFUSED_PATHS):
    _parent, _, _child = _p.rpartition(".")
    _CHILDREN.setdefault(_parent, set()).add(_child)


def submodule(module: str, name: str) -> types.ModuleType | None:
    """The module path ``module.name`` of the table, imported; None if it has none."""
    rel = module[len(PREFIX) :] if module.startswith(PREFIX) else ""
    if name in _CHILDREN.get(rel, ()):
        return importlib.import_module(f"{module}.{name}")
    return None


def _resolve(path: str, source: str, names: tuple[str, ...], name: str) -> Any:
    """Name ``name`` of the made module ``path``: the object of this package it stands for."""
    sub = submodule(PREFIX + path, name)
    if sub is not None:
        return sub
    if name in names:
        if name in REFUSED_NAMES:
            refuse(f"learn2learn.{path}", name, REFUSED_NAMES[name])
        # learn2learn's modules also hold names they import (clone_module, NWays).
        for home in (source, "", "data.transforms"):
            module = importlib.import_module(_full(home))
            if name in vars(module):
                return vars(module)[name]
        return getattr(importlib.import_module(_full(source)), name)  # its own error
    return missing(PREFIX + path, name)


def _refused(path: str, reason: str, name: str) -> Any:
    sub = submodule(PREFIX + path, name)
    if sub is not None:
        return sub
    if name.startswith("_"):  # ``__file__`` and such, which tools probe: the usual error
        return missing(PREFIX + path, name)
    refuse(f"learn2learn.{path}", name, reason)


def _full(rel: str) -> str:
    return PREFIX.rstrip(".") if not rel else PREFIX + rel


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the table's paths under ``higher.learn2learn``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if not fullname.startswith(PREFIX):
            return None
        rel = fullname[len(PREFIX) :]
        if rel not in PATHS and rel not in REFUSED_PATHS:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module

    def exec_module(self, module: types.ModuleType) -> None:
        rel = module.__name__[len(PREFIX) :]
        if rel in PATHS:
            source, names = PATHS[rel]
            module.__doc__ = (
                f"learn2learn's ``{rel}`` module path: the same objects as ``{_full(source)}``."
            )
            module.__all__ = [n for n in names if n not in REFUSED_NAMES]  # type: ignore[attr-defined]
            module.__getattr__ = lambda name: _resolve(rel, source, names, name)  # type: ignore[attr-defined]
        else:
            reason, _ = REFUSED_PATHS[rel]
            module.__doc__ = f"learn2learn's ``{rel}``: out of scope. {reason}."
            module.__all__ = []  # type: ignore[attr-defined]
            module.__getattr__ = lambda name: _refused(rel, reason, name)  # type: ignore[attr-defined]


def install() -> None:
    """Adds the finder to ``sys.meta_path`` (once), after the finders of real files."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())


def missing(module: str, name: str) -> Any:
    """``module.name`` when it is one of learn2learn's module paths (imported on first
    read, as ``l2l.algorithms.maml``), else the usual error for a name that does not exist."""
    alias = ALIASES.get(module, {}).get(name)
    if alias is not None:
        return getattr(sys.modules[module], alias)
    if name in REFUSED_IN.get(module, ()):
        refuse(module.replace("higher.", "", 1), name, REFUSED_NAMES[name])
    sub = submodule(module, name)
    if sub is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return sub
