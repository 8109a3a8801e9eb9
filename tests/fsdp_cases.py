"""Meta-learning a ``fully_shard``'ed model: the per-rank side of test_fsdp.py.

Run as ``python fsdp_cases.py RANK WORLD_SIZE RENDEZVOUS_FILE OUT_DIR``; each rank
runs every case below on the model sharded over all ranks (gloo, CPU), and
saves the full meta-gradients (``grad.full_tensor()``), its collectives and the
gathered memory it saw to ``OUT_DIR/rank{RANK}.pt``. The parent test computes
the one-process unsharded references with :func:`reference` and compares.

Every rank runs the same task on its own slice of the data (rank ``r`` takes
``batch(r)``), and the losses are the mean over ranks, as FSDP2 averages
gradients: the one-process reference runs the same forwards on every slice and
averages the losses.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

INNER_STEPS = 2
INNER_LR = 0.1


# -- models ------------------------------------------------------------------------------
class MLP(nn.Module):
    """Uneven dim-0 sizes (5 and 3 rows): on 4 ranks some shards hold one row, some none."""

    def __init__(self, widths: tuple[int, ...] = (3, 5, 3, 1)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x

    def units(self) -> list[nn.Module]:
        return list(self.layers[:-1])  # the last layer stays with the root unit


class LinearExtra(nn.Linear):
    """A linear layer with a parameter (``extra``) that its forward uses only when
    ``use_extra`` is set."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(a, b)
        self.extra = nn.Parameter(torch.randn(5, 2))
        self.use_extra = True

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out + torch.tanh(self.extra).sum() if self.use_extra else out


class MLPUnused(MLP):
    """An MLP whose first unit holds a parameter that the inner losses do not use (its
    inner gradients are None) and the outer loss does."""

    def __init__(self) -> None:
        super().__init__()
        self.layers[0] = LinearExtra(3, 5)


class MLPCheckpointed(MLP):
    """An MLP whose own forward calls ``torch.utils.checkpoint``: on whole layers (the
    unit's hooks run inside the checkpointed block) and, for the root unit's last layer,
    on a function of its weights (the root's gather is outside the block)."""

    def forward(self, x: Tensor) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        for layer in self.layers[:-1]:
            x = torch.tanh(checkpoint(layer, x, use_reentrant=False))
        last = self.layers[-1]
        return checkpoint(
            lambda h: F.linear(torch.sin(h), last.weight, last.bias) * h.sum(),
            x,
            use_reentrant=False,
        )


class TwoHeads(MLP):
    """An MLP body and two output heads of the same shape, each its own unit: a loss
    may use one head's output and not the other's."""

    def __init__(self) -> None:
        super().__init__((3, 5, 3))
        self.heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(2))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        h = torch.tanh(super().forward(x))
        return self.heads[0](h), self.heads[1](h)

    def units(self) -> list[nn.Module]:
        return [*self.layers[:-1], *self.heads]


def with_activation_checkpointing(model: nn.Module, how: str | None) -> nn.Module:
    """``how``: transformers' ``gc`` / ``gc-reentrant``, or torch's ``wrapper``
    (``apply_activation_checkpointing`` around each layer, before ``fully_shard``)."""
    if how in ("gc", "gc-reentrant"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias is the point
            model.gradient_checkpointing_enable(  # type: ignore[operator]
                gradient_checkpointing_kwargs={"use_reentrant": how == "gc-reentrant"}
            )
        model.train()
    elif how == "wrapper":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing,
        )

        if hasattr(model, "config"):
            model.config.use_cache = False  # a recomputed layer would extend the cache again
        layers = {id(m) for m in units_of(model)}
        apply_activation_checkpointing(model, check_fn=lambda m: id(m) in layers)
    return model


def llama(attn: str) -> nn.Module:
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        attn_implementation=attn,
    )
    return tf.LlamaForCausalLM(config)


