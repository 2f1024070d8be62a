"""fastdash_kernels ships in a regular wheel and imports without Triton."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_fastdash_kernels(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("fastdash-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for mod in ("__init__", "api", "loss", "reference", "torch_backend", "triton_logprob", "triton_backward",
                "triton_tiles", "segment", "liger", "cce"):
        assert f"fastdash_kernels/{mod}.py" in names, sorted(n for n in names if "kernels" in n)
    assert not any(n.startswith("kernels/") for n in names)


def test_import_and_torch_path_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, fastdash_kernels as fk\n"
        "x = torch.randn(5, 8); w = torch.randn(11, 8); y = torch.randint(0, 11, (5,))\n"
        "assert fk.resolve_backend('auto', x) == 'torch'\n"
        "lp = fk.fused_linear_logprob(x, w, y)\n"
        "assert torch.allclose(lp, torch.log_softmax(x @ w.T, -1)[torch.arange(5), y], atol=1e-5)\n"
        "try:\n    fk.fused_linear_logprob(x, w, y, backend='triton')\nexcept ImportError as e:\n    print('ok', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ok")


def test_profile_without_cuda_exits_cleanly():
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "fastdash.profile", "kernels"], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr and "Traceback" not in out.stderr
    help_text = subprocess.run([sys.executable, "-m", "fastdash.profile", "kernels", "--help"], capture_output=True,
                               text=True, check=True, cwd=ROOT).stdout
    assert "ncu " in help_text
