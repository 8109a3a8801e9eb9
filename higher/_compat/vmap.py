"""``torch.func.vmap``: which of its errors mean a forward cannot be batched.

The messages below are torch's own (ATen's functorch batching rules and
fallbacks, ``torch._functorch``), as raised by torch 2.13 and 2.14; each kind
is produced for real in ``tests/test_vmap_fallback.py``. When a torch release words
one differently, batched mode raises that error instead of falling back to the
task loop, and the test names the kind.
"""

from __future__ import annotations

#: Fragments (lower case) of the messages with which vmap refuses to batch an
#: operation that runs fine on one task, besides every message that begins with
#: ``"vmap: "`` (data-dependent control flow, ``.item()``, operators whose output
#: shape depends on the data: ``nonzero``, ``unique``, ``masked_select``,
#: boolean indexing, one-argument ``where``; in-place writes of batched values
#: into an unbatched tensor; ``rrelu``):
_REFUSALS = (
    # an operator with neither a batching rule nor a usable for-loop fallback
    # (``torch.equal``: "... We could not generate a fallback.")
    "batching rule not implemented for",
    # memory formats vmap has not implemented (``channels_last``)
    "inside vmap",
    "inside of vmap",
    # ``tensor.data``; ``.tolist()``, ``.numpy()`` of a batched tensor
    "under vmap transform is not allowed",
    "cannot access data pointer of tensor that doesn't have storage",
    # custom autograd Functions not written for torch.func
    "with functorch transforms",
    "does not have vmap support",
    # ``backward()`` and ``requires_grad_()`` inside the forward
    "called inside a functorch transform",
    "transformed by a functorch transform",
    # operators vmap special-cases
    "vmap over torch.allclose",
    "when vmap-ing torch.nn.functional.one_hot",
    "batch norm got a batched tensor as input",
)

#: Fragments of messages that vmap produces for operations it cannot batch but
#: that genuine errors produce too: the for-loop fallback of an operator
#: without a batching rule stacks per-task results whose shapes differ
#: (``argwhere``, ``repeat_interleave`` with tensor repeats); an in-place write
#: of a batched value into an unbatched tensor fails to broadcast; inside vmap
#: a tensor computed from the weights does not require grad, so a forward that
#: calls ``torch.autograd.grad`` fails. Batched mode tells them apart by
#: running the tasks one by one: a genuine error raises again there, exactly as
#: in the per-task loop.
_AMBIGUOUS = (
    "stack expects each tensor to be equal size",
    "doesn't match the broadcast shape",
    "does not require grad and does not have a grad_fn",
)


def vmap_cannot_batch(error: BaseException) -> bool:
    """Whether ``error``, raised inside ``torch.func.vmap``, may be vmap failing to batch.

    True for vmap's refusals (data-dependent control flow, ``.item()``,
    dynamic output shapes, operators without a batching rule, ...) and for the
    few messages that such a failure shares with genuine errors (see
    ``_AMBIGUOUS``); false for everything else, such as a shape mismatch in
    the forward. The caller must run the tasks one by one after a true answer
    and let an error raised there propagate: that is how the shared messages
    are settled, and it keeps every genuine error raising.
    """
    if not isinstance(error, RuntimeError):
        return False
    message = str(error).lower()
    return (
        message.startswith("vmap: ")
        or any(fragment in message for fragment in _REFUSALS)
        or any(fragment in message for fragment in _AMBIGUOUS)
    )
