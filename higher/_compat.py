"""Everything this library knows about PyTorch internals, in one place.

Each helper here leans on behaviour that PyTorch does not promise to keep. When a
PyTorch release changes one of them, this is the only file to touch.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import threading
import warnings
from array import array
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils import _pytree


def _sdp_flag(name: str) -> tuple[Callable[[], bool], Callable[[bool], None]] | None:
    get = getattr(torch._C, f"_get_{name}_sdp_enabled", None)
    set_ = getattr(torch._C, f"_set_sdp_use_{name}", None)
    return None if get is None or set_ is None else (get, set_)


# The enabled flags of the scaled_dot_product_attention backends: the fused ones
# (flash, memory-efficient, cuDNN, the one a device extension may register),
# none of which has a double backward, then the math one, built from
# differentiable primitives, which has.
_FUSED_SDP = [f for f in map(_sdp_flag, ("flash", "mem_efficient", "cudnn", "overrideable")) if f]
_SDP = [*_FUSED_SDP, *filter(None, [_sdp_flag("math")])]
_MATH_ONLY = tuple(flag not in _FUSED_SDP for flag in _SDP)


class BackendFlags:
    """The enabled flags of the attention backends and of cuDNN, set for a block.

    Made with no arguments it records all of them as they are now, so that a
    recomputation (a checkpointed block, recomputed once per backward that
    reaches it) picks the kernels its first run picked: other kernels save
    other tensors, and may lack a double backward. Given ``sdp`` (one flag per
    attention backend) or ``cudnn``, it sets those and leaves the others alone. Entering sets the flags, exiting puts
    back what was there, also when the block raises; it may be entered again.
    The flags are read and set directly: entering
    ``torch.nn.attention.sdpa_kernel`` costs about 40 times as much.

    Example:
        >>> flags = BackendFlags()
        >>> with flags:
        ...     pass
        >>> flags.flags == BackendFlags().flags
        True
    """

    __slots__ = ("_saved", "flags")

    def __init__(self, sdp: tuple[bool, ...] | None = None, cudnn: bool | None = None) -> None:
        if sdp is None and cudnn is None:
            sdp, cudnn = sdp_flags(), torch._C._get_cudnn_enabled()
        #: The attention backends' flags and cuDNN's to set; None leaves them alone.
        self.flags = (sdp, cudnn)
        self._saved: list[tuple[tuple[bool, ...] | None, bool | None]] = []

    def __enter__(self) -> None:
        sdp, cudnn = self.flags
        self._saved.append(
            (
                None if sdp is None else sdp_flags(),
                None if cudnn is None else torch._C._get_cudnn_enabled(),
            )
        )
        _set_flags(self.flags)

    def __exit__(self, *exc: object) -> None:
        _set_flags(self._saved.pop())


class DoubleBackwardKernels(BackendFlags):
    """Runs a block with ``F.scaled_dot_product_attention`` on its math backend only.

    The fused backends implement a backward but no double backward, so a
    meta-gradient through them fails; the math backend is built from
    differentiable primitives.

    Example:
        >>> q = torch.randn(1, 2, 4, 8)
        >>> with DoubleBackwardKernels():
        ...     out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        >>> out.shape
        torch.Size([1, 2, 4, 8])
    """

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(_MATH_ONLY)


class CudnnOff(BackendFlags):
    """Runs a block with cuDNN off: its RNN kernels have no double backward (the native ones have)."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(None, False)


# -- attention on the math kernel: forwards differentiated twice, forwards under vmap ---
# Setting the backend flags around every forward costs about 6 us (a dozen calls
# into C++), a tenth of a small MLP's forward, and most models call no attention
# at all; swapping the function in and out of torch.nn.functional at each
# forward costs as much again, since every change of a module's globals
# invalidates the interpreter's caches for all of that module's functions. So
# on first use torch.nn.functional.scaled_dot_product_attention (the name its
# callers look up at each call: transformers, timm, nn.MultiheadAttention
# through F.multi_head_attention_forward) becomes a wrapper, for good, which
# sets the flags around the call when this thread runs a forward that will be
# differentiated twice, and otherwise, and under torch.compile, calls the
# function it wraps. Code that took the function before the first patched
# forward (``from torch.nn.functional import scaled_dot_product_attention``)
# keeps the fused kernels; the first inner step then names the operation in its
# error.
_functional = torch.nn.functional
_attention_state = threading.local()
_attention_lock = threading.Lock()
_attention_wrapped: list[Any] = []


