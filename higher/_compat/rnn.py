"""Recurrent modules: the cached flat-weight list of ``nn.RNNBase`` and cuDNN's warning about it."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def quiet_flat_weights_warning() -> Iterator[None]:
    """Silences cuDNN's "RNN module weights are not part of single contiguous chunk".

    Fast weights are new tensors at every step, never one flat buffer, so
    cuDNN compacts them at each forward (as it must) and would warn at each
    forward; its advice, ``flatten_parameters()``, would overwrite the storage
    of tensors that carry autograd history. The warning says nothing the user
    can act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"RNN module weights are not part of single")
        yield


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
