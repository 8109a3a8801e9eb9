"""learn2learn 0.2.0's own examples, run through ``higher.learn2learn``, against its numbers.

Each example's file is imported unchanged from learn2learn's source distribution
(downloaded at run time; skipped with the reason when the registry cannot be
reached) with ``learn2learn`` aliased to :mod:`higher.learn2learn`, and driven by
``tests/fixtures/learn2learn/drivers.py`` with generated data:

- ``main()`` itself, with only its datasets swapped for generated ones and its
  sizes made small through its own arguments or module globals, seeded as it
  seeds itself: maml_toy, maml_sine, maml_omniglot, maml_miniimagenet,
  metacurvature_fc100, anil_fc100, meta_mnist;
- the example's own functions and classes in its own outer loop, with weights
  drawn per parameter name: metamodule_toy (run as ``__main__``), anil_fc100,
  anilkfo_cifarfs, protonet_miniimagenet, reptile_miniimagenet,
  metacurvature_fc100, MAML++ (``MAMLpp.py``, and the steps of its trainer in
  ``maml++_miniimagenet.py`` on ``CNN4_BNRS``), hypergrad_mnist, and, without
  gym, the adaptation and surrogate losses of rl/maml_trpo, rl/metasgd_a2c,
  rl/maml_dice and rl/cavia_trpo;
- learn2learn's README snippets, and the patterns users write around clones
  (the "zero trick", ``detach_module``, ``maml_update``/``update_module`` on
  learners and deepcopies, writes into ``_parameters``, ``.grad`` on clones).

``fixtures/learn2learn/examples.pt`` holds what the same drivers gave with the
real learn2learn 0.2.0 (``regenerate_learn2learn.py`` rewrites it). Every printed loss,
every loss and every meta-gradient fingerprint must agree: to 1e-6 relative in
float64, and to float32 rounding (accumulated over the few steps each example
takes; 2e-4 relative) at float32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "learn2learn"
sys.path[:0] = [str(FIXTURES), str(HERE)]

import drivers  # noqa: E402
from learn2learn_sdist import learn2learn_sdist  # noqa: E402

RTOL = {torch.float64: 1e-6, torch.float32: 2e-4}

CASES = [
    pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")
    for name in drivers.EXAMPLES
    for dtype in (torch.float64, torch.float32)
    if not (dtype == torch.float64 and name in drivers.FLOAT32_ONLY)
]


@pytest.fixture(scope="module")
def recorded():
    return torch.load(FIXTURES / "examples.pt", weights_only=True)


def assert_records_match(ours, theirs, rtol, label):
    """Same keys; each entry within ``rtol`` of learn2learn's, relative to its largest entry.

    A gradient that is zero in exact arithmetic (a convolution's bias before
    BatchNorm) is rounding noise on both sides; so the scale of an entry is never
    taken below 1e-3 of the largest entry recorded in the same iteration.
    """
    assert sorted(ours) == sorted(theirs), (label, sorted(set(ours) ^ set(theirs)))
    group_max: dict[str, float] = {}
    for key, want in theirs.items():
        group = key.split("/")[0]
        group_max[group] = max(
            group_max.get(group, 0.0), float(want.abs().max()) if want.numel() else 0.0
        )
    worst, where = 0.0, None
    for key, want in theirs.items():
        got = ours[key].reshape(-1).to(torch.float64)
        assert got.shape == want.shape, (label, key, got.shape, want.shape)
        if not want.numel():
            continue
        floor = 1e-3 * group_max[key.split("/")[0]]
        scale = max(float(want.abs().max()), floor, 1e-300)
        err = float((got - want).abs().max()) / scale
        if err > worst:
            worst, where = err, key
    assert worst <= rtol, f"{label}: {where} differs by {worst:.2e} relative (allowed {rtol:.0e})"


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_example_matches_learn2learn(name, dtype, recorded):
    root = learn2learn_sdist()
    ours = drivers.run(name, root, alias=True, dtype=dtype)
    theirs = drivers.unpack(recorded[f"{name}/{str(dtype)[6:]}"])
    assert_records_match(ours, theirs, RTOL[dtype], f"{name} ({dtype})")


def test_alias_does_not_leak():
    """After a run, ``learn2learn`` is whatever it was before (absent here)."""
    before = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "learn2learn"}
    with drivers.learn2learn_as(alias=True) as l2l:
        import higher.learn2learn

        assert l2l is higher.learn2learn
        import learn2learn.algorithms

        assert learn2learn.algorithms is higher.learn2learn.algorithms
    after = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "learn2learn"}
    assert after == before
