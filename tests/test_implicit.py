"""Implicit meta-gradients against closed forms and a converged long unroll."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import higher
from higher.implicit import imaml_grad, implicit_grad, proximal_term

F64 = torch.float64


def ridge_data():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 5, generator=g, dtype=F64)
    y = torch.randn(20, generator=g, dtype=F64)
    Xv = torch.randn(15, 5, generator=g, dtype=F64)
    yv = torch.randn(15, generator=g, dtype=F64)
    return X, y, Xv, yv


def ridge_closed_form(X, y, Xv, yv, lam, damping=0.0):
    """w*, dL/dlam and dL/dy for L = 1/2 ||Xv w* - yv||^2."""
    eye = torch.eye(X.shape[1], dtype=F64)
    A = X.T @ X + lam * eye
    w = torch.linalg.solve(A, X.T @ y)
    u = torch.linalg.solve(A + damping * eye, Xv.T @ (Xv @ w - yv))
    return w, -(w @ u), X @ u, torch.linalg.eigvalsh(A).max()


def solved_ridge(X, y, lam_value, steps=400):
    """The inner problem solved by a plain, untracked inner loop on a patched module."""
    model = nn.Linear(5, 1, bias=False).double()
    lr = 1.0 / float(torch.linalg.eigvalsh(X.T @ X).max() + lam_value)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(steps):
            w = fmodel.fast_params[0]
            loss = 0.5 * ((fmodel(X).squeeze(1) - y) ** 2).sum() + 0.5 * lam_value * (w**2).sum()
            diffopt.step(loss)
    return fmodel


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_ridge_regression_closed_forms(method):
    X, y0, Xv, yv = ridge_data()
    lam = torch.tensor(0.7, dtype=F64, requires_grad=True)
    y = y0.clone().requires_grad_()
    fmodel = solved_ridge(X, y0, 0.7)
    w_star, dlam, dy, top = ridge_closed_form(X, y0, Xv, yv, 0.7)
    torch.testing.assert_close(fmodel.fast_params[0][0], w_star, atol=1e-8, rtol=0)

    def inner(params):
        pred = fmodel(X, params=params).squeeze(1)
        return 0.5 * ((pred - y) ** 2).sum() + 0.5 * lam * (params[0] ** 2).sum()

    def outer(params):
        return 0.5 * ((fmodel(Xv, params=params).squeeze(1) - yv) ** 2).sum()

    before = fmodel.fast_params
    settings = {"max_iter": 2000, "step_size": 1 / float(top)} if method == "neumann" else {}
    (g_lam, g_y), report = implicit_grad(
        inner, outer, fmodel, [lam, y], method=method, tol=1e-12, **settings
    )
    assert report.converged and report.residual <= 1e-12 and report.method == method
    torch.testing.assert_close(g_lam, dlam, atol=1e-8, rtol=0)
    torch.testing.assert_close(g_y, dy, atol=1e-8, rtol=0)
    # The patched module is handed back as it was: untracked, same fast weights.
    assert not fmodel.track_higher_grads and fmodel.fast_params is before


def test_damping_and_an_unconverged_report():
    X, y, Xv, yv = ridge_data()
    lam = torch.tensor(0.7, dtype=F64, requires_grad=True)
    w_star, _, _, _ = ridge_closed_form(X, y, Xv, yv, 0.7)
    _, dlam, _, _ = ridge_closed_form(X, y, Xv, yv, 0.7, damping=2.0)

    def inner(p):
        return 0.5 * ((X @ p[0] - y) ** 2).sum() + 0.5 * lam * (p[0] ** 2).sum()

    def outer(p):
        return 0.5 * ((Xv @ p[0] - yv) ** 2).sum()

    (g,), report = implicit_grad(inner, outer, [w_star], [lam], damping=2.0)
    assert report.converged
    torch.testing.assert_close(g, dlam, atol=1e-8, rtol=0)
    (_,), report = implicit_grad(inner, outer, [w_star], [lam], max_iter=1)
    assert report.iterations == 1 and not report.converged and report.residual > 1e-3


def test_imaml_matches_a_converged_long_unroll():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    g = torch.Generator().manual_seed(4)
    x, xv = (torch.rand(10, 1, generator=g, dtype=F64) * 4 - 2 for _ in range(2))
    y, yv = torch.sin(x), torch.sin(xv)
    lam = 4.0  # strong enough for a unique, well-conditioned inner minimum
    theta = list(model.parameters())

    def train(fmodel, params=None):
        return ((fmodel(x, params=params) - y) ** 2).mean()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(150):  # contracts by about 0.65 per step: converged
            prox = proximal_term(fmodel.fast_params, theta, lam)
            diffopt.step(train(fmodel) + prox)
        unrolled = torch.autograd.grad(((fmodel(xv) - yv) ** 2).mean(), theta)
        solution = [p.detach() for p in fmodel.fast_params]

    fm = higher.monkeypatch(model)
    grads, report = imaml_grad(
        lambda p: train(fm, p),
        lambda p: ((fm(xv, params=p) - yv) ** 2).mean(),
        solution,
        theta,
        lam,
        tol=1e-10,
    )
    assert report.converged
    for a, b in zip(grads, unrolled):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
    # Neumann agrees within its own tolerance (step below 2 / the largest eigenvalue).
    neumann, report = imaml_grad(
        lambda p: train(fm, p),
        lambda p: ((fm(xv, params=p) - yv) ** 2).mean(),
        solution,
        theta,
        lam,
        method="neumann",
        step_size=0.1,
        tol=1e-8,
        max_iter=500,
    )
    assert report.converged
    for a, b in zip(neumann, unrolled):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_errors():
    w = torch.zeros(2, dtype=F64, requires_grad=True)
    lam = torch.tensor(1.0, dtype=F64, requires_grad=True)

    def inner(p):
        return ((p[0] - 1) ** 2).sum() + lam * (p[0] ** 2).sum()

    def outer(p):
        return p[0].sum()

    cases = [
        (dict(method="lu"), ValueError, "method must be one of cg, neumann, got 'lu'"),
        (dict(max_iter=0), ValueError, "max_iter must be a positive int"),
        (dict(tol=-1.0), ValueError, "tol must be >= 0"),
        (dict(damping=-0.1), ValueError, "damping must be >= 0"),
        (dict(step_size=0.0), ValueError, "step_size must be a positive number"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            implicit_grad(inner, outer, [w], [lam], **kwargs)
    with pytest.raises(ValueError, match="meta_params is empty"):
        implicit_grad(inner, outer, [w], [])
    with pytest.raises(
        ValueError, match=r"meta_params\[0\] \(shape \(2,\)\) does not require grad"
    ):
        implicit_grad(inner, outer, [w], [torch.zeros(2)])
    with pytest.raises(ValueError, match=r"inner_loss must return a scalar tensor, got \(2,\)"):
        implicit_grad(lambda p: p[0] * lam, outer, [w], [lam])
    with pytest.raises(ValueError, match="inner_loss does not depend on the solution"):
        implicit_grad(lambda p: lam * 2, outer, [w], [lam])
    with pytest.raises(TypeError, match="solution must be a sequence of tensors or a patched"):
        implicit_grad(inner, outer, w, [lam])
    with pytest.raises(ValueError, match="2 params but 1 anchors"):
        proximal_term([w, w], [w], 1.0)
