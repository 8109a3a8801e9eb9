"""Meta-gradients through third-party models: transformers, peft, timm, torchvision.

The families: decoder, encoder and encoder-decoder transformers (GPT-2, BERT,
Llama, T5), sliding-window attention (Mistral), mixture-of-experts (Mixtral),
a state-space model (Mamba, the sequential scan transformers runs without its
CUDA kernels), vision transformers with learned, relative and rotary position
encodings (ViT, Swin, BEiT; timm's ViT and EVA-02), convolutional networks
(ResNet-18, ConvNeXt, EfficientNet, MobileNetV3 from torchvision and timm),
and peft's LoRA, DoRA, IA3 and prefix tuning.

Each model is built tiny from a config (no download), in float64, and
meta-trained for one outer step over 2 tasks of 2 SGD inner steps. The
meta-gradient of the summed query losses with respect to the initial weights
must equal a hand-written ``torch.func.functional_call`` unroll (math attention
kernel) to 1e-9 relative, parameter by parameter, in every mode:

* ``per-task``: one ``innerloop_ctx(..., copy_initial_weights=False)`` per task;
* ``checkpoint``: the same with ``checkpoint=True`` and steps taken as closures;
* ``batched``: ``num_tasks=2``, every input with a leading task dimension and
  one loss per task (strategy ``auto``: ``vmap``, or a loop over the tasks for
  convolutional networks on a CPU, and for forwards vmap cannot batch, which
  must say so: inputs with an attention mask, mixture-of-experts routing);
* ``batched-vmap`` (convolutional networks) and ``batched-loop`` (inputs with an
  attention mask): batched mode with that ``task_strategy`` forced.

MobileNetV3's ``nn.Hardsigmoid`` has no double backward in torch: higher runs
it as an exact twice-differentiable version, and the reference as torch's own
kernels with the second derivative added (``_KernelHardsigmoid``).

Losses are computed from the logits here (Hugging Face's ``.loss`` is a mean
over the whole batch, not one loss per task). Everything random in training
mode is off through the configs: every dropout probability, stochastic depth
(``drop_path_rate``: Swin and BEiT default to 0.1) and Mixtral's router noise
are 0. Models stay in training mode, so BatchNorm normalises with batch
statistics as in MAML. Images for the networks
with BatchNorm are 64x64: at 32x32 their last stage normalises 2 values per
channel, so ill-conditioned that two exact formulations of BatchNorm (torch's
kernel and the primitive ops batched mode runs under ``vmap``) give
meta-gradients 7e-3 apart on ResNet-18.

The transformers and peft rows need ``pip install transformers peft``; the timm
and torchvision rows need a torchvision built for the installed torch (see
README.md's development section). Rows whose package is absent are skipped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

import higher

LR, STEPS, TASKS = 0.1, 2, 2
TOLERANCE = 1e-9
MODES = ("per-task", "checkpoint", "batched")

Batch = tuple[dict[str, Tensor], Tensor]  # keyword inputs of the model, targets
Task = tuple[Batch, Batch]  # support, query


@pytest.fixture(autouse=True)
def _quiet_third_party():
    """transformers logs about the tiny configs (token ids outside the vocabulary)."""
    loggers = [logging.getLogger(name) for name in ("transformers", "peft", "timm")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # Deprecation notices between the third-party packages are not ours to fix.
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module="(transformers|peft|timm)")
        # peft's prefix tuning passes the argument that transformers renamed (attributed
        # to torch's module call, where the filter above does not reach).
        warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
        yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


# -- models -------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """A model built from a config and a sampler of its inputs."""

    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Batch]
    #: Relative tolerance of the batched modes, where it has to be looser (the
    #: reason is at the constant passed).
    batched_tolerance: float = TOLERANCE
    #: Modes tested besides MODES.
    extra_modes: tuple[str, ...] = ()
    #: The warning batched mode must give when vmap cannot batch the forward
    #: and the tasks run one after another (a regular expression), or None.
    falls_back: str | None = None


#: LlamaRMSNorm normalises in float32 whatever the model's dtype. Batched kernels
#: add in another order than per-task ones, and a one-ulp float64 difference then
#: now and then rounds to the neighbouring float32, a relative change of ~6e-8 that
#: the meta-gradient carries (1.7e-8 seen with LoRA; 1.6e-16 with that norm
#: computed in float64). A wrong meta-gradient is off by far more. DoRA on Llama:
#: 1.3e-8, and 1.7e-16 with the norm in float64. The other models with such a
#: norm (Mistral, Mixtral, Mamba, prefix tuning on Llama) meet 1e-9 as measured.
FLOAT32_NORM = 1e-6

#: transformers turns an ``attention_mask`` into the attention bias with Python
#: control flow on its values (``padding_mask.all()`` in masking_utils), which
#: ``torch.func.vmap`` cannot trace: batched mode then runs the tasks one after
#: another, and says so.
VMAP_FALLBACK = "vmap cannot batch this forward .*data-dependent control flow"

#: Mixture-of-experts layers gather each expert's tokens with ``nonzero``, whose
#: output shape depends on the routing: vmap cannot batch it, and batched mode
#: runs the tasks one after another, and says so.
MOE_FALLBACK = "vmap cannot batch this forward .*dynamic shape.*one after another"


def _tokens(g: torch.Generator, vocab: int = 64, batch: int = 2, seq: int = 8) -> Tensor:
    return torch.randint(vocab, (batch, seq), generator=g)


def _lm_batch(g: torch.Generator) -> Batch:
    return {"input_ids": _tokens(g)}, _tokens(g)


def _bert_batch(g: torch.Generator) -> Batch:
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # padding in the second sequence: the attention mask matters
    return {"input_ids": _tokens(g), "attention_mask": mask}, _tokens(g)


def _t5_batch(g: torch.Generator) -> Batch:
    return {"input_ids": _tokens(g), "decoder_input_ids": _tokens(g, seq=6)}, _tokens(g, seq=6)


def _image_batch(size: int) -> Callable[[torch.Generator], Batch]:
    def batch(g: torch.Generator) -> Batch:
        x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
        return {"x": x}, torch.randint(5, (2,), generator=g)

    return batch


def _pixel_batch(g: torch.Generator) -> Batch:
    inputs, y = _image_batch(16)(g)
    return {"pixel_values": inputs["x"]}, y


def gpt2(attn: str) -> nn.Module:
    tf = pytest.importorskip("transformers")
    config = tf.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation=attn,
    )
    return tf.GPT2LMHeadModel(config)  # lm_head is tied to the token embedding


def llama(attn: str) -> nn.Module:
    tf = pytest.importorskip("transformers")
    config = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=16,
        attn_implementation=attn,
    )
    return tf.LlamaForCausalLM(config)


def bert(attn: str) -> nn.Module:
    tf = pytest.importorskip("transformers")
    config = tf.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=attn,
    )
    return tf.BertForMaskedLM(config)


def t5(attn: str) -> nn.Module:
    tf = pytest.importorskip("transformers")
    config = tf.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        attn_implementation=attn,
    )
    return tf.T5ForConditionalGeneration(config)  # learned relative position bias


def vit(attn: str) -> nn.Module:
    tf = pytest.importorskip("transformers")
    config = tf.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=5,
        attn_implementation=attn,
    )
    return tf.ViTForImageClassification(config)


def mistral(attn: str) -> nn.Module:
    tf = pytest.importorskip("transformers")
    config = tf.MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        sliding_window=3,  # shorter than the 8 tokens: the window masks attention
        attn_implementation=attn,
    )
    return tf.MistralForCausalLM(config)


def mixtral() -> nn.Module:
    tf = pytest.importorskip("transformers")
    config = tf.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        num_local_experts=4,
        num_experts_per_tok=2,  # top-2 routing: each expert sees a data-dependent subset
        router_jitter_noise=0.0,  # the router's training-mode noise is random: off
        attn_implementation="sdpa",
        # The loop over the experts: the default, grouped_mm, has kernels for
        # float32 and bfloat16 only.
        experts_implementation="eager",
    )
    return tf.MixtralForCausalLM(config)


def mamba() -> nn.Module:
    tf = pytest.importorskip("transformers")
    config = tf.MambaConfig(
        vocab_size=64,
        hidden_size=16,
        state_size=4,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=3,
        time_step_rank=4,
        use_cache=False,
        use_mambapy=False,  # the sequential scan of the slow path (no CUDA kernels here)
    )
    return tf.MambaForCausalLM(config)


def swin() -> nn.Module:
    tf = pytest.importorskip("transformers")
    config = tf.SwinConfig(
        image_size=16,
        patch_size=2,
        num_channels=3,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=2,  # 8x8 patches: shifted windows and the relative position bias at work
        mlp_ratio=2.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,  # stochastic depth (0.1 by default), random in training mode: off
        num_labels=5,
    )
    return tf.SwinForImageClassification(config)


def beit() -> nn.Module:
    tf = pytest.importorskip("transformers")
    config = tf.BeitConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        use_relative_position_bias=True,  # a learned bias per layer
        use_mean_pooling=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,  # stochastic depth (0.1 by default), random in training mode: off
        num_labels=5,
    )
    return tf.BeitForImageClassification(config)


def lora(
    base: Callable[[], nn.Module], targets: list[str], **options: object
) -> Callable[[], nn.Module]:
    """``base`` wrapped by peft's LoRA: the base weights frozen, the adapters trainable.

    ``options`` go to ``LoraConfig`` (``use_dora=True``: DoRA, which also learns
    a magnitude per output feature).
    """

    def build() -> nn.Module:
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=targets,
            lora_dropout=0.0,
            init_lora_weights=False,  # B random, not zero: every adapter gets a gradient
            **options,
        )
        return peft.get_peft_model(base(), config)

    return build


def ia3() -> nn.Module:
    """BERT with peft's IA3: learned scalings of keys, values and feed-forward inputs."""
    peft = pytest.importorskip("peft")
    config = peft.IA3Config(
        target_modules=["key", "value", "output.dense"],
        feedforward_modules=["output.dense"],
        init_ia3_weights=False,  # random scalings, not ones
    )
    return peft.get_peft_model(bert("eager"), config)


