"""higher.learn2learn.optim and .nn: learned update transforms and learn2learn's layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import higher.learn2learn as l2l
from higher.learn2learn.nn import (
    Flatten,
    KroneckerLinear,
    KroneckerLSTM,
    KroneckerRNN,
    Lambda,
    MetaModule,
    ParameterTransform,
    PrototypicalClassifier,
    Scale,
    freeze,
    kronecker_addmm,
    unfreeze,
)
from higher.learn2learn.optim import (
    DifferentiableSGD,
    KroneckerTransform,
    LearnableOptimizer,
    MetaCurvatureTransform,
    ModuleTransform,
    ParameterUpdate,
    ReshapedTransform,
    TransformDictionary,
)
from higher.learn2learn.utils import clone_module

F64 = torch.float64


def vec(x: torch.Tensor) -> torch.Tensor:
    """Column-major flattening, the convention of the Kronecker identity."""
    return x.t().reshape(-1)


# -- nn ----------------------------------------------------------------------------------
def test_small_layers():
    assert torch.equal(Lambda(lambda x, y: x * y)(torch.ones(2), y=3.0), torch.full((2,), 3.0))
    assert Flatten()(torch.ones(2, 3, 4)).shape == (2, 12)
    assert Scale().alpha.shape == (1,) and Scale(3).alpha.shape == (3,)
    scale = Scale((2, 1), alpha=0.5)
    assert torch.equal(scale(torch.ones(2, 3)), torch.full((2, 3), 0.5))
    model = nn.Linear(2, 1)
    assert freeze(model) is model and not any(p.requires_grad for p in model.parameters())
    assert unfreeze(model) is model and all(p.requires_grad for p in model.parameters())


def test_kronecker_linear_is_the_kronecker_product_map():
    g = torch.Generator().manual_seed(0)
    n, m = 3, 2
    layer = KroneckerLinear(n, m).double()
    with torch.no_grad():
        layer.left.copy_(torch.randn(n, n, generator=g, dtype=F64))
        layer.right.copy_(torch.randn(m, m, generator=g, dtype=F64))
        layer.bias.copy_(torch.randn(n, m, generator=g, dtype=F64))
    x = torch.randn(n, m, generator=g, dtype=F64)
    kron = torch.kron(
        layer.right.detach().t().contiguous(), layer.left.detach()
    )  # vec(L X R) = (R^T kron L) vec(X)
    want = kron @ vec(x) + vec(layer.bias)
    assert torch.allclose(vec(layer(x)), want)
    assert torch.allclose(layer(vec(x)), want)  # a flat input, column-major
    assert layer(torch.stack([x, x])).shape == (2, n, m)
    psd = KroneckerLinear(n, m, bias=False, psd=True).double()
    with torch.no_grad():
        psd.left.copy_(layer.left)
    assert torch.allclose(psd(x), layer.left.t() @ layer.left @ x)
    assert torch.allclose(
        kronecker_addmm(layer.left, layer.right, x, layer.bias, alpha=2.0, beta=3.0),
        2 * layer.left @ x @ layer.right + 3 * layer.bias,
    )
    with pytest.raises(ValueError, match="input vector must have n\\*m = 6 values"):
        layer(torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match=r"last two dimensions of the input must be \(3, 2\)"):
        layer(torch.ones(2, 3, dtype=F64))


def test_kronecker_cells():
    x, h, c = torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2)
    rnn = KroneckerRNN(3, 2)
    out, new_h = rnn(x, h)
    assert torch.allclose(new_h, torch.tanh(rnn.W_h(x) + rnn.U_h(h)))
    assert torch.allclose(out, rnn.W_y(new_h))
    lstm = KroneckerLSTM(3, 2, bias=False)
    out, (h2, c2) = lstm(x, (h, c))
    i = torch.sigmoid(lstm.W_ii(x) + lstm.W_hi(h))
    f = torch.sigmoid(lstm.W_if(x) + lstm.W_hf(h))
    gg = torch.tanh(lstm.W_ig(x) + lstm.W_hg(h))
    o = torch.sigmoid(lstm.W_io(x) + lstm.W_ho(h))
    assert torch.allclose(c2, f * c + i * gg) and torch.allclose(h2, o * torch.tanh(c2))
    assert out is h2 and len(list(lstm.parameters())) == 16


def test_prototypical_classifier():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [12.0, 10.0]], requires_grad=True)
    labels = torch.tensor([3, 3, 7, 7])
    head = PrototypicalClassifier(support, labels)
    assert torch.equal(head.prototypes, torch.tensor([[1.0, 0.0], [11.0, 10.0]]))
    logits = head(torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(logits, -torch.tensor([[1.0, 181.0]]))
    logits.sum().backward()  # the prototypes are differentiable
    assert support.grad is not None
    cosine = PrototypicalClassifier(support.detach(), labels, distance="cosine")
    assert cosine.normalize and torch.allclose(cosine.prototypes.norm(dim=1), torch.ones(2))
    custom = PrototypicalClassifier(distance=lambda p, q: (q[:, None] - p[None]).abs().sum(-1))
    with pytest.raises(RuntimeError, match=r"no prototypes yet: call fit_\(support, labels\)"):
        custom(torch.ones(1, 2))
    custom.fit_(support.detach(), labels)
    assert torch.allclose(custom(torch.tensor([[1.0, 1.0]])), -torch.tensor([[1.0, 19.0]]))
    with pytest.raises(ValueError, match="distance must be 'euclidean', 'cosine' or a function"):
        PrototypicalClassifier(distance="manhattan")


def test_parameter_transform_and_meta_module():
    linear = nn.Linear(2, 3)
    layer = ParameterTransform(linear, lambda p: Scale(1, alpha=2.0))
    x = torch.randn(4, 2)
    assert torch.allclose(layer(x), x @ (2 * linear.weight).t() + 2 * linear.bias)
    assert len(list(layer.meta_parameters())) == 2
    assert linear.weight in set(linear.parameters())  # the module keeps its parameters
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 1)))
    meta = MetaModule(model, {nn.Linear: lambda m: ParameterTransform(m, lambda p: Scale(1))})
    assert len(list(meta.meta_parameters())) == 4
    assert not any(p.requires_grad for p in model[0].module.parameters())
    assert meta(torch.ones(1, 2)).shape == (1, 1)
    assert isinstance(meta.module()[0], nn.Linear)


# -- optim -------------------------------------------------------------------------------
def test_transforms_namespace():
    assert l2l.optim.transforms.ModuleTransform is ModuleTransform
    from higher.learn2learn.optim.transforms import KroneckerTransform as K

    assert K is KroneckerTransform


def test_module_and_kronecker_transforms():
    t = ModuleTransform(nn.Linear)(torch.zeros(2, 3))
    assert isinstance(t, ReshapedTransform) and t.transform.in_features == 6
    assert t(torch.ones(2, 3)).shape == (2, 3)
    make = KroneckerTransform(KroneckerLinear)
    for shape, dims in [((4, 3), (4, 3)), ((5,), (5, 1)), ((6, 2, 3, 3), (2, 9))]:
        t = make(torch.zeros(shape))
        assert (t.transform.left.shape[0], t.transform.right.shape[0]) == dims
        assert t.transform.psd and t.transform.bias is None
        g = torch.randn(shape)
        assert torch.allclose(t(g), g)  # identity factors at first
    with pytest.raises(ValueError, match="KroneckerTransform: parameters of 3 dimensions"):
        make(torch.zeros(2, 2, 2))


def test_metacurvature_transform():
    g = torch.Generator().manual_seed(0)
    bias = MetaCurvatureTransform(torch.zeros(3), lr=0.5)
    assert torch.equal(bias(torch.ones(3)), torch.full((3,), 0.5))
    weight = MetaCurvatureTransform(torch.zeros(3, 2))
    with torch.no_grad():
        weight.mc_in.copy_(torch.randn(3, 3, generator=g))
    grad = torch.randn(3, 2, generator=g)
    assert torch.allclose(weight(grad), weight.mc_in @ grad)
    conv = MetaCurvatureTransform(torch.zeros(4, 2, 3, 3)).double()
    assert (conv.n_in, conv.n_out, conv.n_f) == (4, 2, 9)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    grad = torch.randn(4, 2, 3, 3, generator=g, dtype=F64)
    # A 4-d gradient is transformed by one matrix per dimension (channels, kernel).
    want = torch.einsum(
        "ai,ijf,jb,gf->abg", conv.mc_in, grad.reshape(4, 2, 9), conv.mc_out, conv.mc_f
    )
    assert torch.allclose(conv(grad), want.reshape(grad.shape))
    with pytest.raises(ValueError, match="MetaCurvatureTransform: parameters of 3 dimensions"):
        MetaCurvatureTransform(torch.zeros(2, 2, 2))


def test_transform_dictionary():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    pick = TransformDictionary(
        {model[0]: ModuleTransform(nn.Linear), model[1].bias: MetaCurvatureTransform}
    )
    chosen = [pick(p) for p in model.parameters()]
    assert isinstance(chosen[0], ReshapedTransform) and chosen[2] is None
    assert isinstance(chosen[3], MetaCurvatureTransform)
    with pytest.raises(ValueError, match="keys must be modules or parameters"):
        TransformDictionary({"weight": ModuleTransform(nn.Linear)})


def test_parameter_update():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    update = ParameterUpdate(
        model.parameters(), TransformDictionary({model[0]: lambda p: Scale(p.shape, alpha=3.0)})
    )
    x = torch.randn(4, 2)
    loss = model(x).pow(2).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    updates = update(loss, model.parameters(), create_graph=True)
    for i, (u, g) in enumerate(zip(updates, grads)):
        assert torch.allclose(u, 3 * g if i < 2 else g)
    assert updates[0].grad_fn is not None  # create_graph: differentiable in the transforms
    model[1].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"parameter 'parameters\[3\]' does not require grad"):
        update(model(x).sum(), model.parameters())
    assert update(model(x).sum(), model.parameters(), allow_nograd=True)[3] is None
    with pytest.raises(ValueError, match=r"does not depend on parameter 'parameters\[2\]'"):
        update(model[0](x).sum(), model.parameters(), allow_nograd=True)
    out = update(model[0](x).sum(), model.parameters(), allow_nograd=True, allow_unused=True)
    assert out[2] is None
    with pytest.raises(ValueError, match="transform returned a str for parameter 0"):
        ParameterUpdate(model.parameters(), lambda p: "nope")


def test_differentiable_sgd():
    clone = clone_module(nn.Linear(2, 1))
    weights = list(clone.parameters())
    grads = [torch.ones_like(p) for p in weights]
    DifferentiableSGD(lr=0.5)(clone, grads)
    assert all(torch.equal(p, w - 0.5) for p, w in zip(clone.parameters(), weights))
    for p in weights:
        p.grad = torch.full_like(p, 2.0)
    fresh = clone_module(nn.Linear(2, 1))
    for p, w in zip(fresh.parameters(), weights):
        p.grad = w.grad  # set by hand on a clone's (non-leaf) weights, as MAML++ does
    before = list(fresh.parameters())
    DifferentiableSGD(lr=0.5)(fresh)  # no gradients given: the weights' .grad
    assert all(torch.equal(p, b - 1.0) for p, b in zip(fresh.parameters(), before))
    plain = nn.Linear(2, 1)  # as in learn2learn, an ordinary module is stepped too
    start = [p.detach().clone() for p in plain.parameters()]
    DifferentiableSGD(lr=0.5)(plain, grads)
    assert all(torch.equal(p, b - 0.5) for p, b in zip(plain.parameters(), start))
    with pytest.raises(ValueError, match="gradients has 1 entries, the module 2 parameters"):
        DifferentiableSGD(lr=0.5)(clone, grads[:1])


def test_learnable_optimizer_steps_the_model_and_learns_its_transforms():
    model = nn.Linear(2, 1)  # learn2learn's README: an ordinary module
    metaopt = LearnableOptimizer(model, lambda p: Scale(p.shape, alpha=2.0), lr=0.1)
    assert len(list(metaopt.parameters())) == 2  # the transforms' only
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    ((model(x) - y) ** 2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    metaopt.step()
    for p, b, g in zip(model.parameters(), before, grads):
        assert torch.allclose(p, b - 0.1 * 2.0 * g)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    # d loss / d alpha = d loss / d p' * (-lr * g), with p' = p - lr * alpha * g.
    for t, p, g in zip(metaopt.transforms, model.parameters(), grads):
        assert torch.allclose(t.alpha.grad, -0.1 * g * p.grad)
    metaopt.zero_grad()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    with pytest.raises(TypeError, match=r"LearnableOptimizer: model must be an nn.Module"):
        LearnableOptimizer([nn.Parameter(torch.ones(1))], lambda p: Scale(p.shape))
