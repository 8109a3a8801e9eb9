"""Implicit differentiation: meta-gradients through the solution of an inner problem.

Unrolling differentiates every inner step; this module differentiates only the
*answer*. When the inner loop has converged to ``phi*`` with
``grad_phi f(phi*, theta) = 0``, the implicit function theorem gives the
meta-gradient of an outer loss ``L(phi*, theta)`` as
``dL/dtheta = dL/dtheta|direct - (d2f/dtheta dphi) v`` where ``v`` solves
``H v = dL/dphi`` and ``H = d2f/dphi2``. ``H`` is never formed: the linear system
is solved by conjugate gradient (or a Neumann series) on Hessian-vector products
taken by double backward through one evaluation of the inner loss. Memory and
cost therefore do not depend on how many steps the inner loop took, which may
run with ``track_higher_grads=False`` (no graph at all) and any optimizer; the
price is a converged inner problem and a few dozen Hessian-vector products.
:func:`implicit_grad` works on plain tensors or a patched module;
:func:`imaml_grad` adds iMAML's proximal term ``lam/2 * ||phi - theta||^2``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._patched import _MonkeyPatchBase

__all__ = ["SolverReport", "imaml_grad", "implicit_grad", "proximal_term"]

LossFn = Callable[[list[Tensor]], Tensor]
_METHODS = ("cg", "neumann")
#: Iterations between two convergence checks (host syncs) on an accelerator.
_ACCELERATOR_CHECK_EVERY = 4


@dataclass(frozen=True)
class SolverReport:
    """How well the linear system ``(H + damping * I) v = dL/dphi`` was solved.

    Attributes:
        method: ``"cg"`` or ``"neumann"``.
        iterations: the solver's iterations (one Hessian-vector product each)
            until it converged, met a direction of non-positive curvature (CG)
            or reached ``max_iter``. Between two convergence checks (see
            ``check_every``) a few more products may have been computed and
            discarded.
        residual: the final relative residual ``||b - (H + damping I) v|| / ||b||``,
            measured with one more Hessian-vector product.
        converged: whether ``residual <= tol`` was reached within ``max_iter``.
    """

    method: str
    iterations: int
    residual: float
    converged: bool


def implicit_grad(
    inner_loss: LossFn,
    outer_loss: LossFn,
    solution: Any,
    meta_params: Sequence[Tensor],
    *,
    method: str = "cg",
    max_iter: int = 100,
    tol: float | None = None,
    damping: float = 0.0,
    step_size: float = 1.0,
    check_every: int | None = None,
) -> tuple[list[Tensor | None], SolverReport]:
    """The meta-gradient of ``outer_loss`` at the inner problem's solution.

    Args:
        inner_loss: ``inner_loss(params)``: the scalar inner objective, a
            function of the inner parameters and (through the tensors it uses)
            of ``meta_params``. ``solution`` must be a stationary point of it.
        outer_loss: ``outer_loss(params)``: the scalar outer objective. It may
            also use ``meta_params`` directly.
        solution: the converged inner parameters: a sequence of tensors, or a
            patched module (:func:`higher.monkeypatch`) whose current fast
            weights are taken. A patched module runs with history tracking on
            while the losses are evaluated, so ``fmodel(x, params=params)``
            inside the losses works even when the inner loop ran with
            ``track_higher_grads=False``.
        meta_params: the tensors to differentiate with respect to (initial
            weights of a proximal term, regularisation strengths, data
            weights...); each must require grad.
        method: ``"cg"`` (conjugate gradient, for a positive definite
            ``H + damping I``) or ``"neumann"`` (the series
            ``step_size * sum_k (I - step_size (H + damping I))^k b``, which
            needs ``step_size`` below ``2 / lambda_max``).
        max_iter: the most Hessian-vector products the solver may take.
        tol: stop when the relative residual falls below ``tol``; by default
            ``1e-10``, or ``100 * eps`` of the dtype when that is larger
            (``1.2e-5`` in float32).
        damping: added to the Hessian's diagonal (Tikhonov damping); it
            biases the result but makes ill-conditioned systems solvable.
        step_size: the Neumann series' step; unused by CG.
        check_every: how many iterations pass between two convergence checks.
            Each check reads the solver's state on the host (a device sync);
            iterations taken past convergence before the next check are
            discarded, so the result and the report do not depend on it, only
            the work does. By default every iteration for tensors on the CPU,
            where a check costs nothing, and every 4 on an accelerator; with
            ``tol=0`` (a fixed budget of ``max_iter`` iterations) never. The
            report is read once, at the end.

    Returns:
        ``(grads, report)``: one gradient per meta-parameter (``None`` where
        neither loss depends on it) and a :class:`SolverReport`. Check
        ``report.converged``; the gradients are only as good as the solve.

    Raises:
        ValueError: an unknown method, a bad solver setting, an empty
            ``meta_params`` or one that does not require grad, a loss that is
            not a scalar, or an inner loss that does not depend on the
            solution.

    Example:
        Ridge regression: the inner solution ``w*(lam)`` and the gradient of a
        validation loss with respect to ``lam``.

        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
        >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> A = X.T @ X + lam.detach() * torch.eye(3, dtype=torch.float64)
        >>> w_star = torch.linalg.solve(A, X.T @ y)
        >>> inner = lambda p: 0.5 * ((X @ p[0] - y) ** 2).sum() + 0.5 * lam * (p[0] ** 2).sum()
        >>> outer = lambda p: 0.5 * ((X @ p[0] - 1.0) ** 2).sum()
        >>> (g_lam,), report = higher.implicit.implicit_grad(inner, outer, [w_star], [lam])
        >>> report.converged
        True
        >>> grad_out = X.T @ (X @ w_star - 1.0)
        >>> torch.allclose(g_lam, -grad_out @ torch.linalg.solve(A, w_star))
        True
    """
    _check_settings(method, max_iter, 0.0 if tol is None else tol, damping, step_size)
    if check_every is not None and not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"check_every must be a positive int or None, got {check_every!r}")
    meta = list(meta_params)
    if not meta:
        raise ValueError("meta_params is empty: give the tensors to differentiate with respect to")
    for i, t in enumerate(meta):
        if not isinstance(t, Tensor):
            raise TypeError(f"meta_params[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not t.requires_grad:
            raise ValueError(f"meta_params[{i}] (shape {tuple(t.shape)}) does not require grad")

    fmodel, start = _solution_tensors(solution)
    # A patched solution is lent with tracking on, so that the losses may call
    # it with params=...; its fast weights and history are put back after.
    lent = contextlib.nullcontext() if fmodel is None else fmodel._higher_lend(track=True)
    with lent:
        phi = [s.detach().requires_grad_() for s in start]
        with torch.enable_grad():
            out = _scalar(outer_loss(phi), "outer_loss")
            direct = torch.autograd.grad(out, phi + meta, allow_unused=True)
            b = [_zero_if_none(g, p) for g, p in zip(direct[: len(phi)], phi)]
            inner = _scalar(inner_loss(phi), "inner_loss")
            grads_phi = torch.autograd.grad(inner, phi, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads_phi) if g is not None and g.requires_grad]
        if not used:
            raise ValueError(
                "inner_loss does not depend on the solution's tensors (or has no second "
                "derivative): the implicit function theorem needs grad_phi inner_loss(phi)"
            )

        def hvp(v: list[Tensor]) -> list[Tensor]:
            hv = torch.autograd.grad(
                [grads_phi[i] for i in used],
                phi,
                grad_outputs=[v[i] for i in used],
                retain_graph=True,
                allow_unused=True,
            )
            out = [_zero_if_none(h, p) for h, p in zip(hv, phi)]
            if damping:
                out = [h + damping * x for h, x in zip(out, v)]
            return out

        if tol is None:
            tol = max(1e-10, 100 * torch.finfo(b[0].dtype).eps)
        if check_every is None:
            on_cpu = b[0].device.type == "cpu"
            check_every = max_iter if tol == 0 else 1 if on_cpu else _ACCELERATOR_CHECK_EVERY
        solve = _conjugate_gradient if method == "cg" else _neumann
        v, count = solve(hvp, b, max_iter, tol, step_size, check_every)
        res = _sub(b, hvp(v))
        # The report's one host sync (float32 at least: it counts exactly to 2**24).
        wide = torch.promote_types(b[0].dtype, torch.float32)
        summary = torch.stack([_dot(res, res).to(wide), _dot(b, b).to(wide), count.to(wide)])
        res_sq, b_sq, iterations = summary.tolist()
        residual = math.sqrt(res_sq) / max(math.sqrt(b_sq), torch.finfo(b[0].dtype).tiny)
        mixed = torch.autograd.grad(
            [grads_phi[i] for i in used],
            meta,
            grad_outputs=[v[i] for i in used],
            allow_unused=True,
        )
    grads: list[Tensor | None] = []
    for d, m in zip(direct[len(phi) :], mixed):
        if d is None and m is None:
            grads.append(None)
        elif m is None:
            grads.append(d)
        else:
            grads.append(-m if d is None else d - m)
    report = SolverReport(method, int(iterations), residual, residual <= tol)
    return grads, report


def imaml_grad(
    inner_loss: LossFn,
    outer_loss: LossFn,
    solution: Any,
    meta_params: Sequence[Tensor],
    lam: float | Tensor,
    **solver: Any,
) -> tuple[list[Tensor | None], SolverReport]:
    """iMAML's meta-gradient: ``solution`` minimises ``inner_loss + lam/2 ||phi - theta||^2``.

    ``theta`` are ``meta_params``, the initial weights the inner loop started
    from and is pulled back to. The inner loop must have minimised the same
    regularised objective (add :func:`proximal_term` to its loss). Then
    ``dL/dtheta = (I + H_train / lam)^-1 dL/dphi``, whatever the inner loop's
    length or optimizer.

    Args:
        inner_loss: the task's training loss ``inner_loss(params)``, without
            the proximal term.
        outer_loss: the task's validation loss ``outer_loss(params)``.
        solution: the adapted weights (tensors or a patched module).
        meta_params: the initial weights ``theta``, in the solution's order.
        lam: the proximal strength (a number, or a tensor that may require
            grad to learn it too, in which case list it in ``meta_params``
            after the weights).
        **solver: ``method``, ``max_iter``, ``tol``, ``damping``, ``step_size``,
            ``check_every`` as for :func:`implicit_grad`.

    Returns:
        As :func:`implicit_grad`.

    Example:
        >>> theta = [torch.zeros(2, dtype=torch.float64, requires_grad=True)]
        >>> target = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> train = lambda p: 0.5 * ((p[0] - target) ** 2).sum()
        >>> phi = [target / 2]  # the minimiser of train + 1/2 ||phi - 0||^2
        >>> (g,), report = higher.implicit.imaml_grad(train, lambda p: p[0].sum(), phi, theta, lam=1.0)
        >>> g.tolist()  # (I + H / lam)^-1 applied to ones, with H = I
        [0.5, 0.5]
    """
    anchors = list(meta_params)[: len(_solution_tensors(solution)[1])]

    def regularised(params: list[Tensor]) -> Tensor:
        return inner_loss(params) + proximal_term(params, anchors, lam)

    return implicit_grad(regularised, outer_loss, solution, meta_params, **solver)


def proximal_term(
    params: Sequence[Tensor], anchors: Sequence[Tensor], lam: float | Tensor
) -> Tensor:
    """``lam / 2 * sum ||p - a||^2``: the pull of adapted weights back to their start.

    Args:
        params: the adapted weights.
        anchors: where they are pulled to, one per weight (iMAML's ``theta``).
        lam: the strength.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: the two sequences differ in length.

    Example:
        >>> higher.implicit.proximal_term([torch.ones(3)], [torch.zeros(3)], 2.0)
        tensor(3.)
    """
    params, anchors = list(params), list(anchors)
    if len(params) != len(anchors):
        raise ValueError(f"proximal_term: {len(params)} params but {len(anchors)} anchors")
    total = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
    return 0.5 * lam * total  # type: ignore[return-value]


# -- solvers -----------------------------------------------------------------------
# The solvers keep their scalars (dot products, the convergence flag, the count of
# iterations) on the device of ``b``: an iteration launches its work and reads
# nothing back. Whether to go on is read on the host every ``check_every``
# iterations only; the iterations in between that follow convergence are
# computed and discarded (their step is masked to zero), so the solution and the
# count are the same for every ``check_every``.


def _conjugate_gradient(
    hvp: Callable[[list[Tensor]], list[Tensor]],
    b: list[Tensor],
    max_iter: int,
    tol: float,
    step_size: float,
    check_every: int,
) -> tuple[list[Tensor], Tensor]:
    x = [torch.zeros_like(t) for t in b]
    r = list(b)
    p = list(b)
    rr = _dot(r, r)
    stop = tol * tol * rr  # ||r||^2 <= (tol ||b||)^2
    running = rr > stop
    count = torch.zeros((), dtype=torch.int64, device=rr.device)
    for k in range(max_iter):
        hp = hvp(p)
        count = count + running
        curvature = _dot(p, hp)
        # Not positive definite along p: stop there; the report shows the residual.
        running = running & (curvature > 0)
        alpha = torch.where(running, rr / torch.where(running, curvature, 1.0), 0.0)
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * hi for ri, hi in zip(r, hp)]
        rr_new = _dot(r, r)
        beta = torch.where(running, rr_new / torch.where(running, rr, 1.0), 0.0)
        p = [ri + beta * pi for ri, pi in zip(r, p)]
        rr = rr_new
        running = running & (rr > stop)
        if _time_to_stop(k, max_iter, check_every, running):
            break
    return x, count


def _neumann(
    hvp: Callable[[list[Tensor]], list[Tensor]],
    b: list[Tensor],
    max_iter: int,
    tol: float,
    step_size: float,
    check_every: int,
) -> tuple[list[Tensor], Tensor]:
    # v = a * sum_k (I - a A)^k b, built term by term: term <- term - a A term.
    term = [step_size * t for t in b]
    v = list(term)
    # The residual b - A v is about term / a: stop once ||term|| / a <= tol ||b||.
    stop = (tol * step_size) ** 2 * _dot(b, b)
    running = torch.ones((), dtype=torch.bool, device=stop.device)
    count = torch.zeros((), dtype=torch.int64, device=stop.device)
    for k in range(max_iter):
        h = hvp(term)
        count = count + running
        new = [t - step_size * hi for t, hi in zip(term, h)]
        v = [torch.where(running, vi + n, vi) for vi, n in zip(v, new)]
        term = [torch.where(running, n, t) for n, t in zip(new, term)]
        running = running & (_dot(term, term) > stop)
        if _time_to_stop(k, max_iter, check_every, running):
            break
    return v, count


def _time_to_stop(k: int, max_iter: int, check_every: int, running: Tensor) -> bool:
    """Whether the solver may leave after iteration ``k``: the one host sync, when due."""
    due = (k + 1) % check_every == 0 and k + 1 < max_iter
    return due and not bool(running)


# -- helpers -----------------------------------------------------------------------
def _check_settings(method: str, max_iter: int, tol: float, damping: float, step: float) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {', '.join(_METHODS)}, got {method!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    if not (step > 0 and math.isfinite(step)):
        raise ValueError(f"step_size must be a positive number, got {step!r}")


def _solution_tensors(solution: Any) -> tuple[Any, list[Tensor]]:
    if isinstance(solution, _MonkeyPatchBase):
        current = solution.fast_params
        if current is None:
            raise ValueError("the patched module given as solution has no fast weights")
        return solution, list(current)
    if isinstance(solution, Tensor) or not isinstance(solution, Sequence):
        raise TypeError(
            "solution must be a sequence of tensors or a patched module, got "
            f"{type(solution).__name__}"
        )
    for i, s in enumerate(solution):
        if not isinstance(s, Tensor):
            raise TypeError(f"solution[{i}] must be a torch.Tensor, got {type(s).__name__}")
    if not solution:
        raise ValueError("solution is empty")
    return None, list(solution)


def _scalar(value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{what} must return a scalar tensor, got {shape}")
    return value


def _zero_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def _sub(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    return [x - y for x, y in zip(a, b)]
