"""Meta-gradients through a ``fully_shard``'ed (FSDP2) model equal the one-process ones.

Two and four processes (gloo, CPU) each run every case of ``fsdp_cases.py`` in
one launch, meeting through a rendezvous file in ``tmp_path``; a timeout turns
a hang into a failure. Each case's meta-gradient (the full tensor of the
sharded parameters' DTensor ``.grad``) on every rank must equal the
one-process unsharded meta-gradient of the mean of the ranks' losses (float64,
1e-9), with activation checkpointing inside the model and on HSDP meshes too,
and with higher.attention's block-wise kernel forced on the ranks;
with a bfloat16 MixedPrecisionPolicy, to float32 rounding against a one-process
reference applying FSDP2's casts and within bfloat16 error bounds of the float64
truth. Also checked: the ranks issue the same collectives, and gathered
weights do not outlive their use. Configurations that cannot work are refused
when the model is patched, naming the alternative (in this process where one
rank suffices).
"""

from __future__ import annotations

import os
import re
import warnings

import launch_ranks
import pytest
import torch
from torch import nn

import higher

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)

HERE = os.path.dirname(os.path.abspath(__file__))
# A hang guard: a 4-rank launch takes about 2.5 minutes on 2 busy cores.
TIMEOUT_S = 480
TOL = 1e-9


def launch(world: int, tmp_path) -> list[dict]:
    """Runs ``fsdp_cases.py`` on ``world`` ranks; returns what each rank saved."""
    return launch_ranks.launch(os.path.join(HERE, "fsdp_cases.py"), [], tmp_path, world, TIMEOUT_S)


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def ranks(request, tmp_path_factory):
    import fsdp_cases  # noqa: F401  (fail here, not in the subprocesses, on import errors)

    world = request.param
    return world, launch(world, tmp_path_factory.mktemp(f"fsdp{world}"))


def _models_available() -> bool:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def references():
    """One-process unsharded runs, by (case, world), computed once."""
    import fsdp_cases

    cache: dict = {}

    def get(name: str, world: int, truth: bool = False) -> dict:
        if (name, world, truth) not in cache:
            with warnings.catch_warnings():
                # Deprecation notices between the third-party packages are not ours to fix.
                for category in (DeprecationWarning, FutureWarning):
                    warnings.filterwarnings(
                        "ignore", category=category, module="(transformers|peft)"
                    )
                cache[name, world, truth] = fsdp_cases.run_case(name, world, None, truth=truth)
        return cache[name, world, truth]

    return get


def _close(got, expected, what: str) -> None:
    assert len(got) == len(expected), what
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g is not None, f"{what}: no gradient for tensor {i}"
        torch.testing.assert_close(g, e, rtol=TOL, atol=TOL, msg=f"{what}: tensor {i}")


MLP_CASES = [
    "mlp-sgd",
    "mlp-adam",
    "mlp-first-order",
    "mlp-checkpoint",
    "mlp-checkpoint-adam",
    "mlp-meta-sgd",
    "mlp-meta-sgd-dtensor",
    "mlp-unused-adam",
    "mlp-ac-wrapper",
    "mlp-ac-wrapper-checkpoint",
    "mlp-ac-custom",
    "mlp-ac-custom-checkpoint",
    "mlp-hsdp",
    "mlp-hsdp-adam-checkpoint-ac",
    "mlp-reshard-int",
    "mlp-root-only-eval",
    "mlp-eval-grad",
    "mlp-reshard-int-eval",
    "heads-weighted",
]
MODEL_CASES = [
    "llama-eager",
    "llama-sdpa",
    "lora",
    "lora-adam-checkpoint",
    "llama-ac-gc",
    "llama-ac-gc-reentrant-checkpoint",
    "llama-ac-wrapper-checkpoint",
    "llama-hsdp",
    "llama-sdpa-blockwise",
]


