"""``torch.utils.checkpoint`` inside a patched forward: recomputation on the right fast weights."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint

from .forward import graph_forward
from .kernels import wrap_attention

# -- torch.utils.checkpoint inside a patched forward -------------------------------------
# A model that checkpoints part of its own forward (transformers'
# gradient_checkpointing_enable(), torch.utils.checkpoint in user code) has that
# part recomputed when a backward reaches it. The recomputation reads the
# module's weights at that time: during the outer backward, a later step's fast
# weights, which gives a silently wrong meta-gradient. While a patched forward
# runs, the two entry points checkpoint() dispatches to (looked up as globals of
# torch.utils.checkpoint at each call) are wrapped: the non-reentrant one gets a
# recompute context that puts back the fast weights of the forward that first
# ran the function, and the reentrant one, which cannot run under the
# torch.autograd.grad of an inner step, runs as the non-reentrant one. Calls
# from other threads, or outside a patched forward, pass through unchanged.
_CHECKPOINT_ENTRIES: dict[str, Any] = {}
_checkpoint_reached = [False]  # set by every hooked call: the probe's witness


def _hooked_checkpoint(context_fn: Any, debug: bool, run: Callable[[Any], Any]) -> Any:
    """The non-reentrant checkpoint's generator, given the context_fn to run it with.

    ``run(context_fn)`` returns torch's own generator; inside a patched forward
    it gets a context_fn whose recompute context puts back this forward's fast
    weights.
    """
    _checkpoint_reached[0] = True
    fmodule = graph_forward()
    if fmodule is None:
        return (yield from run(context_fn))
    if torch._C._are_functorch_transforms_active():
        # A batched forward under vmap: the recomputation would run outside
        # vmap on tensors that only exist inside it. The block runs plainly
        # instead (exact, keeping its activations), and says so once.
        warnings.warn(
            "higher: in batched mode, torch.utils.checkpoint inside the model runs without "
            "recomputation (a vmapped forward cannot be recomputed in the backward): exact, but "
            "it saves no memory. innerloop_ctx(..., checkpoint=True) checkpoints whole steps",
            UserWarning,
            stacklevel=4,
        )
        yield
        return None
    if debug:
        raise ValueError(
            "torch.utils.checkpoint(..., debug=True) inside a patched module is not supported: "
            "its debug mode replaces the recompute context that puts the step's fast weights back"
        )
    recompute_on = fmodule._higher_recompute_on()  # this forward's fast weights, now

    def context() -> tuple[Any, Any]:
        forward_context, recompute_context = context_fn()
        return forward_context, _Both(recompute_on, recompute_context)

    return (yield from run(context))


def _nonreentrant_entry(fn: Any, preserve: Any, context_fn: Any, *rest: Any, **kwargs: Any) -> Any:
    # torch < 2.14: _checkpoint_without_reentrant_generator(fn, preserve_rng_state,
    # context_fn, determinism_check, debug, ...), called positionally.
    original = _CHECKPOINT_ENTRIES["_checkpoint_without_reentrant_generator"]
    debug = len(rest) >= 2 and bool(rest[1])
    return (
        yield from _hooked_checkpoint(
            context_fn, debug, lambda cf: original(fn, preserve, cf, *rest, **kwargs)
        )
    )


def _nonreentrant_impl_entry(fn: Any, args: Any, kwargs: Any, **options: Any) -> Any:
    # torch >= 2.14: _checkpoint_without_reentrant_generator_impl(fn, args, kwargs,
    # *, preserve_rng_state, context_fn, determinism_check, debug, ...).
    original = _CHECKPOINT_ENTRIES["_checkpoint_without_reentrant_generator_impl"]
    context_fn = options.pop("context_fn", torch.utils.checkpoint.noop_context_fn)
    debug = bool(options.get("debug", False))
    return (
        yield from _hooked_checkpoint(
            context_fn, debug, lambda cf: original(fn, args, kwargs, context_fn=cf, **options)
        )
    )


class _Both:
    """Two context managers entered as one, as often as needed: a block may be
    recomputed once per backward that reaches it."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second

    def __enter__(self) -> None:
        self.first.__enter__()
        try:
            self.second.__enter__()
        except BaseException:
            self.first.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            self.second.__exit__(*exc)
        finally:
            self.first.__exit__(*exc)


class _ReentrantAsNonReentrant:
    """Stands in for ``CheckpointFunction``: inside a patched forward, the non-reentrant path."""

    @staticmethod
    def apply(function: Any, preserve: bool, *args: Any) -> Any:
        if graph_forward() is None:
            return _CHECKPOINT_ENTRIES["CheckpointFunction"].apply(function, preserve, *args)
        return torch.utils.checkpoint.checkpoint(
            function, *args, use_reentrant=False, preserve_rng_state=preserve
        )


def install() -> None:
    """Installs, once and for good, the wrappers patched forwards rely on.

    The entry points of ``torch.utils.checkpoint`` (see the comment above) and
    the attention wrapper of :mod:`higher._compat.kernels`. Called when a
    patched module is made, never inside a forward: the probe that checks the
    hook runs a checkpoint, which a forward inside a checkpointed inner step
    would record as one of the step's saved tensors (and its replay would not).
    """
    if not _CHECKPOINT_ENTRIES:
        _wrap_checkpoint_entries()
    wrap_attention()


def _wrap_checkpoint_entries() -> None:
    module = torch.utils.checkpoint
    # The generator checkpoint() runs for use_reentrant=False: torch 2.14 moved
    # the work to an _impl with another signature (the old name stays as a shim
    # that calls it, so only the _impl is wrapped where it exists).
    entry: Callable[..., Any]
    if hasattr(module, "_checkpoint_without_reentrant_generator_impl"):
        name, entry = "_checkpoint_without_reentrant_generator_impl", _nonreentrant_impl_entry
    else:
        name, entry = "_checkpoint_without_reentrant_generator", _nonreentrant_entry
    for key in (name, "CheckpointFunction"):
        _CHECKPOINT_ENTRIES[key] = getattr(module, key)
    setattr(module, name, entry)
    module.CheckpointFunction = _ReentrantAsNonReentrant  # type: ignore[assignment,misc]
    if not checkpoint_hooked():
        warnings.warn(
            f"higher: this torch ({torch.__version__}) runs torch.utils.checkpoint through "
            "functions higher does not know, so a model that checkpoints inside its own "
            "forward would recompute on later fast weights and get a wrong meta-gradient. "
            "Turn that checkpointing off (model.gradient_checkpointing_disable() for "
            "transformers) and use innerloop_ctx(..., checkpoint=True) instead",
            UserWarning,
            stacklevel=4,
        )


def checkpoint_hooked() -> bool:
    """Whether a non-reentrant ``torch.utils.checkpoint`` call reaches higher's hook.

    Calls the public function once on a scalar and watches for the hook.
    """
    _checkpoint_reached[0] = False
    probe = torch.zeros((), requires_grad=True)
    # Innermost saved-tensor hooks of its own: whatever hooks the caller runs
    # under (a checkpointed step, the user's own checkpoint) never see the probe.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
        torch.utils.checkpoint.checkpoint(torch.neg, probe, use_reentrant=False)
    return _checkpoint_reached[0]


def _same(x: torch.Tensor) -> torch.Tensor:
    return x
