"""The long-unroll benchmark harness runs, and its checkpointed variants agree with the plain one."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from benchmarks import __main__ as bench


def test_smoke_through_the_main_entry_point(tmp_path, capsys):
    path = tmp_path / "long.json"
    argv = ["--long-unroll", "--smoke", "--cases", "W3-50,imaml-10", "--json", str(path)]
    assert bench.main([*argv, "--device", "cpu"]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert {r["variant"] for r in rows} == {"plain", "ckpt-1", "ckpt-10", "imaml"}
    for r in rows:
        assert r["median_s"] > 0
        if r["variant"].startswith("ckpt"):
            assert r["rel_grad_error"] == 0.0  # checkpointing is exact
    assert "| W3-50 | ckpt-10 |" in capsys.readouterr().out


def test_unknown_case():
    with pytest.raises(SystemExit):
        bench.main(["--long-unroll", "--cases", "W9"])
