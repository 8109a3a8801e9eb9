"""learn2learn's ``optim``: learned update transforms, on clones' fast weights.

:class:`ParameterUpdate` turns a loss's gradients into updates through one
learnable transform per parameter (:class:`ModuleTransform`,
:class:`KroneckerTransform`, :class:`MetaCurvatureTransform`);
:class:`DifferentiableSGD` applies updates to a clone with higher's SGD rule
(:func:`higher.optim.sgd_update`), and :class:`LearnableOptimizer` steps a
clone's weights with a learned transform of their gradients, so that the next
loss backpropagates into the transform. ``GBML``
(:mod:`higher.learn2learn.algorithms`) combines the first two. Updates apply
to clones (:func:`~higher.learn2learn.utils.clone_module`), never to an
ordinary module's parameters, which must stay leaves for its optimizer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...optim import sgd_update
from .._paths import missing
from ..utils import check_lengths, write_params
from . import transforms
from .transforms import (
    KroneckerTransform,
    MetaCurvatureTransform,
    ModuleTransform,
    ReshapedTransform,
    TransformDictionary,
)

__all__ = [
    "DifferentiableSGD",
    "KroneckerTransform",
    "LearnableOptimizer",
    "MetaCurvatureTransform",
    "ModuleTransform",
    "ParameterUpdate",
    "ReshapedTransform",
    "TransformDictionary",
    "transforms",
]


def sgd_step(
    module: Any, updates: Sequence[Tensor | None], lr: Any, current: Sequence[Tensor]
) -> None:
    """``p <- p - lr * u`` on a module's weights ``current`` (its ``parameters()``), with
    higher's SGD rule; ``lr`` is one learning rate, or a list with one per weight (Meta-SGD)."""
    lrs = lr if isinstance(lr, list) else [lr] * len(current)
    new = [
        p if u is None else sgd_update(p, u, {}, lr=r)[0] for p, u, r in zip(current, updates, lrs)
    ]
    write_params(module, current, new)


def read_grad(p: Tensor) -> Tensor | None:
    """``p.grad``, as learn2learn reads it: also on a non-leaf tensor, where only a
    gradient set by hand (``p.grad = g``, as MAML++ does) or retained is found, and
    torch's warning about reading it is silenced."""
    if p.is_leaf or p.retains_grad:
        return p.grad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return p.grad


class DifferentiableSGD(nn.Module):
    """Takes ``p <- p - lr * g`` on a clone's weights, differentiably.

    Args:
        lr: the learning rate; a tensor that requires grad is learned.

    Example:
        >>> from higher.learn2learn.utils import clone_module
        >>> clone = clone_module(nn.Linear(2, 1))
        >>> loss = clone(torch.ones(1, 2)).sum()
        >>> DifferentiableSGD(lr=0.1)(clone, torch.autograd.grad(loss, list(clone.parameters())))
        >>> clone.bias.grad_fn is not None
        True
    """

    def __init__(self, lr: float | Tensor) -> None:
        super().__init__()
        self.lr = lr

    def forward(self, module: Any, gradients: Sequence[Tensor | None] | None = None) -> None:
        """Updates ``module`` (a clone) with ``gradients`` (their ``.grad`` when None).

        Raises:
            ValueError: ``gradients`` has another length than the weights.
        """
        current = list(module.parameters())
        if gradients is None:
            gradients = [read_grad(p) for p in current]
        gradients = list(gradients)
        check_lengths("DifferentiableSGD", "gradients", gradients, current)
        sgd_step(module, gradients, self.lr, current)


