"""Meta-gradients under DistributedDataParallel equal the single-process ones.

Two processes (gloo, CPU) run every case of ``distributed_cases.py`` in one
launch, meeting through a rendezvous file in ``tmp_path``; a timeout turns a
hang into a failure. Each case's meta-gradient on every rank must equal the
single-process meta-gradient of the global meta-batch (float64, 1e-9). The
collectives each rank issues are recorded and compared with those of plain DDP
training: ranks with different numbers of tasks and inner steps must issue the
same ones, and a configuration that would make them differ must raise.
"""

from __future__ import annotations

import os

import launch_ranks
import pytest
import torch
from torch import nn

import higher

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
TIMEOUT_S = 900  # catches a hang; a loaded machine can take minutes


def launch(script: str, args: list[str], tmp_path, world: int = WORLD) -> list[dict]:
    return launch_ranks.launch(script, args, tmp_path, world, TIMEOUT_S)


def assert_grads(got, expected, what: str) -> None:
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g is not None, f"{what}: no gradient for parameter {i}"
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=f"{what}: parameter {i}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import distributed_cases  # noqa: F401  (fail here, not in the subprocess, on import errors)

    tmp = tmp_path_factory.mktemp("ddp")
    out = launch(os.path.join(HERE, "distributed_cases.py"), [], tmp)
    assert (tmp / "sin-maml.png").exists()  # rank 0 of the example plotted
    return out


def test_one_task_per_rank(ranks):
    from distributed_cases import make_net, reference_grads

    expected = reference_grads(make_net(), WORLD)
    for r, out in enumerate(ranks):
        assert_grads(out["one_task"], expected, f"rank {r}")


def test_several_tasks_per_rank_with_no_sync(ranks):
    from distributed_cases import make_net, reference_grads

    expected = reference_grads(make_net(), WORLD * 3)
    for r, out in enumerate(ranks):
        assert_grads(out["no_sync"], expected, f"rank {r}")


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_batched_tasks_per_rank(ranks, strategy):
    from distributed_cases import make_net, reference_grads

    expected = reference_grads(make_net(), WORLD * 3)
    for r, out in enumerate(ranks):
        got = out[f"batched_{strategy}"]
        assert_grads(got["grads"], expected, f"{strategy}, rank {r}")
        # No all-reduce in the inner loop; the outer backward all-reduces DDP's one bucket.
        assert got["inner"] == 0 and got["outer"] == 1


def test_inner_loop_does_not_communicate(ranks):
    for out in ranks:
        for it, counts in enumerate(out["counts"]):
            assert counts["inner"] == 0, f"iteration {it}: all-reduce in the inner loop"
            assert counts["no_sync"] == 0, f"iteration {it}: all-reduce under no_sync"
            # One all-reduce per bucket, each bucket once, in the outer backward.
            buckets = counts["outer"]
            assert sorted(buckets) == list(range(len(buckets))) and counts["last"] == 1
        # DDP starts with one large bucket and rebuilds small ones after iteration 1.
        assert len(out["counts"][1]["outer"]) > 1
        assert out["copied"]["calls"] == 0


def test_find_unused_parameters(ranks):
    from distributed_cases import make_net, reference_grads

    expected = reference_grads(make_net(spare=True), WORLD)
    for r, out in enumerate(ranks):
        *used, spare_w, spare_b = out["unused"]
        assert_grads(used, expected[:-2], f"rank {r}")
        # DDP leaves the gradients of parameters unused on every rank untouched.
        assert spare_w is None and spare_b is None


def test_first_order(ranks):
    from distributed_cases import make_net, reference_grads

    expected = reference_grads(make_net(), WORLD, first_order=True)
    for r, out in enumerate(ranks):
        assert_grads(out["first_order"], expected, f"rank {r}")


def test_make_functional(ranks):
    from distributed_cases import make_net, reference_grads

    expected = reference_grads(make_net(), WORLD)
    for r, out in enumerate(ranks):
        assert_grads(out["make_functional"], expected, f"rank {r}")


def test_reset_onto_ddp_parameters_arms_a_local_copy(ranks):
    from distributed_cases import make_net, reference_grads

    expected = reference_grads(make_net(), WORLD)
    for r, out in enumerate(ranks):
        assert_grads(out["reset"], expected, f"rank {r}")


def test_copy_initial_weights_is_a_local_copy(ranks):
    for out in ranks:
        assert all(g is None for g in out["copied"]["grads"])


def test_data_parallel_is_refused():
    with pytest.raises(
        TypeError, match=r"nn\.DataParallel is not supported.*DistributedDataParallel"
    ):
        higher.monkeypatch(nn.DataParallel(nn.Linear(2, 1)))


def test_fsdp_is_refused():
    # Matched by class name, so a stand-in needs no process group.
    class FullyShardedDataParallel(nn.Module):
        pass

    with pytest.raises(TypeError, match=r"FSDP\) is not supported.*DistributedDataParallel"):
        higher.monkeypatch(FullyShardedDataParallel())


