"""Packaging for the eCLIP training core, its Triton kernels and the research loop."""

from setuptools import find_packages, setup

setup(
    name="eclip-fast",
    version="0.1.0",
    description="Fast eCLIP (CLIP + expert region heatmaps) training inside a fixed time "
    "budget, Triton kernels, and an autonomous recipe-research loop.",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "eclip", "eclip.*", "agent", "agent.*"]),
    package_data={"eclip": ["*.md"]},
    install_requires=[
        # torch is installed first (a local CPU wheel on CI machines, the preinstalled build on
        # GPU machines); any recent release satisfies the range, so pip never swaps it.
        "torch>=2.4",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tokenizers>=0.19",  # Tokenizer.encode_special_tokens
        "pillow>=10",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "anthropic>=0.40",
        # Triton ships Linux x86_64 wheels only; pinned to the GPU machine's minor version so
        # the CPU interpreter behaves like the GPU compiler.
        "triton>=3.6,<3.7; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "ruff>=0.5"],
        # pretrained towers (eclip.pretrained): "hf" installs anywhere; timm needs torchvision,
        # which has no build matching the CPU-only PyTorch wheel, so CI installs "hf" only
        "hf": ["transformers>=4.40"],
        "timm": ["timm>=1.0"],
        "pretrained": ["transformers>=4.40", "timm>=1.0"],
    },
)
