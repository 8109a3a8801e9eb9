"""One registry of optimizer cases, driving the parity, gradcheck and override tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Case:
    name: str
    opt_type: type[torch.optim.Optimizer]
    kwargs: dict[str, Any]
    #: hyperparameters whose meta-gradient gradcheck verifies
    learnable: tuple[str, ...] = ("lr",)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.name


def _c(name, opt_type, learnable=("lr",), **kwargs):
    return Case(name, opt_type, kwargs, learnable)


optim = torch.optim
CASES = [
    _c("sgd", optim.SGD, lr=0.1),
    _c("sgd-momentum", optim.SGD, ("lr", "momentum"), lr=0.1, momentum=0.9),
    _c("sgd-dampening", optim.SGD, ("lr", "dampening"), lr=0.1, momentum=0.9, dampening=0.3),
    _c("sgd-nesterov", optim.SGD, ("lr", "momentum"), lr=0.1, momentum=0.8, nesterov=True),
    _c("sgd-weight_decay", optim.SGD, ("lr", "weight_decay"), lr=0.1, weight_decay=0.05),
    _c("sgd-maximize", optim.SGD, lr=0.1, momentum=0.5, maximize=True),
    _c("adam", optim.Adam, ("lr", "betas"), lr=0.01),
    _c("adam-betas-eps", optim.Adam, ("lr", "betas"), lr=0.01, betas=(0.8, 0.95), eps=1e-6),
    _c("adam-amsgrad", optim.Adam, lr=0.01, amsgrad=True),
    _c("adam-weight_decay", optim.Adam, ("lr", "weight_decay"), lr=0.01, weight_decay=0.1),
    _c("adam-decoupled", optim.Adam, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    _c("adam-maximize", optim.Adam, lr=0.01, maximize=True),
    _c("adamw", optim.AdamW, ("lr", "weight_decay"), lr=0.01),
    _c("adamw-amsgrad", optim.AdamW, lr=0.01, weight_decay=0.2, amsgrad=True),
    _c("adamax", optim.Adamax, ("lr", "betas"), lr=0.01),
    _c("adamax-weight_decay", optim.Adamax, lr=0.01, weight_decay=0.1, maximize=True),
    _c("nadam", optim.NAdam, ("lr", "momentum_decay"), lr=0.01),
    _c("nadam-weight_decay", optim.NAdam, lr=0.01, weight_decay=0.1, momentum_decay=0.01),
    _c("nadam-decoupled", optim.NAdam, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    _c("nadam-maximize", optim.NAdam, lr=0.01, maximize=True),
    _c("radam", optim.RAdam, ("lr", "betas"), lr=0.01, betas=(0.9, 0.9)),
    _c("radam-weight_decay", optim.RAdam, lr=0.01, betas=(0.9, 0.9), weight_decay=0.1),
    _c(
        "radam-decoupled",
        optim.RAdam,
        lr=0.01,
        betas=(0.9, 0.9),
        weight_decay=0.1,
        decoupled_weight_decay=True,
        maximize=True,
    ),
    _c("adagrad", optim.Adagrad, ("lr", "lr_decay"), lr=0.1, lr_decay=0.01),
    _c("adagrad-init", optim.Adagrad, lr=0.1, initial_accumulator_value=0.5, eps=1e-6),
    _c("adagrad-weight_decay", optim.Adagrad, lr=0.1, weight_decay=0.1, maximize=True),
    _c("adadelta", optim.Adadelta, ("lr", "rho"), lr=1.0),
    _c("adadelta-rho", optim.Adadelta, lr=0.5, rho=0.7, eps=1e-4, weight_decay=0.1),
    _c("adadelta-maximize", optim.Adadelta, lr=1.0, maximize=True),
    _c("rmsprop", optim.RMSprop, ("lr", "alpha"), lr=0.01),
    _c("rmsprop-centered", optim.RMSprop, lr=0.01, centered=True),
    _c("rmsprop-momentum", optim.RMSprop, ("lr", "momentum"), lr=0.01, momentum=0.9),
    _c(
        "rmsprop-centered-momentum",
        optim.RMSprop,
        lr=0.01,
        alpha=0.9,
        centered=True,
        momentum=0.5,
        weight_decay=0.1,
        maximize=True,
    ),
    _c("rprop", optim.Rprop, ("lr", "etas"), lr=0.01),
    _c("rprop-etas", optim.Rprop, lr=0.01, etas=(0.3, 1.5), step_sizes=(1e-3, 0.02), maximize=True),
    _c("asgd", optim.ASGD, ("lr", "lambd"), lr=0.05),
    _c("asgd-averaging", optim.ASGD, ("lr",), lr=0.05, lambd=0.01, alpha=0.5, t0=2.0),
    _c("asgd-weight_decay", optim.ASGD, lr=0.05, t0=1.0, weight_decay=0.1, maximize=True),
]

CASE_IDS = [c.id for c in CASES]
