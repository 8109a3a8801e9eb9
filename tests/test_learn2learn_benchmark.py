"""benchmarks/learn2learn.py: the harness runs, and without learn2learn leaves its column out."""

from __future__ import annotations

import pytest

from benchmarks import learn2learn as bench


def test_smoke_run_prints_the_table(capsys):
    assert bench.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "| W1-sgd1 | higher.learn2learn |" in out and "| W1-sgd1 | innerloop_ctx |" in out
    if not bench.has_learn2learn():
        assert "learn2learn absent (its column is left out)" in out
        assert "| W1-sgd1 | learn2learn |" not in out


def test_rows_are_named():
    with pytest.raises(SystemExit):
        bench.main(["--rows", "W9"])
