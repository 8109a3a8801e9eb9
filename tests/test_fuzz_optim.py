"""Differential fuzzing of the differentiable optimizers against ``torch.optim``.

Each case, built from its seed alone, draws one of the eleven optimizers, a
valid value for every option it has (``foreach`` included, which must change
nothing), one or two param groups with options of their own, a few warm-up
steps of the torch optimizer (whose state the twin imports), and a set of
hyperparameters given to the twin as tensors requiring grad. The twin's
weights and state then follow torch's for a few float64 steps to ~1e-9; on a
sample of the cases ``gradcheck`` verifies the meta-gradient with respect to
the tensor hyperparameters. Values torch rejects when an optimizer is built
must be rejected by ``override`` too, with torch's message or a clearer one.

``HIGHER_FUZZ_EXAMPLES`` raises the number of cases (nightly);
``HIGHER_FUZZ_SEED=<seed>`` replays one, as every failure says.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
import torch
from fuzz_support import replayable, seeds
from torch import nn

import higher

SEEDS = seeds(44)
STEPS = 4
optim = torch.optim
OPTIMIZERS = [
    optim.SGD,
    optim.Adam,
    optim.AdamW,
    optim.Adamax,
    optim.NAdam,
    optim.RAdam,
    optim.Adagrad,
    optim.Adadelta,
    optim.RMSprop,
    optim.Rprop,
    optim.ASGD,
]


def _either(rng: random.Random, p: float, value: float, otherwise: float = 0.0) -> float:
    return value if rng.random() < p else otherwise


def draw_options(rng: random.Random, opt: type, round_: int | None = None) -> dict[str, Any]:
    """A valid value for every option of ``opt`` (constructor defaults sometimes).

    ``round_`` (0 to 3) sets the flags instead of chance, so that a few rounds
    over the optimizers reach every combination of ``maximize`` and the others.
    """
    u = rng.uniform

    def flag(p: float, late: bool = True) -> bool:
        if round_ is None:
            return rng.random() < p
        return round_ >= 2 if late else round_ % 2 == 1

    o: dict[str, Any] = {"maximize": flag(0.4, late=False)}
    o["foreach"] = rng.choice([None, True, False])
    wd = _either(rng, 0.5, u(0.0, 0.1))
    betas = (u(0.5, 0.95), rng.choice([0.9, 0.99, 0.999]))
    eps = rng.choice([1e-8, 1e-6, 1e-3])
    if opt is optim.SGD:
        nesterov = flag(0.3)
        momentum = u(0.1, 0.95) if nesterov else _either(rng, 0.6, u(0.1, 0.95))
        dampening = 0.0 if nesterov else _either(rng, 0.4, u(0.0, 0.5))
        o.update(lr=u(0.01, 0.3), momentum=momentum, dampening=dampening, nesterov=nesterov)
        o.update(weight_decay=wd)
    elif opt in (optim.Adam, optim.AdamW):
        o.update(lr=u(1e-3, 0.05), betas=betas, eps=eps, weight_decay=wd)
        o.update(amsgrad=flag(0.4))
        if opt is optim.Adam:
            o["decoupled_weight_decay"] = flag(0.3)
    elif opt is optim.Adamax:
        o.update(lr=u(1e-3, 0.05), betas=betas, eps=eps, weight_decay=wd)
    elif opt is optim.NAdam:
        o.update(lr=u(1e-3, 0.05), betas=betas, eps=eps, weight_decay=wd)
        o.update(momentum_decay=_either(rng, 0.7, u(0.0, 0.01), 0.004))
        o["decoupled_weight_decay"] = flag(0.3)
    elif opt is optim.RAdam:
        o.update(lr=u(1e-3, 0.05), betas=betas, eps=eps, weight_decay=wd)
        o["decoupled_weight_decay"] = flag(0.3)
    elif opt is optim.Adagrad:
        o.update(lr=u(0.01, 0.3), lr_decay=_either(rng, 0.5, u(0.0, 0.1)), weight_decay=wd)
        o.update(initial_accumulator_value=_either(rng, 0.5, u(0.0, 1.0)))
        o.update(eps=rng.choice([1e-10, 1e-6]))
    elif opt is optim.Adadelta:
        o.update(lr=u(0.1, 1.0), rho=u(0.5, 0.95), eps=rng.choice([1e-6, 1e-4]), weight_decay=wd)
    elif opt is optim.RMSprop:
        o.update(lr=u(1e-3, 0.03), alpha=u(0.8, 0.99), eps=eps, weight_decay=wd)
        o.update(momentum=_either(rng, 0.5, u(0.1, 0.9)), centered=flag(0.5))
    elif opt is optim.Rprop:
        o.update(lr=u(1e-3, 0.05), etas=(u(0.3, 0.7), u(1.1, 1.5)))
        o.update(step_sizes=(u(1e-6, 1e-3), u(0.02, 1.0)))
    else:  # ASGD
        o.update(lr=u(0.01, 0.1), lambd=_either(rng, 0.5, u(0.0, 0.01), 1e-4))
        o.update(alpha=u(0.5, 0.9), t0=rng.choice([1e6, 1.0, 2.0, 3.0]), weight_decay=wd)
    return o


#: Hyperparameters the fuzzer may give as tensors requiring grad.
LEARNABLE = {
    optim.SGD: ("lr", "momentum", "dampening", "weight_decay"),
    optim.Adam: ("lr", "betas", "weight_decay"),
    optim.AdamW: ("lr", "betas", "weight_decay"),
    optim.Adamax: ("lr", "betas", "weight_decay"),
    optim.NAdam: ("lr", "betas", "weight_decay", "momentum_decay"),
    optim.RAdam: ("lr", "betas", "weight_decay"),
    optim.Adagrad: ("lr", "lr_decay", "weight_decay"),
    optim.Adadelta: ("lr", "rho", "weight_decay"),
    optim.RMSprop: ("lr", "alpha", "weight_decay", "momentum"),
    optim.Rprop: ("lr", "etas"),
    optim.ASGD: ("lr", "lambd", "alpha", "weight_decay"),
}


class Case:
    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.seed = seed
        self.opt = OPTIMIZERS[seed % len(OPTIMIZERS)] if seed < 44 else rng.choice(OPTIMIZERS)
        self.options = draw_options(rng, self.opt, seed // 11 if seed < 44 else None)
        self.two_groups = rng.random() < 0.5
        self.group_options: dict[str, Any] = {}
        if self.two_groups:  # the second group's own values
            other = draw_options(rng, self.opt)
            keys = [k for k in other if k not in ("foreach", "nesterov", "dampening")]
            for k in rng.sample(keys, rng.randint(1, 3)):
                self.group_options[k] = other[k]
            if self.opt is optim.SGD and self.options["nesterov"]:
                self.group_options.pop("momentum", None)
        self.warm = rng.choice([0, 0, 1, 2])
        learnable = [
            k
            for k in LEARNABLE[self.opt]
            if self._value(k) not in (None, 0.0)
            or (k == "weight_decay" and rng.random() < 0.5)
            or (k == "dampening" and self.options.get("momentum", 0) > 0)
        ]
        # A quarter of the cases (every optimizer among the CI seeds) check the
        # meta-gradient of at least one tensor hyperparameter.
        self.check_grad = seed % 4 == 0
        least = 1 if self.check_grad else 0
        size = rng.randint(least, len(learnable))
        if seed // 11 == 1:  # one round over the optimizers learns them all
            size = len(learnable)
        self.learned = sorted(rng.sample(learnable, size))

    def _value(self, key: str) -> Any:
        return self.options.get(key)

    def groups(self, model: nn.Module) -> list[dict[str, Any]]:
        if not self.two_groups:
            return [{"params": list(model.parameters())}]
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return [{"params": weights}, {"params": biases, **self.group_options}]

    def torch_opt(self, model: nn.Module) -> torch.optim.Optimizer:
        return self.opt(self.groups(model), **self.options)

    def hyper_values(self, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The learned hyperparameters' values in torch's groups, flattened."""
        flat = []
        for key in self.learned:
            for group in opt.param_groups:
                value = group[key]
                flat += list(value) if isinstance(value, tuple) else [value]
        return [torch.tensor(float(v), dtype=torch.float64) for v in flat]

    def override(self, opt: torch.optim.Optimizer, tensors: list[torch.Tensor]) -> dict[str, Any]:
        """``tensors`` (as ``hyper_values`` lays them out) as an override, per group."""
        it = iter(tensors)
        out: dict[str, Any] = {}
        for key in self.learned:
            pair = isinstance(opt.param_groups[0][key], tuple)
            out[key] = [(next(it), next(it)) if pair else next(it) for _ in opt.param_groups]
        return out

    def __repr__(self) -> str:
        return (
            f"seed={self.seed} (replay: HIGHER_FUZZ_SEED={self.seed} pytest "
            f"tests/test_fuzz_optim.py)\n{self.opt.__name__}({self.options}); second group: "
            f"{self.group_options if self.two_groups else None}; warm-up steps: {self.warm}; "
            f"tensor hyperparameters: {self.learned}"
        )


