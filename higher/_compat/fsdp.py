"""FSDP2 (``torch.distributed.fsdp.fully_shard``): its units, their parameters and hooks.

:mod:`higher.fsdp` runs a patched copy of a ``fully_shard``'ed model on sharded
fast weights. What it needs to know about FSDP2's internals is here: which
modules are FSDP units and which parameters each one manages
(``FSDPState._fsdp_param_groups[*].fsdp_params``, or the one
``_fsdp_param_group`` of older releases such as 2.7, in
torch/distributed/fsdp/_fully_shard/_fsdp_state.py and _fsdp_param.py), the
configuration that decides whether sharded fast weights can reproduce what
FSDP2 computes, and the forward hooks and composable-API state that FSDP2 keeps
on each unit (which a copy must not get), and the saved-tensor hooks autograd
has in force.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
# fully_shard is a composable API: contract() keeps its state in the module's __dict__.
_COMPOSABLE_PREFIX = "__composable_api_state_key_"


@functools.cache
def _class_is(cls: Any, name: str) -> bool:
    return any(c.__name__ == name for c in cls.__mro__)


def is_fsdp2_unit(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` (its class derives from FSDPModule).

    Matched by name, so that FSDP is never imported for models that do not use it.
    """
    cls: Any = type(module)
    return _class_is(cls, "FSDPModule")


