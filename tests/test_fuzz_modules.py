"""Differential fuzzing of patched modules against ``torch.func.functional_call``.

Each case is built from its seed alone: a random composition of module kinds
(linear, convolutions, norms, embeddings, recurrent layers, attention,
parametrizations, tied weights, buffers) in random containers, a random way
of calling it through indexing and slicing of its containers (``fmodel[:-1]``,
``fmodel[1]``, ``fmodel[-1]``, nested slices, ModuleList slices, ModuleDict
keys), and one or two inner SGD steps. The patched module's outputs and
meta-gradients are compared with the same computation written with
``functional_call`` on the original module, per task (``innerloop_ctx``) and
batched (``monkeypatch(num_tasks=N)``, against a loop over the tasks).

The CI budget is a fixed set of seeds; ``HIGHER_FUZZ_EXAMPLES=500`` runs more
(nightly). A failure names its seed; ``HIGHER_FUZZ_SEED=<seed>`` replays it
alone, and the message shows the model and the calls.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fuzz_support import replayable, seeds
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parametrizations, parametrize

import higher
from higher._exact_norms import ExactNorms

SEEDS = seeds(16)
TOL = {"rtol": 1e-7, "atol": 1e-9}
LR = 0.1


# -- module kinds working on (batch, time, features) -------------------------------
class ChannelsFirst(nn.Module):
    """Runs a (batch, channels, length) module on (batch, time, features)."""

    def __init__(self, inner: nn.Module, two_d: bool = False) -> None:
        super().__init__()
        self.inner, self.two_d = inner, two_d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2)
        if self.two_d:
            return self.inner(y.unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return self.inner(y).transpose(1, 2)


class FirstOutput(nn.Module):
    """An RNN's output sequence."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class ScaledShift(nn.Module):
    """A parameter and a floating-point buffer."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(d) * 0.1)
        self.register_buffer("scale", torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class Symmetric(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (w + w.transpose(0, 1)) / 2


class ListNet(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class DictNet(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({f"b{i}": m for i, m in enumerate(layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = block(x)
        return x


ACTIVATIONS = [nn.Tanh, nn.GELU, nn.SiLU, nn.Softplus, nn.ELU, nn.Sigmoid, nn.LeakyReLU]


def make_layer(rng: random.Random, d: int, train: bool, shared: list[nn.Module]) -> nn.Module:
    """One random layer mapping (batch, time, d) to the same shape."""
    kinds = [
        "linear", "linear", "act", "layernorm", "groupnorm", "batchnorm1d", "batchnorm2d",
        "conv1d", "conv2d", "rnn", "lstm", "gru", "attention", "encoder", "buffer",
        "weight_norm", "symmetric", "tied_module", "tied_weight",
    ]  # fmt: skip
    if not train:
        kinds.append("dropout")
    kind = rng.choice(kinds)
    if kind == "linear":
        return nn.Linear(d, d, bias=rng.random() < 0.7)
    if kind == "act":
        return rng.choice(ACTIVATIONS)()
    if kind == "dropout":
        return nn.Dropout(rng.choice([0.1, 0.5]))
    if kind == "layernorm":
        return nn.LayerNorm(d, elementwise_affine=rng.random() < 0.8)
    if kind == "groupnorm":
        return ChannelsFirst(nn.GroupNorm(rng.choice([1, 2]), d))
    if kind == "batchnorm1d":
        return ChannelsFirst(nn.BatchNorm1d(d, track_running_stats=rng.random() < 0.7))
    if kind == "batchnorm2d":
        return ChannelsFirst(nn.BatchNorm2d(d), two_d=True)
    if kind == "conv1d":
        return ChannelsFirst(nn.Conv1d(d, d, rng.choice([1, 3]), padding="same"))
    if kind == "conv2d":
        k = rng.choice([1, 3])
        return ChannelsFirst(nn.Conv2d(d, d, (k, 1), padding=(k // 2, 0)), two_d=True)
    if kind in ("rnn", "lstm", "gru"):
        cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind]
        bidirectional = rng.random() < 0.3
        hidden = d // 2 if bidirectional else d
        return FirstOutput(cls(d, hidden, batch_first=True, bidirectional=bidirectional))
    if kind == "attention":
        return SelfAttention(d, rng.choice([1, 2]))
    if kind == "encoder":
        return nn.TransformerEncoderLayer(
            d, 2, dim_feedforward=6, dropout=0.0, batch_first=True, norm_first=rng.random() < 0.5
        )
    if kind == "buffer":
        return ScaledShift(d)
    if kind == "weight_norm":
        return parametrizations.weight_norm(nn.Linear(d, d))
    if kind == "symmetric":
        layer = nn.Linear(d, d)
        parametrize.register_parametrization(layer, "weight", Symmetric())
        return layer
    if kind == "tied_module":  # the same module at two places
        if shared:
            return rng.choice(shared)
        shared.append(nn.Linear(d, d))
        return shared[-1]
    # tied_weight: a new layer sharing an earlier layer's weight
    layer = nn.Linear(d, d)
    if shared:
        layer.weight = shared[0].weight
    else:
        shared.append(layer)
    return layer


# -- cases ---------------------------------------------------------------------------
Path = tuple[Any, ...]  # indexing operations applied one after another


class Case:
    """A model, its input and the calls that compose it, all from one seed."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        torch.manual_seed(seed)
        self.seed = seed
        self.d = rng.choice([4, 6])
        self.train = rng.random() < 0.5
        self.embed = rng.random() < 0.2
        self.root = rng.choice(["sequential", "sequential", "nested", "modulelist", "moduledict"])
        self.root += rng.choice(["", "", "-custom"]) if self.root != "nested" else ""
        self.inner_steps = rng.choice([1, 2])
        shared: list[nn.Module] = []
        n = rng.randint(2, 5)
        layers = [make_layer(rng, self.d, self.train, shared) for _ in range(n)]
        if rng.random() < 0.4:  # weight tying, one way or the other
            first = nn.Linear(self.d, self.d)
            second = first if rng.random() < 0.5 else nn.Linear(self.d, self.d)
            second.weight = first.weight
            i = rng.randint(0, len(layers))
            layers.insert(i, first)
            layers.insert(rng.randint(i + 1, len(layers)), second)
        if self.embed:
            layers.insert(0, nn.Embedding(7, self.d))
        self.model = self._container(rng, layers).double().train(self.train)
        self.paths = self._calls(rng)

    def _container(self, rng: random.Random, layers: list[nn.Module]) -> nn.Module:
        kind = self.root
        if kind == "nested":  # Sequentials inside the Sequential
            groups: list[nn.Module] = []
            i = 0
            while i < len(layers):
                k = rng.randint(1, 3)
                chunk = layers[i : i + k]
                groups.append(nn.Sequential(*chunk) if len(chunk) > 1 else chunk[0])
                i += k
            return nn.Sequential(*groups)
        if kind == "sequential":
            return nn.Sequential(*layers)
        if kind == "sequential-custom":
            return nn.Sequential(nn.Sequential(*layers))
        if kind.startswith("modulelist"):
            return ListNet(layers) if kind.endswith("custom") else nn.ModuleList(layers)
        return (
            DictNet(layers)
            if kind.endswith("custom")
            else nn.ModuleDict({f"b{i}": m for i, m in enumerate(layers)})
        )

    def _calls(self, rng: random.Random) -> list[Path]:
        """Paths whose modules, applied in turn, compute the whole model."""
        m = self.model
        if self.root.endswith("custom") and not self.root.startswith("sequential"):
            return [()]
        if isinstance(m, nn.ModuleDict):
            return [(k,) for k in m]
        return self._split(rng, m, ())

    def _split(self, rng: random.Random, seq: nn.Module, prefix: Path) -> list[Path]:
        n = len(seq)
        if isinstance(seq, nn.Sequential) and rng.random() < 0.25:
            return [prefix]  # the whole container at once
        paths: list[Path] = []
        i = 0
        while i < n:
            k = rng.randint(1, n - i)
            if k == 1:
                j = rng.choice([i, i - n])  # positive or negative index
                child = seq[i]
                if isinstance(child, nn.Sequential) and rng.random() < 0.6:
                    paths += self._split(rng, child, (*prefix, j))
                else:
                    paths.append((*prefix, j))
            elif isinstance(seq, nn.ModuleList):  # a slice, then its elements
                stop = i + k if i + k < n or rng.random() < 0.5 else None
                paths += [(*prefix, slice(i, stop), j) for j in range(k)]
            else:
                stop = i + k if i + k < n else rng.choice([None, i + k, -0]) or None
                if stop is not None and rng.random() < 0.5 and stop < n:
                    stop = stop - n  # fmodel[:-1]
                paths.append((*prefix, slice(i, stop)))
            i += k
        return paths

    def inputs(self, lead: tuple[int, ...] = ()) -> torch.Tensor:
        shape = (*lead, 3, 5)
        if self.embed:
            return torch.randint(0, 7, shape)
        return torch.randn(*shape, self.d, dtype=torch.float64)

    def _ties(self) -> list[list[str]]:
        """Parameter names that are one tensor (a shared module or a shared weight)."""
        names: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        return [group for group in names.values() if len(group) > 1]

    def __repr__(self) -> str:
        return (
            f"seed={self.seed} (replay: HIGHER_FUZZ_SEED={self.seed} pytest "
            f"tests/test_fuzz_modules.py)\ntrain={self.train} inner_steps={self.inner_steps} "
            f"root={self.root}\ncalls={[_show(p) for p in self.paths]}\n"
            f"tied: {self._ties()}\nmodel={self.model}"
        )