def lora_llama() -> nn.Module:
    import peft

    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0
    )
    config.init_lora_weights = False  # B random: every adapter gets a gradient
    return peft.get_peft_model(llama("eager"), config)


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        model: nn.Module = MLP()
    elif kind == "mlp-unused":
        model = MLPUnused()
    elif kind == "mlp-ckpt":
        model = MLPCheckpointed()
    elif kind == "heads":
        model = TwoHeads()
    elif kind == "deep":
        model = MLP((8, 16, 16, 16, 16, 16, 1))
    elif kind == "lora":
        model = lora_llama()
    else:
        model = llama(kind.removeprefix("llama-"))
    return model.double()


def units_of(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, MLP):
        return model.units()
    return [
        m
        for name, m in model.named_modules()
        if name.endswith(tuple(f"layers.{i}" for i in range(8)))
    ]


def shard(
    model: nn.Module,
    mesh: Any,
    root: dict[str, Any] | None = None,
    root_only: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Each layer, then the root (with ``root`` instead of ``kwargs`` if given);
    ``root_only``: the whole model as one unit."""
    from torch.distributed.fsdp import fully_shard

    for unit in [] if root_only else units_of(model):
        fully_shard(unit, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **(kwargs if root is None else root))
    return model


# -- data and losses ---------------------------------------------------------------------
def batch(kind: str, r: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + r)
    if kind in ("mlp", "mlp-unused", "mlp-ckpt", "deep", "heads"):
        width = 8 if kind == "deep" else 3
        x = torch.randn(6, width, generator=g, dtype=torch.float64)
        return x, torch.sin(x.sum(1, keepdim=True))
    tokens = torch.randint(0, 64, (2, 8), generator=g)
    return tokens, (tokens + 3) % 64


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    if isinstance(out, Tensor):
        return ((out - y) ** 2).mean()
    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def inner_opt(model: nn.Module, name: str) -> torch.optim.Optimizer:
    params = trainable(model)
    if name == "adam":
        return torch.optim.Adam(params, lr=0.01)
    return torch.optim.SGD(params, lr=INNER_LR)


# -- one MAML task -----------------------------------------------------------------------
def maml(
    model: nn.Module,
    kind: str,
    loss: Callable[[nn.Module, int], Tensor],
    opt: str = "sgd",
    steps: int = INNER_STEPS,
    lrs: list[Tensor] | None = None,
    write_back: nn.Module | None = None,
    on_patch: Callable[[nn.Module], None] | None = None,
    before_patch: Callable[[], None] | None = None,
    **kwargs: Any,
) -> None:
    """Inner steps on ``loss(fmodel, 0)`` and the outer backward of ``loss(fmodel, 1)``;
    ``before_patch`` runs once the inner optimizer is made."""
    import higher

    override = None if lrs is None else {"lr": [higher.optim.PerParameter(lrs)]}
    optimizer = inner_opt(model, opt)
    if before_patch is not None:
        before_patch()
    with higher.innerloop_ctx(
        model, optimizer, copy_initial_weights=False, override=override, **kwargs
    ) as (fmodel, diffopt):
        if on_patch is not None:
            on_patch(fmodel)
        for _ in range(steps):
            if kwargs.get("checkpoint"):
                diffopt.step(lambda: loss(fmodel, 0))
            else:
                diffopt.step(loss(fmodel, 0))
        loss(fmodel, 1).backward()
        if write_back is not None:
            fmodel.write_back(write_back)


def full_grads(tensors: list[Tensor]) -> list[Tensor | None]:
    out = []
    for p in tensors:
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out.append(None if g is None else g.detach().clone())
    return out


def full_params(model: nn.Module) -> list[Tensor]:
    return [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for p in model.parameters()
    ]


CASES: dict[str, dict[str, Any]] = {
    "mlp-sgd": {"kind": "mlp"},
    "mlp-adam": {"kind": "mlp", "opt": "adam"},
    "mlp-first-order": {"kind": "mlp", "first_order": True},
    "mlp-checkpoint": {"kind": "mlp", "checkpoint": True},
    "mlp-checkpoint-adam": {"kind": "mlp", "opt": "adam", "checkpoint": 2, "steps": 3},
    "mlp-meta-sgd": {"kind": "mlp", "lrs": "plain"},
    "mlp-meta-sgd-dtensor": {"kind": "mlp", "lrs": "dtensor"},
    "mlp-unused-adam": {"kind": "mlp-unused", "opt": "adam"},
    "llama-eager": {"kind": "llama-eager", "steps": 1},
    "llama-sdpa": {"kind": "llama-sdpa", "steps": 1},
    "lora": {"kind": "lora", "steps": 1},
    "lora-adam-checkpoint": {"kind": "lora", "steps": 2, "opt": "adam", "checkpoint": True},
    # Activation checkpointing inside the sharded model, alone and with higher's own.
    "mlp-ac-wrapper": {"kind": "mlp", "ac": "wrapper"},
    "mlp-ac-wrapper-checkpoint": {
        "kind": "mlp",
        "ac": "wrapper",
        "opt": "adam",
        "checkpoint": 2,
        "steps": 3,
    },
    "mlp-ac-custom": {"kind": "mlp-ckpt"},
    "mlp-ac-custom-checkpoint": {"kind": "mlp-ckpt", "opt": "adam", "checkpoint": True},
    "llama-ac-gc": {"kind": "llama-eager", "ac": "gc", "steps": 1},
    "llama-ac-gc-reentrant-checkpoint": {
        "kind": "llama-sdpa",
        "ac": "gc-reentrant",
        "opt": "adam",
        "checkpoint": True,
    },
    "llama-ac-wrapper-checkpoint": {"kind": "llama-eager", "ac": "wrapper", "checkpoint": 2},
    # MixedPrecisionPolicy: float32 shards, bfloat16 compute, float32 reduction.
    "mlp-bf16": {"kind": "deep", "mp": "bf16"},
    "mlp-bf16-out-adam": {"kind": "deep", "mp": "bf16-out", "opt": "adam"},
    "llama-bf16-ac": {"kind": "llama-eager", "mp": "bf16", "ac": "gc", "steps": 1},
    # HSDP: a (replicas, shards) mesh, (2, 2) on 4 ranks and (2, 1) on 2.
    "mlp-hsdp": {"kind": "mlp", "mesh": "hsdp"},
    "mlp-hsdp-adam-checkpoint-ac": {
        "kind": "mlp",
        "mesh": "hsdp",
        "opt": "adam",
        "checkpoint": True,
        "ac": "wrapper",
        "lrs": "plain",
    },
    "mlp-hsdp-bf16": {"kind": "deep", "mesh": "hsdp", "mp": "bf16", "opt": "adam"},
    "llama-hsdp": {"kind": "llama-sdpa", "mesh": "hsdp", "steps": 1},
    # higher.attention's block-wise kernel forced on the ranks (several row blocks per
    # call); the one-process reference keeps torch's math kernel.
    "llama-sdpa-blockwise": {"kind": "llama-sdpa", "attention": "blockwise", "steps": 1},
    # reshard_after_forward as an int (2 on 4 ranks) or False (2 ranks).
    "mlp-reshard-int": {"kind": "mlp", "reshard": True},
    # An ordinary forward of the sharded model (and of the write_back target) before it
    # is patched: FSDP2 leaves the root unit gathered (and, with reshard_after_forward
    # an int, the layers sharded over a smaller mesh).
    "mlp-root-only-eval": {"kind": "mlp", "root_only": True, "eval": "no_grad"},
    "mlp-eval-grad": {"kind": "mlp", "eval": "grad", "opt": "adam"},
    "mlp-reshard-int-eval": {"kind": "mlp", "reshard": True, "eval": "no_grad"},
    # Rank r's losses are head r % 2's, as the same expression on every rank: each
    # head's loss weighted by 1 or 0 (what the error of mismatched_units asks for).
    "heads-weighted": {"kind": "heads", "heads": "weighted"},
}


def learned_lrs(model: nn.Module, seed: int = 7) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        (INNER_LR * (0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))).requires_grad_()
        for p in trainable(model)
    ]


# -- mixed precision -----------------------------------------------------------------------
BF16 = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32}
#: Mixed precision of the layers' units, and of the root's ("-out": float32 outputs).
POLICIES = {"bf16": (BF16, BF16), "bf16-out": (BF16, {**BF16, "output_dtype": torch.float32})}


def policy(mp: str | None) -> dict[str, Any]:
    """``shard``'s keywords for mixed precision ``mp`` (none for None)."""
    if mp is None:
        return {}
    from torch.distributed.fsdp import MixedPrecisionPolicy

    layers, root = POLICIES[mp]
    return {
        "mp_policy": MixedPrecisionPolicy(**layers),  # type: ignore[arg-type]
        "root": {"mp_policy": MixedPrecisionPolicy(**root)},  # type: ignore[arg-type]
    }


def cast_like_fsdp2(fmodel: nn.Module, mp: str) -> None:
    """The one-process reference of a MixedPrecisionPolicy, written independently of
    higher.fsdp: hooks on the (unsharded) patched model's units that, while a unit
    runs, put its fast weights cast to ``param_dtype`` in its slots (their gradients
    arrive in float32 through the cast's backward, and the ranks' sum is float32
    autograd accumulation), cast its floating inputs to ``param_dtype`` and its output
    to ``output_dtype``."""
    layers, root = POLICIES[mp]
    units = units_of(fmodel)
    inner = {id(m) for u in units for m in u.modules()}
    owned = {id(u): [m for m in u.modules()] for u in units}
    owned[id(fmodel)] = [m for m in fmodel.modules() if id(m) not in inner]

    def cast(x: Any, dtype: torch.dtype) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point():
            return x.to(dtype)
        if isinstance(x, tuple):
            return tuple(cast(v, dtype) for v in x)
        return x

    def pre(module: nn.Module, args: Any, kwargs: Any) -> Any:
        param_dtype = (root if module is fmodel else layers)["param_dtype"]
        saved = []
        for m in owned[id(module)]:
            for name, w in list(m._parameters.items()):
                if w is not None:
                    saved.append((m, name, w))
                    m._parameters[name] = w.to(param_dtype)
        module.__dict__.setdefault("_ref_saved", []).append(saved)
        return cast(args, param_dtype), {k: cast(v, param_dtype) for k, v in kwargs.items()}

    def post(module: nn.Module, args: Any, output: Any) -> Any:
        for m, name, w in module.__dict__["_ref_saved"].pop():
            m._parameters[name] = w
        output_dtype = (root if module is fmodel else layers).get("output_dtype")
        return output if output_dtype is None else cast(output, output_dtype)

    for unit in [*units, fmodel]:
        unit.register_forward_pre_hook(pre, with_kwargs=True)
        unit.register_forward_hook(post, always_call=True)


def run_case(
    name: str, world: int, rank: int | None, mesh: Any = None, truth: bool = False
) -> dict[str, Any]:
    """A case on this rank (``rank`` given) or its one-process reference (``rank`` None);
    ``truth``: the reference without the case's mixed precision, in float64."""
    spec = dict(CASES[name])
    kind = spec.pop("kind")
    attention = spec.pop("attention", None)
    attention = attention if rank is not None else None  # the reference: torch's math kernel
    lrs_kind = spec.pop("lrs", None)
    ac = spec.pop("ac", None)
    mp = None if truth else spec.pop("mp", None)
    spec.pop("mp", None)
    if spec.pop("mesh", None) == "hsdp" and rank is not None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    options = policy(mp)
    if spec.pop("reshard", False):
        options["reshard_after_forward"] = 2 if world == 4 else False
    if spec.pop("root_only", False):
        options["root_only"] = True
    evaluation = spec.pop("eval", None)
    heads = spec.pop("heads", None)
    dtype = torch.float64 if mp is None else torch.float32
    model = with_activation_checkpointing(build(kind).to(dtype), ac)
    lrs = learned_lrs(model) if lrs_kind else None
    if rank is not None:
        shard(model, mesh, **options)
        if lrs is not None and lrs_kind == "dtensor":
            from torch.distributed.tensor import Shard, distribute_tensor

            lrs = [distribute_tensor(lr.detach(), mesh, [Shard(0)]).requires_grad_() for lr in lrs]
    data = {
        r: [
            tuple(t.to(dtype) if t.is_floating_point() else t for t in batch(kind, 2 * r + s))
            for s in range(2)
        ]
        for r in range(world)
    }

    def loss_on(fmodel: nn.Module, r: int, s: int) -> Tensor:
        if heads is None:
            return loss_of(fmodel, *data[r][s])
        x, y = data[r][s]
        outs = fmodel(x)
        weights = [float(i == r % 2) for i in range(2)]
        return sum(w * ((out - y) ** 2).mean() for w, out in zip(weights, outs))  # type: ignore[return-value]

    def loss(fmodel: nn.Module, s: int) -> Tensor:
        if isinstance(fmodel, MLPUnused):
            fmodel.layers[0].use_extra = s == 1  # unused by the inner steps only
        if rank is not None:
            return loss_on(fmodel, rank, s)
        return sum(loss_on(fmodel, r, s) for r in range(world)) / world  # type: ignore[return-value]

    target = with_activation_checkpointing(build(kind).to(dtype), ac)
    before_patch = None
    if rank is not None:
        shard(target, mesh, **options)
        if evaluation is not None:
            ordinary_forward(target, data[rank][0][0], evaluation)

            def before_patch() -> None:  # the inner optimizer holds the sharded parameters
                ordinary_forward(model, data[rank][0][0], evaluation)

    on_patch = None if rank is not None or mp is None else (lambda f: cast_like_fsdp2(f, mp))
    with forced_attention(attention) as calls:
        maml(
            model,
            kind,
            loss,
            lrs=lrs,
            write_back=target,
            on_patch=on_patch,
            before_patch=before_patch,
            **spec,
        )
    return {
        "attention_calls": calls[0],
        "grads": full_grads(trainable(model)),
        "lr_grads": full_grads(lrs) if lrs is not None else None,
        "written": full_params(target),
    }


def ordinary_forward(model: nn.Module, x: Tensor, how: str) -> None:
    """A forward of the sharded model itself, as an evaluation pass before meta-training
    (``how``: under ``no_grad``, or building a graph that is never backpropagated)."""
    with torch.no_grad() if how == "no_grad" else contextlib.nullcontext():
        out = model(x)
    assert isinstance(out, (Tensor, tuple))


@contextlib.contextmanager
def forced_attention(kernel: str | None) -> Iterator[list[int]]:
    """``higher.attention``'s ``kernel`` forced (``None``: left alone), with blocks of
    3 rows; yields ``[calls]``, the calls that reached the block-wise kernel."""
    import higher
    from higher._compat import blockwise_attention as bw

    calls = [0]
    if kernel is None:
        yield calls
        return
    saved = bw.attention, bw.BLOCK_ELEMENTS.copy(), bw.MIN_BLOCK_ROWS
    kernel_fn = bw.attention

    def counting(*args: Any, **kwargs: Any) -> Tensor:
        calls[0] += 1
        return kernel_fn(*args, **kwargs)

    bw.attention, bw.MIN_BLOCK_ROWS = counting, 1
    bw.BLOCK_ELEMENTS["cpu"] = 3 * 8 * 8  # 3 of 8 rows per block (2 sequences, 4 heads)
    try:
        with higher.attention.attention_kernel(kernel):
            yield calls
    finally:
        bw.attention, bw.BLOCK_ELEMENTS, bw.MIN_BLOCK_ROWS = saved


class CollectiveLog(TorchDispatchMode):
    """The all-gathers and reduce-scatters this process issues: operator and tensor shapes.

    (Setting up a case scatters DTensors from rank 0, which the others see
    with other arguments: those are not recorded.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[tuple[str, tuple[tuple[int, ...], ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.namespace == "c10d" and "scatter_." not in str(func):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            shapes = tuple(tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor))
            self.entries.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


def memory(mesh: Any, ac: str | None = None) -> dict[str, Any]:
    """The most gathered bytes alive at once, in the inner steps and in the outer backward.

    Every gather (a unit's forward, a saved weight unpacked by a backward, or a
    recomputation of an activation-checkpointed layer, with ``ac``) records the
    gathered bytes alive just after it.
    """
    import gc

    import higher
    from higher import fsdp

    # The earlier cases' models are cyclic garbage (FSDP2's state is), which may still
    # hold a gathered tensor: a Meta-SGD learning rate's gradient.
    gc.collect()
    model = shard(with_activation_checkpointing(build("deep"), ac), mesh)
    phase: dict[str, Any] = {"name": "", "peak": {}, "gathers": {}}
    gather = fsdp._Group.gather

    def recording(self: Any, shards: list[Tensor]) -> Tensor:
        out = gather(self, shards)
        peak, name = phase["peak"], phase["name"]
        phase["gathers"][name] = phase["gathers"].get(name, 0) + 1
        live = fsdp._live_gathered_bytes() + out.untyped_storage().nbytes()
        peak[phase["name"]] = max(peak.get(phase["name"], 0), live)  # type: ignore[attr-defined]
        return out

    x, y = batch("deep", 0)
    fsdp._Group.gather = recording  # type: ignore[method-assign]
    try:
        opt = inner_opt(model, "sgd")
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                phase["name"] = "inner"
                diffopt.step(loss_of(fmodel, x, y))
            loss = loss_of(fmodel, x, y)
            phase["name"] = "outer"
            loss.backward()
            del loss
    finally:
        fsdp._Group.gather = gather  # type: ignore[method-assign]

    # What each unit's gathered buffers take (padded to whole chunks), the root's last.
    def gathered_bytes(params: list[Tensor]) -> int:
        total = 0
        for p in params:
            chunk = -(-p.shape[0] // world)
            total += chunk * world * (p.numel() // p.shape[0]) * p.element_size()
        return total

    world = mesh.size()
    layers = [list(unit.parameters()) for unit in units_of(model)]
    in_layers = {id(p) for ps in layers for p in ps}
    root = [p for p in model.parameters() if id(p) not in in_layers]
    return {
        "peak": phase["peak"],
        "gathers": phase["gathers"],
        "unit_bytes": [gathered_bytes(ps) for ps in layers],
        "root_bytes": gathered_bytes(root),
        "left": fsdp._live_gathered_bytes(),
    }


def per_unit(mesh: Any, ac: str | None = None) -> dict[str, Any]:
    """The collectives of one forward and of one backward of a patched model, by operator
    (with ``ac``, of the model with each layer activation-checkpointed)."""
    import higher

    model = shard(with_activation_checkpointing(build("deep"), ac), mesh)
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    x, y = batch("deep", 0)
    with CollectiveLog() as forward:
        loss = loss_of(fmodel, x, y)
    with CollectiveLog() as backward:
        loss.backward()

    def count(log: CollectiveLog) -> dict[str, int]:
        out: dict[str, int] = {}
        for op, _ in log.entries:
            out[op] = out.get(op, 0) + 1
        return out

    return {
        "units": len(units_of(model)) + 1,
        "forward": count(forward),
        "backward": count(backward),
    }


def errors(mesh: Any, world: int) -> dict[str, str]:
    """Configurations refused at patching time that need several ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import higher

    out = {}
    if world == 4:
        mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        model = build("deep")
        parallelize_module(model.layers[1], mesh2d["tp"], ColwiseParallel())
        shard(model, mesh2d["dp"])
        out["tensor_parallel"] = _error(
            lambda: higher.monkeypatch(model, copy_initial_weights=False)
        )
    return out


def mismatched_units(mesh: Any, world: int) -> dict[str, str]:
    """Ranks whose losses use different units (rank r: head r % 2 only), in the inner
    steps or in the outer loss only, or (``fewer``) odd ranks' outer losses one head
    and even ranks' both: what each raises (the ranks still agree after it: later runs
    go on with the same group)."""
    return {
        where: _error(functools.partial(_one_head_task, mesh, where), RuntimeError)
        for where in ("inner", "outer", "fewer")
    }


def _one_head_task(mesh: Any, where: str) -> None:
    """A MAML task on ``TwoHeads`` whose ``where`` losses use this rank's head only."""
    import higher

    model = shard(build("heads"), mesh)
    rank = mesh.get_local_rank()
    x, y = batch("heads", 2 * rank)

    def loss(fmodel: nn.Module, mine: bool) -> Tensor:
        outs = fmodel(x)
        if mine and (where != "fewer" or rank % 2):
            return ((outs[rank % 2] - y) ** 2).mean()
        return ((outs[0] + outs[1] - y) ** 2).mean()

    opt = inner_opt(model, "sgd")
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(loss(fmodel, where == "inner"))
        loss(fmodel, True).backward()


def fsdp2_parity(mesh: Any, world: int) -> dict[str, dict[str, Any]]:
    """FSDP2's own gradients, and higher's outer gradients with no inner step, of the
    same float32 model sharded with the same MixedPrecisionPolicy, every rank on the
    same batch: ``bf16`` and ``fp16`` set only ``param_dtype`` (FSDP2 then reduces in
    it), ``fp16-reduce`` computes in float32 and reduces in float16 a loss scaled so
    that the ranks' summed gradient would overflow float16 (FSDP2 divides before and
    after the sum)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import higher

    x, y = batch("deep", 0)
    x, y = x.float(), y.float()
    plain = build("deep").float()
    loss_of(plain, x, y).backward()
    largest = max(p.grad.abs().max().item() for p in plain.parameters())  # type: ignore[union-attr]
    # FSDP2 divides by 2 before a float16 sum over 2 or 4 ranks: the largest gradient,
    # summed over the ranks, is then 0.7 of float16's largest value; summed undivided,
    # 1.4 times it.
    overflow = 0.7 * torch.finfo(torch.float16).max * 2 / world / largest
    policies = {
        "bf16": (MixedPrecisionPolicy(param_dtype=torch.bfloat16), 1.0),
        "fp16": (MixedPrecisionPolicy(param_dtype=torch.float16), 1.0),
        "fp16-reduce": (
            MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float16),
            overflow,
        ),
    }
    out = {}
    for name, (mp, scale) in policies.items():
        fsdp2 = shard(build("deep").float(), mesh, mp_policy=mp)
        (loss_of(fsdp2, x, y) * scale).backward()
        model = shard(build("deep").float(), mesh, mp_policy=mp)
        opt = inner_opt(model, "sgd")
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, _):
            (loss_of(fmodel, x, y) * scale).backward()
        out[name] = {
            "fsdp2": full_grads(list(fsdp2.parameters())),
            "higher": full_grads(list(model.parameters())),
        }
    return out


def _error(fn: Callable[[], Any], kind: Any = (TypeError, ValueError)) -> str:
    try:
        fn()
    except kind as e:
        return str(e)
    return ""


def run(rank: int, world: int, only: list[str] | None = None) -> dict[str, Any]:
    """Every case (or those named in ``only``, alone, for debugging), and the checks."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401

        names = list(CASES)
    except ImportError:
        names = [
            n
            for n, c in CASES.items()
            if c["kind"] in ("mlp", "mlp-unused", "mlp-ckpt", "deep", "heads")
        ]
    if only:
        names = only
    times = {}
    with CollectiveLog() as log:
        for name in names:
            start = time.perf_counter()
            out[name] = run_case(name, world, rank, mesh)
            times[name] = time.perf_counter() - start
    out["times"] = times
    out["collectives"] = log.entries
    if only:
        return out
    out["memory"] = memory(mesh)
    out["memory_ac"] = memory(mesh, "wrapper")
    out["per_unit"] = per_unit(mesh)
    out["per_unit_ac"] = per_unit(mesh, "wrapper")
    out["errors"] = errors(mesh, world)
    out["parity"] = fsdp2_parity(mesh, world)
    out["mismatched_units"] = mismatched_units(mesh, world)
    return out


def main(argv: list[str]) -> None:
    from launch_ranks import run_rank

    run_rank(argv, lambda rank, world, out_dir: run(rank, world, argv[4:]))


if __name__ == "__main__":
    main(sys.argv[1:])
