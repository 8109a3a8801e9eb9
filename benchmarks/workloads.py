"""Benchmark workloads and the implementations compared on them.

Every implementation computes the same meta-gradient: the query loss after an
unrolled inner loop, back-propagated to the initial weights, averaged over a
meta-batch of tasks. ``handwritten`` is the reference written directly with
``torch.func.functional_call`` and ``torch.autograd.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

import higher

Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Workload:
    name: str
    description: str
    make_model: Callable[[], nn.Module]
    make_tasks: Callable[[torch.device], list[Task]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    inner_opt: str  # "sgd" or "adam"
    inner_lr: float
    inner_steps: int
    first_order: bool = False
    tags: set[str] = field(default_factory=set)


# -- models and data -------------------------------------------------------------
def mlp(width: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
        )

    return build


def sinusoid_tasks(meta_batch: int, shots: int) -> Callable[[torch.device], list[Task]]:
    def make(device: torch.device) -> list[Task]:
        g = torch.Generator().manual_seed(0)
        tasks = []
        for _ in range(meta_batch):
            amp = 0.1 + 4.9 * torch.rand((), generator=g)
            phase = math.pi * torch.rand((), generator=g)
            xs = torch.rand(shots, 1, generator=g) * 10 - 5
            xq = torch.rand(shots, 1, generator=g) * 10 - 5
            tasks.append(
                tuple(
                    t.to(device)
                    for t in (xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase))
                )
            )
        return tasks  # type: ignore[return-value]

    return make


def conv_net() -> nn.Module:
    def block(cin: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(1), *block(64), *block(64), *block(64), nn.Flatten(), nn.Linear(64, 5)
    )


def fewshot_tasks(
    meta_batch: int, ways: int, shots: int, queries: int
) -> Callable[[torch.device], list[Task]]:
    def make(device: torch.device) -> list[Task]:
        g = torch.Generator().manual_seed(0)
        tasks = []
        for _ in range(meta_batch):
            xs = torch.randn(ways * shots, 1, 28, 28, generator=g)
            xq = torch.randn(ways * queries, 1, 28, 28, generator=g)
            ys = torch.arange(ways).repeat_interleave(shots)
            yq = torch.arange(ways).repeat_interleave(queries)
            tasks.append((xs.to(device), ys.to(device), xq.to(device), yq.to(device)))
        return tasks

    return make


class LSTMRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 64, batch_first=True)
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def sequence_tasks(meta_batch: int) -> Callable[[torch.device], list[Task]]:
    def make(device: torch.device) -> list[Task]:
        g = torch.Generator().manual_seed(0)
        tasks = []
        for _ in range(meta_batch):
            xs, xq = (torch.randn(16, 20, 8, generator=g) for _ in range(2))
            w = torch.randn(8, 1, generator=g)
            tasks.append(tuple(t.to(device) for t in (xs, xs.sum(1) @ w, xq, xq.sum(1) @ w)))
        return tasks  # type: ignore[return-value]

    return make


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


WORKLOADS = {
    w.name: w
    for w in [
        *(
            Workload(
                f"W1-sgd{k}",
                f"MAML sinusoid, MLP 1-40-40-1, 25 tasks, {k} SGD steps",
                mlp(40),
                sinusoid_tasks(25, 10),
                mse,
                "sgd",
                0.01,
                k,
                tags={"W1"},
            )
            for k in (1, 5, 20)
        ),
        Workload(
            "W1-adam5",
            "MAML sinusoid, MLP 1-40-40-1, 25 tasks, 5 Adam steps",
            mlp(40),
            sinusoid_tasks(25, 10),
            mse,
            "adam",
            0.01,
            5,
            tags={"W1"},
        ),
        Workload(
            "W1-fo5",
            "first-order MAML sinusoid, 25 tasks, 5 SGD steps",
            mlp(40),
            sinusoid_tasks(25, 10),
            mse,
            "sgd",
            0.01,
            5,
            first_order=True,
            tags={"W1", "FO"},
        ),
        Workload(
            "W2-conv",
            "MAML 5-way 1-shot, 4-block conv net + BatchNorm, 4 tasks, 5 SGD steps",
            conv_net,
            fewshot_tasks(4, 5, 1, 15),
            nn.functional.cross_entropy,
            "sgd",
            0.4,
            5,
            tags={"W2"},
        ),
        *(
            Workload(
                f"W3-unroll{k}",
                f"long unroll, MLP 1-256-256-1, 1 task, {k} SGD steps",
                mlp(256),
                sinusoid_tasks(1, 10),
                mse,
                "sgd",
                0.001,
                k,
                tags={"W3"},
            )
            for k in (10, 50, 200)
        ),
        Workload(
            "W4-lstm",
            "MAML on an LSTM (8 -> 64, seq 20, batch 16), 4 tasks, 5 SGD steps",
            LSTMRegressor,
            sequence_tasks(4),
            mse,
            "sgd",
            0.01,
            5,
            tags={"W4"},
        ),
    ]
}


# -- implementations ---------------------------------------------------------------
class Impl:
    """One way of computing the meta-gradient of a workload."""

    name = ""

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        self.w = workload
        self.model = model

    def meta_backward(self, tasks: list[Task]) -> None:
        raise NotImplementedError

    def with_model(self, model: nn.Module) -> Impl:
        """The same implementation on another model (the float64 copy of the agreement check).

        Implementations whose constructor takes more than the workload and
        the model override this.
        """
        return type(self)(self.w, model)


class HigherImpl(Impl):
    name = "higher"

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        super().__init__(workload, model)
        opt_type = torch.optim.SGD if workload.inner_opt == "sgd" else torch.optim.Adam
        self.inner_opt = opt_type(model.parameters(), lr=workload.inner_lr)

    def meta_backward(self, tasks: list[Task]) -> None:
        w, n = self.w, len(tasks)
        for xs, ys, xq, yq in tasks:
            with higher.innerloop_ctx(
                self.model, self.inner_opt, copy_initial_weights=False, first_order=w.first_order
            ) as (fmodel, diffopt):
                for _ in range(w.inner_steps):
                    diffopt.step(w.loss_fn(fmodel(xs), ys))
                (w.loss_fn(fmodel(xq), yq) / n).backward()


class HandwrittenImpl(Impl):
    """What a careful user writes with torch.func by hand."""

    name = "handwritten"

    def meta_backward(self, tasks: list[Task]) -> None:
        w, n = self.w, len(tasks)
        names = [k for k, _ in self.model.named_parameters()]
        params = list(self.model.parameters())
        create_graph = not w.first_order
        for xs, ys, xq, yq in tasks:
            fast = params
            m: list[torch.Tensor] | None = None
            v: list[torch.Tensor] | None = None
            for t in range(1, w.inner_steps + 1):
                loss = w.loss_fn(functional_call(self.model, dict(zip(names, fast)), (xs,)), ys)
                grads = torch.autograd.grad(loss, fast, create_graph=create_graph)
                if w.inner_opt == "sgd":
                    fast = [p - w.inner_lr * g for p, g in zip(fast, grads)]
                    continue
                b1, b2, eps = 0.9, 0.999, 1e-8
                if m is None or v is None:
                    m = [g * (1 - b1) for g in grads]
                    v = [g * g * (1 - b2) for g in grads]
                else:
                    m = [m_ * b1 + g * (1 - b1) for m_, g in zip(m, grads)]
                    v = [v_ * b2 + g * g * (1 - b2) for v_, g in zip(v, grads)]
                step_size = w.inner_lr / (1 - b1**t)
                bc2 = math.sqrt(1 - b2**t)
                # Clamping keeps dead ReLU units (v == 0) from turning the meta-gradient NaN.
                fast = [
                    p - step_size * m_ / (v_.clamp_min(1e-38).sqrt() / bc2 + eps)
                    for p, m_, v_ in zip(fast, m, v)
                ]
            out = functional_call(self.model, dict(zip(names, fast)), (xq,))
            (w.loss_fn(out, yq) / n).backward()


class TorchOptImpl(Impl):
    """TorchOpt's functional API (only when torchopt is installed)."""

    name = "torchopt"

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        super().__init__(workload, model)
        import torchopt

        self.torchopt = torchopt
        if workload.inner_opt == "sgd":
            self.opt = torchopt.sgd(lr=workload.inner_lr)
        else:
            # eps_root > 0 is TorchOpt's own guard against NaN meta-gradients at
            # dead units (sqrt(0)); without it the comparison would be moot.
            self.opt = torchopt.adam(
                lr=workload.inner_lr, moment_requires_grad=True, eps_root=1e-16
            )

    def meta_backward(self, tasks: list[Task]) -> None:
        w, n, to = self.w, len(tasks), self.torchopt
        names = [k for k, _ in self.model.named_parameters()]
        params = tuple(self.model.parameters())
        for xs, ys, xq, yq in tasks:
            fast = params
            state = self.opt.init(fast)
            for _ in range(w.inner_steps):
                loss = w.loss_fn(functional_call(self.model, dict(zip(names, fast)), (xs,)), ys)
                grads = torch.autograd.grad(loss, fast, create_graph=not w.first_order)
                updates, state = self.opt.update(grads, state, inplace=False)
                fast = to.apply_updates(fast, updates, inplace=False)
            out = functional_call(self.model, dict(zip(names, fast)), (xq,))
            (w.loss_fn(out, yq) / n).backward()


def available_impls() -> list[type[Impl]]:
    impls: list[type[Impl]] = [HigherImpl, HandwrittenImpl]
    try:
        import torchopt  # noqa: F401
    except Exception:  # absent, or built for another torch: skip it
        pass
    else:
        impls.append(TorchOptImpl)
    return impls
