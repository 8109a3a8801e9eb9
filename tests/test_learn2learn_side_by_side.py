"""higher.learn2learn beside the real learn2learn 0.2.0, on every run (CI included).

``tests/fixtures/learn2learn/side_by_side.py`` holds the programs; run with the
real learn2learn (in its Python 3.10 venv, by ``regenerate_learn2learn.py``) they gave
``side_by_side.pt``; here they run with ``learn2learn`` aliased to
:mod:`higher.learn2learn` and must give the same numbers, in float64:

- meta-gradients of MAML, MetaSGD and GBML (two adaptation steps and a
  grandchild clone; MLP, conv with BatchNorm, LSTM; first and second order) and
  the BatchNorm statistics clones update: to 1e-12 relative (see
  :func:`relative_error` for gradients that are zero but for rounding);
- KroneckerLinear, MetaCurvatureTransform, PrototypicalClassifier and accuracy
  from the same weights: to 1e-12;
- learn2learn.data's deterministic parts (index maps, relabelling, ordering,
  support/query split, which errors) and its seeded sampling (NWays, KShots,
  RemapLabels's shuffle under ``random.seed``): exactly;
- models built after seeding random, numpy and torch (as every example's
  ``main`` does): the same weights, and the generators left in the same state;
- the vision models: parameter names and state-dict layout exactly; train- and
  eval-mode outputs and running statistics from the same weights: to 1e-10.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "learn2learn"
sys.path[:0] = [str(FIXTURES), str(HERE)]

import side_by_side as sbs  # noqa: E402
from harness import learn2learn_as, same_arithmetic  # noqa: E402


@pytest.fixture(scope="module")
def recorded():
    return torch.load(FIXTURES / "side_by_side.pt", weights_only=True)


def relative_error(ours: dict, theirs: dict) -> tuple[float, str]:
    """Largest difference over an entry's largest value, and where (entries of both).

    A gradient that is zero in exact arithmetic (a convolution's bias before
    BatchNorm, and its MetaSGD rate) is rounding noise on both sides; so an
    entry's scale is never taken below 1e-3 of the largest value recorded.
    """
    assert sorted(ours) == sorted(theirs), sorted(set(ours) ^ set(theirs))
    tensors = [v for v in theirs.values() if isinstance(v, torch.Tensor) and v.numel()]
    floor = 1e-3 * max((float(v.abs().max()) for v in tensors), default=0.0)
    worst, where = 0.0, ""
    for key, want in theirs.items():
        if not isinstance(want, torch.Tensor):
            assert ours[key] == want, key
            continue
        got = ours[key].reshape(-1).to(torch.float64)
        want = want.reshape(-1)
        assert got.shape == want.shape, key
        if want.numel():
            err = float((got - want).abs().max()) / max(float(want.abs().max()), floor, 1e-300)
            if err > worst:
                worst, where = err, key
    return worst, where


def run_part(fn, *args):
    with learn2learn_as(alias=True) as l2l, same_arithmetic(torch.float64):
        return fn(l2l, *args)


@pytest.mark.parametrize("case", sbs.meta_gradient_cases(), ids=lambda c: str(c))
def test_meta_gradients_match_learn2learn(case, recorded):
    key = "meta_gradients/" + "/".join(map(str, case))
    theirs = sbs.expand(recorded[key])
    ours = run_part(sbs.meta_gradients, *case)
    err, where = relative_error(ours, theirs)
    assert err <= 1e-12, (case, where, err)


def test_layers_and_transforms_match_learn2learn(recorded):
    err, where = relative_error(run_part(sbs.layers), sbs.expand(recorded["layers"]))
    assert err <= 1e-12, (where, err)


def test_data_deterministic_parts_match_learn2learn(recorded):
    assert run_part(sbs.data_parts) == recorded["data"]


def test_data_seeded_sampling_matches_learn2learn(recorded):
    assert run_part(sbs.data_sampling) == recorded["sampling"]


def test_task_loading_matches_learn2learn(recorded):
    assert run_part(sbs.task_loading) == recorded["loading"]


@pytest.mark.parametrize("case", list(sbs.VISION_MODELS))
def test_vision_models_match_learn2learn(case, recorded):
    theirs = sbs.expand(recorded["vision/" + case])
    ours = run_part(sbs.vision_model, case)
    assert ours["names"] == theirs["names"]
    assert ours["state"] == theirs["state"]  # the same keys and shapes: state dicts load
    err, where = relative_error(ours, theirs)
    assert err <= 1e-10, (where, err)


@pytest.mark.parametrize("case", list(sbs.SEEDED_MODELS))
def test_seeded_construction_matches_learn2learn(case, recorded):
    """Seeded as the examples seed, a model starts from learn2learn's weights, and leaves
    random, numpy and torch's generators where learn2learn leaves them."""
    theirs = sbs.expand(recorded["seeded/" + case])
    err, where = relative_error(run_part(sbs.seeded_construction, case), theirs)
    assert err <= 1e-12, (where, err)


def test_fixture_is_learn2learn_0_2_0():
    versions = torch.load(FIXTURES / "examples.pt", weights_only=True)["_versions"]
    assert versions["learn2learn"] == "0.2.0"
