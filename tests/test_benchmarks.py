"""The benchmark harness works (correctness only: no timing is asserted)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from benchmarks import run as bench
from benchmarks.workloads import WORKLOADS, HandwrittenImpl, HigherImpl


class _WrongPeer(HandwrittenImpl):
    """A peer library whose meta-gradient is off, as TorchOpt's Adam is by 2.6e-5."""

    name = "wrong-peer"

    def meta_backward(self, tasks):
        super().meta_backward(tasks)
        for p in self.model.parameters():
            p.grad.mul_(1.001)


def test_smoke_run_writes_table_and_json(tmp_path, capsys, monkeypatch):
    # The rows are fixed here, whichever peers are installed: ours, the
    # reference, and a peer that disagrees, which is reported and not timed.
    monkeypatch.setattr(bench, "available_impls", lambda: [HigherImpl, HandwrittenImpl, _WrongPeer])
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
    ours = [r for r in report["results"] if r["impl"] != "wrong-peer"]
    assert all(r["rel_grad_error"] < 1e-10 and r["median_s"] > 0 for r in ours)
    peers = [r for r in report["results"] if r["impl"] == "wrong-peer"]
    assert len(peers) == 3 and all(r["median_s"] is None for r in peers)
    assert all(r["rel_grad_error"] > bench.TOLERANCE for r in peers)
    assert report["agreement"] == {"dtype": "float64", "tolerance": bench.TOLERANCE}
    assert report["timed_dtype"] == "float32"
    out = capsys.readouterr().out
    assert "| workload | implementation |" in out
    assert "Timed in float32; meta-gradients checked against the hand-written one in float64" in out
    assert "| W1-adam5 | wrong-peer | not timed: meta-gradient disagrees | - |" in out


@pytest.mark.parametrize("name", ["W1-fo5", "W2-conv", "W3-unroll10"])
def test_higher_and_handwritten_agree(name):
    # In float64 both agree to ~1e-15. W2 amplifies rounding by up to ~1e5
    # (float32: 1e-6 on one CPU, 2.8e-3 on another), which leaves float64 near
    # 1e-11 at worst, so 1e-10 holds on any machine and thread count.
    w = WORKLOADS[name]
    torch.manual_seed(0)
    base = w.make_model()
    before = copy.deepcopy(base.state_dict())
    impls = [HigherImpl(w, base), HandwrittenImpl(w, copy.deepcopy(base))]
    errors = bench.check_agreement(impls, w.make_tasks(torch.device("cpu"))[:2])
    assert errors["higher"] < 1e-10 and errors["handwritten"] == 0.0
    # The timed implementations keep their float32 model, untouched by the check.
    for k, v in base.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert all(p.grad is None for p in base.parameters())


class _Spy(HigherImpl):
    # Not named "higher": a disagreement is reported, never raised, so the
    # float32 call below checks the plumbing whatever W2's float32 error is
    # on this machine (1e-6 to 3e-3 have been seen).
    name = "spy"
    seen: list = []

    def meta_backward(self, tasks):
        self.seen.append(
            (next(self.model.parameters()).dtype, tasks[0][0].dtype, tasks[0][1].dtype)
        )
        super().meta_backward(tasks)


def test_agreement_is_checked_on_float64_copies():
    # W2 has integer labels, which must stay integers; one step and five
    # queries keep it cheap.
    w = dataclasses.replace(WORKLOADS["W2-conv"], inner_steps=1)
    base = w.make_model()
    impls = [_Spy(w, base), HandwrittenImpl(w, copy.deepcopy(base))]
    xs, ys, xq, yq = w.make_tasks(torch.device("cpu"))[0]
    tasks = [(xs, ys, xq[:5], yq[:5])]
    _Spy.seen = []
    bench.check_agreement(impls, tasks)
    assert _Spy.seen == [(torch.float64, torch.float64, torch.int64)]
    _Spy.seen = []
    errors = bench.check_agreement(impls, tasks, torch.float32)
    assert _Spy.seen == [(torch.float32, torch.float32, torch.int64)] and "spy" in errors


