"""learn2learn 0.2.0's source distribution, downloaded from the package registry at run time.

Its ``tests/`` and ``examples/`` are run against :mod:`higher.learn2learn`, but its
code stays out of this repository: :func:`learn2learn_sdist` fetches the archive
from the index pip is configured with (``pip config list``, ``PIP_INDEX_URL``,
else PyPI), checks its published sha256, and unpacks it once into a cache folder
(``HIGHER_L2L_CACHE``, else ``~/.cache/higher``). When no index can be reached,
the calling test is skipped with a message that says so.

Example (in a test):
    >>> root = learn2learn_sdist()  # doctest: +SKIP
    >>> (root / "tests" / "unit" / "utils_test.py").is_file()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

VERSION = "0.2.0"
ARCHIVE = f"learn2learn-{VERSION}.tar.gz"
# The digest PyPI publishes for the archive: a different file is never unpacked.
SHA256 = "69f1d7cb0d0a6be7a2c6ad8e83e2ebbe70fb05e51d61e45e63078b40c75ea419"
PYPI = "https://pypi.org/simple"


def cache_dir() -> Path:
    """Where the archive and its unpacked tree are kept between runs."""
    root = os.environ.get("HIGHER_L2L_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "higher"


def index_urls() -> list[str]:
    """The simple-index URLs pip would use here, the main one first."""
    main: list[str] = []
    extra: list[str] = []
    env = os.environ.get("PIP_INDEX_URL")
    if env:
        main.append(env)
    extra += os.environ.get("PIP_EXTRA_INDEX_URL", "").split()
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        value = value.strip().strip("'\"")
        if key.endswith(".index-url"):
            main.append(value)
        elif key.endswith(".extra-index-url"):
            extra += value.split()
    urls = main or [PYPI]
    return list(dict.fromkeys(u.rstrip("/") for u in urls + extra))


def _archive_url(index: str) -> str:
    """The archive's URL listed on ``index``'s page for learn2learn.

    Raises:
        OSError: the page cannot be read (the registry is unreachable), or does
            not list the archive.
    """
    page_url = f"{index}/learn2learn/"
    try:
        with urllib.request.urlopen(page_url, timeout=60) as response:
            page = response.read().decode("utf-8", "replace")
    except (OSError, ValueError) as err:
        raise OSError(f"{page_url} unreachable: {err}") from err
    for href in re.findall(r'href="([^"]+)"', page):
        if href.split("#")[0].endswith("/" + ARCHIVE) or href.split("#")[0] == ARCHIVE:
            return urllib.parse.urljoin(page_url, href.split("#")[0])
    raise OSError(f"{page_url} lists no {ARCHIVE}")


def _download(target: Path) -> None:
    errors = []
    for index in index_urls():
        try:
            url = _archive_url(index)
            with urllib.request.urlopen(url, timeout=120) as response:
                data = response.read()
        except OSError as err:
            errors.append(str(err))
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHA256:
            errors.append(f"{url}: sha256 {digest}, expected {SHA256}")
            continue
        partial = target.with_suffix(f".part{os.getpid()}")
        partial.write_bytes(data)
        partial.replace(target)
        return
    raise OSError("; ".join(errors) or "no package index configured")


def learn2learn_sdist() -> Path:
    """The unpacked ``learn2learn-0.2.0`` source tree (with ``tests/`` and ``examples/``).

    Downloads it on first use. Calls ``pytest.skip`` with the reason when the
    registry cannot be reached.

    Returns:
        The folder holding ``setup.py``, ``learn2learn/``, ``tests/`` and
        ``examples/``.
    """
    cache = cache_dir()
    tree = cache / f"learn2learn-{VERSION}"
    if (tree / "setup.py").is_file():
        return tree
    archive = cache / ARCHIVE
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if not archive.is_file() or hashlib.sha256(archive.read_bytes()).hexdigest() != SHA256:
            _download(archive)
    except OSError as err:
        pytest.skip(
            f"learn2learn {VERSION}'s source distribution could not be downloaded from the "
            f"package registry ({err}); these tests need it to run learn2learn's own code"
        )
    # Unpacked beside the cache and renamed into place, so a concurrent run never
    # sees half a tree.
    staging = Path(tempfile.mkdtemp(dir=cache, prefix="unpack-"))
    try:
        with tarfile.open(archive) as tar:
            if sys.version_info >= (3, 12):
                tar.extractall(staging, filter="data")
            else:
                tar.extractall(staging)  # the archive's digest was checked
        try:
            (staging / tree.name).rename(tree)
        except OSError:
            if not (tree / "setup.py").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree
