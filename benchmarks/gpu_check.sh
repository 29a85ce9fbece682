#!/usr/bin/env bash
# The one script to run when a GPU is lent: install the CUDA extra, run the CUDA agreement tests, measure,
# write one JSON (benchmarks/gpu_check.py has what is measured).
#
#   bash benchmarks/gpu_check.sh --prepare    here, with the package registry: download into .whl/ (git-ignored)
#                                             the sources of mamba-ssm and causal-conv1d and the one pure-Python
#                                             package the GPU image lacks (segment-anything)
#   bash benchmarks/gpu_check.sh [--quick]    on the GPU machine, which has no network (carry .whl): install from
#                                             .whl/ with the README's flags, CUDA tests, measurements; the JSON
#                                             goes to $OUT/gpu_check.json (the device tool) or ./gpu_check.json
#   bash benchmarks/gpu_check.sh --dry-run    the measurements' code on the CPU at toy sizes (CI runs this)
#
# Budget: full under 8 minutes, --quick under 3 (no kernel build, smaller sizes). The kernel build is bounded by
# INSTALL_TIMEOUT seconds (default 240; mamba-ssm compiles for every architecture its setup.py lists); when it
# does not finish, the measurements run with the platform's torch scan and the JSON's mamba_ssm_kernel is false.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=full
case "${1:-}" in
  --prepare) mode=prepare ;;
  --quick) mode=quick ;;
  --dry-run) mode=dry-run ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--prepare|--quick|--dry-run]" >&2; exit 2 ;;
esac

if [[ $mode == prepare ]]; then
  pip=(.venv/bin/python -m pip download --disable-pip-version-check -q --no-deps -d .whl)
  # The sdists' metadata step imports torch: build it against the venv's, and skip their CUDA build here.
  MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
    "${pip[@]}" --no-binary :all: --no-build-isolation "mamba-ssm>=2.2" "causal-conv1d>=1.4" || exit 1
  "${pip[@]}" "segment-anything>=1.0" || exit 1
  ls -l .whl
  exit 0
fi

out_dir=${OUT:-.}
python=python3
[[ $mode == dry-run && -x .venv/bin/python ]] && python=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
started=$SECONDS

if [[ $mode != dry-run ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  site=/tmp/gpu-check-site
  offline=(--no-index --find-links .whl --no-deps --no-build-isolation --target "$site")
  "$python" -m pip install -q "${offline[@]}" segment-anything || echo "segment-anything: not installed"
  export PYTHONPATH="$PYTHONPATH:$site"
  if [[ $mode == full ]]; then
    # The README's install flags, offline: force the build (no prebuilt wheel can be fetched), one arch list.
    MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=$(nproc) \
      timeout "${INSTALL_TIMEOUT:-240}" "$python" -m pip install -q "${offline[@]}" causal-conv1d mamba-ssm \
      && echo "cuda extra installed in $((SECONDS - started)) s" \
      || echo "cuda extra NOT installed within ${INSTALL_TIMEOUT:-240} s: measuring the torch scan only"
  fi
  "$python" -m pytest -q -p no:cacheprovider tests/test_selective_scan.py -k cuda \
    2>&1 | tail -5 | tee "$out_dir/gpu_check_tests.txt"
fi

flags=()
[[ $mode == quick || $mode == dry-run ]] && flags=(--"$mode")
"$python" benchmarks/gpu_check.py --out "$out_dir/gpu_check.json" "${flags[@]}"
echo "gpu_check ($mode) done in $((SECONDS - started)) s: $out_dir/gpu_check.json"
