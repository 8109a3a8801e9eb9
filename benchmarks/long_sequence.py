"""Long sequences: memory and time of one second-order MAML step through a Llama.

Usage::

    python -m benchmarks.long_sequence                        # the table of benchmarks/README.md
    python -m benchmarks.long_sequence --lengths 256,512 --variants math,blockwise
    python -m benchmarks.long_sequence --headline             # 4 layers, 512 wide, 8k tokens
    python -m benchmarks.long_sequence --smoke                # harness check: tiny
    python -m benchmarks.long_sequence --device cuda --max-gb 70   # on a GPU

The model is transformers' ``LlamaForCausalLM`` with its default (sdpa)
attention: 2 layers, 4 heads, 128 wide (MLP 8/3 as wide again, as Llama),
vocabulary 256, batch 1, float32. One MAML outer step is one SGD inner step on
a support sequence and the query loss's backward, through
``higher.innerloop_ctx``. Variants:

* ``math``: second order with attention on torch's math kernel (higher before
  :mod:`higher.attention`), forced with ``attention_kernel("math")``;
* ``blockwise``: second order with higher's block-wise attention, forced with
  ``attention_kernel("blockwise")``;
* ``first-order``: ``first_order=True``: the fused (flash) kernel, no double backward;
* ``checkpoint`` (not in the default table): ``blockwise`` with
  ``checkpoint=True``: the outer backward rebuilds the inner step's graph;
* ``torch-func`` (not in the default table): the same second-order step written
  by hand with ``torch.func.functional_call`` and ``torch.autograd.grad(...,
  create_graph=True)``, attention on the block-wise kernel: what a careful user
  would write without higher, for what the rest of the model's second-order
  graph keeps (``--variants blockwise,torch-func,first-order``).

Every point runs in a fresh process with glibc's mmap threshold fixed at 64 KiB
(``MALLOC_MMAP_THRESHOLD_=65536``: freed large blocks go back to the OS, so the
peak RSS counts live memory). Memory is the peak RSS growth over the step,
after a warm-up step at 64 tokens (on CUDA: the peak of
``torch.cuda.max_memory_allocated`` over what was allocated before); time is the median of ``--repeats`` steps
(one for the long points: the machine is shared). Points whose projected memory
exceeds ``--max-gb`` are skipped and projected from the shorter ones: the
math kernel's memory grows as ``a N + b N^2``, fitted on the two longest
points measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

#: The fitted memory model's points: the longest two measured lengths per variant.
VARIANTS = ("math", "blockwise", "first-order")
LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)


def build(layers: int, width: int, heads: int) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=width,
        intermediate_size=8 * width // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1 << 15,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float().train()


def maml_step(model: torch.nn.Module, tokens: torch.Tensor, variant: str) -> None:
    import higher
    from higher.attention import attention_kernel

    support, query = tokens[:1], tokens[1:]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kernel = "math" if variant == "math" else "blockwise"
    checkpoint = variant == "checkpoint"
    with (
        attention_kernel(kernel),
        higher.innerloop_ctx(
            model,
            opt,
            copy_initial_weights=False,
            first_order=variant == "first-order",
            checkpoint=checkpoint,
        ) as (fmodel, diffopt),
    ):
        if checkpoint:  # the inner step's graph is rebuilt by the outer backward
            diffopt.step(lambda: fmodel(support, labels=support).loss)
        else:
            diffopt.step(fmodel(support, labels=support).loss)
        fmodel(query, labels=query).loss.backward()
    model.zero_grad(set_to_none=True)


def torch_func_step(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    """``maml_step``'s second-order step written by hand with ``torch.func.functional_call``
    and ``torch.autograd.grad(create_graph=True)``, attention on the same block-wise
    kernel: what the rest of the model's second-order graph costs without higher."""
    from higher.attention import scaled_dot_product_attention

    support, query = tokens[:1], tokens[1:]
    params = dict(model.named_parameters())
    functional = torch.nn.functional
    saved = functional.scaled_dot_product_attention
    # transformers looks the function up on torch.nn.functional at each call.
    functional.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        call = torch.func.functional_call
        loss = call(model, params, (support,), {"labels": support}).loss
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        fast = {n: p - 0.01 * g for (n, p), g in zip(params.items(), grads)}
        call(model, fast, (query,), {"labels": query}).loss.backward()
    finally:
        functional.scaled_dot_product_attention = saved
    model.zero_grad(set_to_none=True)


