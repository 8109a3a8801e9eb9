#!/usr/bin/env bash
# Runs the test suite against other PyTorch releases, each in a throwaway venv.
#
# setup.cfg declares a torch floor; this script is how a release is checked
# before README lists it as tested. It is not part of CI: every version costs a
# download of a few GB (PyPI's Linux torch wheels are CUDA builds that pull in
# the nvidia-* libraries) and a few minutes.
#
# Usage (from anywhere):
#   tests/torch_versions.sh 2.14.1 2.1.2 ...
#
# For each version it copies this checkout (without .git and build outputs)
# into a temporary folder, makes a venv there, installs "torch==VERSION"
# together with the copy's ".[test]" (so pip also checks that the declared
# requirements admit that release), runs "python -m pytest -q" in the copy
# with the venv's interpreter, prints the failures and the last lines of the
# run, and removes the folder (the full pytest output stays in FOLDER.log). A
# summary line per version closes the output; the exit status is non-zero when
# any version failed.
#
# Environment:
#   PYTHON        interpreter that creates the venvs (default: python3)
#   PIP_ARGS      extra arguments for pip install (say, an --index-url)
#   PYTEST_ARGS   arguments for pytest (default: -q)
#   KEEP_VENVS=1  keep the venvs and print where they are
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
if [ $# -eq 0 ]; then
    echo "usage: $0 TORCH_VERSION [TORCH_VERSION ...]" >&2
    exit 2
fi

summary=()
status=0
for version in "$@"; do
    work=$(mktemp -d "${TMPDIR:-/tmp}/higher-torch-$version.XXXXXX")
    echo "=== torch $version (venv in $work)"
    extra=()
    # Wheels before torch 2.3 were built against NumPy 1.x and warn (an error
    # under this suite's filterwarnings) when NumPy 2 is installed.
    if "$python" -c "import sys; v = tuple(map(int, sys.argv[1].split('.')[:2])); sys.exit(v >= (2, 3))" "$version"; then
        extra+=("numpy<2")
    fi
    result="install failed"
    log="$work.log"  # outlives the folder: the full pytest output
    start=$SECONDS
    # A copy keeps pip's in-tree build (build/, *.egg-info) out of the checkout.
    mkdir "$work/src"
    tar -C "$root" --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=./.venv -cf - . | tar -C "$work/src" -xf -
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words
    if "$python" -m venv "$work/venv" &&
        "$work/venv/bin/python" -m pip install -q --disable-pip-version-check ${PIP_ARGS:-} \
            "torch==$version" "${extra[@]}" "$work/src[test]"; then
        installed=$("$work/venv/bin/python" -c "import torch; print(torch.__version__)" 2>&1 | tail -1)
        # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
        (cd "$work/src" && "$work/venv/bin/python" -m pytest ${PYTEST_ARGS:--q}) >"$log" 2>&1
        rc=$?
        grep -E "^(FAILED|ERROR) " "$log"
        tail -n 3 "$log"
        last=$(grep -E "passed|failed|error" "$log" | tail -1)
        if [ $rc -eq 0 ]; then
            result="PASS (torch $installed: $last)"
        else
            result="FAIL (torch $installed: $last)"
        fi
    fi
    case $result in PASS*) ;; *) status=1 ;; esac
    summary+=("torch $version: $result [$((SECONDS - start)) s, log $log]")
    if [ "${KEEP_VENVS:-0}" = 1 ]; then
        echo "kept $work (venv, src, pytest.log)"
    else
        rm -rf "$work"
    fi
done

echo
echo "=== summary ($(uname -m), $("$python" -V 2>&1))"
printf '%s\n' "${summary[@]}"
exit $status
