"""Checkpointed unrolls: long inner loops whose activations are recomputed, not kept.

An unrolled inner loop normally keeps every step's activations (and the graph of
its inner gradient) until the outer backward. With checkpointing, a step is
taken as ``diffopt.step(closure)``: the step runs as usual, building the real
autograd graph, but the tensors that graph saves are dropped as soon as the step
is done, through ``torch.autograd.graph.saved_tensors_hooks``. The outer backward
calls the closure again, one *segment* of ``steps_per_segment`` steps at a time,
to rebuild them. Because the graph is the ordinary one (as in PyTorch's
non-reentrant ``torch.utils.checkpoint``), gradients reach everything the
unroll depends on -- initial weights, tensor hyperparameters, tensors the closure
captures -- and are identical to those of the un-checkpointed unroll: each
replayed step sees the random-number state, module training flags, buffers
(BatchNorm running statistics, which the replay does not update a second time),
autocast settings, attention backends and optimizer hyperparameters of its
first run. What stays in memory is one set
of fast weights and optimizer state per segment, a few small records per step,
and one segment's activations during the backward. Enable it with
``innerloop_ctx(..., checkpoint=True)`` (or a number of steps per segment) or
:func:`enable`, which attaches a checkpointer as the optimizer's
``closure_runner``. It works through the optimizer's ``snapshot`` /
``restore`` and ``_advance`` (the update proper) and the patched module's
``_higher_lend`` (run it on an earlier step's weights, then get everything back).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _compat
from .optim.base import Snapshot, call_closure
from .utils import detach_leaf, map_tensors

__all__ = ["enable"]

Closure = Callable[[], Tensor]
_NO_LOSS = torch.empty(0)  # a step record's loss until its first run sets it


def enable(diffopt: Any, steps_per_segment: int | bool = True) -> Any:
    """Makes ``diffopt.step(closure)`` checkpoint its steps.

    Args:
        diffopt: a differentiable optimizer with an attached patched module
            (as :func:`higher.innerloop_ctx` builds).
        steps_per_segment: how many consecutive steps are recomputed together;
            ``True`` means 1, ``False`` turns checkpointing off. One set of fast
            weights and optimizer state is kept per segment, and one segment's
            activations are alive at a time during the outer backward, so about
            ``sqrt(T)`` balances the two for ``T`` steps.

    Returns:
        ``diffopt``.

    Raises:
        ValueError: ``diffopt`` has no patched module, or ``steps_per_segment``
            is not a positive int or a bool.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        ...     _ = higher.checkpoint.enable(diffopt, steps_per_segment=2)
        ...     for _ in range(4):
        ...         _ = diffopt.step(lambda: ((fmodel(x) - y) ** 2).mean())
        ...     ((fmodel(x) - y) ** 2).mean().backward()
        >>> model.weight.grad.shape
        torch.Size([1, 2])
    """
    k = _segment_length(steps_per_segment)
    fmodel: Any = diffopt.fmodel
    if k and fmodel is None:
        raise ValueError(
            "checkpointing replays steps on the optimizer's patched module, and this "
            "optimizer has none: pass fmodel= to get_diff_optim or use innerloop_ctx"
        )
    if k:
        # Intermediate fast weights would otherwise stay alive through the history.
        fmodel._higher_configure(history="ends")
    diffopt.closure_runner = _Checkpointer(k) if k else None
    return diffopt


def _segment_length(steps: int | bool) -> int:
    if isinstance(steps, bool):
        return int(steps)
    if isinstance(steps, int) and steps >= 1:
        return steps
    raise ValueError(
        f"checkpoint must be a bool or a positive number of steps per segment, got {steps!r}"
    )


class _Holder:
    """What a saved-tensor hook hands autograd: a tensor, or a place to put it back."""

    __slots__ = ("__weakref__", "meta", "value")

    def __init__(self, value: Tensor | None) -> None:
        self.value = value
        #: The shape and dtype of the tensor saved at the first run, kept once
        #: the tensor is let go, to name what a replay does differently.
        self.meta: tuple[torch.Size, torch.dtype] | None = None


@dataclass
class _StepRecord:
    """Everything a replay needs to repeat one step exactly as it first ran."""

    closure: Closure
    cells: tuple[tuple[Any, Any], ...]
    hyper: list[dict[str, Any]]
    grad_callback: Any
    rng: Any
    autocast: Any
    kernels: _compat.BackendFlags
    training: tuple[bool, ...]
    buffers: list[Tensor | None]
    loss: Tensor


class _Segment:
    """Consecutive steps whose saved tensors are recomputed together."""

    def __init__(
        self, opt: Any, layout: _Layout, params: list[Tensor], start: Snapshot, first_step: int
    ) -> None:
        self.opt = opt
        self.first_step = first_step  # the inner loop's number of this segment's first step
        self.layout = layout
        self.params = [detach_leaf(p) for p in params]
        self.state = [map_tensors(detach_leaf, st) for st in start.state]
        self.steps: list[_StepRecord] = []
        self.holders: list[weakref.ref[_Holder]] = []
        self.recording: list[_Holder] = []
        self.completed = 0  # how many of the holders belong to finished steps
        self.ends: list[int] = []  # where each finished step's holders end
        # What the last step returned, to notice changes made between steps; held
        # weakly, since a strong reference from here into the graph would make a
        # cycle through autograd that only a backward could break.
        self.outputs: list[weakref.ref[Tensor]] = []
        self.out_state: list[Any] = []

    # -- the first run -----------------------------------------------------------
    def _pack(self, x: Tensor) -> _Holder:
        # Kept with its history only until the step ends (no lasting cycle).
        holder = _Holder(x)
        self.holders.append(weakref.ref(holder))
        self.recording.append(holder)
        return holder

    def _unpack(self, holder: _Holder) -> Tensor:
        if holder.value is None:
            self._recompute()
        value = holder.value
        if value is None:  # pragma: no cover - guarded by the count check
            raise RuntimeError("checkpointed step: a saved tensor could not be recomputed")
        if not self.recording:
            # Outside a step (the outer backward) each saved tensor is read once.
            holder.value = None
        return value

    def run(self, record: _StepRecord) -> list[Tensor]:
        opt = self.opt
        try:
            with _compat.SavedTensorsHooks(self._pack, self._unpack):
                loss = call_closure(record.closure)
                new_params: list[Tensor] = opt.step(loss, None, None, record.grad_callback)
        except BaseException:
            del self.holders[self.completed :]  # a failed step is not part of the segment
            self.recording = []
            raise
        record.loss = loss.detach()
        # The step is done: let go of what it saved; the backward recomputes it.
        for holder in self.recording:
            value = holder.value
            if value is not None:
                holder.meta = (value.shape, value.dtype)
            holder.value = None
        self.recording = []
        self.steps.append(record)
        self.completed = len(self.holders)
        self.ends.append(self.completed)
        self.outputs = [weakref.ref(p) for p in new_params]
        self.out_state = [_state_key(st) for st in opt.snapshot().state]
        return new_params

    def continues(self, current: list[Tensor], now: Snapshot) -> bool:
        """Whether the next step starts where this segment's last step ended."""
        return (
            len(current) == len(self.outputs)
            and all(a is b() for a, b in zip(current, self.outputs))
            and len(now.state) == len(self.out_state)
            and all(_same_state(st, key) for st, key in zip(now.state, self.out_state))
        )

    # -- the replay --------------------------------------------------------------
    def _recompute(self) -> None:
        counter = [0]
        holders = self.holders[: self.completed]
        differs: list[tuple[int, Any, Any]] = []  # the first saved tensor unlike its first run

        def pack(x: Tensor) -> Tensor:
            x = _data(x)
            i = counter[0]
            counter[0] += 1
            if i < len(holders):
                holder = holders[i]()
                if holder is not None:
                    if not differs and holder.meta != (x.shape, x.dtype):
                        differs.append((i, holder.meta, (x.shape, x.dtype)))
                    holder.value = x
            return x

        def unpack(x: Tensor) -> Tensor:
            return x

        params, state = list(self.params), self.state
        ends: list[int] = []
        hooks = _compat.SavedTensorsHooks(pack, unpack)
        with torch.enable_grad(), _Replay(self.opt, self.layout) as replay, hooks:
            for record in self.steps:
                params, state = replay.step(record, params, state)
                ends.append(counter[0])
            # A replay that saved other tensors says more than a loss that differs.
            if differs or ends != self.ends:
                raise RuntimeError(self._divergence(ends, differs[0] if differs else None))
            replay.check_losses(self.steps, self.first_step)

    def _divergence(self, ends: list[int], differs: tuple[int, Any, Any] | None) -> str:
        """Says which step of this segment saved other tensors when replayed, and how."""
        # The first step whose count differs, or the step of the first tensor
        # that differs, whichever comes first.
        j = next((j for j, (a, b) in enumerate(zip(ends, self.ends)) if a != b), len(ends) - 1)
        start = self.ends[j - 1] if j else 0
        if differs is not None and differs[0] < self.ends[j]:
            i, first, again = differs
            j = next(j for j, end in enumerate(self.ends) if i < end)
            start = self.ends[j - 1] if j else 0
            detail = (
                f"its saved tensor {i - start + 1} is {_describe(again)} in the replay and was "
                f"{_describe(first)} when the step was taken"
            )
        else:
            replayed = ends[j] - (ends[j - 1] if j else 0)
            detail = (
                f"it saved {replayed} tensors in the replay and {self.ends[j] - start} when the "
                "step was taken"
            )
        return (
            f"checkpointed step {self.first_step + j + 1} of the inner loop did not repeat its "
            f"computation when it was recomputed during the backward: {detail}. The closure "
            "and the model must compute the same thing each time they are called: the "
            "variables the closure reads are put back as they were when the step was taken, "
            "but what it reaches otherwise (attributes, the contents of a list or dict, an "
            "iterator, variables read by the functions it calls) must not change between the "
            "step and the backward"
        )


