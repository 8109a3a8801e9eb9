"""The bookkeeping shared by every differentiable optimizer.

:class:`DifferentiableOptimizer` holds param groups, per-parameter state and
hyperparameter overrides, takes gradients and loops over parameters. The maths
lives in pure per-tensor update rules, one per optimizer family, of the form
``update(p, g, state, **hyper) -> (new_p, new_state)``. A subclass sets
``update = staticmethod(rule)`` and names the param-group keys the rule takes
in ``hyperparameters``; or, as in the original ``higher``, it overrides
``_update`` and edits its param groups in place (see
:mod:`higher.optim.classic`).

Overrides: ``override`` maps a hyperparameter name to its values (classic
optimizers assign them into the groups as they are, as the original does). A
value may be

* one number or tensor, used for every param group;
* a list with one value per param group (or a single-element list);
* for a group, a :class:`PerParameter` list (or a nested list) with one value
  per parameter of that group, each broadcast against its parameter
  (Meta-SGD's learned per-parameter learning rates).

Tensors that require grad stay in the graph, so their gradients can be taken
through the unrolled updates. Overrides persist until overridden again.

``track_higher_grads=False`` makes every step return detached leaves and keeps
no graph: the inner loop costs what plain training costs. ``first_order=True``
takes inner gradients without building their graph, but keeps the new weights
connected to the old ones through the update's identity path, which yields the
first-order MAML meta-gradient.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import _compat
from ..utils import Device, as_list, detach_leaf
from ._hyper import PerParameter, check_group_options, plain, select
from ._rules import RuleMode
from .classic import ClassicMode

__all__ = ["DifferentiableOptimizer", "PerParameter", "Snapshot"]

GradCallback = Callable[[list[Tensor | None]], list[Tensor | None]]
UpdateRule = Callable[..., tuple[Tensor, dict[str, Any]]]
GroupRule = Callable[..., bool]
#: What ``step(closure)`` hands a closure to: ``runner(opt, closure, params, grad_callback)``.
ClosureRunner = Callable[[Any, Callable[[], Tensor], Any, Any], list[Tensor]]

_RULE_MODE, _CLASSIC_MODE = RuleMode(), ClassicMode()
# The torch optimizers whose twins' inner gradients were checked for operations
# without a double backward.
_CHECKED_FOR: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


@dataclass
class Snapshot:
    """An optimizer's per-parameter state and hyperparameters at one moment.

    What :meth:`DifferentiableOptimizer.snapshot` returns and
    :meth:`~DifferentiableOptimizer.restore` takes. The containers are copies;
    the tensors in them are shared, with their graphs.

    Attributes:
        state: one dict per fast weight (empty before its first update).
        hyper: each param group's entries except ``"params"``.
    """

    state: list[dict[str, Any]]
    hyper: list[dict[str, Any]]


def call_closure(closure: Callable[[], Tensor]) -> Tensor:
    """Calls a step closure and checks that it returned the loss."""
    loss = closure()
    if not isinstance(loss, Tensor):
        raise TypeError(f"the step closure must return the loss tensor, got {type(loss).__name__}")
    return loss


class DifferentiableOptimizer:
    """Base class of the differentiable twins of ``torch.optim`` optimizers.

    Args:
        other: the ``torch.optim`` optimizer to mirror; its param groups,
            hyperparameters and state (a warmed-up optimizer continues where it
            left off) are copied. It is not changed.
        reference_params: the parameters ``other`` optimizes, in the order of
            the fast weights (``model.parameters()`` order).
        fmodel: a patched module whose fast weights ``step`` updates.
        device: where to put copied state; its current device when None.
        override: hyperparameter overrides (see the module docstring).
        grad_callback: called with the list of gradients before each update
            and returns the list to use (e.g. for clipping).
        track_higher_grads: when False, steps return detached leaves and keep
            no graph ("test mode").
        first_order: take inner gradients without ``create_graph`` (first-order
            MAML); the update keeps its identity path to the old weights.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> fmodel = higher.monkeypatch(model, copy_initial_weights=False)
        >>> diffopt = higher.optim.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
        >>> new_params = diffopt.step(fmodel(torch.ones(1, 2)).pow(2).sum())
        >>> new_params[0].grad_fn is not None
        True
    """

    #: The ``torch.optim`` class this optimizer mirrors.
    torch_type: ClassVar[type[torch.optim.Optimizer]]
    #: Hyperparameter names, as keys of torch's param groups.
    hyperparameters: ClassVar[tuple[str, ...]] = ()
    #: Hyperparameters whose value is a pair, such as ``betas``, and the names
    #: of the update rule's two arguments that receive it.
    pair_hyperparameters: ClassVar[dict[str, tuple[str, str]]] = {}
    #: Update-rule arguments to use where a torch param group lacks the key.
    kernel_defaults: ClassVar[dict[str, Any]] = {}
    #: Per-parameter state entries that are scalars (kept as Python floats).
    scalar_state: ClassVar[frozenset[str]] = frozenset({"step"})
    #: Whether the class overrides ``_update`` (the original higher's contract,
    #: see :mod:`higher.optim.classic`); set once per class.
    _uses_update_hook: ClassVar[bool] = False
    #: What ``step(closure)`` hands its closure to, when set;
    #: :func:`higher.checkpoint.enable` sets a checkpointer here.
    closure_runner: ClosureRunner | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._uses_update_hook = cls._update is not DifferentiableOptimizer._update
        if "update" in cls.__dict__ and "update_group" not in cls.__dict__:
            # A new per-tensor rule: an inherited group rule would compute the old one.
            cls.update_group = None

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: Any = None,
        device: Device = None,
        override: Mapping[str, Any] | None = None,
        grad_callback: GradCallback | None = None,
        track_higher_grads: bool = True,
        first_order: bool = False,
    ) -> None:
        name = type(self).__name__
        # The two ways of writing an optimizer differ in a few places only.
        self._mode = _CLASSIC_MODE if self._uses_update_hook else _RULE_MODE
        if not self._uses_update_hook and not hasattr(self, "update"):
            raise TypeError(
                f"{name} must define an update rule (update = staticmethod(rule)) or override "
                "_update(self, grouped_grads, **kwargs)"
            )
        if not isinstance(other, torch.optim.Optimizer):
            raise TypeError(f"{name} expects a torch.optim.Optimizer, got {type(other).__name__}")
        reference_params = as_list(reference_params, "reference_params")
        for k, p in enumerate(reference_params):
            if p.is_complex():
                raise ValueError(
                    f"{name} does not support complex parameters (reference_params[{k}] is "
                    f"{p.dtype}); optimize torch.view_as_real views instead"
                )
        index = {id(p): i for i, p in enumerate(reference_params)}
        self._num_params = len(reference_params)
        self.hyperparameters = self._mode.hyperparameters(self.hyperparameters, other.param_groups)  # type: ignore[misc]
        self.param_groups: list[dict[str, Any]] = []
        #: For each param group, the positions of its parameters among the fast
        #: weights (the original's attribute name).
        self._group_to_param_list: list[list[int]] = []
        for gi, group in enumerate(other.param_groups):
            positions = []
            for p in group["params"]:
                i = index.get(id(p))
                if i is None:
                    raise ValueError(
                        f"param_groups[{gi}] of the {type(other).__name__} optimizer holds a "
                        f"parameter of shape {tuple(p.shape)} that is not among reference_params"
                    )
                positions.append(i)
            check_group_options(name, group, self.hyperparameters)
            new_group = {k: v for k, v in group.items() if k != "params"}
            new_group["params"] = self._mode.group_params(positions)
            self.param_groups.append(new_group)
            self._group_to_param_list.append(positions)
        flat: list[dict[str, Any]] = [{} for _ in reference_params]
        for p, st in other.state.items():
            i = index.get(id(p))
            if i is not None and st:
                flat[i] = self._mode.import_state(self, st, device)
        self._set_state(flat)
        self._fmodel = fmodel
        if fmodel is not None and (first_order or not track_higher_grads):
            # Its forwards then need no kernels with a double backward.
            fmodel._higher_configure(first_order=True)
        self._grad_callback = grad_callback
        self._track = track_higher_grads
        self._first_order = first_order
        self._scheduler: Any = None
        self._other = weakref.ref(other)
        self._graph_checked = other in _CHECKED_FOR
        if override is not None:
            self._apply_override(override)

    @property
    def fmodel(self) -> Any:
        """The patched module whose fast weights :meth:`step` updates (None if none)."""
        return self._fmodel

    @property
    def track_higher_grads(self) -> bool:
        """Whether steps build a graph (False is "test mode")."""
        return self._track

    @property
    def _group_positions(self) -> list[list[int]]:
        return self._group_to_param_list

    # -- the step ----------------------------------------------------------------
    def step(
        self,
        loss: Tensor | Callable[[], Tensor],
        params: Iterable[Tensor] | None = None,
        override: Mapping[str, Any] | None = None,
        grad_callback: GradCallback | None = None,
    ) -> list[Tensor]:
        """Takes one differentiable step on ``loss``.

        Args:
            loss: a scalar tensor computed from ``params`` (or from the
                attached ``fmodel``'s fast weights); with a batched ``fmodel``,
                one loss per task, of shape ``(num_tasks,)``. Or a closure that
                computes it, as ``torch.optim.Optimizer.step`` takes; closure
                steps are checkpointed when enabled (see :mod:`higher.checkpoint`).
            params: the current weights; the attached ``fmodel``'s fast weights
                when None.
            override: hyperparameter overrides applied from this step on.
            grad_callback: replaces the constructor's ``grad_callback`` for
                this step.

        Returns:
            The new weights, one per parameter (unchanged ones included). When
            an ``fmodel`` is attached they also become its fast weights.
        """
        if override is not None:
            self._apply_override(override)
        if callable(loss) and not isinstance(loss, Tensor):
            runner = self.closure_runner
            if runner is not None and self._track and torch.is_grad_enabled():
                return runner(self, loss, params, grad_callback)
            loss = call_closure(loss)
        current: list[Tensor]
        if params is not None:
            current = as_list(params, "params")
        elif self._fmodel is not None:
            current = self._fmodel.fast_params
        else:
            raise ValueError("step() needs params when no fmodel is attached")
        if len(current) != self._num_params:
            raise ValueError(
                f"expected {self._num_params} params (as many as reference_params), "
                f"got {len(current)}"
            )
        new_params = self._advance(loss, current, grad_callback)
        if not self._track:
            new_params = [detach_leaf(p) for p in new_params]
            self.detach_()
        if self._fmodel is not None:
            # Our own output has the right length and shapes: skip the checks.
            self._fmodel._higher_set_fast_params(new_params)
        if self._scheduler is not None:
            with _compat.quiet_scheduler_order_warning():
                self._scheduler.step()
            self._sync_from(self._scheduler.optimizer)
        return new_params

    def _advance(
        self, loss: Tensor, current: list[Tensor], grad_callback: GradCallback | None
    ) -> list[Tensor]:
        """The update proper: new weights from ``loss`` at ``current``; state advances.

        It touches neither the patched module nor the scheduler, so a
        checkpoint replay calls it to repeat a step (after :meth:`restore`).
        """
        if self._fmodel is not None:  # batched mode: one loss per task, summed
            loss = self._fmodel._higher_task_loss(loss)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss must be a scalar tensor (one element), got {shape}")
        grads = self._gradients(loss, current)
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            grads = list(callback(grads))
            if len(grads) != len(current):
                raise ValueError(
                    f"grad_callback must return {len(current)} gradients (None for skipped "
                    f"parameters), got {len(grads)}"
                )
        return self._mode.update(self, current, grads)

    def _gradients(self, loss: Tensor, params: list[Tensor]) -> list[Tensor | None]:
        wanted = [i for positions in self._group_to_param_list for i in positions]
        if len(wanted) == len(params) and all(p.requires_grad for p in params):
            inputs = params  # every fast weight, in order (the common case)
        else:
            wanted = [i for i in wanted if params[i].requires_grad]
            inputs = [params[i] for i in wanted]
        grads: list[Tensor | None] = [None] * len(params)
        if not wanted:
            return grads
        create_graph = self._track and not self._first_order
        # A sharded patched model (higher.fsdp) keeps the weights this graph saves as shards.
        context = getattr(self._fmodel, "_higher_backward_context", None)
        if context is None:
            found = torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
        else:
            with context():
                found = torch.autograd.grad(
                    loss, inputs, create_graph=create_graph, allow_unused=True
                )
        if create_graph and not self._graph_checked:
            # Once per torch optimizer mirrored (a meta-learning loop makes one
            # differentiable optimizer per task from the same one): an inner
            # loop's steps run the same operations, and the walk costs about
            # as much as a small model's forward.
            self._graph_checked = True
            self._check_double_backward(loss, found)
            other = self._other()
            if other is not None:
                _CHECKED_FOR.add(other)
        if inputs is params:
            grads = list(found)
        else:
            for i, g in zip(wanted, found):
                grads[i] = g
        for i, g in enumerate(grads):
            if g is not None and g.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients "
                    f"(parameter {i}); use a dense module (e.g. Embedding(sparse=False))"
                )
        return grads

    def _check_double_backward(self, loss: Tensor, grads: Sequence[Tensor | None]) -> None:
        """Refuses, at the first step, an inner gradient whose graph the meta-gradient cannot cross."""
        culprits = _compat.without_double_backward([loss, *grads])
        if culprits:
            raise RuntimeError(
                f"{type(self).__name__}.step: the meta-gradient must differentiate this inner "
                f"step's gradient, but it went through {'; '.join(culprits)}, which has no "
                "double backward. Take first-order steps (innerloop_ctx(..., first_order=True) "
                "or get_diff_optim(..., first_order=True)), or track_higher_grads=False if no "
                "meta-gradient is needed, or give the operation a differentiable backward (a "
                "custom autograd.Function whose backward is made of differentiable torch "
                "operations, not marked @once_differentiable)"
            )

    # -- hooks for subclasses ----------------------------------------------------
    #: The per-tensor update rule, ``(p, g, state, **hyper) -> (new_p, new_state)``.
    update: UpdateRule
    #: Optionally, the rule for a whole param group at once:
    #: ``update_group(params, grads, states, positions, **hyper) -> bool`` replaces
    #: ``params[i]`` (and ``states[i]``) for every ``i`` in ``positions`` whose
    #: gradient is not None and returns True, or returns False, changing nothing,
    #: where it does not cover these hyperparameters (``update`` then runs per
    #: tensor). It must compute exactly what ``update`` computes.
    update_group: ClassVar[GroupRule | None] = None

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        """The original higher's hook: updates ``param_groups[i]["params"]`` in place.

        Override it to write an optimizer the way the original ``higher``
        documents (see :mod:`higher.optim.classic`): ``grouped_grads[i][j]`` is
        the gradient of ``param_groups[i]["params"][j]`` (None to skip), state
        is ``self.state[i][j]``, hyperparameters (overrides applied) are read
        from the group. This default applies the class's update rule, so an
        override may call ``super()._update(grouped_grads)``.

        Example:
            >>> class ClippedSGD(higher.optim.DifferentiableSGD):
            ...     def _update(self, grouped_grads, **kwargs):
            ...         clipped = [[None if g is None else g.clamp(-1, 1) for g in grads]
            ...                    for grads in grouped_grads]
            ...         super()._update(clipped)
            >>> p = torch.zeros(1, requires_grad=True)
            >>> diffopt = ClippedSGD(torch.optim.SGD([p], lr=0.1), [p])
            >>> round(diffopt.step((5 * p).sum(), params=[p])[0].item(), 6)
            -0.1
        """
        if not self._uses_update_hook:
            raise RuntimeError(
                f"{type(self).__name__}._update is only called for classes that override it"
            )
        for gi, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            params = group["params"]
            for j, g in enumerate(grads):
                if g is None:
                    continue
                args = self._kernel_args(select(group, j))
                # State is kept verbatim: a step imported from torch is a CPU tensor
                # until this first update; update rules count in numbers. Tensors
                # in the graph (an ASGD eta from a tensor lr) or on a device stay.
                st = {
                    k: (v.item() if k in self.scalar_state and _host_constant(v) else v)
                    for k, v in self.state[gi][j].items()
                }
                params[j], self.state[gi][j] = self.update(params[j], g, st, **args)  # type: ignore[arg-type]

    def _kernel_args(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """Maps a param group's hyperparameters to the update rule's arguments."""
        args = dict(self.kernel_defaults)
        for key in self.hyperparameters:
            if key in group:
                names = self.pair_hyperparameters.get(key)
                if names is None:
                    args[key] = group[key]
                else:
                    args[names[0]], args[names[1]] = group[key]
        return args

    def _apply_override(self, override: Mapping[str, Any]) -> None:
        self._mode.apply_override(self, override)
        # Fast weights that are shards (higher.fsdp) take their shard of a
        # per-parameter tensor; only this override's values, each once.
        local = getattr(self._fmodel, "_higher_local_hyper", None)
        if local is None:
            return
        for group, positions in zip(self.param_groups, self._group_to_param_list):
            for key in override:
                value = group.get(key)
                if type(value) is PerParameter:
                    group[key] = PerParameter(local(i, v) for i, v in zip(positions, value))

    # -- state -------------------------------------------------------------------
    def _set_state(self, flat: list[dict[str, Any]]) -> None:
        """Makes ``flat`` (one dict per fast weight) the state; ``self.state`` views it."""
        self._state = flat
        self.state: Any = self._mode.state_view(flat, self._group_to_param_list)

    def snapshot(self) -> Snapshot:
        """The per-parameter state and hyperparameters now, to :meth:`restore` later.

        A checkpoint replay (:mod:`higher.checkpoint`) restores the state a
        segment of steps started from and the hyperparameters of each step.

        Example:
            >>> p = torch.ones(2, requires_grad=True)
            >>> diffopt = higher.optim.get_diff_optim(torch.optim.Adam([p], lr=0.1), [p])
            >>> before = diffopt.snapshot()
            >>> _ = diffopt.step(p.sum(), params=[p])
            >>> diffopt.restore(before)
            >>> diffopt.state[0]
            {}
        """
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return Snapshot([dict(st) for st in self._state], hyper)

    def restore(self, snapshot: Snapshot) -> None:
        """Puts back the state and hyperparameters of a :meth:`snapshot`."""
        if len(snapshot.state) != self._num_params or len(snapshot.hyper) != len(self.param_groups):
            raise ValueError("restore: the snapshot was taken of a different optimizer")
        self._set_state([dict(st) for st in snapshot.state])
        for group, hyper in zip(self.param_groups, snapshot.hyper):
            params = group["params"]
            group.clear()
            group.update(hyper)
            group["params"] = params

    def _import_state(self, state: Mapping[str, Any], device: Device) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in state.items():
            if key in self.scalar_state and isinstance(value, Tensor):
                out[key] = value.item()
            elif isinstance(value, Tensor):
                value = _compat.local_tensor(value)  # a sharded model's state: its shard
                out[key] = value.detach().to(device, copy=True)
            else:
                out[key] = value
        return out

    def _export_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in state.items():
            if key in self.scalar_state:
                out[key] = torch.tensor(float(value), dtype=_compat.scalar_dtype())
            elif isinstance(value, Tensor):
                out[key] = value.detach().clone()
            else:
                out[key] = value
        return out

    def detach_(self) -> DifferentiableOptimizer:
        """Cuts the optimizer state from its graph, keeping its values.

        Use with ``fmodel.detach_()`` for truncated back-propagation.
        """
        for st in self._state:
            for key, value in st.items():
                if isinstance(value, Tensor) and value.grad_fn is not None:
                    st[key] = value.detach()
        self._mode.detach_groups(self)
        return self

    def reset_state(self) -> None:
        """Forgets all per-parameter state, as a freshly built torch optimizer has none."""
        self._state[:] = [{} for _ in self._state]

    def state_dict(self) -> dict[str, Any]:
        """State and param groups in ``torch.optim``'s own format.

        Parameter ids follow torch's convention (position in the groups), so
        the result loads into the mirrored torch optimizer with its own
        ``load_state_dict``. Tensor hyperparameters are saved as floats.
        """
        positions = self._group_to_param_list
        order = [i for group_positions in positions for i in group_positions]
        ids = {i: k for k, i in enumerate(order)}
        groups = []
        for group, group_positions in zip(self.param_groups, positions):
            saved = {k: plain(v) for k, v in group.items() if k != "params"}
            saved["params"] = [ids[i] for i in group_positions]
            groups.append(saved)
        state = {ids[i]: self._export_state(self._state[i]) for i in order if self._state[i]}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Loads what :meth:`state_dict` (or the torch optimizer's) produced."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(groups)} param groups, the optimizer has "
                f"{len(self.param_groups)}"
            )
        ids: dict[int, int] = {}
        positions = self._group_to_param_list
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(positions[gi]):
                raise ValueError(
                    f"param group {gi}: state_dict has {len(saved['params'])} parameters, "
                    f"the optimizer has {len(positions[gi])}"
                )
            ids.update(zip(saved["params"], positions[gi]))
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.reset_state()
        for key, st in state_dict["state"].items():
            self._state[ids[int(key)]] = self._mode.import_state(self, st, None)

    def write_back(self, optimizer: torch.optim.Optimizer) -> None:
        """Copies state and hyperparameters into the mirrored torch optimizer.

        Afterwards ``optimizer.step()`` continues exactly where the
        differentiable optimizer stopped.
        """
        if getattr(self._fmodel, "_higher_num_tasks", None) is not None:
            raise ValueError("write_back: in batched mode the state is stacked over tasks")
        if getattr(self._fmodel, "_higher_fsdp", None) is not None:
            raise ValueError(
                "write_back: the state of a fully_shard'ed model's fast weights is local "
                "shards, which the torch optimizer (holding DTensor state) cannot load"
            )
        for gi, group in enumerate(self.param_groups):
            for key, value in group.items():
                if type(value) is PerParameter:
                    raise ValueError(
                        f"write_back: param group {gi} has per-parameter values for '{key}', "
                        "which torch.optim cannot hold"
                    )
        optimizer.load_state_dict(self.state_dict())

    # -- schedules ---------------------------------------------------------------
    def attach_scheduler(self, scheduler: Any) -> None:
        """Lets a ``torch.optim.lr_scheduler`` drive this optimizer's hyperparameters.

        The scheduler must be attached to the torch optimizer this one mirrors.
        After every :meth:`step` the scheduler is stepped and the new values of
        its optimizer's hyperparameters (learning rates, and momenta for
        cyclic schedules) are copied in, so the unrolled run follows the same
        schedule as the torch run. Hyperparameters overridden with tensors keep
        their override.

        Example:
            >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1.0)
            >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            >>> diffopt = higher.optim.get_diff_optim(opt, opt.param_groups[0]["params"])
            >>> diffopt.attach_scheduler(sched)
        """
        optimizer = scheduler.optimizer
        if len(optimizer.param_groups) != len(self.param_groups):
            raise ValueError(
                f"the scheduler's optimizer has {len(optimizer.param_groups)} param groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        self._scheduler = scheduler
        self._sync_from(optimizer)

    def _sync_from(self, optimizer: torch.optim.Optimizer) -> None:
        for mine, theirs in zip(self.param_groups, optimizer.param_groups):
            for key in self.hyperparameters:
                current = mine.get(key)
                if isinstance(current, (Tensor, PerParameter)) or (
                    isinstance(current, (tuple, list))
                    and any(isinstance(x, Tensor) for x in current)
                ):
                    continue
                if key in theirs:
                    mine[key] = theirs[key]

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for gi, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {gi}")
            lines += [f"    {k}: {v}" for k, v in sorted(group.items()) if k != "params"]
        return "\n".join([*lines, ")"])


def _host_constant(value: Any) -> bool:
    """A tensor that reads back as a number without a device sync or a cut graph."""
    return isinstance(value, Tensor) and value.device.type == "cpu" and not value.requires_grad
