"""Each public entry point works the first time a fresh process uses it, as it does warm.

A user's script starts cold: none of the state higher or torch sets up once per
process (the wrappers of attention and of ``torch.utils.checkpoint``, probes,
lazy initialisations) exists yet when its first inner loop runs. The rest of
the suite runs in a process that earlier tests have warmed up, and would not
see a first run that fails or differs. Here every case of
``cold_start_cases.py`` runs as the first thing a new Python process does with
higher (``innerloop_ctx`` per task, ``first_order``, ``checkpoint=True`` and
``checkpoint=k``, ``num_tasks``, ``higher.implicit``, DDP on two gloo ranks,
and models with attention, with ``torch.utils.checkpoint`` in their forward,
and with RNNs, per task and checkpointed), then again in the same process.

One process imports torch and higher (a second and a half) and forks one
child per case, all running at once: each child starts as a user's script is
after its imports, with nothing of higher's run yet, and costs a fraction of a
second instead of the import's second and a half (15 fresh interpreters would
take about 20 s on two cores). Each case is a small float32 model at
PyTorch's defaults. The cold run must equal the warm run bit for bit, and
equal the same case run in this (warm) test process: the same ops on the same
inputs on CPU, whose kernels are deterministic, give the same bits, so any
difference at all is state that depends on what ran before. DDP's averaged
meta-gradient equals the mean of the ranks' single-process ones bit for bit
too: DDP divides each rank's gradient by 2 (exact) before summing two values.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from cold_start_cases import CASES, DDP_WORLD, run_twice

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "cold_start_cases.py")
# Catches a hang, not a slow machine: the processes start at once, and on two busy
# cores their imports alone can take minutes.
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def cold(tmp_path_factory) -> dict[str, object]:
    """Runs every case, and DDP's two ranks, each in a new process, all at once.

    Returns ``{case: {"cold": ..., "warm": ...}}``, ``"ddp"`` holding a list of
    such dicts, one per rank.
    """
    tmp = tmp_path_factory.mktemp("cold")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, str(tmp)],
        env=env,
        cwd=str(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its forked children too, for killpg
    )
    try:
        log = proc.communicate(timeout=TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"cold-start processes still running after {TIMEOUT_S} s (a hang?)")
    assert proc.returncode == 0, f"a cold-start process failed:\n{log}"
    out: dict[str, object] = {name: torch.load(tmp / f"{name}.pt") for name in CASES}
    out["ddp"] = [torch.load(tmp / f"ddp{r}.pt") for r in range(DDP_WORLD)]
    return out


def _assert_ran(runs: dict[str, object], what: str) -> None:
    for when in ("cold", "warm"):
        assert not isinstance(runs[when], str), f"{what}: the {when} run raised:\n{runs[when]}"


def assert_bitwise(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k in want:
        assert got[k] is not None and want[k] is not None, f"{what}: no {k}"
        torch.testing.assert_close(
            got[k], want[k], rtol=0, atol=0, msg=lambda m, k=k: f"{what}, {k}: {m}"
        )


@pytest.mark.parametrize("name", list(CASES))
def test_first_run_in_a_fresh_process(cold, name):
    runs = cold[name]
    _assert_ran(runs, name)
    assert_bitwise(runs["cold"], runs["warm"], f"{name}: cold run against warm run")
    here = run_twice(CASES[name])
    _assert_ran(here, f"{name} in the test process")
    assert_bitwise(runs["cold"], here["warm"], f"{name}: fresh process against the test process")


def test_ddp_first_meta_iteration(cold):
    from cold_start_cases import _maml, mlp, sine

    ranks = cold["ddp"]
    for r, runs in enumerate(ranks):
        _assert_ran(runs, f"ddp rank {r}")
        assert_bitwise(runs["cold"], runs["warm"], f"ddp rank {r}: cold run against warm run")

    # The same tasks without DDP, one process: DDP's gradient is their mean.
    def single(rank):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return _maml(model, opt, [sine(seed=10 + rank), sine(seed=20 + rank)])

    local = [run_twice(lambda r=r: single(r))["warm"] for r in range(DDP_WORLD)]
    mean = {f"module.{k}": (local[0][k] + local[1][k]) / 2 for k in local[0] if k != "query"}
    for r, runs in enumerate(ranks):
        got = dict(runs["cold"])
        assert_bitwise({"query": got.pop("query")}, {"query": local[r]["query"]}, f"rank {r}")
        assert_bitwise(got, mean, f"ddp rank {r} against the mean of single-process gradients")