def _check_case(name: str, ranks, references) -> None:
    world, outs = ranks
    expected = references(name, world)
    for r, out in enumerate(outs):
        got = out[name]
        _close(got["grads"], expected["grads"], f"{name}, rank {r} of {world}: meta-gradient")
        if expected["lr_grads"] is not None:
            _close(got["lr_grads"], expected["lr_grads"], f"{name}, rank {r}: learned lr")
        _close(got["written"], expected["written"], f"{name}, rank {r}: write_back")


# -- mixed precision ------------------------------------------------------------------------
MP_CASES = ["mlp-bf16", "mlp-bf16-out-adam", "mlp-hsdp-bf16"]
MP_MODEL_CASES = ["llama-bf16-ac"]
EPS_BF16 = torch.finfo(torch.bfloat16).eps
#: float32 master weights and reductions: the reference runs the same float32 and
#: bfloat16 operations in the same order, up to the order of the ranks' float32 sum.
MP_RTOL, MP_ATOL = 1e-6, 1e-7


def _check_mixed_precision(name: str, ranks, references) -> None:
    """Against the one-process reference that applies FSDP2's casts (float32 master
    weights cast to bfloat16 per unit call, float32 gradients), to float32 rounding; and
    against the float64 truth without casts, within the bfloat16 error scale: per tensor,
    ``||got - truth|| <= C * max(||ref - truth||, eps_bf16 * ||truth||)`` with ``C = 4``
    (the reasoning of test_float32_matrix.py, with bfloat16's epsilon)."""
    world, outs = ranks
    expected = references(name, world)
    truth = references(name, world, truth=True)
    for r, out in enumerate(outs):
        got = out[name]
        for key in ("grads", "written"):
            for i, (g, e, t) in enumerate(zip(got[key], expected[key], truth[key])):
                what = f"{name}, rank {r} of {world}: {key} {i}"
                assert g is not None and g.dtype == torch.float32, what
                torch.testing.assert_close(g, e, rtol=MP_RTOL, atol=MP_ATOL, msg=what)
                t = t.double()
                scale = max((e.double() - t).norm().item(), EPS_BF16 * t.norm().item())
                err = (g.double() - t).norm().item()
                assert err <= 4 * scale, f"{what}: {err:.3g} > 4 * {scale:.3g}"


@pytest.mark.parametrize("name", MP_CASES)
def test_mixed_precision(name, ranks, references):
    _check_mixed_precision(name, ranks, references)


@pytest.mark.skipif(not _models_available(), reason="transformers and peft are needed")
@pytest.mark.parametrize("name", MP_MODEL_CASES)
def test_mixed_precision_transformers(name, ranks, references):
    _check_mixed_precision(name, ranks, references)


@pytest.mark.parametrize("name", MLP_CASES)
def test_mlp(name, ranks, references):
    _check_case(name, ranks, references)


@pytest.mark.skipif(not _models_available(), reason="transformers and peft are needed")
@pytest.mark.parametrize("name", MODEL_CASES)
def test_transformers(name, ranks, references):
    _check_case(name, ranks, references)


@pytest.mark.skipif(not _models_available(), reason="transformers and peft are needed")
def test_blockwise_attention_ran_on_the_ranks(ranks):
    """``llama-sdpa-blockwise`` (checked against the math kernel's one-process run by
    test_transformers) went through higher.attention's block-wise kernel."""
    world, outs = ranks
    for r, out in enumerate(outs):
        calls = out["llama-sdpa-blockwise"]["attention_calls"]
        # 2 layers x (the inner step's forward + the query forward).
        assert calls == 2 * 2, f"rank {r} of {world}: {calls} block-wise calls, not 4"
        assert out["llama-sdpa"]["attention_calls"] == 0  # the default stays on the math kernel


def test_ranks_issue_the_same_collectives(ranks):
    world, outs = ranks
    first = outs[0]["collectives"]
    assert first, "no collective recorded"
    for r, out in enumerate(outs[1:], 1):
        assert out["collectives"] == first, f"rank {r} of {world} issued other collectives"


