"""Patched modules: copies of any ``nn.Module`` that run on fast weights.

The public entry points. :func:`monkeypatch` builds a patched copy for one
task (the core, ``higher._patched``) or, with ``num_tasks``, for a
meta-batch of tasks at once (:mod:`higher.batched`); both accept a
``DistributedDataParallel`` model (:mod:`higher.distributed`), and per task a
model sharded with FSDP2's ``fully_shard`` (:mod:`higher.fsdp`). The API of the
copy is described in :class:`_MonkeyPatchBase`.

How a model is patched, decided once, here (``_classify``): the wrappers
are peeled from the outside in (a ``torch.compile`` wrapper, then a DDP
wrapper, then a compiled module inside DDP), and what remains is sharded
(FSDP2), or plain; a class found to be no wrapper is remembered, so the
next model of it (the next task's) skips the peeling. That ``_Route`` picks
one builder, which goes down and returns the copy: ``higher.fsdp.patch``
(sharded), or ``higher.batched.patch`` (``num_tasks``), or
``higher._patched.patch``; the sharded and batched builders call the core's
``patch`` with their mixin, and the core's copy is ``higher._copy``'s.
Last, a DDP wrapper is linked to the copy (``higher.distributed.link``).
The core learns of a capability only through the ``_higher_*`` attributes
its mixin or link sets (a backward context, a per-parameter hyperparameter's
shard, the DDP link's ``before_forward``). One path climbs back up, once:
``fmodule.reset(source)`` and ``write_back(module)`` take a module from the
user, possibly wrapped, so the core asks :mod:`higher.distributed` for the
module a wrapper runs and for the link a reset onto DDP's parameters needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from . import _compat, _copy, _patched, _views, batched, distributed, fsdp
from ._patched import _MonkeyPatchBase as _MonkeyPatchBase  # the original exports it
from ._patched import buffer_sync
from .utils import Device

__all__ = ["buffer_sync", "make_functional", "monkeypatch"]

del _views  # imported for what it registers in the core: indexing of patched containers


def make_functional(
    module: nn.Module, encapsulator: Callable[[Any, nn.Module], None] | None = None
) -> Any:
    """Builds a patched copy of ``module`` that has no fast weights yet.

    Parameters are passed on each call (``fmodule(x, params=...)``) or set with
    ``update_params``. Most users want :func:`monkeypatch` instead.

    Args:
        module: the module to copy.
        encapsulator: called as ``encapsulator(fmodule, module)`` once the copy
            exists, to finish setting it up (for example to set initial weights).

    Returns:
        The patched module; ``isinstance(fmodule, type(module))`` holds.

    Example:
        >>> fmodule = make_functional(nn.Linear(2, 1))
        >>> fmodule(torch.ones(1, 2), params=[torch.ones(1, 2), torch.zeros(1)])
        tensor([[2.]])
    """
    module, ddp = _unwrap(_eager(module), shares_params=True)
    fmodule = _patched._make_functional(module, encapsulator, None)[0]
    if ddp is not None:
        fmodule._higher_configure(ddp=distributed.link(ddp))
    return fmodule


def monkeypatch(
    module: nn.Module,
    device: Device = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
    num_tasks: int | None = None,
) -> Any:
    """Creates a patched copy of ``module`` whose weights are fast weights.

    Args:
        module: any ``nn.Module``; it is never modified.
        device: where the patched module's weights and buffers live; the
            module's own device when None.
        copy_initial_weights: when True the initial fast weights are detached
            copies, so gradients stop there. When False they are the module's
            own parameters and meta-gradients reach ``module`` (MAML).
        track_higher_grads: when False ("test mode") fast weights are detached
            at each update: no history and no graph, and memory stays flat.
        num_tasks: run this many tasks at once (batched mode, see
            :mod:`higher.batched`): fast weights are stacked ``(num_tasks,
            *shape)`` and every tensor argument carries a leading task dimension.

    Returns:
        The patched module: an instance of a subclass of ``type(module)`` with
        the API described in :class:`_MonkeyPatchBase`.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> fmodel = monkeypatch(model, copy_initial_weights=False)
        >>> isinstance(fmodel, nn.Linear), fmodel.fast_params[0] is model.weight
        (True, True)
    """
    return _monkeypatch(module, device, copy_initial_weights, track_higher_grads, num_tasks)[0]


def _monkeypatch(
    module: nn.Module,
    device: Device,
    copy_initial_weights: bool,
    track_higher_grads: bool,
    num_tasks: int | None = None,
) -> tuple[Any, list[torch.Tensor]]:
    """:func:`monkeypatch`, also returning the original parameters, in order."""
    route = _classify(module, shares_params=not copy_initial_weights)
    module = route.module
    if route.sharded:
        return fsdp.patch(module, device, copy_initial_weights, track_higher_grads, num_tasks)
    if num_tasks is None:
        built = _patched.patch(module, device, copy_initial_weights, track_higher_grads)
    else:
        built = batched.patch(module, num_tasks, device, copy_initial_weights, track_higher_grads)
    if route.ddp is not None:
        built[0]._higher_configure(ddp=distributed.link(route.ddp))
    return built


class _Route(NamedTuple):
    """What kind of model is patched, decided once by ``_classify``."""

    #: The module to copy: the user's, without its wrappers.
    module: nn.Module
    #: A ``DistributedDataParallel`` wrapper whose bookkeeping the copy's calls do.
    ddp: Any
    #: Whether ``fully_shard`` (FSDP2) was applied in ``module``'s tree.
    sharded: bool


def _classify(module: nn.Module, shares_params: bool) -> _Route:
    """Peels the wrappers off ``module`` and says how its copy is built.

    A compiled model runs eagerly (with a warning); a sharded model is never
    inside DDP (FSDP2 replaces it), so it is recognised before DDP is asked.
    """
    cls = type(module)
    if cls in _PLAIN and not _compat.fsdp2_in_use():
        return _Route(module, None, False)  # what the walk below would find again
    module = _eager(module)
    if fsdp.is_fully_sharded(module):
        return _Route(module, None, True)
    inner, ddp = _unwrap(module, shares_params)
    if inner is module and ddp is None and type(module) is cls:
        _copy.remember(_PLAIN, cls, True)
    return _Route(inner, ddp, False)


#: Classes of modules that ``_classify`` found to be no wrapper: a class that is none
#: of them never becomes one, and while no module was sharded no submodule is.
_PLAIN: dict[type, bool] = {}


def _unwrap(module: nn.Module, shares_params: bool) -> tuple[nn.Module, Any]:
    """The module to copy, and the DDP model whose bookkeeping its calls must do.

    ``module`` is already past a ``torch.compile`` wrapper (:func:`_eager`). A
    DDP model: its copy patches the module it wraps, and DDP averages the
    meta-gradient (:mod:`higher.distributed`). A ``torch.compile``'d module
    inside DDP: its copy patches the module it wraps and runs eagerly, with a
    warning.
    """
    inner, ddp = distributed.unwrap(module, shares_params)
    return (module if inner is module else _eager(inner)), ddp


def _eager(module: nn.Module) -> nn.Module:
    inner = _compat.compiled_inner(module)
    if inner is None:
        return module
    _copy.warn_runs_eagerly(type(inner).__name__)
    return inner
