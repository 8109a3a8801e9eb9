"""Everything this library knows about PyTorch internals, in one place.

Each helper here leans on behaviour that PyTorch does not promise to keep. When a
PyTorch release changes one of them, this is the only file to touch.
"""

from __future__ import annotations

import contextlib
import warnings
from array import array
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def math_attention() -> contextlib.AbstractContextManager[Any]:
        """Selects the math kernel of scaled_dot_product_attention.

        The fused CPU/CUDA attention kernels implement a backward but no double
        backward, so a meta-gradient through them fails. The math kernel is
        built from differentiable primitives.
        """
        return sdpa_kernel([SDPBackend.MATH])

except ImportError:  # pragma: no cover - torch 2.1 / 2.2

    def math_attention() -> contextlib.AbstractContextManager[Any]:
        return torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )


def refresh_flat_weights(module: nn.Module) -> None:
    """Re-reads an RNN's ``_flat_weights`` list after its parameters changed.

    ``nn.RNNBase.forward`` reads weights from this cached list rather than from
    ``_parameters``. We deliberately skip ``flatten_parameters()``: on CUDA it
    rewrites the weights' storage in place, which would corrupt fast weights
    that carry autograd history.
    """
    names: list[str] = module._flat_weights_names  # type: ignore[assignment]
    params = module._parameters
    module.__dict__["_flat_weights"] = [params.get(n) for n in names]


def has_flat_weights(module: nn.Module) -> bool:
    # An instance attribute of nn.RNNBase; checked in __dict__ because hasattr
    # on a module goes through the slow nn.Module.__getattr__.
    return "_flat_weights_names" in module.__dict__


def scalar_dtype() -> torch.dtype:
    """The dtype ``torch.optim`` uses for scalar state such as ``step``."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def round_like_scalar_state(value: float) -> float:
    """Rounds a Python float as torch.optim does when it stores it in a scalar tensor.

    torch keeps ``eta``, ``mu`` and ``mu_product`` as tensors of the scalar dtype
    and reads them back with ``.item()``; with a float32 default dtype that rounds
    the value, and matching torch step for step means rounding identically.
    """
    if scalar_dtype() == torch.float32:
        return array("f", (value,))[0]
    return value


@contextlib.contextmanager
def quiet_scheduler_order_warning() -> Iterator[None]:
    """Silences torch's "lr_scheduler.step() before optimizer.step()" warning.

    A differentiable optimizer steps instead of the torch optimizer that the
    scheduler watches, so the warning would be a false alarm.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        yield


# -- DistributedDataParallel ----------------------------------------------------------
# A patched copy of a DDP-wrapped module runs the wrapped module's code on fast
# weights, outside ``DistributedDataParallel.forward``. These helpers reach into the
# DDP instance and its C++ reducer (torch/nn/parallel/distributed.py, ``_pre_forward``
# / ``_post_forward``, and torch/csrc/distributed/c10d/reducer.cpp) so that
# :mod:`higher.distributed` can arm DDP's own reducer for the outer backward, and
# into the autograd engine to see which parameters that backward reaches.


def ddp_unsupported_reason(ddp: Any) -> str | None:
    """Why fast weights cannot ride on this DDP instance, or None when they can."""
    if getattr(ddp, "static_graph", False):
        # With a static graph DDP's sink queues a delayed all-reduce from the first
        # backward that reaches it, and an inner step's torch.autograd.grad would
        # be that backward.
        return "static_graph=True is not supported; construct DDP with static_graph=False"
    if getattr(ddp, "_use_python_reducer", False):
        return "the compiled (python_reducer) DDP path is not supported"
    if getattr(ddp, "_delay_all_reduce_all_params", False):
        return "DDP that delays the all-reduce of every parameter is not supported"
    if getattr(ddp, "mixed_precision", None) is not None:
        return "DDP's mixed_precision is not supported"
    hook = getattr(ddp, "buffer_hook", None)
    if hook is not None and hook.buffer_comm_hook_location.name == "POST_FORWARD":
        return (
            "a buffer communication hook that runs after the forward is not supported "
            "(it would communicate in every inner step); register it PRE_FORWARD"
        )
    return None


def ddp_reducer_params(ddp: Any) -> list[tuple[str, torch.Tensor]]:
    """The parameters DDP's reducer all-reduces, with their names, in its order.

    As ``DistributedDataParallel._build_params_for_reducer``: those that require
    grad and are not in ``parameters_to_ignore``, each shared one once.
    """
    ignore: set[str] = getattr(ddp, "parameters_to_ignore", set())
    seen: set[int] = set()
    out = []
    for prefix, module in ddp.module.named_modules():
        for name, p in module.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            if p.requires_grad and full not in ignore and id(p) not in seen:
                seen.add(id(p))
                out.append((full, p))
    return out


