"""Which patched forward this thread runs, found on the Python stack when asked.

The wrappers of ``F.scaled_dot_product_attention`` (:mod:`.kernels`) and of
``torch.utils.checkpoint`` (:mod:`.model_checkpoint`) must know whether they
are called inside a patched module's forward that builds a graph, and which
module's: attention then takes a kernel with a double backward, and a
checkpointed block recomputes on that forward's fast weights. Marking every
forward for them (a thread-local stack) costs every forward of every model,
about a microsecond of a small MLP's fifty, while the wrappers run only where a
model calls attention or checkpoints. So the patched ``__call__`` registers its
code object once, and a wrapper walks the frames of its callers up to the
innermost one running it, about a microsecond per attention call. A call from
code that no patched forward runs walks the whole stack and finds nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

_FORWARDS: set[Any] = set()  # code objects of patched modules' __call__


def register_forward(call: Callable[..., Any]) -> None:
    """Declares ``call`` (a patched module class's ``__call__``) a patched forward."""
    _FORWARDS.add(call.__code__)


def graph_forward() -> Any:
    """The patched module whose forward this thread runs and which builds a graph, or None.

    The innermost patched forward on the stack counts: it is None when that
    forward builds no graph (test mode, or gradients disabled now).
    """
    if not torch.is_grad_enabled():
        return None
    frame = sys._getframe(1)
    forwards = _FORWARDS
    while frame is not None:
        if frame.f_code in forwards:
            module = frame.f_locals.get("self")
            return module if module is not None and module._higher_track else None
        frame = frame.f_back  # type: ignore[assignment]
    return None


def double_graph_forward() -> bool:
    """Whether this thread runs a patched forward whose graph an inner step differentiates
    with ``create_graph=True`` (so that the meta-gradient differentiates it again)."""
    module = graph_forward()
    return module is not None and not module._higher_first_order
