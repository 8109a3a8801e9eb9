"""Indexing and slicing patched containers: ``fmodel[:-1]`` and friends (issue 33)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import higher

F64 = torch.float64


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))


def test_slicing_a_patched_sequential_runs_on_the_fast_weights():
    model = mlp().double()
    x = torch.randn(5, 3, dtype=F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        head = fmodel[-1]  # the submodule itself, holding the fast weights
        body = fmodel[:-1]
        diffopt.step(fmodel(x).pow(2).mean())
        diffopt.step(head(body(x)).pow(2).mean())  # held across steps: still current
        out = fmodel[-1](fmodel[:-1](x))
        torch.testing.assert_close(out, fmodel(x), rtol=0, atol=0)
        torch.testing.assert_close(fmodel[2:](fmodel[:2](x)), fmodel(x), rtol=0, atol=0)
        # Exact meta-gradient: the same graph as the whole model's.
        ours = torch.autograd.grad(out.sum(), model.parameters(), retain_graph=True)
        theirs = torch.autograd.grad(fmodel(x).sum(), model.parameters())
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # The view's fast weights are the patched module's, restricted to it.
        assert len(body.fast_params) == 4 and body.fast_params[0] is fmodel.fast_params[0]
        assert all(
            t is u for t, u in zip(fmodel[1:].parameters(time=0), fmodel.init_fast_params[2:])
        )
        assert isinstance(body, nn.Sequential) and len(body) == 4 and len(fmodel[::2]) == 3


def test_a_view_refuses_weights_of_its_own():
    fmodel = higher.monkeypatch(mlp())
    view = fmodel[:2]
    message = "a view of a patched container"
    with pytest.raises(RuntimeError, match=message):
        view(torch.ones(1, 3), params=[torch.zeros(4, 3), torch.zeros(4)])
    with pytest.raises(RuntimeError, match=message):
        view.update_params([torch.zeros(4, 3), torch.zeros(4)])
    with pytest.raises(RuntimeError, match=message):
        view.detach_()
    with pytest.raises(RuntimeError, match=message):
        copy.deepcopy(view)
    with pytest.raises(RuntimeError, match=message):
        view.track_higher_grads = False
    # write_back of a view copies its part.
    target = mlp()[:2]
    view.write_back(target)
    torch.testing.assert_close(target[0].weight, fmodel.fast_params[0].detach())


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_indexing_and_slicing_in_batched_mode(strategy):
    model = mlp().double()
    tasks = 3
    x = torch.randn(tasks, 5, 3, dtype=F64)
    fmodel = higher.monkeypatch(model, num_tasks=tasks, copy_initial_weights=False)
    fmodel.task_strategy = strategy
    diffopt = higher.optim.create_diff_optim(torch.optim.SGD, {"lr": 0.1}, fmodel=fmodel)
    diffopt.step(fmodel[-1](fmodel[:-1](x)).pow(2).flatten(1).mean(1))
    whole = fmodel(x)
    pieces = fmodel[4](fmodel[3](fmodel[2](fmodel[1](fmodel[0](x)))))
    torch.testing.assert_close(pieces, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fmodel[2:](fmodel[:2](x)), whole, rtol=1e-12, atol=1e-12)
    ours = torch.autograd.grad(pieces.sum(), model.parameters(), retain_graph=True)
    theirs = torch.autograd.grad(whole.sum(), model.parameters())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert fmodel[0].fast_params[0].shape == (tasks, 4, 3)


def test_modulelist_and_moduledict_roots():
    layers = nn.ModuleList([nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)]).double()
    blocks = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Tanh()}).double()
    x = torch.randn(2, 4, 3, dtype=F64)
    for tasks in (None, 2):
        flist = higher.monkeypatch(layers, num_tasks=tasks)
        fdict = higher.monkeypatch(blocks, num_tasks=tasks)
        if tasks is None:
            xs, want_list, want_dict = x[0], x[0], blocks["b"](blocks["a"](x[0]))
            for layer in layers:
                want_list = layer(want_list)
        else:
            xs = x
            want_list = torch.stack([layers[2](layers[1](layers[0](t))) for t in x])
            want_dict = torch.stack([blocks["b"](blocks["a"](t)) for t in x])
        tail = flist[1:]
        assert isinstance(tail, nn.ModuleList) and len(tail) == 2
        torch.testing.assert_close(tail[1](tail[0](flist[0](xs))), want_list)
        torch.testing.assert_close(fdict["b"](fdict["a"](xs)), want_dict)


def test_batched_view_of_a_recurrent_layer_reads_its_fast_weights():
    """An RNN reads its weights from a list of its own: a view refreshes its copy."""
    model = nn.Sequential(nn.Linear(3, 4), nn.GRU(4, 4, batch_first=True)).double()
    x = torch.randn(2, 5, 6, 3, dtype=F64)
    with pytest.warns(UserWarning, match="cannot batch"):
        fmodel = higher.monkeypatch(model, num_tasks=2)
    new = [p.detach() + 0.5 for p in fmodel.fast_params]
    fmodel.update_params(new)
    ours = fmodel[1](fmodel[0](x))[0]
    torch.testing.assert_close(ours, fmodel(x)[0], rtol=0, atol=0)
    with torch.no_grad():
        for p, q in zip(model.parameters(), new):
            p.copy_(q[0])
    torch.testing.assert_close(ours[0], model(x[0])[0])


def test_slicing_is_refused_where_views_are_not_supported():
    """A patched module of another kind (a sharded model's) refuses a slice by name."""

    class _OtherPatch(higher._patched._MonkeyPatchBase):
        _higher_class_prefix = "OtherPatched"

    fmodel, _ = higher._patched.patch(mlp(), None, True, True, mixin=_OtherPatch)
    assert isinstance(fmodel[0], nn.Linear)  # integer indexing as before
    with pytest.raises(NotImplementedError, match="slicing a patched Sequential"):
        fmodel[:-1]
