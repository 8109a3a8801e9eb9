"""MAML on a Hugging Face transformer: few-shot shift ciphers, batched tasks, LoRA.

Each task is a shift cipher over a small alphabet: every letter x is written
as (x + k) mod A, with the task's own shift k. A learner sees a few support
texts written with a handful of letters and their ciphertexts, takes a few SGD
steps, and must then encipher texts made of the *other* letters, which it has
never seen enciphered in this task. Nothing in a query text tells the shift,
so the only way to score above chance is to carry what the support texts say
about k over to unseen letters: adaptation is necessary.

The model is a Llama architecture from transformers, built from a config
(about a million parameters, no download), reading plaintext and predicting
the ciphertext letter at every position. MAML meta-learns its initial weights
with all tasks of a meta-batch adapted at once (``num_tasks``); the baseline
is the same network pretrained on all tasks pooled, adapted the same way.

    python examples/maml_transformer.py                   # MAML against the baseline, batched
    python examples/maml_transformer.py --per-task-loop   # the tasks one after another
    python examples/maml_transformer.py --lora            # meta-learn LoRA adapters only
    python examples/maml_transformer.py --shifts 15       # every Caesar shift (needs longer)
    torchrun --standalone --nproc-per-node 2 examples/maml_transformer.py --fsdp
                                                          # the model sharded over 2 ranks (FSDP2)

With ``--lora`` the pretrained baseline is frozen and only LoRA adapters (peft)
on its attention and MLP projections are meta-learned: their initial values by
the outer loop, their adaptation by the inner loop. It prints query accuracy
after adaptation on held-out tasks with 95 % confidence intervals and saves a
plot.

With ``--fsdp``, under torchrun, the model is sharded over the ranks with
FSDP2 (``fully_shard``: each decoder layer, then the root) and meta-trained
with the same ``innerloop_ctx`` call; see :func:`main_fsdp`. ``--grad-checkpointing``
and ``--bf16`` add the rest of FSDP2's training recipe: each decoder layer
recomputed in the backward, and bfloat16 compute on float32 master weights.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn

import higher

try:
    from . import _common
except ImportError:  # run as a script
    import _common  # type: ignore[no-redef]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CipherTasks:
    """Shift-cipher tasks: which letters the support and query texts use, and how long."""

    letters: int = 16  # the alphabet: tokens 0 .. letters - 1
    shifts: int = 4  # k is drawn from 1 .. shifts
    support_letters: int = 5  # support texts use these; query texts the others
    seq_len: int = 8
    support_seqs: int = 2
    query_seqs: int = 2

    def sample(self, n: int, generator: torch.Generator | None = None) -> Batch:
        """``n`` tasks: support plaintexts and ciphertexts, then query ones, each (n, seqs, len)."""
        shift = torch.randint(1, self.shifts + 1, (n, 1, 1), generator=generator)
        order = torch.rand(n, self.letters, generator=generator).argsort(dim=1)
        support, query = order[:, : self.support_letters], order[:, self.support_letters :]

        def texts(alphabet: torch.Tensor, seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
            picks = torch.randint(alphabet.size(1), (n, seqs * self.seq_len), generator=generator)
            plain = alphabet.gather(1, picks).view(n, seqs, self.seq_len)
            return plain, (plain + shift) % self.letters

        return (*texts(support, self.support_seqs), *texts(query, self.query_seqs))


def make_model(
    letters: int = 16,
    seq_len: int = 8,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    intermediate: int = 512,
    attention: str = "sdpa",
) -> nn.Module:
    """A Llama causal LM from a config: 1.05M parameters with the defaults."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=letters,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        attn_implementation=attention,
        # The alphabet has no special tokens.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def add_lora(model: nn.Module, rank: int) -> nn.Module:
    """``model`` frozen, with trainable LoRA adapters on every projection (peft)."""
    try:
        import peft
    except ImportError:
        raise SystemExit("--lora needs peft: pip install peft") from None
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    return peft.get_peft_model(model, config)  # base weights: requires_grad False


