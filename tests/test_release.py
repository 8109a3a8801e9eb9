"""The release artefacts hold what an installed user needs.

Builds the sdist and, from it, the wheel (``python -m build``) from a copy of
the source tree, checks both with ``twine check --strict``, installs the wheel
into a fresh venv, and from a directory outside the source tree imports every
public module, runs an inner loop and finds ``py.typed`` and ``LICENSE``.

The venv sees the running interpreter's site-packages (``--system-site-packages``)
so that it reuses the installed torch instead of downloading one, and the wheel
is installed with ``--no-index``: nothing is fetched, and a dependency the
environment lacks fails the install instead of pulling a multi-GB torch build.
The check that ``higher`` is imported from the venv guards against the
development install of the running interpreter shadowing the wheel.

Marked ``release`` (a minute or so): ``pytest -m "not release"`` skips it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("build")
pytest.importorskip("twine")

from public_api import PUBLIC_MODULES

import higher

pytestmark = pytest.mark.release

ROOT = Path(__file__).resolve().parents[1]
# Paths that are build output or local state, never part of a release.
LOCAL = shutil.ignore_patterns(
    ".git", "__pycache__", "*.egg-info", "build", "dist", "_build", ".venv", "out", ".*_cache"
)

# Run in the venv, from a directory that holds no source tree.
INSTALLED_CHECK = textwrap.dedent(
    """
    import importlib, importlib.metadata, json, sys
    from pathlib import Path

    modules = json.loads(sys.argv[1])
    for name in modules:
        importlib.import_module(name)
    import torch
    import higher

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(((fmodel(x) - y) ** 2).mean())
        ((fmodel(x) - y) ** 2).mean().backward()
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0

    files = [str(f) for f in importlib.metadata.files("higher")]
    print(json.dumps({
        "file": higher.__file__,
        "prefix": sys.prefix,
        "version": higher.__version__,
        "metadata_version": importlib.metadata.version("higher"),
        "py_typed": (Path(higher.__file__).parent / "py.typed").is_file(),
        "license": [f for f in files if Path(f).name == "LICENSE"],
    }))
    """
)


def run(*command: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("release")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=LOCAL)
    # The sdist first, then the wheel built from the unpacked sdist (build's
    # default): a file the sdist forgets is missing from the wheel too. Without
    # isolation the installed setuptools builds, so nothing is downloaded.
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp / "dist", source, cwd=tmp)
    return tmp / "dist"


def artefacts(dist: Path) -> tuple[Path, Path]:
    (sdist,) = dist.glob(f"higher-{higher.__version__}.tar.gz")
    (wheel,) = dist.glob(f"higher-{higher.__version__}-py3-none-any.whl")
    return sdist, wheel


def test_twine_check_passes_on_the_sdist_and_the_wheel(dist):
    sdist, wheel = artefacts(dist)
    out = run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel, cwd=dist)
    assert out.count("PASSED") == 2, out


def test_wheel_holds_the_package_its_marker_and_license_only(dist):
    _, wheel = artefacts(dist)
    names = zipfile.ZipFile(wheel).namelist()
    assert "higher/py.typed" in names
    assert any(n.startswith("higher-") and n.endswith("/LICENSE") for n in names), names
    top = {n.split("/")[0] for n in names}
    assert top == {"higher", f"higher-{higher.__version__}.dist-info"}, top
    for module in PUBLIC_MODULES[1:]:
        path = module.replace(".", "/")
        assert f"{path}.py" in names or f"{path}/__init__.py" in names, module


def test_wheel_installs_and_runs_outside_the_source_tree(dist, tmp_path):
    _, wheel = artefacts(dist)
    venv = tmp_path / "venv"
    # Without a pip (and the old setuptools ensurepip brings) of its own, the venv
    # sees exactly the running interpreter's packages; this pip installs into it.
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    pip = [sys.executable, "-m", "pip", "--python", python]
    run(*pip, "install", "--no-index", "--quiet", wheel, cwd=tmp_path)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    out = run(python, "-c", INSTALLED_CHECK, json.dumps(PUBLIC_MODULES), cwd=workdir)
    found = json.loads(out.strip().splitlines()[-1])
    assert Path(found["file"]).is_relative_to(Path(found["prefix"])), found  # the wheel's copy
    assert found["version"] == found["metadata_version"] == higher.__version__, found
    assert found["py_typed"], found
    assert found["license"], found