def saved_by_phase(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, float]:
    """MB of tensors that ``torch_func_step``'s graph saves, by the phase that saved them
    (each storage counted once, parameters left out): where second order's memory goes."""
    from higher.attention import scaled_dot_product_attention

    support, query = tokens[:1], tokens[1:]
    params = dict(model.named_parameters())
    owners: dict[int, tuple[str, int]] = {}
    phase = [""]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if not isinstance(t, torch.nn.Parameter):
            owners.setdefault(storage.data_ptr(), (phase[0], storage.nbytes()))
        return t

    functional = torch.nn.functional
    saved = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = scaled_dot_product_attention
    call = torch.func.functional_call
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            phase[0] = "support forward"
            loss = call(model, params, (support,), {"labels": support}).loss
            phase[0] = "inner backward (create_graph=True)"
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            phase[0] = "query forward on the fast weights"
            fast = {n: p - 0.01 * g for (n, p), g in zip(params.items(), grads)}
            call(model, fast, (query,), {"labels": query}).loss.backward()
    finally:
        functional.scaled_dot_product_attention = saved
    model.zero_grad(set_to_none=True)
    out: dict[str, float] = {}
    for name, size in owners.values():
        out[name] = out.get(name, 0.0) + size / 2**20
    return out


def step(model: torch.nn.Module, tokens: torch.Tensor, variant: str) -> None:
    if variant == "torch-func":
        torch_func_step(model, tokens)
    else:
        maml_step(model, tokens, variant)


def probe(
    variant: str, length: int, layers: int, width: int, heads: int, repeats: int, device: str
) -> dict:
    """One point, measured in this process (run it in a fresh one).

    Memory is the peak RSS growth on a CPU, and the peak of
    ``torch.cuda.max_memory_allocated`` over what was allocated before on CUDA.
    """
    from ._measure import reset_peak_rss, status_mb, sync

    dev = torch.device(device)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    model = build(layers, width, heads).to(dev)
    g = torch.Generator().manual_seed(1)
    step(model, torch.randint(0, 256, (2, 64), generator=g).to(dev), variant)  # warm-up
    tokens = torch.randint(0, 256, (2, length), generator=g).to(dev)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) / 2**20
    else:
        reset_peak_rss()
        base = status_mb("VmRSS")
    times = []
    for _ in range(repeats):
        sync(dev)
        start = time.perf_counter()
        step(model, tokens, variant)
        sync(dev)
        times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = status_mb("VmHWM")
    return {
        "variant": variant,
        "length": length,
        "device": device,
        "peak_mb": peak - base,
        "seconds": statistics.median(times),
    }


def interleaved_times(args: argparse.Namespace, lengths: list[int], variants: list[str]) -> dict:
    """Median seconds per variant and length, the variants interleaved in one process.

    On a shared machine the load moves between fresh processes; rounds that
    alternate the variants see the same load, so their ratios are steadier.
    """
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    model = build(args.layers, args.width, args.heads)
    g = torch.Generator().manual_seed(1)
    for variant in variants:
        step(model, torch.randint(0, 256, (2, 64), generator=g), variant)  # warm-up
    out: dict[tuple[str, int], float] = {}
    for length in lengths:
        tokens = torch.randint(0, 256, (2, length), generator=g)
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.repeats if length <= args.long_from else 1):
            for variant in variants:
                start = time.perf_counter()
                step(model, tokens, variant)
                times[variant].append(time.perf_counter() - start)
        for variant in variants:
            out[variant, length] = statistics.median(times[variant])
            print(f"{variant} {length}: {out[variant, length]:.3f} s", file=sys.stderr)
    return out


