"""What the machine offers a run: peak throughput by device name, for model FLOPs
utilisation (MFU), and the CPU threads a CPU run computes with (``torch_threads``, which
the harness's limits on CPU time divide by).

Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity). A device that is
not listed gets ``None``: an MFU against a guessed peak would be a made-up number.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

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


def runs_on_cpu(device: str) -> bool:
    """Whether ``--device`` puts the run on the CPU (``auto``: when there is no GPU)."""
    if device == "auto":
        return not torch.cuda.is_available()
    try:
        return torch.device(device).type == "cpu"
    except (RuntimeError, ValueError):  # not a device: the training process says so
        return False


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, and a cgroup (v2) CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def torch_threads(device: str) -> int | None:
    """What the limits on a CPU run divide CPU time by: the threads a child computes with
    by default (torch's count, as the harness sees it), at most the CPUs it may use (a
    recipe that sets another count gains no compute by it); None for a GPU run."""
    return max(1, min(torch.get_num_threads(), usable_cpus())) if runs_on_cpu(device) else None
