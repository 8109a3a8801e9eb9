"""learn2learn's ``algorithms``: MAML, Meta-SGD and GBML as thin layers over higher.

A learner wraps a model. ``learner.clone()`` returns a learner whose ``.module``
is a patched copy running on fast weights
(:func:`~higher.learn2learn.utils.clone_module`: :func:`higher.monkeypatch`
with ``copy_initial_weights=False``, buffers shared), and ``clone.adapt(loss)``
takes one differentiable step of higher's SGD (:class:`higher.optim.DifferentiableSGD`,
per-parameter learning rates for Meta-SGD), so a loss of the adapted clone
backpropagates into the model's ``.grad``. Long adaptations can be checkpointed
with ``clone(checkpoint=...)`` (:mod:`higher.checkpoint`): steps taken as
``adapt(closure)`` keep no activations. Bad input is refused before anything
changes: ``adapt`` on a learner that was not cloned (learn2learn would turn the
model's parameters into non-leaf tensors, which its meta-optimizer no longer
updates), a parameter the loss does not use (without ``allow_unused``), a
frozen one (without ``allow_nograd``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import checkpoint as _checkpoint
from .. import optim as _optim
from .._patched import wrapped_module
from ._paths import missing
from ._refused import LIGHTNING, refuse
from .optim import DifferentiableSGD, ParameterUpdate, check_nograd, check_unused, sgd_step
from .utils import (
    check_lengths,
    check_tree,
    clone_module,
    clone_with,
    is_clone,
    update_module,
)

__all__ = ["GBML", "MAML", "BaseLearner", "MetaSGD", "maml_update", "meta_sgd_update"]

# learn2learn's module paths below this one (``algorithms.*``) are made by ``_paths``.
__path__: list[str] = []

Loss = Tensor | Callable[[], Tensor]
Checkpoint = bool | int


class _Root:
    """What a learner and all its clones share: the wrapped model's parameters and names,
    the ``torch.optim.SGD`` that the clones' differentiable optimizers mirror, and those
    optimizers."""

    def __init__(self, model: nn.Module, lr: Any) -> None:
        named = list(wrapped_module(model).named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # A clone whose lr is this one's needs no override (whose checks cost a little).
        self.lr = float(lr) if _is_number(lr) else 0.0
        self.sgd = torch.optim.SGD(self.params, lr=self.lr) if self.params else None
        self.shared: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def optimizer(self, fmodule: Any, first_order: bool, lr: Any, key: tuple[Any, ...]) -> Any:
        """A differentiable SGD with learning rate ``lr`` (identified by ``key``).

        Without ``fmodule`` it is shared by every clone that steps with the same
        ``lr`` and is handed their weights at each step: building one per clone
        would cost a tenth of a small model's inner step. SGD without momentum
        keeps no state, so nothing passes from one clone to another.
        """
        full_key = (first_order, *key)
        if fmodule is None:
            entry = self.shared.get(full_key)
            if entry is not None:
                return entry[0]
        if self.sgd is None:
            raise RuntimeError("a model without parameters has no optimizer")
        override = None if _is_number(lr) and lr == self.lr else {"lr": lr}
        diffopt = _optim.DifferentiableSGD(
            self.sgd, self.params, fmodel=fmodule, override=override, first_order=first_order
        )
        if fmodule is None:
            if len(self.shared) >= 8:  # learning rates replaced again and again: start over
                self.shared.clear()
            self.shared[full_key] = (diffopt, lr)  # lr: its key's ids stay valid
        return diffopt


# nn.Module's containers that a clone of a learner copies; the others (hooks) start empty.
_COPIED = frozenset({"_parameters", "_buffers", "_non_persistent_buffers_set"})
_CONTAINERS = (dict, OrderedDict, set, list)


class BaseLearner(nn.Module):
    """The base of MAML, MetaSGD and GBML: a module that wraps ``module``.

    Calling the learner calls ``module``, and attributes the learner lacks are
    read from ``module``, as in learn2learn. The subclasses add ``clone()`` and
    ``adapt()``.

    Args:
        module: the wrapped module, ``self.module``.

    Example:
        >>> learner = BaseLearner(nn.Linear(2, 1))
        >>> learner.in_features, learner(torch.ones(3, 2)).shape
        (2, torch.Size([3, 1]))
    """

    module: Any

    def __init__(self, module: Any = None) -> None:
        super().__init__()
        self.module = module
        self._root: _Root | None = None
        self._cloned = False
        self._checkpoint: Checkpoint = False
        # A checkpointed clone's own optimizer per first_order setting: (it, key, lr).
        self._diffopts: dict[bool, tuple[Any, tuple[Any, ...], Any]] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Calls ``self.module`` with the same arguments."""
        module: Any = self._modules["module"]
        return module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if modules is None or "module" not in modules:
                raise
            return getattr(modules["module"], name)

    # -- clones ------------------------------------------------------------------
    def _shared_root(self) -> _Root:
        if self._root is None:
            self._root = _Root(self.module, self.__dict__.get("lr"))
        return self._root

    def _spawn(self, module: Any, checkpoint: Checkpoint | None, **attrs: Any) -> Any:
        """A clone of this learner around ``module`` (a clone of ``self.module``).

        It is what ``type(self)(module, ...)`` builds, without running
        ``nn.Module.__init__`` and its attribute checks again: one clone is made
        per task, and that cost would be a tenth of a small model's inner step.
        """
        cls = type(self)
        new = cls.__new__(cls)
        state = new.__dict__
        for key, value in self.__dict__.items():
            kind = type(value)
            if key in _COPIED:
                state[key] = kind(value)
            elif kind in _CONTAINERS:
                state[key] = kind()  # hooks and caches start empty, as in a new learner
            else:
                state[key] = value
        state["_modules"]["module"] = module
        root = self._shared_root()
        if not self._cloned and len(module.fast_params) != len(root.params):
            # The model gained or lost parameters since the first clone.
            self._root = root = _Root(self.module, self.__dict__.get("lr"))
        state["_root"] = root
        state["_cloned"] = True
        state["_checkpoint"] = self._checkpoint if checkpoint is None else _segments(checkpoint)
        state.update(attrs)
        return new

    def _require_clone(self, caller: str) -> None:
        if not self._cloned:
            name = type(self).__name__
            raise RuntimeError(
                f"{name}.{caller}: this {name} wraps the model itself, whose parameters must "
                f"stay leaves for the meta-optimizer. clone() first: learner = "
                f"{name.lower()}.clone(); learner.{caller}(loss). (learn2learn adapted the model "
                "in place, silently cutting its parameters from the meta-optimizer.)"
            )

    def _step(
        self,
        loss: Loss,
        first_order: bool,
        allow_unused: bool,
        allow_nograd: bool,
        lr: Any,
        key: tuple[Any, ...],
        caller: str,
    ) -> None:
        """One differentiable SGD step of the clone's fast weights on ``loss``.

        ``lr`` is a learning rate or ``[[one per parameter]]`` (Meta-SGD), ``key``
        the ids of its tensors or number: the step reuses an optimizer built for
        the same key.
        """
        # One step per task and inner step: the common path reads what it needs once.
        root = self._root
        if not self._cloned or root is None:
            self._require_clone(caller)
            root = self._shared_root()
        fmodule: Any = self._modules["module"]
        check_tree(fmodule, caller)
        fast = fmodule.fast_params
        if not allow_nograd:
            check_nograd(fast, root.names, False, caller)
        if not root.params:
            return
        callback = None
        if not allow_unused:
            names = root.names

            def callback(grads: list[Tensor | None]) -> list[Tensor | None]:
                check_unused(grads, fmodule.fast_params, names, caller)
                return grads

        if not self._checkpoint and _plain(fmodule):
            diffopt = root.optimizer(None, first_order, lr, key)
            if isinstance(loss, Tensor) and len(fast) == len(root.params):
                # step() without its checks of the weights: they are the clone's own,
                # of the shapes the optimizer was built for.
                new = diffopt._advance(loss, fast, callback)
            else:
                new = diffopt.step(loss, params=fast, grad_callback=callback)
            # The optimizer's own output has the weights' number and shapes: set unchecked.
            fmodule._higher_set_fast_params(new)
            return
        # A checkpointing optimizer replays steps on its own patched module, from the
        # weights its history holds: weights written into the slots by hand since the
        # last step would not be replayed, so the meta-gradient would be wrong.
        history = fmodule._higher_history
        if history and any(a is not b for a, b in zip(fast, history[-1])):
            raise RuntimeError(
                f"{type(self).__name__}.{caller}: this clone was made with checkpoint=..., and "
                "its weights were changed outside adapt() (written into _parameters, "
                "update_module, maml_update); a checkpointed replay would not redo that change. "
                "Make the clone without checkpoint to update its weights by hand"
            )
        entry = self._diffopts.get(first_order)
        if entry is None or entry[1] != key:
            diffopt = root.optimizer(fmodule, first_order, lr, key)
            if self._checkpoint:
                _checkpoint.enable(diffopt, self._checkpoint)
            # The optimizer marks the module first-order for good; the clone's own
            # setting decides which kernels its forwards use.
            fmodule._higher_configure(first_order=self._forward_first_order())
            self._diffopts[first_order] = entry = (diffopt, key, lr)
        entry[0].step(loss, grad_callback=callback)

    def _forward_first_order(self) -> bool:
        return bool(self.first_order)


