"""Everything this library knows about PyTorch internals, in one package.

Each helper here leans on behaviour that PyTorch does not promise to keep. When
a PyTorch release changes one of them, this package is the only place to touch,
and its topic modules say where:

* :mod:`~higher._compat.kernels`: attention backends and cuDNN, and attention
  on its math kernel (the one with a double backward);
* :mod:`~higher._compat.blockwise_attention`: exact attention block by block,
  with a double backward in memory linear in the sequence length;
* :mod:`~higher._compat.rnn`: the flat-weight cache of recurrent modules;
* :mod:`~higher._compat.model_checkpoint`: ``torch.utils.checkpoint`` inside a
  patched forward;
* :mod:`~higher._compat.forward`: which patched forward runs, found on the
  stack by those two;
* :mod:`~higher._compat.autograd`: the graph and the engine (missing double
  backwards, gradient accumulators, version counters);
* :mod:`~higher._compat.vmap`: what ``vmap`` cannot batch;
* :mod:`~higher._compat.modules`: compiled and scripted modules;
* :mod:`~higher._compat.optim`: how ``torch.optim`` stores scalars;
* :mod:`~higher._compat.replay`: random-number and autocast state of a step;
* :mod:`~higher._compat.ddp`: ``DistributedDataParallel``'s reducer;
* :mod:`~higher._compat.fsdp`: FSDP2's units, parameters, hooks and state;
* :mod:`~higher._compat.pytree`: ``torch.utils._pytree``.

The rest of the library imports this package and uses its names
(``_compat.BackendFlags``); the topic modules import only from torch and from
each other, never from the rest of :mod:`higher`.
"""

from .autograd import (
    DeferredPacking,
    SavedTensorsHooks,
    at_backward_end,
    backward_runs,
    grad_accumulator,
    in_backward,
    top_saved_tensors_hooks,
    version,
    without_double_backward,
)
from .ddp import (
    ddp_arm_reducer,
    ddp_lazy_init,
    ddp_reducer_params,
    ddp_sync_buffers,
    ddp_unsupported_reason,
)
from .forward import register_forward
from .fsdp import (
    all_gather_into,
    contains_fsdp2_unit,
    fsdp2_in_use,
    fsdp_hidden_state,
    fsdp_managed,
    fsdp_original_class,
    fsdp_shard0,
    fsdp_shard_layout,
    fsdp_unit_unsupported_reason,
    fsdp_units,
    is_dtensor,
    is_fsdp1,
    is_fsdp2_unit,
    local_tensor,
    reduce_scatter_into,
)
from .kernels import (
    MATH_ATTENTION,
    BackendFlags,
    CudnnOff,
    DoubleBackwardKernels,
    math_attention_active,
    sdp_flags,
)
from .model_checkpoint import checkpoint_hooked
from .model_checkpoint import install as install_forward_hooks
from .modules import compiled_inner, is_scripted, run_eagerly, updates_buffers_silently
from .optim import quiet_scheduler_order_warning, round_like_scalar_state, scalar_dtype
from .pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from .replay import autocast_state, replay_autocast, replay_rng, rng_state, same_rng_state
from .rnn import has_flat_weights, quiet_flat_weights_warning, refresh_flat_weights
from .vmap import vmap_cannot_batch

__all__ = [
    "MATH_ATTENTION",
    "BackendFlags",
    "CudnnOff",
    "DeferredPacking",
    "DoubleBackwardKernels",
    "SavedTensorsHooks",
    "all_gather_into",
    "at_backward_end",
    "autocast_state",
    "backward_runs",
    "checkpoint_hooked",
    "compiled_inner",
    "contains_fsdp2_unit",
    "ddp_arm_reducer",
    "ddp_lazy_init",
    "ddp_reducer_params",
    "ddp_sync_buffers",
    "ddp_unsupported_reason",
    "fsdp2_in_use",
    "fsdp_hidden_state",
    "fsdp_managed",
    "fsdp_original_class",
    "fsdp_shard0",
    "fsdp_shard_layout",
    "fsdp_unit_unsupported_reason",
    "fsdp_units",
    "grad_accumulator",
    "has_flat_weights",
    "in_backward",
    "install_forward_hooks",
    "is_dtensor",
    "is_fsdp1",
    "is_fsdp2_unit",
    "is_scripted",
    "local_tensor",
    "math_attention_active",
    "quiet_flat_weights_warning",
    "quiet_scheduler_order_warning",
    "reduce_scatter_into",
    "refresh_flat_weights",
    "register_forward",
    "replay_autocast",
    "replay_rng",
    "rng_state",
    "round_like_scalar_state",
    "run_eagerly",
    "same_rng_state",
    "scalar_dtype",
    "sdp_flags",
    "top_saved_tensors_hooks",
    "tree_flatten",
    "tree_leaves",
    "tree_map",
    "tree_unflatten",
    "updates_buffers_silently",
    "version",
    "vmap_cannot_batch",
    "without_double_backward",
]