def _show(path: Path) -> str:
    def one(i: Any) -> str:
        if isinstance(i, slice):
            return f"[{'' if i.start is None else i.start}:{'' if i.stop is None else i.stop}]"
        return f"[{i!r}]"

    return "fmodel" + "".join(one(i) for i in path)


def select(module: Any, path: Path) -> Any:
    for i in path:
        module = module[i]
    return module


def run_calls(module: Any, paths: list[Path], x: torch.Tensor) -> torch.Tensor:
    for path in paths:
        x = select(module, path)(x)
    return x


def loss_of(out: torch.Tensor, per_task: bool) -> torch.Tensor:
    out = out.pow(2).tanh()
    return out.flatten(1).mean(1) if per_task else out.mean()


# -- the reference: functional_call on the original module -----------------------------
def call(module: nn.Module, named: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``functional_call``, then the module's own parameters put back: torch 2.13's leaves
    the swapped-in tensors in a submodule that appears at two places."""
    saved = [(m, k, v) for m in module.modules() for k, v in m._parameters.items()]
    try:
        # Torch's native batch norm differentiates wrongly on some layouts
        # (test_native_batch_norm_gradient_depends_on_strides): the reference
        # runs it as primitive ops, which finite differences confirm.
        with ExactNorms():
            return functional_call(module, named, (x,))
    finally:
        for m, k, v in saved:
            m._parameters[k] = v


def reference_calls(case: Case, weights: dict[int, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``run_calls`` with functional_call on the original module's submodules."""
    for path in case.paths:
        sub = select(case.model, path)
        named = {n: weights[id(p)] for n, p in sub.named_parameters(remove_duplicate=False)}
        x = call(sub, named, x)
    return x


def reference_task(
    case: Case, x_inner: torch.Tensor, x_outer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's outer output and loss, with explicit SGD steps on a weights dict."""
    # The meta-gradient differentiates attention twice: only the math kernel can.
    with sdpa_kernel(SDPBackend.MATH):
        return _reference_task(case, x_inner, x_outer)


def _reference_task(
    case: Case, x_inner: torch.Tensor, x_outer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    originals = list(case.model.parameters())
    names = {id(p): n for n, p in case.model.named_parameters()}
    weights = {id(p): p for p in originals}
    for _ in range(case.inner_steps):
        if case.root in ("modulelist", "moduledict"):  # not callable: its elements in turn
            inner = reference_calls(case, weights, x_inner)
        else:  # the model as a whole (functional_call on the root)
            named = {names[k]: w for k, w in weights.items()}
            inner = call(case.model, named, x_inner)
        grads = torch.autograd.grad(
            loss_of(inner, False), list(weights.values()), create_graph=True, allow_unused=True
        )
        weights = {k: w if g is None else w - LR * g for (k, w), g in zip(weights.items(), grads)}
    out = reference_calls(case, weights, x_outer)
    return out, loss_of(out, False)


def meta_grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def inner_forward(fmodel: Any, case: Case) -> Callable[[torch.Tensor], torch.Tensor]:
    if case.root in ("modulelist", "moduledict"):  # not callable: compose the elements
        return lambda x: run_calls(fmodel, case.paths, x)
    return fmodel


def compare(ours: list[torch.Tensor], theirs: list[torch.Tensor], what: str, case: Case) -> None:
    names = [n for n, _ in case.model.named_parameters()]
    for name, a, b in zip(names, ours, theirs):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"{what} of {n}: {m}\n{case}")


# -- the tests -------------------------------------------------------------------------
def quiet() -> Any:
    """Batched mode's notices that it loops over tasks are expected here."""
    catcher = warnings.catch_warnings()
    catcher.__enter__()
    warnings.filterwarnings("ignore", message="higher batched mode", category=UserWarning)
    # vmap's slow fallback for weight_norm: slower, not different.
    warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
    return catcher


@pytest.mark.parametrize("seed", SEEDS)
@replayable(lambda seed: Case(seed))
def test_per_task_matches_functional_call(seed: int) -> None:
    case = Case(seed)
    params = list(case.model.parameters())
    x_inner, x_outer = case.inputs(), case.inputs()
    opt = torch.optim.SGD(params, lr=LR)
    with higher.innerloop_ctx(case.model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        forward = inner_forward(fmodel, case)
        for _ in range(case.inner_steps):
            diffopt.step(loss_of(forward(x_inner), False))
        out = run_calls(fmodel, case.paths, x_outer)
        ours = meta_grads(loss_of(out, False), params)
    ref_out, ref_loss = reference_task(case, x_inner, x_outer)
    torch.testing.assert_close(out, ref_out, **TOL, msg=lambda m: f"output: {m}\n{case}")
    compare(ours, meta_grads(ref_loss, params), "meta-gradient", case)


@pytest.mark.parametrize("seed", SEEDS)
@replayable(lambda seed: Case(seed))
def test_batched_matches_a_loop_of_functional_calls(seed: int) -> None:
    case = Case(seed)
    tasks = 2
    params = list(case.model.parameters())
    x_inner, x_outer = case.inputs((tasks,)), case.inputs((tasks,))
    catcher = quiet()
    try:
        fmodel = higher.monkeypatch(case.model, copy_initial_weights=False, num_tasks=tasks)
        diffopt = higher.optim.create_diff_optim(torch.optim.SGD, {"lr": LR}, fmodel=fmodel)
        forward = inner_forward(fmodel, case)
        for _ in range(case.inner_steps):
            diffopt.step(loss_of(forward(x_inner), True))
        out = run_calls(fmodel, case.paths, x_outer)
    finally:
        catcher.__exit__(None, None, None)
    ours = meta_grads(loss_of(out, True).sum(), params)
    refs = [reference_task(case, x_inner[t], x_outer[t]) for t in range(tasks)]
    ref_out = torch.stack([r[0] for r in refs])
    torch.testing.assert_close(out, ref_out, **TOL, msg=lambda m: f"output: {m}\n{case}")
    ref_loss = torch.stack([r[1] for r in refs]).sum()
    compare(ours, meta_grads(ref_loss, params), "meta-gradient", case)


def test_the_cases_cover_every_kind_and_call() -> None:
    """The CI seeds reach slices, negative indices, nested paths and every container."""
    cases = [Case(s) for s in range(16)]
    roots = {c.root for c in cases}
    assert {"sequential", "nested", "modulelist", "moduledict"} <= roots, roots
    shown = " ".join(_show(p) for c in cases for p in c.paths)
    for piece in (":-", "[-", "][", "'b"):
        assert piece in shown, piece
    kinds = {type(m).__name__ for c in cases for m in c.model.modules()}

    def ties(model: nn.Module) -> tuple[bool, bool]:
        slots = [id(p) for m in model.modules() for p in m._parameters.values() if p is not None]
        shared = len(list(model.modules(remove_duplicate=False))) > len(list(model.modules()))
        return len(slots) > len(set(slots)), shared

    assert any(ties(c.model)[0] for c in cases) and any(ties(c.model)[1] for c in cases)
    for kind in ("LSTM", "GRU", "RNN", "MultiheadAttention", "TransformerEncoderLayer",
                 "Conv1d", "Conv2d", "BatchNorm1d", "GroupNorm", "Embedding"):  # fmt: skip
        assert kind in kinds, kind


def test_vmap_and_loop_agree_group_norm_then_batch_norm2d() -> None:
    """Found by this fuzzer (seeds 28 and 78): the loop ran torch's native batch norm on
    GroupNorm's permuted output and got wrong gradients; vmap (primitive ops) was right."""
    model = nn.Sequential(
        ChannelsFirst(nn.GroupNorm(1, 4, affine=False)),
        ChannelsFirst(nn.BatchNorm2d(4), two_d=True),
    )
    model = model.double().eval()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    steps = {}
    for strategy in ("vmap", "loop"):
        fmodel = higher.monkeypatch(model, copy_initial_weights=False, num_tasks=2)
        fmodel.task_strategy = strategy
        diffopt = higher.optim.create_diff_optim(torch.optim.SGD, {"lr": LR}, fmodel=fmodel)
        diffopt.step(loss_of(fmodel(x), True))
        steps[strategy] = fmodel.fast_params
    for a, b in zip(steps["vmap"], steps["loop"]):
        torch.testing.assert_close(a, b, **TOL)


def test_calling_parts_of_seed_71_matches_whole_call() -> None:
    """Found by this fuzzer (seed 71): the whole call ran torch's native batch norm on a
    Conv2d's permuted output and got wrong gradients; the parts (stacked, contiguous) were
    right."""
    case = Case(71)
    x = case.inputs((2,))
    fmodel = higher.monkeypatch(case.model, copy_initial_weights=False, num_tasks=2)
    fmodel.task_strategy = "loop"
    fast = [(p.detach() + 0.1 * torch.randn_like(p)).requires_grad_() for p in fmodel.fast_params]
    fmodel.update_params(fast)
    parts = run_calls(fmodel, [(0,), (slice(1, None),)], x)
    ours = torch.autograd.grad(loss_of(parts, True).sum(), fast, allow_unused=True)
    whole = fmodel(x)
    theirs = torch.autograd.grad(loss_of(whole, True).sum(), fast, allow_unused=True)
    torch.testing.assert_close(parts, whole, **TOL)
    for a, b in zip(ours, theirs):
        if a is not None:
            torch.testing.assert_close(a, b, **TOL)


# -- torch's native batch norm against finite differences ---------------------------------
def _bn_on_permuted_input(training: bool):
    """BatchNorm2d on (batch, channels, time, 1) made from (batch, time, channels) as
    ChannelsFirst does: strides (30, 1, 6, 1), a size-1 dim with stride 1."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).double().train(training)
    bn.running_mean.normal_(0, 0.3)
    bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 6, dtype=torch.float64).transpose(1, 2).unsqueeze(-1)
    weight = (torch.randn(6, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(6, dtype=torch.float64).requires_grad_()
    return bn, x.requires_grad_(), weight, bias


@pytest.mark.xfail(
    strict=True,
    reason="torch 2.13's native batch norm: wrong gradients (relative error ~1) for an "
    "input with strides (30, 1, 6, 1); when this passes, higher's ExactBatchNorm detour "
    "(higher._exact_norms) may go",
)
@pytest.mark.parametrize("training", [False, True])
def test_native_batch_norm_gradient_depends_on_strides(training: bool) -> None:
    """Plain torch, no higher: the native kernel against finite differences."""
    bn, x, weight, bias = _bn_on_permuted_input(training)

    def f(x, weight, bias):
        y = F.batch_norm(x, bn.running_mean.clone(), bn.running_var.clone(), weight, bias, training)
        return y.pow(2).tanh()

    assert torch.autograd.gradcheck(f, (x, weight, bias), raise_exception=False)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("num_tasks", [None, 2])
def test_patched_batch_norm_on_permuted_input_matches_finite_differences(
    training: bool, num_tasks: int | None
) -> None:
    """Through higher (per task and batched loop): first and second order against finite
    differences, on the layout where the native kernel is wrong."""
    bn, x, weight, bias = _bn_on_permuted_input(training)
    if num_tasks is not None:
        # Each task's input keeps the layout: strides (60, 30, 1, 6, 1).
        x = torch.randn(num_tasks, 2, 5, 6, dtype=torch.float64).transpose(2, 3).unsqueeze(-1)
        x.requires_grad_()
        weight = weight.detach().expand(num_tasks, -1).clone().requires_grad_()
        bias = bias.detach().expand(num_tasks, -1).clone().requires_grad_()
    fmodel = higher.monkeypatch(bn, copy_initial_weights=True, num_tasks=num_tasks)
    if num_tasks is not None:
        fmodel.task_strategy = "loop"

    # In training mode the running statistics move at each call; the output does not
    # read them.
    def f(x, weight, bias):
        fmodel.update_params([weight, bias])
        return fmodel(x).pow(2).tanh()

    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradgradcheck(f, (x, weight, bias))


@pytest.mark.parametrize("num_tasks", [None, 2])
def test_maml_meta_gradient_conv_then_eval_batch_norm_matches_finite_differences(
    num_tasks: int | None,
) -> None:
    """The shrunk seed 71: a 1x1 Conv2d then an eval-mode BatchNorm2d on the permuted layout,
    two SGD steps; the meta-gradient of the initial weights against finite differences."""
    torch.manual_seed(1)
    model = nn.Sequential(
        ChannelsFirst(nn.Conv2d(6, 6, 1), two_d=True),
        ChannelsFirst(nn.BatchNorm2d(6), two_d=True),
    )
    model = model.double().eval()
    model[1].inner.running_mean.normal_(0, 0.3)
    model[1].inner.running_var.uniform_(0.5, 1.5)
    shape = (2, 5, 6) if num_tasks is None else (num_tasks, 2, 5, 6)
    x_inner, x_outer = (
        torch.randn(shape, dtype=torch.float64),
        torch.randn(shape, dtype=torch.float64),
    )
    per_task = num_tasks is not None

    def outer_loss() -> torch.Tensor:
        fmodel = higher.monkeypatch(model, copy_initial_weights=False, num_tasks=num_tasks)
        if per_task:
            fmodel.task_strategy = "loop"
        diffopt = higher.optim.create_diff_optim(torch.optim.SGD, {"lr": 0.5}, fmodel=fmodel)
        for _ in range(2):
            diffopt.step(loss_of(fmodel(x_inner), per_task))
        return loss_of(fmodel(x_outer), per_task).sum()

    report = higher.testing.check_meta_gradient(outer_loss, model, atol=1e-7, rtol=1e-6)
    assert report.ok, str(report)


def test_per_task_submodule_called_directly_matches_finite_differences() -> None:
    """The shrunk seed 78: GroupNorm then a training-mode BatchNorm2d, the inner steps on
    the whole model, the outer loss through ``fmodel[0]`` (a submodule called directly, not
    through the root's call, which once ran torch's native batch norm)."""
    torch.manual_seed(78)
    model = nn.Sequential(
        nn.Sequential(
            ChannelsFirst(nn.GroupNorm(2, 4)),
            ChannelsFirst(nn.BatchNorm2d(4), two_d=True),
        )
    ).double()
    x_inner = torch.randn(3, 5, 4, dtype=torch.float64)
    x_outer = torch.randn(3, 5, 4, dtype=torch.float64)

    def outer_loss() -> torch.Tensor:
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(loss_of(fmodel(x_inner), False))
            return loss_of(fmodel[0](x_outer), False)

    report = higher.testing.check_meta_gradient(outer_loss, model, atol=1e-9, rtol=1e-6)
    assert report.ok, str(report)
