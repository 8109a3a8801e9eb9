"""The patched-module core: a copy of any ``nn.Module`` that runs on fast weights.

A *patched* module is a structural copy of the user's module in which every
parameter slot holds a plain tensor (a "fast weight") that may carry autograd
history. The copy keeps the original classes, so ``isinstance`` checks, custom
methods, submodule calls and hooks all behave as on the original. The copy
itself, one walk of the tree per task, is ``higher._copy``'s.

Why not ``torch.func.functional_call``? It swaps every tensor into the module
and back out on *each* call. Fast weights change once per optimizer step, not
once per forward, so we write them into the slots when they change and let every
forward run the module's own code with nothing added.

This module is the core that everything else builds on: :mod:`higher.batched`
extends :class:`_MonkeyPatchBase` for a meta-batch of tasks, and
:mod:`higher.patch` holds the public entry points that choose between the two.
The few methods other modules of this package call are named ``_higher_*`` (a
name the user's own module is unlikely to use): ``_higher_lend`` (lend the
slots to a replay or a solver and get everything back),
``_higher_configure`` (set by the optimizer and by checkpointing) and
``_higher_task_loss`` (one loss, or one per task).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import _compat, distributed
from ._copy import Plan, copy_tree
from ._exact_norms import EXACT_BATCH_NORMS
from .utils import Device, as_list, copy_leaf, detach_leaf, func_params

__all__ = ["buffer_sync"]

HistoryMode = Literal["all", "ends", "last"]


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

    Subclasses (batched mode) override the ``_higher_*`` hooks marked as such:
    how a call runs, which weight shapes fit, how initial weights and buffers
    are laid out, and what ``write_back`` copies.
    """

    _higher_base: type[nn.Module]
    _higher_slots: list[tuple[tuple[nn.Module, str], ...]]
    _higher_rnns: tuple[nn.Module, ...]
    _higher_names: list[str]
    _higher_shapes: list[torch.Size]
    _higher_history: list[list[torch.Tensor]]
    _higher_track: bool
    _higher_history_mode: HistoryMode = "all"
    #: Set by a first-order optimizer: no inner gradient is differentiated again.
    _higher_first_order: bool = False
    #: The tasks of batched mode (:mod:`higher.batched`); optimizers then take one loss per task.
    _higher_num_tasks: int | None = None
    #: A ``DistributedDataParallel`` model whose forward bookkeeping each call does.
    _higher_ddp: Any = None
    #: Set by subclasses whose fast weights need a context around an inner step's
    #: gradient (sharded ones, :mod:`higher.fsdp`); a class attribute, so that
    #: looking it up never reaches ``nn.Module.__getattr__``.
    _higher_backward_context: Callable[[], contextlib.AbstractContextManager[None]] | None = None
    #: Likewise: how a per-parameter hyperparameter fits a sharded fast weight.
    _higher_local_hyper: Callable[[int, Any], Any] | None = None
    #: Names the classes built for patched modules (``MonkeyPatchedLinear``).
    _higher_class_prefix = "MonkeyPatched"
    #: Indexing a patched container gives views on the fast weights (``higher._views``)
    #: for the mixins that set this in their own class body: a mixin that does not (a
    #: sharded model's, whose shards are gathered around the whole call) refuses slices.
    _higher_sliceable = True
    #: Whether the patched module is an ``nn.Sequential`` (exactly), whose calls
    #: without hooks run its children's forwards directly (:func:`_run_sequential`).
    _higher_lean: bool = False

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
        link = self._higher_ddp
        if link is not None:
            link.before_forward()
        # When a graph is built, checkpoints inside the model must recompute on
        # this forward's fast weights, whenever the recomputation happens; and
        # when an inner step differentiates it with create_graph=True, the
        # meta-gradient differentiates it again, so every attention and RNN
        # kernel must have a double backward. The wrappers of attention and of
        # torch.utils.checkpoint find this call on the stack (it is registered
        # below), so a forward that calls neither pays nothing for them.
        if self._higher_rnns:
            double = self._higher_track and torch.is_grad_enabled() and not self._higher_first_order
            return self._higher_run_rnns(args, kwargs, cudnn=not double)
        return self._higher_forward(args, kwargs)

    def _higher_run_rnns(self, args: tuple[Any, ...], kwargs: dict[str, Any], cudnn: bool) -> Any:
        # cuDNN's RNN kernels have no double backward; where cuDNN may run, it
        # compacts the fast weights at each forward, and would warn each time.
        with _compat.quiet_flat_weights_warning() if cudnn else _compat.CudnnOff():
            return self._higher_forward(args, kwargs)

    def _higher_recompute_on(self) -> _Recompute:
        """A context that puts the weights the slots hold now back, for a recomputation."""
        return _Recompute(self, self._higher_slot_values())

    def _higher_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Runs the module's own ``__call__`` (hooks, forward) on the slots. A subclass hook."""
        if self._higher_lean and len(args) == 1 and not kwargs and _no_hooks(self):
            return _run_sequential(self, args[0])
        return super().__call__(*args, **kwargs)  # type: ignore[misc]

    def _higher_task_loss(self, loss: Any) -> Any:
        """The loss an inner step differentiates: one loss here; batched mode sums one per task."""
        return loss

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
        self._higher_set_fast_params(self._higher_check_params(params))

    def _higher_set_fast_params(self, params: list[torch.Tensor]) -> None:
        """``update_params`` for lists already known to fit (from our own optimizers)."""
        if not self._higher_track:
            params = [detach_leaf(p) for p in params]
        history = self._higher_history
        mode = self._higher_history_mode if self._higher_track else "last"
        if not history or mode == "all" or (mode == "ends" and len(history) == 1):
            history.append(params)
        else:
            history[-1] = params
        self._higher_assign(params)

    def _higher_check_params(self, params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        params = as_list(params, "params")
        shapes = self._higher_shapes
        if len(params) != len(shapes):
            raise ValueError(
                f"expected {len(shapes)} parameter tensors (in module.parameters() order), "
                f"got {len(params)}"
            )
        return [self._higher_fit(n, s, p) for n, s, p in zip(self._higher_names, shapes, params)]

    def _higher_fit(self, name: str, shape: torch.Size, p: torch.Tensor) -> torch.Tensor:
        """``p`` as the fast weight of parameter ``name``, or a ValueError. A subclass hook."""
        if p.shape != shape:
            raise ValueError(
                f"parameter '{name}' must have shape {tuple(shape)}, got {tuple(p.shape)}"
            )
        return p

    def _higher_assign(self, params: list[torch.Tensor]) -> None:
        """Puts ``params`` into the parameter slots (the history is not touched)."""
        for p, slots in zip(params, self._higher_slots):
            for module, name in slots:
                module._parameters[name] = p  # type: ignore[assignment]
        for rnn in self._higher_rnns:
            _compat.refresh_flat_weights(rnn)

    def _higher_slot_values(self) -> list[Any]:
        """What the slots hold now (a replay may hold an earlier step's weights there)."""
        return [slots[0][0]._parameters[slots[0][1]] for slots in self._higher_slots]

    def _higher_set_slot_values(self, values: list[Any]) -> None:
        self._higher_assign(values)

    @contextlib.contextmanager
    def _higher_lend(
        self, track: bool | None = None
    ) -> Iterator[Callable[[list[torch.Tensor]], None]]:
        """Lends the module to code that runs it on other weights for a while.

        Yields a function that puts weights into the slots (the history stays
        as it is); the caller may also call the module with ``params=``. On
        exit the history, the tracking flag and what the slots held are put
        back. A checkpoint replay runs earlier steps this way, implicit
        differentiation evaluates its losses at the solution.

        Args:
            track: the tracking flag to use meanwhile; unchanged when None.
        """
        saved = (self._higher_track, list(self._higher_history), self._higher_slot_values())
        if track is not None:
            object.__setattr__(self, "_higher_track", track)
        try:
            yield self._higher_assign
        finally:
            object.__setattr__(self, "_higher_track", saved[0])
            self._higher_history[:] = saved[1]
            self._higher_set_slot_values(saved[2])

    def _higher_configure(
        self,
        *,
        first_order: bool | None = None,
        history: HistoryMode | None = None,
        ddp: Any = None,
    ) -> None:
        """Settings that the entry points, the optimizer and checkpointing choose.

        Args:
            first_order: inner gradients are taken without their graph, so no
                forward needs kernels with a double backward.
            history: which fast weights the history keeps: ``"all"``, or
                ``"ends"`` (the initial and the current ones only).
            ddp: the link to a ``DistributedDataParallel`` model whose forward
                bookkeeping every call does (:func:`higher.distributed.link`).
        """
        if first_order is not None:
            object.__setattr__(self, "_higher_first_order", first_order)
        if history is not None:
            object.__setattr__(self, "_higher_history_mode", history)
        if ddp is not None:
            object.__setattr__(self, "_higher_ddp", ddp)

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
            >>> fmodel = higher.monkeypatch(nn.Linear(2, 1))
            >>> _ = fmodel.detach_()
            >>> fmodel.fast_params[0].is_leaf
            True
        """
        current = self.fast_params
        if current is not None:
            detached = [detach_leaf(p) for p in current]
            self._higher_history[:] = [detached]
            self._higher_assign(detached)
        for module in self.modules():  # type: ignore[attr-defined]
            for name, buf in module._buffers.items():
                if buf is not None and buf.grad_fn is not None:
                    module._buffers[name] = buf.detach()
        return self

    # -- moving weights in and out -----------------------------------------------
    def reset(
        self, source: nn.Module | Iterable[torch.Tensor], copy_initial_weights: bool = True
    ) -> None:
        """Starts over from new initial weights without building a new patched module.

        Args:
            source: an ``nn.Module`` of the same structure (its parameters become
                the initial fast weights and its buffers are copied in), or a list
                of tensors in ``parameters()`` order.
            copy_initial_weights: as in :func:`higher.monkeypatch`, for a module source.

        Example:
            >>> model = nn.Linear(2, 1)
            >>> fmodel = higher.monkeypatch(model)
            >>> fmodel.reset(model)
            >>> len(list(fmodel.parameters(time=0)))
            2
        """
        if isinstance(source, nn.Module):
            shares = not copy_initial_weights
            self._higher_configure(ddp=distributed.link_for_reset(self._higher_ddp, source, shares))
            originals: list[torch.Tensor] = list(wrapped_module(source).parameters())
            params = self._higher_initial_params(originals, None, copy_initial_weights)
            buffer_sync(source, self)  # type: ignore[arg-type]
            self._higher_buffers_synced()
        else:
            params = list(source)
        params = self._higher_check_params(params)
        self._higher_history.clear()
        self._higher_set_fast_params(params)

    def _higher_initial_params(
        self, originals: list[torch.Tensor], device: Device, copy_initial_weights: bool
    ) -> list[torch.Tensor]:
        """The initial fast weights made from a module's parameters. A subclass hook."""
        return func_params(originals, device, copy_initial_weights)

    def _higher_buffers_synced(self) -> None:
        """Called once the buffers were copied in from a module. A subclass hook."""

    def write_back(self, module: nn.Module, buffers: bool = True) -> None:
        """Copies the current fast weights (and buffers) into an ordinary module.

        The copy is in place and outside autograd, so ``module`` keeps its
        parameter objects and any ``torch.optim`` optimizer holding them.

        Args:
            module: a module with the structure of the patched one (usually
                the module that was patched, or its DDP wrapper).
            buffers: also copy buffers such as BatchNorm running statistics.

        Example:
            >>> model = nn.Linear(2, 1)
            >>> fmodel = higher.monkeypatch(model)
            >>> fmodel.update_params([torch.zeros(1, 2), torch.ones(1)])
            >>> fmodel.write_back(model)
            >>> model.bias.item()
            1.0
        """
        self._higher_write_back(module, buffers, lambda t: t)

    def _higher_write_back(
        self, module: nn.Module, buffers: bool, select: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """``write_back`` of what ``select`` picks out of each weight and buffer."""
        module = wrapped_module(module)  # a DDP or compiled model: the module it wraps
        targets: list[torch.Tensor] = list(module.parameters())
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
                src, dst = select(src), self._higher_write_target(dst)
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
                        buf.copy_(select(mine[name]))

    def _higher_write_target(self, param: torch.Tensor) -> torch.Tensor:
        """What ``write_back`` copies a fast weight into, for a module's parameter. A
        subclass hook (a sharded model's: this rank's shard)."""
        return param

    # -- copying -----------------------------------------------------------------
    def __deepcopy__(self, memo: dict[int, Any]) -> _MonkeyPatchBase:
        current = self.fast_params or []
        for t in current:
            memo[id(t)] = t  # replaced below; never deep-copied (it may carry history)
        new: Any = copy_tree(self, memo, device=None, skip=("_higher_history",))  # type: ignore[arg-type]
        object.__setattr__(new, "_higher_history", [])
        if current:
            new.update_params([copy_leaf(t) for t in current])
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The class is made at run time, so pickle rebuilds it from the original one.
        clone = copy.deepcopy(self)
        mixin = type(self).__bases__[0]
        return _unpickle_patched, (self._higher_base, clone.__dict__, mixin)


_compat.register_forward(_MonkeyPatchBase.__call__)

_module_globals = nn.modules.module
#: ``nn.Module.__call__`` as torch defines it; a class (or a tracer, such as
#: ``torch.fx``'s, which replaces it for a while) with another is called through it.
_MODULE_CALL = nn.Module.__call__
#: What ``_MODULE_CALL`` calls; a class that overrides it is called through it.
_CALL_IMPL = nn.Module._call_impl
_LINEAR_FORWARD = nn.Linear.forward


def _no_hooks(module: nn.Module) -> bool:
    """Whether ``nn.Module.__call__`` would call ``module.forward`` and nothing else.

    The test of ``Module._call_impl`` (hooks of the module, global hooks) and of
    ``_wrapped_call_impl`` (``module.compile()``), and no JIT tracing under way.
    """
    g = _module_globals
    return not (
        _hooked(module.__dict__)
        or g._global_forward_hooks
        or g._global_forward_pre_hooks
        or g._global_backward_hooks
        or g._global_backward_pre_hooks
        or torch._C._get_tracing_state()
        or nn.Module.__call__ is not _MODULE_CALL
        or type(module)._call_impl is not _CALL_IMPL
    )


def _hooked(d: dict[str, Any]) -> bool:
    """Whether a module with this ``__dict__`` has hooks of its own or a compiled call."""
    return bool(
        d["_forward_hooks"]
        or d["_forward_pre_hooks"]
        or d["_backward_hooks"]
        or d["_backward_pre_hooks"]
        or d.get("_compiled_call_impl") is not None
    )


def _run_sequential(seq: nn.Module, x: Any) -> Any:
    """``nn.Sequential.forward`` with each child's ``forward`` called directly.

    What ``nn.Module.__call__`` does for a child without hooks, less its two
    Python frames: the same forwards in the same order, so the same values and
    graph. The caller checked global hooks and tracing (:func:`_no_hooks`). A
    child with hooks of its own, or whose class defines its own call, goes
    through its ``__call__``; a child that is itself an ``nn.Sequential``
    (exactly, with the class's forward) is run the same way; an ``nn.Linear``
    (exactly, with the class's forward) runs ``F.linear`` on its parameter
    slots, as its forward does but without ``nn.Module.__getattr__``.
    """
    for m in seq._modules.values():
        cls = type(m)
        d = m.__dict__
        if _hooked(d) or cls.__call__ is not _MODULE_CALL or cls._call_impl is not _CALL_IMPL:
            x = m(x)
        elif "forward" in d:
            x = m.forward(x)
        elif cls is nn.Linear and cls.forward is _LINEAR_FORWARD:
            p = m._parameters
            try:
                weight, bias = p["weight"], p["bias"]
            except KeyError:  # a weight that is no parameter: the forward finds it
                x = m.forward(x)
            else:
                x = F.linear(x, weight, bias)
        elif cls is nn.Sequential:
            x = _run_sequential(m, x)
        else:
            x = m.forward(x)
    return x


class _Recompute:
    """Lends a patched module with the slots holding ``weights`` and the backends of the
    moment it was made; may be entered again."""

    def __init__(self, fmodule: _MonkeyPatchBase, weights: list[Any]) -> None:
        self.fmodule, self.weights = fmodule, weights
        # The kernels of the first run: backend flags, and math attention when
        # it was to be differentiated twice.
        self.kernels = _compat.BackendFlags()
        self.double = _compat.math_attention_active()
        self.lent: list[Any] = []

    def __enter__(self) -> None:
        lent = self.fmodule._higher_lend()
        lent.__enter__()
        self.lent.append(lent)
        self.fmodule._higher_set_slot_values(self.weights)
        self.kernels.__enter__()
        if self.double:
            _compat.MATH_ATTENTION.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.double:
            _compat.MATH_ATTENTION.__exit__(*exc)
        self.kernels.__exit__(*exc)
        self.lent.pop().__exit__(*exc)


_PATCHED_CLASSES: dict[tuple[type, type], type] = {}
#: Methods that patched classes of some bases get, by base: registered by the capability
#: that owns them (``higher._views``: indexing of containers), so that the core does
#: not import it.
_CLASS_METHODS: list[tuple[tuple[type, ...], dict[str, Any]]] = []


def register_class_methods(bases: tuple[type, ...], methods: dict[str, Any]) -> None:
    """Gives the patched classes of subclasses of ``bases`` made from now on ``methods``."""
    _CLASS_METHODS.append((bases, methods))


def _patched_class(base: type[nn.Module], mixin: type[_MonkeyPatchBase] = _MonkeyPatchBase) -> type:
    """The class of patched copies of ``base`` modules: ``mixin`` first, then ``base``."""
    cls = _PATCHED_CLASSES.get((mixin, base))
    if cls is None:
        name = f"{mixin._higher_class_prefix}{base.__name__}"
        attrs: dict[str, Any] = {"_higher_base": base, "__module__": base.__module__}
        for bases, methods in _CLASS_METHODS:
            if issubclass(base, bases):
                attrs.update(methods)
        cls = type(name, (mixin, base), {**attrs, "__qualname__": name})
        _PATCHED_CLASSES[mixin, base] = cls
    return cls


def _unpickle_patched(
    base: type[nn.Module], state: dict[str, Any], mixin: type[_MonkeyPatchBase] = _MonkeyPatchBase
) -> nn.Module:
    _compat.install_forward_hooks()
    cls = _patched_class(base, mixin)
    obj: nn.Module = cls.__new__(cls)  # type: ignore[call-overload]
    obj.__dict__.update(state)
    return obj


def _make_functional(
    module: nn.Module,
    encapsulator: Callable[[Any, nn.Module], None] | None,
    device: Device,
    mixin: type[_MonkeyPatchBase] = _MonkeyPatchBase,
) -> tuple[Any, list[torch.Tensor]]:
    """Builds the patched copy, with no fast weights yet; also returns the original
    parameters, in order."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module to patch, got {type(module).__name__}")
    _compat.install_forward_hooks()
    plan = Plan()
    fmodule = copy_tree(module, {}, device, plan=plan)
    base = EXACT_BATCH_NORMS.get(type(module), type(module))  # a root batch norm too
    object.__setattr__(fmodule, "__class__", _patched_class(base, mixin))
    attrs = {
        # A forward that nn.Sequential's own would run child by child (see _run_sequential).
        "_higher_lean": type(module) is nn.Sequential and "forward" not in module.__dict__,
        "_higher_slots": [tuple(s) for s in plan.slots],
        "_higher_rnns": tuple(plan.rnns),
        "_higher_names": plan.names,
        "_higher_shapes": [p.shape for p in plan.originals],
        "_higher_history": [],
        "_higher_track": True,
    }
    fmodule.__dict__.update(attrs)  # plain attributes: what object.__setattr__ would do
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule, plan.originals


def patch(
    module: nn.Module,
    device: Device,
    copy_initial_weights: bool,
    track_higher_grads: bool,
    mixin: type[_MonkeyPatchBase] = _MonkeyPatchBase,
    **settings: Any,
) -> tuple[Any, list[torch.Tensor]]:
    """A patched copy of ``module`` with its initial fast weights set.

    ``settings`` are ``_higher_*`` attributes that ``mixin`` needs before its
    initial weights are laid out (batched mode's number of tasks).

    Returns:
        ``(fmodule, originals)``: the copy and the module's parameters, in
        ``module.parameters()`` order.
    """
    fmodule, originals = _make_functional(module, None, device, mixin)
    for key, value in settings.items():
        object.__setattr__(fmodule, key, value)
    if not isinstance(track_higher_grads, bool):
        raise TypeError(
            f"track_higher_grads must be a bool, got {type(track_higher_grads).__name__}"
        )
    object.__setattr__(fmodule, "_higher_track", track_higher_grads)
    initial = fmodule._higher_initial_params(originals, device, copy_initial_weights)
    fmodule._higher_set_fast_params(initial)
    fmodule._higher_buffers_synced()
    return fmodule, originals


def buffer_sync(module: nn.Module, fmodule: nn.Module, device: Device = None) -> None:
    """Copies every buffer of ``module`` into the patched ``fmodule``.

    The patched module gets its own copies, so updating them (BatchNorm running
    statistics in train mode) never changes ``module``.

    Example:
        >>> bn = nn.BatchNorm1d(3)
        >>> fbn = higher.monkeypatch(bn)
        >>> _ = bn.running_mean.fill_(1.0)
        >>> higher.buffer_sync(bn, fbn)
        >>> fbn.running_mean.tolist()
        [1.0, 1.0, 1.0]
    """
    targets = dict(fmodule.named_modules())
    for name, sub in wrapped_module(module).named_modules():
        target = targets.get(name)
        if target is None:
            raise ValueError(f"buffer_sync: patched module has no submodule '{name}'")
        for key, buf in sub._buffers.items():
            target._buffers[key] = None if buf is None else buf.detach().to(device, copy=True)


def wrapped_module(module: nn.Module) -> nn.Module:
    """The module that wrappers (``DistributedDataParallel``, ``torch.compile``) run.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> higher._patched.wrapped_module(model) is model
        True
    """
    while True:
        inner = _compat.compiled_inner(module)
        if inner is None:
            inner = distributed.local_module(module)
        if inner is module:
            return module
        module = inner
