"""The original ``higher``'s way of writing an optimizer: overriding ``_update``.

Built-in optimizers are pure update rules that :class:`DifferentiableOptimizer`
loops over. Code written for ``facebookresearch/higher`` instead overrides
``_update(self, grouped_grads, **kwargs)`` and edits the optimizer in place:
``self.param_groups[i]["params"]`` holds the current fast weights of group
``i`` (the subclass assigns ``group["params"][p_idx] = new_p``) and
``self.state[group_idx][p_idx]`` is that parameter's state dict. A subclass
that overrides ``_update`` gets exactly that layout ("classic" mode): its
param groups hold tensors, and its ``state`` is a :class:`GroupedState`, a
nested view over the same flat per-parameter storage the built-in optimizers
use, so that checkpointing, ``detach_``, ``reset_state`` and ``write_back``
are shared. This module holds the view, ``ClassicMode`` (how such an
optimizer lays out its groups and state, takes its step through ``_update``
and applies ``override`` as the original does: values assigned into the groups
verbatim) and the original's gradient-masking helpers. The built-in
optimizers' counterpart is ``higher.optim._rules``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from torch import Tensor

from ..utils import Device, detach_leaf, map_tensors
from ._hyper import IGNORED_OPTIONS, check_groups, check_known, check_value, per_group


class GroupState(MutableMapping[int, dict[str, Any]]):
    """``state[group_idx]`` of a classic optimizer: ``p_idx`` -> that parameter's state.

    Like the original's ``defaultdict(dict)``, any parameter of the group can
    be read (an empty dict until the first update stores something), and the
    dict returned is the stored one, so in-place edits (``state["step"] += 1``)
    persist. Iteration and ``in`` see only parameters that have state.

    Example:
        >>> flat = [{}, {"step": 1}]
        >>> group = GroupState(flat, [1, 0])
        >>> group[0], list(group)
        ({'step': 1}, [0])
    """

    def __init__(self, flat: list[dict[str, Any]], positions: Sequence[int]) -> None:
        self._flat = flat
        self._positions = positions

    def _position(self, p_idx: int) -> int:
        if not isinstance(p_idx, int) or not 0 <= p_idx < len(self._positions):
            raise KeyError(
                f"state of a param group with {len(self._positions)} parameters has no "
                f"entry {p_idx!r} (expected a p_idx in 0..{len(self._positions) - 1})"
            )
        return self._positions[p_idx]

    def __getitem__(self, p_idx: int) -> dict[str, Any]:
        return self._flat[self._position(p_idx)]

    def __setitem__(self, p_idx: int, value: dict[str, Any]) -> None:
        if not isinstance(value, dict):
            raise TypeError(f"a parameter's state must be a dict, got {type(value).__name__}")
        self._flat[self._position(p_idx)] = value

    def __delitem__(self, p_idx: int) -> None:
        self._flat[self._position(p_idx)] = {}

    def __contains__(self, p_idx: object) -> bool:
        return (
            isinstance(p_idx, int)
            and 0 <= p_idx < len(self._positions)
            and bool(self._flat[self._positions[p_idx]])
        )

    def __iter__(self) -> Iterator[int]:
        return (j for j, i in enumerate(self._positions) if self._flat[i])

    def __len__(self) -> int:
        return sum(1 for i in self._positions if self._flat[i])

    def __repr__(self) -> str:
        return repr(dict(self.items()))


class GroupedState(list):  # type: ignore[type-arg]
    """``self.state`` of a classic optimizer: one :class:`GroupState` per param group."""

    def __init__(self, flat: list[dict[str, Any]], positions: Sequence[Sequence[int]]) -> None:
        super().__init__(GroupState(flat, pos) for pos in positions)


class ClassicMode:
    """How an optimizer that overrides ``_update`` lays out its groups and state and steps."""

    def hyperparameters(
        self, declared: tuple[str, ...], groups: Sequence[Mapping[str, Any]]
    ) -> tuple[str, ...]:
        if declared:
            return declared
        # The original lets _update read, and override set, any group key.
        keys = {k: None for g in groups for k in g if k != "params"}
        return tuple(k for k in keys if k not in IGNORED_OPTIONS)

    def group_params(self, positions: list[int]) -> list[Any]:
        # _update sees the fast weights here, filled in before each call.
        return [None] * len(positions)

    def import_state(self, opt: Any, state: Mapping[str, Any], device: Device) -> dict[str, Any]:
        # Verbatim, as the original keeps it (a tensor step stays one).
        return map_tensors(lambda t: t.detach().to(device, copy=True), dict(state))

    def state_view(self, flat: list[dict[str, Any]], positions: list[list[int]]) -> Any:
        return GroupedState(flat, positions)

    def detach_groups(self, opt: Any) -> None:
        # The groups still hold the last step's weights and their graph.
        for group in opt.param_groups:
            params = group["params"]
            params[:] = [detach_leaf(p) if isinstance(p, Tensor) else p for p in params]

    def update(self, opt: Any, current: list[Tensor], grads: list[Tensor | None]) -> list[Tensor]:
        """One classic step: fills the groups with ``current``, calls ``_update``, reads them back.

        Returns the new weights, one per parameter; parameters in no group, and
        those ``_update`` leaves alone, keep their current value.
        """
        name = type(opt).__name__
        all_positions = opt._group_positions
        grouped: list[list[Tensor | None]] = []
        for gi, (group, positions) in enumerate(zip(opt.param_groups, all_positions)):
            params = _group_params(name, group, gi, len(positions))
            for j, i in enumerate(positions):
                params[j] = current[i]
            grouped.append([grads[i] for i in positions])
        opt._update(grouped)
        new_params = list(current)
        for gi, (group, positions) in enumerate(zip(opt.param_groups, all_positions)):
            params = _group_params(name, group, gi, len(positions))
            for j, i in enumerate(positions):
                p = params[j]
                if not isinstance(p, Tensor) or p.shape != current[i].shape:
                    got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                    raise ValueError(
                        f"{name}._update left param_groups[{gi}]['params'][{j}] as {got}; "
                        f"expected a tensor of shape {tuple(current[i].shape)}"
                    )
                new_params[i] = p
        return new_params

    def apply_override(self, opt: Any, override: Mapping[str, Any]) -> None:
        """The original's ``override``: each value is assigned into the groups as it is.

        A list or tuple gives one value per param group (or one for all); any
        other value (a number, a tensor) is used for every group.
        """
        n = len(opt.param_groups)
        before = [dict(group) for group in opt.param_groups]
        for key, value in override.items():
            check_known(opt, key, " (declare others in the class attribute `hyperparameters`)")
            values = per_group(key, value, n, lambda v: not isinstance(v, (list, tuple)))
            for group, v in zip(opt.param_groups, values):
                check_value(key, v)
                group[key] = v
        check_groups(opt.param_groups, before)


def _group_params(name: str, group: Mapping[str, Any], gi: int, size: int) -> list[Any]:
    params = group.get("params")
    if not isinstance(params, list) or len(params) != size:
        raise ValueError(
            f"{name}: param_groups[{gi}]['params'] must stay a list of {size} entries "
            "(assign group['params'][p_idx] = new_p instead of replacing the list)"
        )
    return params


# -- the original's helpers for NaN-safe square roots -----------------------------
def _get_mask_closure(mask: Tensor) -> Callable[[Tensor], Tensor]:
    """A gradient hook that zeroes the entries of a gradient where ``mask`` is True.

    The original ``higher``'s helper, kept for optimizers written against it:
    register it on the input of a ``sqrt`` whose argument can be 0 (a second
    moment) so the infinite derivative there does not turn a meta-gradient
    into NaN. The hook re-registers itself on gradients that require grad, so
    higher-order gradients are masked too. New code can call
    :func:`higher.optim.safe_sqrt` instead, which needs no hook.

    Example:
        >>> x = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> _ = x.register_hook(_get_mask_closure(x == 0))
        >>> x.sqrt().sum().backward()
        >>> x.grad.tolist()
        [0.0, 0.25]
    """

    def hook(grad: Tensor) -> Tensor:
        masked = grad.masked_fill(mask, 0)
        if masked.requires_grad:
            masked.register_hook(_get_mask_closure(mask))
        return masked

    return hook


def _maybe_mask(tensor: Tensor, mask: Tensor) -> None:
    """Registers :func:`_get_mask_closure` on ``tensor`` when it requires grad.

    Example:
        >>> v = torch.zeros(2, requires_grad=True)
        >>> _maybe_mask(v, v == 0)
    """
    if tensor.requires_grad:
        tensor.register_hook(_get_mask_closure(mask))
