"""Meta-learning a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

``monkeypatch`` and ``innerloop_ctx`` accept a ``fully_shard``'ed model (the
root and, as the FSDP2 documentation recommends, each layer) in per-task mode,
with or without ``checkpoint=``. The fast weights stay sharded: fast weight
``i`` is this rank's shard (``param.to_local()``) of parameter ``i``, and the
differentiable optimizer, whose updates are all elementwise, keeps its state
as shards too. Each FSDP unit of the patched copy all-gathers its parameters'
shards when it runs and lets the full tensors go when its forward returns, as
FSDP2 does; the tensors autograd saves for the backward are not kept either:
they are gathered again when a backward (an inner step's gradient or the outer
backward) needs them, once per unit. As in FSDP2, a unit's parameters (of one
dtype) share their collectives: one all-gather of a flat buffer, whose views
are the full tensors, and one reduce-scatter of their gradients. All-gather
and reduce-scatter are a pair of autograd Functions, each the other's
backward, so inner gradients are differentiable to any order. As in FSDP2
every rank runs the same computation on its own data, and gradients are those
of the *mean* of the ranks' losses; the outer
backward leaves the meta-gradient in the sharded parameters' ``.grad``
(DTensors) as an FSDP2 training step would, for any ``torch.optim``
meta-optimizer to step. FSDP2's training recipe works as it is: a unit's
``MixedPrecisionPolicy`` (the fast weights stay shards of the parameters' dtype,
the master copy; the gather casts to ``param_dtype``, the reduce-scatter reduces
in ``reduce_dtype`` and casts back; inputs and outputs are cast as FSDP2 casts
them), HSDP's 2-D ``(replicate, shard)`` mesh (gathers within a replica, reduces
over all ranks), any ``reshard_after_forward`` (the copy always lets a unit's
weights go after its forward), and activation checkpointing inside the model
(transformers' ``gradient_checkpointing_enable``, ``checkpoint_wrapper``, your
own ``torch.utils.checkpoint``): a recomputation puts back the shards of the step
it recomputes and gathers again, once each, the units that were gathered when the
block first ran. A unit that FSDP2 left gathered while idle (the root after an
ordinary forward) is resharded before its shards are read. In a backward, every
collective is preceded by a small all-reduce that checks that all ranks are at
the same one (ranks whose losses reach different units raise together instead of
pairing the wrong gradients). Unsupported configurations are refused when the
model is patched, each with its alternative. :mod:`higher.patch` sends FSDP2 models here;
the guide is ``docs/guides/distributed.md``.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import _compat, _patched
from ._compat import fsdp as _fsdp_compat
from .utils import Device, as_list, copy_leaf

__all__ = ["is_fully_sharded", "sharded_saves"]


def is_fully_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``module`` or one of its submodules.

    Such a model is patched with sharded fast weights (see the module docstring).

    Example:
        >>> higher.fsdp.is_fully_sharded(nn.Linear(2, 1))
        False
    """
    return _compat.contains_fsdp2_unit(module)


def _prod(sizes: Iterable[int]) -> int:
    out = 1
    for n in sizes:
        out *= n
    return out


