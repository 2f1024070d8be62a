"""The one table of accelerator peaks the benchmarks compare against, and the device's name."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

# Dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, SXM parts; no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def peak_bf16_tflops(name: str | None = None) -> float | None:
    """The peak for a CUDA device name ('NVIDIA H100 80GB HBM3' -> 989), None when unknown or CPU."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "gpu" else cpu_name()


def device_slug(device: str) -> str:
    """A short file-name part: 'h100', 'h200', 'a100', ... or 'cpu'."""
    if device != "gpu":
        return "cpu"
    name = device_name(device)
    return next((k.lower() for k in PEAK_BF16_TFLOPS if k in name), "gpu")