class _Replay:
    """Lends the optimizer and patched module to a replay, and gives them back after."""

    def __init__(self, opt: Any, layout: _Layout) -> None:
        self.opt = opt
        self.modules = layout.modules
        self.slots = layout.slots
        self.gaps: list[Tensor] = []

    def __enter__(self) -> _Replay:
        self.saved = self.opt.snapshot()
        self.saved_training = [m.training for m in self.modules]
        self.saved_buffers = [m._buffers[name] for m, name in self.slots]
        self.lent = self.opt.fmodel._higher_lend()
        self.put = self.lent.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.opt.restore(self.saved)
        _set_training(self.modules, self.saved_training)
        for (m, name), buf in zip(self.slots, self.saved_buffers):
            m._buffers[name] = buf
        self.lent.__exit__(*exc)

    def step(
        self, record: _StepRecord, params: list[Tensor], state: list[dict[str, Any]]
    ) -> tuple[list[Tensor], list[dict[str, Any]]]:
        opt = self.opt
        opt.restore(Snapshot(state, record.hyper))
        self.put(params)
        _set_training(self.modules, record.training)
        for (m, name), buf in zip(self.slots, record.buffers):
            # A fresh copy: the replay may update it in place (BatchNorm in train mode).
            m._buffers[name] = None if buf is None else buf.clone()
        # The inner gradient too ran under the first run's autocast state (a
        # CPU backward runs on the calling thread), so the whole step replays in it.
        with (
            _compat.replay_rng(record.rng),
            _compat.replay_autocast(record.autocast),
            record.kernels,
            _Rebound(record.cells),
        ):
            loss = call_closure(record.closure)
            with torch.no_grad():
                # How far outside tolerance the replayed loss is (checked once per
                # segment, so that a GPU is not synchronised at every step).
                first = record.loss
                self.gaps.append(((loss - first).abs() - 1e-5 * first.abs() - 1e-12).max())
            new_params = opt._advance(loss, params, record.grad_callback)
        return list(new_params), opt.snapshot().state

    def check_losses(self, records: list[_StepRecord], first_step: int) -> None:
        if not self.gaps or not bool(torch.stack(self.gaps).max() > 0):
            return
        j = next(j for j, g in enumerate(self.gaps) if bool(g > 0))
        raise RuntimeError(
            f"checkpointed step {first_step + j + 1} of the inner loop: its closure returned a "
            "different loss when called again during the backward than when the step was taken "
            f"({records[j].loss.flatten()[:4].tolist()}); it must compute the same loss each "
            "time. The variables it reads are put back as they were when the step was taken, "
            "but data it reaches otherwise (an attribute, the contents of a list or dict, an "
            "iterator, variables read by the functions it calls) must not change between the "
            "step and the backward: bind such data when you create the closure (a default "
            "argument or functools.partial)"
        )


