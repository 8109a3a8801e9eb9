"""Benchmark workloads and the implementations compared on them.

Every implementation computes the same meta-gradient: the query loss after an
unrolled inner loop, back-propagated to the initial weights, averaged over a
meta-batch of tasks. ``handwritten`` is the reference written directly with
``torch.func.functional_call`` and ``torch.autograd.grad``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    #: The model calls F.scaled_dot_product_attention: the hand-written
    #: implementations pick its math kernel, the only one with a double backward
    #: (higher picks it by itself).
    math_attention: bool = False


def attention_kernel(w: Workload) -> contextlib.AbstractContextManager[Any]:
    """The attention kernel a hand-written second-order unroll of ``w`` needs."""
    if not w.math_attention:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters an inner loop adapts: those that require grad (LoRA: the adapters)."""
    return [(k, p) for k, p in model.named_parameters() if p.requires_grad]


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


class Logits(nn.Module):
    """A Hugging Face language model's logits as a plain tensor, as the workloads' losses take."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits


def _cipher_example() -> Any:
    """``examples/maml_transformer.py``: W5 is its model on its tasks (run from the repository root)."""
    from examples import maml_transformer

    return maml_transformer


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm without its round trip through float32.

    In float32, where W5 is timed, the two compute the same thing op for op. In
    float64, where the meta-gradients are compared, the round trip rounds the
    implementations' one-ulp differences (one SGD step written ``p - lr * g``,
    the other ``p.add(g, alpha=-lr)``) to float32 ones, which five inner steps
    grow to a relative 2e-7: far above the 1e-9 the check asks for.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.variance_epsilon

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.eps))


def cipher_llama(lora: bool = False) -> Callable[[], nn.Module]:
    """The example's Llama (1.05M parameters); with ``lora``, frozen under LoRA adapters of rank 8."""

    def build() -> nn.Module:
        example = _cipher_example()
        model = example.make_model()
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if type(child).__name__ == "LlamaRMSNorm":
                    setattr(parent, name, RMSNorm(child))
        return Logits(example.add_lora(model, rank=8) if lora else model)

    return build


def cipher_tasks(meta_batch: int) -> Callable[[torch.device], list[Task]]:
    def make(device: torch.device) -> list[Task]:
        g = torch.Generator().manual_seed(0)
        stacked = _cipher_example().CipherTasks().sample(meta_batch, g)
        return [tuple(t[i].to(device) for t in stacked) for i in range(meta_batch)]  # type: ignore[misc]

    return make