def test_one_collective_per_unit(ranks):
    """A unit's forward gathers all its parameters in one all-gather; a backward
    reduce-scatters their gradients in one collective, and gathers the weights that
    its nodes saved once per unit, not once per saved tensor; a recomputation gathers
    each unit it needs once."""
    _, outs = ranks
    for out in outs:
        counts = out["per_unit"]
        units = counts["units"]
        forward, backward = counts["forward"], counts["backward"]
        assert forward == {"c10d._allgather_base_.default": units}, counts
        assert backward["c10d._reduce_scatter_base_.default"] == units, counts
        assert backward["c10d._allgather_base_.default"] <= units, counts
        # Each layer activation-checkpointed: a layer's recomputation gathers the layer
        # and the root (gathered when the layer first ran) once each; the root's own
        # saved weights once more.
        counts = out["per_unit_ac"]
        forward, backward = counts["forward"], counts["backward"]
        assert forward == {"c10d._allgather_base_.default": units}, counts
        assert backward["c10d._reduce_scatter_base_.default"] == units, counts
        assert backward["c10d._allgather_base_.default"] == 2 * (units - 1) + 1, counts


def test_gathered_weights_live_one_unit_at_a_time(ranks):
    """At every gather in the inner steps and the outer backward, the gathered
    tensors alive are those of at most one layer unit, besides the root unit's
    (gathered through the root's whole forward, as in FSDP2) and, in a
    backward, one full-size gradient of that unit on its way to the
    reduce-scatter: never the whole model's. The same holds with each layer
    activation-checkpointed (``checkpoint_wrapper``): a recomputation gathers its
    layer (and the root) again and lets them go as a forward does."""
    _, outs = ranks
    for r, out in enumerate(outs):
        for key in ("memory", "memory_ac"):
            mem = out[key]
            bound = 2 * max(mem["unit_bytes"]) + mem["root_bytes"]
            assert sum(mem["unit_bytes"]) > bound  # the test can tell one unit from all of them
            for phase in ("inner", "outer"):
                assert mem["peak"][phase] <= bound, (r, key, phase, mem)
            assert mem["left"] == 0, f"{key}: gathered weights left alive after the outer backward"
        # Recomputing a layer gathers it, and the root, once: each inner step's backward
        # recomputes the five layers.
        extra = out["memory_ac"]["gathers"]["inner"] - out["memory"]["gathers"]["inner"]
        assert 0 < extra <= 3 * 5 * 2, out["memory_ac"]["gathers"]


def test_multi_rank_configurations_are_refused(ranks):
    world, outs = ranks
    if world != 4:
        pytest.skip("needs 4 ranks")
    for out in outs:
        errors = out["errors"]
        assert re.search(
            r"'layers.1'.*'weight'.*tensor\s+parallel.*fully_shard\s+alone",
            errors["tensor_parallel"],
        )


@pytest.mark.parametrize("policy", ["bf16", "fp16", "fp16-reduce"])
def test_no_inner_step_matches_fsdp2_backward(policy, ranks):
    """With no inner step, the outer gradient through higher is FSDP2's own gradient of
    the same sharded model, bit for bit: FSDP2's default reduce_dtype (the param_dtype,
    bfloat16 or float16) and a float16 reduce_dtype, where FSDP2 divides before and
    after the sum. The float16 loss is scaled so that the ranks' gradients, summed
    before dividing, would overflow."""
    world, outs = ranks
    for r, out in enumerate(outs):
        got = out["parity"][policy]
        assert len(got["higher"]) == len(got["fsdp2"]) == 12
        for i, (g, e) in enumerate(zip(got["higher"], got["fsdp2"])):
            what = f"{policy}, rank {r} of {world}: gradient {i}"
            assert g is not None and e is not None and g.dtype == torch.float32, what
            assert torch.isfinite(e).all(), what
            assert torch.equal(g, e), f"{what}: {(g - e).abs().max().item():.3g} off"
        if policy == "fp16-reduce":  # every rank has the same batch: the mean is each one's
            largest = max(g.abs().max().item() for g in got["fsdp2"])
            assert largest * world > torch.finfo(torch.float16).max


