"""Everything this library knows about PyTorch internals, in one place.

Each helper here leans on behaviour that PyTorch does not promise to keep. When a
PyTorch release changes one of them, this is the only file to touch.
"""

from __future__ import annotations

import contextlib
import warnings
from array import array
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def math_attention() -> contextlib.AbstractContextManager[Any]:
        """Selects the math kernel of scaled_dot_product_attention.

        The fused CPU/CUDA attention kernels implement a backward but no double
        backward, so a meta-gradient through them fails. The math kernel is
        built from differentiable primitives.
        """
        return sdpa_kernel([SDPBackend.MATH])

except ImportError:  # pragma: no cover - torch 2.1 / 2.2

    def math_attention() -> contextlib.AbstractContextManager[Any]:
        return torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )


def refresh_flat_weights(module: nn.Module) -> None:
    """Re-reads an RNN's ``_flat_weights`` list after its parameters changed.

    ``nn.RNNBase.forward`` reads weights from this cached list rather than from
    ``_parameters``. We deliberately skip ``flatten_parameters()``: on CUDA it
    rewrites the weights' storage in place, which would corrupt fast weights
    that carry autograd history.
    """
    names: list[str] = module._flat_weights_names  # type: ignore[assignment]
    params = module._parameters
    module.__dict__["_flat_weights"] = [params.get(n) for n in names]


def has_flat_weights(module: nn.Module) -> bool:
    # An instance attribute of nn.RNNBase; checked in __dict__ because hasattr
    # on a module goes through the slow nn.Module.__getattr__.
    return "_flat_weights_names" in module.__dict__


def scalar_dtype() -> torch.dtype:
    """The dtype ``torch.optim`` uses for scalar state such as ``step``."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def round_like_scalar_state(value: float) -> float:
    """Rounds a Python float as torch.optim does when it stores it in a scalar tensor.

    torch keeps ``eta``, ``mu`` and ``mu_product`` as tensors of the scalar dtype
    and reads them back with ``.item()``; with a float32 default dtype that rounds
    the value, and matching torch step for step means rounding identically.
    """
    if scalar_dtype() == torch.float32:
        return array("f", (value,))[0]
    return value


@contextlib.contextmanager
def quiet_scheduler_order_warning() -> Iterator[None]:
    """Silences torch's "lr_scheduler.step() before optimizer.step()" warning.

    A differentiable optimizer steps instead of the torch optimizer that the
    scheduler watches, so the warning would be a false alarm.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        yield


# -- pytrees (torch.utils._pytree is private) ---------------------------------------
tree_flatten = _pytree.tree_flatten
tree_unflatten = _pytree.tree_unflatten
tree_leaves = _pytree.tree_leaves
tree_map = _pytree.tree_map


def tree_in_dims(tree: Any) -> Any:
    """``vmap`` in_dims for a pytree: 0 for its tensors, None for anything else."""
    return _pytree.tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, tree)
