"""learn2learn's ``utils``: cloning, updating and detaching modules, on patched modules.

learn2learn clones a module by copying it with every parameter replaced by
``p.clone()``, and updates a clone by writing ``p + update`` into its parameter
slots. Here :func:`clone_module` returns a patched copy (:func:`higher.monkeypatch`
with ``copy_initial_weights=False``) whose fast weights start as ``p.clone()`` of
the module's parameters, so backpropagating through a clone fills the module's
``.grad``. The clone's parameter slots are its weights, as a learn2learn
clone's ``_parameters`` are: whatever writes them (:func:`update_module`, a
user's update loop) changes what its forward and ``parameters()`` use.
:func:`update_module` and :func:`detach_module` work on any module, as in
learn2learn. Buffers (BatchNorm running statistics) are shared with the module
cloned, as in learn2learn, so a clone's forward in training mode updates them.
:mod:`higher.learn2learn.algorithms` builds ``MAML``, ``MetaSGD`` and ``GBML``
on these functions.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import patch as _patch
from .._patched import _MonkeyPatchBase, _patched_class, wrapped_module
from ._paths import missing

__all__ = [
    "accuracy",
    "clone_distribution",
    "clone_module",
    "clone_named_parameters",
    "clone_parameters",
    "detach_distribution",
    "detach_module",
    "flatten_config",
    "magic_box",
    "update_module",
    "warn_once",
]

# learn2learn's module paths below this one (``utils.*``) are made by ``_paths``.
__path__: list[str] = []

# The ordinary module each clone was patched from, to patch it again for a clone of
# the clone (a patched module cannot be patched itself: its history carries graphs).
_SOURCES: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def is_clone(module: Any) -> bool:
    """Whether ``module`` is a patched module, such as :func:`clone_module` returns.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> is_clone(model), is_clone(clone_module(model))
        (False, True)
    """
    return isinstance(module, _MonkeyPatchBase)


def clone_module(module: Any, memo: Any = None) -> Any:
    """A copy of ``module`` that runs on fast weights and stays differentiable.

    The copy is a patched module (:func:`higher.monkeypatch` with
    ``copy_initial_weights=False``): an instance of ``type(module)`` whose
    weights start as copies (``p.clone()``) of ``module``'s, so a loss computed
    with the copy backpropagates into ``module`` (and, for a clone of a clone,
    through the first clone's updates), while editing the copy in place or its
    weights' ``.grad`` leaves ``module`` alone. Its ``_parameters`` slots are its
    weights. Buffers are shared with ``module``.

    Args:
        module: an ``nn.Module`` (anything else is returned unchanged, as in
            learn2learn), or a clone made by this function.
        memo: accepted for learn2learn's signature and ignored: tied weights
            stay tied in the patched copy.

    Returns:
        The patched copy.

    Raises:
        ValueError: ``module`` is a patched module that this function did not
            make (one from :func:`higher.monkeypatch`), whose original is unknown.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> clone = clone_module(model)
        >>> isinstance(clone, nn.Linear), clone.weight is model.weight
        (True, False)
        >>> clone(torch.ones(1, 2)).sum().backward()
        >>> model.weight.grad
        tensor([[1., 1.]])
    """
    del memo
    if not isinstance(module, nn.Module):
        return module
    return clone_with(module, first_order=False)


def clone_with(module: nn.Module, first_order: bool) -> Any:
    """:func:`clone_module`; ``first_order`` clones run kernels without a double backward."""
    if is_clone(module):
        source = _SOURCES.get(module)
        if source is None:
            raise ValueError(
                f"clone_module: this {type(module).__name__} is a patched module that "
                "clone_module did not make, so the module it copies is unknown; clone the "
                "original module instead"
            )
        start = module.fast_params
        fmodule: Any = _patch.monkeypatch(source, copy_initial_weights=False)
    else:
        source = module
        fmodule = _patch.monkeypatch(module, copy_initial_weights=False)
        start = fmodule.fast_params
    if type(fmodule) is _patched_class(fmodule._higher_base):
        fmodule.__class__ = _patched_class(fmodule._higher_base, _Clone)
    # Only the initial and the current fast weights are kept: a clone's history is
    # never read, and keeping it would hold intermediate weights alive.
    fmodule._higher_configure(history="ends", first_order=first_order)
    # Copies, as learn2learn's: an edit of the clone's weights in place, or of their
    # .grad, never reaches the module, and gradients still flow back to it.
    fmodule.update_params([p.clone() for p in start])
    _share_buffers(module if source is not module else wrapped_module(module), fmodule)
    _SOURCES[fmodule] = source
    return fmodule


class _Clone(_MonkeyPatchBase):
    """A patched module whose weights are what its parameter slots hold, as a
    learn2learn clone's are its ``_parameters``.

    Whatever writes a slot (``clone._parameters[k] = t``, ``setattr`` with a
    parameter, a user's update loop) changes the weights that the next forward,
    ``parameters()``, ``adapt`` and the update functions use.
    """

    @property  # type: ignore[override]
    def fast_params(self) -> list[Tensor] | None:
        """The weights the slots hold now."""
        return self._higher_slot_values() if self._higher_history else None

    @fast_params.setter
    def fast_params(self, value: Any) -> None:
        self.update_params(value)

    def parameters(  # type: ignore[override]
        self, time: int | None = None, recurse: bool = True
    ) -> Any:
        """The tensors the modules' ``_parameters`` hold (``time``: the kept history)."""
        if isinstance(time, bool):
            time, recurse = None, time
        if time is None:
            return nn.Module.parameters(self, recurse)  # type: ignore[arg-type]
        return super().parameters(time, recurse)


def check_tree(fmodule: Any, caller: str) -> None:
    """Refuses a step on a clone whose tree no longer holds the weights it was made with.

    A step advances the weights in the parameter slots the clone was made with. A
    submodule replaced after cloning (``clone.head = nn.Linear(...)``), or a parameter
    registered since, would keep its weights unstepped, where learn2learn steps every
    parameter the tree holds: the numbers would differ, so the step is refused.
    """
    slots = getattr(fmodule, "_higher_slots", None)
    if slots is None:
        return
    made = {(id(m), name) for group in slots for m, name in group}
    held, new = 0, None
    for prefix, m in nn.Module.named_modules(fmodule):
        for name, p in m._parameters.items():
            if p is not None:
                held += 1
                if new is None and (id(m), name) not in made:
                    new = f"{prefix}.{name}" if prefix else name
    if new is None and held == len(made):
        return
    what = (
        f"parameter '{new}' of this clone was not among its weights when it was cloned"
        if new is not None
        else "a weight this clone was made with is no longer in its tree"
    )
    raise ValueError(
        f"{caller}: {what} (a submodule replaced, or a parameter registered or removed, after "
        "clone()): the step would not adapt the clone's parameters as learn2learn does. "
        "Make the change on the model before cloning (model.head = ...; learner = "
        "maml.clone())"
    )


def _share_buffers(inner: nn.Module, fmodule: nn.Module) -> None:
    """Makes ``fmodule`` hold the buffer tensors of ``inner`` (a module or a clone whose
    tree ``fmodule`` copies), as learn2learn's clones do."""
    # Both trees are walked together through their children's dictionaries, which
    # have the same keys (a copy keeps them): named_modules would build every name,
    # and a clone is made per task.
    stack: list[tuple[nn.Module, nn.Module]] = [(inner, fmodule)]
    while stack:
        sub, target = stack.pop()
        if sub._buffers:
            target._buffers.update(sub._buffers)
        children = target._modules
        for key, child in sub._modules.items():
            if child is not None:
                stack.append((child, children[key]))  # type: ignore[arg-type]


def require_clone(module: Any, caller: str) -> None:
    """Refuses an ordinary module where a clone must be updated."""
    if not is_clone(module):
        raise TypeError(
            f"{caller}: `module` is an ordinary {type(module).__name__}, whose parameters "
            "would stop being leaves (its optimizer would no longer update them). Update a "
            "clone instead: clone = l2l.clone_module(module), then pass the clone"
        )


def update_module(
    module: Any, updates: Sequence[Tensor | None] | None = None, memo: Any = None
) -> Any:
    """Adds ``updates`` to a module's weights, differentiably: ``p <- p + u``.

    The new tensors are written into the ``_parameters`` slots that held the
    old ones, as learn2learn does: on a clone (or a learner around one) the
    next forward and ``parameters()`` use them. On an ordinary module (a
    ``deepcopy`` of a policy) its parameters stop being leaves, so a
    ``torch.optim`` optimizer built on them no longer updates them.

    Args:
        module: a clone (:func:`clone_module`), a learner, or any module.
        updates: one tensor (or None: unchanged) per weight, in
            ``module.parameters()`` order. When None, each weight's ``update``
            attribute is used, as in learn2learn.
        memo: accepted for learn2learn's signature and ignored.

    Returns:
        ``module``, whose weights are now the updated ones.

    Raises:
        ValueError: ``updates`` has another length than the weights, or an
            update another shape than its weight.

    Example:
        >>> clone = clone_module(nn.Linear(2, 1))
        >>> _ = update_module(clone, [torch.ones(1, 2), None])
        >>> clone.weight.grad_fn is not None
        True
    """
    del memo
    current = list(module.parameters())
    if updates is None:
        updates = [getattr(p, "update", None) for p in current]
        for p in current:
            if getattr(p, "update", None) is not None:
                p.update = None  # type: ignore[attr-defined]
    updates = list(updates)
    check_lengths("update_module", "updates", updates, current)
    for i, (p, u) in enumerate(zip(current, updates)):
        if u is not None and u.shape != p.shape:
            raise ValueError(
                f"update_module: updates[{i}] has shape {tuple(u.shape)}, its parameter "
                f"{tuple(p.shape)}"
            )
    write_params(module, current, [p if u is None else p + u for p, u in zip(current, updates)])
    return module


def write_params(module: nn.Module, old: Sequence[Tensor], new: Sequence[Tensor]) -> None:
    """Puts ``new[i]`` into every ``_parameters`` slot of ``module``'s tree that holds
    ``old[i]`` (tied weights stay tied). A clone whose slots are its fast weights takes
    them as its next fast weights, keeping its history."""
    if is_clone(module):
        fast = module.fast_params
        if len(fast) == len(old) and all(a is b for a, b in zip(fast, old)):
            module._higher_set_fast_params(list(new))
            return
    replace = {id(p): q for p, q in zip(old, new) if q is not p}
    if not replace:
        return
    for sub in module.modules():
        slots = sub._parameters
        for key, p in slots.items():
            if p is not None and id(p) in replace:
                slots[key] = replace[id(p)]  # type: ignore[assignment]


def check_lengths(caller: str, what: str, values: Sequence[Any], params: Sequence[Any]) -> None:
    """learn2learn prints a warning and drops the extra entries; we refuse."""
    if len(values) != len(params):
        raise ValueError(
            f"{caller}: {what} has {len(values)} entries, the module {len(params)} parameters; "
            "give one per parameter in module.parameters() order (None leaves one unchanged)"
        )


def detach_module(module: Any, keep_requires_grad: bool = False) -> None:
    """Cuts a module's weights and buffers from their autograd history, in place.

    Every tensor in the ``_parameters`` of ``module``'s tree (a clone, a
    learner, any module), and every buffer that requires grad, is detached in
    place, as in learn2learn: other references to it see the cut too. With
    ``keep_requires_grad=False`` (learn2learn's default) they no longer require
    grad, so on an ordinary module (or a learner that was not cloned) its
    parameters are frozen.

    Example:
        >>> clone = update_module(clone_module(nn.Linear(2, 1)), [torch.ones(1, 2), None])
        >>> detach_module(clone, keep_requires_grad=True)
        >>> clone.weight.is_leaf, clone.weight.requires_grad
        (True, True)
    """
    if not isinstance(module, nn.Module):
        return
    for sub in module.modules():
        for p in sub._parameters.values():
            if p is not None:
                p.detach_().requires_grad_(keep_requires_grad)
        for buf in sub._buffers.values():
            if buf is not None and buf.requires_grad:
                buf.detach_().requires_grad_(keep_requires_grad)


def clone_parameters(param_list: Iterable[Tensor]) -> list[Tensor]:
    """``[p.clone() for p in param_list]``: copies that backpropagate into the originals.

    Example:
        >>> p = nn.Parameter(torch.ones(2))
        >>> clone_parameters([p])[0].grad_fn is not None
        True
    """
    return [p.clone() for p in param_list]


def clone_named_parameters(param_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{k: p.clone()}`` for a dict of tensors (``dict(model.named_parameters())``).

    Example:
        >>> sorted(clone_named_parameters(dict(nn.Linear(2, 1).named_parameters())))
        ['bias', 'weight']
    """
    return {k: p.clone() for k, p in param_dict.items()}


def clone_distribution(dist: torch.distributions.Distribution) -> torch.distributions.Distribution:
    """A copy of a distribution whose differentiable tensors still lead to the originals.

    Tensors are ``clone()``'d (those that require grad keep their graph),
    modules cloned with :func:`clone_module`, nested distributions cloned in
    turn; other attributes are deep-copied. (learn2learn deep-copied the whole
    distribution first, which fails on any tensor computed with autograd.)

    Example:
        >>> mu = torch.zeros(2, requires_grad=True)
        >>> copy_ = clone_distribution(torch.distributions.Normal(mu * 2, 1.0))
        >>> copy_.loc.grad_fn is not None
        True
    """
    clone = copy.copy(dist)
    state = clone.__dict__ = dict(dist.__dict__)
    for key, item in dist.__dict__.items():
        if isinstance(item, Tensor):
            state[key] = item.clone()
        elif isinstance(item, nn.Module):
            state[key] = clone_module(item)
        elif isinstance(item, torch.distributions.Distribution):
            state[key] = clone_distribution(item)
        else:
            state[key] = copy.deepcopy(item)
    return clone


def detach_distribution(dist: torch.distributions.Distribution) -> torch.distributions.Distribution:
    """Cuts a distribution's tensors, modules and nested distributions from their graph, in place.

    Returns ``dist``. (learn2learn replaced a module attribute by None.)

    Example:
        >>> mu = torch.zeros(2, requires_grad=True)
        >>> detach_distribution(torch.distributions.Normal(mu * 2, 1.0)).loc.requires_grad
        False
    """
    for key, item in list(dist.__dict__.items()):
        if isinstance(item, Tensor):
            if item.requires_grad:
                dist.__dict__[key] = item.detach()
        elif isinstance(item, nn.Module):
            detach_module(item)
        elif isinstance(item, torch.distributions.Distribution):
            detach_distribution(item)
    return dist


def magic_box(x: Any) -> Any:
    """DiCE's magic box: ``exp(x - stop_gradient(x))``, equal to 1 with the gradient of ``x``.

    A non-tensor is returned unchanged.

    Example:
        >>> x = torch.tensor(0.5, requires_grad=True)
        >>> y = magic_box(x)
        >>> y.item(), torch.autograd.grad(y, x)[0].item()
        (1.0, 1.0)
    """
    if isinstance(x, Tensor):
        return torch.exp(x - x.detach())
    return x


def accuracy(preds: Tensor, targets: Tensor) -> Tensor:
    """The fraction of rows of ``preds`` whose argmax (over dim 1) equals ``targets``.

    Example:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        tensor(0.5000)
    """
    correct = (preds.argmax(dim=1).long() == targets.long()).sum().float()
    return correct / preds.size(0)


def flatten_config(args: Any, prefix: str | None = None) -> dict[str, Any]:
    """A flat dictionary of a nested configuration, with dotted keys.

    Dictionaries, dataclasses and ``argparse.Namespace`` are walked; anything
    else is a value. (learn2learn 0.2.0's version returns None for every value
    and fails on nesting.)

    Args:
        args: the configuration.
        prefix: the key of ``args`` itself, prepended to every key found in it.

    Example:
        >>> flatten_config({"lr": 0.1, "model": {"depth": 4, "act": "relu"}})
        {'lr': 0.1, 'model.depth': 4, 'model.act': 'relu'}
    """
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if dataclasses.is_dataclass(args) and not isinstance(args, type):
        items = [(f.name, getattr(args, f.name)) for f in dataclasses.fields(args)]
    elif isinstance(args, dict):
        items = list(args.items())
    else:
        return {prefix: args}  # type: ignore[dict-item]
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten_config(value, str(key) if prefix is None else f"{prefix}.{key}"))
    return flat


class _WarnOnce:
    """learn2learn's ``warn_once``: each message is shown (or raised) once per process."""

    _CATEGORIES: dict[str, type[Warning]] = {
        "default": UserWarning,
        "deprecation": DeprecationWarning,
    }

    def __init__(self) -> None:
        self.warned_messages: list[str] = []

    def __call__(self, message: str, severity: str | type[Warning] | None = None) -> None:
        """Warns with ``message`` unless it was given before.

        Args:
            message: the text.
            severity: ``"default"`` (UserWarning), ``"deprecation"``, ``"error"``
                (raises RuntimeError), or a warning class.

        Raises:
            RuntimeError: ``severity="error"``.
            ValueError: an unknown severity name.
        """
        if message in self.warned_messages:
            return
        if severity is None:
            severity = "default"
        if severity == "error":
            raise RuntimeError(message)
        if isinstance(severity, str):
            if severity not in self._CATEGORIES:
                raise ValueError(
                    f"warn_once: severity must be 'default', 'deprecation', 'error' or a "
                    f"Warning class, got {severity!r}"
                )
            severity = self._CATEGORIES[severity]
        warnings.warn(message, category=severity, stacklevel=2)
        self.warned_messages.append(message)


#: Shows each message once, as learn2learn's ``warn_once`` does.
#:
#: Example: ``warn_once("lr is large")`` warns; a second call with the same text does not.
warn_once = _WarnOnce()


def __getattr__(name: str) -> Any:
    return missing(__name__, name)
