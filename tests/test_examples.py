"""Each example runs end to end on tiny settings, prints its metrics and saves its plot."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
sys.path.insert(0, os.path.abspath(EXAMPLES))

import l2l_maml_omniglot  # noqa: E402
import learned_lr  # noqa: E402
import maml_fewshot  # noqa: E402
import maml_linear  # noqa: E402
import maml_sinusoid  # noqa: E402

pytest.importorskip("matplotlib")

TORCHRUN_TIMEOUT_S = 900  # catches a hang; a loaded machine can take minutes


@pytest.mark.parametrize("algorithm", maml_sinusoid.ALGORITHMS)
def test_maml_sinusoid(algorithm, tmp_path, capsys):
    plot = tmp_path / "sin.png"
    result = maml_sinusoid.main(
        [
            "--algorithm",
            algorithm,
            "--iterations",
            "3",
            "--meta-batch",
            "2",
            "--eval-tasks",
            "4",
            "--baseline-iterations",
            "2",
            "--device",
            "cpu",
            "--plot",
            str(plot),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert plot.exists() and plot.stat().st_size > 0
    assert f"{algorithm:<10} MSE" in out and "baseline   MSE" in out
    assert result["mse"] > 0 and len(result["train_curve"]) == 3


def test_maml_linear(tmp_path, capsys):
    plot = tmp_path / "lin.png"
    result = maml_linear.main(
        ["--iterations", "4", "--tasks-per-iteration", "2", "--plot", str(plot), "--no-progress"]
    )
    out = capsys.readouterr().out
    assert plot.exists()
    assert "query loss before adaptation" in out
    assert len(result["before"]) == len(result["after"]) == 4


def test_learned_lr(tmp_path, capsys):
    plot = tmp_path / "lr.png"
    result = learned_lr.main(
        ["--hyper-iterations", "3", "--inner-steps", "3", "--plot", str(plot), "--no-progress"]
    )
    out = capsys.readouterr().out
    assert plot.exists()
    assert "learned lr" in out
    assert result["lr"][0] != result["lr"][-1]  # the hypergradient moved it


def test_maml_fewshot_on_generated_glyphs(tmp_path, capsys):
    plot = tmp_path / "fs.png"
    result = maml_fewshot.main(
        [
            "--num-chars",
            "10",
            "--samples-per-char",
            "4",
            "--ways",
            "3",
            "--shots",
            "1",
            "--queries",
            "2",
            "--iterations",
            "2",
            "--meta-batch",
            "2",
            "--eval-every",
            "1",
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
    assert plot.exists()
    assert "meta-test accuracy" in out and 0 <= result["accuracy"] <= 1


L2L_TINY = ["--ways", "2", "--iterations", "2", "--meta-batch", "2", "--test-tasks", "2"]


def test_l2l_maml_omniglot_on_generated_glyphs(tmp_path, capsys):
    plot = tmp_path / "l2l.png"
    argv = ["--num-chars", "25", "--samples-per-char", "2", "--model", "cnn", *L2L_TINY]
    result = l2l_maml_omniglot.main(
        [*argv, "--device", "cpu", "--plot", str(plot), "--no-progress"]
    )
    out = capsys.readouterr().out
    assert plot.exists() and "meta-test accuracy" in out and "generated glyph" in out
    assert len(result["curve"]["train_acc"]) == 2 and 0 <= result["accuracy"] <= 1


def test_l2l_maml_omniglot_reads_data_dir(tmp_path, capsys):
    _write_omniglot_tree(tmp_path / "omniglot", alphabets=9, characters=3, drawings=2)
    argv = ["--data-dir", str(tmp_path / "omniglot"), *L2L_TINY, "--plot", str(tmp_path / "p.png")]
    l2l_maml_omniglot.main([*argv, "--device", "cpu", "--no-progress"])
    assert "Omniglot from" in capsys.readouterr().out


def test_examples_check_optional_imports_before_training(tmp_path):
    """Without matplotlib, an example stops at start naming the extra (not after training)."""
    script = (
        "import sys; sys.modules['matplotlib'] = None; sys.path.insert(0, sys.argv[1]); "
        "import maml_linear; maml_linear.main(['--iterations', '100000'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, os.path.abspath(EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1
    assert "maml_linear.py needs matplotlib" in proc.stderr
    assert 'pip install -e ".[examples]"' in proc.stderr


def test_require_names_the_extra_and_the_package(monkeypatch):
    import _common

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(SystemExit, match=r'needs peft.*pip install -e "\.\[models\]"'):
        _common.require("torch", "peft", extra="models")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(
        SystemExit, match="needs PIL, no_such_module.*pip install pillow no_such_module"
    ):
        _common.require("PIL", "no_such_module")
    _common.require("torch")  # present: nothing happens


def _write_omniglot_tree(root, alphabets=2, characters=3, drawings=4):
    from matplotlib import image

    for a in range(alphabets):
        for c in range(characters):
            folder = root / "images_background" / f"Alphabet_{a}" / f"character{c:02d}"
            folder.mkdir(parents=True)
            for d in range(drawings):
                pixels = torch.ones(105, 105)
                pixels[20 + 10 * c : 30 + 10 * c, 10:90] = 0.0  # a dark bar, row set by character
                image.imsave(
                    folder / f"{a}{c}_{d:02d}.png", pixels.numpy(), cmap="gray", vmin=0, vmax=1
                )


def test_omniglot_loader_reads_the_standard_layout(tmp_path):
    _write_omniglot_tree(tmp_path)
    train, test = maml_fewshot.load_omniglot(str(tmp_path), seed=0)
    assert len(train) + len(test) == 6 and len(test) >= 1
    for images in train + test:
        assert images.shape == (4, 1, 28, 28)
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert images.max() > 0.9 and images.mean() < 0.3  # ink is high, background low
    sampler = maml_fewshot.TaskSampler(train, seed=0)
    xs, ys, xq, yq = sampler.sample(ways=3, shots=1, queries=2)
    assert xs.shape == (3, 1, 28, 28) and xq.shape == (6, 1, 28, 28)
    assert ys.tolist() == [0, 1, 2] and yq.tolist() == [0, 0, 1, 1, 2, 2]


def test_omniglot_evaluation_folder_is_the_test_split(tmp_path):
    _write_omniglot_tree(tmp_path)
    evaluation = tmp_path / "images_evaluation"
    (tmp_path / "images_background" / "Alphabet_1").rename(
        evaluation.mkdir() or evaluation / "Alphabet_1"
    )
    train, test = maml_fewshot.load_omniglot(str(tmp_path), seed=0)
    assert (len(train), len(test)) == (3, 3)


def test_omniglot_missing_layout_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images_background folder"):
        maml_fewshot.load_omniglot(str(tmp_path), seed=0)


def test_generated_glyphs_vary_within_a_character():
    chars = maml_fewshot.generate_glyphs(num_chars=3, samples=5, seed=0)
    assert len(chars) == 3 and chars[0].shape == (5, 1, 28, 28)
    within = (chars[0][0] - chars[0][1]).abs().mean()
    between = (chars[0][0] - chars[1][0]).abs().mean()
    assert 0 < within < between


# peft 0.21 calls a method that transformers 5 deprecates.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "extra", [[], ["--per-task-loop"], ["--lora"]], ids=["batched", "loop", "lora"]
)
def test_maml_transformer(extra, tmp_path, capsys):
    pytest.importorskip("transformers")
    if "--lora" in extra:
        pytest.importorskip("peft")
    import maml_transformer

    plot = tmp_path / "tf.png"
    argv = ["--smoke", "--device", "cpu", "--plot", str(plot), "--no-progress", *extra]
    result = maml_transformer.main(argv)
    out = capsys.readouterr().out
    assert plot.exists() and plot.stat().st_size > 0
    assert "pretrained baseline" in out and "held-out tasks" in out
    assert 0 <= result["accuracy"] <= 1 and len(result["train_curve"]) == 3


@pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)
def test_maml_transformer_fsdp_under_torchrun(tmp_path):
    """``--fsdp`` on 2 gloo ranks launched by torchrun (a free port, ``--standalone``), with
    FSDP2's training recipe: activation checkpointing and bf16 mixed precision (the plain
    sharded path is covered in tests/test_fsdp.py)."""
    pytest.importorskip("transformers")
    plot = tmp_path / "tf.png"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        os.path.join(EXAMPLES, "maml_transformer.py"),
        "--fsdp",
        "--grad-checkpointing",
        "--bf16",
        "--smoke",
        "--device",
        "cpu",
        "--no-progress",
        "--plot",
        str(plot),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun ends its workers (each in a session of its own) on SIGTERM
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        pytest.fail(f"torchrun --fsdp timed out after {TORCHRUN_TIMEOUT_S} s (a hang?)")
    assert proc.returncode == 0, out
    assert "FSDP over 2 ranks" in out and out.count("pretrained baseline") == 1  # rank 0 only
    assert plot.exists() and plot.stat().st_size > 0
