"""Patched modules against a torch.func.functional_call reference, module kind by module kind.

For each kind: forward equality, one differentiable SGD step, and the
meta-gradient through it with respect to the original weights, in float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrizations

import higher
from higher._compat import DoubleBackwardKernels

LR = 0.1


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight  # tied

    def forward(self, idx):
        return self.out(torch.tanh(self.hidden(self.embed(idx))))


class Bare(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3))
        self.shift = nn.Parameter(torch.randn(1))
        self.register_buffer("offset", torch.randn(3))

    def forward(self, x):
        return (x + self.offset) * self.scale + self.shift


class Lists(nn.Module):
    def __init__(self):
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(3, 3)) for _ in range(2)])
        self.bs = nn.ParameterDict(
            {"a": nn.Parameter(torch.randn(3)), "b": nn.Parameter(torch.randn(3))}
        )

    def forward(self, x):
        x = torch.tanh(x @ self.ws[0] + self.bs["a"])
        return x @ self.ws[1] + self.bs["b"]


class CellLoop(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x):
        state = None
        outs = []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outs, 1)


def conv_net(bn_eval: bool = False):
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 3, 3),
        nn.BatchNorm2d(3, momentum=None),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3, 2),
    )
    if bn_eval:
        net.eval()
    return net


def hooked_mlp():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    net[0].register_forward_pre_hook(lambda m, args: (args[0] * 2.0,))
    net[2].register_forward_hook(lambda m, args, out: out + m.weight.sum())
    return net


def f64(*shape):
    return lambda: torch.randn(*shape, dtype=torch.float64)


def ints(high, *shape):
    return lambda: torch.randint(0, high, shape)


KINDS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)), f64(4, 3)),
    "conv-batchnorm-train": (conv_net, f64(4, 1, 6, 6)),
    "conv-batchnorm-eval": (lambda: conv_net(bn_eval=True), f64(4, 1, 6, 6)),
    "embedding": (lambda: nn.Sequential(nn.Embedding(6, 3), nn.Linear(3, 2)), ints(6, 4, 5)),
    "tied-weights": (TiedLM, ints(7, 3, 5)),
    "bare-parameters": (Bare, f64(4, 3)),
    "parameter-list-dict": (Lists, f64(4, 3)),
    "lstm": (lambda: nn.LSTM(3, 4, num_layers=2, batch_first=True), f64(2, 5, 3)),
    "gru-bidirectional": (lambda: nn.GRU(3, 4, bidirectional=True), f64(5, 2, 3)),
    "rnn-tanh": (lambda: nn.RNN(3, 4, nonlinearity="tanh"), f64(5, 2, 3)),
    "lstm-cell": (lambda: CellLoop(nn.LSTMCell(3, 4)), f64(2, 4, 3)),
    "gru-cell": (lambda: CellLoop(nn.GRUCell(3, 4)), f64(2, 4, 3)),
    "rnn-cell": (lambda: CellLoop(nn.RNNCell(3, 4)), f64(2, 4, 3)),
    "multihead-attention": (lambda: nn.MultiheadAttention(4, 2, batch_first=True), f64(2, 5, 4)),
    "transformer-encoder-layer": (
        lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True),
        f64(2, 5, 8),
    ),
    "weight-norm": (
        lambda: nn.Sequential(
            parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)
        ),
        f64(4, 3),
    ),
    "spectral-norm": (
        lambda: nn.Sequential(parametrizations.spectral_norm(nn.Linear(3, 4)), nn.Tanh()),
        f64(4, 3),
    ),
    "orthogonal": (
        lambda: nn.Sequential(parametrizations.orthogonal(nn.Linear(4, 4)), nn.Tanh()),
        f64(4, 4),
    ),
    "legacy-weight-norm": (
        lambda: nn.Sequential(nn.utils.weight_norm(nn.Linear(3, 4)), nn.Tanh()),
        f64(4, 3),
    ),
    "legacy-spectral-norm": (
        lambda: nn.Sequential(nn.utils.spectral_norm(nn.Linear(3, 4)), nn.Tanh()),
        f64(4, 3),
    ),
    "hooks": (hooked_mlp, f64(4, 3)),
}


def call(module, x):
    if isinstance(module, nn.MultiheadAttention):
        return module(x, x, x)
    return module(x)


def first(out):
    return out[0] if isinstance(out, tuple) else out


def weighted(out, w):
    return (first(out) * w).sum()


def reference(module, x, xq, w):
    """MAML with one SGD step, written with functional_call."""
    names = [n for n, _ in module.named_parameters()]
    params = list(module.parameters())
    buffers = {n: b.clone() for n, b in module.named_buffers()}

    def run(ps, inp):
        args = (inp, inp, inp) if isinstance(module, nn.MultiheadAttention) else (inp,)
        return functional_call(module, {**dict(zip(names, ps)), **buffers}, args)

    out0 = run(params, x)
    grads = torch.autograd.grad(weighted(out0, w), params, create_graph=True)
    adapted = [p - LR * g for p, g in zip(params, grads)]
    query = weighted(run(adapted, xq), w)
    meta = torch.autograd.grad(query, params)
    return out0, adapted, query, meta


def seeded_build(build):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # legacy weight_norm is deprecated
        return build().double()


@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_functional_call(kind):
    build, make_input = KINDS[kind]
    module, twin = (seeded_build(build) for _ in range(2))
    x, xq = make_input(), make_input()
    before = {k: v.clone() for k, v in module.state_dict().items()}

    fmodel = higher.monkeypatch(module, copy_initial_weights=False)
    assert isinstance(fmodel, type(module))
    out = call(fmodel, x)
    w = torch.randn_like(first(out))
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    diffopt = higher.optim.get_diff_optim(opt, module.parameters(), fmodel=fmodel)
    diffopt.step(weighted(out, w))
    query = weighted(call(fmodel, xq), w)
    meta = torch.autograd.grad(query, list(module.parameters()))

    with DoubleBackwardKernels():  # the reference too needs attention with a double backward
        out_ref, adapted_ref, query_ref, meta_ref = reference(twin, x, xq, w)
    torch.testing.assert_close(first(out), first(out_ref), rtol=1e-10, atol=1e-12)
    for a, b in zip(fmodel.fast_params, adapted_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(query, query_ref, rtol=1e-10, atol=1e-12)
    for name, a, b in zip([n for n, _ in module.named_parameters()], meta, meta_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"meta-gradient of {name}")
    # The original module's weights and buffers never change.
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_tied_weight_appears_once_and_sums_gradients():
    module = TiedLM().double()
    fmodel = higher.monkeypatch(module, copy_initial_weights=False)
    assert len(fmodel.fast_params) == len(list(module.parameters())) == 3
    assert fmodel.out.weight is fmodel.embed.weight
    fmodel.update_params([p * 2 for p in fmodel.fast_params])
    assert fmodel.out.weight is fmodel.embed.weight
    # The gradient of the tied weight is the sum of its two uses' gradients.
    idx = torch.tensor([[1, 2, 3]])
    (g,) = torch.autograd.grad(fmodel(idx).sum(), [fmodel.fast_params[0]])
    w = fmodel.fast_params[0].detach()
    w_in, w_out = w.clone().requires_grad_(), w.clone().requires_grad_()
    h = torch.tanh(fmodel.hidden(torch.nn.functional.embedding(idx, w_in)))
    (h @ w_out.T).sum().backward()
    torch.testing.assert_close(g, w_in.grad + w_out.grad)


def test_custom_method_uses_fast_weights():
    class WithMethod(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x)

        def score(self, x):
            return self.lin(x).sum(-1)

    module = WithMethod().double()
    fmodel = higher.monkeypatch(module)
    new = [torch.randn_like(p) for p in fmodel.fast_params]
    fmodel.update_params(new)
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(fmodel.score(x), (x @ new[0].T + new[1]).sum(-1))
    torch.testing.assert_close(fmodel.lin(x), x @ new[0].T + new[1])
    assert fmodel.lin.weight is new[0]
