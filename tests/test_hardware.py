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
    # the rest of the table, each entry at its data-sheet dense bf16 figure (not the sparse one)
    ("NVIDIA B200", 2250e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
    ("NVIDIA GeForce RTX 3090", 71e12),
    ("Tesla T4", None),  # not listed: no made-up peak
])
def test_peak_by_device_name(name, peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert hardware.peak_bf16_flops(torch.device("cuda")) == peak


def test_no_peak_on_a_cpu():
    assert hardware.peak_bf16_flops(torch.device("cpu")) is None


@pytest.mark.parametrize("kind", ["cpu", "mps", "meta"])
def test_no_peak_on_a_device_that_is_not_cuda(kind, monkeypatch):
    # only a CUDA device has a name to look up: any other kind gets no MFU, and never asks
    # CUDA for a name (on an MPS machine that call fails)
    def no_cuda(device=None):
        raise AssertionError(f"asked CUDA for the name of {device}")

    monkeypatch.setattr(torch.cuda, "get_device_name", no_cuda)
    assert hardware.peak_bf16_flops(torch.device(kind)) is None


def test_the_device_index_picks_the_card(monkeypatch):
    # on a machine with two kinds of card the one the run uses is named, and its peak taken
    names = {None: "NVIDIA A100-SXM4-80GB", 0: "NVIDIA A100-SXM4-80GB", 1: "NVIDIA H100 PCIe"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[getattr(device, "index", device)])
    assert hardware.device_name(torch.device("cuda:1")) == "NVIDIA H100 PCIe"
    assert hardware.peak_bf16_flops(torch.device("cuda:1")) == 756e12
    assert hardware.peak_bf16_flops(torch.device("cuda:0")) == 312e12


def test_a_cpu_is_named_with_its_compute_threads():
    # a CPU result names the intra-op threads the run computed with (torch.set_num_threads),
    # not the inter-op pool's size: set a count the pool does not have, so the two differ
    import platform

    before = torch.get_num_threads()
    threads = 3 if torch.get_num_interop_threads() != 3 else 4
    torch.set_num_threads(threads)
    try:
        name = hardware.device_name(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
    assert name == f"cpu ({platform.processor() or platform.machine()}, {threads} threads)"


@pytest.mark.parametrize("name", ["NVIDIA RTX A1000", "NVIDIA RTX A1000 6GB Laptop GPU", "NVIDIA L4000"])
def test_a_card_whose_name_merely_contains_a_listed_one_gets_no_peak(name, monkeypatch):
    # "A100" is inside "RTX A1000": its MFU came out against the A100's 312 TFLOP/s
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert hardware.peak_bf16_flops(torch.device("cuda")) is None