def test_buffers_broadcast_once_and_write_back(ranks):
    for out in ranks:
        buffers = out["buffers"]
        # Rank 0's running mean (all ones) reached every rank's patched copy.
        torch.testing.assert_close(buffers["patched"], torch.ones(2, dtype=torch.float64))
        assert not torch.equal(buffers["fmodel"], buffers["patched"])  # updated in train mode
        torch.testing.assert_close(buffers["written"], buffers["fmodel"])


def _assert_same_run(single: dict, ranks: list[dict], what: str, tol: float = 1e-9) -> None:
    # Not for models with a bias before a BatchNorm (the few-shot conv net): the
    # exact gradient there is 0, and Adam turns rounding noise into whole steps.
    for r, out in enumerate(ranks):
        for i, (a, b) in enumerate(zip(out["weights"], single["weights"])):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"{what}, rank {r}: {i}")
    assert ranks[0]["curve"] == pytest.approx(single["curve"], rel=tol)


@pytest.mark.parametrize("algorithm", ["maml", "meta-sgd"])
def test_sinusoid_example_on_two_ranks_equals_one(ranks, algorithm, tmp_path, capsys):
    """The meta-batch of 5 tasks split 3 + 2 gives the single-process weights."""
    import distributed_examples

    single = distributed_examples.run(str(tmp_path), [algorithm], plot=False)[algorithm]
    _assert_same_run(single, [out["examples"][algorithm] for out in ranks], algorithm)


def _ops(entries: list) -> list:
    return sorted((op, shapes) for _, op, shapes in entries)


def test_uneven_tasks_and_inner_steps(ranks):
    """Tasks split 3 + 2, 1 to 3 inner steps each, BatchNorm buffers: no hang, exact."""
    from distributed_cases import UNEVEN_STEPS, UNEVEN_TASKS, make_net, reference_grads

    expected = reference_grads(make_net(bn=True), UNEVEN_TASKS, steps=UNEVEN_STEPS)
    for r, out in enumerate(ranks):
        for it, grads in enumerate(out["uneven"]["grads"]):
            assert_grads(grads, expected, f"rank {r}, iteration {it}")


def test_a_meta_iteration_communicates_as_one_plain_ddp_iteration(ranks):
    """Whatever the tasks and inner steps per rank, each meta-iteration issues the
    collectives of one plain DDP forward and backward, identical on every rank."""
    ours = [out["uneven"]["collectives"] for out in ranks]
    plain = [out["uneven"]["plain"] for out in ranks]
    for it in range(len(ours[0])):
        assert ours[0][it] == ours[1][it], f"iteration {it}: the ranks' collectives differ"
        for r in range(WORLD):
            assert _ops(ours[r][it]) == _ops(plain[r][it]), f"rank {r}, iteration {it}"
            # Not even DDP's one-time bucket rebuild (which plain DDP issues in the
            # first forward of iteration 1): it waits for the synced backward.
            inner = [e for e in ours[r][it] if e[0] in ("inner", "query")]
            assert not inner, f"rank {r}, iteration {it}: collectives in the inner loop"


def test_find_unused_parameters_cost_does_not_grow_with_the_unroll(ranks):
    from distributed_cases import INNER_STEPS, LONG_UNROLL, make_net, reference_grads

    for r, out in enumerate(ranks):
        runs = out["long_unroll"]
        for steps, run in runs.items():
            expected = reference_grads(make_net(spare=True), WORLD, steps=[steps] * WORLD)
            *used, spare_w, spare_b = run["grads"]
            assert_grads(used, expected[:-2], f"rank {r}, {steps} steps")
            assert spare_w is None and spare_b is None
            # The reducer is armed once, for the outer backward, and its search for
            # unused parameters visits one node per used parameter.
            assert run["prepares"] == 1, f"rank {r}, {steps} steps"
            assert run["walked"] == len(used), f"rank {r}, {steps} steps"
        assert runs[LONG_UNROLL]["walked"] == runs[INNER_STEPS]["walked"]


def test_checkpointed_unroll(ranks):
    """The outer backward replays patched forwards; they do no DDP bookkeeping."""
    from distributed_cases import make_net, reference_grads

    for r, out in enumerate(ranks):
        assert_grads(out["checkpoint"][False], reference_grads(make_net(), WORLD), f"rank {r}")
        expected = reference_grads(make_net(spare=True), WORLD)
        *used, spare_w, spare_b = out["checkpoint"][True]
        assert_grads(used, expected[:-2], f"rank {r}, find_unused_parameters")
        assert spare_w is None and spare_b is None


UNUSED = (
    r"DistributedDataParallel: this backward reaches no gradient for parameter\(s\) "
    r"'spare.weight', 'spare.bias' on this rank.*find_unused_parameters=True"
)


def test_unused_parameter_without_find_unused_parameters_raises(ranks):
    import re

    for r, out in enumerate(ranks):
        assert re.search(UNUSED, out["unused_everywhere"]), f"rank {r}"


def test_ranks_that_would_all_reduce_differently_fail_instead_of_hanging(ranks):
    """Only rank 1 uses a parameter: rank 0 raises before communicating and leaves,
    and rank 1's all-reduce fails (under gloo; NCCL's watchdog or torchrun ends it)."""
    import re

    assert re.search(UNUSED, ranks[0]["mismatch"])
    assert ranks[1]["mismatch"], "rank 1's all-reduce returned"