def token_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position of every sequence."""
    return nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten())


def _w5() -> list[Workload]:
    """W5, the transformer workloads; only where transformers (and peft for LoRA) are installed."""
    if importlib.util.find_spec("transformers") is None:
        return []
    full = "MAML on a Llama transformer (1.05M parameters), shift ciphers, 8 tasks, {k} SGD steps"
    lora = (
        "W5-sgd{k}'s model frozen under LoRA adapters (rank 8, every projection); "
        "only the adapters are meta-learned"
    )
    variants = [("sgd", False, "W5", full)]
    if importlib.util.find_spec("peft") is not None:
        variants.append(("lora", True, "LORA", lora))
    return [
        Workload(
            f"W5-{kind}{k}",
            description.format(k=k),
            cipher_llama(with_lora),
            cipher_tasks(8),
            token_cross_entropy,
            "sgd",
            0.1,
            k,
            tags={tag},
            math_attention=True,
        )
        for kind, with_lora, tag, description in variants
        for k in (1, 5)
    ]


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
        *_w5(),
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
        self.inner_opt = opt_type([p for _, p in trainable(model)], lr=workload.inner_lr)

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
        with attention_kernel(self.w):
            self._meta_backward(tasks)

    def _meta_backward(self, tasks: list[Task]) -> None:
        w, n = self.w, len(tasks)
        names = [k for k, _ in trainable(self.model)]  # frozen weights stay the module's
        params = [p for _, p in trainable(self.model)]
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


class FloorImpl(Impl):
    """The floor: the same MLP as plain tensor code, with no module and no library.

    ``F.linear`` and ``relu`` on a list of weights, ``torch.autograd.grad`` with
    ``create_graph=True``, and an SGD step over the list, one fused kernel per
    weight (``torch.add(p, g, alpha=-lr)``, the fastest way plain code writes
    it). Only for MLP workloads (a ``Sequential`` of ``Linear`` and ``ReLU``)
    with SGD: :meth:`supports` says which.
    """

    name = "floor"

    @staticmethod
    def supports(workload: Workload, model: nn.Module) -> bool:
        layers = list(model) if isinstance(model, nn.Sequential) else []
        return (
            workload.inner_opt == "sgd"
            and bool(layers)
            and all(type(m) in (nn.Linear, nn.ReLU) for m in layers)
            and all(p.requires_grad for p in model.parameters())
        )

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        super().__init__(workload, model)
        if not self.supports(workload, model):
            raise ValueError(f"floor: {workload.name} is not an SGD MLP workload")
        # Per Linear layer: True; per ReLU: False. Biases are assumed present.
        self.layers = tuple(type(m) is nn.Linear for m in model)

    def forward(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        k = 0
        for linear in self.layers:
            if linear:
                x = torch.nn.functional.linear(x, weights[k], weights[k + 1])
                k += 2
            else:
                x = torch.relu(x)
        return x

    def meta_backward(self, tasks: list[Task]) -> None:
        w, n, lr = self.w, len(tasks), self.w.inner_lr
        params = list(self.model.parameters())
        create_graph = not w.first_order
        for xs, ys, xq, yq in tasks:
            fast = params
            for _ in range(w.inner_steps):
                loss = w.loss_fn(self.forward(xs, fast), ys)
                grads = torch.autograd.grad(loss, fast, create_graph=create_graph)
                fast = [torch.add(p, g, alpha=-lr) for p, g in zip(fast, grads)]
            (w.loss_fn(self.forward(xq, fast), yq) / n).backward()


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
        with attention_kernel(self.w):
            self._meta_backward(tasks)

    def _meta_backward(self, tasks: list[Task]) -> None:
        w, n, to = self.w, len(tasks), self.torchopt
        names = [k for k, _ in trainable(self.model)]
        params = tuple(p for _, p in trainable(self.model))
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


def _stack_tasks(tasks: list[Task]) -> Task:
    return tuple(torch.stack(parts) for parts in zip(*tasks))  # type: ignore[return-value]


class _StackedTasks:
    """Stacks a meta-batch once: a batched data loader would deliver it stacked."""

    def __init__(self) -> None:
        self._key: int | None = None
        self._stacked: Task | None = None

    def __call__(self, tasks: list[Task]) -> Task:
        if self._key != id(tasks) or self._stacked is None:
            self._key, self._stacked = id(tasks), _stack_tasks(tasks)
        return self._stacked


def per_task_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One loss per task, for outputs and targets with a leading task dimension."""
    if loss_fn is mse:
        return lambda out, y: ((out - y) ** 2).flatten(1).mean(1)
    if loss_fn is token_cross_entropy:

        def token_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            flat = nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none")
            return flat.view(y.shape).flatten(1).mean(1)

        return token_ce
    if loss_fn is nn.functional.cross_entropy:

        def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            flat = loss_fn(logits.flatten(0, 1), y.flatten(), reduction="none")  # type: ignore[call-arg]
            return flat.view(y.shape).mean(1)

        return cross_entropy
    return torch.func.vmap(loss_fn)


