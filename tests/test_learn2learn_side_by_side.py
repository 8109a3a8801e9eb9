"""higher.learn2learn beside the real learn2learn 0.2.0, where a venv with it exists.

learn2learn installs only on Python <= 3.10; ``../shared/learn2learn/venv.sh``
(or any venv named by ``LEARN2LEARN_VENV``, with a torchvision stub in its
``stub`` folder) holds it. The same programs run with both libraries in that
venv, in float64: meta-gradients of MAML, MetaSGD and GBML and the BatchNorm
statistics that clones update must agree to 1e-12, and the layers and
transforms give the same outputs. Skipped where no such venv exists (CI).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("LEARN2LEARN_VENV", "/tmp/learn2learn-venv"))

SCRIPT = r"""
import copy, warnings
warnings.filterwarnings("ignore")
import torch
import learn2learn as L
import higher.learn2learn as H

torch.set_default_dtype(torch.float64)


def conv():
    def block(c):
        return [torch.nn.Conv2d(c, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                torch.nn.MaxPool2d(2)]
    return torch.nn.Sequential(*block(1), *block(4), torch.nn.Flatten(), torch.nn.Linear(16, 3))


class LSTMHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(3, 5, batch_first=True)
        self.head = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


torch.manual_seed(0)
MODELS = {"mlp": (mlp, torch.randn(6, 3)), "conv": (conv, torch.randn(6, 1, 8, 8)),
          "lstm": (LSTMHead, torch.randn(6, 4, 3))}


def run(lib, kind, model, x, first_order):
    if kind == "maml":
        alg = lib.algorithms.MAML(model, lr=0.3, first_order=first_order)
    elif kind == "metasgd":
        alg = lib.algorithms.MetaSGD(model, lr=0.3, first_order=first_order)
    else:
        alg = lib.algorithms.GBML(model, lib.optim.MetaCurvatureTransform, lr=0.3,
                                  first_order=first_order)
    learner = alg.clone()
    for _ in range(2):
        learner.adapt(learner(x).pow(2).mean())
    grandchild = learner.clone()
    grandchild.adapt(grandchild(x).sin().mean())
    (learner(x).pow(3).mean() + grandchild(x).mean()).backward()
    return [p.grad for p in alg.parameters()], [b.clone() for b in model.buffers()]


def rel(a, b):
    num = sum(float((x - y).double().norm() ** 2) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.double().norm() ** 2) for y in b) ** 0.5
    return num / max(den, 1e-300)


worst = 0.0
for name, (make, x) in MODELS.items():
    for kind in ["maml", "metasgd", "gbml"]:
        if kind == "gbml" and name == "lstm":
            continue  # Meta-Curvature takes 1-, 2- and 4-d parameters only
        for first_order in [False, True]:
            model = make()
            twin = copy.deepcopy(model)
            g1, b1 = run(L, kind, model, x, first_order)
            g2, b2 = run(H, kind, twin, x, first_order)
            err = max(rel(g2, g1), rel(b2, b1) if b1 else 0.0)
            worst = max(worst, err)
            assert err <= 1e-12, (name, kind, first_order, err)

# Layers and transforms: same outputs from the same weights.
k1, k2 = L.nn.KroneckerLinear(3, 2, psd=True), H.nn.KroneckerLinear(3, 2, psd=True)
for p in k1.parameters():
    torch.nn.init.normal_(p)
k2.load_state_dict(k1.state_dict())
xk = torch.randn(5, 3, 2)
assert torch.allclose(k1(xk), k2(xk)) and torch.allclose(k1(xk[0].t().flatten()), k2(xk[0].t().flatten()))
m1, m2 = L.optim.MetaCurvatureTransform(torch.zeros(4, 2, 3, 3)).double(), H.optim.MetaCurvatureTransform(torch.zeros(4, 2, 3, 3)).double()
for p in m1.parameters():
    torch.nn.init.normal_(p)
m2.load_state_dict(m1.state_dict())
gk = torch.randn(4, 2, 3, 3)
assert torch.allclose(m1(gk), m2(gk))
support, labels, queries = torch.randn(10, 4), torch.arange(5).repeat(2), torch.randn(7, 4)
for distance in ["euclidean", "cosine"]:
    c1 = L.nn.PrototypicalClassifier(support, labels, distance=distance)
    c2 = H.nn.PrototypicalClassifier(support, labels, distance=distance)
    assert torch.allclose(c1(queries), c2(queries))
preds, targets = torch.randn(9, 3), torch.randint(0, 3, (9,))
assert torch.equal(L.utils.accuracy(preds, targets), H.utils.accuracy(preds, targets))
print(f"OK worst {worst:.1e}")
"""


def learn2learn_python() -> Path | None:
    python = VENV / "bin" / "python"
    if not python.exists() or not (VENV / "stub").is_dir():
        return None
    return python


def test_meta_gradients_and_layers_match_learn2learn():
    python = learn2learn_python()
    if python is None:
        pytest.skip(f"no learn2learn venv at {VENV} (../shared/learn2learn/venv.sh makes one)")
    env = {
        **os.environ,
        "PYTHONPATH": f"{VENV / 'stub'}{os.pathsep}{ROOT}",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [str(python), "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    if "No module named 'learn2learn'" in result.stderr:
        pytest.skip(f"{python} cannot import learn2learn")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK"), result.stdout