def test_cast_floats_walks_containers():
    x, y = torch.zeros(2), torch.zeros(2, dtype=torch.long)
    out = bench.cast_floats({"a": [x, (y, 3)], "b": x}, torch.float64)
    assert out["a"][0].dtype == out["b"].dtype == torch.float64
    assert out["a"][1][0] is y and out["a"][1][1] == 3 and isinstance(out["a"][1], tuple)


def test_agreement_check_rejects_bad_arguments():
    w = WORKLOADS["W1-sgd1"]
    base = w.make_model()
    tasks = w.make_tasks(torch.device("cpu"))[:1]
    with pytest.raises(ValueError, match="no tolerance for dtype torch.float16"):
        bench.check_agreement([HigherImpl(w, base), HandwrittenImpl(w, base)], tasks, torch.float16)
    with pytest.raises(ValueError, match="needs a HandwrittenImpl"):
        bench.check_agreement([HigherImpl(w, base)], tasks)


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
        RuntimeError,
        match="higher's meta-gradient differs from the hand-written one in torch.float64",
    ):
        bench.check_agreement(impls, w.make_tasks(torch.device("cpu"))[:2])


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_memory_probe_reports_a_number():
    assert bench.probe_memory("W3-unroll10", "higher", "cpu") >= 0


def test_unknown_workload_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown workload 'W9'"):
        bench.select("W9")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["W5-sgd1", "W5-lora1"])
def test_transformer_workloads_agree(name):
    # W5 needs transformers (and peft for LoRA); with LoRA only the adapters
    # are meta-learned and the frozen weights get no meta-gradient.
    if name not in WORKLOADS:
        pytest.skip(f"{name} needs transformers and peft")
    w = WORKLOADS[name]
    torch.manual_seed(0)
    base = w.make_model()
    impls = [HigherImpl(w, base), HandwrittenImpl(w, copy.deepcopy(base))]
    errors = bench.check_agreement(impls, w.make_tasks(torch.device("cpu"))[:2])
    assert errors["higher"] < 1e-10 and errors["handwritten"] == 0.0
    frozen = [p for p in base.parameters() if not p.requires_grad]
    assert bool(frozen) == ("lora" in name)


def test_floor_smoke_prints_ratios_to_the_floor(capsys):
    from benchmarks import floor

    assert floor.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "| W1-sgd1 | floor |" in out and "| W1-sgd1 | higher |" in out
    assert "| optimizer set-up |" in out


def test_floor_matches_the_handwritten_meta_gradient():
    from benchmarks.workloads import FloorImpl

    w = WORKLOADS["W1-sgd5"]
    torch.manual_seed(0)
    base = w.make_model()
    tasks = w.make_tasks(torch.device("cpu"))[:3]
    assert FloorImpl.supports(w, base)
    assert not FloorImpl.supports(WORKLOADS["W2-conv"], WORKLOADS["W2-conv"].make_model())
    impls = [FloorImpl(w, base), HandwrittenImpl(w, copy.deepcopy(base))]
    errors = bench.check_agreement(impls, tasks)
    assert errors["floor"] < 1e-12


def test_instruction_scenarios_run_and_the_table_reads_callgrind_dumps(tmp_path):
    """``benchmarks.instructions`` without valgrind: its scenarios run, and its table is
    made from dumps as callgrind writes them."""
    from benchmarks import instructions

    todo = instructions.scenarios(baseline=None)
    assert {"floor:task1", "higher:task1", "higher:patch", "higher:step"} <= set(todo)
    for fn in todo.values():
        fn()
    for name, total in (("floor:task1", 3_000_000), ("higher:task1", 3_450_000)):
        dump = tmp_path / f"cg.out.1.{len(name)}{total}"
        dump.write_text(
            f"version: 1\ncreator: callgrind-3.19.0\ndesc: Trigger: Client Request: {name}\n"
            f"events: Ir\nsummary: {total}\ntotals: {total}\n"
        )
    counts = instructions._counts(tmp_path)
    assert counts == {"floor:task1": 3_000_000, "higher:task1": 3_450_000}
    assert "| task1 | 3,000k | 3,450k (1.150x) |" in instructions.table(counts)