# -- how one parameter is sharded ---------------------------------------------------------
class _Spec:
    """Where this rank's shard of a ``Shard(0)`` parameter lies, and its process group.

    As ``torch.chunk``: every rank holds ``chunk`` rows but the last non-empty
    one, which may hold fewer, and ranks after it hold none. Collectives pad
    each shard to ``chunk`` rows (``numel`` elements).
    """

    __slots__ = (
        "chunk",
        "dim0",
        "full_shape",
        "group",
        "local_shape",
        "numel",
        "param_dtype",
        "rank",
        "reduce_dtype",
        "replicas",
        "replicate_group",
        "rows",
        "world",
    )

    def __init__(self, param: Any, param_dtype: Any = None, reduce_dtype: Any = None) -> None:
        # The unit's MixedPrecisionPolicy: gathered weights in param_dtype, gradients
        # reduced in reduce_dtype (None: the shards' dtype).
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        group, rank, world, _ = _compat.fsdp_shard_layout(param)
        self.group, self.rank, self.world = group, rank, world
        # HSDP: the shards are replicated over the mesh's first dimension.
        self.replicate_group, self.replicas = _fsdp_compat.fsdp_replicas(param)
        self.full_shape = tuple(param.shape)
        self.dim0 = self.full_shape[0]
        self.chunk = -(-self.dim0 // world)
        self.rows = max(0, min(self.chunk, self.dim0 - rank * self.chunk))
        self.local_shape = (self.rows, *self.full_shape[1:])
        self.numel = self.chunk * _prod(self.full_shape[1:])

    def __deepcopy__(self, memo: dict[int, Any]) -> _Spec:
        return self  # immutable, and holds a process group

    def local_rows(self, full: Tensor) -> Tensor:
        """This rank's rows of a tensor of the parameter's full shape."""
        start = min(self.rank * self.chunk, self.dim0)
        return full.narrow(0, start, self.rows)


class _Group:
    """Parameters of one FSDP unit (one dtype) gathered and reduce-scattered together.

    One collective serves them all, as FSDP2's flat buffer does: a collective's
    fixed cost (about a millisecond on gloo) dominates for the small tensors of
    a layer, so a unit costs one collective, not one per parameter. Each rank's
    contribution is its padded shards end to end (parameter ``i`` at
    ``offsets[i]``, ``spec.numel`` elements); the gathered buffer is rearranged
    so that each parameter's full tensor is contiguous (parameter ``i`` at
    ``world * offsets[i]``), and the full tensors are views of it.
    """

    __slots__ = (
        "group",
        "key",
        "names",
        "offsets",
        "param_dtype",
        "reduce_dtype",
        "replicas",
        "replicate_group",
        "size",
        "specs",
        "subsets",
        "world",
    )

    def __init__(self, specs: list[_Spec], cast: bool = True) -> None:
        self.specs = specs
        self.subsets: dict[tuple[int, ...], _Group] = {}
        self.group, self.world = specs[0].group, specs[0].world
        self.replicate_group, self.replicas = specs[0].replicate_group, specs[0].replicas
        # Mixed precision (all specs of a group share it): the gather casts the shards to
        # param_dtype, the reduce-scatter the full gradients to reduce_dtype and its
        # result back to the shards' dtype. ``cast=False``: plain tensors (gradients of
        # hyperparameters) moved as they are.
        self.param_dtype = specs[0].param_dtype if cast else None
        self.reduce_dtype = specs[0].reduce_dtype if cast else None
        self.offsets = []
        size = 0
        for spec in specs:
            self.offsets.append(size)
            size += spec.numel
        self.size = size  # elements of one rank's contribution
        # Which unit's collectives these are, the same on every rank (see _agree): its
        # position + 1 among the model's units, whose names are ``names``; -1 for the
        # gradient of a full-shape hyperparameter (_LocalRows).
        self.key = -1
        self.names: tuple[str, ...] = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> _Group:
        return self  # immutable, and holds a process group

    def subset(self, members: list[int]) -> _Group:
        """The group of some of these parameters (those that need a gradient)."""
        if len(members) == len(self.specs):
            return self
        key = tuple(members)
        if key not in self.subsets:
            cast = self.param_dtype is not None or self.reduce_dtype is not None
            subset = _Group([self.specs[i] for i in members], cast=cast)
            subset.key, subset.names = self.key, self.names
            self.subsets[key] = subset
        return self.subsets[key]

    def gather(self, shards: list[Tensor]) -> Tensor:
        """All ranks' padded shards, parameter by parameter, as one flat buffer (no autograd)."""
        first = shards[0].detach()
        _agree(self, first.device, _GATHER)
        dtype = self.param_dtype or first.dtype
        if len(self.specs) == 1 and first.numel() == self.size:
            flat = first.to(dtype).contiguous().view(-1)
        else:
            flat = first.new_empty(self.size, dtype=dtype)
            for spec, offset, shard in zip(self.specs, self.offsets, shards):
                n = shard.numel()
                flat[offset : offset + n].copy_(shard.detach().reshape(-1))
                flat[offset + n : offset + spec.numel].zero_()  # the padding rows
        out = flat.new_empty(self.world * self.size)
        _compat.all_gather_into(out, flat, self.group)
        if len(self.specs) == 1:
            return out
        # Rank-major (rank r's parameter i at r * size + offset) to parameter-major.
        ranks = out.view(self.world, self.size)
        buffer = torch.empty_like(out)
        for spec, offset in zip(self.specs, self.offsets):
            dst = buffer[self.world * offset : self.world * (offset + spec.numel)]
            dst.view(self.world, spec.numel).copy_(ranks[:, offset : offset + spec.numel])
        return buffer

    def fulls(self, buffer: Tensor) -> list[Tensor]:
        """Each parameter's full tensor: a view of a gathered buffer."""
        out = []
        for spec, offset in zip(self.specs, self.offsets):
            padded = buffer[self.world * offset : self.world * (offset + spec.numel)]
            padded = padded.view(self.world * spec.chunk, *spec.full_shape[1:])
            out.append(padded if padded.shape[0] == spec.dim0 else padded[: spec.dim0])
        return out

    def reduce_scatter_mean(self, fulls: list[Tensor], dtype: Any = None) -> list[Tensor]:
        """This rank's rows of the mean over ranks of each full tensor (no autograd), in
        ``dtype`` (the shards')."""
        first = fulls[0].detach()
        _agree(self, first.device, _REDUCE)
        reduce_dtype = self.reduce_dtype or dtype or first.dtype
        if len(self.specs) == 1 and first.numel() == self.world * self.size:
            padded = first.to(reduce_dtype).contiguous().view(-1)
        else:
            padded = first.new_empty(self.world * self.size, dtype=reduce_dtype)
            ranks = padded.view(self.world, self.size)
            for spec, offset, full in zip(self.specs, self.offsets, fulls):
                full = full.detach()
                if full.shape[0] != self.world * spec.chunk:
                    rows = full.new_zeros((self.world * spec.chunk, *spec.full_shape[1:]))
                    rows[: spec.dim0].copy_(full)
                    full = rows
                ranks[:, offset : offset + spec.numel].copy_(full.reshape(self.world, spec.numel))
        # FSDP2's division: in float16 (any reduce dtype but float32 and bfloat16),
        # about sqrt(ranks) before the sum and the rest after it, so that the sum of
        # the ranks' gradients does not overflow; out of place, as ``padded`` may be
        # the gradient itself.
        pre, post = _fsdp_compat.fsdp_divide_factors(padded.dtype, self.world * self.replicas)
        if pre != 1:
            padded = padded / pre
        out = padded.new_empty(self.size)
        _compat.reduce_scatter_into(out, padded, self.group)
        if self.replicas > 1:  # HSDP: the sum over the replicas too, as FSDP2 reduces
            _fsdp_compat.all_reduce_sum(out, self.replicate_group)
        if post != 1:
            out.div_(post)
        if dtype is not None and dtype != out.dtype:
            out = out.to(dtype)
        return [
            out[offset : offset + _prod(spec.local_shape)].view(spec.local_shape)
            for spec, offset in zip(self.specs, self.offsets)
        ]


# -- the ranks' backward passes issue the same collectives --------------------------------
class _Agreement:
    """Where one backward (an autograd graph task) is in its collectives, on this rank."""

    __slots__ = ("count", "group", "names", "replicate_group")

    def __init__(self, group: _Group) -> None:
        self.count = 0  # collectives so far
        self.group, self.replicate_group = group.group, group.replicate_group
        self.names = group.names


#: Each running backward's agreement state, by graph task id.
_AGREEMENTS: dict[int, _Agreement] = {}
_GATHER, _REDUCE, _END = 1, 2, 0  # what a rank is about to do


def _agree(group: _Group, device: torch.device, kind: int) -> None:
    """In a backward, checks that every rank is about to issue the same collective.

    A forward runs the same units on every rank, but a backward runs the nodes that
    its loss depends on, in an order set by its graph: if the ranks' losses depend on
    different units (an output head used on some ranks only), or on the same ones
    through differently built graphs, their collectives would pair up wrong, silently
    mixing the gradients of units of the same size. So in a backward every collective
    is preceded by a small all-reduce of what it is (unit, all-gather or
    reduce-scatter, size), and the backward's end by one more: every rank sees the
    same result, and all raise together.
    """
    if group.world * group.replicas == 1:
        return  # one rank: nothing to pair up
    task = _fsdp_compat.backward_task_id()
    if task < 0:
        return  # a forward: every rank runs the same units
    state = _AGREEMENTS.get(task)
    if state is None:
        state = _AGREEMENTS[task] = _Agreement(group)
        if not _compat.at_backward_end(functools.partial(_agree_at_end, task, device)):
            del _AGREEMENTS[task]  # (cannot happen in a backward)
            return
    state.names = group.names or state.names
    state.group, state.replicate_group = group.group, group.replicate_group
    _check_agreement(task, state, [group.key, kind, group.size], device)
    state.count += 1


def _agree_at_end(task: int, device: torch.device) -> None:
    state = _AGREEMENTS.get(task)
    if state is not None:
        _check_agreement(task, state, [_END, _END, 0], device)
        _AGREEMENTS.pop(task, None)


def _unit_name(key: int, names: tuple[str, ...]) -> str:
    if key < 0:
        return "the gradient of a full-shape hyperparameter"
    name = names[key - 1] if 0 < key <= len(names) else f"#{key}"
    return f"unit '{name}'" if name else "the root unit"


def _doing(what: list[int], names: tuple[str, ...]) -> str:
    key, kind, _ = what
    if kind == _END:
        return "the end of its backward"
    verb = "an all-gather" if kind == _GATHER else "a reduce-scatter"
    return f"{verb} for {_unit_name(key, names)}"


def _check_agreement(task: int, state: _Agreement, what: list[int], device: torch.device) -> None:
    """One all-reduce (maximum) of ``what`` and its negation (two with HSDP): the ranks
    agree when each entry's maximum is minus its negation's."""
    what = [*what, state.count]
    # Reading the result back waits for the device: on a group that also has a CPU
    # backend ("cpu:gloo,cuda:nccl") the check runs there, off the device's stream.
    device = _fsdp_compat.check_device(device, state.group, state.replicate_group)
    both = torch.tensor(what + [-v for v in what], dtype=torch.int64, device=device)
    _fsdp_compat.all_reduce_max(both, state.group)
    if state.replicate_group is not None:
        _fsdp_compat.all_reduce_max(both, state.replicate_group)
    n = len(what)
    high, low = both[:n].tolist(), [-v for v in both[n:].tolist()]
    if high == low:
        return
    _AGREEMENTS.pop(task, None)
    _REGATHERED.clear()
    names = state.names
    others = {tuple(high[:3]), tuple(low[:3])} - {tuple(what[:3])}
    other = _doing(list(others.pop()), names) if others else "something else"
    raise RuntimeError(
        f"higher.fsdp: the ranks' backward passes differ: at collective {state.count + 1} "
        f"of this backward, this rank is at {_doing(what[:3], names)} and another rank at "
        f"{other}. Their losses do not reach the same FSDP units in the same order (an "
        "output, a head or a branch used on some ranks only), so their gradient "
        "collectives would pair up wrongly and give wrong gradients. Make every rank "
        "compute the same loss expression: e.g. weight each output's loss by 1 or 0 "
        "(loss = w[0] * loss_0 + w[1] * loss_1) instead of choosing one per rank "
        "(FSDP2 itself needs every rank to run the same backward)"
    )


# -- gathered tensors, and what autograd saves of them ------------------------------------
class _Gathered:
    """What a gathered buffer is made of: enough to gather it again."""

    __slots__ = ("__weakref__", "dtype", "group", "shards", "storage")

    def __init__(self, storage: Any, shards: list[Tensor], group: _Group) -> None:
        self.storage = storage
        self.shards = shards
        self.group = group
        self.dtype = group.param_dtype or shards[0].dtype  # the gathered buffer's


#: Live gathered buffers, by the data pointer of their storage. An entry holds its
#: storage weakly and removes itself when the storage is freed.
_REGISTRY: dict[int, _Gathered] = {}


def _forget(ptr: int, entry_ref: weakref.ref[_Gathered], _: Any) -> None:
    entry = entry_ref()
    if entry is not None and _REGISTRY.get(ptr) is entry:
        del _REGISTRY[ptr]


def _register(buffer: Tensor, shards: Iterable[Tensor], group: _Group) -> _Gathered | None:
    storage = buffer.untyped_storage()
    ptr = storage.data_ptr()
    if ptr == 0:  # an empty tensor: nothing to keep or to free
        return None
    entry = _Gathered(None, [s.detach() for s in shards], group)
    # The storage's Python object lives as long as the storage does (PyTorch
    # keeps it while C++ holds the storage), so its weak reference dies with it.
    entry.storage = weakref.ref(storage, functools.partial(_forget, ptr, weakref.ref(entry)))
    _REGISTRY[ptr] = entry
    return entry


def _gathered(x: Tensor) -> _Gathered | None:
    """The registry entry of the buffer whose storage ``x`` views, if any."""
    if not _REGISTRY:
        return None
    try:
        storage = x.untyped_storage()
        ptr = storage.data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without (valid) storage
        return None
    entry = _REGISTRY.get(ptr)
    if entry is None or entry.storage() is not storage or x.dtype != entry.dtype:
        return None
    return entry


def _live_gathered_bytes() -> int:
    """The bytes of gathered buffers alive now (for tests and benchmarks)."""
    total = 0
    for entry in list(_REGISTRY.values()):
        storage = entry.storage()
        if storage is not None:
            total += storage.nbytes()
    return total


class _Handle:
    """What autograd keeps of a saved gathered tensor: its group's shards and its view
    geometry in the group's buffer."""

    __slots__ = ("entry", "offset", "size", "stride")

    def __init__(self, entry: _Gathered, x: Tensor) -> None:
        self.entry = entry
        self.size, self.stride, self.offset = x.size(), x.stride(), x.storage_offset()


#: The buffer last gathered again by a backward, and the entry it re-creates, so that
#: the unit's other saved weights that the backward unpacks next (usually the very
#: next nodes: a unit's backward runs as a block) reuse it instead of gathering it
#: once per saved tensor. One buffer at most: it is dropped before anything is
#: gathered (a saved weight, or a double backward's gradients), when the unit's
#: all-gather node runs (its backward is then done) and when the backward ends. So it
#: never outlives the backward and holds one unit's weights at a time, the one whose
#: backward runs. Every rank runs the same backward, so every rank reuses it the same
#: way and issues the same collectives.
_REGATHERED: list[tuple[_Gathered, Tensor]] = []


def _drop_regathered(entry: _Gathered | None = None) -> None:
    if _REGATHERED and (entry is None or _REGATHERED[0][0] is entry):
        _REGATHERED.clear()


class _Delegated:
    """A tensor handed to the saved-tensor hooks that were in force before ours."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _pack(x: Tensor) -> Any:
    entry = _gathered(x)
    return x if entry is None else _Handle(entry, x)


def _unpack(saved: Any) -> Tensor:
    if type(saved) is not _Handle:
        return saved  # type: ignore[no-any-return]
    entry = saved.entry
    if _REGATHERED and _REGATHERED[0][0] is entry:
        buffer = _REGATHERED[0][1]
    else:
        _REGATHERED.clear()  # before gathering: one unit's buffer alive at a time
        with torch.no_grad():
            buffer = entry.group.gather(entry.shards)
        # A backward that builds a graph (an inner step's) saves it again: packed again.
        _register(buffer, entry.shards, entry.group)
        if _compat.at_backward_end(_drop_regathered):  # else nothing would drop it
            _REGATHERED.append((entry, buffer))
    return buffer.as_strided(saved.size, saved.stride, saved.offset)


class _ChainedPack:
    """Packs gathered tensors as handles and hands the rest to the hooks beneath."""

    __slots__ = ("outer",)

    def __init__(self, outer: Callable[[Tensor], Any]) -> None:
        self.outer = outer

    def __call__(self, x: Tensor) -> Any:
        entry = _gathered(x)
        return _Delegated(self.outer(x)) if entry is None else _Handle(entry, x)


class _ChainedUnpack:
    __slots__ = ("outer",)

    def __init__(self, outer: Callable[[Any], Tensor]) -> None:
        self.outer = outer

    def __call__(self, saved: Any) -> Tensor:
        if type(saved) is _Delegated:
            return self.outer(saved.value)
        return _unpack(saved)


def sharded_saves() -> Any:
    """A context in which autograd keeps no gathered weights, only their shards.

    Patched FSDP2 models enter it in their forward and their inner steps'
    gradients; enter it yourself around a ``torch.autograd.grad(...,
    create_graph=True)`` of your own on a sharded patched model, or the full
    weights that its graph saves stay alive until the outer backward. Hooks
    already in force (a checkpointed step's) still receive every other tensor.

    Example:
        >>> with higher.fsdp.sharded_saves():
        ...     y = (torch.ones(2, requires_grad=True) * 2).sum()
    """
    top = _compat.top_saved_tensors_hooks()
    if top is None:
        return _compat.SavedTensorsHooks(_pack, _unpack)
    if top[0] is _pack or type(top[0]) is _ChainedPack:
        return contextlib.nullcontext()  # ours already
    return _compat.SavedTensorsHooks(_ChainedPack(top[0]), _ChainedUnpack(top[1]))


# -- the collectives, differentiable to any order -----------------------------------------
class _AllGather(torch.autograd.Function):
    """A group's shards -> their full tensors, in one collective; its backward is
    :class:`_ReduceScatter` (mean over ranks) of the gradients of the shards that need one."""

    @staticmethod
    def forward(ctx: Any, group: _Group, *shards: Tensor) -> tuple[Tensor, ...]:
        ctx.group = group
        ctx.shard_dtype = shards[0].dtype
        ctx.set_materialize_grads(False)  # see backward
        _REGATHERED.clear()  # one unit's weights at a time, as in _unpack
        buffer = group.gather(list(shards))
        ctx.entry = _register(buffer, shards, group)
        fulls = group.fulls(buffer)
        # A frozen parameter's full tensor gets no gradient, as it would gathered alone.
        frozen = [f for f, need in zip(fulls, ctx.needs_input_grad[1:]) if not need]
        if frozen:
            ctx.mark_non_differentiable(*frozen)
        return tuple(fulls)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        if ctx.entry is not None:
            _drop_regathered(ctx.entry)  # the unit's backward is done
        # Which shards need a gradient, and which full tensors got none (unused), is the
        # same on every rank (the same computation): every rank reduces the same tensors.
        need = [i for i, n in enumerate(ctx.needs_input_grad[1:]) if n]
        out: list[Tensor | None] = [None] * len(grads)
        present = [g for i in need if (g := grads[i]) is not None]
        if present:
            group = ctx.group.subset(need)
            specs = ctx.group.specs
            fulls = [
                present[0].new_zeros(specs[i].full_shape) if (g := grads[i]) is None else g
                for i in need
            ]
            scattered = _ReduceScatter.apply(group, ctx.shard_dtype, *fulls)
            # A shard whose full tensor was unused gets None, as if gathered alone (its
            # all-gather would not have run): an optimizer treats None and zero apart.
            for i, g in zip(need, scattered):
                out[i] = None if grads[i] is None else g
        return (None, *out)


class _ReduceScatter(torch.autograd.Function):
    """A group's full gradients -> this rank's shards of their means over ranks, in one
    collective; its backward is :class:`_AllGather`."""

    @staticmethod
    def forward(ctx: Any, group: _Group, dtype: Any, *fulls: Tensor) -> tuple[Tensor, ...]:
        ctx.group = group
        ctx.set_materialize_grads(False)  # as in _AllGather
        shards = group.reduce_scatter_mean(list(fulls), dtype)
        constant = [s for s, need in zip(shards, ctx.needs_input_grad[2:]) if not need]
        if constant:
            ctx.mark_non_differentiable(*constant)
        return tuple(shards)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        present = [g for g in grads if g is not None]
        if not present:
            return (None,) * (len(grads) + 2)
        specs = ctx.group.specs
        shards = [
            present[0].new_zeros(spec.local_shape) if g is None else g
            for spec, g in zip(specs, grads)
        ]
        fulls = _AllGather.apply(ctx.group, *shards)
        return (None, None, *(None if g is None else f for g, f in zip(grads, fulls)))


class _LocalRows(torch.autograd.Function):
    """This rank's rows of a replicated full-shape tensor; the backward gathers every
    rank's rows, so the tensor's ``.grad`` is complete on every rank."""

    @staticmethod
    def forward(ctx: Any, full: Tensor, spec: _Spec) -> Tensor:
        ctx.group = _Group([spec], cast=False)
        return spec.local_rows(full).clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllGather.apply(ctx.group, grad)[0], None


# -- the patched model ---------------------------------------------------------------------
class _Layout:
    """The sharding of the fast weights, and their current shards (shared with the units)."""

    def __init__(self, specs: list[_Spec]) -> None:
        self.specs = specs
        self.shards: list[Tensor] = []
        self.units: list[_Unit] = []


class _Unit:
    """One FSDP unit of the patched copy: the fast weights it gathers while it runs."""

    def __init__(self, layout: _Layout, indices: list[int], slots: list[Any]) -> None:
        self.layout = layout
        self.indices = indices
        self.slots = slots
        self.depth = 0
        self.name = ""  # the unit's module name in the model ("" for the root)
        self._groups: dict[tuple[Any, ...], list[tuple[list[int], _Group]]] = {}

    def groups(self, shards: list[Tensor]) -> list[tuple[list[int], _Group]]:
        """The unit's parameters (positions in ``indices``) gathered together: one group
        per dtype and device of the current shards (a collective has one dtype)."""
        key = tuple((s.dtype, s.device) for s in shards)
        if key not in self._groups:
            buckets: dict[Any, list[int]] = {}
            for k, (i, s) in enumerate(zip(self.indices, shards)):
                spec = self.layout.specs[i]
                key2 = (s.dtype, s.device, id(spec.group), spec.param_dtype, spec.reduce_dtype)
                buckets.setdefault(key2, []).append(k)
            specs = self.layout.specs
            groups = [(ks, _Group([specs[self.indices[k]] for k in ks])) for ks in buckets.values()]
            units = self.layout.units
            for _, group in groups:
                group.key = units.index(self) + 1
                group.names = tuple(u.name for u in units)
            self._groups[key] = groups
        return self._groups[key]

    def gather(self) -> None:
        """Puts the unit's full weights, gathered from the current shards, in its slots."""
        if not self.indices:
            return
        shards = [self.layout.shards[i] for i in self.indices]
        for members, group in self.groups(shards):
            fulls = _AllGather.apply(group, *[shards[k] for k in members])
            for k, full in zip(members, fulls):
                for m, name in self.slots[k]:
                    m._parameters[name] = full

    def release(self) -> None:
        """Puts the current shards back in the unit's slots."""
        shards = self.layout.shards
        for i, slots in zip(self.indices, self.slots):
            for m, name in slots:
                m._parameters[name] = shards[i]


_UNIT_KEY = "_higher_fsdp_unit"


class _Casts:
    """A unit's MixedPrecisionPolicy on its calls, as FSDP2 applies it: floating-point
    inputs cast to ``param_dtype`` (``cast_forward_inputs``), outputs to ``output_dtype``."""

    __slots__ = ("inputs", "output")

    def __init__(self, inputs: torch.dtype | None, output: torch.dtype | None) -> None:
        self.inputs, self.output = inputs, output

    def cast_inputs(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        dtype = self.inputs
        assert dtype is not None  # registered only then
        return _fsdp_compat.cast_floating(args, dtype), _fsdp_compat.cast_floating(kwargs, dtype)

    def cast_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        dtype = self.output
        assert dtype is not None  # registered only then
        return _fsdp_compat.cast_floating(output, dtype)


def _gather_unit(module: nn.Module, args: Any) -> None:
    unit: _Unit = module.__dict__[_UNIT_KEY]
    unit.depth += 1
    if unit.depth == 1:  # else a re-entrant call: already gathered
        unit.gather()


def _release_unit(module: nn.Module, args: Any, output: Any) -> None:
    unit: _Unit = module.__dict__[_UNIT_KEY]
    unit.depth -= 1
    if unit.depth == 0:
        unit.release()


class _RecomputeGathered:
    """A recomputation's context: the step's fast weights in the slots (``inner``, the
    unsharded path's context), and the units that were gathered when the checkpointed
    block first ran gathered again from the step's shards, once each, and let go when the
    recomputation ends.

    A checkpointed block often runs inside its unit's gather (transformers checkpoints a
    layer's ``forward``, inside the module hooks; ``checkpoint_wrapper`` checkpoints the
    wrapped module, inside the wrapper's hooks), so its recomputation would otherwise see
    shards. A unit whose hooks run inside the block gathers itself, as in a forward.
    """

    def __init__(self, inner: Any, units: list[_Unit]) -> None:
        self.inner, self.units = inner, units
        self.depths: list[list[int]] = []

    def __enter__(self) -> None:
        self.inner.__enter__()
        depths = []
        try:
            for unit in self.units:
                depths.append(unit.depth)
                unit.depth = 1  # the unit's own hooks, if the block runs them, nest inside
                unit.gather()
        except BaseException:
            self._release(depths)
            raise
        self.depths.append(depths)

    def _release(self, depths: list[int]) -> None:
        try:
            for unit, depth in zip(reversed(self.units[: len(depths)]), reversed(depths)):
                unit.release()
                unit.depth = depth
        finally:
            self.inner.__exit__(None, None, None)

    def __exit__(self, *exc: Any) -> None:
        self._release(self.depths.pop())


class _ShardedPatch(_patched._MonkeyPatchBase):
    """The patched copy of a ``fully_shard``'ed model: its fast weights are shards."""

    _higher_fsdp: _Layout

    def _higher_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with sharded_saves():
            return super()._higher_forward(args, kwargs)

    def _higher_recompute_on(self) -> Any:
        """A recomputation's context: this forward's shards, and its units gathered now
        gathered again (see :class:`_RecomputeGathered`)."""
        gathered = [u for u in self._higher_fsdp.units if u.depth > 0]
        return _RecomputeGathered(super()._higher_recompute_on(), gathered)

    def _higher_backward_context(self) -> contextlib.AbstractContextManager[None]:
        """The context of an inner step's ``torch.autograd.grad`` (see :func:`sharded_saves`)."""
        return sharded_saves()

    def _higher_check_params(self, params: Iterable[Tensor]) -> list[Tensor]:
        params = as_list(params, "params")
        specs = self._higher_fsdp.specs
        if len(params) != len(specs):
            raise ValueError(
                f"expected {len(specs)} parameter tensors (in module.parameters() order), "
                f"got {len(params)}"
            )
        out = []
        for name, spec, p in zip(self._higher_names, specs, params):
            if _compat.is_dtensor(p):
                with torch.enable_grad():
                    p = _compat.local_tensor(p)
            if tuple(p.shape) != spec.local_shape:
                raise ValueError(
                    f"parameter '{name}' is sharded: its fast weight is this rank's shard, "
                    f"of shape {spec.local_shape} (the full tensor is {spec.full_shape}); "
                    f"got {tuple(p.shape)}. Pass param.to_local() of the sharded parameter"
                )
            out.append(p)
        return out

    def _higher_assign(self, params: list[Tensor]) -> None:
        self._higher_fsdp.shards = list(params)
        super()._higher_assign(params)

    def _higher_slot_values(self) -> list[Any]:
        # The slots of a unit that is running hold gathered tensors; the shards are these.
        return list(self._higher_fsdp.shards)

    def _higher_initial_params(
        self, originals: list[Tensor], device: Device, copy_initial_weights: bool
    ) -> list[Tensor]:
        out = []
        for p in originals:
            if device is not None and torch.device(device) != p.device:
                raise ValueError(
                    f"a fully_shard'ed model's fast weights stay on its device ({p.device}); "
                    f"got device={device}"
                )
            # The outer backward reaches the sharded parameter through to_local, as a
            # DTensor gradient, even if the model is patched under no_grad.
            with torch.enable_grad():
                local = _compat.local_tensor(p)
            out.append(copy_leaf(local) if copy_initial_weights else local)
        return out

    def _higher_local_hyper(self, i: int, value: Any) -> Any:
        """A per-parameter hyperparameter of fast weight ``i`` as its shard needs it."""
        spec = self._higher_fsdp.specs[i]
        if _compat.is_dtensor(value):
            if tuple(value.shape) != spec.full_shape or not _compat.fsdp_shard0(value):
                raise ValueError(
                    f"a DTensor hyperparameter of parameter '{self._higher_names[i]}' must be "
                    f"sharded like it (Shard(0), shape {spec.full_shape}); got "
                    f"{tuple(value.placements)}, shape {tuple(value.shape)}"
                )
            with torch.enable_grad():
                return _compat.local_tensor(value)
        if (
            isinstance(value, Tensor)
            and value.dim() == len(spec.full_shape)
            and value.dim() > 0
            and value.shape[0] == spec.dim0
        ):
            return _LocalRows.apply(value, spec)
        return value

    def write_back(self, module: nn.Module, buffers: bool = True) -> None:
        """Copies the fast weights into a sharded model's shards (see ``write_back`` of
        the unsharded path); a unit that FSDP2 left gathered is resharded first, so that
        the copy reaches its shards, not gathered tensors that FSDP2 would drop."""
        if is_fully_sharded(module):
            _fsdp_compat.fsdp_reshard_idle(module)
        super().write_back(module, buffers)

    def _higher_write_target(self, param: Tensor) -> Tensor:
        return _compat.local_tensor(param)  # this rank's shard of the DTensor parameter

    def reset(
        self, source: nn.Module | Iterable[Tensor], copy_initial_weights: bool = True
    ) -> None:
        """Starts over from a sharded model's weights (or from shards)."""
        if isinstance(source, nn.Module):
            if is_fully_sharded(source):
                _fsdp_compat.fsdp_reshard_idle(source)  # its shards, as in patch
            params = self._higher_initial_params(
                list(source.parameters()), None, copy_initial_weights
            )
            _patched.buffer_sync(source, self)  # type: ignore[arg-type]
        else:
            params = list(source)
        params = self._higher_check_params(params)
        self._higher_history.clear()
        self._higher_set_fast_params(params)


def _plan(module: nn.Module) -> tuple[list[_Spec], dict[str, list[int]], dict[str, _Casts]]:
    """Checks a sharded model; returns each parameter's spec, each unit's parameters, and
    the casts of each unit's inputs and outputs (its MixedPrecisionPolicy)."""
    params = list(module.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    names = [n for n, _ in module.named_parameters()]
    specs: list[_Spec | None] = [None] * len(params)
    managed: dict[str, list[int]] = {}
    casts: dict[str, _Casts] = {}
    for name, unit in _compat.fsdp_units(module):
        reason = _compat.fsdp_unit_unsupported_reason(name, unit)
        if reason is not None:
            raise ValueError(f"higher: {reason}")
        indices = []
        for owner, pname, _ in _compat.fsdp_managed(unit):
            i = index.get(id(owner._parameters[pname]))
            if i is None or specs[i] is not None:
                continue
            dtype = params[i].dtype
            param_dtype, reduce_dtype, output_dtype, cast_inputs = (
                _fsdp_compat.fsdp_mixed_precision(unit, dtype)
            )
            specs[i] = _Spec(
                params[i],
                None if param_dtype == dtype else param_dtype,
                None if reduce_dtype == dtype else reduce_dtype,
            )
            indices.append(i)
            casts[name] = _Casts(
                param_dtype if cast_inputs and param_dtype != dtype else None, output_dtype
            )
        managed[name] = indices
    missing = [names[i] for i, s in enumerate(specs) if s is None]
    if missing:
        raise ValueError(
            f"higher: parameter(s) {', '.join(repr(n) for n in missing)} are not managed by any "
            "fully_shard unit, so their fast weights would differ from rank to rank; apply "
            "fully_shard to the root module too (after its layers)"
        )
    return specs, managed, casts  # type: ignore[return-value]


def patch(
    module: nn.Module,
    device: Device,
    copy_initial_weights: bool,
    track_higher_grads: bool,
    num_tasks: int | None = None,
) -> tuple[Any, list[Tensor]]:
    """The patched copy of a ``fully_shard``'ed model, and its parameters (what
    :func:`higher.monkeypatch` does with one).

    Raises:
        ValueError: batched mode, or an FSDP2 configuration that fast weights
            cannot reproduce (each message names the alternative).
    """
    if num_tasks is not None:
        raise ValueError(
            "num_tasks (batched mode) is not supported with a fully_shard'ed model: its "
            "weights would be stacked per task and gathered whole. Run the tasks one after "
            "another (per-task mode, without num_tasks), each rank on its share"
        )
    # An ordinary forward (an evaluation pass) leaves the root unit gathered; its
    # parameters are then full tensors, not the shards that the fast weights start from.
    _fsdp_compat.fsdp_reshard_idle(module)
    specs, managed, casts = _plan(module)
    layout = _Layout(specs)
    with _compat.fsdp_hidden_state(module):
        fmodule, originals = _patched.patch(
            module,
            device,
            copy_initial_weights,
            track_higher_grads,
            mixin=_ShardedPatch,
            _higher_fsdp=layout,
        )
    # The copy is made of the user's classes, without FSDP's state and hooks.
    copies = dict(fmodule.named_modules())
    for name, indices in managed.items():
        unit = copies[name]
        slots = [fmodule._higher_slots[i] for i in indices]
        unit.__dict__[_UNIT_KEY] = _Unit(layout, indices, slots)
        unit.__dict__[_UNIT_KEY].name = name
        layout.units.append(unit.__dict__[_UNIT_KEY])
        unit.register_forward_pre_hook(_gather_unit, prepend=True)
        unit.register_forward_hook(_release_unit, always_call=True)
        cast = casts.get(name)
        if cast is not None and cast.inputs is not None:
            unit.register_forward_pre_hook(cast.cast_inputs, prepend=True, with_kwargs=True)
        if cast is not None and cast.output is not None:
            unit.register_forward_hook(cast.cast_output)
    return fmodule, originals
