"""Meta-learning across processes with ``DistributedDataParallel``.

``monkeypatch``, ``make_functional`` and ``innerloop_ctx`` accept a
``DistributedDataParallel`` (DDP) model. They patch the wrapped module
(``ddp.module``), so the patched model is an instance of the user's class with
the parameter order of ``ddp.parameters()``, and the inner loop runs on every
rank locally: inner gradients come from ``torch.autograd.grad``, which never
runs the gradient accumulators that DDP's reducer hooks into, so inner steps do
not communicate. With ``copy_initial_weights=False`` the initial fast weights
are DDP's own parameters, and the outer ``backward()`` all-reduces the
meta-gradient with DDP's bucketed, overlapped all-reduce: every rank gets the
mean over ranks, as in plain DDP, and ``ddp.no_sync()`` accumulates locally.
With ``copy_initial_weights=True`` the patched model is a plain local copy that
never communicates (for evaluation, or for meta-parameters that are not DDP
parameters, whose gradients DDP does not average). ``nn.DataParallel`` and FSDP1
are refused with an explanation; FSDP2 (``fully_shard``) models are patched by
:mod:`higher.fsdp`.

What runs when, per DDP model (``ddp(x)`` does all of it in every forward):

* Making a patched model broadcasts rank 0's buffers if DDP would
  (``broadcast_buffers`` and module buffers), once per synced iteration: the
  first patched model after a synced backward does it, later ones in the same
  iteration do not. Ranks with different numbers of tasks thus issue the same
  broadcasts.
* A grad-enabled forward of a patched model only notes whether it is synced
  (outside ``no_sync``), as DDP decides at forward time. Nothing else: inner
  steps and any other forwards cost no DDP work and no communication, however
  many each rank runs.
* The reducer is armed lazily, by a pre-hook on the gradient accumulators of
  DDP's parameters, when a backward after a synced forward first reaches one
  of them: every rank gets there once per synced iteration. That is where
  DDP's forward-side reducer work happens, its one-time bucket rebuild (a
  broadcast) included. The autograd engine then knows which parameters this
  backward reaches, so ``find_unused_parameters=True`` costs one look-up per
  parameter instead of DDP's walk of the graph from each forward's output
  (quadratic in the unroll length when done at every inner forward). Without
  ``find_unused_parameters`` a backward that reaches only some of the
  parameters raises at once, naming them, where DDP's reducer would wait for
  them and the ranks' all-reduces would stop matching (a hang under NCCL).
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import torch
from torch import nn

from . import _compat

__all__ = ["local_module"]


@functools.cache  # an import statement costs a microsecond at every patch
def _ddp_type() -> type[Any] | None:
    if not torch.distributed.is_available():  # pragma: no cover - builds without c10d
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


def local_module(module: nn.Module) -> nn.Module:
    """The module a DDP wrapper runs (``ddp.module``), or ``module`` itself.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> higher.distributed.local_module(model) is model
        True
    """
    ddp_type = _ddp_type()
    if ddp_type is not None and isinstance(module, ddp_type):
        return module.module
    return module


def unwrap(module: Any, shares_params: bool) -> tuple[Any, Any]:
    """Splits a module to patch into the module to copy and the DDP wrapper to arm.

    Args:
        module: what the user passed to ``monkeypatch`` / ``innerloop_ctx``.
        shares_params: whether the fast weights start as the module's own parameters
            (``copy_initial_weights=False``), so that DDP should average the
            meta-gradient.

    Returns:
        ``(module_to_copy, ddp)``; ``ddp`` is None when there is nothing to arm.

    Raises:
        TypeError: ``nn.DataParallel``, FSDP1, or an FSDP2 model where only
            ``monkeypatch`` / ``innerloop_ctx`` take one.
        ValueError: a DDP configuration that cannot work with fast weights.
    """
    if isinstance(module, nn.DataParallel):
        raise TypeError(
            "nn.DataParallel is not supported: it replicates the module onto every "
            "device on each call, so fast weights cannot live in it. Use "
            "torch.nn.parallel.DistributedDataParallel (one process per device, "
            "e.g. under torchrun), or patch model.module on a single device"
        )
    if isinstance(module, nn.Module) and _compat.is_fsdp1(module):
        raise TypeError(
            f"{type(module).__name__} (FSDP) is not supported: shard the model with FSDP2's "
            "torch.distributed.fsdp.fully_shard instead (its parameters become DTensor "
            "shards, and higher keeps the fast weights sharded: see higher.fsdp), or, if the "
            "model fits on one device, wrap it in DistributedDataParallel (see the "
            "distributed guide of the documentation, docs/guides/distributed.md)"
        )
    if isinstance(module, nn.Module) and _compat.is_fsdp2_unit(module):
        raise TypeError(
            f"{type(module).__name__} (a fully_shard'ed model) can only be patched by "
            "higher.monkeypatch or higher.innerloop_ctx (per-task mode, see higher.fsdp); "
            "make_functional and reset() of a model patched from an unsharded module do "
            "not take it"
        )
    ddp_type = _ddp_type()
    if ddp_type is None or not isinstance(module, ddp_type):
        return module, None
    if not shares_params:
        return module.module, None
    reason = _compat.ddp_unsupported_reason(module)
    if reason is not None:
        raise ValueError(f"DistributedDataParallel: {reason}")
    if _compat.ddp_sync_buffers(module):
        # Once per synced iteration, like the first DDP forward after a synced
        # backward: _SyncState.arm sets the flag again.
        module.require_forward_param_sync = False
    return module.module, module


class _SyncState:
    """What higher tracks about one DDP model, between its forwards and its backward.

    Holds the DDP model weakly; the pre-hooks on the gradient accumulators hold
    this state weakly (the accumulators belong to DDP's reducer, and a strong
    reference from them would keep everything alive through C++).
    """

    def __init__(self, ddp: Any) -> None:
        self.ddp = weakref.ref(ddp)
        self.lock = threading.Lock()
        #: A synced grad-enabled forward ran since the reducer was last armed.
        self.pending = False
        named = _compat.ddp_reducer_params(ddp)
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.accumulators = [_compat.grad_accumulator(p) for p in self.params]
        hook = functools.partial(_on_accumulate, weakref.ref(self))
        for acc in self.accumulators:
            acc.register_prehook(hook)
        _compat.ddp_lazy_init(ddp)

    def forward(self, ddp: Any) -> None:
        # DDP decides at forward time whether the next backward all-reduces.
        if ddp.require_backward_grad_sync:
            self.pending = True

    def arm(self) -> None:
        """Arms DDP's reducer for the backward now running (first accumulator reached).

        Every rank gets here once per synced iteration, whatever it ran before:
        the one place where DDP's forward-side collective (the bucket rebuild)
        can run without depending on how many forwards each rank made.
        """
        with self.lock:
            if not self.pending:
                return
            self.pending = False
            ddp = self.ddp()
            if ddp is None:
                return
            reached = [_compat.backward_runs(acc) for acc in self.accumulators]
            if not all(reached) and not ddp.find_unused_parameters:
                missing = ", ".join(repr(n) for n, r in zip(self.names, reached) if not r)
                raise RuntimeError(
                    f"DistributedDataParallel: this backward reaches no gradient for "
                    f"parameter(s) {missing} on this rank, and DDP was constructed with "
                    "find_unused_parameters=False, so its reducer would wait for them and "
                    "the ranks' all-reduces would no longer match (under NCCL, a hang). "
                    "Construct DDP with find_unused_parameters=True, or make the loss "
                    "depend on every parameter"
                )
            _compat.ddp_arm_reducer(ddp, [p for p, r in zip(self.params, reached) if r])
            ddp.require_forward_param_sync = True


def _on_accumulate(state_ref: weakref.ref[_SyncState], grad_outputs: Any) -> None:
    state = state_ref()
    if state is not None and state.pending:
        state.arm()


_STATES: weakref.WeakKeyDictionary[Any, _SyncState] = weakref.WeakKeyDictionary()


def _state(ddp: Any) -> _SyncState:
    state = _STATES.get(ddp)
    if state is None:
        state = _STATES[ddp] = _SyncState(ddp)
    return state


def _note_forward(ddp: Any) -> None:
    # Forwards that record no graph, and those a backward runs (the replay of a
    # checkpointed unroll), are not DDP forwards.
    if torch.is_grad_enabled() and not _compat.in_backward():
        _state(ddp).forward(ddp)


class _DDPLink:
    """What a patched model keeps of the DDP model it was built from.

    The patched model calls :meth:`before_forward` first in each of its calls
    (a batched model once per call, not once per task), as
    ``DistributedDataParallel`` runs its forward bookkeeping around the module
    it wraps. Copies of the patched model share the link (the DDP instance
    holds process-group state that cannot be copied).
    """

    __slots__ = ("ddp",)

    def __init__(self, ddp: Any) -> None:
        self.ddp = ddp

    def before_forward(self) -> None:
        """Notes whether this call is a synced DDP forward; no communication."""
        _note_forward(self.ddp)

    def __deepcopy__(self, memo: dict[int, Any]) -> _DDPLink:
        return self

    def __reduce__(self) -> Any:
        raise TypeError(
            "a patched model built from a DistributedDataParallel model cannot be "
            "pickled; write_back() its weights into the module and save that"
        )


def link(ddp: Any) -> _DDPLink:
    """What a patched model built on ``ddp``'s parameters keeps, to do its forward bookkeeping."""
    _state(ddp)  # hooks DDP's gradient accumulators, once per DDP model
    return _DDPLink(ddp)


def link_for_reset(current: _DDPLink | None, source: nn.Module, shares_params: bool) -> Any:
    """The link a patched model needs after ``fmodule.reset(source)``.

    A patched model built as a local copy (``copy_initial_weights=True``) and
    reset onto DDP's own parameters must now do DDP's bookkeeping, or the
    meta-gradient would silently stay unaveraged.

    Returns:
        ``current``, or a new link when ``source`` is a DDP model whose
        parameters become the fast weights of a model that had none.

    Raises:
        ValueError: the patched model already does the bookkeeping of a
            different DDP model.
    """
    _, ddp = unwrap(source, shares_params)
    if ddp is None:
        return current
    if current is None:
        return link(ddp)
    if current.ddp is not ddp:
        raise ValueError(
            "reset: this patched model does DDP bookkeeping for another "
            "DistributedDataParallel model; patch the new one instead"
        )
    return current
