#!/usr/bin/env bash
# Drift check: do the newest releases our pyproject ranges allow still work? constraints.txt pins what CI tested;
# this installs WITHOUT it into a temporary venv, then, from the repo root (where a folder could shadow a package):
#   1. `python -m fastdash.train max_steps=2` (README command 1, two steps), must exit 0;
#   2. the fast tests (`pytest -m "not slow"`).
# torch is the one exception: it is installed as the README says (`pip install torch==2.13.0`, the local CPU
# wheel); a newer torch from PyPI is a multi-GB CUDA build. Pass TORCH_SPEC='torch==2.14.1' to try another.
# Usage: bash scripts/check_latest.sh [extra pytest args]. Prints what it resolved; exit status = the checks'.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
say() { echo "== $* ($(( $(date +%s) - start ))s)"; }

say "fresh venv, newest allowed versions (no constraints)"
python3 -m venv "$tmp/venv"
P=$tmp/venv/bin
$P/pip install -q --upgrade pip
$P/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
$P/pip install -q -e '.[test]'
$P/pip freeze --exclude-editable > "$tmp/resolved.txt"
echo "resolved (differences from constraints.txt):"
# "<" only in the lock (e.g. the [real] extra, not installed here), ">" only here; a new version shows as both.
{ diff <(grep -v '^#' constraints.txt | sort -f) <(sed -E 's/^(torch==[^+]+)\+.*/\1/' "$tmp/resolved.txt" | sort -f) \
    || true; } | grep '^[<>]' || echo "  none"

say "python -m fastdash.train max_steps=2, from the repo root"
( cd "$root" && "$P/python" -m fastdash.train max_steps=2 output_dir="$tmp/run" )
test -f "$tmp/run/summary.json"

say "fast tests"
( cd "$root" && "$P/python" -m pytest -q -m "not slow" -p no:cacheprovider "$@" )
say "drift check passed"