def prefix_tuning() -> nn.Module:
    """Llama with peft's prefix tuning: learned keys and values before every sequence."""
    peft = pytest.importorskip("peft")
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    return peft.get_peft_model(llama("sdpa"), config)


def timm_model(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = pytest.importorskip("timm")
        if not timm.list_models(name):
            pytest.skip(f"timm {timm.__version__} has no model {name}")
        return timm.create_model(name, pretrained=False, num_classes=5, **kwargs)

    return build


def resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=5)


def mobilenet_v3_small() -> nn.Module:
    """Hardswish, and Hardsigmoid (no double backward in torch) in squeeze-and-excitation."""
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.mobilenet_v3_small(num_classes=5, dropout=0.0)


#: Inputs with an attention mask: batched mode falls back to the loop (VMAP_FALLBACK).
PADDED = ("batched-loop",)
#: Convolutional networks: batched mode loops over the tasks on a CPU; vmap tested too.
CONV = ("batched-vmap",)

MODELS: dict[str, Case] = {
    **{
        f"{name}-{attn}": Case(
            functools.partial(build, attn),
            batch,
            tolerance,
            extra,
            VMAP_FALLBACK if extra == PADDED else None,
        )
        for name, build, batch, tolerance, extra in (
            ("gpt2", gpt2, _lm_batch, TOLERANCE, ()),
            ("bert", bert, _bert_batch, TOLERANCE, PADDED),
            ("llama", llama, _lm_batch, FLOAT32_NORM, ()),
            ("t5", t5, _t5_batch, TOLERANCE, ()),
            ("vit", vit, _pixel_batch, TOLERANCE, ()),
            ("mistral", mistral, _lm_batch, TOLERANCE, ()),  # its RMSNorm too: 2e-16 measured
        )
        for attn in ("eager", "sdpa")
    },
    "peft-lora-llama": Case(
        lora(functools.partial(llama, "sdpa"), ["q_proj", "v_proj"]), _lm_batch, FLOAT32_NORM
    ),
    "peft-lora-bert": Case(
        lora(functools.partial(bert, "eager"), ["query", "value"]),
        _bert_batch,
        extra_modes=PADDED,
        falls_back=VMAP_FALLBACK,
    ),
    "peft-dora-llama": Case(
        lora(functools.partial(llama, "sdpa"), ["q_proj", "v_proj"], use_dora=True),
        _lm_batch,
        FLOAT32_NORM,
    ),
    "peft-ia3-bert": Case(ia3, _bert_batch, extra_modes=PADDED, falls_back=VMAP_FALLBACK),
    "peft-prefix-llama": Case(prefix_tuning, _lm_batch),  # 9e-17 measured
    "mamba": Case(mamba, _lm_batch),
    "mixtral": Case(mixtral, _lm_batch, falls_back=MOE_FALLBACK),
    "swin": Case(swin, _pixel_batch),
    "beit": Case(beit, _pixel_batch),
    "timm-eva": Case(
        timm_model(
            "eva02_tiny_patch14_224",
            img_size=16,
            patch_size=4,
            embed_dim=32,
            depth=2,
            num_heads=2,
            drop_path_rate=0.0,  # stochastic depth, random in training mode: off
        ),
        _image_batch(16),
    ),
    "timm-mobilenetv3": Case(
        timm_model("mobilenetv3_small_050", drop_path_rate=0.0),  # no stochastic depth
        _image_batch(64),
        extra_modes=CONV,
    ),
    "torchvision-mobilenetv3": Case(mobilenet_v3_small, _image_batch(64), extra_modes=CONV),
    "timm-vit": Case(
        timm_model(
            "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2
        ),
        _image_batch(16),
    ),
    "timm-convnext": Case(
        timm_model("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
        _image_batch(32),
        extra_modes=CONV,
    ),
    "timm-efficientnet": Case(
        timm_model("test_efficientnet"),  # timm's own tiny EfficientNet (100k parameters)
        _image_batch(64),
        extra_modes=CONV,
    ),
    "torchvision-resnet18": Case(resnet18, _image_batch(64), extra_modes=CONV),
}


@functools.cache
def model_and_tasks(name: str) -> tuple[nn.Module, list[Task]]:
    case = MODELS[name]
    torch.manual_seed(0)
    model = case.build().to(torch.float64).train()
    g = torch.Generator().manual_seed(1)
    tasks = [(case.batch(g), case.batch(g)) for _ in range(TASKS)]
    return model, tasks


# -- the meta-gradient, by hand and with higher -----------------------------------
def loss(out: object, target: Tensor, per_task: bool = False) -> Tensor:
    """Mean cross-entropy of the logits; one per task when ``per_task``."""
    logits = out if isinstance(out, Tensor) else out.logits  # type: ignore[attr-defined]
    flat = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none"
    )
    flat = flat.view(target.shape)
    return flat.flatten(1).mean(1) if per_task else flat.mean()