def test_ranks_using_different_units_are_refused(ranks):
    """Rank r's loss uses output head r % 2 only, in the inner steps or in the outer loss
    only: every rank raises at the first collective of that backward, naming both
    heads and the remedy (``heads-weighted``, checked by test_mlp, is the remedy), and
    the ranks stay in step (later runs on the same process group)."""
    world, outs = ranks
    for r, out in enumerate(outs):
        for where in ("inner", "outer"):
            error = out["mismatched_units"][where]
            mine, other = r % 2, 1 - r % 2
            assert re.search(
                rf"backward passes differ.*this rank is at an all-gather for unit "
                rf"'heads\.{mine}' and another rank at an all-gather for unit "
                rf"'heads\.{other}'.*weight each output's loss by 1 or 0",
                error,
                re.S,
            ), (r, world, where, error)
        # A rank with fewer collectives: wherever the ranks part, all of them raise.
        error = out["mismatched_units"]["fewer"]
        assert re.search(r"backward passes differ.*weight each output's loss", error, re.S), (
            r,
            world,
            error,
        )


# -- refused configurations, one rank ----------------------------------------------------
@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    assert not dist.is_initialized()
    store = tmp_path_factory.mktemp("fsdp1") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _sharded(mesh, **kwargs):
    from fsdp_cases import build, shard

    return shard(build("mlp"), mesh, **kwargs)


def test_fsdp1_is_refused_naming_fully_shard():
    class FullyShardedDataParallel(nn.Module):  # matched by name: no process group needed
        pass

    with pytest.raises(TypeError, match=r"FSDP\) is not supported.*fully_shard"):
        higher.monkeypatch(FullyShardedDataParallel())


def test_batched_mode_is_refused(one_rank):
    model = _sharded(one_rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(ValueError, match=r"num_tasks.*not supported.*per-task mode"),
        higher.innerloop_ctx(model, opt, copy_initial_weights=False, num_tasks=2),
    ):
        pass


def test_non_shard0_placement_is_refused(one_rank):
    from torch.distributed.tensor import Shard

    model = _sharded(one_rank, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)
    with pytest.raises(ValueError, match=r"Shard\(dim=1\).*only\s+Shard\(0\).*shard_placement_fn"):
        higher.monkeypatch(model, copy_initial_weights=False)


