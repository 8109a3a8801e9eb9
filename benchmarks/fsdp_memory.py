"""Per-rank memory of one outer step with sharded fast weights (FSDP2) against DDP.

One MAML outer step (``--steps`` inner Adam steps, then the outer backward) on
a deep MLP of wide layers in float32 with a small batch, so that weights and
optimizer state dominate, run as:

* ``single``: one process, the plain model;
* ``ddp``: the model wrapped in ``DistributedDataParallel`` on 1, 2 and 4
  ranks (every rank holds whole fast weights);
* ``fsdp``: the model sharded with ``fully_shard`` (each layer and the root)
  on 1, 2 and 4 ranks (every rank holds its shards).

Reported per rank: the bytes of the fast weights and the inner optimizer's
state held at the end of the inner loop (one set: the history keeps one per
step), the peak of tensor storage allocated during the step and alive at once,
and the median wall time of a step. The peak is tracked at the dispatcher: a
``TorchDispatchMode`` notes every storage an operation creates and drops it
when Python frees it; it counts every tensor autograd saves or makes, is exact
and repeatable, and excludes the model's own parameters and the data. (RSS on
CPU moves with the allocator's caching and the other processes of a shared
machine, and the dispatch mode slows the step, so time is measured without it.)

With ``--model llama`` the model is a Llama from transformers (``--width`` the
hidden size, ``--depth`` the decoder layers, ``--seq`` tokens per text) sharded
per decoder layer and root, and the rows are FSDP2's training recipe on 1, 2
and 4 ranks: ``fsdp`` (float32), ``fsdp+ac`` (transformers'
``gradient_checkpointing_enable()``), ``fsdp+bf16``
(``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``) and
``fsdp+ac+bf16``; then ``train`` and ``train+ac``: one plain FSDP2 training step
(forward, backward; no higher) of the same model, to compare the peak that
activation checkpointing saves there with what it saves under higher.

    python -m benchmarks.fsdp_memory [--width 512] [--depth 8] [--steps 3] [--repeats 5]
    python -m benchmarks.fsdp_memory --model llama [--width 256] [--depth 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 2**20


class StoragePeak(TorchDispatchMode):
    """The most bytes of storage created under this mode and alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0
        self._refs: list[Any] = []

    def _note(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
        except (
            RuntimeError,
            NotImplementedError,
        ):  # no valid storage (a DTensor's wrapper)
            return
        if ptr == 0 or ptr in self.live:
            return
        size = storage.nbytes()
        self.live[ptr] = size
        self.now += size
        self.peak = max(self.peak, self.now)
        self._refs.append(weakref.ref(storage, lambda _, p=ptr: self._free(p)))

    def _free(self, ptr: int) -> None:
        size = self.live.pop(ptr, 0)
        self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_sparse:
                self._note(t)
        return out


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def make_llama(width: int, depth: int, seq: int) -> nn.Module:
    """A Llama causal LM of ``depth`` decoder layers of hidden size ``width``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=depth,
        num_attention_heads=max(1, width // 64),
        num_key_value_heads=max(1, width // 64),
        max_position_embeddings=seq,
        attn_implementation="sdpa",
        use_cache=False,
    )
    return LlamaForCausalLM(config)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, torch.Tensor):
        return F.mse_loss(out, y)
    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def train_step(model: nn.Module, data: tuple[torch.Tensor, ...], steps: int) -> int:
    """One plain training step (no higher): forward and backward on the support data."""
    xs, ys, _, _ = data
    model.zero_grad(set_to_none=True)
    loss_of(model, xs, ys).backward()
    return 0


def outer_step(model: nn.Module, data: tuple[torch.Tensor, ...], steps: int, **options: Any) -> int:
    """One MAML outer step; returns the bytes of fast weights and state after the inner loop.

    ``options`` go to ``innerloop_ctx`` (``checkpoint=``: the steps are closures).
    """
    import higher

    xs, ys, xq, yq = data
    model.zero_grad(set_to_none=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, **options) as (
        fmodel,
        diffopt,
    ):
        for _ in range(steps):
            if options.get("checkpoint"):
                diffopt.step(lambda: loss_of(fmodel, xs, ys))
            else:
                diffopt.step(loss_of(fmodel, xs, ys))
        held = _held(fmodel, diffopt)
        loss_of(fmodel, xq, yq).backward()
    return held


def tasks_step(
    model: nn.Module,
    data: tuple[torch.Tensor, ...],
    steps: int,
    tasks: int,
    batched: bool,
) -> int:
    """One MAML outer step over ``tasks`` tasks (the same data each), as a loop of per-task
    inner loops or as one batched inner loop (``num_tasks``); returns the fast weights and
    state held at the end of the (last) inner loop."""
    import higher

    model.zero_grad(set_to_none=True)
    if not batched:
        return outer_step_accumulate(model, data, steps, tasks)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stack = [t.expand(tasks, *t.shape) for t in data]
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, num_tasks=tasks) as (
        fmodel,
        diffopt,
    ):
        for _ in range(steps):
            diffopt.step(((fmodel(stack[0]) - stack[1]) ** 2).flatten(1).mean(1))
        held = _held(fmodel, diffopt)
        (((fmodel(stack[2]) - stack[3]) ** 2).flatten(1).mean(1).sum() / tasks).backward()
    return held


def _held(fmodel: Any, diffopt: Any) -> int:
    held = sum(p.numel() * p.element_size() for p in fmodel.fast_params)
    for state in diffopt.state:
        for v in state.values():
            if isinstance(v, torch.Tensor):
                held += v.numel() * v.element_size()
    return held


def outer_step_accumulate(
    model: nn.Module, data: tuple[torch.Tensor, ...], steps: int, tasks: int
) -> int:
    """The per-task loop of :func:`tasks_step`: each task's backward frees its graph."""
    import higher

    xs, ys, xq, yq = data
    held = 0
    for _ in range(tasks):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (
            fmodel,
            diffopt,
        ):
            for _ in range(steps):
                diffopt.step(loss_of(fmodel, xs, ys))
            held = max(held, _held(fmodel, diffopt))
            (loss_of(fmodel, xq, yq) / tasks).backward()
    return held


def worker(rank: int, world: int, rendezvous: str, out: str, mode: str, args: Any) -> None:
    torch.set_num_threads(1)
    llama = args.model == "llama"
    model = (
        make_llama(args.width, args.depth, args.seq)
        if llama
        else make_model(args.width, args.depth)
    )
    options = set(mode.split("+")[1:])
    if "ac" in options:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias
            model.gradient_checkpointing_enable(  # type: ignore[operator]
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.train()
    if mode != "single" and not mode.startswith("tasks"):
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world
        )
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh("cpu", (world,))
            kwargs: dict[str, Any] = {"mesh": mesh}
            if "bf16" in options:
                kwargs["mp_policy"] = MixedPrecisionPolicy(
                    param_dtype=torch.bfloat16, reduce_dtype=torch.float32
                )
            units = (
                [
                    m
                    for n, m in model.named_modules()
                    if n.startswith("model.layers.") and n.count(".") == 2
                ]
                if llama
                else [m for m in model if isinstance(m, nn.Linear)]
            )
            for unit in units:
                fully_shard(unit, **kwargs)
            fully_shard(model, **kwargs)
    g = torch.Generator().manual_seed(rank)
    if llama:
        tokens = [torch.randint(0, 512, (args.batch, args.seq), generator=g) for _ in range(2)]
        data = (tokens[0], (tokens[0] + 1) % 512, tokens[1], (tokens[1] + 1) % 512)
    else:
        data = tuple(torch.randn(args.batch, args.width, generator=g) for _ in range(4))
    step = train_step if mode.startswith("train") else outer_step
    if "ckpt" in options or "fo" in options:  # higher's checkpoint=True, or first_order=True
        inner = {"checkpoint": "ckpt" in options, "first_order": "fo" in options}

        def step(model: nn.Module, data: tuple[torch.Tensor, ...], steps: int) -> int:
            return outer_step(model, data, steps, **inner)

    if mode.startswith("tasks"):  # one process: the per-task loop against batched mode

        def step(model: nn.Module, data: tuple[torch.Tensor, ...], steps: int) -> int:
            return tasks_step(model, data, steps, args.tasks, mode == "tasks-batched")

    step(model, data, args.steps)  # warm-up
    probe = StoragePeak()
    with probe:
        held = step(model, data, args.steps)
    del probe._refs
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step(model, data, args.steps)
        times.append(time.perf_counter() - start)
    result = {"held": held, "peak": probe.peak, "time": statistics.median(times)}
    with open(f"{out}/{mode}{world}-{rank}.json", "w") as f:
        json.dump(result, f)
    if mode != "single" and not mode.startswith("tasks"):
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def run(mode: str, world: int, args: Any, tmp: str) -> list[dict[str, float]]:
    rendezvous = os.path.join(tmp, f"rdv-{mode}{world}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    flags = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "only")]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.fsdp_memory",
                *flags,
                "--worker",
                f"{r},{world},{rendezvous},{tmp},{mode}",
            ],
            env=env,
            cwd=ROOT,
        )
        for r in range(world)
    ]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise RuntimeError(f"{mode} on {world} ranks failed")
    out = []
    for r in range(world):
        with open(f"{tmp}/{mode}{world}-{r}.json") as f:
            out.append(json.load(f))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "llama"), default="mlp")
    parser.add_argument("--width", type=int, default=None, help="512 (mlp), 256 (llama)")
    parser.add_argument("--depth", type=int, default=None, help="8 (mlp), 4 (llama)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per text (llama)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=4, help="tasks of the batched-mode rows (mlp)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated runs to keep (e.g. tasks-loop)")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    llama = args.model == "llama"
    if args.width is None:
        args.width = 256 if llama else 512
    if args.depth is None:
        args.depth = 4 if llama else 8
    if args.worker:
        rank, world, rendezvous, out, mode = args.worker.split(",")
        worker(int(rank), int(world), rendezvous, out, mode, args)
        return
    if llama:
        params = sum(p.numel() for p in make_llama(args.width, args.depth, args.seq).parameters())
        print(
            f"Llama, {args.depth} layers of hidden size {args.width}, {params / 1e6:.2f} M float32 "
            f"parameters ({params * 4 / MB:.1f} MB), batch {args.batch} x {args.seq} tokens, "
            f"{args.steps} inner Adam steps + outer backward; per rank (max over ranks)\n"
        )
        runs = [
            (m, w)
            for m in (
                "fsdp",
                "fsdp+ac",
                "fsdp+bf16",
                "fsdp+ac+bf16",
                "train",
                "train+ac",
            )
            for w in (1, 2, 4)
        ]
        # Activation checkpointing with higher's checkpoint=True, and first-order MAML
        # (on 2 ranks, with --only fsdp+ckpt,...: not run by default).
        if args.only:
            runs += [(m, 2) for m in ("fsdp+ckpt", "fsdp+ac+ckpt", "fsdp+fo", "fsdp+ac+fo")]
    else:
        params = args.depth * (args.width * args.width + args.width)
        print(
            f"{args.depth} x Linear({args.width}, {args.width}), {params / 1e6:.2f} M float32 "
            f"parameters ({params * 4 / MB:.1f} MB), batch {args.batch}, {args.steps} inner "
            "Adam steps + outer backward; per rank (max over ranks)\n"
        )
        runs = [
            ("single", 1),
            *((m, w) for m in ("ddp", "fsdp") for w in (1, 2, 4)),
            ("tasks-loop", 1),
            ("tasks-batched", 1),
        ]
    if args.only:
        runs = [(m, w) for m, w in runs if m in args.only.split(",")]
    print("| run | ranks | fast weights + Adam state (MB) | peak step allocations (MB) | s/step |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mode, world in runs:
            ranks = run(mode, world, args, tmp)
            held = max(r["held"] for r in ranks) / MB
            peak = max(r["peak"] for r in ranks) / MB
            step = statistics.median(r["time"] for r in ranks)
            print(
                f"| {mode} | {world} | {held:.1f} | {peak:.1f} | {step:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