def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


class _KernelHardsigmoid(torch.autograd.Function):
    """``F.hardsigmoid`` as torch's kernels compute it, with the double backward torch lacks.

    The reference's own route to a second derivative, independent of the one
    higher gives ``nn.Hardsigmoid``: value and gradient are torch's kernels',
    and ``hardsigmoid_backward(grad, x)`` is linear in ``grad`` and piecewise
    constant in ``x``, so its derivatives are itself and zero.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.ops.aten.hardsigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _KernelHardsigmoidBackward.apply(grad, x)


class _KernelHardsigmoidBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, x):
        ctx.save_for_backward(x)
        return torch.ops.aten.hardsigmoid_backward(grad, x)

    @staticmethod
    def backward(ctx, grad_grad):
        (x,) = ctx.saved_tensors
        return _KernelHardsigmoidBackward.apply(grad_grad, x), None


class _TwiceDifferentiableHardsigmoid(TorchFunctionMode):
    """Runs ``F.hardsigmoid`` (MobileNetV3's squeeze-and-excitation) as ``_KernelHardsigmoid``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.hardsigmoid:
            inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
            assert not inplace, "the reference has no in-place hardsigmoid"
            return _KernelHardsigmoid.apply(args[0] if args else kwargs["input"])
        return func(*args, **kwargs)


def reference(model: nn.Module, tasks: list[Task]) -> list[Tensor]:
    """MAML written by hand with functional_call, on the math attention kernel."""
    meta = trainable(model)
    frozen = {k: p for k, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    total = torch.zeros((), dtype=torch.float64)
    hardsigmoid = any(isinstance(m, nn.Hardsigmoid) for m in model.modules())
    with (
        sdpa_kernel([SDPBackend.MATH]),  # the only kernel with a double backward
        _TwiceDifferentiableHardsigmoid() if hardsigmoid else contextlib.nullcontext(),
    ):
        for (xs, ys), (xq, yq) in tasks:
            own = {k: b.clone() for k, b in buffers.items()}  # each task its own statistics
            fast = dict(meta)
            for _ in range(STEPS):
                out = functional_call(model, ({**frozen, **fast}, own), (), xs)
                grads = torch.autograd.grad(loss(out, ys), list(fast.values()), create_graph=True)
                # torch.optim.SGD's step, p.add(g, alpha=-lr), rounding once as higher
                # does: LlamaRMSNorm's float32 round trip would magnify a one-ulp difference.
                fast = {k: torch.add(p, g, alpha=-LR) for (k, p), g in zip(fast.items(), grads)}
            total = total + loss(functional_call(model, ({**frozen, **fast}, own), (), xq), yq)
        return list(torch.autograd.grad(total, list(meta.values())))


def _stack(batches: list[Batch]) -> Batch:
    inputs = {k: torch.stack([b[0][k] for b in batches]) for k in batches[0][0]}
    return inputs, torch.stack([b[1] for b in batches])


def with_higher(model: nn.Module, tasks: list[Task], mode: str) -> list[Tensor | None]:
    """The meta-gradient (``.grad`` of every parameter) as higher computes it."""
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(list(trainable(model).values()), lr=LR)
    if mode.startswith("batched"):
        strategy = mode.removeprefix("batched").removeprefix("-") or "auto"
        (xs, ys), (xq, yq) = (_stack(list(b)) for b in zip(*tasks))
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, num_tasks=len(tasks)) as (
            fmodel,
            diffopt,
        ):
            fmodel.task_strategy = strategy
            for _ in range(STEPS):
                diffopt.step(loss(fmodel(**xs), ys, per_task=True))
            loss(fmodel(**xq), yq, per_task=True).sum().backward()
        return [p.grad for p in model.parameters()]
    for (xs, ys), (xq, yq) in tasks:
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=False, checkpoint=mode == "checkpoint"
        ) as (fmodel, diffopt):
            for _ in range(STEPS):
                if mode == "checkpoint":  # recomputed in the outer backward
                    diffopt.step(lambda xs=xs, ys=ys: loss(fmodel(**xs), ys))
                else:
                    diffopt.step(loss(fmodel(**xs), ys))
            loss(fmodel(**xq), yq).backward()
    return [p.grad for p in model.parameters()]


