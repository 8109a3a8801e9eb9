"""learn2learn 0.2.0's own offline unit tests, unmodified, run against higher.learn2learn.

The tests come from learn2learn's source distribution, downloaded at run time
(:mod:`learn2learn_sdist`; skipped, saying so, when the registry cannot be
reached). They run in a subprocess where ``import learn2learn`` gives
``higher.learn2learn`` (:mod:`learn2learn_alias`). Offline means every unit test
but ``data/metadataset_test.py``, whose fixtures download MNIST through torchvision.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

from learn2learn_sdist import learn2learn_sdist

HERE = pathlib.Path(__file__).resolve().parent
ONLINE = {"metadataset_test.py"}
OFFLINE_TESTS = 53


def test_learn2learns_offline_unit_tests_pass(tmp_path):
    root = learn2learn_sdist()
    files = sorted(
        str(p.relative_to(root))
        for p in (root / "tests" / "unit").rglob("*_test.py")
        if p.name not in ONLINE
    )
    ini = tmp_path / "pytest.ini"  # learn2learn's warnings stay warnings there, as in its CI
    ini.write_text("[pytest]\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    env.setdefault("OMP_NUM_THREADS", "1")
    plugins = ["-p", "no:cacheprovider", "-p", "no:randomly"]
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "learn2learn_alias.py"),
            "-q",
            "-c",
            str(ini),
            *plugins,
            *files,
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) == OFFLINE_TESTS, summary
    assert not re.search(r"failed|error|skipped", summary), summary