class BatchedImpl(HigherImpl):
    """higher's batched mode: ``innerloop_ctx(..., num_tasks=N)``, one loss per task."""

    name = "higher-batched"
    strategy = "auto"

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        super().__init__(workload, model)
        self.stacked = _StackedTasks()
        self.task_loss = per_task_loss(workload.loss_fn)

    def meta_backward(self, tasks: list[Task]) -> None:
        w, n = self.w, len(tasks)
        xs, ys, xq, yq = self.stacked(tasks)
        with higher.innerloop_ctx(
            self.model,
            self.inner_opt,
            copy_initial_weights=False,
            first_order=w.first_order,
            num_tasks=n,
        ) as (fmodel, diffopt):
            if self.strategy != "auto":
                fmodel.task_strategy = self.strategy
            for _ in range(w.inner_steps):
                diffopt.step(self.task_loss(fmodel(xs), ys))
            (self.task_loss(fmodel(xq), yq).sum() / n).backward()


class BatchedVmapImpl(BatchedImpl):
    """Batched mode forced to ``vmap`` (``auto`` loops over tasks for CPU convolutions)."""

    name = "higher-batched-vmap"
    strategy = "vmap"


class HandwrittenVmapImpl(Impl):
    """``torch.func.vmap(grad(...))`` over the meta-batch, as a careful user writes it.

    Buffers (BatchNorm running statistics) are given per task. PyTorch's batching
    of the BatchNorm backward is wrong, so this is not exact on W2.
    """

    name = "handwritten-vmap"

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        super().__init__(workload, model)
        self.stacked = _StackedTasks()

    def meta_backward(self, tasks: list[Task]) -> None:
        w, n = self.w, len(tasks)
        model = self.model
        params = dict(trainable(model))
        buffers = {k: b.unsqueeze(0).repeat(n, *[1] * b.dim()) for k, b in model.named_buffers()}
        b1, b2, eps, lr = 0.9, 0.999, 1e-8, w.inner_lr

        def task(
            buffers: dict[str, torch.Tensor],
            xs: torch.Tensor,
            ys: torch.Tensor,
            xq: torch.Tensor,
            yq: torch.Tensor,
        ) -> torch.Tensor:
            def inner_loss(fast: dict[str, torch.Tensor]) -> torch.Tensor:
                # grad() refuses in-place updates of running statistics from outside it.
                own = {k: b.clone() for k, b in buffers.items()}
                return w.loss_fn(functional_call(model, (fast, own), (xs,)), ys)

            fast = params
            m: dict[str, torch.Tensor] = {}
            v: dict[str, torch.Tensor] = {}
            for t in range(1, w.inner_steps + 1):
                grads = torch.func.grad(inner_loss)(fast)
                if w.first_order:
                    grads = {k: g.detach() for k, g in grads.items()}
                if w.inner_opt == "sgd":
                    fast = {k: p - lr * grads[k] for k, p in fast.items()}
                    continue
                m = {k: m[k] * b1 + g * (1 - b1) if m else g * (1 - b1) for k, g in grads.items()}
                v = {
                    k: v[k] * b2 + g * g * (1 - b2) if v else g * g * (1 - b2)
                    for k, g in grads.items()
                }
                step_size, bc2 = lr / (1 - b1**t), math.sqrt(1 - b2**t)
                fast = {
                    k: p - step_size * m[k] / (v[k].clamp_min(1e-38).sqrt() / bc2 + eps)
                    for k, p in fast.items()
                }
            return w.loss_fn(functional_call(model, (fast, buffers), (xq,)), yq)

        with attention_kernel(w):
            losses = torch.func.vmap(task, randomness="different")(buffers, *self.stacked(tasks))
            (losses.sum() / n).backward()


def batched_impls() -> list[type[Impl]]:
    """The rows of ``python -m benchmarks --batched``."""
    return [BatchedImpl, BatchedVmapImpl, HandwrittenVmapImpl]


def available_impls() -> list[type[Impl]]:
    impls: list[type[Impl]] = [HigherImpl, HandwrittenImpl]
    try:
        import torchopt  # noqa: F401
    except Exception:  # absent, or built for another torch: skip it
        pass
    else:
        impls.append(TorchOptImpl)
    return impls