#: Tensor hyperparameters that enter scalar state torch keeps in float32 (NAdam's
#: ``mu_product``, ASGD's ``eta`` and ``mu``): higher computes that state in the tensor's dtype (float64
#: here), so torch's float32 rounding of it, ~1e-8, bounds the agreement.
FLOAT32_STATE = {
    optim.NAdam: {"betas", "momentum_decay"},
    optim.ASGD: {"lr", "lambd", "alpha"},  # eta and mu
}


def tolerance(case: Case) -> dict[str, float]:
    if FLOAT32_STATE.get(case.opt, set()) & set(case.learned):
        return {"rtol": 1e-6, "atol": 1e-9}
    return {"rtol": 1e-9, "atol": 1e-11}


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def make_data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64))
        for _ in range(n)
    ]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def assert_state(ours: dict, theirs: dict, where: str, case: Case) -> None:
    keys = set(ours)
    if "momentum" in case.learned:
        # A tensor momentum keeps its buffer even at 0, where torch keeps none:
        # the meta-gradient with respect to it needs the buffer.
        keys -= {"momentum_buffer"} - set(theirs)
    assert keys == set(theirs), f"{where}: state keys {sorted(ours)} != {sorted(theirs)}\n{case}"
    for key, value in theirs.items():
        torch.testing.assert_close(
            torch.as_tensor(ours[key], dtype=torch.float64).detach(),
            torch.as_tensor(value, dtype=torch.float64),
            **tolerance(case),
            msg=lambda m, k=key: f"{where}, state '{k}': {m}\n{case}",
        )


