"""Models wrapped the way users wrap them: ``torch.compile`` and TorchScript.

A compiled model is patched through the module it wraps and runs eagerly (a
compiled forward would read the original weights, and compiled graphs have no
double backward), with a warning; its meta-gradient equals the uncompiled
model's. A TorchScript module cannot run on fast weights and is refused with
an error that names the remedy.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import higher

F64 = torch.float64
EAGER = r"torch\.compile'd .* runs eagerly"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh())
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def compile_(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        # torch.compile's first use imports modules that warn that torch.jit is deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.compile(module)


def compiled_root() -> nn.Module:
    return compile_(make_net())


def compiled_child() -> nn.Module:
    net = make_net()
    net.body = compile_(net.body)
    return net


def meta_grads(model: nn.Module, mode: str, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """MAML meta-gradient of 2 SGD steps w.r.t. ``params`` (the model's own)."""
    g = torch.Generator().manual_seed(1)
    x, xq = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 3, generator=g, dtype=F64)
    n = 2 if mode == "batched" else None
    if n is not None:
        x, xq = x.expand(n, *x.shape), xq.expand(n, *xq.shape)

    def loss(inputs):
        out = fmodel(inputs).pow(2)
        return out.mean() if n is None else out.mean((1, 2))

    opt = torch.optim.SGD(params, lr=0.3)
    with higher.innerloop_ctx(
        model, opt, copy_initial_weights=False, checkpoint=mode == "checkpoint", num_tasks=n
    ) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(lambda: loss(x))
        return list(torch.autograd.grad(loss(xq).sum(), params))


@pytest.mark.parametrize("mode", ["per-task", "checkpoint", "batched"])
@pytest.mark.parametrize("wrap", [compiled_root, compiled_child], ids=["root", "submodule"])
def test_compiled_model_has_the_uncompiled_meta_gradient(wrap, mode):
    reference = make_net()
    expected = meta_grads(reference, mode, list(reference.parameters()))
    model = wrap()
    with pytest.warns(UserWarning, match=EAGER):
        got = meta_grads(model, mode, list(model.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("wrap", [compiled_root, compiled_child], ids=["root", "submodule"])
def test_compiled_model_runs_on_the_fast_weights(wrap):
    model = wrap()
    with pytest.warns(UserWarning, match=EAGER):
        fmodel = higher.monkeypatch(model)
    assert isinstance(fmodel, Net)  # the user's class, not torch's wrapper
    fmodel.eval()
    fmodel.update_params([torch.zeros_like(p) for p in fmodel.fast_params])
    # All weights zero: the output is exactly 0 (it was 0.65 with the compiled forward).
    assert torch.equal(fmodel(torch.ones(4, 3, dtype=F64)), torch.zeros(4, 1, dtype=F64))


def test_write_back_and_reset_through_the_compiled_wrapper():
    model = compiled_root()
    with pytest.warns(UserWarning, match=EAGER):
        fmodel = higher.monkeypatch(model)
    fmodel(torch.randn(8, 3, dtype=F64))  # train mode: the running statistics move
    fmodel.update_params([p + 1 for p in fmodel.fast_params])
    fmodel.write_back(model)
    inner = model._orig_mod
    for p, f in zip(inner.parameters(), fmodel.fast_params):
        assert torch.equal(p, f)
    assert torch.equal(inner.body[1].running_mean, fmodel.body[1].running_mean)
    fmodel.reset(model)
    assert torch.equal(fmodel.body[1].running_mean, inner.body[1].running_mean)


def scripted(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        # torch.jit is deprecated: a DeprecationWarning, a FutureWarning from torch 2.14.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


@pytest.mark.parametrize("num_tasks", [None, 2])
def test_torchscript_is_refused_with_the_remedy(num_tasks):
    model = scripted(make_net().eval())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(
            TypeError, match="the module is a TorchScript module .*Patch the eager module"
        ),
        higher.innerloop_ctx(model, opt, num_tasks=num_tasks),
    ):
        pass
    with pytest.raises(TypeError, match="Patch the eager module"):
        higher.monkeypatch(model)


def test_torchscript_submodule_is_named():
    net = make_net()
    net.head = scripted(net.head)
    with pytest.raises(TypeError, match="submodule 'head' is a TorchScript module"):
        higher.monkeypatch(net)
