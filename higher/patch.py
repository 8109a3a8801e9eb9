"""Functional patching: a copy of any ``nn.Module`` that runs on fast weights.

A *patched* module is a structural copy of the user's module in which every
parameter slot holds a plain tensor (a "fast weight") that may carry autograd
history. The copy keeps the original classes, so ``isinstance`` checks, custom
methods, submodule calls and hooks all behave as on the original.

Why not ``torch.func.functional_call``? It swaps every tensor into the module
and back out on *each* call. Fast weights change once per optimizer step, not
once per forward, so we write them into the slots when they change and let every
forward run the module's own code with nothing added.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch import nn

from . import _compat, distributed
from .utils import Device, as_list, copy_leaf, detach_leaf, func_params, get_func_params

__all__ = ["buffer_sync", "make_functional", "monkeypatch"]

HistoryMode = Literal["all", "ends", "last"]


class _DoubleBackwardMultiheadAttention(nn.MultiheadAttention):
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


class _MonkeyPatchBase:
    """Mixin placed first in the bases of every patched module's class.

    It derives from ``object`` only, so it never conflicts with the original
    class's metaclass or MRO (the original higher mixed in ``abc.ABC`` and failed
    on classes such as ``DistributedDataParallel``).

    The API of a patched module, ``fmodule``:

    * ``fmodule(*args, params=None, **kwargs)`` runs the original forward on the
      current fast weights, or first makes ``params`` the current fast weights.
    * ``fmodule.fast_params`` / ``fmodule.init_fast_params`` /
      ``fmodule.parameters(time=None)`` read the history of fast weights.
    * ``fmodule.update_params(params)`` sets new fast weights.
    * ``fmodule.track_higher_grads`` switches history keeping on and off.
    * ``fmodule.detach_()`` truncates the history at the current fast weights.
    * ``fmodule.reset(source)`` and ``fmodule.write_back(module)`` move weights
      between the patched module and ordinary modules.
    """

    _higher_base: type[nn.Module]
    _higher_slots: list[tuple[tuple[nn.Module, str], ...]]
    _higher_rnns: tuple[nn.Module, ...]
    _higher_names: list[str]
    _higher_shapes: list[torch.Size]
    _higher_history: list[list[torch.Tensor]]
    _higher_track: bool
    _higher_history_mode: HistoryMode
    #: Set by a first-order optimizer: no inner gradient is differentiated again.
    _higher_first_order: bool = False
    #: Set in batched mode (:mod:`higher.batched`): optimizers then take one loss per task.
    _higher_num_tasks: int | None = None
    #: Names the classes built for patched modules (``MonkeyPatchedLinear``).
    _higher_class_prefix = "MonkeyPatched"

    # -- calling -----------------------------------------------------------------
    def __call__(
        self, *args: Any, params: Iterable[torch.Tensor] | None = None, **kwargs: Any
    ) -> Any:
        if params is not None:
            self.update_params(params)
        elif not self._higher_history:
            raise RuntimeError(
                f"{type(self).__name__} has no fast weights yet: call it with params=... "
                "or call update_params(params) first"
            )
        if self._builds_double_backward():
            with _compat.DoubleBackwardKernels(rnn=bool(self._higher_rnns)):
                return super().__call__(*args, **kwargs)  # type: ignore[misc]
        return super().__call__(*args, **kwargs)  # type: ignore[misc]

    def _builds_double_backward(self) -> bool:
        """Whether this forward's graph will be differentiated twice.

        That is the case when an inner step will take a gradient with
        ``create_graph=True`` through it: history is tracked, the optimizer is
        not first-order, and grad mode is on. Then every attention and RNN
        kernel must have a double backward (:class:`_compat.DoubleBackwardKernels`);
        otherwise the faster fused kernels stay in use.
        """
        return self._higher_track and not self._higher_first_order and torch.is_grad_enabled()

    # -- fast weights ------------------------------------------------------------
    @property
    def fast_params(self) -> list[torch.Tensor] | None:
        """The current fast weights (``None`` before any were set)."""
        return self._higher_history[-1] if self._higher_history else None

    @fast_params.setter
    def fast_params(self, value: Iterable[torch.Tensor]) -> None:
        self.update_params(value)

    @property
    def init_fast_params(self) -> list[torch.Tensor] | None:
        """The oldest fast weights still in the history (``time=0``)."""
        return self._higher_history[0] if self._higher_history else None

    def parameters(  # type: ignore[override]
        self, time: int | None = None, recurse: bool = True
    ) -> Iterator[torch.Tensor]:
        """Iterates over the fast weights at ``time`` (the latest when None).

        ``time=0`` gives the initial fast weights, ``time=k`` those after the
        k-th update (as in the original higher, ``time`` is the first
        argument). With ``track_higher_grads=False`` only the latest are kept.
        """
        if isinstance(time, bool):  # nn.Module.parameters(recurse) called positionally
            recurse = time
            time = None
        if not self._higher_history:
            return super().parameters(recurse)  # type: ignore[misc]
        index = -1 if time is None else time
        try:
            return iter(self._higher_history[index])
        except IndexError:
            raise IndexError(
                f"time={time} is outside the kept history of {len(self._higher_history)} "
                "fast-weight sets"
            ) from None

    def update_params(self, params: Iterable[torch.Tensor]) -> None:
        """Makes ``params`` (in ``module.parameters()`` order) the current fast weights.

        Raises:
            ValueError: wrong number of tensors, or a tensor of the wrong shape.
            TypeError: an element is not a tensor.
        """
        self._set_fast_params(self._check_params(params))

    def _set_fast_params(self, params: list[torch.Tensor]) -> None:
        """``update_params`` for lists already known to fit (from our own optimizers)."""
        if not self._higher_track:
            params = [detach_leaf(p) for p in params]
        history = self._higher_history
        mode = self._higher_history_mode if self._higher_track else "last"
        if not history or mode == "all" or (mode == "ends" and len(history) == 1):
            history.append(params)
        else:
            history[-1] = params
        self._assign(params)

    def _check_params(self, params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        params = as_list(params, "params")
        shapes = self._higher_shapes
        if len(params) != len(shapes):
            raise ValueError(
                f"expected {len(shapes)} parameter tensors (in module.parameters() order), "
                f"got {len(params)}"
            )
        for name, shape, p in zip(self._higher_names, shapes, params):
            if p.shape != shape:
                raise ValueError(
                    f"parameter '{name}' must have shape {tuple(shape)}, got {tuple(p.shape)}"
                )
        return params

    def _assign(self, params: list[torch.Tensor]) -> None:
        for p, slots in zip(params, self._higher_slots):
            for module, name in slots:
                module._parameters[name] = p  # type: ignore[assignment]
        for rnn in self._higher_rnns:
            _compat.refresh_flat_weights(rnn)

    @property
    def track_higher_grads(self) -> bool:
        """Whether fast weights keep their history (False is "test mode")."""
        return self._higher_track

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"track_higher_grads must be a bool, got {type(value).__name__}")
        object.__setattr__(self, "_higher_track", value)

    def detach_(self) -> _MonkeyPatchBase:
        """Cuts history and graph at the current fast weights (truncated backprop).

        Values are kept; the current fast weights become new leaves (with the
        same ``requires_grad``) and the only entry of the history, so a later
        backward stops here and everything before can be freed. Pair it with
        ``diffopt.detach_()`` to cut the optimizer state too.

        Example:
            >>> fmodel = monkeypatch(nn.Linear(2, 1))
            >>> _ = fmodel.detach_()
            >>> fmodel.fast_params[0].is_leaf
            True
        """
        current = self.fast_params
        if current is not None:
            detached = [detach_leaf(p) for p in current]
            self._higher_history[:] = [detached]
            self._assign(detached)
        for module in self.modules():  # type: ignore[attr-defined]
            for name, buf in module._buffers.items():
                if buf is not None and buf.grad_fn is not None:
                    module._buffers[name] = buf.detach()
        return self

    def reset(
        self, source: nn.Module | Iterable[torch.Tensor], copy_initial_weights: bool = True
    ) -> None:
        """Starts over from new initial weights without building a new patched module.

        Args:
            source: an ``nn.Module`` of the same structure (its parameters become
                the initial fast weights and its buffers are copied in), or a list
                of tensors in ``parameters()`` order.
            copy_initial_weights: as in :func:`monkeypatch`, for a module source.

        Example:
            >>> model = nn.Linear(2, 1)
            >>> fmodel = monkeypatch(model)
            >>> fmodel.reset(model)
            >>> len(list(fmodel.parameters(time=0)))
            2
        """
        if isinstance(source, nn.Module):
            distributed.arm_for_reset(self, source, not copy_initial_weights)  # type: ignore[arg-type]
            params: list[torch.Tensor] = get_func_params(source, safe_copy=copy_initial_weights)
            buffer_sync(source, self)  # type: ignore[arg-type]
        else:
            params = list(source)
        params = self._check_params(params)
        self._higher_history.clear()
        self._set_fast_params(params)

    def write_back(self, module: nn.Module, buffers: bool = True) -> None:
        """Copies the current fast weights (and buffers) into an ordinary module.

        The copy is in place and outside autograd, so ``module`` keeps its
        parameter objects and any ``torch.optim`` optimizer holding them.

        Args:
            module: a module with the structure of the patched one (usually
                the module that was patched).
            buffers: also copy buffers such as BatchNorm running statistics.

        Example:
            >>> model = nn.Linear(2, 1)
            >>> fmodel = monkeypatch(model)
            >>> fmodel.update_params([torch.zeros(1, 2), torch.ones(1)])
            >>> fmodel.write_back(model)
            >>> model.bias.item()
            1.0
        """
        module = distributed.local_module(module)  # a DDP model: the module it wraps
        targets = list(module.parameters())
        current = self.fast_params
        if current is None:
            raise RuntimeError("write_back: the patched module has no fast weights")
        if len(targets) != len(current):
            raise ValueError(
                f"write_back: module has {len(targets)} parameters, the patched module "
                f"{len(current)}"
            )
        with torch.no_grad():
            for name, dst, src in zip(self._higher_names, targets, current):
                if dst.shape != src.shape:
                    raise ValueError(
                        f"write_back: parameter '{name}' has shape {tuple(dst.shape)} in "
                        f"module, {tuple(src.shape)} in the patched module"
                    )
                dst.copy_(src)
            if buffers:
                mine = dict(self.named_buffers())  # type: ignore[attr-defined]
                for name, buf in module.named_buffers():
                    if name in mine:
                        buf.copy_(mine[name])

    # -- copying -----------------------------------------------------------------
    def __deepcopy__(self, memo: dict[int, Any]) -> _MonkeyPatchBase:
        current = self.fast_params or []
        for t in current:
            memo[id(t)] = t  # replaced below; never deep-copied (it may carry history)
        new: Any = _copy_tree(self, memo, device=None, skip=("_higher_history",))  # type: ignore[arg-type]
        object.__setattr__(new, "_higher_history", [])
        if current:
            new.update_params([copy_leaf(t) for t in current])
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The class is made at run time, so pickle rebuilds it from the original one.
        clone = copy.deepcopy(self)
        mixin = type(self).__bases__[0]
        return _unpickle_patched, (self._higher_base, clone.__dict__, mixin)


_PATCHED_CLASSES: dict[tuple[type, type], type] = {}


def _patched_class(base: type[nn.Module], mixin: type[_MonkeyPatchBase] = _MonkeyPatchBase) -> type:
    """The class of patched copies of ``base`` modules: ``mixin`` first, then ``base``."""
    cls = _PATCHED_CLASSES.get((mixin, base))
    if cls is None:
        name = f"{mixin._higher_class_prefix}{base.__name__}"
        cls = type(
            name,
            (mixin, base),
            {"_higher_base": base, "__module__": base.__module__, "__qualname__": name},
        )
        _PATCHED_CLASSES[mixin, base] = cls
    return cls


def _unpickle_patched(
    base: type[nn.Module], state: dict[str, Any], mixin: type[_MonkeyPatchBase] = _MonkeyPatchBase
) -> nn.Module:
    cls = _patched_class(base, mixin)
    obj: nn.Module = cls.__new__(cls)  # type: ignore[call-overload]
    obj.__dict__.update(state)
    return obj


_EMPTY_COPYABLE = (dict, OrderedDict, set, list)


def _copy_buffer(buf: torch.Tensor | None, memo: dict[int, Any], device: Device) -> Any:
    if buf is None:
        return None
    new = memo.get(id(buf))
    if new is None:
        new = buf.detach().to(device, copy=True)
        memo[id(buf)] = new
    return new


class _Plan:
    """What one pass over the original module learns about it.

    Parameters are listed in ``module.parameters()`` order (modules pre-order,
    each parameter once), with the slots of the copy that hold each of them.
    """

    def __init__(self) -> None:
        self.originals: list[torch.Tensor] = []
        self.names: list[str] = []
        self.slots: list[list[tuple[nn.Module, str]]] = []
        self.index: dict[int, int] = {}
        self.rnns: list[nn.Module] = []

    def visit(self, original: nn.Module, copy_: nn.Module, prefix: str) -> None:
        for name, p in original._parameters.items():
            if p is None:
                continue
            i = self.index.get(id(p))
            if i is None:
                i = self.index[id(p)] = len(self.originals)
                self.originals.append(p)
                self.names.append(prefix + name)
                self.slots.append([])
            self.slots[i].append((copy_, name))
        if _compat.has_flat_weights(original):
            self.rnns.append(copy_)
        if type(original) is nn.MultiheadAttention and prefix:
            # The root instead gets the patched class, whose __call__ does the same.
            copy_.__class__ = _DoubleBackwardMultiheadAttention


_ATOMIC = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _copy_tree(
    module: nn.Module,
    memo: dict[int, Any],
    device: Device,
    skip: tuple[str, ...] = (),
    plan: _Plan | None = None,
    prefix: str = "",
) -> nn.Module:
    """A deep copy of a module tree that shares parameter tensors.

    ``copy.deepcopy`` would copy every parameter only for us to replace it, and
    is slow on the many empty hook dictionaries of each module. Shared
    submodules and tied tensors stay shared, through ``memo``. With a ``plan``
    the same pass also records the parameters and their slots.
    """
    new = memo.get(id(module))
    if new is not None:
        return new
    cls = type(module)
    new = cls.__new__(cls)
    memo[id(module)] = new
    for p in module._parameters.values():
        if p is not None:  # other attributes referring to a parameter share it too
            memo.setdefault(id(p), p)
    if plan is not None:
        plan.visit(module, new, prefix)
    state = new.__dict__
    for key, value in module.__dict__.items():
        kind = type(value)
        # Most entries are empty hook dictionaries and flags: settle them first.
        if kind in _EMPTY_COPYABLE and not value:
            state[key] = kind()
        elif kind in _ATOMIC:
            state[key] = value
        elif key in skip:
            continue
        elif key == "_modules":
            state[key] = kind(
                (k, None if m is None else _copy_tree(m, memo, device, (), plan, f"{prefix}{k}."))
                for k, m in value.items()
            )
        elif key == "_parameters":
            state[key] = kind(value)
        elif key == "_buffers":
            state[key] = kind((k, _copy_buffer(b, memo, device)) for k, b in value.items())
        elif isinstance(value, torch.Tensor) and value.grad_fn is not None:
            # A derived tensor cached on the module (legacy weight_norm's
            # ``weight``): forward recomputes it, and deepcopy refuses it.
            state[key] = memo.setdefault(id(value), value.detach().clone())
        else:
            state[key] = copy.deepcopy(value, memo)
    return new


def _make_functional(
    module: nn.Module,
    encapsulator: Callable[[Any, nn.Module], None] | None,
    device: Device,
) -> tuple[Any, list[torch.Tensor]]:
    """Builds the patched copy; also returns the original parameters, in order."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module to patch, got {type(module).__name__}")
    plan = _Plan()
    fmodule = _copy_tree(module, {}, device, plan=plan)
    fmodule.__class__ = _patched_class(type(module))
    attrs = {
        "_higher_slots": [tuple(s) for s in plan.slots],
        "_higher_rnns": tuple(plan.rnns),
        "_higher_names": plan.names,
        "_higher_shapes": [p.shape for p in plan.originals],
        "_higher_history": [],
        "_higher_track": True,
        "_higher_history_mode": "all",
    }
    for key, value in attrs.items():
        object.__setattr__(fmodule, key, value)
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule, plan.originals


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
    module, ddp = distributed.unwrap(module, shares_params=True)
    fmodule = _make_functional(module, encapsulator, None)[0]
    if ddp is not None:
        distributed.arm(fmodule, ddp)
    return fmodule