@dataclass
class _Layout:
    """The patched module's submodules and buffer slots, listed once."""

    modules: list[Any]
    slots: list[tuple[Any, str]]


class _Checkpointer:
    """Groups an optimizer's closure steps into segments and records each step.

    Attached to an optimizer as its ``closure_runner``; ``step(closure)`` calls
    it when a graph is being built.
    """

    def __init__(self, steps_per_segment: int) -> None:
        self.steps_per_segment = steps_per_segment
        self.segment: _Segment | None = None
        # Buffer snapshots are shared by consecutive steps while a buffer is unchanged.
        self.buffer_cache: list[tuple[Tensor | None, int, Tensor | None]] = []
        self.last_rng: Any = None
        self.layout: _Layout | None = None
        self.device_types: tuple[str, ...] = ()
        self.steps_taken = 0

    def __call__(self, opt: Any, closure: Closure, params: Any, grad_callback: Any) -> list[Tensor]:
        if params is not None:
            raise ValueError(
                "a checkpointed step takes its weights from the patched module: call "
                "step(closure) without params (update_params sets them)"
            )
        fmodel = opt.fmodel
        current = fmodel.fast_params
        now = opt.snapshot()
        segment = self.segment
        if (
            segment is None
            or len(segment.steps) >= self.steps_per_segment
            or not segment.continues(current, now)
        ):
            if self.layout is None:
                modules = list(fmodel.modules())
                slots = [(m, name) for m in modules for name in m._buffers]
                self.layout = _Layout(modules, slots)
                types = {p.device.type for p in current} | {"cpu"}
                self.device_types = tuple(sorted(types))
            segment = self.segment = _Segment(opt, self.layout, current, now, self.steps_taken)
        record = _StepRecord(
            closure=closure,
            cells=_bound_cells(closure),
            hyper=map_tensors(detach_leaf, now.hyper),
            grad_callback=grad_callback,
            rng=self._rng_state(current),
            autocast=_compat.autocast_state(self.device_types),
            kernels=_compat.BackendFlags(),
            training=tuple(m.training for m in segment.layout.modules),
            buffers=self._snapshot_buffers(segment.layout.slots),
            loss=_NO_LOSS,
        )
        new_params = segment.run(record)
        self.steps_taken += 1
        return new_params

    def _rng_state(self, params: list[Tensor]) -> Any:
        # Most loops draw no random numbers between steps: share one copy then.
        state = _compat.rng_state(params)
        last = self.last_rng
        if last is not None and _compat.same_rng_state(state, last):
            return last
        self.last_rng = state
        return state

    def _snapshot_buffers(self, slots: list[tuple[Any, str]]) -> list[Tensor | None]:
        cache = self.buffer_cache
        if len(cache) != len(slots):
            cache[:] = [(None, -1, None)] * len(slots)
        out: list[Tensor | None] = []
        for k, (m, name) in enumerate(slots):
            buf: Tensor | None = m._buffers[name]
            seen, version, snap = cache[k]
            if buf is None:
                snap = None
            elif buf is not seen or _compat.version(buf) != version:
                snap = buf.detach().clone()
            # A module that may change its buffers unseen (version -1) gets a
            # fresh snapshot at the next step too.
            silent = _compat.updates_buffers_silently(m)
            version = -1 if silent or buf is None else _compat.version(buf)
            cache[k] = (buf, version, snap)
            out.append(snap)
        return out


