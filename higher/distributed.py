"""Meta-learning across processes with ``DistributedDataParallel``.

``monkeypatch``, ``make_functional`` and ``innerloop_ctx`` accept a
``DistributedDataParallel`` (DDP) model. They patch the wrapped module
(``ddp.module``), so the patched model is an instance of the user's class with
the parameter order of ``ddp.parameters()``, and the inner loop runs on every
rank locally: inner gradients come from ``torch.autograd.grad``, which never
runs the gradient accumulators that DDP's reducer hooks into, so inner steps do
not communicate. With ``copy_initial_weights=False`` the initial fast weights
are DDP's own parameters; each grad-enabled forward of the patched model then
does DDP's forward bookkeeping (:mod:`higher._compat`), which arms DDP's
reducer as ``ddp(x)`` would (buffers are broadcast once per patched model, not
per forward), and the outer ``backward()`` all-reduces the meta-gradient with
DDP's bucketed, overlapped all-reduce: every rank gets the mean over ranks, as
in plain DDP, and ``ddp.no_sync()`` accumulates locally. With ``copy_initial_weights=True`` no meta-gradient reaches DDP's
parameters, and the patched model is a plain local copy (for evaluation, or
for meta-parameters that are not DDP parameters, whose gradients DDP does not
average). ``nn.DataParallel`` and FSDP are refused with an explanation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import _compat

__all__ = ["local_module"]


def _ddp_type() -> type[Any] | None:
    if not torch.distributed.is_available():  # pragma: no cover - builds without c10d
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


def _is_fsdp(module: nn.Module) -> bool:
    if not torch.distributed.is_available():  # pragma: no cover
        return False
    # Matched by name so that importing FSDP (slow, and absent from some builds)
    # is never needed: FSDP1 wraps (FullyShardedDataParallel); FSDP2's
    # fully_shard swaps the class to one deriving from FSDPModule.
    names = {cls.__name__ for cls in type(module).__mro__}
    return bool(names & {"FullyShardedDataParallel", "FSDPModule"})


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
        TypeError: ``nn.DataParallel`` or FSDP.
        ValueError: a DDP configuration that cannot work with fast weights.
    """
    if isinstance(module, nn.DataParallel):
        raise TypeError(
            "nn.DataParallel is not supported: it replicates the module onto every "
            "device on each call, so fast weights cannot live in it. Use "
            "torch.nn.parallel.DistributedDataParallel (one process per device, "
            "e.g. under torchrun), or patch model.module on a single device"
        )
    if isinstance(module, nn.Module) and _is_fsdp(module):
        raise TypeError(
            f"{type(module).__name__} (FSDP) is not supported: its parameters are "
            "shards, and fast weights need whole tensors on every rank. If the model "
            "fits on one device, wrap it in DistributedDataParallel instead; see "
            "'Distributed meta-learning' in the README"
        )
    ddp_type = _ddp_type()
    if ddp_type is None or not isinstance(module, ddp_type):
        return module, None
    if not shares_params:
        return module.module, None
    reason = _compat.ddp_unsupported_reason(module)
    if reason is not None:
        raise ValueError(f"DistributedDataParallel: {reason}")
    _compat.ddp_sync_buffers(module)
    return module.module, module


class _DDPLink:
    """What a patched model keeps of the DDP model it was built from.

    The patched model calls :meth:`before_forward` first and
    :meth:`after_forward` last in each of its calls, as
    ``DistributedDataParallel`` runs around the module it wraps (a batched
    model once per call, not once per task). Copies of the patched model share
    the link (the DDP instance holds process-group state that cannot be copied).
    """

    __slots__ = ("ddp",)

    def __init__(self, ddp: Any) -> None:
        self.ddp = ddp

    def before_forward(self) -> None:
        _compat.ddp_pre_forward(self.ddp)

    def after_forward(self, output: Any) -> Any:
        return _compat.ddp_post_forward(self.ddp, output)

    def __deepcopy__(self, memo: dict[int, Any]) -> _DDPLink:
        return self

    def __reduce__(self) -> Any:
        raise TypeError(
            "a patched model built from a DistributedDataParallel model cannot be "
            "pickled; write_back() its weights into the module and save that"
        )


def arm(fmodule: nn.Module, ddp: Any) -> None:
    """Makes every call of the patched ``fmodule`` do ``ddp``'s forward bookkeeping."""
    object.__setattr__(fmodule, "_higher_ddp", _DDPLink(ddp))


def arm_for_reset(fmodule: nn.Module, source: nn.Module, shares_params: bool) -> None:
    """``fmodule.reset(source)``: a DDP source whose parameters become the fast weights.

    A patched model built as a local copy (``copy_initial_weights=True``) and
    reset onto DDP's own parameters must now be armed, or the meta-gradient
    would silently stay unaveraged.

    Raises:
        ValueError: ``fmodule`` is already armed for a different DDP model.
    """
    _, ddp = unwrap(source, shares_params)
    if ddp is None:
        return
    current = fmodule.__dict__.get("_higher_ddp")
    if current is None:
        arm(fmodule, ddp)
    elif current.ddp is not ddp:
        raise ValueError(
            "reset: this patched model does DDP bookkeeping for another "
            "DistributedDataParallel model; patch the new one instead"
        )
