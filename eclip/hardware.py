"""Peak throughput by device name, for model FLOPs utilisation (MFU).

Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity). A device that is
not listed gets ``None``: an MFU against a guessed peak would be a made-up number.
"""

from __future__ import annotations

import re

import torch

# (words in torch.cuda.get_device_name, dense bf16 FLOP/s); matched as whole words ("A100"
# is not the RTX A1000's), and the first match wins, so "H100 NVL" comes before "H100"
BF16_PEAKS = (
    ("H200 NVL", 835e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),  # SXM
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_bf16_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAKS:
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", name):
            return peak
    return None