@functools.cache
def reference_of(name: str) -> tuple[Tensor, ...]:
    return tuple(reference(*model_and_tasks(name)))


def relative_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> tuple[float, str]:
    """The largest ``|got - want| / |want|`` over parameters, and its parameter.

    Gradients that vanish mathematically are rounding noise (BERT's key bias:
    softmax ignores a shift shared by all keys); a floor of 1e-6 of the largest
    gradient's norm keeps them from dividing by noise.
    """
    floor = 1e-6 * max(float(w.norm()) for w in want.values())
    errors = {k: float((got[k] - w).norm()) / max(float(w.norm()), floor) for k, w in want.items()}
    worst = max(errors, key=errors.__getitem__)
    return errors[worst], worst


def check(model: nn.Module, name: str, grads: list[Tensor | None], tolerance: float) -> None:
    want = dict(zip(trainable(model), reference_of(name)))
    got = dict(zip((k for k, _ in model.named_parameters()), grads))
    frozen = [k for k, p in model.named_parameters() if not p.requires_grad]
    assert all(got[k] is None for k in frozen), "a frozen weight got a gradient"
    missing = [k for k in want if got[k] is None]
    assert not missing, f"no meta-gradient for {missing}"
    error, worst = relative_error(got, want)  # type: ignore[arg-type]
    assert error <= tolerance, f"{name}: {worst} off by {error:.2e} (tolerance {tolerance:.0e})"


