"""Peak dense throughput of a device, for MFU (`train/metrics.py`) and `tools/bench_step`."""

from __future__ import annotations

from typing import Optional

import torch

# dense bf16/fp16 tensor-core peaks (TFLOP/s) by device-name fragment; fp32 runs use the same table (documented)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0, "V100": 125.0, "4090": 165.0}


def device_peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None
