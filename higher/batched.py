"""Batched tasks: a whole meta-batch of inner loops run as one.

``monkeypatch(module, num_tasks=N)`` (and ``innerloop_ctx(..., num_tasks=N)``)
build a patched module whose fast weights are stacked, ``(N, *param.shape)``:
task ``i`` owns slice ``i``. Calling it runs the module's own ``forward`` once
per task under ``torch.func.vmap``, so ordinary module code sees one task's
tensors while the work is done by batched kernels; autograd then runs on the
stacked tensors outside ``vmap``. Because task ``i``'s loss depends on slice
``i`` only, the gradient of the summed per-task losses is every task's own
gradient, and the elementwise update rules of :mod:`higher.optim` step all
tasks at once. Floating-point buffers (BatchNorm running statistics) are kept
per task, ``(N, *buffer.shape)``; integer buffers (``num_batches_tracked``)
are shared, since every task runs the same number of forwards. Two things
``vmap`` gets wrong or cannot do are handled here: normalization layers whose
batching gives wrong gradients run as exact primitive-op formulations
(:mod:`higher._exact_norms`), and modules ``vmap`` cannot batch (RNN kernels)
make the patched module loop over the tasks instead, with a warning, as does a
forward that ``vmap`` refuses at run time (``higher._compat.vmap`` lists how).

Example:
    >>> fmodel = higher.monkeypatch(nn.Linear(2, 1), num_tasks=3)
    >>> fmodel.fast_params[0].shape, fmodel(torch.ones(3, 5, 2)).shape
    (torch.Size([3, 1, 2]), torch.Size([3, 5, 1]))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from . import _compat, _patched
from ._exact_norms import ExactNorms
from ._patched import _MonkeyPatchBase
from .utils import Device

__all__ = ["per_task", "task_losses"]

_STRATEGIES = ("auto", "vmap", "loop")


def task_losses(loss: Any, num_tasks: int) -> torch.Tensor:
    """Checks that ``loss`` holds one loss per task and returns their sum.

    The sum's gradient with respect to the stacked fast weights is, slice by
    slice, each task's gradient of its own loss.

    Raises:
        ValueError: ``loss`` is not a tensor of shape ``(num_tasks,)``.

    Example:
        >>> task_losses(torch.tensor([1.0, 2.0]), 2)
        tensor(3.)
    """
    if not isinstance(loss, torch.Tensor) or loss.shape != (num_tasks,):
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        hint = (
            " (a scalar such as the mean over tasks would scale every task's step)"
            if isinstance(loss, torch.Tensor) and loss.dim() == 0
            else ""
        )
        raise ValueError(
            f"batched mode with num_tasks={num_tasks} needs one loss per task, a tensor of "
            f"shape ({num_tasks},), got {got}{hint}; reduce each task's loss over all but "
            "the first dimension, e.g. loss.mean(dim=tuple(range(1, loss.dim())))"
        )
    return loss.sum()


def per_task(
    callback: Callable[[list[torch.Tensor]], Sequence[torch.Tensor | None]],
) -> Callable[[list[torch.Tensor | None]], list[torch.Tensor | None]]:
    """Turns a ``grad_callback`` written for one task into one for batched mode.

    In batched mode a ``grad_callback`` receives stacked gradients, ``(N,
    *param.shape)``. An elementwise callback (clamping) works unchanged; one
    that mixes entries (clipping by the global norm) must see one task at a
    time, which this wrapper arranges with ``torch.func.vmap``. Gradients that
    are None are passed over.

    Example:
        >>> def clip(grads):
        ...     norm = torch.stack([g.norm() for g in grads]).norm()
        ...     return [g / norm.clamp_min(1.0) for g in grads]
        >>> grads = [torch.tensor([[3.0, 4.0], [0.3, 0.4]])]
        >>> per_task(clip)(grads)[0]
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
    """

    def batched(grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return list(grads)

        def one(gs: list[torch.Tensor]) -> list[torch.Tensor]:
            full: list[Any] = [None] * len(grads)
            for i, g in zip(present, gs):
                full[i] = g
            out = list(callback(full))
            if len(out) != len(grads):
                raise ValueError(
                    f"grad_callback must return {len(grads)} gradients, got {len(out)}"
                )
            kept = []
            for i in present:
                kept_g = out[i]
                if kept_g is None:
                    raise ValueError(
                        f"per_task: grad_callback returned None for gradient {i}; in batched "
                        "mode a parameter is skipped for all tasks or none"
                    )
                kept.append(kept_g)
            return kept

        new = torch.func.vmap(one)([g for g in grads if g is not None])
        result = list(grads)
        for i, g in zip(present, new):
            result[i] = g
        return result

    return batched


class _BatchedPatch(_MonkeyPatchBase):
    """The patched-module API in batched mode (see the module docstring).

    It extends :class:`~higher._patched._MonkeyPatchBase` where batched mode
    differs: fast weights and floating-point buffers are stacked along a
    leading task dimension (weights of one task's shape are expanded to all
    tasks); every tensor argument of a call must carry that dimension;
    ``write_back`` takes the index of the task to write; ``task_strategy``
    says how tasks run (``"vmap"`` or ``"loop"``).
    """

    _higher_sliceable = True  # indexing gives per-task views (higher._views)

    _higher_num_tasks: int
    _higher_buffer_slots: list[tuple[tuple[nn.Module, str], ...]] = []
    _higher_task_strategy: str
    #: The modules whose forwards may update buffers in place (BatchNorm).
    _higher_norms: list[nn.Module] = []
    _higher_class_prefix = "BatchedMonkeyPatched"

    # -- calling -----------------------------------------------------------------
    def _higher_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._check_inputs(args, kwargs)
        if self._higher_task_strategy == "loop":
            return self._call_loop(args, kwargs)
        # Buffers a failed attempt may have advanced in place (BatchNorm's).
        saved = [(m, k, b.clone()) for m, k, b in self._silently_updated_buffers()]
        try:
            # What a failed attempt saved for backward must not reach the hooks in
            # force: a checkpointed step's replay runs the loop alone.
            with _compat.DeferredPacking():
                return self._call_vmap(args, kwargs)
        except RuntimeError as error:
            if not _compat.vmap_cannot_batch(error):
                raise
            for m, k, b in saved:
                m._buffers[k] = b
            # A genuine error in the forward raises again here, task by task, as
            # in the per-task loop; only a forward the loop runs is vmap's failure.
            out = self._call_loop(args, kwargs)
            first_line = str(error).splitlines()[0]
            warnings.warn(
                f"higher batched mode: torch.func.vmap cannot batch this forward "
                f"({first_line}); the {self._higher_num_tasks} tasks run one after another "
                "from now on (same results, slower). Set fmodel.task_strategy = 'loop' to "
                "choose that from the start",
                stacklevel=3,
            )
            object.__setattr__(self, "_higher_task_strategy", "loop")
            return out

    def _silently_updated_buffers(self) -> list[tuple[nn.Module, str, torch.Tensor]]:
        return [
            (m, k, b)
            for m in self._higher_norms
            if _compat.updates_buffers_silently(m)
            for k, b in m._buffers.items()
            if b is not None
        ]

    def _higher_task_loss(self, loss: Any) -> torch.Tensor:
        return task_losses(loss, self._higher_num_tasks)

    def _check_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        n = self._higher_num_tasks
        named = [(f"positional argument {i}", a) for i, a in enumerate(args)]
        named += [(f"argument '{k}'", v) for k, v in kwargs.items()]
        for what, value in named:
            for t in _compat.tree_leaves(value):
                if isinstance(t, torch.Tensor) and (t.dim() == 0 or t.size(0) != n):
                    lead = "no dimensions" if t.dim() == 0 else f"leading dimension {t.size(0)}"
                    raise ValueError(
                        f"batched mode with num_tasks={n}: every tensor argument needs a leading "
                        f"task dimension of size {n}, but {what} has {lead} (shape "
                        f"{tuple(t.shape)}); expand tensors shared by all tasks"
                    )

    def _higher_slot_values(self) -> list[Any]:
        # The slots, not the history: a checkpoint replay assigns an earlier
        # step's weights to the slots alone. Buffers are per task too.
        buffers = [slots[0][0]._buffers[slots[0][1]] for slots in self._higher_buffer_slots]
        return [*super()._higher_slot_values(), *buffers]

    def _higher_set_slot_values(self, values: list[Any]) -> None:
        n_p = len(self._higher_slots)
        self._higher_assign(values[:n_p])
        for b, slots in zip(values[n_p:], self._higher_buffer_slots):
            for module, name in slots:
                module._buffers[name] = b

    def _call_vmap(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        now = self._higher_slot_values()
        n_p = len(self._higher_slots)
        # A weight shared by all tasks that needs no gradient (a frozen base
        # model under LoRA adapters) enters unbatched: plain kernels, not
        # batched ones over a broadcast view.
        shared = {i for i, t in enumerate(now[:n_p]) if _is_shared(t)}
        values = [t[0] if i in shared else t for i, t in enumerate(now)]
        # One flat list of batched tensors keeps vmap's own pytree work small.
        leaves, spec = _compat.tree_flatten((args, kwargs))
        where = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        n_slots = len(values)
        in_dims = [None if i in shared else 0 for i in range(n_slots)] + [0] * len(where)
        structure: dict[str, Any] = {}

        def one(*tensors: torch.Tensor) -> list[torch.Tensor]:
            self._higher_set_slot_values(list(tensors[:n_slots]))
            mine = list(leaves)
            for i, t in zip(where, tensors[n_slots:]):
                mine[i] = t
            a, kw = _compat.tree_unflatten(mine, spec)
            with ExactNorms():
                out = _MonkeyPatchBase._higher_forward(self, a, kw)
            # vmap returns tensors only: keep the rest of the output aside.
            out_leaves, out_spec = _compat.tree_flatten(out)
            structure["spec"], structure["leaves"] = out_spec, out_leaves
            return [x for x in out_leaves if isinstance(x, torch.Tensor)]

        try:
            # The fused attention kernels have no batching rule (vmap would
            # loop over the tasks with a warning): the math kernel has.
            with _compat.MATH_ATTENTION:
                tensors = torch.func.vmap(one, in_dims=tuple(in_dims), randomness="different")(
                    *values, *(leaves[i] for i in where)
                )
        finally:
            self._higher_set_slot_values(now)
        it = iter(tensors)
        out = [next(it) if isinstance(x, torch.Tensor) else x for x in structure["leaves"]]
        return _compat.tree_unflatten(out, structure["spec"])

    def _call_loop(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        now = self._higher_slot_values()
        shared = [
            (m, k, b.clone())
            for m in self.modules()  # type: ignore[attr-defined]
            for k, b in m._buffers.items()
            if b is not None and not b.is_floating_point()
        ]
        n = self._higher_num_tasks
        # For one task a view is free in the backward, where unbind costs a copy.
        split = (lambda t: t.unbind(0)) if n > 1 else (lambda t: (t.squeeze(0),))
        per_task = [split(t) for t in now]
        outs = []
        try:
            for i in range(n):
                for m, k, b in shared:  # shared buffers advance once, not once per task
                    m._buffers[k] = b.clone()
                self._higher_set_slot_values([t[i] for t in per_task])
                a, kw = _compat.tree_map(lambda t, i=i: _select(t, i), (args, kwargs))
                outs.append(_MonkeyPatchBase._higher_forward(self, a, kw))
        finally:
            self._higher_set_slot_values(now)
        flat = [_compat.tree_flatten(o)[0] for o in outs]
        spec = _compat.tree_flatten(outs[0])[1]
        leaves = [
            (torch.stack(group) if n > 1 else group[0].unsqueeze(0))
            if isinstance(group[0], torch.Tensor)
            else group[0]
            for group in zip(*flat)
        ]
        return _compat.tree_unflatten(leaves, spec)

    # -- settings ----------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        """The number of tasks ``N``: the leading dimension of every fast weight."""
        return self._higher_num_tasks

    @property
    def task_strategy(self) -> str:
        """``"vmap"`` (one vectorised forward) or ``"loop"`` (tasks one after another).

        Both give the same results; set it to compare them or to choose the
        faster one. ``"auto"`` chooses: ``"loop"`` when a submodule cannot run
        under ``vmap`` (RNN kernels), for a single task, or on CPU when the
        module has convolutions (batched convolutions become slow grouped ones
        there), else ``"vmap"``.
        """
        return self._higher_task_strategy

    @task_strategy.setter
    def task_strategy(self, value: str) -> None:
        object.__setattr__(self, "_higher_task_strategy", _choose_strategy(self, value))

    # -- fast weights ------------------------------------------------------------
    def _higher_fit(self, name: str, shape: torch.Size, p: torch.Tensor) -> torch.Tensor:
        n = self._higher_num_tasks
        if p.shape == shape:  # one set of weights for all tasks
            return p.expand(n, *shape)
        if p.shape != (n, *shape):
            raise ValueError(
                f"parameter '{name}' must have shape {(n, *shape)} (num_tasks={n}) or "
                f"{tuple(shape)}, got {tuple(p.shape)}"
            )
        return p

    def _higher_initial_params(
        self, originals: list[torch.Tensor], device: Device, copy_initial_weights: bool
    ) -> list[torch.Tensor]:
        n = self._higher_num_tasks
        if copy_initial_weights:
            # Each task gets its own leaf, as each task of a loop gets its own copy.
            return [
                p.detach()
                .to(device)
                .unsqueeze(0)
                .repeat(n, *[1] * p.dim())
                .requires_grad_(p.requires_grad)
                for p in originals
            ]
        # A broadcast view, no copy: autograd sums the tasks' meta-gradients into p.
        return [(p if device is None else p.to(device)).expand(n, *p.shape) for p in originals]

    def _higher_buffers_synced(self) -> None:
        _stack_buffers(self, self._higher_num_tasks)

    def reset(
        self, source: nn.Module | Iterable[torch.Tensor], copy_initial_weights: bool = True
    ) -> None:
        """Starts over from new initial weights (and, for a module, its buffers).

        Args:
            source: an ``nn.Module`` of the same structure, or tensors in
                ``parameters()`` order, stacked ``(N, ...)`` or shared by all
                tasks.
            copy_initial_weights: as in :func:`higher.monkeypatch`.

        Example:
            >>> model = nn.Linear(2, 1)
            >>> fmodel = higher.monkeypatch(model, num_tasks=3)
            >>> fmodel.reset(model)
            >>> fmodel.fast_params[0].shape
            torch.Size([3, 1, 2])
        """
        super().reset(source, copy_initial_weights)

    def write_back(  # type: ignore[override]
        self, module: nn.Module, buffers: bool = True, *, task: int | None = None
    ) -> None:
        """Copies one task's fast weights (and buffers) into an ordinary module.

        Args:
            module: a module with the structure of the patched one (or its DDP wrapper).
            buffers: also copy buffers such as BatchNorm running statistics.
            task: which task's weights to copy; required in batched mode.

        Raises:
            ValueError: ``task`` is missing or out of range.

        Example:
            >>> model = nn.Linear(2, 1)
            >>> fmodel = higher.monkeypatch(model, num_tasks=2)
            >>> fmodel.write_back(model, task=1)
        """
        n = self._higher_num_tasks
        if task is None:
            raise ValueError(
                f"write_back in batched mode (num_tasks={n}) needs the task to write: "
                "write_back(module, task=i)"
            )
        if not -n <= task < n:
            raise ValueError(f"write_back: task={task} is out of range for num_tasks={n}")
        per_task = {id(t) for t in self._higher_slot_values()} | {
            id(p) for p in self.fast_params or []
        }
        self._higher_write_back(module, buffers, lambda t: t[task] if id(t) in per_task else t)


def _select(t: Any, i: int) -> Any:
    return t[i] if isinstance(t, torch.Tensor) else t


def _stack_buffers(fmodule: Any, n: int) -> None:
    """Gives each task its own copy of every floating-point buffer."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    stacked: dict[int, torch.Tensor] = {}
    for module in fmodule.modules():
        for name, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                if id(b) not in stacked:
                    stacked[id(b)] = b.unsqueeze(0).repeat(n, *[1] * b.dim())
                    slots[id(b)] = []
                slots[id(b)].append((module, name))
    object.__setattr__(fmodule, "_higher_buffer_slots", [tuple(s) for s in slots.values()])
    params = fmodule._higher_slot_values()[: len(fmodule._higher_slots)]
    fmodule._higher_set_slot_values([*params, *stacked.values()])


