"""The autograd graph and engine: missing double backwards, gradient accumulators, versions."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.autograd.function import once_differentiable

# Nodes autograd puts where a derivative is missing: they raise when a backward reaches them.
_ERROR_NODES = frozenset(
    {"torch::autograd::NotImplemented", "torch::autograd::Error", "torch::autograd::DelayedError"}
)
_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx: None).__code__


def _is_once_differentiable(fn: Any) -> bool:
    while fn is not None:
        if getattr(fn, "__code__", None) is _ONCE_DIFFERENTIABLE:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def without_double_backward(roots: list[Any]) -> list[str]:
    """The operations in the graphs of ``roots`` that cannot be differentiated twice.

    Walks the autograd graph (node names and custom ``autograd.Function``
    classes are torch internals) from the ``grad_fn`` of each tensor in
    ``roots``: an inner step's loss and the gradients it took with
    ``create_graph=True``. Found are the nodes autograd inserts where a
    backward has no derivative formula (they raise only when the outer
    backward reaches them), and custom Functions whose backward is
    ``@once_differentiable`` (whose second derivative is an error, or, when
    the gradient flowing into them is constant, silently missing).

    Returns:
        One description per operation found, in the order found.
    """
    found: dict[str, None] = {}
    stack = [t.grad_fn for t in roots if t is not None and t.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = node.name()
        forward_cls = getattr(node, "_forward_cls", None)
        if forward_cls is not None and _is_once_differentiable(forward_cls.backward):
            found[
                f"the custom autograd.Function {forward_cls.__qualname__} (its backward is "
                "@once_differentiable)"
            ] = None
        elif name in _ERROR_NODES:
            # The forward operation's own node comes in through its saved output,
            # after the gradient and the inputs.
            sources = [
                n.name() for n, _ in node.next_functions if n is not None and "::" not in n.name()
            ]
            op = re.sub(r"Backward\d*$", "", sources[-1]) if sources else "an operation"
            found[f"the double backward of {op} (autograd: {name.rsplit(':', 1)[-1]})"] = None
        stack.extend(n for n, _ in node.next_functions)
    return list(found)


def grad_accumulator(param: torch.Tensor) -> Any:
    """The autograd node that accumulates into ``param.grad`` (DDP hooks on it)."""
    with torch.enable_grad():
        view = param.view_as(param)
    assert view.grad_fn is not None, "a parameter that does not require grad"
    return view.grad_fn.next_functions[0][0]


def in_backward() -> bool:
    """Whether this thread is running an autograd backward (or a hook inside one)."""
    return torch._C._current_graph_task_id() != -1


def backward_runs(node: Any) -> bool:
    """Whether the backward now running executes ``node`` (call it inside a backward)."""
    return torch._C._will_engine_execute_node(node)


def version(tensor: torch.Tensor) -> int:
    """A tensor's version counter, bumped by every in-place change of its data."""
    return tensor._version
