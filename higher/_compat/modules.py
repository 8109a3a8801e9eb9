"""Module wrappers and kinds: ``torch.compile``, TorchScript, modules that change buffers unseen."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn


def compiled_inner(module: Any) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) runs, or None.

    Found through ``sys.modules``: a compiled module exists only once dynamo
    was imported, and importing it here would cost every user a second.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        return module._orig_mod
    return None


def run_eagerly(compiled_copy: nn.Module) -> None:
    """Makes the copy of an ``OptimizedModule`` call (the copy of) the module it wraps.

    The copied ``forward`` is the original's compiled function, which reads the
    original's parameters, not the copy's fast weights; and a compiled graph
    has no double backward. So a patched copy runs it eagerly.
    """
    inner: Any = compiled_copy._modules["_orig_mod"]
    compiled_copy.__dict__["forward"] = inner.__call__
    compiled_copy.__dict__.pop("_forward", None)


def is_scripted(module: Any) -> bool:
    """Whether ``module`` is a TorchScript module (``torch.jit.script`` or ``trace``)."""
    return isinstance(module, torch.jit.ScriptModule)


def updates_buffers_silently(module: nn.Module) -> bool:
    """Whether ``module``'s forward may change its buffers without bumping their versions.

    The batch-norm kernels update running statistics in place but do not
    declare it, so the version counters of ``running_mean`` and
    ``running_var`` stay put in training mode.
    """
    return module.training and isinstance(module, nn.modules.batchnorm._NormBase)
