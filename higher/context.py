"""``innerloop_ctx``: a patched model and its differentiable optimizer, together."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import enable as enable_checkpointing
from .optim import DifferentiableOptimizer, get_diff_optim
from .patch import _monkeypatch
from .utils import Device


def innerloop_ctx(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    device: Device = None,
    copy_initial_weights: bool = True,
    override: Mapping[str, Any] | None = None,
    track_higher_grads: bool = True,
    first_order: bool = False,
    checkpoint: bool | int = False,
    num_tasks: int | None = None,
) -> contextlib.AbstractContextManager[tuple[Any, DifferentiableOptimizer]]:
    """A context that gives ``(fmodel, diffopt)``: a patched ``model`` and the twin of ``opt``.

    Args:
        model: the module to unroll; it is never modified.
        opt: the ``torch.optim`` optimizer of ``model`` to mirror.
        device: where the fast weights, buffers and state live.
        copy_initial_weights: when True (the original higher's default) the
            initial fast weights are detached copies and no meta-gradient
            reaches ``model``; pass False for MAML.
        override: hyperparameter overrides for ``diffopt``.
        track_higher_grads: False for test mode: no graph, flat memory.
        first_order: take inner gradients without their graph (first-order
            MAML): ``loss.backward()`` on a query loss gives ``model`` the
            gradient of that loss at the adapted weights. Only the initial and
            current fast weights are kept in the history.
        checkpoint: ``True`` or a number of steps per segment: steps taken as
            ``diffopt.step(closure)`` keep no activations and are recomputed
            during the outer backward, with identical gradients (see
            :mod:`higher.checkpoint`). Only the initial and current fast
            weights are kept in the history.
        num_tasks: run this many tasks at once (batched mode, see
            :mod:`higher.batched`); ``diffopt.step`` then takes one loss per
            task, a tensor of shape ``(num_tasks,)``.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> with innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        ...     _ = diffopt.step(((fmodel(x) - y) ** 2).mean())
        ...     ((fmodel(x) - y) ** 2).mean().backward()
        >>> model.weight.grad is not None
        True
    """
    return _InnerLoop(
        (model, opt, device, copy_initial_weights, override, track_higher_grads, first_order),
        checkpoint,
        num_tasks,
    )


class _InnerLoop:
    """The context :func:`innerloop_ctx` returns: it builds the pair on entry.

    A class rather than a generator-based context manager, whose entry and
    exit cost a task a few generator frames more.
    """

    __slots__ = ("args", "checkpoint", "num_tasks")

    def __init__(
        self, args: tuple[Any, ...], checkpoint: bool | int, num_tasks: int | None
    ) -> None:
        self.args, self.checkpoint, self.num_tasks = args, checkpoint, num_tasks

    def __enter__(self) -> tuple[Any, DifferentiableOptimizer]:
        model, opt, device, copy_initial_weights, override, track, first_order = self.args
        fmodel, params = _monkeypatch(model, device, copy_initial_weights, track, self.num_tasks)
        if first_order:
            fmodel._higher_configure(history="ends")
        diffopt = get_diff_optim(
            opt,
            params,
            fmodel=fmodel,
            device=device,
            override=override,
            track_higher_grads=track,
            first_order=first_order,
        )
        if self.checkpoint is not False:
            enable_checkpointing(diffopt, self.checkpoint)
        return fmodel, diffopt

    def __exit__(self, *exc: object) -> None:
        return None
