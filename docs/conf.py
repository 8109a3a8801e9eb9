"""Sphinx configuration for higher's documentation.

Build the site with ``sphinx-build -W --keep-going -n docs docs/_build/html`` and
run the pages' code with ``sphinx-build -b doctest docs docs/_build/doctest``
(``tests/test_docs.py`` does both). Nothing here reaches the network: the
intersphinx inventories of Python and PyTorch are local files (see
``_inventories/README.md``).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Document the source tree this file belongs to, not whichever higher is installed.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE / "_ext"))

import higher  # noqa: E402

project = "higher"
author = "the higher developers"
copyright = "the higher developers"
release = higher.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "myst_parser",
    "aliases",
    "readme_links",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_inventories", "_ext", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# Every cross-reference must resolve (the build runs with -W).
nitpicky = True
nitpick_ignore = [
    # Private modules that public docstrings name to say where something lives;
    # they are implementation details and have no page.
    ("py:mod", "higher._compat"),
    ("py:mod", "higher._exact_norms"),
    # WRN28Backbone's base, learn2learn's WideResNet, lives in a private module (its
    # public path is the made module higher.learn2learn.vision.models.wrn28).
    ("py:class", "higher.learn2learn.vision._wrn28.WideResNet"),
    # The module docstring of higher.optim.classic names these without their module:
    # GroupedState is an internal class with no entry, DifferentiableOptimizer is
    # imported there only for type checking. (To fix in that docstring.)
    ("py:class", "GroupedState"),
    ("py:class", "DifferentiableOptimizer"),
]

# -- autodoc / napoleon ------------------------------------------------------------
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# -- intersphinx (offline) ----------------------------------------------------------
# The second element is a local inventory instead of the site's objects.inv, so the
# build never downloads anything; the links still point at the real pages.
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", "_inventories/python.txt"),
    "torch": ("https://docs.pytorch.org/docs/stable", "_inventories/torch.txt"),
}
intersphinx_timeout = 1

# -- doctest builder: runs the pages' ``testcode`` blocks ---------------------------
doctest_global_setup = """
import torch
import torch.nn.functional as F
from torch import nn

import higher

torch.manual_seed(0)
"""
# The docstrings' own ``>>>`` examples run under ``pytest --doctest-modules`` with
# their module's globals; running them here a second time, without those globals,
# would only duplicate that.
doctest_test_doctest_blocks = ""

# -- MyST --------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# -- HTML --------------------------------------------------------------------------
html_theme = "furo"
html_title = f"higher {release}"
html_static_path: list[str] = []

# -- repository files included as pages (docs/_ext/readme_links.py) ----------------
readme_pages = {
    "benchmarks/README.md": "benchmarks",
    "examples/README.md": "examples",
    "CHANGELOG.md": "changelog",
}
