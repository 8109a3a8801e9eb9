"""Multi-process tests: launching ranks from pytest, and the rank side of a launch.

A test runs ``python SCRIPT RANK WORLD RENDEZVOUS OUT_DIR *args`` on every rank
(gloo on CPU, meeting through a rendezvous file in ``tmp_path``, one thread per
rank); the script's ``main`` calls :func:`run_rank`, which saves what each rank
computed to ``OUT_DIR/rank{RANK}.pt`` for the test to compare. A timeout turns
a hang into a failure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def launch(script: str, args: list[str], tmp_path, world: int, timeout_s: float) -> list[dict]:
    """Runs ``script`` on ``world`` ranks; returns what each rank saved."""
    import subprocess

    rendezvous = tmp_path / "rdv"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(r), str(world), str(rendezvous), str(tmp_path), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a run on {world} ranks timed out after {timeout_s} s (a hang?)")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} of {world} failed:\n{log}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def run_rank(argv: list[str], run: Callable[[int, int, str], dict[str, Any]]) -> None:
    """The rank side: joins the group, saves ``run(rank, world, out_dir)``, leaves the group."""
    import torch.distributed as dist

    rank, world, rendezvous, out_dir = int(argv[0]), int(argv[1]), argv[2], argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        result = run(rank, world, out_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, f"{out_dir}/rank{rank}.pt")
