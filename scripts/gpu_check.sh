#!/usr/bin/env bash
# Validate every CUDA path of fastdash on one H100/H200 in ~10 minutes (steps: scripts/gpu_check.py).
#
#   bash scripts/gpu_check.sh              # results in benchmarks/results/gpu-<device>-<date>/
#   bash scripts/gpu_check.sh --cpu-dry    # every step at tiny sizes on CPU
#
# The GPU image has no network: wheels the checks need beyond it (liger-kernel, the Liger baseline
# of step 3) are installed from .whl/ beside the checkout when present. Fill it on a machine with
# network:  pip download --no-deps -d .whl liger-kernel   (.whl/ is git-ignored; keep it < 64 MiB)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"

if compgen -G ".whl/*.whl" > /dev/null; then
  echo "gpu_check: installing $(ls .whl/*.whl | wc -l) wheel(s) from .whl/ (no index, no deps)"
  "$PY" -m pip install -q --no-index --no-deps .whl/*.whl || echo "gpu_check: wheel install failed; continuing"
fi

# fastdash from this checkout, without touching the network or its declared dependencies
# (datasets / math-verify are absent on the GPU image and must not be needed to import or train).
if ! "$PY" -c "import fastdash_kernels, fastdash" 2> /dev/null; then
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . 2> /dev/null; then
    SHIM="$(mktemp -d)"  # the package-dir mapping kernels/ -> fastdash_kernels, by hand
    ln -s "$ROOT/kernels" "$SHIM/fastdash_kernels"
    export PYTHONPATH="$ROOT:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: fastdash not installable offline; importing it from the checkout ($SHIM)"
  fi
fi

exec "$PY" scripts/gpu_check.py "$@"
