"""``DistributedDataParallel`` and its C++ reducer."""

from __future__ import annotations

from typing import Any

import torch

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
