"""higher.learn2learn.algorithms: MAML, MetaSGD and GBML against hand-written references.

The references are the unrolls written with ``torch.func.functional_call`` and
``torch.autograd.grad``: ``p - lr * g`` (MAML), ``p - lr_p * g`` (Meta-SGD),
``p - lr * T_p(g)`` with Meta-Curvature's transform written out (GBML), in
float64 to 1e-9 on an MLP, the 4-block conv net with BatchNorm, an LSTM and a
transformers model with its default (sdpa) attention. In float32 at PyTorch's
defaults the same programs are held to the bound of ``test_float32_matrix.py``.
Then learn2learn's documented behaviour (clones of clones, ``.grad`` of the
original, shared buffers, the options) and the refusals of bad input.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_float32_matrix import assert_within_bound, build, call, loss, problem
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import higher.learn2learn as l2l
from higher.learn2learn.algorithms import GBML, MAML, MetaSGD, maml_update, meta_sgd_update
from higher.learn2learn.optim import MetaCurvatureTransform
from higher.learn2learn.utils import clone_module

LR = 0.3
STEPS = 2
TOL = 1e-9


# -- models and data (float64) ------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def conv4() -> nn.Module:
    def block(cin: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1), *block(4), *block(4), *block(4), nn.Flatten(), nn.Linear(4, 3))


class LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


class BertLogits(nn.Module):
    """A one-layer BERT with transformers' default attention (sdpa), returning its logits."""

    def __init__(self) -> None:
        super().__init__()
        tf = pytest.importorskip("transformers")
        config = tf.BertConfig(
            vocab_size=16,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=8,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.bert = tf.BertForMaskedLM(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids).logits.flatten(1)


MODELS = {
    "mlp": (mlp, lambda g: torch.randn(6, 3, generator=g, dtype=torch.float64)),
    "conv4-batchnorm": (
        conv4,
        lambda g: torch.randn(6, 1, 16, 16, generator=g, dtype=torch.float64),
    ),
    "lstm": (LSTMHead, lambda g: torch.randn(4, 5, 3, generator=g, dtype=torch.float64)),
    "transformers-bert": (BertLogits, lambda g: torch.randint(0, 16, (3, 6), generator=g)),
}


def model_and_data(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    make, data = MODELS[name]
    torch.manual_seed(0)
    model = make().double()
    g = torch.Generator().manual_seed(1)
    return model, data(g), data(g)


def inner_loss(out: torch.Tensor) -> torch.Tensor:
    return (out.sin() * out).mean()


def outer_loss(out: torch.Tensor) -> torch.Tensor:
    return (out**2).mean()


# -- references ---------------------------------------------------------------------------
def unroll(model, x, update, params, first_order):
    """The fast weights after STEPS steps of ``update(i, p, g)`` on ``inner_loss``."""
    names = [n for n, _ in model.named_parameters()]
    fast = list(params)
    for _ in range(STEPS):
        out = functional_call(model, dict(zip(names, fast)), (x,))
        grads = torch.autograd.grad(inner_loss(out), fast, create_graph=not first_order)
        fast = [update(i, p, g) for i, (p, g) in enumerate(zip(fast, grads))]
    return names, fast


def reference_grads(model, xs, xq, update, extra, first_order=False):
    """d outer_loss / d (model parameters, extra tensors), the update written by hand."""
    params = list(model.parameters())
    with sdpa_kernel([SDPBackend.MATH]):  # the attention kernel with a double backward
        names, fast = unroll(model, xs, update, params, first_order)
        out = functional_call(model, dict(zip(names, fast)), (xq,))
        return torch.autograd.grad(outer_loss(out), params + extra)


def metacurvature(t: MetaCurvatureTransform, g: torch.Tensor) -> torch.Tensor:
    """Meta-Curvature's preconditioning, written with explicit index sums."""
    if g.dim() == 1:
        return t.lr * t.mc * g
    if g.dim() == 2:
        return t.lr * (t.mc_in @ g @ t.mc_out)
    a, b = g.shape[:2]
    flat = g.reshape(a, b, -1)  # [out channels, in channels, kernel]
    out = torch.zeros_like(flat)
    for i in range(a):
        for j in range(b):
            # sum over i', j', f' of mc_in[i, i'] * g[i', j', f'] * mc_out[j', j] * mc_f[f, f']
            mixed = (t.mc_in[i][:, None, None] * flat * t.mc_out[:, j][None, :, None]).sum((0, 1))
            out[i, j] = t.mc_f @ mixed
    return t.lr * out.reshape(g.shape)


def run_learner(learner_root, xs, xq, extra):
    learner = learner_root.clone()
    for _ in range(STEPS):
        learner.adapt(inner_loss(learner(xs)))
    loss_ = outer_loss(learner(xq))
    params = list(learner_root.module.parameters()) + extra
    return torch.autograd.grad(loss_, params)


def assert_close(got, want, what):
    num = sum(float((a - b).norm() ** 2) for a, b in zip(got, want)) ** 0.5
    den = sum(float(b.norm() ** 2) for b in want) ** 0.5
    assert num <= TOL * den, f"{what}: relative error {num / den:.2e}"


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_maml_meta_gradient_equals_the_reference(name, first_order):
    model, xs, xq = model_and_data(name)
    twin = copy.deepcopy(model)
    maml = MAML(model, lr=LR, first_order=first_order)
    got = run_learner(maml, xs, xq, [])
    want = reference_grads(twin, xs, xq, lambda i, p, g: p - LR * g, [], first_order)
    assert_close(got, want, f"MAML on {name}")


@pytest.mark.parametrize("name", list(MODELS))
def test_metasgd_meta_gradient_equals_the_reference(name):
    model, xs, xq = model_and_data(name)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    lrs = [
        nn.Parameter(0.1 + 0.2 * torch.rand(p.shape, generator=g, dtype=p.dtype))
        for p in model.parameters()
    ]
    meta = MetaSGD(model, lrs=lrs)
    got = run_learner(meta, xs, xq, lrs)
    want = reference_grads(twin, xs, xq, lambda i, p, gr: p - lrs[i] * gr, lrs)
    assert_close(got, want, f"MetaSGD on {name}")


@pytest.mark.parametrize("name", ["mlp", "conv4-batchnorm", "lstm"])
def test_gbml_meta_gradient_equals_the_reference(name):
    model, xs, xq = model_and_data(name)
    twin = copy.deepcopy(model)
    gbml = GBML(model, lambda p: MetaCurvatureTransform(p).double(), lr=LR)
    transforms = list(gbml.compute_update.transforms_modules)
    with torch.no_grad():  # away from the identity, where the transforms would be trivial
        for p in gbml.compute_update.parameters():
            p.add_(0.05 * torch.randn_like(p))
    extra = list(gbml.compute_update.parameters())
    got = run_learner(gbml, xs, xq, extra)
    want = reference_grads(
        twin, xs, xq, lambda i, p, gr: p - LR * metacurvature(transforms[i], gr), extra
    )
    assert_close(got, want, f"GBML on {name}")


def test_clone_of_a_clone_and_checkpointed_clones_equal_the_reference():
    model, xs, xq = model_and_data("conv4-batchnorm")
    twin = copy.deepcopy(model)
    maml = MAML(model, lr=LR)
    first = maml.clone()
    first.adapt(inner_loss(first(xs)))
    second = first.clone(checkpoint=True)  # a checkpointed clone of the adapted clone
    second.adapt(lambda: inner_loss(second(xs)))
    got = torch.autograd.grad(outer_loss(second(xq)), list(model.parameters()))
    want = reference_grads(twin, xs, xq, lambda i, p, g: p - LR * g, [])
    assert_close(got, want, "clone of a clone, checkpointed")


@pytest.mark.parametrize("segment", [1, 2])
def test_checkpointed_adaptation_equals_the_plain_one(segment):
    model, xs, xq = model_and_data("lstm")
    twin = copy.deepcopy(model)
    maml = MAML(model, lr=LR, checkpoint=segment)
    learner = maml.clone()
    for _ in range(STEPS):
        learner.adapt(lambda: inner_loss(learner(xs)))
    got = torch.autograd.grad(outer_loss(learner(xq)), list(model.parameters()))
    want = reference_grads(twin, xs, xq, lambda i, p, g: p - LR * g, [])
    assert_close(got, want, f"checkpoint={segment}")


# -- float32 at PyTorch's defaults -------------------------------------------------------
def _float32_run(kind: str, algorithm: str, first_order: bool) -> list[torch.Tensor]:
    module, data = build(kind), problem(kind)
    if algorithm == "MAML":
        learner_root = MAML(module, lr=0.1, first_order=first_order)
    elif algorithm == "MetaSGD":
        learner_root = MetaSGD(module, lr=0.1, first_order=first_order)
    else:  # Meta-Curvature's transforms start as the identity: SGD's update
        learner_root = GBML(module, MetaCurvatureTransform, lr=0.1, first_order=first_order)
    total = 0.0
    for i in range(data["xs"].shape[0]):
        learner = learner_root.clone()
        for _ in range(2):
            learner.adapt(loss(call(learner, data["xs"][i]), data["w"][i]))
        total = total + loss(call(learner, data["xq"][i]), data["w"][i]) / data["xs"].shape[0]
    return list(torch.autograd.grad(total, list(module.parameters())))


@pytest.mark.parametrize(
    "kind", ["mlp", "conv-batchnorm-train", "lstm", "transformer-encoder-layer"]
)
@pytest.mark.parametrize(
    "algorithm,first_order",
    [("MAML", False), ("MAML", True), ("MetaSGD", False), ("GBML", False)],
    ids=["maml", "maml-first-order", "metasgd", "gbml"],
)
def test_float32_meta_gradient_within_the_rounding_bound(kind, algorithm, first_order):
    assert torch.get_default_dtype() == torch.float32
    got = _float32_run(kind, algorithm, first_order)
    assert_within_bound(got, kind, "sgd", first_order, f"{algorithm} on {kind}")


# -- learn2learn's behaviour --------------------------------------------------------------
def test_the_learner_is_the_model_and_its_parameters():
    model = mlp()
    maml = MAML(model, lr=0.1)
    assert maml.module is model
    assert [n for n, _ in maml.named_parameters()] == [
        f"module.{n}" for n, _ in model.named_parameters()
    ]
    assert maml.allow_unused is False and maml.allow_nograd is False and maml.first_order is False
    assert MAML(model, lr=0.1, allow_nograd=True).allow_unused is True  # defaults to allow_nograd
    model.tag = "mine"
    assert maml.tag == "mine"  # attributes it lacks are the module's
    x = torch.randn(2, 3)
    assert torch.equal(maml(x), model(x))


def test_clone_runs_on_the_models_weights_and_fills_its_grad():
    model = mlp()
    maml = MAML(model, lr=0.1)
    learner = maml.clone()
    assert isinstance(learner, MAML) and isinstance(learner.module, nn.Sequential)
    # learn2learn's clone_module: the clone's weights are copies (p.clone()) of the model's.
    assert learner.module is not model and learner.module[0].weight is not model[0].weight
    assert torch.equal(learner.module[0].weight, model[0].weight)
    learner.adapt(inner_loss(learner(torch.randn(4, 3))))
    assert all(p.is_leaf for p in model.parameters())  # the model is never adapted
    assert not learner.module[0].weight.is_leaf
    outer_loss(learner(torch.randn(4, 3))).backward()
    assert all(p.grad is not None for p in model.parameters())
    # Settings are inherited or replaced per clone.
    assert maml.clone(first_order=True).first_order is True
    assert maml.clone().clone().first_order is False


def test_a_model_that_gains_parameters_after_the_first_clone():
    model = mlp()
    maml = MAML(model, lr=0.1)
    maml.clone()
    model.append(nn.Linear(2, 2))
    learner = maml.clone()
    learner.adapt(inner_loss(learner(torch.randn(4, 3))))
    assert all(p.grad_fn is not None for p in learner.module.parameters())


def test_clones_share_the_models_buffers_as_in_learn2learn():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    learner = MAML(model, lr=0.1).clone()
    learner(torch.randn(5, 3))
    assert model[1].num_batches_tracked.item() == 1
    assert not torch.equal(model[1].running_mean, torch.zeros(4))
    grandchild = learner.clone()
    assert grandchild.module[1].running_var is model[1].running_var


def test_clones_share_buffers_through_nested_and_shared_submodules():
    norm = nn.BatchNorm1d(4)  # one module at two places of the tree
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Sequential(norm, nn.ReLU(), nn.Sequential(nn.BatchNorm1d(4))), norm
    )
    learner = MAML(model, lr=0.1).clone().clone()
    expected = dict(model.named_buffers(remove_duplicate=False))
    got = dict(learner.module.named_buffers(remove_duplicate=False))
    assert got.keys() == expected.keys() and len(got) == 9
    assert all(got[name] is buf for name, buf in expected.items())


def test_first_order_drops_the_second_order_terms():
    model, xs, xq = model_and_data("mlp")
    maml = MAML(copy.deepcopy(model), lr=LR)
    learner = maml.clone(first_order=True)
    for _ in range(STEPS):
        learner.adapt(inner_loss(learner(xs)))
    got = torch.autograd.grad(outer_loss(learner(xq)), list(maml.parameters()))
    want = reference_grads(model, xs, xq, lambda i, p, g: p - LR * g, [], first_order=True)
    assert_close(got, want, "clone(first_order=True)")
    # adapt(first_order=...) overrides the clone's setting for one step.
    learner = MAML(copy.deepcopy(model), lr=LR).clone()
    for _ in range(STEPS):
        learner.adapt(inner_loss(learner(xs)), first_order=True)
    got2 = torch.autograd.grad(outer_loss(learner(xq)), list(learner.module.parameters(time=0)))
    assert_close(got2, want, "adapt(first_order=True)")


def test_a_learned_and_a_changed_learning_rate():
    model, xs, xq = model_and_data("mlp")
    lr = torch.tensor(LR, dtype=torch.float64, requires_grad=True)
    maml = MAML(copy.deepcopy(model), lr=lr)
    got = run_learner(maml, xs, xq, [lr])
    want = reference_grads(model, xs, xq, lambda i, p, g: p - lr * g, [lr])
    assert_close(got, want, "tensor lr")
    maml = MAML(copy.deepcopy(model), lr=LR)
    learner = maml.clone()
    learner.lr = 0.1  # as in learn2learn, a clone's lr may change between steps
    for _ in range(STEPS):
        learner.adapt(inner_loss(learner(xs)))
    got = torch.autograd.grad(outer_loss(learner(xq)), list(maml.parameters()))
    want = reference_grads(model, xs, xq, lambda i, p, g: p - 0.1 * g, [])
    assert_close(got, want, "lr changed on the clone")


def test_metasgd_defaults_and_clone():
    model = mlp()
    meta = MetaSGD(model, lr=0.25)
    assert isinstance(meta.lrs, nn.ParameterList)
    assert [lr.shape for lr in meta.lrs] == [p.shape for p in model.parameters()]
    assert all(torch.equal(lr, torch.full_like(lr, 0.25)) for lr in meta.lrs)
    assert {n.split(".")[0] for n, _ in meta.named_parameters()} == {"module", "lrs"}
    learner = meta.clone()
    assert learner.lrs[0] is meta.lrs[0] and learner.first_order is False
    learner.adapt(inner_loss(learner(torch.randn(4, 3))))
    outer_loss(learner(torch.randn(4, 3))).backward()
    assert all(lr.grad is not None for lr in meta.lrs)


def test_gbml_adapt_transform_steps_the_transforms_from_the_second_step():
    model, xs, xq = model_and_data("mlp")
    gbml = GBML(model, lambda p: MetaCurvatureTransform(p).double(), lr=LR, adapt_transform=True)
    learner = gbml.clone()
    before = [p for p in learner.compute_update.parameters()]
    learner.adapt(inner_loss(learner(xs)))
    assert [p for p in learner.compute_update.parameters()] == before  # first step: unchanged
    learner.adapt(inner_loss(learner(xs)))
    after = list(learner.compute_update.parameters())
    assert all(a is not b for a, b in zip(after, before)) and all(not p.is_leaf for p in after)
    outer_loss(learner(xq)).backward()
    assert all(p.grad is not None for p in gbml.compute_update.parameters())


def test_maml_update_and_meta_sgd_update_step_a_clone():
    model = mlp()
    clone = clone_module(model)
    grads = torch.autograd.grad(inner_loss(clone(torch.randn(4, 3))), list(clone.parameters()))
    weights = list(clone.parameters())
    maml_update(clone, 0.5, grads)
    assert all(
        torch.allclose(new, p - 0.5 * g) for new, p, g in zip(clone.parameters(), weights, grads)
    )
    lrs = [torch.full_like(p, 0.1) for p in weights]
    meta_sgd_update(clone, lrs, [None, grads[1], None, None])
    assert torch.allclose(list(clone.parameters())[1], weights[1] - 0.5 * grads[1] - 0.1 * grads[1])
    assert meta_sgd_update(clone) is clone  # no lrs or grads: unchanged, as in learn2learn


def test_models_higher_patches_work_through_the_api():
    with warnings.catch_warnings():
        # torch.compile's first use imports modules that warn that torch.jit is deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        compiled = torch.compile(mlp())
    maml = MAML(compiled, lr=0.1)
    with pytest.warns(UserWarning, match="patched copy runs eagerly"):
        learner = maml.clone()
    learner.adapt(inner_loss(learner(torch.randn(4, 3))))
    outer_loss(learner(torch.randn(4, 3))).backward()
    assert all(p.grad is not None for p in compiled._orig_mod.parameters())
    rnn = MAML(nn.GRU(3, 4, batch_first=True), lr=0.1).clone()
    rnn.adapt(rnn(torch.randn(2, 5, 3))[0].pow(2).mean())
    rnn(torch.randn(2, 5, 3))[0].sum().backward()
    assert rnn.module.weight_hh_l0.grad_fn is not None


def test_frozen_parameters_with_allow_nograd_stay_unchanged():
    model = mlp()
    model[0].weight.requires_grad_(False)
    learner = MAML(model, lr=0.1, allow_nograd=True).clone()
    before = learner.module[0].weight
    learner.adapt(inner_loss(learner(torch.randn(4, 3))))
    assert learner.module[0].weight is before and not before.requires_grad
    assert torch.equal(before, model[0].weight)
    assert learner.module[0].bias.grad_fn is not None


def test_unused_parameters_with_allow_unused_stay_unchanged():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    learner = MAML(model, lr=0.1, allow_unused=True).clone()
    before = list(learner.module.parameters())
    learner.adapt(inner_loss(learner.module[0](torch.randn(4, 3))))
    assert learner.module[1].weight is before[2]
    assert learner.module[0].weight is not before[0]


# -- bad input ----------------------------------------------------------------------------
def _snapshot(learner):
    return list(learner.module.parameters())


def test_adapt_on_the_wrapper_is_refused_and_changes_nothing():
    model = mlp()
    maml = MAML(model, lr=0.1)
    with pytest.raises(RuntimeError, match=r"MAML.adapt: .*clone\(\) first"):
        maml.adapt(inner_loss(maml(torch.randn(4, 3))))
    assert all(p.is_leaf for p in model.parameters()) and maml.module is model
    with pytest.raises(RuntimeError, match=r"MetaSGD.adapt: .*clone\(\) first"):
        MetaSGD(model).adapt(inner_loss(model(torch.randn(4, 3))))
    gbml = GBML(model, MetaCurvatureTransform)
    with pytest.raises(RuntimeError, match=r"GBML.adapt: .*clone\(\) first"):
        gbml.adapt(inner_loss(model(torch.randn(4, 3))))


def test_an_unused_parameter_without_allow_unused_is_refused():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    for root in (MAML(model, lr=0.1), MetaSGD(model), GBML(model, MetaCurvatureTransform)):
        learner = root.clone()
        before = _snapshot(learner)
        with pytest.raises(
            ValueError, match=r"does not depend on parameter '1.weight'.*allow_unused=True"
        ):
            learner.adapt(inner_loss(learner.module[0](torch.randn(4, 3))))
        assert _snapshot(learner) == before


def test_a_submodule_replaced_or_a_parameter_added_after_cloning_is_refused():
    """learn2learn steps every parameter a clone's tree holds; here a step advances the
    weights the clone was made with, so a later change to the tree is refused, not
    silently left unadapted, even with allow_unused."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    x = torch.randn(4, 3)
    for root in (
        MAML(model, lr=0.1, allow_unused=True),
        MetaSGD(model),
        GBML(model, MetaCurvatureTransform, allow_unused=True),
    ):
        learner = root.clone()
        learner.module[1] = nn.Linear(2, 2)
        before = _snapshot(learner)
        with pytest.raises(ValueError, match=r"parameter '1.weight' of this clone was not"):
            learner.adapt(inner_loss(learner(x)))
        assert _snapshot(learner) == before
        learner = root.clone()
        learner.module[0].extra = nn.Parameter(torch.ones(2))
        with pytest.raises(ValueError, match=r"parameter '0.extra' .*before cloning"):
            learner.adapt(inner_loss(learner(x)))
    # Writing new tensors into the slots it was made with is not a change of tree.
    learner = MAML(model, lr=0.1).clone()
    learner.module[1]._parameters["weight"] = learner.module[1].weight * 2
    learner.adapt(inner_loss(learner(x)))


def test_a_frozen_parameter_without_allow_nograd_is_refused():
    model = mlp()
    model[2].bias.requires_grad_(False)
    for root in (MAML(model, lr=0.1), MetaSGD(model), GBML(model, MetaCurvatureTransform)):
        learner = root.clone()
        before = _snapshot(learner)
        with pytest.raises(
            ValueError, match=r"parameter '2.bias' does not require grad.*allow_nograd=True"
        ):
            learner.adapt(inner_loss(learner(torch.randn(4, 3))))
        assert _snapshot(learner) == before


def test_metasgd_lrs_must_match_the_parameters():
    model = mlp()
    lrs = [torch.full_like(p, 0.1) for p in model.parameters()]
    with pytest.raises(
        ValueError, match=r"lrs\[2\] has shape \(3,\), parameter '2.weight' \(2, 8\)"
    ):
        MetaSGD(model, lrs=[*lrs[:2], torch.ones(3), lrs[3]])
    with pytest.raises(ValueError, match="lrs has 3 learning rates, the model 4 parameters"):
        MetaSGD(model, lrs=lrs[:3])


def test_updates_of_a_copy_of_a_module_and_of_a_learner_work_as_in_learn2learn():
    # examples/rl/maml_trpo.py steps a deepcopy of its policy with maml_update; the
    # docstring of maml_update steps a learner.
    model = mlp()
    policy = copy.deepcopy(model)
    grads = [torch.full_like(p, 2.0) for p in model.parameters()]
    assert maml_update(policy, 0.1, grads) is policy
    for p, q in zip(policy.parameters(), model.parameters()):
        torch.testing.assert_close(p, q - 0.2, rtol=0, atol=0)
    assert all(p.is_leaf for p in model.parameters())
    learner = MAML(model, lr=0.5).clone()
    x = torch.randn(4, 3)
    maml_update(learner, 0.1, torch.autograd.grad(inner_loss(learner(x)), learner.parameters()))
    reference = MAML(model, lr=0.1).clone()
    reference.adapt(inner_loss(reference(x)))
    for p, q in zip(learner.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    outer_loss(learner(x)).backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="grads has 2 entries, the module 4 parameters"):
        maml_update(clone_module(model), 0.1, grads[:2])
    with pytest.raises(ValueError, match="lrs has 2 entries, the module 4 parameters"):
        meta_sgd_update(clone_module(model), grads[:2], grads)


def test_a_negative_learning_rate_is_refused_as_torch_optim_refuses_it():
    with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
        MAML(mlp(), lr=-0.1).clone()
    learner = MAML(mlp(), lr=0.1).clone()
    learner.lr = -0.5
    before = _snapshot(learner)
    with pytest.raises(ValueError, match="Invalid learning rate: -0.5"):
        learner.adapt(inner_loss(learner(torch.randn(4, 3))))
    assert _snapshot(learner) == before


def test_bad_checkpoint_values_are_refused():
    with pytest.raises(ValueError, match="checkpoint must be a bool or a positive number"):
        MAML(mlp(), lr=0.1, checkpoint=0)
    with pytest.raises(ValueError, match="checkpoint must be a bool or a positive number"):
        MAML(mlp(), lr=0.1).clone(checkpoint=-2)


def test_out_of_scope_names_say_what_to_use():
    with pytest.raises(NotImplementedError, match="LightningMAML is not supported.*training_step"):
        _ = l2l.algorithms.LightningMAML
    with pytest.raises(NotImplementedError, match="gym.MetaEnv is not supported.*gymnasium"):
        _ = l2l.gym.MetaEnv
    with pytest.raises(
        NotImplementedError, match="text.datasets.NewsClassification is not supported.*TaskDataset"
    ):
        _ = l2l.text.datasets.NewsClassification
    with pytest.raises(NotImplementedError, match="SVClassifier is not supported.*qpth"):
        _ = l2l.nn.SVClassifier
    # A from-import keeps the message (an AttributeError would become "cannot import name").
    with pytest.raises(NotImplementedError, match="LightningANIL is not supported"):
        from higher.learn2learn.algorithms import LightningANIL  # noqa: F401
    with pytest.raises(NotImplementedError, match="gym.MetaEnv is not supported"):
        from higher.learn2learn.gym import MetaEnv  # noqa: F401
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        _ = l2l.algorithms.nonexistent
    with pytest.raises(AttributeError, match="has no attribute 'make'"):
        _ = l2l.gym.make  # not a learn2learn name: the usual error


def test_no_warning_in_ordinary_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner = MAML(conv4(), lr=0.1).clone()
        learner.adapt(inner_loss(learner(torch.randn(2, 1, 16, 16))))
        outer_loss(learner(torch.randn(2, 1, 16, 16))).backward()


class LoraBert(nn.Module):
    """The one-layer BERT under peft's LoRA adapters: the base weights are frozen."""

    def __init__(self) -> None:
        super().__init__()
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False
        )
        self.model = peft.get_peft_model(BertLogits().bert, config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits.flatten(1)


def test_peft_adapters_with_allow_nograd_equal_the_reference():
    torch.manual_seed(0)
    model = LoraBert().double()
    g = torch.Generator().manual_seed(1)
    xs, xq = (torch.randint(0, 16, (3, 6), generator=g) for _ in range(2))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert 0 < len(trainable) < len(list(model.parameters()))
    names, params = [n for n, _ in trainable], [p for _, p in trainable]
    learner = MAML(model, lr=LR, allow_nograd=True).clone()  # learn2learn's way with frozen weights
    for _ in range(STEPS):
        learner.adapt(inner_loss(learner(xs)))
    got = torch.autograd.grad(outer_loss(learner(xq)), params)
    with sdpa_kernel([SDPBackend.MATH]):
        fast = params
        for _ in range(STEPS):
            out = functional_call(model, dict(zip(names, fast)), (xs,))
            grads = torch.autograd.grad(inner_loss(out), fast, create_graph=True)
            fast = [p - LR * gr for p, gr in zip(fast, grads)]
        out = functional_call(model, dict(zip(names, fast)), (xq,))
        want = torch.autograd.grad(outer_loss(out), params)
    assert_close(got, want, "MAML on peft LoRA")


def _torchvision_model() -> nn.Module:
    tv = pytest.importorskip("torchvision")
    return tv.models.mobilenet_v3_small(num_classes=3)


def _timm_model() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet10t", num_classes=3)


@pytest.mark.parametrize("make", [_torchvision_model, _timm_model], ids=["torchvision", "timm"])
def test_vision_libraries_models_adapt_and_reach_the_model(make):
    model = make()
    learner = MAML(model, lr=0.01).clone()
    x = torch.randn(2, 3, 32, 32)
    learner.adapt(nn.functional.cross_entropy(learner(x), torch.tensor([0, 1])))
    nn.functional.cross_entropy(learner(x), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_base_learner_and_gbml_options():
    base = l2l.algorithms.BaseLearner(nn.Linear(2, 1))
    assert base.out_features == 1 and base(torch.ones(1, 2)).shape == (1, 1)
    with pytest.raises(TypeError, match="GBML got unexpected keyword arguments: lr_decay"):
        GBML(mlp(), MetaCurvatureTransform, lr_decay=0.5)
    model = mlp()
    update = l2l.optim.ParameterUpdate(model.parameters(), MetaCurvatureTransform)
    gbml = GBML(model, MetaCurvatureTransform, compute_update=update)
    assert gbml.compute_update is update
    learner = gbml.clone(adapt_transform=True)
    assert learner.adapt_transform and not gbml.adapt_transform
    assert isinstance(learner.compute_update, l2l.optim.ParameterUpdate)
    assert learner.compute_update is not update


def test_a_checkpointed_clone_refuses_weights_written_by_hand():
    learner = MAML(mlp(), lr=0.1).clone(checkpoint=2)
    x = torch.randn(4, 3)
    learner.adapt(lambda: inner_loss(learner(x)))
    maml_update(learner, 0.1, [torch.ones_like(p) for p in learner.parameters()])
    with pytest.raises(RuntimeError, match="checkpoint.*changed outside adapt"):
        learner.adapt(lambda: inner_loss(learner(x)))
