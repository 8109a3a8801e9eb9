"""The learned gradient transforms, away from their identity initialisation.

``MetaCurvatureTransform`` and ``KroneckerTransform`` start as identities, so a
test at initialisation cannot see a factor dropped or transposed. Here every
factor is random, and each transform is compared, in value and in gradient
(with respect to its factors and to the gradient it transforms), with an
independent computation: the explicit Kronecker-product matrix acting on the
column-major vectorised gradient, ``vec(A X B) = (B^T kron A) vec(X)``.

Cases come from fixed seeds; ``HIGHER_FUZZ_EXAMPLES`` runs more,
``HIGHER_FUZZ_SEED=<seed>`` replays one, as a failure says.
"""

from __future__ import annotations

import random

import pytest
import torch
from fuzz_support import seeds
from torch import nn

from higher.learn2learn.nn import KroneckerLinear
from higher.learn2learn.optim import ParameterUpdate
from higher.learn2learn.optim.transforms import KroneckerTransform, MetaCurvatureTransform

F64 = torch.float64
SEEDS = seeds(12)
TOL = {"rtol": 1e-10, "atol": 1e-12}


def replay(seed: int, what: str) -> str:
    return f"{what} (replay: HIGHER_FUZZ_SEED={seed} pytest {__file__})"


def vec(x: torch.Tensor) -> torch.Tensor:
    """Column-major vectorisation of a matrix or 3-tensor (first index fastest)."""
    return x.permute(*reversed(range(x.dim()))).reshape(-1)


def unvec(v: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return v.reshape(tuple(reversed(shape))).permute(*reversed(range(len(shape))))


def random_shape(rng: random.Random) -> tuple[int, ...]:
    kind = rng.choice([1, 2, 2, 4, 4])
    if kind == 1:
        return (rng.randint(1, 5),)
    if kind == 2:
        return (rng.randint(1, 5), rng.randint(1, 5))
    return (rng.randint(1, 4), rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 3))


def randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Every parameter off its initial value (identities, ones, zeros)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def grads_of(out: torch.Tensor, cotangent: torch.Tensor, inputs: list[torch.Tensor]) -> list:
    return list(torch.autograd.grad((out * cotangent).sum(), inputs))


# -- MetaCurvature ------------------------------------------------------------------------
def metacurvature_reference(t: MetaCurvatureTransform, grad: torch.Tensor) -> torch.Tensor:
    """The transform as one explicit matrix on the vectorised gradient."""
    shape = tuple(grad.shape)
    if len(shape) == 1:
        return t.lr * (torch.diag(t.mc) @ grad)
    if len(shape) == 2:  # mc_in @ G @ mc_out
        matrix = torch.kron(t.mc_out.t().contiguous(), t.mc_in)
        return t.lr * unvec(matrix @ vec(grad), shape)
    # out[i, m, n] = sum mc_in[i, a] g[a, b, l] mc_out[b, m] mc_f[n, l]: each factor on
    # its own index, so the matrix is mc_f kron mc_out^T kron mc_in.
    a, b = shape[0], shape[1]
    g3 = grad.reshape(a, b, -1)
    matrix = torch.kron(torch.kron(t.mc_f, t.mc_out.t().contiguous()), t.mc_in)
    return t.lr * unvec(matrix @ vec(g3), tuple(g3.shape)).reshape(shape)


@pytest.mark.parametrize("seed", SEEDS)
def test_metacurvature_off_identity_matches_kronecker_matrices(seed: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    shape = random_shape(rng)
    lr = rng.uniform(0.1, 2.0)
    t = MetaCurvatureTransform(torch.zeros(shape), lr=lr).double()
    randomize(t, gen)
    grad = torch.randn(shape, generator=gen, dtype=F64, requires_grad=True)
    cotangent = torch.randn(shape, generator=gen, dtype=F64)
    ours, theirs = t(grad), metacurvature_reference(t, grad)
    where = replay(seed, f"MetaCurvatureTransform on shape {shape}, lr={lr}")
    torch.testing.assert_close(ours, theirs, **TOL, msg=lambda m: f"{where}: value: {m}")
    inputs = [grad, *t.parameters()]
    names = ["grad", *(n for n, _ in t.named_parameters())]
    for name, a, b in zip(
        names, grads_of(ours, cotangent, inputs), grads_of(theirs, cotangent, inputs)
    ):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"{where}: d/d{n}: {m}")


