"""The MFU peak looked up by device name: a longer name is never shadowed by a shorter one."""

import pytest
import torch

from eclip import hardware


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A10G", 70e12),
    ("NVIDIA A10", 125e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12),
    ("NVIDIA L4", 121e12),
    ("Tesla T4", None),  # not listed: no made-up peak
])
def test_peak_by_device_name(name, peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert hardware.peak_bf16_flops(torch.device("cuda")) == peak


def test_no_peak_on_a_cpu():
    assert hardware.peak_bf16_flops(torch.device("cpu")) is None
