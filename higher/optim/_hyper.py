"""Hyperparameter values: validation, and ``override``'s "one value or one per group".

Shared by both ways of writing an optimizer (:mod:`higher.optim.base` for the
built-in update rules, :mod:`higher.optim.classic` for ``_update`` overrides)
and by :func:`higher.optim.apply_trainable_opt_params`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from numbers import Number
from typing import Any

from torch import Tensor

#: torch.optim options that change how torch computes a step, not which step.
IGNORED_OPTIONS = frozenset({"foreach", "fused", "differentiable", "capturable"})

# torch's checks and wording for hyperparameters given through ``override``.
_CHECKS: dict[str, tuple[Callable[[float], bool], str]] = {
    "lr": (lambda v: v >= 0, "Invalid learning rate: {}"),
    "eps": (lambda v: v >= 0, "Invalid epsilon value: {}"),
    "momentum": (lambda v: v >= 0, "Invalid momentum value: {}"),
    "weight_decay": (lambda v: v >= 0, "Invalid weight_decay value: {}"),
    "rho": (lambda v: 0 <= v <= 1, "Invalid rho value: {}"),
    "alpha": (lambda v: v >= 0, "Invalid alpha value: {}"),
    "lr_decay": (lambda v: v >= 0, "Invalid lr_decay value: {}"),
    "momentum_decay": (lambda v: v >= 0, "Invalid momentum_decay value: {}"),
    "initial_accumulator_value": (
        lambda v: v >= 0,
        "Invalid initial_accumulator_value value: {}",
    ),
}

# The same for each number of a pair: (check of the first, of the second, wording).
_PAIR_CHECKS: dict[str, tuple[Callable[[float], bool], Callable[[float], bool], str]] = {
    "betas": (
        lambda v: 0 <= v < 1,
        lambda v: 0 <= v < 1,
        "Invalid beta parameter at index {index}: {value}",
    ),
    "etas": (lambda v: 0 < v < 1, lambda v: v > 1, "Invalid eta values: {0}, {1} ({which})"),
}


class PerParameter(list):  # type: ignore[type-arg]
    """A hyperparameter value given separately for each parameter of a group.

    Example:
        >>> lrs = PerParameter([torch.tensor(0.1), torch.tensor(0.2)])
        >>> len(lrs)
        2
    """


def is_scalar(v: Any) -> bool:
    """A number or a tensor (not a bool): one hyperparameter value."""
    return isinstance(v, (Number, Tensor)) and not isinstance(v, bool)


def is_pair(v: Any) -> bool:
    """A value for a pair hyperparameter such as ``betas``."""
    if isinstance(v, Tensor):
        return v.numel() == 2
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(is_scalar(x) for x in v)


def check_value(key: str, value: Any) -> None:
    """Rejects a number (or a pair's number) torch.optim would reject, in torch's words.

    Tensors are not read back to the host here: a step never synchronises.

    Example:
        >>> check_value("betas", (0.9, 1.0))
        Traceback (most recent call last):
        ...
        ValueError: Invalid beta parameter at index 1: 1.0
    """
    check = _CHECKS.get(key)
    if check is not None and isinstance(value, Number) and not check[0](value):  # type: ignore[arg-type]
        raise ValueError(check[1].format(value))
    pair = _PAIR_CHECKS.get(key)
    if pair is not None and isinstance(value, (tuple, list)) and len(value) == 2:
        for index, (ok, v) in enumerate(zip(pair[:2], value)):
            if isinstance(v, Number) and not isinstance(v, bool) and not ok(v):  # type: ignore[arg-type]
                which = "need 0 < etaminus < 1 < etaplus"
                raise ValueError(pair[2].format(*value, index=index, value=v, which=which))


def _numbers(value: Any) -> list[Any]:
    return list(value) if type(value) is PerParameter else [value]


def check_groups(groups: list[dict[str, Any]], before: list[dict[str, Any]]) -> None:
    """Checks param groups that ``override`` changed; on an error puts ``before`` back.

    Raises:
        ValueError: see :func:`check_group`.
    """
    try:
        for gi, group in enumerate(groups):
            check_group(group, gi)
    except ValueError:
        for group, old in zip(groups, before):
            group.clear()
            group.update(old)
        raise


def check_group(group: Mapping[str, Any], gi: int) -> None:
    """Rejects combinations of a param group's options that torch.optim rejects.

    torch checks them when an optimizer is built; here, after ``override``
    changed a group.

    Raises:
        ValueError: SGD's ``nesterov=True`` with a momentum that is not positive
            or a nonzero dampening.
    """
    if group.get("nesterov") is not True:
        return
    momenta = [v for v in _numbers(group.get("momentum", 0.0)) if isinstance(v, Number)]
    dampenings = [v for v in _numbers(group.get("dampening", 0.0)) if isinstance(v, Number)]
    if any(m <= 0 for m in momenta) or any(d != 0 for d in dampenings):  # type: ignore[operator]
        raise ValueError(
            "Nesterov momentum requires a momentum and zero dampening: param group "
            f"{gi} has momentum={group.get('momentum')}, dampening={group.get('dampening')}"
        )


def check_group_options(name: str, group: Mapping[str, Any], supported: Sequence[str]) -> None:
    """Rejects options of a torch param group that a differentiable optimizer lacks."""
    for key, value in group.items():
        if key in IGNORED_OPTIONS or key in supported or key == "params":
            continue
        if isinstance(value, bool) and value:
            raise ValueError(f"{name} does not support the option {key}=True")


def check_known(opt: Any, key: str, hint: str = "") -> None:
    """Rejects an ``override`` key that is not one of ``opt.hyperparameters``."""
    if key not in opt.hyperparameters:
        raise KeyError(
            f"{type(opt).__name__} has no hyperparameter '{key}' to override; it has: "
            f"{', '.join(opt.hyperparameters)}{hint}"
        )


def per_group(
    key: str, value: Any, n: int, single: Callable[[Any], bool], hint: str = ""
) -> list[Any]:
    """``override[key]`` as one value per param group.

    ``value`` is one value for every group when ``single(value)``, else a list
    or tuple of one value (for every group) or of ``n`` values (one each).

    Raises:
        TypeError: neither a single value nor a list or tuple.
        ValueError: a list whose length is neither 1 nor ``n``.

    Example:
        >>> per_group("lr", [0.1], 2, single=lambda v: isinstance(v, float))
        [0.1, 0.1]
    """
    if single(value):
        return [value] * n
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"override['{key}'] must be a number, a tensor or a list of them, "
            f"got {type(value).__name__}"
        )
    if len(value) not in (1, n):
        raise ValueError(
            f"override['{key}'] has {len(value)} values but the optimizer has {n} param "
            f"group(s): give 1 or {n} values{hint}"
        )
    return list(value) * n if len(value) == 1 else list(value)


def select(group: Mapping[str, Any], j: int) -> dict[str, Any]:
    """A param group's hyperparameters as seen by its ``j``-th parameter."""
    return {k: (v[j] if type(v) is PerParameter else v) for k, v in group.items()}


def plain(value: Any) -> Any:
    """A hyperparameter as ``state_dict`` saves it: tensors become numbers."""
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.detach().clone()
    if type(value) is PerParameter:
        return PerParameter(plain(v) for v in value)
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    return value
