#!/usr/bin/env bash
# The one-shot GPU check (docs/gpu.md): every CUDA path of fastdash on one H100/H200, in at most
# 480 s of steps, the whole command under 540 s; results rewritten after every step.
#
#   bash scripts/gpu_check.sh --out DIR            # checks.json, summary.md, steps.log, pytest.txt in DIR
#   bash scripts/gpu_check.sh --cpu-dry --out DIR  # every step at tiny sizes on CPU (CI)
#
# The GPU image has no network: wheels the checks need beyond it (liger-kernel, the Liger baseline of
# the speed step) are installed from .whl/ beside the checkout when present (docs/gpu.md says how to
# fill it; .whl/ is git-ignored, keep it under 64 MiB).
set -euo pipefail
export GPU_CHECK_T0="${GPU_CHECK_T0:-$(date +%s.%N)}"  # the budget's clock starts here, before any install
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"  # the GPU image's interpreter is python3

case " $* " in *" --cpu-dry "*) dry=1 ;; *) dry=0 ;; esac  # a CPU dry run (tests, CI) installs nothing
if [[ $dry == 0 ]] && compgen -G ".whl/*.whl" > /dev/null; then
  echo "gpu_check: installing $(ls .whl/*.whl | wc -l) wheel(s) from .whl/ (no index, no deps)"
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl \
    || echo "gpu_check: wheel install failed; continuing"
fi

# fastdash from this checkout, without touching the network or its declared dependencies
# (datasets / math-verify are absent on the GPU image and must not be needed to import or train).
if ! "$PY" -c "import fastdash_kernels, fastdash" 2> /dev/null; then
  if ! timeout 60 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . 2> /dev/null; then
    export PYTHONPATH="$ROOT:$ROOT/kernels${PYTHONPATH:+:$PYTHONPATH}"  # kernels/fastdash_kernels, by hand
    echo "gpu_check: fastdash not installable offline; importing it from the checkout"
  fi
fi

exec "$PY" scripts/gpu_check.py "$@"