def _plain(fmodule: Any) -> bool:
    """Whether a patched module's optimizer needs nothing from it but its weights (it is
    not sharded, :mod:`higher.fsdp`)."""
    return fmodule._higher_backward_context is None and fmodule._higher_local_hyper is None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _segments(checkpoint: Any) -> Checkpoint:
    if isinstance(checkpoint, bool) or (isinstance(checkpoint, int) and checkpoint >= 1):
        return checkpoint
    raise ValueError(
        f"checkpoint must be a bool or a positive number of adapt() steps per recomputed "
        f"segment, got {checkpoint!r}"
    )


class MAML(BaseLearner):
    """Model-Agnostic Meta-Learning: ``clone()`` a model, ``adapt()`` it with SGD steps.

    Args:
        model: the module to meta-learn (any module higher patches). It is
            ``self.module``; its parameters are what the meta-optimizer updates.
        lr: the adaptation learning rate; a tensor that requires grad is learned.
        first_order: first-order MAML: adaptation steps drop the second-order terms.
        allow_unused: let ``adapt`` leave unchanged a parameter the loss does
            not depend on; by default as ``allow_nograd``.
        allow_nograd: let ``adapt`` leave frozen parameters (``requires_grad=False``)
            unchanged.
        checkpoint: checkpoint the clones' ``adapt(closure)`` steps (see :meth:`clone`).

    Example:
        >>> maml = MAML(nn.Linear(2, 1), lr=0.1)
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> learner = maml.clone()
        >>> learner.adapt(nn.functional.mse_loss(learner(x), y))
        >>> nn.functional.mse_loss(learner(x), y).backward()
        >>> maml.module.weight.grad.shape
        torch.Size([1, 2])
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float | Tensor,
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
        checkpoint: Checkpoint = False,
    ) -> None:
        super().__init__(model)
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused
        self._checkpoint = _segments(checkpoint)

    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> MAML:
        """A learner on a patched copy of ``self.module``, to adapt.

        Its weights start as this learner's (the model's parameters, or a
        clone's adapted weights), so its losses backpropagate into them.
        Arguments left None are this learner's.

        Args:
            first_order: as in :class:`MAML`.
            allow_unused: as in :class:`MAML`.
            allow_nograd: as in :class:`MAML`.
            checkpoint: ``True``, or a number of steps per segment: the clone's
                steps taken as ``adapt(closure)``, where ``closure()`` computes
                the loss, keep none of their activations; the backward
                recomputes them one segment at a time, with identical gradients
                (:mod:`higher.checkpoint`). About ``sqrt(steps)`` per segment
                balances memory and time. ``False`` turns it off.

        Example:
            >>> maml = MAML(nn.Linear(2, 1), lr=0.1)
            >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
            >>> learner = maml.clone(checkpoint=True)
            >>> for _ in range(4):
            ...     learner.adapt(lambda: nn.functional.mse_loss(learner(x), y))
            >>> nn.functional.mse_loss(learner(x), y).backward()
            >>> maml.module.bias.grad is not None
            True
        """
        fo = self.first_order if first_order is None else first_order
        return self._spawn(
            clone_with(self._modules["module"], first_order=fo),  # type: ignore[arg-type]
            checkpoint,
            first_order=fo,
            allow_unused=self.allow_unused if allow_unused is None else allow_unused,
            allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd,
        )

    def adapt(
        self,
        loss: Loss,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> None:
        """Takes one SGD step on ``loss``: each weight becomes ``p - lr * dloss/dp``.

        Args:
            loss: the adaptation loss, computed with this clone; or a function
                that computes it (checkpointed when the clone was made with
                ``checkpoint``).
            first_order: as in :class:`MAML`; this learner's when None.
            allow_unused: as in :class:`MAML`; this learner's when None.
            allow_nograd: as in :class:`MAML`; this learner's when None.

        Raises:
            RuntimeError: this learner was not made by :meth:`clone`.
            ValueError: a parameter is frozen (without ``allow_nograd``) or
                unused by ``loss`` (without ``allow_unused``); the weights are
                left as they were.
        """
        lr = self.lr
        self._step(
            loss,
            self.first_order if first_order is None else first_order,
            self.allow_unused if allow_unused is None else allow_unused,
            self.allow_nograd if allow_nograd is None else allow_nograd,
            lr,
            (id(lr),),
            "adapt",
        )


class MetaSGD(MAML):
    """Meta-SGD: MAML with a learned learning rate for every weight.

    Args:
        model: the module to meta-learn.
        lr: the initial value of every learning rate.
        first_order: first-order adaptation steps.
        lrs: the learning rates, one tensor of each parameter's shape (in
            ``model.parameters()`` order); by default
            ``nn.ParameterList`` of ``lr``-filled tensors, meta-learned with the
            model (``self.parameters()`` holds both).
        checkpoint: checkpoint the clones' ``adapt(closure)`` steps (see
            :meth:`MAML.clone`).

    Raises:
        ValueError: ``lrs`` has another length than the parameters, or a
            learning rate another shape than its parameter.

    Example:
        >>> meta = MetaSGD(nn.Linear(2, 1), lr=0.1)
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> learner = meta.clone()
        >>> learner.adapt(nn.functional.mse_loss(learner(x), y))
        >>> nn.functional.mse_loss(learner(x), y).backward()
        >>> meta.lrs[0].grad.shape
        torch.Size([1, 2])
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        first_order: bool = False,
        lrs: Sequence[Tensor] | None = None,
        checkpoint: Checkpoint = False,
    ) -> None:
        super().__init__(model, lr, first_order=first_order, checkpoint=checkpoint)
        params = list(wrapped_module(model).named_parameters())
        self.lrs: Sequence[Tensor]
        if lrs is None:
            self.lrs = nn.ParameterList(  # type: ignore[assignment]
                [nn.Parameter(torch.ones_like(p) * lr) for _, p in params]
            )
        else:
            _check_lrs(lrs, params)
            self.lrs = lrs

    def clone(  # type: ignore[override]
        self, first_order: bool | None = None, checkpoint: Checkpoint | None = None
    ) -> MetaSGD:
        """A learner on a patched copy of ``self.module``, with the same learning rates.

        Args:
            first_order: as in :class:`MetaSGD`; this learner's when None.
            checkpoint: as in :meth:`MAML.clone`.
        """
        fo = self.first_order if first_order is None else first_order
        module: Any = self._modules["module"]
        clone = self._spawn(clone_with(module, first_order=fo), checkpoint, first_order=fo)
        # The clone reads the same learning-rate tensors, so their gradients reach them.
        clone.__dict__["lrs"] = list(self.lrs)
        return clone

    def adapt(  # type: ignore[override]
        self, loss: Loss, first_order: bool | None = None
    ) -> None:
        """Takes one step on ``loss``: each weight becomes ``p - lr_p * dloss/dp``.

        Args:
            loss: as in :meth:`MAML.adapt`.
            first_order: as in :class:`MetaSGD`; this learner's when None.

        Raises:
            RuntimeError: this learner was not made by :meth:`clone`.
            ValueError: a parameter is frozen or unused by ``loss``; the
                weights are left as they were.
        """
        lrs = list(self.lrs)
        fo = self.first_order if first_order is None else first_order
        self._step(loss, fo, False, False, [lrs], tuple(id(t) for t in lrs), "adapt")


