"""A self-attention model for test_blockwise_attention.py, and the rank side of its DDP case.

Run as ``python blockwise_attention_ranks.py RANK WORLD RENDEZVOUS OUT_DIR``:
each rank takes one task's MAML step (two inner steps) through a
``DistributedDataParallel`` self-attention model with the block-wise kernel
forced, and saves the averaged meta-gradient and how many calls reached the kernel.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import higher
from higher._compat import blockwise_attention


class SelfAttention(nn.Module):
    """Multi-head self-attention as model code writes it, with a learned additive
    bias (T5's relative position bias: the mask requires grad), causal, or GQA."""

    def __init__(self, kind: str, dim: int = 8, heads: int = 2, seq: int = 7) -> None:
        super().__init__()
        self.kind, self.heads = kind, heads
        self.kv_heads = 1 if kind == "gqa" else heads
        head = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * self.kv_heads * head)
        self.out = nn.Linear(dim, dim)
        self.bias = nn.Parameter(0.1 * torch.randn(heads, seq, seq)) if kind == "bias" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q = self.q(x).view(b, s, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if self.bias is None else self.bias.unsqueeze(0),
            is_causal=self.kind == "causal",
            enable_gqa=self.kind == "gqa",
        )
        return x + self.out(y.transpose(1, 2).reshape(b, s, d))


def problem(kind: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[nn.Module, list]:
    torch.manual_seed(seed)
    model = SelfAttention(kind).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    tasks = [tuple(torch.randn(2, 7, 8, generator=g).to(dtype) for _ in range(4)) for _ in range(2)]
    return model, tasks


def run(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    blockwise_attention.BLOCK_ELEMENTS["cpu"] = 100  # several blocks on small shapes
    blockwise_attention.MIN_BLOCK_ROWS = 1
    calls = [0]
    kernel = blockwise_attention.attention

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return kernel(*args, **kwargs)

    blockwise_attention.attention = counting
    model, tasks = problem("bias")
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    xs, ys, xq, yq = tasks[rank]
    with (
        higher.attention.attention_kernel("blockwise"),
        higher.innerloop_ctx(ddp, opt, copy_initial_weights=False) as (fmodel, diffopt),
    ):
        for _ in range(2):
            diffopt.step(torch.nn.functional.mse_loss(fmodel(xs), ys))
        torch.nn.functional.mse_loss(fmodel(xq), yq).backward()
    return {"grads": [p.grad.clone() for p in model.parameters()], "calls": calls[0]}


if __name__ == "__main__":
    import launch_ranks

    launch_ranks.run_rank(sys.argv[1:], run)
