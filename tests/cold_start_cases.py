"""The first thing a user's script does with each entry point: the per-process side of
test_cold_start.py.

Run as ``python cold_start_cases.py OUT_DIR``: the process imports torch and
higher, then forks one child per case of ``CASES`` and per DDP rank (two, gloo,
meeting through ``OUT_DIR/rdv``). Each child runs its case (cold: nothing of
higher's has run in this process before), runs it again (warm), and saves both
results, or the traceback of a run that raised, to ``OUT_DIR/NAME.pt``. Every case is
a small float32 model at PyTorch's defaults (default dtype, threads and
kernels); it seeds the global generator itself, so the two runs compute the
same thing. The parent test also runs the cases in its own, warmed-up process
and compares.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import higher

Result = dict[str, torch.Tensor]


def mlp(width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1))


def sine(n: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g)
    return x, torch.sin(x)


def mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).mean()


def grads(model: nn.Module, **extra: torch.Tensor) -> Result:
    out = {name: p.grad for name, p in model.named_parameters()}
    return {**out, **extra}


def _maml(
    model: nn.Module, opt: torch.optim.Optimizer, data: list, steps: int = 3, **ctx: object
) -> Result:
    """MAML on one task: ``steps`` inner steps (as closures, so that checkpointing
    applies), then the query loss's backward."""
    (xs, ys), (xq, yq) = data
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, **ctx) as (fm, do):
        for _ in range(steps):
            do.step(lambda: mse(fm(xs), ys))
        query = mse(fm(xq), yq)
        query.backward()
    return grads(model, query=query.detach())


# -- innerloop_ctx ---------------------------------------------------------------------
def per_task() -> Result:
    model = mlp()
    return _maml(model, torch.optim.SGD(model.parameters(), lr=0.1), [sine(), sine(seed=2)])


def first_order() -> Result:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return _maml(model, opt, [sine(), sine(seed=2)], first_order=True)


def checkpoint_snippet() -> Result:
    """The snippet of issue 23, as written (a seeded model and data)."""
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(10, 1)
    y = torch.sin(x)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, checkpoint=True) as (fm, do):
        do.step(lambda: ((fm(x) - y) ** 2).mean())
        ((fm(x) - y) ** 2).mean().backward()
    return grads(model)


def checkpoint_200_steps() -> Result:
    """A 200-step checkpointed unroll, a new batch bound to each step's closure."""
    model = mlp(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(200, 8, 1, generator=g)
    xq, yq = sine(seed=2)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, checkpoint=True) as (fm, do):
        for x in xs:
            do.step(lambda x=x: mse(fm(x), torch.sin(x)))
        query = mse(fm(xq), yq)
        query.backward()
    return grads(model, query=query.detach())


def checkpoint_segments() -> Result:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return _maml(model, opt, [sine(), sine(seed=2)], steps=7, checkpoint=3)


def num_tasks() -> Result:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(2, 4, 10, 1, generator=g)
    task_mse = torch.func.vmap(mse)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, num_tasks=4) as (fm, do):
        for _ in range(3):
            do.step(task_mse(fm(xs), torch.sin(xs)))
        query = task_mse(fm(xq), torch.sin(xq)).mean()
        query.backward()
    return grads(model, query=query.detach())


# -- higher.implicit -------------------------------------------------------------------
def implicit() -> Result:
    from higher.implicit import imaml_grad, proximal_term

    model = mlp(8)
    (xs, ys), (xq, yq) = sine(), sine(seed=2)
    theta = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fm, do):
        for _ in range(30):
            do.step(mse(fm(xs), ys) + proximal_term(fm.fast_params, theta, 2.0))
    meta, report = imaml_grad(
        lambda p: mse(fm(xs, params=p), ys),
        lambda p: mse(fm(xq, params=p), yq),
        fm,
        theta,
        lam=2.0,
        max_iter=10,
    )
    out = {f"meta{i}": g for i, g in enumerate(meta)}
    return {**out, "residual": torch.tensor(report.residual)}


