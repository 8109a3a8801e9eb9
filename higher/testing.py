"""Check the meta-gradients of your own inner loops against finite differences.

Example:
    >>> model = torch.nn.Linear(2, 1).double()
    >>> lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    >>> x, y = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    >>> def outer_loss():
    ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ...     with higher.innerloop_ctx(model, opt, copy_initial_weights=False,
    ...                               override={"lr": lr}) as (fmodel, diffopt):
    ...         _ = diffopt.step(((fmodel(x) - y) ** 2).mean())
    ...         return ((fmodel(x) - y) ** 2).mean()
    >>> report = check_meta_gradient(outer_loss, {**dict(model.named_parameters()), "lr": lr})
    >>> report.ok
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["MetaGradientError", "MetaGradientReport", "check_meta_gradient"]


class MetaGradientError(AssertionError):
    """Raised by :func:`check_meta_gradient` when gradients disagree; holds the report."""

    def __init__(self, report: MetaGradientReport) -> None:
        super().__init__(str(report))
        self.report = report


@dataclass(frozen=True)
class MetaGradientReport:
    """The outcome of :func:`check_meta_gradient`.

    Attributes:
        ok: every checked entry agreed within ``atol + rtol * |numeric|``.
        checked: how many entries were compared.
        max_abs_error: the largest ``|analytic - numeric|`` over all entries.
        worst_input: name of the input holding the worst entry (the one
            furthest outside its tolerance, or closest to it).
        worst_index: that entry's index within its input.
        analytic: autograd's value there.
        numeric: the central finite difference there.
        atol, rtol: the tolerances used.
    """

    ok: bool
    checked: int
    max_abs_error: float
    worst_input: str
    worst_index: tuple[int, ...]
    analytic: float
    numeric: float
    atol: float
    rtol: float

    def __str__(self) -> str:
        verdict = "meta-gradient OK" if self.ok else "meta-gradient MISMATCH"
        return (
            f"{verdict}: {self.checked} entries checked; worst at {self.worst_input}"
            f"{list(self.worst_index)}: autograd {self.analytic:.10g}, finite differences "
            f"{self.numeric:.10g} (|diff| {abs(self.analytic - self.numeric):.3g}, allowed "
            f"{self.atol + self.rtol * abs(self.numeric):.3g}); largest |diff| "
            f"{self.max_abs_error:.3g}"
        )


def _named(inputs: Mapping[str, Tensor] | Sequence[Tensor] | nn.Module) -> list[tuple[str, Tensor]]:
    if isinstance(inputs, nn.Module):
        return list(inputs.named_parameters())
    if isinstance(inputs, Mapping):
        return list(inputs.items())
    return [(f"inputs[{i}]", t) for i, t in enumerate(inputs)]


def check_meta_gradient(
    outer_loss: Callable[[], Tensor],
    inputs: Mapping[str, Tensor] | Sequence[Tensor] | nn.Module,
    *,
    eps: float = 1e-6,
    atol: float = 1e-6,
    rtol: float = 1e-4,
    max_entries: int | None = None,
    raise_on_failure: bool = False,
    seed: int = 0,
) -> MetaGradientReport:
    """Compares autograd's meta-gradient with central finite differences.

    ``outer_loss`` runs your whole inner loop from the current values of
    ``inputs`` (initial weights, learnable hyperparameters) and returns the
    outer loss. Each input entry is nudged in place by ``+-eps`` and the loss
    re-evaluated, so ``outer_loss`` must read the inputs afresh on each call
    and be deterministic (no dropout, fixed data).

    Args:
        outer_loss: a callable with no arguments returning a scalar tensor.
        inputs: named tensors (a dict, or a module for its parameters) or a
            list; all float64 leaves that require grad.
        eps: the finite-difference step.
        atol, rtol: an entry agrees when ``|analytic - numeric| <= atol + rtol *
            |numeric|``.
        max_entries: check at most this many entries, drawn at random (for
            large models); all when None.
        raise_on_failure: raise :class:`MetaGradientError` instead of returning
            a failing report.
        seed: seeds the draw of entries.

    Returns:
        A :class:`MetaGradientReport`; ``str(report)`` reads well in a test.

    Raises:
        TypeError: an input is not a float64 tensor that requires grad.
        ValueError: ``outer_loss`` does not return a scalar.
    """
    named = _named(inputs)
    for name, t in named:
        if not isinstance(t, Tensor) or t.dtype != torch.float64 or not t.requires_grad:
            what = (
                f"{t.dtype} requires_grad={t.requires_grad}"
                if isinstance(t, Tensor)
                else type(t).__name__
            )
            raise TypeError(
                f"check_meta_gradient needs float64 tensors that require grad; '{name}' is {what} "
                "(convert with .double() and .requires_grad_())"
            )
    loss = outer_loss()
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("outer_loss must return a scalar tensor")
    tensors = [t for _, t in named]
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    analytic = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]

    entries = [(k, j) for k, t in enumerate(tensors) for j in range(t.numel())]
    if max_entries is not None and len(entries) > max_entries:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(entries), generator=gen)[:max_entries].tolist()
        entries = [entries[i] for i in sorted(pick)]

    worst = None
    max_abs = 0.0
    for k, j in entries:
        flat = tensors[k].data.view(-1)
        original = flat[j].item()
        with torch.no_grad():
            flat[j] = original + eps
        plus = outer_loss().item()
        with torch.no_grad():
            flat[j] = original - eps
        minus = outer_loss().item()
        with torch.no_grad():
            flat[j] = original
        numeric = (plus - minus) / (2 * eps)
        value = analytic[k].reshape(-1)[j].item()
        max_abs = max(max_abs, abs(value - numeric))
        excess = abs(value - numeric) - (atol + rtol * abs(numeric))
        if worst is None or excess > worst[0]:
            worst = (excess, k, j, value, numeric)

    if worst is None:
        raise ValueError("check_meta_gradient: the inputs have no entries to check")
    excess, k, j, value, numeric = worst
    shape = tensors[k].shape
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(j), shape)) if shape else ()
    report = MetaGradientReport(
        ok=excess <= 0,
        checked=len(entries),
        max_abs_error=max_abs,
        worst_input=named[k][0],
        worst_index=index,
        analytic=value,
        numeric=numeric,
        atol=atol,
        rtol=rtol,
    )
    if raise_on_failure and not report.ok:
        raise MetaGradientError(report)
    return report