def setup(case: Case) -> tuple[nn.Module, nn.Module, Any, list]:
    """Model and torch optimizer after the warm-up; the reference twin; the data."""
    torch.manual_seed(case.seed)
    model = make_model()
    data = make_data(case.warm + STEPS + 1)
    opt = case.torch_opt(model)
    for x, y in data[: case.warm]:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    # Copied together, so the twin's state keeps torch's dtypes (load_state_dict
    # would cast scalar state such as NAdam's mu_product to the parameters' dtype).
    twin, twin_opt = copy.deepcopy((model, opt))
    for group in twin_opt.param_groups:  # the reference: torch's single-tensor code
        group["foreach"] = False
    return model, twin, (opt, twin_opt), data[case.warm :]


@pytest.mark.parametrize("seed", SEEDS)
@replayable(lambda seed: Case(seed))
def test_steps_match_torch_optim(seed: int) -> None:
    case = Case(seed)
    model, twin, (opt, twin_opt), data = setup(case)
    hypers = [h.requires_grad_() for h in case.hyper_values(opt)]
    fmodel = higher.monkeypatch(model)
    diffopt = higher.optim.get_diff_optim(
        opt, model.parameters(), fmodel=fmodel, override=case.override(opt, hypers)
    )
    for t, (x, y) in enumerate(data[:STEPS]):
        twin_opt.zero_grad()
        loss_fn(twin(x), y).backward()
        twin_opt.step()
        diffopt.step(loss_fn(fmodel(x), y))
        for i, (p, q) in enumerate(zip(fmodel.fast_params, twin.parameters())):
            torch.testing.assert_close(
                p,
                q,
                **tolerance(case),
                msg=lambda m, i=i, t=t: f"step {t} param {i}: {m}\n{case}",
            )
            assert_state(diffopt.state[i], twin_opt.state[q], f"step {t} param {i}", case)
    # The tensors are in the graph, but for Rprop's lr once its state exists: as in
    # torch, lr only sets the first step sizes.
    if case.learned and not (case.opt is optim.Rprop and case.warm and case.learned == ["lr"]):
        x, y = data[STEPS]
        grads = torch.autograd.grad(loss_fn(fmodel(x), y), hypers, allow_unused=True)
        assert any(g is not None for g in grads), case


@pytest.mark.parametrize("seed", [s for s in SEEDS if Case(s).check_grad])
@replayable(lambda seed: Case(seed))
def test_meta_gradient_of_tensor_hyperparameters(seed: int) -> None:
    case = Case(seed)
    model, _, (opt, _), data = setup(case)
    start = [p.detach().clone() for p in model.parameters()]

    def final_loss(*hypers: torch.Tensor) -> torch.Tensor:
        fmodel = higher.monkeypatch(model)
        fmodel.update_params(start)
        diffopt = higher.optim.get_diff_optim(
            opt, model.parameters(), fmodel=fmodel, override=case.override(opt, list(hypers))
        )
        for x, y in data[:STEPS]:
            diffopt.step(loss_fn(fmodel(x), y))
        x, y = data[STEPS]
        return loss_fn(fmodel(x), y)

    hypers = tuple(h.requires_grad_() for h in case.hyper_values(opt))
    try:
        torch.autograd.gradcheck(final_loss, hypers, eps=1e-6, atol=1e-6, rtol=1e-4)
    except Exception as error:
        raise AssertionError(f"{error}\n{case}") from None