def _wrap_attention() -> None:
    with _attention_lock:
        if _attention_wrapped:
            return
        original = _functional.scaled_dot_product_attention
        _attention_wrapped.append(original)

        @functools.wraps(original)
        def scaled_dot_product_attention(*args: Any, **kwargs: Any) -> Any:
            if getattr(_attention_state, "depth", 0) and not torch.compiler.is_compiling():
                with DoubleBackwardKernels():
                    return original(*args, **kwargs)
            return original(*args, **kwargs)

        _functional.scaled_dot_product_attention = scaled_dot_product_attention


class _MathAttention:
    __slots__ = ()

    def __enter__(self) -> None:
        if not _attention_wrapped:
            _wrap_attention()
        _attention_state.depth = getattr(_attention_state, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _attention_state.depth -= 1


#: While active in a thread (it may be entered again), every call of
#: ``torch.nn.functional.scaled_dot_product_attention`` in that thread runs on
#: the math kernel: the one with a double backward, and the one ``vmap`` can
#: batch (the fused kernels have no batching rule: vmap would loop over the
#: tasks, with a warning).
MATH_ATTENTION = _MathAttention()


def math_attention_active() -> bool:
    """Whether :data:`MATH_ATTENTION` is active in this thread."""
    return getattr(_attention_state, "depth", 0) > 0


def vmap_cannot_batch(error: BaseException) -> bool:
    """Whether ``error`` is vmap refusing a forward it cannot batch.

    Data-dependent control flow (``if mask.all():``, as transformers does with
    attention masks) and ``.item()`` on a batched tensor have no batched form;
    such a forward must run task by task.
    """
    message = str(error)
    return (
        isinstance(error, RuntimeError)
        and message.startswith("vmap: ")
        and ("data-dependent control flow" in message or ".item()" in message)
    )


def sdp_flags() -> tuple[bool, ...]:
    """The current enabled flags of every scaled_dot_product_attention backend."""
    return tuple([get() for get, _ in _SDP])


@contextlib.contextmanager
def quiet_flat_weights_warning() -> Iterator[None]:
    """Silences cuDNN's "RNN module weights are not part of single contiguous chunk".

    Fast weights are new tensors at every step, never one flat buffer, so
    cuDNN compacts them at each forward (as it must) and would warn at each
    forward; its advice, ``flatten_parameters()``, would overwrite the storage
    of tensors that carry autograd history. The warning says nothing the user
    can act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"RNN module weights are not part of single")
        yield


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
_checkpoint_state = threading.local()
_CHECKPOINT_ENTRIES: dict[str, Any] = {}
_checkpoint_reached = [False]  # set by every hooked call: the probe's witness


def _hooked_checkpoint(context_fn: Any, debug: bool, run: Callable[[Any], Any]) -> Any:
    """The non-reentrant checkpoint's generator, given the context_fn to run it with.

    ``run(context_fn)`` returns torch's own generator; inside a patched forward
    it gets a context_fn whose recompute context puts back this forward's fast
    weights.
    """
    _checkpoint_reached[0] = True
    stack = getattr(_checkpoint_state, "stack", None)
    if not stack:
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
    recompute_on = stack[-1]()  # the fast weights of this forward, captured now

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
        if not getattr(_checkpoint_state, "stack", None):
            return _CHECKPOINT_ENTRIES["CheckpointFunction"].apply(function, preserve, *args)
        return torch.utils.checkpoint.checkpoint(
            function, *args, use_reentrant=False, preserve_rng_state=preserve
        )


class GraphForward:
    """The context of a patched forward that builds a graph.

    Checkpoints inside it recompute on its fast weights (``capture`` is called
    when the model checkpoints a function, and returns the context manager to
    recompute that function in), and with ``math=True`` attention runs on the
    math kernel (:data:`MATH_ATTENTION`). One small class rather than two
    context managers or a generator: it is entered at every such forward, so
    it must cost next to nothing.
    """

    __slots__ = ("_capture", "_math", "_stack")

    def __init__(self, capture: Callable[[], Any], math: bool) -> None:
        self._capture = capture
        self._math = math

    def __enter__(self) -> None:
        if not _CHECKPOINT_ENTRIES:  # wrapped on first use, for good; see the comment above
            _wrap_checkpoint_entries()
        stack = getattr(_checkpoint_state, "stack", None)
        if stack is None:
            stack = _checkpoint_state.stack = []
        stack.append(self._capture)
        self._stack = stack
        if self._math:
            MATH_ATTENTION.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._math:
            MATH_ATTENTION.__exit__()
        self._stack.pop()


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
    with torch.enable_grad():
        torch.utils.checkpoint.checkpoint(torch.neg, probe, use_reentrant=False)
    return _checkpoint_reached[0]


# Nodes autograd puts where a derivative is missing: they raise when a backward reaches them.
_ERROR_NODES = frozenset(
    {"torch::autograd::NotImplemented", "torch::autograd::Error", "torch::autograd::DelayedError"}
)
_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx: None).__code__


def _is_once_differentiable(fn: Any) -> bool:
    while fn is not None:
        if getattr(fn, "__code__", None) is _ONCE_DIFFERENTIABLE:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def without_double_backward(roots: list[Any]) -> list[str]:
    """The operations in the graphs of ``roots`` that cannot be differentiated twice.

    Walks the autograd graph (node names and custom ``autograd.Function``
    classes are torch internals) from the ``grad_fn`` of each tensor in
    ``roots``: an inner step's loss and the gradients it took with
    ``create_graph=True``. Found are the nodes autograd inserts where a
    backward has no derivative formula (they raise only when the outer
    backward reaches them), and custom Functions whose backward is
    ``@once_differentiable`` (whose second derivative is an error, or, when
    the gradient flowing into them is constant, silently missing).

    Returns:
        One description per operation found, in the order found.
    """
    found: dict[str, None] = {}
    stack = [t.grad_fn for t in roots if t is not None and t.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = node.name()
        forward_cls = getattr(node, "_forward_cls", None)
        if forward_cls is not None and _is_once_differentiable(forward_cls.backward):
            found[
                f"the custom autograd.Function {forward_cls.__qualname__} (its backward is "
                "@once_differentiable)"
            ] = None
        elif name in _ERROR_NODES:
            # The forward operation's own node comes in through its saved output,
            # after the gradient and the inputs.
            sources = [
                n.name() for n, _ in node.next_functions if n is not None and "::" not in n.name()
            ]
            op = re.sub(r"Backward\d*$", "", sources[-1]) if sources else "an operation"
            found[f"the double backward of {op} (autograd: {name.rsplit(':', 1)[-1]})"] = None
        stack.extend(n for n, _ in node.next_functions)
    return list(found)


def compiled_inner(module: Any) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) runs, or None.

    Found through ``sys.modules``: a compiled module exists only once dynamo
    was imported, and importing it here would cost every user a second.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        return module._orig_mod
    return None


def run_eagerly(compiled_copy: nn.Module) -> None:
    """Makes the copy of an ``OptimizedModule`` call (the copy of) the module it wraps.

    The copied ``forward`` is the original's compiled function, which reads the
    original's parameters, not the copy's fast weights; and a compiled graph
    has no double backward. So a patched copy runs it eagerly.
    """
    inner: Any = compiled_copy._modules["_orig_mod"]
    compiled_copy.__dict__["forward"] = inner.__call__
    compiled_copy.__dict__.pop("_forward", None)


def is_scripted(module: Any) -> bool:
    """Whether ``module`` is a TorchScript module (``torch.jit.script`` or ``trace``)."""
    return isinstance(module, torch.jit.ScriptModule)


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
    """The CPU generator's state and that of each accelerator ``tensors`` live on.

    Checkpointed steps record it so that their replay draws the same random
    numbers (dropout masks) as their first run. One state per device, however
    many tensors live there.
    """
    from torch.utils.checkpoint import get_device_states

    one_per_device: dict[torch.device, torch.Tensor] = {}
    for t in tensors:
        if t.device.type not in ("cpu", "meta"):
            one_per_device.setdefault(t.device, t)
    accel = list(one_per_device.values())
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


AutocastState = tuple[tuple[str, bool, torch.dtype], ...]


def autocast_state(device_types: tuple[str, ...]) -> tuple[AutocastState, bool]:
    """Whether autocast is on, and in which dtype, for each device type; and its cache flag.

    A checkpointed step records it so that its replay, which runs during the
    outer backward, usually outside the user's ``torch.autocast`` block,
    computes in the precision of its first run.
    """
    state = tuple(
        (d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
        for d in device_types
        if torch.amp.is_autocast_available(d)
    )
    return state, torch.is_autocast_cache_enabled()


@contextlib.contextmanager
def replay_autocast(recorded: tuple[AutocastState, bool]) -> Iterator[None]:
    """Runs a block under the autocast settings :func:`autocast_state` recorded."""
    state, cache = recorded
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in state:
            stack.enter_context(
                torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache)
            )
        yield


def _set_flags(flags: tuple[tuple[bool, ...] | None, bool | None]) -> None:
    sdp, cudnn = flags
    if sdp is not None:
        for (_, set_), value in zip(_SDP, sdp):
            set_(value)
    if cudnn is not None:
        torch._C._set_cudnn_enabled(cudnn)


# -- pytrees (torch.utils._pytree is private) ---------------------------------------
tree_flatten = _pytree.tree_flatten
tree_unflatten = _pytree.tree_unflatten
tree_leaves = _pytree.tree_leaves
tree_map = _pytree.tree_map
