"""pytest setup for benchmarks/: collect `bench_*.py` (pyproject's testpaths and default patterns
only cover tests/test_*.py), so `pytest benchmarks/ --benchmark-only` runs every benchmark here."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import harness` from the bench files


def pytest_collect_file(parent, file_path):
    # Default python_files (test_*.py) would skip these; explicit paths on the command line are
    # already collected by pytest itself, so only add the ones it would not.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and file_path.parent == Path(__file__).parent:
        if not parent.session.isinitpath(file_path):
            return pytest.Module.from_parent(parent, path=file_path)
    return None