# -- values torch rejects ----------------------------------------------------------------
#: For each optimizer, options and values its constructor rejects.
INVALID: dict[type, list[dict[str, Any]]] = {
    optim.SGD: [
        {"lr": -0.1},
        {"momentum": -0.5},
        {"weight_decay": -1e-3},
        {"dampening": 0.3},  # with nesterov
        {"momentum": 0.0},  # with nesterov
    ],
    optim.Adam: [{"lr": -1.0}, {"eps": -1e-8}, {"betas": (1.0, 0.9)}, {"betas": (0.9, -0.1)}],
    optim.AdamW: [{"betas": (-0.1, 0.9)}, {"betas": (0.9, 1.5)}, {"weight_decay": -0.1}],
    optim.Adamax: [{"betas": (1.2, 0.9)}, {"eps": -1.0}, {"lr": -0.5}],
    optim.NAdam: [{"betas": (0.9, 1.0)}, {"momentum_decay": -0.1}, {"weight_decay": -1.0}],
    optim.RAdam: [{"betas": (2.0, 0.9)}, {"eps": -1e-3}],
    optim.Adagrad: [{"lr_decay": -0.1}, {"initial_accumulator_value": -1.0}, {"eps": -1.0}],
    optim.Adadelta: [{"rho": 1.5}, {"rho": -0.1}, {"eps": -1.0}],
    optim.RMSprop: [{"alpha": -0.5}, {"momentum": -0.1}, {"eps": -1.0}],
    optim.Rprop: [{"etas": (1.5, 1.2)}, {"etas": (0.5, 0.9)}, {"etas": (0.0, 1.2)}],
    optim.ASGD: [{"lr": -0.1}, {"weight_decay": -0.1}],
}
INVALID_CASES = [(opt, bad) for opt, cases in INVALID.items() for bad in cases]


def _base(opt: type) -> dict[str, Any]:
    return {"momentum": 0.9, "nesterov": True} if opt is optim.SGD else {}


@pytest.mark.parametrize(
    ("opt_type", "bad"), INVALID_CASES, ids=[f"{o.__name__}-{b}" for o, b in INVALID_CASES]
)
def test_values_torch_rejects_are_rejected(opt_type: type, bad: dict[str, Any]) -> None:
    model = make_model()
    with pytest.raises(ValueError) as theirs:
        opt_type(model.parameters(), **{**_base(opt_type), **bad})
    opt = opt_type(model.parameters(), **_base(opt_type))
    with pytest.raises(ValueError) as ours:
        higher.optim.get_diff_optim(opt, model.parameters(), override=bad)
    # torch's wording, or a clearer one that names the option
    first = str(theirs.value).split(":")[0]
    assert first in str(ours.value), (str(ours.value), str(theirs.value))
    # A step's override is refused too, and leaves the optimizer as it was.
    fmodel = higher.monkeypatch(model)
    diffopt = higher.optim.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    before = [dict(g) for g in diffopt.param_groups]
    loss = fmodel(torch.randn(2, 3, dtype=torch.float64)).pow(2).mean()
    with pytest.raises(ValueError, match=first.split(" ")[0]):
        diffopt.step(loss, override=bad)
    assert diffopt.param_groups == before


def test_the_cases_cover_every_option() -> None:
    """The CI seeds reach every optimizer, flag and tensor hyperparameter kind."""
    cases = [Case(s) for s in range(44)]
    flags = {(c.opt, k) for c in cases for k, v in c.options.items() if v is True}
    for flag in [
        (optim.SGD, "nesterov"),
        (optim.Adam, "amsgrad"),
        (optim.AdamW, "amsgrad"),
        (optim.Adam, "decoupled_weight_decay"),
        (optim.NAdam, "decoupled_weight_decay"),
        (optim.RMSprop, "centered"),
        *[(o, "maximize") for o in OPTIMIZERS],
    ]:
        assert flag in flags, flag
    assert {c.opt for c in cases if c.check_grad} == set(OPTIMIZERS)
    learned = {k for c in cases for k in c.learned}
    assert {"lr", "betas", "etas", "momentum", "weight_decay", "rho"} <= learned, learned
    assert any(c.two_groups for c in cases) and any(c.warm for c in cases)
