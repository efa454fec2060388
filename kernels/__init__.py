"""Triton kernels for eCLIP training, each with a plain PyTorch reference."""
