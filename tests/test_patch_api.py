"""The patched module's API, its errors, copying, and its memory behaviour."""

from __future__ import annotations

import abc
import copy
import gc
import os
import pickle
import weakref

import pytest
import torch
from torch import nn

import higher


def mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_fast_weight_history_and_time():
    model = mlp()
    fmodel = higher.monkeypatch(model)
    init = fmodel.fast_params
    assert all(p.is_leaf and p.requires_grad for p in init)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(init, model.parameters()))
    new1 = [p * 2 for p in init]
    fmodel.fast_params = new1
    new2 = [p * 3 for p in init]
    fmodel(torch.randn(2, 3), params=new2)
    assert fmodel.init_fast_params is init
    assert list(fmodel.parameters(time=0)) == init
    assert list(fmodel.parameters(time=1)) == new1 == list(fmodel.parameters(1))
    assert list(fmodel.parameters()) == new2 == fmodel.fast_params
    with pytest.raises(IndexError, match="time=5 is outside the kept history of 3"):
        fmodel.parameters(time=5)


def test_copy_initial_weights_false_shares_the_module_parameters():
    model = mlp()
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    assert all(p is q for p, q in zip(fmodel.fast_params, model.parameters()))


def test_submodules_and_attributes_see_fast_weights():
    # float64: F.linear and the written-out product round differently; in
    # float64 that difference is ~1e-16, far below the tolerance on any CPU.
    model = mlp().double()
    fmodel = higher.monkeypatch(model)
    new = [torch.randn_like(p) for p in fmodel.fast_params]
    fmodel.update_params(new)
    assert isinstance(fmodel[0], nn.Linear) and type(fmodel[0]) is nn.Linear
    assert fmodel[2].weight is new[2]
    x = torch.randn(5, 3, dtype=torch.float64)
    close = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fmodel[0](x), x @ new[0].T + new[1], **close)
    expected = torch.relu(x @ new[0].T + new[1]) @ new[2].T + new[3]
    torch.testing.assert_close(fmodel(x), expected, **close)


def test_buffers_are_copied_and_updated_only_in_the_patched_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = model[1].running_mean.clone()
    fmodel = higher.monkeypatch(model)
    fmodel(torch.randn(8, 3) + 5)
    assert torch.equal(model[1].running_mean, before)
    assert not torch.equal(fmodel[1].running_mean, before)
    assert fmodel[1].num_batches_tracked.item() == 1 and model[1].num_batches_tracked.item() == 0
    higher.buffer_sync(model, fmodel)
    assert torch.equal(fmodel[1].running_mean, before)


def test_test_mode_keeps_no_history_and_no_graph():
    model = mlp()
    fmodel = higher.monkeypatch(model, copy_initial_weights=False, track_higher_grads=False)
    assert all(p.is_leaf for p in fmodel.fast_params)
    for _ in range(20):
        fmodel.update_params([p * 1.01 for p in fmodel.fast_params])
    assert len(fmodel._higher_history) == 1
    assert all(p.grad_fn is None and p.requires_grad for p in fmodel.fast_params)


def test_track_higher_grads_is_validated():
    fmodel = higher.monkeypatch(mlp())
    fmodel.track_higher_grads = False
    assert fmodel.track_higher_grads is False
    with pytest.raises(TypeError, match="track_higher_grads must be a bool, got int"):
        fmodel.track_higher_grads = 1