def contains_fsdp2_unit(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` or any module in its tree.

    Asked at every ``monkeypatch``, so it costs nothing where no module was
    ever sharded (:func:`fsdp2_in_use`) and walks the children's
    dictionaries directly otherwise (``named_modules`` builds every name).
    """
    if not fsdp2_in_use() or not isinstance(module, nn.Module):
        return False
    stack: list[Any] = [module]
    seen: set[int] = set()
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        if is_fsdp2_unit(m):
            return True
        stack.extend(m._modules.values())
    return False


def fsdp2_in_use() -> bool:
    """Whether ``fully_shard`` may have been applied to some module of this process.

    False where FSDP was never imported, or where ``fully_shard`` has made no
    sharded class yet (its registry of them is empty: torch imports FSDP with
    ``torch.optim``, so the import alone says little).
    """
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    fully = sys.modules.get("torch.distributed.fsdp._fully_shard._fully_shard")
    registry = getattr(fully, "cls_to_fsdp_cls", None)
    return not isinstance(registry, dict) or bool(registry)


def is_fsdp1(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP1 ``FullyShardedDataParallel`` wrapper."""
    cls: Any = type(module)
    return _class_is(cls, "FullyShardedDataParallel")


def fsdp_original_class(cls: type) -> type:
    """The user's class of an FSDP unit (``FSDPLinear`` -> ``Linear``)."""
    if not _class_is(cls, "FSDPModule"):
        return cls
    fsdp_module = next(c for c in cls.__mro__ if c.__name__ == "FSDPModule")
    return next(c for c in cls.__mro__ if not issubclass(c, fsdp_module))


def _param_groups(state: Any) -> list[Any]:
    # torch 2.13 keeps a list of groups; 2.7 one group, or None.
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def _state(unit: nn.Module) -> Any:
    return unit._get_fsdp_state()  # type: ignore[operator]


def fsdp_units(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The FSDP units in ``module``'s tree, pre-order, with their names."""
    return [(name, m) for name, m in module.named_modules() if is_fsdp2_unit(m)]


def fsdp_managed(unit: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """The parameters that FSDP unit ``unit`` manages: ``(module, name, fsdp_param)``."""
    out = []
    for group in _param_groups(_state(unit)):
        for fp in group.fsdp_params:
            info = fp._module_info
            out.append((info.module, info.param_name, fp))
    return out


def fsdp_unit_unsupported_reason(name: str, unit: nn.Module) -> str | None:
    """Why fast weights cannot reproduce what this FSDP unit computes, or None."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState
    from torch.distributed.tensor import DTensor, Shard

    where = f"the fully_shard unit '{name}'" if name else "the root fully_shard unit"
    state = _state(unit)
    if len(state._modules) != 1:
        return (
            f"{where} was made by one fully_shard call on several modules; apply "
            "fully_shard to each module separately"
        )
    for group in _param_groups(state):
        mesh_info = group.mesh_info
        ndim = mesh_info.mesh.ndim
        hsdp = ndim == 2 and getattr(mesh_info, "replicate_mesh_dim", None) == 0
        if ndim != 1 and not hsdp:
            return (
                f"{where} is sharded over a {ndim}-D mesh other than HSDP's (replicate, "
                "shard) mesh (FSDP + tensor parallel?); use a 1-D mesh "
                "(init_device_mesh(device_type, (world,))) or a 2-D one, "
                "init_device_mesh(device_type, (replicas, shards))"
            )
    for _, pname, fp in fsdp_managed(unit):
        if fp.offload_to_cpu:
            return (
                f"{where} offloads its parameters to the CPU (CPUOffloadPolicy), which "
                "fast weights do not do; use the default OffloadPolicy()"
            )
        param = fp.sharded_param
        if not isinstance(param, DTensor) or getattr(fp, "is_dtensor", False):
            return (
                f"{where}: parameter '{pname}' is a DTensor before sharding (tensor "
                "parallel), which fast weights do not reproduce; shard with fully_shard "
                "alone, over a 1-D or an HSDP (replicate, shard) mesh"
            )
        if tuple(param.placements)[-1:] != (Shard(0),):
            return (
                f"{where} shards parameter '{pname}' as {tuple(param.placements)}; only "
                "Shard(0), fully_shard's default, is supported: drop shard_placement_fn"
            )
        if fp.sharded_state != ShardedState.SHARDED:
            # fsdp_reshard_idle puts an idle unit's shards back first: this is a unit
            # that is running (it is in the middle of FSDP2's forward or backward).
            return (
                f"{where} holds its parameters unsharded: it is in the middle of its "
                "own forward or backward (is the model patched from inside a forward, "
                "a hook or a backward?); patch it before or after FSDP2 runs it"
            )
    for group in _param_groups(state):
        factor = getattr(group, "gradient_divide_factor", None)
        if factor is not None:
            return (
                f"{where} divides its gradients by {factor} (set_gradient_divide_factor); "
                "fast weights reduce the mean over ranks, FSDP2's default: leave the "
                "factor unset"
            )
    return None


def fsdp_reshard_idle(module: nn.Module) -> list[str]:
    """Puts back the shards of every unit that FSDP2 left gathered while idle.

    FSDP2 keeps the root unit's parameters gathered after its forward (its
    ``reshard_after_forward`` defaults to False for the root: a backward usually
    follows), and so does any unit after ``reshard_after_forward=False`` or an
    explicit ``unshard()``; an int ``reshard_after_forward`` leaves a unit sharded
    over a smaller mesh. An evaluation forward before patching is enough for that.
    ``FSDPModule.reshard`` (what FSDP2 itself does after the backward) swaps the
    sharded parameters back in and lets the gathered ones go; FSDP2 gathers again
    when it next needs them, a pending backward of that forward included. A pending
    ``unshard(async_op=True)`` is waited on first. Units that are running (in the
    middle of FSDP2's forward or backward) are left alone and refused by
    :func:`fsdp_unit_unsupported_reason`. Returns the names of the units resharded.
    """
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

    out = []
    for name, unit in fsdp_units(module):
        for group in _param_groups(_state(unit)):
            if group._training_state != TrainingState.IDLE:
                continue
            if all(fp.sharded_state == ShardedState.SHARDED for fp in group.fsdp_params):
                continue
            if getattr(group, "_all_gather_result", None) is not None:
                group.wait_for_unshard()
            group.reshard()
            out.append(name)
    return out


def fsdp_divide_factors(reduce_dtype: torch.dtype, size: int) -> tuple[float, float]:
    """What FSDP2 divides a gradient by before and after summing it over ``size`` ranks
    (``_get_gradient_divide_factors``, without a gradient divide factor).

    In float32 and bfloat16 the mean is taken at once (``ReduceOp.AVG``: ``(1,
    size)`` here); in any other reduce dtype (float16's range) FSDP2 divides by
    about ``sqrt(size)`` before the sum (a power of two) and by the rest after
    it, so that the sum neither overflows nor underflows.
    """
    if reduce_dtype in (torch.float32, torch.bfloat16):
        return 1.0, float(size)
    pre = 1
    while size % pre == 0 and size / pre > pre:
        pre *= 2
    return float(pre), size / pre


def fsdp_mixed_precision(
    unit: nn.Module, dtype: torch.dtype
) -> tuple[torch.dtype, torch.dtype, torch.dtype | None, bool]:
    """What a unit's ``MixedPrecisionPolicy`` does to parameters of ``dtype``.

    ``(param_dtype, reduce_dtype, output_dtype, cast_forward_inputs)`` as FSDP2
    resolves them (``FSDPParamGroup._init_mp_dtypes``): the gathered weights are
    cast to ``param_dtype`` (the parameters' dtype when None), gradients are
    reduced in ``reduce_dtype`` (``param_dtype`` when None), a unit's outputs cast
    to ``output_dtype`` and, with ``cast_forward_inputs``, its floating-point
    inputs to ``param_dtype`` when that is set.
    """
    mp = _state(unit)._mp_policy
    param_dtype = mp.param_dtype or dtype
    return param_dtype, mp.reduce_dtype or param_dtype, mp.output_dtype, mp.cast_forward_inputs


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating-point tensor in it cast to ``dtype``, as FSDP2 casts a
    unit's inputs and outputs (``_apply_to_tensors``: lists, dicts, dataclasses, ...)."""
    from torch.distributed.utils import _apply_to_tensors

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype) if torch.is_floating_point(x) and x.dtype != dtype else x

    return _apply_to_tensors(cast, value)


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor``."""
    if not torch.distributed.is_available():  # pragma: no cover
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_tensor(tensor: Any) -> torch.Tensor:
    """A DTensor's local shard (differentiably), or ``tensor`` itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[no-any-return]


def fsdp_shard_layout(param: Any) -> tuple[Any, int, int, tuple[Any, ...]]:
    """``(process_group, rank, world_size, placements)`` of a DTensor parameter: of the
    mesh dimension it is sharded over (the last one: HSDP's is ``(replicate, shard)``)."""
    mesh = param.device_mesh
    dim = mesh.ndim - 1
    return (
        mesh.get_group(dim),
        mesh.get_local_rank(dim),
        mesh.size(dim),
        tuple(param.placements),
    )


def fsdp_replicas(param: Any) -> tuple[Any, int]:
    """``(process_group, size)`` of the replicas of a DTensor parameter of an HSDP mesh
    (its first dimension), or ``(None, 1)`` on a 1-D mesh."""
    mesh = param.device_mesh
    if mesh.ndim == 1:
        return None, 1
    return mesh.get_group(0), mesh.size(0)


def all_reduce_sum(tensor: torch.Tensor, group: Any) -> None:
    """``all_reduce`` (a sum) in place."""
    torch.distributed.all_reduce(tensor, group=group)


def fsdp_shard0(tensor: Any) -> bool:
    """Whether DTensor ``tensor`` is sharded as ``fully_shard`` shards: ``(Shard(0),)``, or
    ``(Replicate(), Shard(0))`` on an HSDP mesh."""
    from torch.distributed.tensor import Replicate, Shard

    return tuple(tensor.placements) in ((Shard(0),), (Replicate(), Shard(0)))


@contextlib.contextmanager
def fsdp_hidden_state(module: nn.Module) -> Iterator[None]:
    """Hides FSDP2 from copies of ``module`` made meanwhile.

    Each unit has its own class back (``FSDPLinear`` -> ``Linear``: FSDP's
    ``__new__`` would construct the original class anew), and neither FSDP2's
    forward hooks nor its composable-API state. On exit the module has its
    classes, hook dictionaries and state back: the same objects, in the same
    order.
    """
    classes: list[tuple[nn.Module, type]] = []
    saved: list[tuple[nn.Module, dict[str, Any]]] = []
    try:
        for _, unit in fsdp_units(module):
            state = _state(unit)
            ids = {state._pre_forward_hook_handle.id, state._post_forward_hook_handle.id}
            entries = {k: unit.__dict__[k] for k in _HOOK_DICTS if k in unit.__dict__}
            saved.append((unit, entries))
            for key, hooks in entries.items():
                unit.__dict__[key] = type(hooks)((k, v) for k, v in hooks.items() if k not in ids)
            classes.append((unit, type(unit)))
        for m in module.modules():
            keys = [k for k in m.__dict__ if k.startswith(_COMPOSABLE_PREFIX)]
            if keys:
                saved.append((m, {k: m.__dict__.pop(k) for k in keys}))
        for unit, cls in classes:
            unit.__class__ = fsdp_original_class(cls)
        yield
    finally:
        for unit, cls in classes:
            unit.__class__ = cls
        for m, entries in saved:
            m.__dict__.update(entries)


def all_gather_into(out: torch.Tensor, shard: torch.Tensor, group: Any) -> None:
    """``all_gather_into_tensor``, under its newer name where torch has it (2.13 deprecates
    the old one)."""
    dist = torch.distributed
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, shard, group=group)


def reduce_scatter_into(out: torch.Tensor, full: torch.Tensor, group: Any) -> None:
    """``reduce_scatter_tensor`` (a sum), under its newer name where torch has it."""
    dist = torch.distributed
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, full, group=group)


def backward_task_id() -> int:
    """The id of the autograd graph task (backward) running in this thread, or -1."""
    return int(torch._C._current_graph_task_id())


def check_device(device: torch.device, group: Any, replicate_group: Any = None) -> torch.device:
    """``cpu`` when ``group`` (and ``replicate_group``, unless None) also has a CPU
    backend, else ``device``: where a small all-reduce runs without waiting for an
    accelerator."""
    cpu = torch.device("cpu")
    for g in (group, replicate_group) if replicate_group is not None else (group,):
        if cpu not in getattr(g, "_device_types", ()):  # private; absent: assume none
            return device
    return cpu


def all_reduce_max(tensor: torch.Tensor, group: Any) -> None:
    """``all_reduce`` (a maximum) in place."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=group)
