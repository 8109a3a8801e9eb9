"""The documentation site: it builds without warnings, its code runs, and it covers the API.

The site is built once per session, in a subprocess, as a user builds it
(``sphinx-build -W --keep-going -n``); the doctest builder then runs every code
block of the pages from the same doctrees. Skipped when the ``docs`` extra
(Sphinx, furo, myst-parser) is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import posixpath
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("furo")
pytest.importorskip("myst_parser")

from public_api import PUBLIC_MODULES
from sphinx.util.inventory import InventoryFile

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def public_names() -> list[str]:
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names.append(module_name)
        exported = module.__all__
        names += [f"{module_name}.{name}" for name in exported]
    return names


def missing_from(inventory: dict[str, dict[str, object]], names: list[str]) -> list[str]:
    """The names that no ``py:`` entry of a Sphinx inventory holds."""
    documented = {
        name for kind, entries in inventory.items() if kind.startswith("py:") for name in entries
    }
    return [name for name in names if name not in documented]


def sphinx_build(builder: str, outdir: Path, doctrees: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", builder]
    command += ["-d", str(doctrees), str(DOCS), str(outdir)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("docs")
    result = sphinx_build("html", tmp / "html", tmp / "doctrees")
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}\n{result.stderr}"
    assert not result.stderr.strip(), f"sphinx-build warned:\n{result.stderr}"
    return tmp / "html", tmp / "doctrees"


def test_site_builds_with_warnings_as_errors_and_nitpicky_references(site):
    html, _ = site
    for page in ["index", "getting-started", "concepts", "migration", "faq", "api/index"]:
        assert (html / f"{page}.html").is_file(), page
    for page in ["examples", "benchmarks", "changelog"]:  # the included repository files
        assert (html / f"{page}.html").stat().st_size > 10_000, page


def test_code_blocks_of_the_pages_run(site):
    html, doctrees = site
    result = sphinx_build("doctest", html.parent / "doctest", doctrees)
    report = (html.parent / "doctest" / "output.txt").read_text()
    assert result.returncode == 0, f"doctest failed:\n{report}\n{result.stderr}"
    tests = re.search(r"^\s+(\d+) tests$", report, re.MULTILINE)
    assert tests and int(tests.group(1)) >= 20, report
    assert "0 failures in tests" in report, report


def test_every_public_name_is_in_the_api_reference(site):
    html, _ = site
    with open(html / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", posixpath.join)
    assert missing_from(inventory, public_names()) == []


def test_the_coverage_check_notices_a_missing_name():
    names = public_names()
    inventory = {"py:function": dict.fromkeys(names[1:]), "std:doc": {names[0]: None}}
    assert missing_from(inventory, names) == [names[0]]


FENCE = re.compile(r"^\s*(```+|~~~+)\s*(\S*)\s*(\S*)", re.MULTILINE)
RST_CODE = re.compile(r"^\s*\.\. (code-block|code|sourcecode)::\s*(python|py|pycon)", re.MULTILINE)


@pytest.mark.parametrize(
    "page",
    sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "_build" not in p.parts),
)
def test_python_in_pages_is_executed(page):
    """Python belongs in ``testcode`` blocks, which the doctest builder runs."""
    text = (DOCS / page).read_text()
    untested = [
        m.group(0).strip()
        for m in FENCE.finditer(text)
        if m.group(2) in {"python", "py", "python3", "pycon"}
        or (
            m.group(2) in {"{code-block}", "{code}", "{sourcecode}"}
            and m.group(3) in {"python", "py"}
        )
    ]
    untested += [m.group(0).strip() for m in RST_CODE.finditer(text)]
    assert not untested, f"{page}: use {{testcode}} so that it runs: {untested}"


def inventory_lines(name: str) -> list[tuple[str, str, str]]:
    lines = (DOCS / "_inventories" / name).read_text().splitlines()
    assert lines[0] == "# Sphinx inventory version 1", lines[0]
    return [tuple(line.split(None, 2)) for line in lines[3:]]  # type: ignore[misc]


@pytest.mark.parametrize("inventory", ["python.txt", "torch.txt"])
def test_offline_inventories_name_real_objects(inventory):
    """Every entry of the local intersphinx inventories exists under that name."""
    missing = []
    for name, kind, location in inventory_lines(inventory):
        assert location.endswith(".html") and "#" not in location, location
        if kind == "mod":
            found = importlib.util.find_spec(name) is not None
        else:
            module_name, _, attr = name.rpartition(".")
            with warnings.catch_warnings():  # torch.distributed.optim warns about torch.jit
                warnings.simplefilter("ignore", DeprecationWarning)
                module = importlib.import_module(module_name or "builtins")
            found = hasattr(module, attr)
        if not found:
            missing.append(name)
    assert missing == []


def test_readme_gives_the_commands_ci_and_users_run():
    lines = (ROOT / "README.md").read_text().splitlines()
    for command in [
        'pip install -e ".[examples]" && python examples/maml_sinusoid.py',
        'pip install -e ".[test]" && python -m pytest',
        'pip install -e ".[docs]" && sphinx-build -W --keep-going -n docs docs/_build/html',
    ]:
        assert command in lines, command
