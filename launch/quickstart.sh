#!/usr/bin/env bash
# The first command of the README: set up ./.venv if absent and run the whole job on a tiny synthetic
# dataset on CPU (synthesise, shard, train, evaluate, register in MLflow, enhance, before/after grid).
#   bash launch/quickstart.sh                     default run into ./quickstart-out
#   bash launch/quickstart.sh --out /tmp/qs --steps 60 --seed 1
# Arguments are passed to `semi-llie quickstart` (see `semi-llie quickstart --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/semi-llie ]]; then
  [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
  # torch is pinned exactly in pyproject.toml, so this never pulls an unpinned multi-GB build.
  .venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip setuptools wheel
  .venv/bin/python -m pip install --disable-pip-version-check -q -e .
fi
exec .venv/bin/semi-llie quickstart "$@"
