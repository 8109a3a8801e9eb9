"""The structural copy of a module tree that every patched module starts from.

A patched module (:mod:`higher._patched`) is a copy of the user's module tree
whose parameter slots then receive fast weights. A per-task loop makes one
copy per task, so the copy is the largest cost a task pays beyond its tensor
operations (issue 34): ``copy.deepcopy`` would copy every parameter only for
it to be replaced, and asks each of the dozen empty hook dictionaries of a
module how to copy itself. :func:`copy_tree` takes each module's ``__dict__``
in one C-level copy and then settles the entries it must make anew: the hook
dictionaries, the parameter, buffer and submodule dictionaries, and the
entries a module class adds. For a module laid out as the last one of its
class (the same entries, no hooks) it knows where each entry is and what it
is; any other module takes the long way, entry by entry. Only facts about
classes are kept between copies (which entries their modules have, which
classes need more than their parameters' slots); each copy reads the module
as it is now (its flags, attributes, hooks, submodules and parameters). The
same walk records the parameters and the slots that hold them (:class:`Plan`).
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from . import _compat
from ._exact_activations import EXACT_ACTIVATIONS
from ._exact_norms import EXACT_BATCH_NORMS
from .utils import Device

__all__ = ["Plan", "copy_tree", "remember", "warn_runs_eagerly"]


class DoubleBackwardMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` that avoids the fused attention kernels.

    The patched module's own call selects kernels with a double backward; this
    class does the same for an attention submodule called directly
    (``fmodel.encoder.layers[0].self_attn(x, x, x)``).
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            with _compat.DoubleBackwardKernels():
                return super().forward(*args, **kwargs)
        return super().forward(*args, **kwargs)


# -- the entries every nn.Module has, read off a fresh one ---------------------------------
_PROBE = nn.Module().__dict__
#: The hook dictionaries ``Module.__init__`` makes, and their types: a copy gets new ones.
_HOOK_KEYS = tuple(k for k, v in _PROBE.items() if type(v) is OrderedDict)
#: The entries a copy builds itself; the others are looked at one by one.
_BUILT = frozenset((*_HOOK_KEYS, "_parameters", "_buffers", "_modules"))
_NUM_BUILT = len(_BUILT)
del _PROBE

_EMPTY_COPYABLE = (dict, OrderedDict, set, list)
_ATOMIC_TYPES = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device))
_ScriptModule = torch.jit.ScriptModule


class Plan:
    """What the copy's walk (:func:`copy_tree`, which fills it) learns of the original module.

    Parameters are listed in ``module.parameters()`` order (modules pre-order,
    each parameter once), with the slots of the copy that hold each of them.
    """

    def __init__(self) -> None:
        self.originals: list[torch.Tensor] = []
        self.names: list[str] = []
        self.slots: list[list[tuple[nn.Module, str]]] = []
        self.index: dict[int, int] = {}
        self.rnns: list[nn.Module] = []

    def visit_special(self, original: nn.Module, copy_: nn.Module, prefix: str) -> None:
        """What a module of a class in ``_SPECIAL`` needs beyond its parameters' slots."""
        cls = type(original)
        if isinstance(original, _ScriptModule):
            where = f"submodule '{prefix[:-1]}'" if prefix else "the module"
            raise TypeError(
                f"{where} is a TorchScript module ({cls.__name__}): its compiled "
                "forward reads its own parameters and cannot run on fast weights. Patch the "
                "eager module instead (the nn.Module you passed to torch.jit.script or "
                "torch.jit.trace)"
            )
        if cls is nn.MultiheadAttention and prefix:
            # Called through the root, attention finds the root's patched __call__ on
            # the stack; this class is for a submodule called directly.
            copy_.__class__ = DoubleBackwardMultiheadAttention
        elif cls in EXACT_ACTIVATIONS:  # same values and gradients, differentiable twice
            copy_.__class__ = EXACT_ACTIVATIONS[cls]
        elif cls in EXACT_BATCH_NORMS:
            # Torch's native batch norm differentiates wrongly on some layouts
            # (higher._exact_norms). Only the batch norms' own forwards enter the
            # mode: a mode around the whole forward would see every other op too.
            copy_.__class__ = EXACT_BATCH_NORMS[cls]


