#!/usr/bin/env bash
# The first command of the README: set up ./.venv if absent and run the whole job on a tiny synthetic
# dataset on CPU (synthesise, shard, train, evaluate, register in MLflow, enhance, before/after grid).
#   bash launch/quickstart.sh                     default run into ./quickstart-out
#   bash launch/quickstart.sh --out /tmp/qs --steps 60 --seed 1
# Arguments are passed to `semi-llie quickstart` (see `semi-llie quickstart --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

[[ -x .venv/bin/semi-llie ]] || bash launch/install.sh
exec .venv/bin/semi-llie quickstart "$@"
