"""The benchmark harness works (correctness only: no timing is asserted)."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from benchmarks import run as bench
from benchmarks.workloads import WORKLOADS, HandwrittenImpl, HigherImpl


def test_smoke_run_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert (
        bench.main(
            [
                "--smoke",
                "--workloads",
                "W1-sgd1,W1-adam5,W4",
                "--repeats",
                "1",
                "--no-memory",
                "--device",
                "cpu",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    report = json.loads(path.read_text())
    names = {(r["workload"], r["impl"]) for r in report["results"]}
    assert {("W1-sgd1", "higher"), ("W1-sgd1", "handwritten"), ("W4-lstm", "higher")} <= names
    assert all(r["rel_grad_error"] < 1e-4 and r["median_s"] > 0 for r in report["results"])
    assert "| workload | implementation |" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["W1-fo5", "W2-conv", "W3-unroll10"])
def test_higher_and_handwritten_agree(name):
    w = WORKLOADS[name]
    torch.manual_seed(0)
    base = w.make_model()
    impls = [HigherImpl(w, base), HandwrittenImpl(w, copy.deepcopy(base))]
    errors = bench.check_agreement(impls, w.make_tasks(torch.device("cpu"))[:2])
    assert errors["higher"] < 1e-5


def test_disagreeing_higher_is_refused():
    w = WORKLOADS["W1-sgd1"]
    base = w.make_model()

    class Wrong(HigherImpl):
        name = "higher"

        def meta_backward(self, tasks):
            super().meta_backward(tasks)
            for p in self.model.parameters():
                p.grad.mul_(1.01)

    impls = [Wrong(w, base), HandwrittenImpl(w, copy.deepcopy(base))]
    with pytest.raises(
        RuntimeError, match="higher's meta-gradient differs from the hand-written one"
    ):
        bench.check_agreement(impls, w.make_tasks(torch.device("cpu"))[:2])


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_memory_probe_reports_a_number():
    assert bench.probe_memory("W3-unroll10", "higher", "cpu") >= 0


def test_unknown_workload_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown workload 'W9'"):
        bench.select("W9")
