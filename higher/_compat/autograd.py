"""The autograd graph and engine: missing double backwards, gradient accumulators, versions."""

from __future__ import annotations

import re
import threading
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


def _error_message(node: Any) -> str | None:
    """The message an error node of the autograd graph raises, or None if unknown.

    Autograd raises it only when a backward reaches the node; calling the
    node (a C++ ``Error`` node, which raises before touching its inputs, with
    undefined gradients) reads it without running anything else.
    """
    try:
        node(*[None] * len(node._input_metadata))
    except RuntimeError as error:
        return str(error).splitlines()[0] if str(error) else None
    except Exception:  # a torch that calls or describes nodes otherwise
        return None
    return None


def _missing_derivative(node: Any) -> str | None:
    """Describes the operation whose derivative an error node stands for.

    ``node`` sits where an operation of the first backward (such as
    ``aten::hardsigmoid_backward``, the backward of ``hardsigmoid``) has no
    derivative formula; its message names that operation, which its position
    in the graph does not (its inputs are the incoming gradient and whatever
    the forward saved, e.g. a convolution's output). None for the error that
    ``@once_differentiable`` leaves, which the custom Function's own node
    reports.
    """
    message = _error_message(node)
    if message is not None and "once_differentiable" in message:
        return None
    kind = node.name().rsplit(":", 1)[-1]
    match = re.search(r"derivative for (?:aten::)?'?([\w.]+?)'? is not implemented", message or "")
    if match is None:
        return f"an operation of the first backward with no derivative ({message or kind})"
    backward = match.group(1)
    forward = backward.removesuffix("_backward")
    if forward == backward:
        return f"aten::{backward} (an operation of the first backward with no derivative formula)"
    return f"aten::{forward} (its backward, aten::{backward}, has no derivative formula)"


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
            culprit = _missing_derivative(node)
            if culprit is not None:
                found[culprit] = None
        stack.extend(n for n, _ in node.next_functions)
    return list(found)


class _Saved:
    """A tensor saved for backward inside :class:`DeferredPacking`, packed or not yet."""

    __slots__ = ("packed", "value")

    def __init__(self, value: torch.Tensor) -> None:
        self.value: Any = value  # until handed to the hooks in force, then None
        self.packed: Any = None


def at_backward_end(callback: Any) -> bool:
    """Has the backward now running call ``callback()`` when it ends; False outside one."""
    try:
        torch.autograd.Variable._execution_engine.queue_callback(callback)
    except RuntimeError:  # no backward is running
        return False
    return True


class _HooksInForce(threading.local):
    def __init__(self) -> None:
        self.stack: list[tuple[Any, Any]] = []  # higher's own hooks in force, innermost last


_hooks_in_force = _HooksInForce()


class SavedTensorsHooks:
    """``torch.autograd.graph.saved_tensors_hooks`` that also records itself in this thread.

    Every saved-tensor hook of higher's (checkpointed steps and their replays,
    sharded weights, :class:`DeferredPacking`) is entered through it, so that
    :func:`top_saved_tensors_hooks` finds the innermost one on a torch that
    cannot say which hooks are in force (2.7 cannot).
    """

    __slots__ = ("hooks", "pair")

    def __init__(self, pack: Any, unpack: Any) -> None:
        self.pair = (pack, unpack)
        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def __enter__(self) -> None:
        self.hooks.__enter__()
        _hooks_in_force.stack.append(self.pair)

    def __exit__(self, *exc: Any) -> None:
        _hooks_in_force.stack.pop()
        self.hooks.__exit__(*exc)


def top_saved_tensors_hooks() -> tuple[Any, Any] | None:
    """The innermost ``saved_tensors_hooks`` in force, ``(pack, unpack)``, or None.

    Asked of torch where it can tell; elsewhere (torch 2.7) the innermost of
    higher's own (:class:`SavedTensorsHooks`), so hooks a user entered are not
    seen there.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is not None:
        return top(False)  # type: ignore[no-any-return]
    stack = _hooks_in_force.stack
    return stack[-1] if stack else None


class DeferredPacking:
    """Hands the tensors a block saves for backward to the hooks in force only if it succeeds.

    ``torch.autograd.graph.saved_tensors_hooks`` see every tensor saved while
    they are in force, also those of an attempt that fails and is retried
    another way (batched mode's ``vmap`` attempt, before the task loop): a
    checkpointed step's hooks would then count tensors its replay never saves.
    Inside this block tensors are held aside; when it ends without an error
    they are passed to the hooks in force, in the order saved, and the graph
    unpacks them through those hooks; after an error they are dropped. Without
    hooks in force it does nothing.
    """

    def __init__(self) -> None:
        self._outer: Any = top_saved_tensors_hooks()
        self._saved: list[_Saved] = []
        self._hooks: Any = None

    def __enter__(self) -> DeferredPacking:
        if self._outer is not None:
            self._hooks = SavedTensorsHooks(self._pack, self._unpack)
            self._hooks.__enter__()
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if self._hooks is None:
            return
        self._hooks.__exit__(kind, error, traceback)
        saved, self._saved = self._saved, []
        if kind is not None:
            return
        pack = self._outer[0]
        for item in saved:
            item.packed, item.value = pack(item.value), None

    def _pack(self, x: torch.Tensor) -> _Saved:
        item = _Saved(x)
        self._saved.append(item)
        return item

    def _unpack(self, item: _Saved) -> torch.Tensor:
        if item.value is not None:  # a backward inside the block
            return item.value
        return self._outer[1](item.packed)


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