class ParameterUpdate(nn.Module):
    """Maps a loss's gradients to updates, one learnable transform per parameter.

    Args:
        parameters: the parameters the updates are for (``model.parameters()``).
        transform: called on each parameter; returns an ``nn.Module`` that maps
            that parameter's gradient to its update, or None for the gradient
            itself.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> update = ParameterUpdate(model.parameters(), ModuleTransform(nn.Linear))
        >>> loss = model(torch.ones(3, 2)).sum()
        >>> [u.shape for u in update(loss, model.parameters())]
        [torch.Size([1, 2]), torch.Size([1])]
    """

    def __init__(self, parameters: Iterable[Tensor], transform: Callable[[Tensor], Any]) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        indices: list[int | None] = []
        for i, p in enumerate(parameters):
            t = transform(p)
            if t is None:
                indices.append(None)
            elif isinstance(t, nn.Module):
                indices.append(len(modules))
                modules.append(t)
            else:
                raise ValueError(
                    f"ParameterUpdate: transform returned a {type(t).__name__} for parameter "
                    f"{i}; it must return an nn.Module or None"
                )
        self.transforms_modules = nn.ModuleList(modules)
        self.transforms_indices = indices

    def forward(
        self,
        loss: Tensor,
        parameters: Iterable[Tensor],
        create_graph: bool = False,
        retain_graph: bool = False,
        allow_unused: bool = False,
        allow_nograd: bool = False,
    ) -> list[Tensor | None]:
        """The transformed gradients of ``loss`` with respect to ``parameters``.

        Args:
            loss: the loss to differentiate.
            parameters: the parameters, in the order given at construction.
            create_graph: keep the graph of the gradients (second order).
            retain_graph: keep the graph of ``loss`` (implied by ``create_graph``).
            allow_unused: an unused parameter gets None instead of an error.
            allow_nograd: a parameter that does not require grad gets None
                instead of an error.

        Raises:
            ValueError: a parameter does not require grad (without
                ``allow_nograd``) or ``loss`` does not depend on it (without
                ``allow_unused``); nothing is computed.
        """
        params = list(parameters)
        grads = gradients(
            loss,
            params,
            [f"parameters[{i}]" for i in range(len(params))],
            create_graph=create_graph,
            retain_graph=retain_graph or create_graph,
            allow_unused=allow_unused,
            allow_nograd=allow_nograd,
            caller="ParameterUpdate",
        )
        return self.transform_gradients(grads)

    def transform_gradients(self, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Each gradient through its parameter's transform (None stays None)."""
        check_lengths("ParameterUpdate", "the gradients", grads, self.transforms_indices)
        out: list[Tensor | None] = []
        for g, t in zip(grads, self.transforms_indices):
            out.append(g if t is None or g is None else self.transforms_modules[t](g))
        return out


def check_nograd(
    params: Sequence[Tensor], names: Sequence[str], allow_nograd: bool, caller: str
) -> None:
    """Refuses a parameter that does not require grad, unless ``allow_nograd``."""
    if allow_nograd:
        return
    for name, p in zip(names, params):
        if not p.requires_grad:
            raise ValueError(
                f"{caller}: parameter '{name}' does not require grad (it is frozen). Pass "
                "allow_nograd=True to leave frozen parameters unchanged, or unfreeze it with "
                "requires_grad_(True)"
            )


def check_unused(
    grads: Sequence[Tensor | None], params: Sequence[Tensor], names: Sequence[str], caller: str
) -> None:
    """Refuses a parameter that requires grad but that the loss does not depend on."""
    for name, p, g in zip(names, params, grads):
        if g is None and p.requires_grad:
            raise ValueError(
                f"{caller}: the loss does not depend on parameter '{name}'. Pass "
                "allow_unused=True to leave unused parameters unchanged"
            )


def gradients(
    loss: Tensor,
    params: Sequence[Tensor],
    names: Sequence[str],
    *,
    create_graph: bool,
    retain_graph: bool,
    allow_unused: bool,
    allow_nograd: bool,
    caller: str,
) -> list[Tensor | None]:
    """``d loss / d params``, None for frozen (``allow_nograd``) and unused parameters."""
    check_nograd(params, names, allow_nograd, caller)
    wanted = [i for i, p in enumerate(params) if p.requires_grad]
    found = torch.autograd.grad(
        loss,
        [params[i] for i in wanted],
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    grads: list[Tensor | None] = [None] * len(params)
    for i, g in zip(wanted, found):
        grads[i] = g
    if not allow_unused:
        check_unused(grads, params, names, caller)
    return grads


class LearnableOptimizer(nn.Module):
    """Steps a model's weights with a learned transform of their gradients.

    After :meth:`step`, each weight is ``p.detach() - lr * transform(p.grad)``:
    the next loss backpropagates into the transforms (whose parameters
    ``parameters()`` returns, for a ``torch.optim`` meta-optimizer) and,
    through ``retain_grad``, gives the weights their next ``.grad``.

    Args:
        model: the module to optimize, ordinary or a clone. After the first
            step its weights are non-leaf tensors (as in learn2learn): build any
            ``torch.optim`` optimizer on ``metaopt.parameters()`` only.
        transform: called on each parameter, returns the ``nn.Module`` that maps
            its gradient to its update (:class:`ModuleTransform`, ...).
        lr: the step size.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> metaopt = LearnableOptimizer(model, ModuleTransform(nn.Linear), lr=0.1)
        >>> model(torch.ones(4, 2)).pow(2).mean().backward()
        >>> metaopt.step()
        >>> model(torch.ones(4, 2)).pow(2).mean().backward()  # reaches the transforms
        >>> all(p.grad is not None for p in metaopt.parameters())
        True
    """

    def __init__(
        self, model: Any, transform: Callable[[Tensor], nn.Module], lr: float = 1.0
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"LearnableOptimizer: model must be an nn.Module, got {type(model).__name__}"
            )
        # Kept out of _modules, so that parameters() are the transforms' only.
        self.info: dict[str, Any] = {"model": model}
        self.transforms = nn.ModuleList([transform(p) for p in model.parameters()])
        self.lr = lr

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        """Updates the model's weights that have a ``.grad``; the others stay as they are."""
        del closure
        model = self.info["model"]
        current = list(model.parameters())
        updates: list[Tensor | None] = []
        for p, transform in zip(current, self.transforms):
            g = read_grad(p)
            updates.append(None if g is None else transform(g.detach()))
        # The step starts from the detached weights: the meta-gradient goes through
        # this one step only, as in learn2learn.
        start = [p if u is None else p.detach() for p, u in zip(current, updates)]
        new = [
            p if u is None else sgd_update(p, u, {}, lr=self.lr)[0] for p, u in zip(start, updates)
        ]
        write_params(model, current, new)
        for p in new:
            if p.requires_grad and not p.is_leaf:
                p.retain_grad()

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zeroes the model's weights' gradients (new zero tensors, as learn2learn does)."""
        del set_to_none
        for p in self.info["model"].parameters():
            if read_grad(p) is not None:
                p.grad = torch.zeros_like(p)


def __getattr__(name: str) -> Any:
    return missing(__name__, name)