def token_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per text position, shaped like ``target``."""
    flat = F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none")
    return flat.view(target.shape)


def task_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One loss per task for (tasks, seqs, len) targets; a scalar for (seqs, len)."""
    losses = token_losses(logits, target)
    return losses.flatten(1).mean(1) if target.dim() == 3 else losses.mean()


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of letters enciphered right, per task for (tasks, seqs, len) targets."""
    right = (logits.argmax(-1) == target).float()
    return right.flatten(1).mean(1) if target.dim() == 3 else right.mean()


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def adapt(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    track: bool,
    num_tasks: int | None = None,
) -> Any:
    """Fine-tunes a patched copy of ``model``'s trainable weights on (x, y); returns the copy.

    With ``num_tasks`` all tasks adapt at once (batched mode): x and y have a
    leading task dimension.
    """
    opt = torch.optim.SGD(trainable(model), lr=lr)  # with LoRA: the adapters only
    with higher.innerloop_ctx(
        model, opt, copy_initial_weights=False, track_higher_grads=track, num_tasks=num_tasks
    ) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(task_loss(fmodel(input_ids=x).logits, y))
    return fmodel


def meta_train(
    model: nn.Module, args: argparse.Namespace, device: torch.device
) -> tuple[list[float], float]:
    """MAML on ``model``'s trainable weights; returns the query-accuracy curve and seconds."""
    tasks = CipherTasks(**args.tasks)
    meta_opt = torch.optim.Adam(trainable(model), lr=args.meta_lr)
    curve: list[float] = []
    start = time.perf_counter()
    bar = _common.progress(
        range(args.iterations), args.progress, desc="lora" if args.lora else "maml"
    )
    for it in bar:
        xs, ys, xq, yq = (t.to(device) for t in tasks.sample(args.meta_batch))
        meta_opt.zero_grad()
        if args.per_task_loop:
            correct = 0.0
            for i in range(args.meta_batch):
                fmodel = adapt(model, xs[i], ys[i], args.inner_steps, args.inner_lr, track=True)
                logits = fmodel(input_ids=xq[i]).logits
                (task_loss(logits, yq[i]) / args.meta_batch).backward()
                correct += accuracy(logits, yq[i]).item()
            curve.append(correct / args.meta_batch)
        else:  # the whole meta-batch as one inner loop
            n = args.meta_batch
            fmodel = adapt(model, xs, ys, args.inner_steps, args.inner_lr, track=True, num_tasks=n)
            logits = fmodel(input_ids=xq).logits
            (task_loss(logits, yq).sum() / n).backward()
            curve.append(accuracy(logits, yq).mean().item())
        torch.nn.utils.clip_grad_norm_(trainable(model), args.max_grad_norm)
        meta_opt.step()
        if it % 20 == 0 and hasattr(bar, "set_postfix"):
            bar.set_postfix(query_acc=f"{sum(curve[-20:]) / len(curve[-20:]):.2f}")
    return curve, time.perf_counter() - start