def in_subprocess(variant: str, length: int, args: argparse.Namespace) -> dict | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "benchmarks.long_sequence", "--probe", variant, str(length)]
    cmd += ["--layers", str(args.layers), "--width", str(args.width), "--heads", str(args.heads)]
    cmd += ["--repeats", str(args.repeats if length <= args.long_from else 1)]
    cmd += ["--device", args.device]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    except subprocess.CalledProcessError as error:
        print(error.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


#: Bytes per score entry per head and layer that the math kernel's second-order
#: step keeps in float32 (3,847 MB at 4,096 tokens over 2 layers of 4 heads: 28.7).
MATH_BYTES_PER_SCORE = 30


def project(
    points: list[dict], length: int, quadratic: bool, heads_x_layers: int = 0
) -> float | None:
    """Memory at ``length`` from the two longest points: ``a N + b N^2`` (or ``a N``).

    Without points, the math kernel's scores alone (``MATH_BYTES_PER_SCORE``).
    """
    if not points:
        if quadratic and heads_x_layers:
            return MATH_BYTES_PER_SCORE * length * length * heads_x_layers / 2**20
        return None
    (n1, m1), (n2, m2) = [(p["length"], p["peak_mb"]) for p in points[-2:]] * (
        2 if len(points) == 1 else 1
    )
    if not quadratic or n1 == n2:
        return m2 * length / n2
    b = (m2 / n2 - m1 / n1) / (n2 - n1)
    a = m1 / n1 - b * n1
    return a * length + b * length * length


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-from", type=int, default=2048, help="longer: one timed step")
    parser.add_argument("--max-gb", type=float, default=12.0, help="skip and project above")
    parser.add_argument("--headline", action="store_true", help="4 layers, 512 wide, 8k tokens")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--interleaved",
        action="store_true",
        help="time only, the variants interleaved in this process (CPU; no memory)",
    )
    parser.add_argument(
        "--saved",
        action="store_true",
        help="MB that the by-hand second-order step's graph saves per phase, at --lengths",
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        variant, length = args.probe
        point = probe(
            variant, int(length), args.layers, args.width, args.heads, args.repeats, args.device
        )
        print(json.dumps(point))
        return 0
    if args.headline:
        args.layers, args.width, args.heads, args.lengths = 4, 512, 8, "8192"
    if args.smoke:
        args.lengths, args.repeats = "64,128", 1
    lengths = [int(n) for n in args.lengths.split(",")]
    variants = args.variants.split(",")
    if args.saved:
        model = build(args.layers, args.width, args.heads)
        for length in lengths:
            tokens = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(1))
            for name, mb in saved_by_phase(model, tokens).items():
                print(f"{length} tokens, {name}: {mb:,.0f} MB")
        return 0
    if args.interleaved:
        times = interleaved_times(args, lengths, variants)
        print("| variant | " + " | ".join(f"{n:,}" for n in lengths) + " |")
        print("|---" * (len(lengths) + 1) + "|")
        for v in variants:
            print(f"| {v}, s | " + " | ".join(f"{times[v, n]:.2f}" for n in lengths) + " |")
        return 0
    results: dict[str, list[dict]] = {v: [] for v in variants}
    projected: dict[tuple[str, int], float | None] = {}
    for length in lengths:
        for variant in variants:
            guess = project(results[variant], length, variant == "math", args.heads * args.layers)
            if guess is not None and guess > args.max_gb * 1024:
                projected[variant, length] = guess
                print(f"{variant} {length}: skipped, projected {guess:.0f} MB", file=sys.stderr)
                continue
            point = in_subprocess(variant, length, args)
            if point is None:
                projected[variant, length] = guess
                continue
            results[variant].append(point)
            print(json.dumps(point), file=sys.stderr)
    print(table(results, projected, lengths, variants))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "projected": [[*k, v] for k, v in projected.items()]}, f)
    return 0


def table(
    results: dict[str, list[dict]],
    projected: dict[tuple[str, int], float | None],
    lengths: list[int],
    variants: list[str],
) -> str:
    def cell(variant: str, length: int, key: str) -> str:
        for p in results[variant]:
            if p["length"] == length:
                return f"{p[key]:,.0f}" if key == "peak_mb" else f"{p[key]:.2f}"
        guess = projected.get((variant, length))
        return f"({guess:,.0f})*" if key == "peak_mb" and guess is not None else "-"

    lines = ["| | " + " | ".join(f"{n:,}" for n in lengths) + " |"]
    lines.append("|---" * (len(lengths) + 1) + "|")
    for key, unit in (("peak_mb", "MB"), ("seconds", "s")):
        for v in variants:
            lines.append(f"| {v}, {unit} | " + " | ".join(cell(v, n, key) for n in lengths) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
