#!/usr/bin/env bash
# The README's test command: the dependency and layering checks, then the whole pytest suite, with the
# project's .venv; installs nothing (use `bash launch/install.sh --test` first). Extra arguments go to pytest:
# `bash launch/test.sh -m "not slow"`.
# The end-to-end SLURM tests need root and the Debian packages slurm-wlm and munge (.ci/run installs them);
# without them they are skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

python=.venv/bin/python
[[ -x "$python" ]] || python=python3
bin=$(dirname "$python")
# The house stays as drawn: every third-party import declared in pyproject.toml, and the package's floors
# kept (pyproject.toml [tool.deptry], [tool.importlinter]; ARCHITECTURE.md). A few seconds.
"$python" -m deptry . >/dev/null 2>&1 || { "$python" -m deptry .; exit 1; }
"$bin/lint-imports" --no-cache >/dev/null 2>&1 || { "$bin/lint-imports" --no-cache; exit 1; }
options=(-q --durations=15)
# A hung end-to-end test (a daemon that never answers) fails after 15 minutes instead of stalling CI.
"$python" -c 'import pytest_timeout' 2>/dev/null && options+=(--timeout=900)
exec "$python" -m pytest "${options[@]}" "$@"