def _bound_cells(closure: Closure) -> tuple[tuple[Any, Any], ...]:
    """The variables a closure reads from enclosing scopes and globals, with their values now.

    A closure written in a loop, ``lambda: loss(fmodel(x), y)``, reads ``x``,
    ``y`` and ``fmodel`` when it is called, not when it is made: replayed
    during the backward, it would see the loop's last batch (or the patched
    model of the meta-batch's last task). The replay puts back what these
    variables held when the step was taken, as ``lambda x=x, y=y:`` would.
    Only the closure's own code is looked at, not the functions it calls.
    Each entry is ``(cell, value)`` for a variable of an enclosing function, or
    ``((namespace, name), value)`` for a global.
    """
    out: list[tuple[Any, Any]] = []
    for cell in getattr(closure, "__closure__", None) or ():
        try:
            out.append((cell, cell.cell_contents))
        except ValueError:  # a variable not yet assigned
            continue
    code = getattr(closure, "__code__", None)
    namespace = getattr(closure, "__globals__", None)
    if code is not None and namespace is not None:
        # co_names also lists attribute names; those that are no global are skipped.
        out.extend(((namespace, n), namespace[n]) for n in code.co_names if n in namespace)
    return tuple(out)


class _Rebound:
    """Gives a closure's variables the values of its first run for a block, then puts
    back what they hold now."""

    __slots__ = ("entries", "saved")

    def __init__(self, entries: tuple[tuple[Any, Any], ...]) -> None:
        self.entries = entries
        self.saved: list[Any] = []

    def __enter__(self) -> None:
        self.saved = [_read(where) for where, _ in self.entries]
        for where, value in self.entries:
            _write(where, value)

    def __exit__(self, *exc: object) -> None:
        for (where, _), value in zip(self.entries, self.saved):
            _write(where, value)


