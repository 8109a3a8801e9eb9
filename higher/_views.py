"""Indexing and slicing a patched container: views that run on the fast weights.

``fmodel[:-1]`` on a patched ``nn.Sequential`` (or ``nn.ModuleList``,
``nn.ModuleDict``) makes torch build a new container of the patched class
through its ``__init__``, which never sees the patched module's bookkeeping.
Here such results become *views*: patched modules over the selected
submodules of the patched copy, holding nothing of their own. Their slots are
the patched module's slots, so a view runs on the current fast weights, and
meta-gradients flow to the same tensors as through the whole model; their
``fast_params`` (and ``parameters(time=...)``) are the patched module's,
restricted to the parameters the view holds. A view cannot set weights of its
own (``params=``, ``update_params``, ``detach_``, ``reset``): that would change
the patched module's slots behind its history.

Integer and key indexing (``fmodel[1]``, ``fmodel["head"]``) returns the
submodule itself for one task, as before (it holds the fast weights in its
slots); in batched mode the submodule's slots hold stacked weights that only
a patched call can split into tasks, so it returns a view there too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import _compat, _patched

#: The containers whose indexing returns views.
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _PatchedView:
    """Placed before the patched module's mixin in a view's class (see the module docstring)."""

    _higher_view_root: Any
    _higher_view_index: list[int]

    @property
    def _higher_history(self) -> list[list[torch.Tensor]]:
        index = self._higher_view_index
        return [[h[i] for i in index] for h in self._higher_view_root._higher_history]

    @property
    def _higher_track(self) -> bool:
        return self._higher_view_root._higher_track

    @_higher_track.setter
    def _higher_track(self, value: bool) -> None:
        _refuse("set track_higher_grads")

    @property
    def _higher_first_order(self) -> bool:
        return self._higher_view_root._higher_first_order

    @property
    def _higher_history_mode(self) -> Any:
        return self._higher_view_root._higher_history_mode

    def _higher_set_fast_params(self, params: list[torch.Tensor]) -> None:
        _refuse("take fast weights of its own (params=..., update_params)")

    def detach_(self) -> Any:
        _refuse("detach_()")

    def reset(self, source: Any, copy_initial_weights: bool = True) -> None:
        _refuse("reset()")

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        _refuse("be copied")

    def __reduce_ex__(self, protocol: Any) -> Any:
        _refuse("be pickled")


def _refuse(what: str) -> None:
    raise RuntimeError(
        f"a view of a patched container (fmodel[...]) runs on the patched module's fast "
        f"weights and cannot {what}: do it on the patched module itself, or patch the "
        "selected submodules on their own with higher.monkeypatch(model[...])"
    )


_VIEW_MIXINS: dict[type, type] = {}


def _view_mixin(mixin: type) -> type:
    cls = _VIEW_MIXINS.get(mixin)
    if cls is None:
        cls = _VIEW_MIXINS[mixin] = type(f"_View{mixin.__name__}", (_PatchedView, mixin), {})
    return cls


def getitem(self: Any, idx: Any) -> Any:
    """``__getitem__`` of patched containers: the base class's, made a view where needed."""
    out = self._higher_base.__getitem__(self, idx)
    if not isinstance(out, nn.Module):
        return out
    if isinstance(out, _patched._MonkeyPatchBase):  # a slice, built through __init__
        out.__class__ = out._higher_base
    elif self._higher_num_tasks is None:  # one task: the submodule holds the fast weights
        return out
    root = self._higher_view_root if isinstance(self, _PatchedView) else self
    return _make_view(root, out)


def _make_view(root: Any, module: nn.Module) -> Any:
    mixin = type(root).__bases__[0]
    if not mixin.__dict__.get("_higher_sliceable", False):  # declared, not inherited
        # A sharded model's (higher.fsdp) fast weights are shards that its units
        # gather around the whole model's call: a part of it has no such units.
        raise NotImplementedError(
            f"slicing a patched {root._higher_base.__name__} ({type(root).__name__}) is not "
            "supported: call the patched module itself, or index it with an integer or key"
        )
    view: Any = object.__new__(_patched._patched_class(type(module), _view_mixin(mixin)))
    # The same dictionaries of parameters, buffers and submodules: the same slots.
    view.__dict__.update(module.__dict__)
    inside = {id(m) for m in module.modules()}
    owner = {}  # (module, name) of every slot -> the root's parameter position
    for i, slots in enumerate(root._higher_slots):
        for m, name in slots:
            owner[id(m), name] = i
    # The view's parameters() order: its own traversal, each parameter once.
    index: list[int] = []
    names: list[str] = []
    seen: set[int] = set()
    for prefix, m in module.named_modules():
        for name, p in m._parameters.items():
            position = owner.get((id(m), name))
            if p is not None and position is not None and position not in seen:
                seen.add(position)
                index.append(position)
                names.append(f"{prefix}.{name}" if prefix else name)
    # An RNN reads its weights from a list in its own __dict__, which the view
    # has apart from the module's: refresh the view's list, not the module's.
    rnns = tuple(view if m is module else m for m in root._higher_rnns if id(m) in inside)
    attrs: dict[str, Any] = {
        "_higher_view_root": root,
        "_higher_view_index": index,
        "_higher_slots": [
            tuple(s for s in root._higher_slots[i] if id(s[0]) in inside) for i in index
        ],
        "_higher_names": names,
        "_higher_shapes": [root._higher_shapes[i] for i in index],
        "_higher_rnns": rnns,
        "_higher_ddp": None,
    }
    if root._higher_num_tasks is not None:  # batched mode's per-task buffers and settings
        attrs["_higher_num_tasks"] = root._higher_num_tasks
        attrs["_higher_task_strategy"] = root._higher_task_strategy
        attrs["_higher_buffer_slots"] = [
            tuple(s for s in group if id(s[0]) in inside)
            for group in root._higher_buffer_slots
            if any(id(s[0]) in inside for s in group)
        ]
        attrs["_higher_norms"] = [m for m in root._higher_norms if id(m) in inside]
    for key, value in attrs.items():
        object.__setattr__(view, key, value)
    for rnn in rnns:
        _compat.refresh_flat_weights(rnn)
    return view


# The core gives patched containers this indexing without importing this module.
_patched.register_class_methods(CONTAINERS, {"__getitem__": getitem})