def _unbatchable(fmodule: Any) -> list[str]:
    # Named as the user's model names them: the root's class is the patched one.
    return [
        f"{name} ({type(m).__name__})" if name else f"the model ({fmodule._higher_base.__name__})"
        for name, m in fmodule.named_modules()
        if _compat.has_flat_weights(m)
    ]


def _has_conv(fmodule: Any) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in fmodule.modules())


def _choose_strategy(fmodule: Any, value: str) -> str:
    if value not in _STRATEGIES:
        raise ValueError(f"task_strategy must be one of {_STRATEGIES}, got {value!r}")
    blocked = _unbatchable(fmodule)
    if value == "vmap" and blocked:
        raise ValueError(
            f"task_strategy='vmap' is impossible: torch.func.vmap cannot batch {', '.join(blocked)}"
        )
    if value != "auto":
        return value
    if blocked:
        warnings.warn(
            f"higher batched mode: torch.func.vmap cannot batch {', '.join(blocked)}; the "
            f"{fmodule._higher_num_tasks} tasks run one after another (same results, slower)",
            stacklevel=4,
        )
        return "loop"
    if fmodule._higher_num_tasks == 1:  # nothing to vectorise
        return "loop"
    params = fmodule.fast_params or []
    on_cpu = all(p.device.type == "cpu" for p in params)
    return "loop" if on_cpu and _has_conv(fmodule) else "vmap"


def patch(
    module: nn.Module,
    num_tasks: int,
    device: Device = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
) -> tuple[Any, list[torch.Tensor]]:
    """``monkeypatch`` for ``num_tasks`` tasks; also returns the original parameters."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
    fmodule, originals = _patched.patch(
        module,
        device,
        copy_initial_weights,
        track_higher_grads,
        _BatchedPatch,
        _higher_num_tasks=num_tasks,
    )
    object.__setattr__(fmodule, "_higher_task_strategy", _choose_strategy(fmodule, "auto"))
    norms = [m for m in fmodule.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    object.__setattr__(fmodule, "_higher_norms", norms)
    return fmodule, originals


def _is_shared(t: torch.Tensor) -> bool:
    """Whether a stacked weight is one tensor broadcast to all tasks and needs no gradient."""
    return not t.requires_grad and t.dim() > 0 and t.stride(0) == 0
