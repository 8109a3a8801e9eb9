"""The built-in optimizers' way of taking a step: a pure update rule per parameter.

One of the two ways :class:`~higher.optim.base.DifferentiableOptimizer` takes
a step (the other, the original ``higher``'s ``_update`` override, is
:mod:`higher.optim.classic`). Param groups hold the positions of their
parameters among the fast weights, ``diffopt.state[i]`` is the state of fast
weight ``i``, and a step applies ``update(p, g, state, **hyper)`` to every
parameter that has a gradient. Overrides accept per-group and per-parameter
values (:class:`~higher.optim._hyper.PerParameter`) and are checked as torch
checks its hyperparameters.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ..utils import Device
from ._hyper import (
    PerParameter,
    check_groups,
    check_known,
    check_value,
    is_pair,
    is_scalar,
    per_group,
    select,
)


class RuleMode:
    """How a built-in optimizer lays out its groups and state and takes its step."""

    def hyperparameters(
        self, declared: tuple[str, ...], groups: Sequence[Mapping[str, Any]]
    ) -> tuple[str, ...]:
        return declared

    def group_params(self, positions: list[int]) -> list[Any]:
        return positions

    def import_state(self, opt: Any, state: Mapping[str, Any], device: Device) -> dict[str, Any]:
        return opt._import_state(state, device)

    def state_view(self, flat: list[dict[str, Any]], positions: list[list[int]]) -> Any:
        return flat

    def detach_groups(self, opt: Any) -> None:
        pass  # the groups hold positions, not tensors

    def update(self, opt: Any, current: list[Tensor], grads: list[Tensor | None]) -> list[Tensor]:
        new_params = list(current)
        state = opt._state
        fused = opt.update_group
        for group in opt.param_groups:
            per_param = PerParameter in map(type, group.values())
            kwargs: Any = None if per_param else opt._kernel_args(group)
            if fused is not None and not per_param:
                # The whole group in one call where the rule has a list form for these
                # hyperparameters (plain SGD): the same operations, without a Python
                # call per parameter.
                positions = group["params"]
                if fused(new_params, grads, state, positions, **kwargs):
                    continue
            for j, i in enumerate(group["params"]):
                g = grads[i]
                if g is None:
                    continue
                if per_param:
                    kwargs = opt._kernel_args(select(group, j))
                new_params[i], state[i] = opt.update(current[i], g, state[i], **kwargs)
        return new_params

    def apply_override(self, opt: Any, override: Mapping[str, Any]) -> None:
        n = len(opt.param_groups)
        before = [dict(group) for group in opt.param_groups]
        for key, value in override.items():
            check_known(opt, key)
            pair = key in opt.pair_hyperparameters
            hint = (
                " (for per-parameter values, give each group a list: "
                f"{{'{key}': [[v_1, ..., v_k]]}})"
            )
            values = per_group(key, value, n, functools.partial(_one_or_per_param, pair=pair), hint)
            for gi, (group, v) in enumerate(zip(opt.param_groups, values)):
                group[key] = _group_value(key, v, gi, len(group["params"]), pair)
        check_groups(opt.param_groups, before)


def _one(v: Any, pair: bool) -> bool:
    return is_pair(v) if pair else is_scalar(v)


def _one_or_per_param(v: Any, pair: bool) -> bool:
    return _one(v, pair) or type(v) is PerParameter


def _group_value(key: str, v: Any, gi: int, size: int, pair: bool) -> Any:
    """One group's override: a single value, or one per parameter of the group."""
    if _one(v, pair):
        check_value(key, v)
        return v
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"override['{key}'] for param group {gi}: unsupported {type(v).__name__}")
    if len(v) != size:
        raise ValueError(
            f"override['{key}'] for param group {gi} gives {len(v)} per-parameter "
            f"values, but the group has {size} parameters"
        )
    for x in v:
        if not _one(x, pair):
            raise TypeError(
                f"override['{key}'] for param group {gi}: per-parameter values must be "
                f"{'pairs' if pair else 'numbers or tensors'}, got {type(x).__name__}"
            )
        check_value(key, x)
    return PerParameter(v)
