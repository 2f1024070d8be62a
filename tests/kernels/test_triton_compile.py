"""Compile the Triton kernels for sm_90 (H100) down to cubin without a GPU, as they are launched.

The interpreter runs the kernels' maths on CPU but skips the real lowering (layouts, shared
memory, dot shapes); this catches kernels that would not compile on the GPU and reports their
registers, shared memory and spills (compile_sm90.py; run it directly to read the table). Runs in
a subprocess because the conftest turns TRITON_INTERPRET on.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).with_name("compile_sm90.py")


def _compile(*flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
    print(out.stdout)  # the resource table (pytest -s shows it)
    return out.stdout


def test_kernels_compile_for_sm90_as_launched():
    text = _compile()
    assert "regs" in text and "dw mode 2" in text
    # dX / dW skip filtered tiles without a data-dependent `if` around their loads, so Triton's software
    # pipeliner keeps more than one copy of the operand tiles in flight (an `if` leaves 1).
    gemms = [line for line in text.splitlines() if line.startswith(("dx", "dw"))]
    depth = {line.split()[0] + " " + line.split()[1]: int(re.search(r"tile buffers (\d+)", line)[1]) for line in gemms}
    assert len(gemms) == 6 and all(d >= 2 for d in depth.values()), gemms


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FASTDASH_COMPILE_ALL_CONFIGS"),
                    reason="the sweep over every autotune config takes minutes on 2 cores; the launch-time config "
                           "is compiled above. Run it with FASTDASH_COMPILE_ALL_CONFIGS=1 (kernel changes)")
def test_every_autotune_config_compiles_for_sm90():
    _compile("--all-configs")