#: Per module class, whether :meth:`Plan.visit_special` has something to do for its modules.
_SPECIAL: dict[type, bool] = {}


def _special(cls: type) -> bool:
    return (
        issubclass(cls, _ScriptModule)
        or cls is nn.MultiheadAttention
        or cls in EXACT_ACTIVATIONS
        or cls in EXACT_BATCH_NORMS
    )


#: Per module class, the entries of its modules' ``__dict__`` beyond the standard ones
#: (``_BUILT``), as the last module of the class copied had them: a module laid out so,
#: with no hooks, takes the short way through :func:`copy_tree`.
_LAYOUTS: dict[type, tuple[str, ...]] = {}


def remember(table: dict[type, Any], cls: type, value: Any) -> Any:
    """``table[cls] = value``, in a table that forgets everything past 4096 classes: a
    program that makes classes as it runs must not grow it, nor keep them alive, forever.

    Example:
        >>> table = {}
        >>> remember(table, int, True)
        True
    """
    if len(table) >= 4096:
        table.clear()
    table[cls] = value
    return value


def copy_tree(
    module: nn.Module,
    memo: dict[int, Any],
    device: Device,
    skip: tuple[str, ...] = (),
    plan: Plan | None = None,
    prefix: str = "",
) -> nn.Module:
    """A deep copy of a module tree that shares parameter tensors.

    Buffers are copied (to ``device``), hook dictionaries and other containers
    are new, everything else is deep-copied, entries named in ``skip`` (of the
    root only) left out. Shared submodules and tied tensors stay shared,
    through ``memo``. With a ``plan`` the same pass records the parameters and
    their slots.
    """
    # One function, its steps inlined: a Python call costs as much as a dozen
    # dictionary lookups, and a task copies every module of the tree.
    new = memo.get(id(module))
    if new is not None:
        return new
    cls = type(module)
    new = cls.__new__(cls)
    memo[id(module)] = new
    src = module.__dict__
    params = src.get("_parameters")
    if params:
        for name, p in params.items():
            if p is None:
                continue
            memo.setdefault(id(p), p)  # other attributes referring to a parameter share it too
            if plan is not None:
                i = plan.index.get(id(p))
                if i is None:
                    plan.index[id(p)] = len(plan.originals)
                    plan.originals.append(p)
                    plan.names.append(prefix + name)
                    plan.slots.append([(new, name)])
                else:
                    plan.slots[i].append((new, name))
    if plan is not None:
        if "_flat_weights_names" in src:  # _compat.has_flat_weights: an RNN's flat weights
            plan.rnns.append(new)
        special = _SPECIAL.get(cls)
        if special is None:
            special = remember(_SPECIAL, cls, _special(cls))
        if special:
            plan.visit_special(module, new, prefix)
    state = src.copy()
    # The short way: a module laid out as the last one of its class, with no hooks.
    layout = _LAYOUTS.get(cls)
    deferred: list[str] | None = None
    if layout is not None and len(src) == _NUM_BUILT + len(layout):
        deferred = []
        try:
            for key in layout:
                value = src[key]
                kind = type(value)
                if kind in _ATOMIC_TYPES:
                    continue  # taken by the copy of the dictionary
                if kind in _EMPTY_COPYABLE and not value:
                    state[key] = kind()
                else:
                    deferred.append(key)
            for key in _HOOK_KEYS:
                if src[key]:
                    deferred = None  # a hook registered on the original: the long way
                    break
                state[key] = OrderedDict()
            # With the sizes equal, these are there unless an entry of another name is.
            buffers, children = src["_buffers"], src["_modules"]
        except KeyError:
            deferred = None
    if deferred is not None and params is not None:
        state["_parameters"] = type(params)(params)
        state["_buffers"] = _copy_buffers(buffers, memo, device) if buffers else type(buffers)()
        if children:
            state["_modules"] = _copy_children(children, memo, device, plan, prefix)
        else:
            state["_modules"] = type(children)()
        for key in deferred:  # after the children, so that references to them are shared
            _copy_entry(state, key, src[key], memo, skip)
    else:
        children = _copy_entries(module, state, memo, device, skip, plan, prefix)
    object.__setattr__(new, "__dict__", state)
    # A torch.compile wrapper holds the module it compiled as _orig_mod.
    if "_orig_mod" in children and _compat.compiled_inner(module) is not None:
        # A torch.compile'd submodule: its copy runs the copied module eagerly.
        _compat.run_eagerly(new)
        warn_runs_eagerly(type(module._orig_mod).__name__)
    return new


