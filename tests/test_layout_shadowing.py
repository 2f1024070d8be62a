"""Nothing in the repo root can shadow an installed distribution.

`python -m fastdash.train` (README command 1) puts the working directory first on sys.path, so a
top-level folder with an ``__init__.py`` (or a top-level ``.py`` file) named like an installed package
hides it. transformers 5.25 imports Hugging Face's ``kernels``; our ``kernels/`` folder used to be a
regular package and broke every run started from the repo root.
"""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN = {"fastdash", "fastdash_kernels"}  # our own distribution's import names


def _top_level_names() -> dict[str, Path]:
    """Every name the repo root makes importable: folders (package or namespace) and .py files."""
    names = {}
    for p in ROOT.iterdir():
        if p.name.startswith(".") or not (p.is_dir() or p.suffix == ".py"):
            continue
        name = p.stem if p.is_file() else p.name
        if name.isidentifier():
            names[name] = p
    return names


def test_no_top_level_folder_is_a_regular_package_but_ours():
    """A regular package in the root wins over any installed one; a namespace folder never does."""
    regular = {n for n, p in _top_level_names().items() if p.is_dir() and (p / "__init__.py").exists()}
    assert regular <= {"fastdash"}, f"{sorted(regular - {'fastdash'})} would shadow installed packages from the root"
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_installed_distributions_win_from_the_repo_root(tmp_path):
    """Import each installed distribution's name that a root entry shares, from the root, as `python -m` does."""
    installed = importlib.metadata.packages_distributions()
    clashes = sorted(n for n in _top_level_names() if n in installed and n not in OWN)
    code = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    m = importlib.import_module(n)\n"
        "    out[n] = [getattr(m, '__file__', None) or ''] + list(getattr(m, '__path__', []))\n"
        "print(json.dumps(out))\n"
    )
    # -c puts '' (the working directory) first on sys.path, exactly as -m does. The same imports from an empty
    # directory are the installed packages: from the root they must resolve to the same files (a venv may itself
    # live inside the checkout, e.g. CI's .ci-venv, so "inside the repo" alone proves nothing).
    where = {}
    for cwd in (ROOT, tmp_path):
        res = subprocess.run([sys.executable, "-c", code, *clashes], cwd=cwd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        where[cwd] = json.loads(res.stdout)
    for name in clashes:
        assert where[ROOT][name] == where[tmp_path][name], (
            f"from the repo root, `import {name}` ({installed[name]}) resolves to {where[ROOT][name]}, "
            f"not to the installed {where[tmp_path][name]}")