# -- models with once-per-process wrappers: attention, checkpoints in the forward, RNNs --
class Attention(nn.Module):
    """F.scaled_dot_product_attention called directly, then nn.MultiheadAttention
    (on its fast path to the same function: need_weights=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)
        h, _ = self.mha(h, h, h, need_weights=False)
        return self.out(h).mean(1)


class CheckpointedBlock(nn.Module):
    """Calls torch.utils.checkpoint inside its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh())
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        return self.out(h).mean(1)


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.gru = nn.GRU(6, 4, batch_first=True)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x)
        h, _ = self.gru(h)
        return self.out(h[:, -1])


def sequences() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(2, 3, 5, 4, generator=g)
    ys, yq = torch.randn(2, 3, 1, generator=g)
    return [(xs, ys), (xq, yq)]


def _model_case(cls: type[nn.Module], **ctx: object) -> Callable[[], Result]:
    def case() -> Result:
        model = cls()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return _maml(model, opt, sequences(), **ctx)

    return case


CASES: dict[str, Callable[[], Result]] = {
    "per_task": per_task,
    "first_order": first_order,
    "checkpoint_snippet": checkpoint_snippet,
    "checkpoint_200_steps": checkpoint_200_steps,
    "checkpoint_segments": checkpoint_segments,
    "num_tasks": num_tasks,
    "implicit": implicit,
    "attention": _model_case(Attention),
    "attention_checkpoint": _model_case(Attention, checkpoint=True),
    "model_checkpoint": _model_case(CheckpointedBlock),
    "model_checkpoint_checkpoint": _model_case(CheckpointedBlock, checkpoint=True),
    "rnn": _model_case(Recurrent),
    "rnn_checkpoint": _model_case(Recurrent, checkpoint=True),
}


# -- DDP: each rank's first meta-iteration ---------------------------------------------
DDP_WORLD = 2


def ddp_case(rank: int) -> Result:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return _maml(model, opt, [sine(seed=10 + rank), sine(seed=20 + rank)])


def run_twice(case: Callable[[], Result]) -> dict[str, object]:
    """``{"cold": result or traceback, "warm": ...}``: the case run twice, the same way."""
    out: dict[str, object] = {}
    for when in ("cold", "warm"):
        torch.manual_seed(0)
        try:
            out[when] = {k: v.detach().clone() for k, v in case().items()}
        except Exception:
            out[when] = traceback.format_exc()
    return out


def _child(name: str, out_dir: str, rank: int | None = None) -> None:
    """One forked process: a case, cold then warm, saved to ``OUT_DIR/NAME.pt``."""
    code = 1
    try:
        if rank is None:
            result = run_twice(CASES[name])
        else:
            import torch.distributed as dist

            dist.init_process_group(
                "gloo", init_method=f"file://{out_dir}/rdv", rank=rank, world_size=DDP_WORLD
            )
            try:
                result = run_twice(lambda: ddp_case(rank))
            finally:
                dist.destroy_process_group()
        torch.save(result, f"{out_dir}/{name}.pt")
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(out_dir: str) -> int:
    """Forks one process per case (and per DDP rank), waits for all of them.

    Each child starts from this process as a user's script is after its
    imports: torch and higher imported, and nothing of higher's run. (Also
    ``torch._dynamo``, which torch.optim imports when the first optimizer is
    built, before any inner loop: importing it once here instead of once per
    child saves about a second of CPU per case.)
    """
    import torch._dynamo  # noqa: F401

    jobs: list[tuple[str, int | None]] = [(name, None) for name in CASES]
    jobs += [(f"ddp{r}", r) for r in range(DDP_WORLD)]
    children = {}
    for name, rank in jobs:
        pid = os.fork()
        if pid == 0:
            _child(name, out_dir, rank)
        children[pid] = name
    failed = []
    for pid, name in children.items():
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