_UNSET = object()


def _read(where: Any) -> Any:
    if isinstance(where, tuple):
        namespace, name = where
        return namespace.get(name, _UNSET)
    try:
        return where.cell_contents
    except ValueError:  # deleted since
        return _UNSET


def _write(where: Any, value: Any) -> None:
    if isinstance(where, tuple):
        namespace, name = where
        if value is _UNSET:
            namespace.pop(name, None)
        else:
            namespace[name] = value
    elif value is _UNSET:
        del where.cell_contents
    else:
        where.cell_contents = value


def _describe(meta: tuple[torch.Size, torch.dtype] | None) -> str:
    if meta is None:
        return "unknown"
    shape, dtype = meta
    return f"a {str(dtype).removeprefix('torch.')} tensor of shape {tuple(shape)}"


def _set_training(modules: list[Any], flags: Sequence[bool]) -> None:
    for m, flag in zip(modules, flags):
        if m.training is not flag:  # nn.Module.__setattr__ is slow; most flags match
            m.training = flag


def _state_key(state: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, weakref.ref(v) if isinstance(v, Tensor) else v) for k, v in state.items()]


def _same_state(state: dict[str, Any], key: list[tuple[str, Any]]) -> bool:
    if len(state) != len(key):
        return False
    for (k, ref), (k2, v) in zip(key, state.items()):
        if k != k2:
            return False
        if isinstance(v, Tensor):
            if not isinstance(ref, weakref.ref) or ref() is not v:
                return False
        elif isinstance(ref, weakref.ref) or ref != v:
            return False
    return True


def _data(x: Tensor) -> Tensor:
    """``x`` without its autograd history: a saved tensor that kept its ``grad_fn``
    would form a cycle through autograd's C++ graph that Python cannot collect.
    Autograd restores the history when it unpacks the tensor."""
    return x.detach() if x.requires_grad else x
