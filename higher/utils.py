"""Small helpers shared by the patching and optimizer code."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["flatten", "get_func_params", "map_tensors"]

Device = torch.device | str | int | None


def get_func_params(
    module: nn.Module, device: Device = None, safe_copy: bool = True
) -> list[torch.Tensor]:
    """Returns a module's parameters as a list of tensors, ready to be fast weights.

    Args:
        module: the module whose ``parameters()`` to take, in that order.
        device: where to put the tensors; their current device when None.
        safe_copy: copy each parameter into a fresh leaf that keeps its
            ``requires_grad`` flag. When False the parameters themselves are
            returned (moved with a differentiable ``.to`` if ``device`` is given),
            so that gradients flow back into ``module``.

    Returns:
        One tensor per parameter, in ``module.parameters()`` order.

    Example:
        >>> params = get_func_params(nn.Linear(2, 1))
        >>> [tuple(p.shape) for p in params]
        [(1, 2), (1,)]
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"get_func_params expects an nn.Module, got {type(module).__name__}")
    return func_params(module.parameters(), device, safe_copy)


def flatten(x: Any) -> list[Any]:
    """The leaves of a nested structure of dicts, lists, tuples and sets, in order.

    Containers are ``dict`` (its values, in insertion order; keys are dropped),
    ``list``, ``tuple`` and ``set`` (in iteration order, which for a set is not
    something to rely on), and their subclasses (``OrderedDict``, named tuples).
    Everything else, tensors, strings, ``None`` and ``frozenset`` included, is a
    leaf. An empty container contributes nothing. This is the original
    ``higher.utils.flatten``.

    Args:
        x: the structure; a leaf gives a one-element list.

    Returns:
        The leaves, depth first, left to right.

    Example:
        >>> flatten({"lr": 0.1, "betas": (0.9, 0.999), "groups": [[1], {"k": "v"}]})
        [0.1, 0.9, 0.999, 1, 'v']
    """
    out: list[Any] = []
    _flatten_into(x, out)
    return out


def _flatten_into(x: Any, out: list[Any]) -> None:
    if isinstance(x, dict):
        x = x.values()
    elif not isinstance(x, (list, tuple, set)):
        out.append(x)
        return
    for item in x:
        _flatten_into(item, out)


def _recursive_map(target: Any, map_fn: Callable[[Any], Any]) -> Any:
    """``map_fn`` applied to every leaf of a nested structure, containers rebuilt.

    Containers are ``list``, ``tuple`` (named tuples included), ``dict`` and
    ``set``, and their subclasses, each rebuilt as its own type; anything else
    is a leaf. This is the original ``higher.utils._recursive_map``, kept
    because code written for the original (its own tests among it) calls it.

    Example:
        >>> _recursive_map({"betas": (0.9, 0.99), "lr": [0.1]}, lambda x: 2 * x)
        {'betas': (1.8, 1.98), 'lr': [0.2]}
    """
    if isinstance(target, dict):
        return type(target)((k, _recursive_map(v, map_fn)) for k, v in target.items())
    if isinstance(target, tuple) and hasattr(target, "_fields"):  # a named tuple
        return type(target)(*(_recursive_map(v, map_fn) for v in target))
    if isinstance(target, (list, tuple, set)):
        return type(target)(_recursive_map(v, map_fn) for v in target)
    return map_fn(target)


def map_tensors(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """A copy of ``tree`` (nested dicts, lists, tuples, sets) with ``fn`` applied to its tensors.

    Example:
        >>> map_tensors(lambda t: t + 1, {"step": 1, "buf": [torch.zeros(2)]})
        {'step': 1, 'buf': [tensor([1., 1.])]}
    """
    return _recursive_map(tree, lambda x: fn(x) if isinstance(x, torch.Tensor) else x)


def func_params(
    params: Iterable[torch.Tensor], device: Device, safe_copy: bool
) -> list[torch.Tensor]:
    """:func:`get_func_params` for parameters already listed."""
    if safe_copy:
        return [copy_leaf(p, device) for p in params]
    return [p if device is None else p.to(device) for p in params]


def copy_leaf(tensor: torch.Tensor, device: Device = None) -> torch.Tensor:
    """A detached copy of ``tensor`` that is a leaf with the same ``requires_grad``."""
    return tensor.detach().to(device, copy=True).requires_grad_(tensor.requires_grad)


def detach_leaf(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` cut from its history, sharing storage, keeping ``requires_grad``.

    A tensor that does not require grad has no history and is returned as it
    is, so frozen weights keep their identity (and cost nothing) step after step.
    """
    if not tensor.requires_grad:
        return tensor
    return tensor.detach().requires_grad_()


def as_list(params: Iterable[torch.Tensor], what: str) -> list[torch.Tensor]:
    """Materialises ``params`` and checks that every element is a tensor."""
    out = list(params)
    for i, p in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{what}[{i}] must be a torch.Tensor, got {type(p).__name__}")
    return out