def pretrain_baseline(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The same network trained on the texts of all tasks pooled (no meta-learning)."""
    tasks = CipherTasks(**args.tasks)
    model = make_model(**args.model).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.meta_lr)
    for _ in _common.progress(range(args.baseline_iterations), args.progress, desc="baseline"):
        xs, ys, xq, yq = (t.to(device) for t in tasks.sample(args.meta_batch))
        x, y = torch.cat([xs, xq], 1).flatten(0, 1), torch.cat([ys, yq], 1).flatten(0, 1)
        opt.zero_grad()
        token_losses(model(input_ids=x).logits, y).mean().backward()
        opt.step()
    return model


def initial_model(args: argparse.Namespace, baseline: nn.Module, device: torch.device) -> nn.Module:
    """The model whose initial weights MAML learns."""
    if args.lora:  # the pretrained baseline, frozen, under meta-learned adapters
        return add_lora(copy.deepcopy(baseline), args.lora_rank)
    return make_model(**args.model).to(device)


def evaluate(
    model: nn.Module, args: argparse.Namespace, device: torch.device, steps: int
) -> list[float]:
    """Query accuracy after ``steps`` adaptation steps on held-out tasks (a fixed seed)."""
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    xs, ys, xq, yq = (t.to(device) for t in CipherTasks(**args.tasks).sample(args.eval_tasks, gen))
    scores: list[float] = []
    chunk = 1 if args.per_task_loop else 25  # tasks adapted at once
    for i in range(0, args.eval_tasks, chunk):
        part = slice(i, i + chunk)
        if args.per_task_loop:
            fmodel = adapt(model, xs[i], ys[i], steps, args.inner_lr, track=False)
            query, target = xq[i], yq[i]
        else:
            n = len(xs[part])
            fmodel = adapt(model, xs[part], ys[part], steps, args.inner_lr, False, num_tasks=n)
            query, target = xq[part], yq[part]
        with torch.no_grad():
            acc = accuracy(fmodel(input_ids=query).logits, target)
        scores += acc.flatten().tolist()
    return scores


def plot(curve, by_steps: dict[str, list[tuple[float, float]]], args, path: str) -> str:
    plt = _common.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, len(curve) // 20)
    smooth = [
        sum(curve[max(0, i - window + 1) : i + 1]) / len(curve[max(0, i - window + 1) : i + 1])
        for i in range(len(curve))
    ]
    left.plot(smooth, "C0-")
    left.axhline(1 / args.tasks["shifts"], color="gray", ls=":", label="chance (1 / shifts)")
    left.set(xlabel="meta-update", ylabel="query accuracy after adaptation", ylim=(0, 1.02))
    left.set_title("meta-training (training tasks)")
    left.legend()
    steps = range(len(next(iter(by_steps.values()))))
    for color, (label, points) in zip(("C0", "C3"), by_steps.items()):
        means = [m for m, _ in points]
        cis = [c for _, c in points]
        right.errorbar(
            list(steps), means, yerr=cis, color=color, marker="o", capsize=3, label=label
        )
    right.axhline(1 / args.tasks["shifts"], color="gray", ls=":")
    right.set_xticks(list(steps))
    right.set(
        xlabel="adaptation steps on the support texts", ylabel="query accuracy", ylim=(0, 1.02)
    )
    right.set_title(f"{args.eval_tasks} held-out tasks (95% CI)")
    right.legend()
    fig.suptitle(
        f"shift ciphers over {args.tasks['letters']} letters, Llama {args.parameters / 1e6:.2f}M"
    )
    return _common.save_figure(fig, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    t = CipherTasks()
    p.add_argument("--letters", type=int, default=t.letters, help="alphabet size")
    p.add_argument("--shifts", type=int, default=t.shifts, help="shifts k drawn from 1..SHIFTS")
    p.add_argument(
        "--support-letters",
        type=int,
        default=t.support_letters,
        help="letters in the support texts",
    )
    p.add_argument("--seq-len", type=int, default=t.seq_len)
    p.add_argument(
        "--support-texts", type=int, default=t.support_seqs, help="support texts per task"
    )
    p.add_argument("--query-texts", type=int, default=t.query_seqs, help="query texts per task")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--inner-steps", type=int, default=1, help="inner SGD steps in meta-training")
    p.add_argument(
        "--eval-steps", type=int, help="adaptation steps at test time (default: --inner-steps)"
    )
    p.add_argument("--inner-lr", type=float, default=0.3)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--meta-batch", type=int, default=8, help="tasks per meta-update")
    p.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="meta-gradients are clipped to this norm"
    )
    p.add_argument("--iterations", type=int, default=300, help="meta-updates")
    p.add_argument(
        "--baseline-iterations", type=int, help="baseline updates (default: --iterations)"
    )
    p.add_argument("--eval-tasks", type=int, default=200, help="held-out tasks to evaluate on")
    p.add_argument(
        "--lora",
        action="store_true",
        help="freeze the pretrained baseline; meta-learn LoRA adapters",
    )
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument(
        "--per-task-loop",
        action="store_true",
        help="adapt to one task after another instead of all at once",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model over torchrun's ranks with FSDP2 (tasks one after another)",
    )
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="with --fsdp: transformers' gradient_checkpointing_enable() (recompute each layer)",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="with --fsdp: MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)",
    )
    p.add_argument("--smoke", action="store_true", help="a tiny model and a few updates (seconds)")
    p.add_argument("--device", default=_common.default_device())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="out/maml_transformer.png", help="where to save the figure")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )
    args = p.parse_args(argv)
    if (args.grad_checkpointing or args.bf16) and not args.fsdp:
        p.error("--grad-checkpointing and --bf16 configure FSDP2: use them with --fsdp")
    if args.smoke:
        args.hidden, args.layers, args.iterations, args.eval_tasks = 16, 1, 3, 4
        args.meta_batch, args.lora_rank = 2, 2
    if args.eval_steps is None:
        args.eval_steps = args.inner_steps
    if args.baseline_iterations is None:
        args.baseline_iterations = args.iterations
    args.tasks = {
        "letters": args.letters,
        "shifts": args.shifts,
        "support_letters": args.support_letters,
        "seq_len": args.seq_len,
        "support_seqs": args.support_texts,
        "query_seqs": args.query_texts,
    }
    args.model = {
        "letters": args.letters,
        "seq_len": args.seq_len,
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": 4 if args.hidden % 4 == 0 else 1,
        "intermediate": 4 * args.hidden,
        "attention": args.attention,
    }
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    _common.require("matplotlib")
    _common.require("transformers", *(["peft"] if args.lora else []), extra="models")
    logging.getLogger("transformers").setLevel(logging.ERROR)  # notes about generation settings
    if args.fsdp:
        return main_fsdp(args)
    _common.seed_everything(args.seed)
    device = torch.device(args.device)
    start = time.perf_counter()
    baseline = pretrain_baseline(args, device)
    model = initial_model(args, baseline, device)
    args.parameters = sum(p.numel() for p in model.parameters())
    curve, train_seconds = meta_train(model, args, device)
    how = "per-task loop" if args.per_task_loop else "batched"
    return report(model, baseline, curve, train_seconds, start, args, device, how)


def report(
    model: nn.Module,
    baseline: nn.Module,
    curve: list[float],
    train_seconds: float,
    start: float,
    args: argparse.Namespace,
    device: torch.device,
    how: str,
) -> dict[str, Any]:
    """Evaluates the meta-learned model and the baseline, prints, plots; returns the figures."""
    label = "MAML (LoRA)" if args.lora else "MAML"
    steps = args.eval_steps
    by_steps = {
        label: [_common.mean_ci95(evaluate(model, args, device, k)) for k in range(steps + 1)],
        "pretrained baseline": [
            _common.mean_ci95(evaluate(baseline, args, device, k)) for k in range(steps + 1)
        ],
    }
    path = plot(curve, by_steps, args, args.plot)
    elapsed = time.perf_counter() - start
    (acc, ci), (base_acc, base_ci) = (by_steps[k][args.eval_steps] for k in by_steps)
    meta_params = sum(p.numel() for p in trainable(model))
    print(
        f"{label}, Llama with {args.parameters / 1e6:.2f}M parameters ({meta_params / 1e6:.3f}M "
        f"meta-learned), {args.iterations} meta-updates of {args.meta_batch} tasks "
        f"({how}: {train_seconds:.0f} s), "
        f"{elapsed:.0f} s in all on {device}"
    )
    print(
        f"  query accuracy on unseen letters after {args.eval_steps} adaptation step(s), "
        f"{args.eval_tasks} held-out tasks (chance {1 / args.shifts:.2f}):"
    )
    for name, (mean, half), what in zip(
        by_steps, ((acc, ci), (base_acc, base_ci)), ("95% CI", "same adaptation")
    ):
        before = by_steps[name][0][0]
        print(f"    {name:<20} {mean:.3f} ± {half:.3f} ({what}; {before:.3f} before adapting)")
    print(f"  plot: {path}")
    return {
        "accuracy": acc,
        "accuracy_ci95": ci,
        "baseline_accuracy": base_acc,
        "baseline_ci95": base_ci,
        "train_curve": curve,
        "train_seconds": train_seconds,
        "seconds": elapsed,
        "plot": path,
    }


# -- several processes: the model sharded with FSDP2 -------------------------------------
#   torchrun --standalone --nproc-per-node 2 examples/maml_transformer.py --fsdp
#
# FSDP2 shards every parameter over the ranks, and higher keeps the fast weights
# and the inner optimizer's state sharded the same way: there is one set of fast
# weights for all ranks. As in any FSDP2 step, every rank runs the same
# computation on its own data, and gradients -- the inner steps' as well as the
# meta-gradient -- are those of the mean of the ranks' losses (higher/fsdp.py).
# So every rank must adapt to the same task: giving each rank its own tasks of
# the meta-batch, as the DDP examples do (examples/README.md), would adapt one
# model to the mean of different tasks' support losses, which is not MAML.
# Instead every rank draws the same meta-batch (the same seed), runs its tasks one
# after another (batched mode, num_tasks=, is refused under FSDP2), and takes its
# own share of each task's texts: rank r the support and query texts r, r + world,
# r + 2 world, ... With equal shares the mean of the ranks' losses is the task's
# loss over all its texts, so the meta-gradients are those of the one-process
# --per-task-loop run; the ranks share the work of every task, not the tasks.


def setup_fsdp(requested: torch.device) -> tuple[int, int, torch.device]:
    """Joins torchrun's process group (env://); returns the rank, world size and device."""
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit(
            "--fsdp runs under torchrun: "
            "torchrun --standalone --nproc-per-node 2 examples/maml_transformer.py --fsdp"
        )
    device = requested
    if device.type == "cuda":  # one GPU per rank
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size(), device


def shard(
    model: nn.Module, device: torch.device, grad_checkpointing: bool = False, bf16: bool = False
) -> nn.Module:
    """FSDP2 on ``model``: each decoder layer its own unit, then the root (embeddings, head).

    The recipe large models are trained with, on request: each decoder layer
    recomputed in the backward (``grad_checkpointing``), and bfloat16 compute on
    float32 master weights with float32 gradient reduction (``bf16``; the root's
    outputs, the logits, come back in float32).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if grad_checkpointing:  # transformers 5 renamed gradient_checkpointing_enable
        kwargs = {"use_reentrant": False}
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False  # a recomputed layer must not extend a cache again
        model.train()
    layers, root = MixedPrecisionPolicy(), MixedPrecisionPolicy()
    if bf16:
        layers = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]:
        fully_shard(layer, mesh=mesh, mp_policy=layers)
    fully_shard(model, mesh=mesh, mp_policy=root)
    return model


def meta_train_fsdp(
    model: nn.Module, args: argparse.Namespace, device: torch.device
) -> tuple[list[float], float]:
    """:func:`meta_train`'s per-task loop on a sharded model, each rank on its share of the texts."""
    tasks = CipherTasks(**args.tasks)
    meta_opt = torch.optim.Adam(trainable(model), lr=args.meta_lr)  # on the shards
    mine = slice(dist.get_rank(), None, dist.get_world_size())  # this rank's texts of a task
    curve: list[float] = []
    start = time.perf_counter()
    bar = _common.progress(range(args.iterations), args.progress, desc="maml (fsdp)")
    for it in bar:
        # The same tasks on every rank: the same seed, the same draws.
        xs, ys, xq, yq = (t[:, mine].to(device) for t in tasks.sample(args.meta_batch))
        meta_opt.zero_grad()
        correct = torch.zeros((), device=device)
        for i in range(args.meta_batch):
            fmodel = adapt(model, xs[i], ys[i], args.inner_steps, args.inner_lr, track=True)
            logits = fmodel(input_ids=xq[i]).logits
            # FSDP2 averages over ranks: this is the mean over all the task's query texts.
            (task_loss(logits, yq[i]) / args.meta_batch).backward()
            correct += accuracy(logits.detach(), yq[i])
        dist.all_reduce(correct)  # the ranks' shares have the same size: sum, then mean
        curve.append(correct.item() / (args.meta_batch * dist.get_world_size()))
        torch.nn.utils.clip_grad_norm_(trainable(model), args.max_grad_norm)  # DTensor grads
        meta_opt.step()
        if it % 20 == 0 and hasattr(bar, "set_postfix"):
            bar.set_postfix(query_acc=f"{sum(curve[-20:]) / len(curve[-20:]):.2f}")
    return curve, time.perf_counter() - start


def main_fsdp(args: argparse.Namespace) -> dict[str, Any]:
    """MAML on the model sharded over torchrun's ranks; rank 0 evaluates, prints and plots.

    Returns :func:`main`'s figures on rank 0 and an empty dict on the other ranks.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank, world, device = setup_fsdp(torch.device(args.device))
    try:
        for kind in ("support", "query"):
            texts = args.tasks[f"{kind}_seqs"]
            if texts % world:
                raise SystemExit(
                    f"--{kind}-texts ({texts}) must be a multiple of the world size ({world}): "
                    "every rank takes an equal share of each task's texts"
                )
        args.progress = args.progress and rank == 0
        _common.seed_everything(args.seed)  # every rank: the same weights and the same tasks
        start = time.perf_counter()
        # Every rank pretrains the same baseline, unsharded: it stands for the pretrained
        # checkpoint each rank would load before sharding (--lora builds on it), and it
        # keeps every rank's random stream that of the one-process run.
        baseline = pretrain_baseline(args, device)
        model = initial_model(args, baseline, device)
        args.parameters = sum(p.numel() for p in model.parameters())
        shard(model, device, args.grad_checkpointing, args.bf16)
        curve, train_seconds = meta_train_fsdp(model, args, device)
        # The full weights, gathered into rank 0's CPU memory (an FSDP2 checkpoint).
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        dist.barrier()  # no rank is still communicating when the group goes
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return {}
    learned = initial_model(args, baseline, device)  # unsharded, to evaluate on rank 0 alone
    learned.load_state_dict(state)
    how = f"FSDP over {world} ranks, per-task loop"
    how += "".join(
        f", {flag}"
        for flag, on in (("bf16", args.bf16), ("grad checkpointing", args.grad_checkpointing))
        if on
    )
    return report(learned, baseline, curve, train_seconds, start, args, device, how)


if __name__ == "__main__":
    main()