def test_mixed_precision_keeps_master_shards(one_rank):
    """The fast weights stay in the parameters' dtype (the master copy); a unit computes
    in param_dtype, and its gradients come back in the parameters' dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.float32)
    root = MixedPrecisionPolicy(param_dtype=torch.float32, output_dtype=torch.float16)
    model = _sharded(one_rank, mp_policy=policy, root={"mp_policy": root})
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    assert all(p.dtype == torch.float64 for p in fmodel.fast_params)
    out = fmodel(torch.randn(4, 3, dtype=torch.float64))
    assert out.dtype == torch.float16
    grads = torch.autograd.grad(out.float().sum(), fmodel.fast_params)
    assert all(g.dtype == torch.float64 for g in grads)


def test_cpu_offload_is_refused(one_rank):
    from torch.distributed.fsdp import CPUOffloadPolicy

    model = _sharded(one_rank, offload_policy=CPUOffloadPolicy(pin_memory=False))
    with pytest.raises(ValueError, match=r"CPUOffloadPolicy.*OffloadPolicy\(\)"):
        higher.monkeypatch(model, copy_initial_weights=False)


def test_unsharded_root_is_refused(one_rank):
    from fsdp_cases import build
    from torch.distributed.fsdp import fully_shard

    model = build("mlp")
    for unit in model.units():
        fully_shard(unit, mesh=one_rank)
    with pytest.raises(ValueError, match=r"'layers.2.weight'.*not managed.*root module"):
        higher.monkeypatch(model, copy_initial_weights=False)


def test_make_functional_is_refused(one_rank):
    with pytest.raises(TypeError, match=r"only be patched by higher.monkeypatch"):
        higher.make_functional(_sharded(one_rank))


def test_patching_leaves_the_model_as_it_was(one_rank):
    """FSDP2's own forward still runs on the model; the copy has the user's classes."""
    from fsdp_cases import MLP

    model = _sharded(one_rank)
    before = [dict(m._forward_pre_hooks) for m in model.modules()]
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    assert [dict(m._forward_pre_hooks) for m in model.modules()] == before
    assert isinstance(fmodel, MLP) and not higher.fsdp.is_fully_sharded(fmodel)
    assert type(fmodel.layers[0]) is nn.Linear
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(fmodel(x), model(x))
    # Outside a forward the slots hold the shards (one rank: the whole tensors).
    assert not higher.fsdp._compat.is_dtensor(fmodel.layers[0].weight)


def test_patched_after_an_ordinary_forward(one_rank):
    """A forward of the sharded model (an evaluation pass) leaves its root unit gathered;
    patching, reset and write_back reshard it first, and see its shards."""
    from fsdp_cases import build
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(build("mlp"), mesh=one_rank)
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    assert not higher.fsdp._compat.is_dtensor(model.layers[0].weight)  # left gathered
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    assert higher.fsdp._compat.is_dtensor(model.layers[0].weight)
    torch.testing.assert_close(fmodel(x), expected, rtol=0, atol=0)
    new = [torch.full_like(p, 0.5) for p in fmodel.fast_params]
    fmodel.update_params(new)
    model(x).sum().backward()  # an ordinary training step leaves the root gathered too
    fmodel.write_back(model)
    assert all((p.to_local() == 0.5).all() for p in model.parameters())
    with torch.no_grad():
        model(x)
    fmodel.reset(model)
    assert all((p == 0.5).all() for p in fmodel.fast_params)


def test_patching_inside_fsdp2_forward_is_refused(one_rank):
    """Inside FSDP2's own forward the root unit is gathered and running: refused, naming
    what is happening."""
    model = _sharded(one_rank)
    errors = []

    def patch_now(module, args):
        with pytest.raises(ValueError, match=r"root fully_shard unit.*middle of its own forward"):
            higher.monkeypatch(module, copy_initial_weights=False)
        errors.append(True)

    handle = model.register_forward_pre_hook(patch_now)
    with torch.no_grad():
        model(torch.randn(4, 3, dtype=torch.float64))
    handle.remove()
    assert errors == [True]


def test_gradient_divide_factor_is_refused(one_rank):
    model = _sharded(one_rank)
    model.set_gradient_divide_factor(4.0)
    with pytest.raises(ValueError, match=r"divides its gradients by 4.0.*leave the"):
        higher.monkeypatch(model, copy_initial_weights=False)


def test_agreement_check_runs_off_the_device_where_the_group_can():
    """The ranks' agreement check reads its result on the host: it uses the CPU when
    every group it runs on has a CPU backend, so it never waits for the GPU's queue."""
    from higher._compat.fsdp import check_device

    class Group:
        def __init__(self, *types):
            self._device_types = [torch.device(t) for t in types]

    cuda = torch.device("cuda", 0)
    both, nccl = Group("cpu", "cuda"), Group("cuda")
    assert check_device(cuda, both) == torch.device("cpu")
    assert check_device(cuda, both, both) == torch.device("cpu")
    assert check_device(cuda, nccl) == cuda
    assert check_device(cuda, both, nccl) == cuda  # HSDP: both groups must have it
    assert check_device(cuda, object()) == cuda  # a group that does not say