def _check_lrs(lrs: Sequence[Tensor], params: Sequence[tuple[str, Tensor]]) -> None:
    if len(lrs) != len(params):
        raise ValueError(
            f"MetaSGD: lrs has {len(lrs)} learning rates, the model {len(params)} parameters; "
            "give one tensor per parameter, in model.parameters() order"
        )
    for i, (lr, (name, p)) in enumerate(zip(lrs, params)):
        if not isinstance(lr, Tensor) or lr.shape != p.shape:
            got = tuple(lr.shape) if isinstance(lr, Tensor) else type(lr).__name__
            raise ValueError(
                f"MetaSGD: lrs[{i}] has shape {got}, parameter '{name}' {tuple(p.shape)}; "
                f"each learning rate must have its parameter's shape (e.g. "
                f"torch.full_like(p, lr))"
            )


class GBML(BaseLearner):
    """Gradient-based meta-learning with a learned transform of the gradients.

    An adaptation step is ``p <- p - lr * T_p(dloss/dp)``, where ``T_p`` is the
    module ``transform(p)`` returned (``ParameterUpdate``), e.g. a
    :class:`~higher.learn2learn.optim.MetaCurvatureTransform`: the transforms
    are meta-learned with the model.

    Args:
        module: the module to meta-learn.
        transform: called on each parameter; returns the ``nn.Module`` that maps
            its gradient to its update, or None (the gradient itself).
        lr: the adaptation learning rate.
        adapt_transform: also adapt the transforms, by an SGD step on the loss
            of each ``adapt`` after the first.
        first_order: first-order adaptation steps.
        allow_unused: let ``adapt`` leave unchanged a parameter the loss does
            not depend on.
        allow_nograd: let ``adapt`` leave frozen parameters unchanged.
        **kwargs: ``compute_update``, a ``ParameterUpdate`` to use instead of
            building one (as ``clone`` does).

    Example:
        >>> from higher.learn2learn.optim import MetaCurvatureTransform
        >>> gbml = GBML(nn.Linear(2, 1), MetaCurvatureTransform, lr=0.1)
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> learner = gbml.clone()
        >>> learner.adapt(nn.functional.mse_loss(learner(x), y))
        >>> nn.functional.mse_loss(learner(x), y).backward()
        >>> [p.grad is not None for p in gbml.compute_update.parameters()]
        [True, True, True]
    """

    def __init__(
        self,
        module: nn.Module,
        transform: Callable[[Tensor], Any],
        lr: float | Tensor = 1.0,
        adapt_transform: bool = False,
        first_order: bool = False,
        allow_unused: bool = False,
        allow_nograd: bool = False,
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - {"compute_update"}
        if unknown:
            raise TypeError(f"GBML got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        super().__init__(module)
        self.transform = transform
        self.adapt_transform = adapt_transform
        self.lr = lr
        self.first_order = first_order
        self.allow_unused = allow_unused
        self.allow_nograd = allow_nograd
        compute_update = kwargs.get("compute_update")
        if compute_update is None:
            params = wrapped_module(module).parameters()
            compute_update = ParameterUpdate(parameters=params, transform=transform)
        self.compute_update = compute_update
        self.diff_sgd = DifferentiableSGD(lr=self.lr)
        # Whether an adaptation step was taken with the current transforms, so that
        # the loss now depends on them (adapt_transform then steps them first).
        self._params_updated = False

    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
        adapt_transform: bool | None = None,
    ) -> GBML:
        """A learner on patched copies of ``self.module`` and of the transforms.

        Arguments left None are this learner's.
        """
        fo = self.first_order if first_order is None else first_order
        at = self.adapt_transform if adapt_transform is None else adapt_transform
        clone = GBML(
            module=clone_with(self.module, first_order=fo and not at),
            transform=self.transform,
            lr=self.lr,
            adapt_transform=at,
            first_order=fo,
            allow_unused=self.allow_unused if allow_unused is None else allow_unused,
            allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd,
            compute_update=clone_module(self.compute_update),
        )
        clone._root = self._shared_root()
        clone._cloned = True
        return clone

    def adapt(
        self,
        loss: Tensor,
        first_order: bool | None = None,
        allow_nograd: bool | None = None,
        allow_unused: bool | None = None,
    ) -> None:
        """Takes one step on ``loss``: ``p <- p - lr * T_p(dloss/dp)``.

        With ``adapt_transform``, from the second step on the transforms first
        take an SGD step on ``loss`` (which depends on them through the
        previous step), then transform this step's gradients.

        Args:
            loss: the adaptation loss, computed with this clone.
            first_order: as in :class:`GBML`; this learner's when None.
            allow_nograd: as in :class:`GBML`; this learner's when None.
            allow_unused: as in :class:`GBML`; this learner's when None.

        Raises:
            RuntimeError: this learner was not made by :meth:`clone`.
            ValueError: a parameter is frozen or unused (without the option that
                allows it); the weights and transforms are left as they were.
        """
        self._require_clone("adapt")
        fo = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        names = self._shared_root().names
        check_tree(self.module, "GBML.adapt")
        check_nograd(self.module.fast_params, names, allow_nograd, "GBML.adapt")
        update: Any = self.compute_update
        before = update.fast_params if is_clone(update) else None
        if self.adapt_transform and self._params_updated:
            tparams = list(update.parameters())
            tgrads = torch.autograd.grad(
                loss, tparams, create_graph=not fo, retain_graph=True, allow_unused=allow_unused
            )
            self.diff_sgd(update, tgrads)
        try:
            params = self.module.fast_params
            grads = torch.autograd.grad(
                loss,
                [p for p in params if p.requires_grad],
                create_graph=not fo or self.adapt_transform,
                retain_graph=not fo or self.adapt_transform,
                allow_unused=True,
            )
            found = iter(grads)
            full = [next(found) if p.requires_grad else None for p in params]
            if not allow_unused:
                check_unused(full, params, names, "GBML.adapt")
            updates = (
                update.transform_gradients(full)
                if isinstance(update, ParameterUpdate)
                else update(loss, params, create_graph=not fo or self.adapt_transform)
            )
        except BaseException:
            if before is not None:
                update.update_params(before)  # the transforms' step is undone
            raise
        diff_sgd: Any = self.diff_sgd
        diff_sgd(self.module, updates)
        self._params_updated = True

    def _forward_first_order(self) -> bool:
        return bool(self.first_order and not self.adapt_transform)


def maml_update(
    model: Any, lr: float | Tensor, grads: Sequence[Tensor | None] | None = None
) -> Any:
    """One MAML step on a module's weights: ``p <- p - lr * g`` (higher's SGD rule).

    Args:
        model: a clone (:func:`~higher.learn2learn.utils.clone_module`), a
            learner, or any module (a ``deepcopy`` of a policy), whose
            ``_parameters`` slots receive the new weights, as in learn2learn.
        lr: the learning rate.
        grads: one gradient (or None: unchanged) per weight; when None, the
            weights' ``update`` attributes are applied
            (:func:`~higher.learn2learn.utils.update_module`).

    Returns:
        ``model``.

    Raises:
        ValueError: ``grads`` has another length than the weights.

    Example:
        >>> from higher.learn2learn.utils import clone_module
        >>> clone = clone_module(nn.Linear(2, 1))
        >>> grads = torch.autograd.grad(clone(torch.ones(1, 2)).sum(), list(clone.parameters()))
        >>> maml_update(clone, 0.5, grads).bias.grad_fn is not None
        True
    """
    if grads is None:
        return update_module(model)
    grads = list(grads)
    current = list(model.parameters())
    check_lengths("maml_update", "grads", grads, current)
    sgd_step(model, grads, lr, current)
    return model


def meta_sgd_update(
    model: Any, lrs: Sequence[Tensor] | None = None, grads: Sequence[Tensor | None] | None = None
) -> Any:
    """One Meta-SGD step on a clone's weights: ``p <- p - lr_p * g_p``.

    Args:
        model: a clone.
        lrs: one learning-rate tensor per weight.
        grads: one gradient (or None: unchanged) per weight.

    Returns:
        ``model`` (unchanged when ``lrs`` or ``grads`` is None, as in learn2learn).

    Example:
        >>> from higher.learn2learn.utils import clone_module
        >>> clone = clone_module(nn.Linear(2, 1))
        >>> grads = torch.autograd.grad(clone(torch.ones(1, 2)).sum(), list(clone.parameters()))
        >>> lrs = [torch.full((1, 2), 0.1), torch.full((1,), 0.2)]
        >>> meta_sgd_update(clone, lrs, grads).bias.grad_fn is not None
        True
    """
    if lrs is None or grads is None:
        return model
    current = list(model.parameters())
    lrs, grads = list(lrs), list(grads)
    check_lengths("meta_sgd_update", "lrs", lrs, current)
    check_lengths("meta_sgd_update", "grads", grads, current)
    sgd_step(model, grads, lrs, current)
    return model


# learn2learn 0.2.0 names that are out of scope here, with what to use instead.
_REFUSED = {
    "LightningEpisodicModule",
    "LightningMAML",
    "LightningANIL",
    "LightningPrototypicalNetworks",
    "LightningMetaOptNet",
}


def __getattr__(name: str) -> Any:
    if name in _REFUSED:
        refuse("learn2learn.algorithms", name, LIGHTNING)
    return missing(__name__, name)
