"""The launch grids are sized from the device's SM count: at the recipe shapes (N from 1k to 500k
tokens, H 896-2048, V = 151,936) every kernel of both designs launches at least two waves of
programs, so no SM idles (before: the single pass's forward launched 64 programs and its dX 28 on a
132-SM H100). Runs in a subprocess: the GPU's 128-token tiles, not the interpreter's 64."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_PROGRAMS = """
import json
from fastdash_kernels.cost_model import RECIPE_SHAPES, launch_programs
print(json.dumps({sms: [[n, h, launch_programs(n, h, sms=sms)] for n, h in RECIPE_SHAPES] for sms in (132, 114, 78)}))
"""
_CONFIGS = """
from fastdash_kernels import triton_backward as B, triton_logprob as F, triton_single as S
print([len(k.configs) for k in (F._logprob_fwd_kernel, B._dz_kernel, B._dx_kernel, B._dw_kernel, S._dz_from_z_kernel)])
"""


def _gpu_python(code, **env):
    env = {**{k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDASH_AUTOTUNE")}, **env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_quick_autotune_keeps_one_config_per_kernel():
    """gpu_check's FASTDASH_AUTOTUNE=quick: no kernel times several configs at each new shape."""
    assert all(n > 1 for n in json.loads(_gpu_python(_CONFIGS)))
    assert json.loads(_gpu_python(_CONFIGS, FASTDASH_AUTOTUNE="quick")) == [1] * 5


def test_every_kernel_fills_two_waves_of_sms_at_recipe_shapes():
    short = [(sms, n, h, design, kernel, p)
             for sms, rows in json.loads(_gpu_python(_PROGRAMS)).items() for n, h, designs in rows
             for design, kernels in designs.items() for kernel, p in kernels.items() if p < 2 * int(sms)]
    assert not short, short
