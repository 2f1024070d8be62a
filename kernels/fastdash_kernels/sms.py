"""The SM count the Triton launch grids are sized from (forward and backward both read it)."""
from __future__ import annotations

import torch


def num_sms(device) -> int:
    """The launch grids are sized from this: two waves of programs per SM where the shape allows."""
    if device.type != "cuda":
        return 8  # interpreter: a small count, so CPU-sized tests split (tests also force splits)
    return torch.cuda.get_device_properties(device).multi_processor_count
