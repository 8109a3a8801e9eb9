"""Small helpers shared by the patching and optimizer code."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

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
    """``tensor`` cut from its history, sharing storage, keeping ``requires_grad``."""
    return tensor.detach().requires_grad_(tensor.requires_grad)


def as_list(params: Iterable[torch.Tensor], what: str) -> list[torch.Tensor]:
    """Materialises ``params`` and checks that every element is a tensor."""
    out = list(params)
    for i, p in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{what}[{i}] must be a torch.Tensor, got {type(p).__name__}")
    return out