def _copy_entries(
    module: nn.Module,
    state: dict[str, Any],
    memo: dict[int, Any],
    device: Device,
    skip: tuple[str, ...],
    plan: Plan | None,
    prefix: str,
) -> dict[str, Any]:
    """Every entry of ``module.__dict__`` into ``state``, one by one, in order; returns the
    children. Records the class's layout for :func:`copy_tree`'s short way."""
    src = module.__dict__
    children: dict[str, Any] = {}
    for key, value in src.items():
        kind = type(value)
        # Most entries are empty containers and flags: settle them first.
        if kind in _EMPTY_COPYABLE and not value:
            state[key] = kind()
        elif kind in _ATOMIC_TYPES:
            continue  # taken by the copy of the dictionary
        elif key == "_modules":
            children = value
            state[key] = _copy_children(value, memo, device, plan, prefix)
        elif key == "_parameters":
            state[key] = kind(value)
        elif key == "_buffers":
            state[key] = _copy_buffers(value, memo, device)
        else:
            _copy_entry(state, key, value, memo, skip)
    if src.keys() >= _BUILT:
        remember(_LAYOUTS, type(module), tuple(k for k in src if k not in _BUILT))
    return children


def _copy_entry(
    state: dict[str, Any], key: str, value: Any, memo: dict[int, Any], skip: tuple[str, ...]
) -> None:
    """An entry that is neither a flag nor an empty container nor a standard one."""
    if key in skip:
        del state[key]
    elif isinstance(value, torch.Tensor) and value.grad_fn is not None:
        # A derived tensor cached on the module (legacy weight_norm's
        # ``weight``): forward recomputes it, and deepcopy refuses it.
        state[key] = memo.setdefault(id(value), value.detach().clone())
    else:
        state[key] = copy.deepcopy(value, memo)


def _copy_buffers(buffers: dict[str, Any], memo: dict[int, Any], device: Device) -> dict[str, Any]:
    out = type(buffers)()
    for k, buf in buffers.items():
        if buf is not None:
            new = memo.get(id(buf))
            if new is None:
                new = memo[id(buf)] = buf.detach().to(device, copy=True)
            buf = new
        out[k] = buf
    return out


def _copy_children(
    children: dict[str, Any], memo: dict[int, Any], device: Device, plan: Plan | None, prefix: str
) -> dict[str, Any]:
    out = type(children)()
    for k, m in children.items():
        out[k] = None if m is None else copy_tree(m, memo, device, (), plan, prefix + k + ".")
    return out


def warn_runs_eagerly(name: str) -> None:
    """Says (once, as Python shows a warning once per place) that a compiled module runs eagerly."""
    warnings.warn(
        f"higher: the torch.compile'd {name} is patched through the module it wraps, and its "
        "patched copy runs eagerly: a compiled forward reads the original weights, not the "
        "fast weights, and compiled graphs have no double backward. Patch the module itself "
        "(compiled._orig_mod) to silence this warning",
        UserWarning,
        stacklevel=2,
    )