def buffer_sync(module: nn.Module, fmodule: nn.Module, device: Device = None) -> None:
    """Copies every buffer of ``module`` into the patched ``fmodule``.

    The patched module gets its own copies, so updating them (BatchNorm running
    statistics in train mode) never changes ``module``.

    Example:
        >>> bn = nn.BatchNorm1d(3)
        >>> fbn = monkeypatch(bn)
        >>> _ = bn.running_mean.fill_(1.0)
        >>> buffer_sync(bn, fbn)
        >>> fbn.running_mean.tolist()
        [1.0, 1.0, 1.0]
    """
    targets = dict(fmodule.named_modules())
    for name, sub in distributed.local_module(module).named_modules():
        target = targets.get(name)
        if target is None:
            raise ValueError(f"buffer_sync: patched module has no submodule '{name}'")
        for key, buf in sub._buffers.items():
            target._buffers[key] = None if buf is None else buf.detach().to(device, copy=True)


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
    # A DDP model: patch the module it wraps; DDP averages the meta-gradient.
    module, ddp = distributed.unwrap(module, shares_params=not copy_initial_weights)
    if num_tasks is not None:
        from .batched import batched_monkeypatch

        fmodule, originals = batched_monkeypatch(
            module, num_tasks, device, copy_initial_weights, track_higher_grads
        )
    else:
        fmodule, originals = _make_functional(module, None, device)
        fmodule.track_higher_grads = track_higher_grads
        fmodule._set_fast_params(func_params(originals, device, copy_initial_weights))
    if ddp is not None:
        distributed.arm(fmodule, ddp)
    return fmodule, originals
