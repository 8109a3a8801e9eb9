"""The iMAML example runs end to end on tiny settings and reports iMAML's and MAML's errors."""

from __future__ import annotations

import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
sys.path.insert(0, os.path.abspath(EXAMPLES))

import imaml_sinusoid  # noqa: E402

pytest.importorskip("matplotlib")


def test_imaml_sinusoid(tmp_path, capsys):
    plot = tmp_path / "imaml.png"
    result = imaml_sinusoid.main(
        [
            "--iterations",
            "2",
            "--meta-batch",
            "2",
            "--inner-steps",
            "3",
            "--eval-tasks",
            "3",
            "--device",
            "cpu",
            "--plot",
            str(plot),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert plot.exists() and plot.stat().st_size > 0
    assert "imaml  MSE" in out and "maml   MSE" in out and "mean CG residual" in out
    assert result["mse"] > 0 and result["maml_mse"] > 0 and len(result["train_curve"]) == 2