def test_detach_cuts_history_and_graph():
    model = mlp()
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    fmodel.update_params([p * 2 for p in fmodel.fast_params])
    values = [p.detach().clone() for p in fmodel.fast_params]
    assert fmodel.detach_() is fmodel
    assert len(fmodel._higher_history) == 1
    assert all(p.is_leaf and p.requires_grad for p in fmodel.fast_params)
    assert all(torch.equal(a, b) for a, b in zip(values, fmodel.fast_params))
    fmodel(torch.randn(2, 3)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


class TestErrors:
    def test_wrong_number_of_params(self):
        fmodel = higher.monkeypatch(mlp())
        with pytest.raises(ValueError, match=r"expected 4 parameter tensors .*got 3"):
            fmodel(torch.randn(2, 3), params=fmodel.fast_params[:3])

    def test_wrong_shape_names_the_parameter(self):
        fmodel = higher.monkeypatch(mlp())
        bad = list(fmodel.fast_params)
        bad[2] = torch.zeros(3, 3)
        with pytest.raises(
            ValueError, match=r"parameter '2.weight' must have shape \(2, 4\), got \(3, 3\)"
        ):
            fmodel.update_params(bad)

    def test_not_a_tensor(self):
        fmodel = higher.monkeypatch(mlp())
        with pytest.raises(TypeError, match=r"params\[1\] must be a torch.Tensor, got float"):
            fmodel.update_params([fmodel.fast_params[0], 1.0, *fmodel.fast_params[2:]])

    def test_not_a_module(self):
        with pytest.raises(TypeError, match="expected an nn.Module to patch, got function"):
            higher.monkeypatch(lambda x: x)

    def test_make_functional_needs_params(self):
        fmodule = higher.make_functional(mlp())
        with pytest.raises(RuntimeError, match="has no fast weights yet"):
            fmodule(torch.randn(2, 3))
        params = [torch.randn_like(p) for p in mlp().parameters()]
        assert fmodule(torch.randn(2, 3), params=params).shape == (2, 2)


def test_abc_mixin_after_module_in_bases():
    class Base(nn.Module, abc.ABC):  # as DistributedDataParallel lists its bases
        @abc.abstractmethod
        def forward(self, x): ...

    class Impl(Base):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x)

    fmodel = higher.monkeypatch(Impl())
    assert isinstance(fmodel, Impl) and isinstance(fmodel, Base)
    assert fmodel(torch.randn(1, 2)).shape == (1, 2)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_and_pickle(how):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.LSTM(4, 2))
    fmodel = higher.monkeypatch(model)
    dup = copy.deepcopy(fmodel) if how == "deepcopy" else pickle.loads(pickle.dumps(fmodel))
    assert type(dup) is type(fmodel)
    x = torch.randn(5, 3)
    fmodel.eval(), dup.eval()
    torch.testing.assert_close(dup(x)[0], fmodel(x)[0])
    assert all(
        a is not b and torch.equal(a, b) for a, b in zip(dup.fast_params, fmodel.fast_params)
    )
    # A copy after differentiable steps holds detached copies of the current weights.
    fmodel.update_params([p * 2 for p in fmodel.fast_params])
    dup = copy.deepcopy(fmodel) if how == "deepcopy" else pickle.loads(pickle.dumps(fmodel))
    assert all(p.is_leaf and torch.equal(p, q) for p, q in zip(dup.fast_params, fmodel.fast_params))
    torch.testing.assert_close(dup(x)[0], fmodel(x)[0])


def test_patched_module_and_optimizer_are_freed_without_the_cycle_collector():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    gc.collect()
    gc.disable()
    try:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(fmodel(torch.randn(4, 3)).pow(2).mean())
            loss = fmodel(torch.randn(4, 3)).pow(2).mean()
        loss.backward()
        refs = [weakref.ref(fmodel), weakref.ref(diffopt), weakref.ref(fmodel.fast_params[0])]
        refs += [weakref.ref(m) for m in fmodel.modules()]
        del fmodel, diffopt, loss
        assert [r() for r in refs] == [None] * len(refs)
    finally:
        gc.enable()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_long_meta_training_keeps_flat_memory():
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(10, 1)
    rss = []
    for it in range(1000):
        meta_opt.zero_grad()
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
            fmodel,
            diffopt,
        ):
            for _ in range(2):
                diffopt.step((fmodel(x) - x.sin()).pow(2).mean())
            (fmodel(x) - x.sin()).pow(2).mean().backward()
        meta_opt.step()
        if it in (200, 999):
            rss.append(_rss_mb())
    assert rss[1] - rss[0] < 10, f"resident memory grew from {rss[0]:.1f} MB to {rss[1]:.1f} MB"


def test_device_argument_places_weights_and_buffers():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    fmodel = higher.monkeypatch(model, device="cpu")
    assert all(p.device.type == "cpu" for p in fmodel.fast_params)
    assert fmodel[1].running_var.device.type == "cpu"
    assert fmodel[1].running_var is not model[1].running_var


def test_get_func_params():
    model = mlp()
    model[0].bias.requires_grad_(False)
    copies = higher.get_func_params(model)
    assert all(
        c is not p and torch.equal(c, p) and c.is_leaf for c, p in zip(copies, model.parameters())
    )
    assert [c.requires_grad for c in copies] == [True, False, True, True]
    same = higher.get_func_params(model, safe_copy=False)
    assert all(c is p for c, p in zip(same, model.parameters()))
    with pytest.raises(TypeError, match="get_func_params expects an nn.Module"):
        higher.get_func_params([1, 2])
