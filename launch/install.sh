#!/usr/bin/env bash
# Create ./.venv (if absent) and install semi-llie into it from this checkout.
#   bash launch/install.sh            runtime only (what the quickstart needs)
#   bash launch/install.sh --test     + DeepSpeed and the test tools (what CI and contributors need)
# torch/torchvision are pinned in pyproject.toml; never install them unpinned (pip would fetch a multi-GB build).
set -euo pipefail
cd "$(dirname "$0")/.."

with_test=0
[[ "${1:-}" == "--test" ]] && with_test=1

PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip setuptools wheel
if (( with_test )); then
  "${pip[@]}" install -q -e ".[test]"
  # DeepSpeed ships as an sdist whose setup imports torch: build it against the pinned torch already
  # installed (no build isolation), otherwise pip would pull a second, unpinned torch into the build env.
  "${pip[@]}" install -q --no-build-isolation "torch==2.14.1" -e ".[deepspeed]"
else
  "${pip[@]}" install -q -e .
fi
echo "installed: $(.venv/bin/semi-llie --version 2>/dev/null || .venv/bin/python -c 'import semi_llie; print("semi-llie", semi_llie.__version__)')"
