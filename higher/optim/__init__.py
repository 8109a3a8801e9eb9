"""Differentiable optimizers: the ``torch.optim`` update rules, out of place.

The registry maps each ``torch.optim`` class to its differentiable twin;
:func:`get_diff_optim` builds the twin of a live torch optimizer. A new
optimizer is either a pure update rule (``update = staticmethod(rule)``, see
:mod:`higher.optim.base`) or, as in the original ``higher``, a subclass that
overrides ``_update`` (see :mod:`higher.optim.classic`); ``_get_mask_closure``
and ``_maybe_mask`` are kept for the latter, :func:`safe_sqrt` replaces them.

Devices and host synchronisation: a step of a built-in optimizer never reads a
tensor back to the host (no ``.item()``, no ``bool(tensor)``), whatever its
options and whether its hyperparameters are numbers or tensors, so an inner loop
on an accelerator queues its kernels without waiting. Data-dependent branches
are taken on the device (``torch.where``): RAdam's switch at ``rho_t = 5`` with
a tensor ``beta2``, ASGD's averaging start with a tensor ``t0``. Tensors the
rules create live on their parameter's device and dtype; scalar state that torch
keeps in its scalar dtype (``step``, ASGD's ``eta`` and ``mu``, NAdam's
``mu_product``) is a Python float rounded as torch rounds it, or, when a tensor
hyperparameter enters it, a tensor where that hyperparameter lives. Keep tensor
hyperparameters on their parameters' device (:func:`get_trainable_opt_params`
does by default); a CPU scalar such as ``torch.tensor(0.1)`` beside accelerator
parameters works too, at the price of a copy where torch wants one device.
Values are read on the host only when asked for: building from a torch
optimizer (its state; NAdam reads torch's ``mu_product`` tensor at the first
step after), ``state_dict``, ``write_back``. :mod:`higher.implicit` reads its
solver's convergence every ``check_every`` iterations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from numbers import Number
from typing import Any

import torch
from torch import Tensor

from ..utils import Device, as_list
from ._hyper import per_group
from ._ops import safe_sqrt
from .adadelta import DifferentiableAdadelta, adadelta_update
from .adagrad import DifferentiableAdagrad, adagrad_update
from .adam import DifferentiableAdam, DifferentiableAdamW, adam_update
from .adamax import DifferentiableAdamax, adamax_update
from .asgd import DifferentiableASGD, asgd_update
from .base import DifferentiableOptimizer, PerParameter, Snapshot
from .classic import _get_mask_closure, _maybe_mask  # noqa: F401  (the original's names)
from .nadam import DifferentiableNAdam, nadam_update
from .radam import DifferentiableRAdam, radam_update
from .rmsprop import DifferentiableRMSprop, rmsprop_update
from .rprop import DifferentiableRprop, rprop_update
from .sgd import DifferentiableSGD, sgd_update

__all__ = [
    "DifferentiableASGD",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdamax",
    "DifferentiableNAdam",
    "DifferentiableOptimizer",
    "DifferentiableRAdam",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableSGD",
    "PerParameter",
    "Snapshot",
    "adadelta_update",
    "adagrad_update",
    "adam_update",
    "adamax_update",
    "apply_trainable_opt_params",
    "asgd_update",
    "create_diff_optim",
    "get_diff_optim",
    "get_trainable_opt_params",
    "nadam_update",
    "radam_update",
    "register_optim",
    "rmsprop_update",
    "rprop_update",
    "safe_sqrt",
    "sgd_update",
]

_OPT_MAPPING: dict[type[torch.optim.Optimizer], type[DifferentiableOptimizer]] = {}


def register_optim(
    optim_type: type[torch.optim.Optimizer], diff_optim_type: type[DifferentiableOptimizer]
) -> None:
    """Registers the differentiable twin of an optimizer class.

    Example:
        >>> class MySGD(torch.optim.SGD):
        ...     pass
        >>> register_optim(MySGD, DifferentiableSGD)
    """
    if not (isinstance(optim_type, type) and issubclass(optim_type, torch.optim.Optimizer)):
        raise TypeError(f"optim_type must be a torch.optim.Optimizer subclass, got {optim_type!r}")
    if not (
        isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)
    ):
        raise TypeError(
            f"diff_optim_type must be a DifferentiableOptimizer subclass, got {diff_optim_type!r}"
        )
    _OPT_MAPPING[optim_type] = diff_optim_type


for _cls in (
    DifferentiableSGD,
    DifferentiableAdam,
    DifferentiableAdamW,
    DifferentiableAdamax,
    DifferentiableNAdam,
    DifferentiableRAdam,
    DifferentiableAdagrad,
    DifferentiableAdadelta,
    DifferentiableRMSprop,
    DifferentiableRprop,
    DifferentiableASGD,
):
    register_optim(_cls.torch_type, _cls)


def _lookup(opt_type: type) -> type[DifferentiableOptimizer]:
    # Exact type only: a subclass may change the update rule it inherits.
    diff_type = _OPT_MAPPING.get(opt_type)
    if diff_type is None:
        raise ValueError(
            f"no differentiable optimizer is registered for {opt_type.__module__}."
            f"{opt_type.__qualname__}; register one with "
            "higher.optim.register_optim(optim_type, diff_optim_type)"
        )
    return diff_type


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[Tensor],
    fmodel: Any = None,
    device: Device = None,
    override: Mapping[str, Any] | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """Builds the differentiable twin of a live ``torch.optim`` optimizer.

    Args:
        opt: the optimizer; its groups, hyperparameters and state are copied.
        reference_params: the parameters ``opt`` optimizes, in fast-weight order
            (usually ``model.parameters()``).
        fmodel: the patched module whose fast weights ``step`` updates.
        device: where to put copied state.
        override: hyperparameter overrides (see :mod:`higher.optim.base`).
        track_higher_grads: False for test mode (no graph).
        **kwargs: passed to the optimizer class (``grad_callback``,
            ``first_order``).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> type(get_diff_optim(opt, model.parameters())).__name__
        'DifferentiableAdam'
    """
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"opt must be a torch.optim.Optimizer, got {type(opt).__name__}")
    return _lookup(type(opt))(
        opt,
        reference_params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def create_diff_optim(
    opt_type: type[torch.optim.Optimizer],
    opt_kwargs: Mapping[str, Any] | None = None,
    params: Iterable[Tensor] | Iterable[Mapping[str, Any]] | None = None,
    fmodel: Any = None,
    device: Device = None,
    override: Mapping[str, Any] | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """Builds a differentiable optimizer from an optimizer class and its arguments.

    Args:
        opt_type: a registered ``torch.optim`` class.
        opt_kwargs: its constructor's keyword arguments.
        params: the weights to optimize (only their shapes are used), or param
            groups as torch takes them (dicts with ``"params"`` and per-group
            options); ``fmodel``'s fast weights when None.
        fmodel, device, override, track_higher_grads, kwargs: as in
            :func:`get_diff_optim`.

    Example:
        >>> fmodel = higher.monkeypatch(torch.nn.Linear(2, 1))
        >>> diffopt = create_diff_optim(torch.optim.SGD, {"lr": 0.1}, fmodel=fmodel)
        >>> diffopt.param_groups[0]["lr"]
        0.1
        >>> w, b = torch.zeros(2, 2), torch.zeros(2)
        >>> diffopt = create_diff_optim(
        ...     torch.optim.SGD, {"lr": 0.1}, params=[{"params": [w]}, {"params": [b], "lr": 0.5}]
        ... )
        >>> [group["lr"] for group in diffopt.param_groups]
        [0.1, 0.5]
    """
    diff_type = _lookup(opt_type)
    if params is None:
        if fmodel is None:
            raise ValueError("create_diff_optim needs params or fmodel")
        params = fmodel.parameters()
    items: list[Any] = list(params)

    # torch optimizers accept only leaves: give them stand-ins of the same shapes.
    def stand_ins_for(tensors: Any) -> list[Tensor]:
        tensors = [tensors] if isinstance(tensors, Tensor) else tensors
        return [
            torch.zeros_like(p, device=device).requires_grad_() for p in as_list(tensors, "params")
        ]

    if items and all(isinstance(g, Mapping) for g in items):
        groups = []
        for gi, group in enumerate(items):
            if "params" not in group:
                raise ValueError(f"create_diff_optim: param group {gi} has no 'params' key")
            groups.append({**group, "params": stand_ins_for(group["params"])})
        stand_ins = [p for group in groups for p in group["params"]]
        opt = opt_type(groups, **(opt_kwargs or {}))
    else:
        stand_ins = stand_ins_for(items)
        opt = opt_type(stand_ins, **(opt_kwargs or {}))
    return diff_type(
        opt,
        stand_ins,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def get_trainable_opt_params(
    opt: torch.optim.Optimizer, device: Device = None, dtype: torch.dtype | None = None
) -> dict[str, list[Any]]:
    """Every numeric hyperparameter of ``opt`` as tensors that require grad.

    Returns a mapping usable as ``override``: one value per param group, pairs
    (``betas``) as tuples of tensors. Each group's tensors live on the device
    and in the dtype of that group's parameters, so that a float64 run stays
    exact and a model on an accelerator never mixes in CPU tensors (a group
    whose parameters span several devices gets CPU scalars, which torch's
    arithmetic accepts beside any device; the group's widest floating dtype is
    used). ``device`` and ``dtype``, when given, replace these for every group;
    a group without parameters uses them or torch's defaults.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).double().parameters(), lr=0.1)
        >>> lr = get_trainable_opt_params(opt)["lr"][0]
        >>> lr.dtype, lr.device.type, lr.requires_grad
        (torch.float64, 'cpu', True)
    """

    def make(value: Any, where: Device, kind: torch.dtype | None) -> Any:
        if isinstance(value, tuple):
            return tuple(make(v, where, kind) for v in value)
        return torch.tensor(float(value), device=where, dtype=kind, requires_grad=True)

    out: dict[str, list[Any]] = {}
    for group in opt.param_groups:
        params = group["params"]
        devices = {p.device for p in params}
        # Parameters on several devices: CPU scalars combine with each of them.
        where = devices.pop() if len(devices) == 1 else (torch.device("cpu") if devices else None)
        kind = None
        for p in params:
            if p.is_floating_point():
                kind = p.dtype if kind is None else torch.promote_types(kind, p.dtype)
        where = where if device is None else device
        kind = kind if dtype is None else dtype
        for key, value in group.items():
            if key != "params" and _is_numeric(value):
                out.setdefault(key, []).append(make(value, where, kind))
    return out


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: Mapping[str, Any]) -> None:
    """Writes learned hyperparameter values back into ``opt`` as Python numbers.

    Each value takes the type the group's entry had, as in the original
    ``higher`` (torch keeps Adam's default ``weight_decay`` as the int ``0``:
    it stays an int), except that a learned value with a fraction becomes a
    float where the original would truncate it to the int.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> apply_trainable_opt_params(opt, {"lr": [torch.tensor(0.5)]})
        >>> opt.param_groups[0]["lr"]
        0.5
    """

    def plain(value: Any, old: Any) -> Any:
        if isinstance(value, (tuple, list)):
            olds = old if isinstance(old, (tuple, list)) else [None] * len(value)
            return tuple(plain(v, o) for v, o in zip(value, olds))
        if not isinstance(value, Tensor):
            return value
        number = value.item()
        if type(old) is int and float(number).is_integer():
            return int(number)
        return float(number) if type(old) in (int, float) else number

    n = len(opt.param_groups)
    for key, values in override.items():
        for group, value in zip(opt.param_groups, per_group(key, list(values), n, _never)):
            group[key] = plain(value, group.get(key))


def _never(value: Any) -> bool:
    return False


def _is_numeric(value: Any) -> bool:
    if isinstance(value, tuple):
        return bool(value) and all(_is_numeric(v) for v in value)
    return isinstance(value, Number) and not isinstance(value, bool)
