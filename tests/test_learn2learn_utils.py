"""higher.learn2learn.utils: learn2learn's cloning, updating and detaching helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import higher
import higher.learn2learn as l2l
from higher.learn2learn.utils import (
    accuracy,
    clone_distribution,
    clone_module,
    clone_named_parameters,
    clone_parameters,
    detach_distribution,
    detach_module,
    is_clone,
    magic_box,
    update_module,
)


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_top_level_names_are_the_utils():
    for name in ["accuracy", "clone_module", "update_module", "detach_module", "magic_box"]:
        assert getattr(l2l, name) is getattr(l2l.utils, name)
    assert l2l.flatten_config is l2l.utils.flatten_config and l2l.warn_once is l2l.utils.warn_once


def test_flatten_config():
    import argparse
    import dataclasses

    @dataclasses.dataclass
    class Opt:
        lr: float = 0.1
        betas: dict = dataclasses.field(default_factory=lambda: {"b1": 0.9})

    config = argparse.Namespace(seed=3, opt=Opt(), model={"depth": 4, "act": {"kind": "relu"}})
    assert l2l.flatten_config(config) == {
        "seed": 3,
        "opt.lr": 0.1,
        "opt.betas.b1": 0.9,
        "model.depth": 4,
        "model.act.kind": "relu",
    }
    assert l2l.flatten_config(5, prefix="x") == {"x": 5}


def test_warn_once():
    warn = type(l2l.warn_once)()
    with pytest.warns(UserWarning, match="careful"):
        warn("careful")
    warn("careful")  # shown once: filterwarnings=error would fail a second warning here
    with pytest.warns(DeprecationWarning, match="old"):
        warn("old", severity="deprecation")
    with pytest.raises(RuntimeError, match="fatal"):
        warn("fatal", severity="error")
    with pytest.raises(ValueError, match="severity must be"):
        warn("other", severity="loud")


def test_clone_module_is_a_differentiable_copy_that_shares_buffers():
    model = net()
    clone = clone_module(model)
    assert is_clone(clone) and isinstance(clone, nn.Sequential) and clone is not model
    # Copies, as learn2learn's clone_module makes them (its own unit test checks storage).
    pairs = list(zip(clone.parameters(), model.parameters()))
    assert len(pairs) == 6 and all(p.data_ptr() != q.data_ptr() for p, q in pairs)
    assert all(torch.equal(p, q) and p.grad_fn is not None for p, q in pairs)
    assert clone[1].running_mean is model[1].running_mean
    clone(torch.randn(5, 3)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert clone_module(3) == 3  # not a module: returned as it is


def test_a_clone_of_an_updated_clone_starts_from_its_weights():
    model = net()
    clone = clone_module(model)
    update_module(clone, [torch.ones_like(p) for p in clone.parameters()])
    again = clone_module(clone)
    pairs = list(zip(again.parameters(), clone.parameters()))
    assert len(pairs) == 6 and all(a is not b and torch.equal(a, b) for a, b in pairs)
    again(torch.randn(5, 3)).sum().backward()
    assert model[0].weight.grad is not None


def test_clone_module_refuses_a_patched_module_it_did_not_make():
    with pytest.raises(ValueError, match="clone_module did not make.*clone the original"):
        clone_module(higher.monkeypatch(net()))


def test_update_module_adds_updates_or_the_update_attributes():
    clone = clone_module(net())
    before = list(clone.parameters())
    updates = [torch.full_like(p, 0.5) if i % 2 else None for i, p in enumerate(before)]
    assert update_module(clone, updates) is clone
    for p, q, u in zip(clone.parameters(), before, updates):
        assert (p is q) if u is None else torch.equal(p, q + 0.5)
    current = list(clone.parameters())
    current[0].update = torch.ones_like(current[0])  # learn2learn's protocol
    update_module(clone)
    assert torch.equal(clone[0].weight, current[0] + 1)
    assert current[0].update is None


def test_update_module_refuses_bad_updates():
    model = net()
    zeros = [torch.zeros_like(p) for p in model.parameters()]
    clone = clone_module(model)
    before = list(clone.parameters())
    with pytest.raises(ValueError, match="updates has 5 entries, the module 6 parameters"):
        update_module(clone, zeros[:5])
    with pytest.raises(ValueError, match=r"updates\[0\] has shape \(3,\), its parameter \(4, 3\)"):
        update_module(clone, [torch.zeros(3), *zeros[1:]])
    assert [p is q for p, q in zip(clone.parameters(), before)] == [True] * 6


def test_update_module_on_an_ordinary_module_writes_its_slots_as_learn2learn_does():
    model = net()
    ones = [torch.ones_like(p) for p in model.parameters()]
    leaves = list(model.parameters())
    assert update_module(model, ones) is model
    assert all(p.grad_fn is not None for p in model.parameters())
    for p, q in zip(model.parameters(), leaves):
        assert torch.equal(p, q + 1)


def test_writes_into_a_clones_slots_are_its_weights():
    model = net()
    clone = clone_module(model)
    x = torch.randn(5, 3)
    new = clone[0].weight * 2
    clone[0]._parameters["weight"] = new  # MAML++'s update loop writes the slots
    assert next(iter(clone.parameters())) is new and clone.fast_params[0] is new
    clone[2].bias = nn.Parameter(torch.zeros(2))  # setattr registers a parameter
    assert list(clone.parameters())[-1] is clone[2].bias
    expected = torch.func.functional_call(
        model, {n: p for (n, _), p in zip(model.named_parameters(), clone.parameters())}, (x,)
    )
    torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
    # The next step differentiates with respect to what the slots hold.
    (g,) = torch.autograd.grad(clone(x).sum(), [new])
    assert g.shape == new.shape
    clone(x).sum().backward()
    assert model[0].weight.grad is not None and model[2].bias.grad is None


def test_setting_or_clearing_a_clones_grad_never_touches_the_models():
    model = net()
    model(torch.randn(5, 3)).sum().backward()
    meta = [p.grad.clone() for p in model.parameters()]
    clone = clone_module(model)
    for p in clone.parameters():
        p.grad = torch.ones_like(p)
    for p in clone.parameters():
        p.grad = None
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), meta))


def test_an_in_place_edit_of_a_fresh_clone_leaves_the_model_alone():
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    clone = clone_module(model)
    with torch.no_grad():
        clone[2].weight.zero_()  # the "zero trick": a head reset per task
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_detach_module():
    clone = clone_module(net())
    update_module(clone, [torch.ones_like(p) for p in clone.parameters()])
    detach_module(clone)
    assert all(p.is_leaf and not p.requires_grad for p in clone.parameters())
    clone = clone_module(net())
    update_module(clone, [torch.ones_like(p) for p in clone.parameters()])
    detach_module(clone, keep_requires_grad=True)
    assert all(p.is_leaf and p.requires_grad for p in clone.parameters())
    model = net()
    assert detach_module(model) is None  # in place, as in learn2learn
    assert not any(p.requires_grad for p in model.parameters())
    detach_module("not a module")


def test_detach_module_on_learners():
    model = net()
    fresh = l2l.algorithms.MAML(model, lr=0.1).clone()
    detach_module(fresh)  # a fresh clone holds copies: the model keeps training
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.is_leaf and not p.requires_grad for p in fresh.parameters())
    adapted = l2l.algorithms.MAML(model, lr=0.1).clone()
    adapted.adapt(adapted(torch.randn(5, 3)).pow(2).mean())
    held = list(adapted.parameters())
    detach_module(adapted, keep_requires_grad=True)  # in place: every holder sees the cut
    assert all(p.is_leaf and p.requires_grad for p in held)
    assert [p is q for p, q in zip(adapted.parameters(), held)] == [True] * 6


def test_clone_parameters():
    model = net()
    cloned = clone_parameters(model.parameters())
    assert all(
        c.grad_fn is not None and torch.equal(c, p) for c, p in zip(cloned, model.parameters())
    )
    named = clone_named_parameters(dict(model.named_parameters()))
    assert list(named) == [n for n, _ in model.named_parameters()]
    sum(c.sum() for c in cloned).backward()
    assert model[0].weight.grad is not None


def test_clone_and_detach_a_distribution():
    loc = torch.zeros(2, requires_grad=True)
    scale = torch.ones(2)
    dist = torch.distributions.Normal(loc * 2, scale)
    copy_ = clone_distribution(dist)
    assert copy_ is not dist and copy_.loc is not dist.loc and copy_.loc.grad_fn is not None
    assert torch.equal(copy_.scale, scale)
    copy_.log_prob(torch.ones(2)).sum().backward()
    assert loc.grad is not None
    assert detach_distribution(dist) is dist and not dist.loc.requires_grad


def test_magic_box():
    x = torch.tensor([0.3, -1.0], requires_grad=True)
    y = magic_box(x)
    assert torch.equal(y, torch.ones(2))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, torch.ones(2))
    assert magic_box(2.5) == 2.5


def test_accuracy():
    preds = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(preds, torch.tensor([1, 1, 1, 0])).item() == 0.75
    assert accuracy(preds, torch.tensor([1.0, 0.0, 1.0, 0.0])).dtype == torch.float32