def grad_accumulator(param: torch.Tensor) -> Any:
    """The autograd node that accumulates into ``param.grad`` (DDP hooks on it)."""
    with torch.enable_grad():
        view = param.view_as(param)
    assert view.grad_fn is not None, "a parameter that does not require grad"
    return view.grad_fn.next_functions[0][0]


def in_backward() -> bool:
    """Whether this thread is running an autograd backward (or a hook inside one)."""
    return torch._C._current_graph_task_id() != -1


def backward_runs(node: Any) -> bool:
    """Whether the backward now running executes ``node`` (call it inside a backward)."""
    return torch._C._will_engine_execute_node(node)


def ddp_sync_buffers(ddp: Any) -> bool:
    """Broadcasts rank 0's module buffers when a DDP forward would; returns whether it did.

    Called when a patched copy is made, before its buffers are copied: the copy
    then starts from the buffers a DDP forward would have seen.
    """
    if not ddp._check_sync_bufs_pre_fwd():
        return False
    ddp._sync_buffers()
    return True


def ddp_lazy_init(ddp: Any) -> None:
    """``DistributedDataParallel._lazy_init``, which DDP runs before its first forward."""
    if not getattr(ddp, "_lazy_init_ran", True):
        ddp._lazy_init()


def ddp_arm_reducer(ddp: Any, used: list[torch.Tensor]) -> None:
    """Does the reducer's side of a DDP iteration for the backward now starting.

    ``used`` are the parameters this backward reaches. What DDP's forward does
    in the reducer is done here, once per synced iteration, in this order:

    * ``_rebuild_buckets``: after the first synced backward DDP re-buckets its
      parameters in gradient-ready order, a broadcast every rank issues once
      (later calls only check that the previous reduction finished). Here every
      rank issues it in the same synced backward, however many forwards it ran.
    * ``prepare_for_forward``: counts the iteration (DDP's runtime statistics).
    * ``prepare_for_backward(outputs)``: arms the reducer's hooks on the
      parameters' gradient accumulators. With ``find_unused_parameters`` it
      marks ready at once the parameters it does not find in the graph of
      ``outputs``; one view per used parameter makes that search cost one node
      per parameter instead of a walk of the whole (unrolled) graph.
    """
    reducer = ddp.reducer
    reducer._rebuild_buckets()
    reducer.prepare_for_forward()
    if ddp.find_unused_parameters:
        with torch.enable_grad():
            outputs = [p.view_as(p) for p in used]
        reducer.prepare_for_backward(outputs)
    else:
        reducer.prepare_for_backward([])


def ddp_pre_forward(ddp: Any) -> None:
    """Deprecated call site of batched modules; see :func:`higher.distributed.before_forward`."""
    from . import distributed

    distributed._note_forward(ddp)


def ddp_post_forward(ddp: Any, output: Any) -> Any:
    """Deprecated call site of batched modules: a patched forward needs nothing after it."""
    return output


def version(tensor: torch.Tensor) -> int:
    """A tensor's version counter, bumped by every in-place change of its data."""
    return tensor._version


def updates_buffers_silently(module: nn.Module) -> bool:
    """Whether ``module``'s forward may change its buffers without bumping their versions.

    The batch-norm kernels update running statistics in place but do not
    declare it, so the version counters of ``running_mean`` and
    ``running_var`` stay put in training mode.
    """
    return module.training and isinstance(module, nn.modules.batchnorm._NormBase)


def rng_state(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, str, list[int], list[Any]]:
    """The CPU generator's state and that of the accelerators ``tensors`` live on.

    Checkpointed steps record it so that their replay draws the same random
    numbers (dropout masks) as their first run.
    """
    from torch.utils.checkpoint import get_device_states

    accel = [t for t in tensors if t.device.type not in ("cpu", "meta")]
    device_type = accel[0].device.type if accel else "cpu"
    devices, states = get_device_states(*accel) if accel else ([], [])
    return torch.get_rng_state(), device_type, devices, states


def same_rng_state(a: Any, b: Any) -> bool:
    """Whether two :func:`rng_state` results are equal."""
    return (
        a[1:3] == b[1:3]
        and torch.equal(a[0], b[0])
        and all(torch.equal(x, y) for x, y in zip(a[3], b[3]))
    )


@contextlib.contextmanager
def replay_rng(state: tuple[torch.Tensor, str, list[int], list[Any]]) -> Iterator[None]:
    """Runs a block with the generators set to ``state``, restoring them afterwards."""
    from torch.utils.checkpoint import set_device_states

    cpu, device_type, devices, states = state
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.set_rng_state(cpu)
        if devices:
            set_device_states(devices, states, device_type=device_type)
        yield


# -- pytrees (torch.utils._pytree is private) ---------------------------------------
tree_flatten = _pytree.tree_flatten
tree_unflatten = _pytree.tree_unflatten
tree_leaves = _pytree.tree_leaves
tree_map = _pytree.tree_map


def tree_in_dims(tree: Any) -> Any:
    """``vmap`` in_dims for a pytree: 0 for its tensors, None for anything else."""
    return _pytree.tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, tree)