def _cases() -> list[object]:
    cases = []
    for name, case in MODELS.items():
        for mode in (*MODES, *case.extra_modes):
            cases.append(pytest.param(name, mode, id=f"{name}-{mode}"))
    return cases


@pytest.mark.parametrize("name, mode", _cases())
def test_meta_gradient_matches_functional_call(name: str, mode: str) -> None:
    model, tasks = model_and_tasks(name)
    batched = mode.startswith("batched")
    tolerance = MODELS[name].batched_tolerance if batched else TOLERANCE
    falls_back = MODELS[name].falls_back
    if mode == "batched" and falls_back is not None:
        with pytest.warns(UserWarning, match=falls_back):
            grads = with_higher(model, tasks, mode)
    else:
        grads = with_higher(model, tasks, mode)
    check(model, name, grads, tolerance)


#: In batched mode without a double backward (test mode, first-order) attention
#: still runs on the math kernel under vmap: the fused kernels have no batching
#: rule, and vmap would loop over the tasks with a "performance drop" warning.
@pytest.mark.parametrize(
    "setting",
    [{"track_higher_grads": False}, {"first_order": True}],
    ids=["test-mode", "first-order"],
)
def test_batched_attention_without_double_backward_stays_vectorised(setting):
    model, tasks = model_and_tasks("llama-sdpa")
    (xs, ys), _ = (_stack(list(b)) for b in zip(*tasks))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with higher.innerloop_ctx(
        model, opt, copy_initial_weights=False, num_tasks=TASKS, **setting
    ) as (fmodel, diffopt):
        assert fmodel.task_strategy == "vmap"
        diffopt.step(loss(fmodel(**xs), ys, per_task=True))
