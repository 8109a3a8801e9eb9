"""``torch.func.vmap``: which of its errors mean a forward cannot be batched."""

from __future__ import annotations


def vmap_cannot_batch(error: BaseException) -> bool:
    """Whether ``error`` is vmap refusing a forward it cannot batch.

    Data-dependent control flow (``if mask.all():``, as transformers does with
    attention masks) and ``.item()`` on a batched tensor have no batched form;
    such a forward must run task by task.
    """
    message = str(error)
    return (
        isinstance(error, RuntimeError)
        and message.startswith("vmap: ")
        and ("data-dependent control flow" in message or ".item()" in message)
    )