def test_every_metacurvature_factor_matters() -> None:
    """Dropping or transposing any one factor changes the result (the test above can fail)."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 2), (3, 2, 2, 2)]:
        t = MetaCurvatureTransform(torch.zeros(shape)).double()
        randomize(t, gen)
        grad = torch.randn(shape, generator=gen, dtype=F64)
        want = metacurvature_reference(t, grad)
        for name, p in t.named_parameters():
            saved = p.detach().clone()
            for broken in (torch.eye(p.shape[0], dtype=F64), saved.t()):
                with torch.no_grad():
                    p.copy_(broken)
                assert not torch.allclose(metacurvature_reference(t, grad), want), (shape, name)
            with torch.no_grad():
                p.copy_(saved)


# -- Kronecker ------------------------------------------------------------------------------
def kronecker_reference(layer: KroneckerLinear, grad: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``ReshapedTransform(KroneckerLinear)``: each (n, m) slice of the gradient through
    the explicit ``R^T kron L`` matrix (of the PSD factors when asked), plus the bias."""
    left, right = layer.left, layer.right
    if layer.psd:
        left, right = left.t() @ left, right.t() @ right
    slices = grad.reshape(-1, n, m)
    k = slices.shape[0]
    matrix = torch.kron(torch.eye(k, dtype=grad.dtype), torch.kron(right.t().contiguous(), left))
    flat = torch.cat([vec(s) for s in slices])
    out = matrix @ flat
    if layer.bias is not None:
        out = out + vec(layer.bias).repeat(k)
    pieces = out.reshape(k, n * m)
    return torch.stack([unvec(piece, (n, m)) for piece in pieces]).reshape(grad.shape)


def expected_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    """learn2learn's reading of a parameter: a bias (n, 1), a weight (out, in), a
    convolution per output channel (in, kernel)."""
    if len(shape) == 1:
        return shape[0], 1
    if len(shape) == 2:
        return shape
    return shape[1], shape[2] * shape[3]


@pytest.mark.parametrize("seed", SEEDS)
def test_kronecker_transform_off_identity_matches_kronecker_matrices(seed: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    shape = random_shape(rng)
    bias, psd = rng.random() < 0.5, rng.random() < 0.5
    t = KroneckerTransform(KroneckerLinear, bias=bias, psd=psd)(torch.zeros(shape)).double()
    layer = t.transform
    n, m = expected_dims(shape)
    assert (layer.left.shape, layer.right.shape) == ((n, n), (m, m))
    randomize(t, gen)
    grad = torch.randn(shape, generator=gen, dtype=F64, requires_grad=True)
    cotangent = torch.randn(shape, generator=gen, dtype=F64)
    ours, theirs = t(grad), kronecker_reference(layer, grad, n, m)
    where = replay(seed, f"KroneckerTransform(bias={bias}, psd={psd}) on shape {shape}")
    torch.testing.assert_close(ours, theirs, **TOL, msg=lambda msg: f"{where}: value: {msg}")
    inputs = [grad, *t.parameters()]
    names = ["grad", *(name for name, _ in t.named_parameters())]
    for name, a, b in zip(
        names, grads_of(ours, cotangent, inputs), grads_of(theirs, cotangent, inputs)
    ):
        torch.testing.assert_close(a, b, **TOL, msg=lambda msg, x=name: f"{where}: d/d{x}: {msg}")


# -- through a learned update ------------------------------------------------------------------
@pytest.mark.parametrize("factory", ["metacurvature", "kronecker"])
def test_meta_gradient_through_parameter_update(factory: str) -> None:
    """A step ``p - transform(grad)`` on a linear and a convolutional layer: the
    meta-gradient reaching the transforms' factors matches the explicit matrices'."""
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(12, 2)).double()
    if factory == "metacurvature":
        update = ParameterUpdate(model.parameters(), lambda p: MetaCurvatureTransform(p, 0.3))

        def reference(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
            return metacurvature_reference(module, g)
    else:
        make = KroneckerTransform(KroneckerLinear, bias=True, psd=False)
        update = ParameterUpdate(model.parameters(), make)

        def reference(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
            return kronecker_reference(module.transform, g, *expected_dims(tuple(g.shape)))

    update = update.double()
    randomize(update, gen)
    x = torch.randn(5, 2, 3, 3, generator=gen, dtype=F64)
    y = torch.randn(5, 2, generator=gen, dtype=F64)
    params = list(model.parameters())

    def outer_loss(use_reference: bool) -> torch.Tensor:
        loss = nn.functional.mse_loss(model(x), y)
        if use_reference:
            grads = torch.autograd.grad(loss, params, create_graph=True)
            steps = [
                reference(update.transforms_modules[i], g)
                for i, g in zip(update.transforms_indices, grads)
            ]
        else:
            steps = update(loss, params, create_graph=True)
        new = {n: p - s for (n, p), s in zip(model.named_parameters(), steps)}
        return nn.functional.mse_loss(torch.func.functional_call(model, new, (x,)), y)

    meta = list(update.parameters())
    ours = torch.autograd.grad(outer_loss(False), meta)
    theirs = torch.autograd.grad(outer_loss(True), meta)
    for (name, _), a, b in zip(update.named_parameters(), ours, theirs):
        torch.testing.assert_close(a, b, **TOL, msg=lambda msg, x=name: f"{factory} {x}: {msg}")
