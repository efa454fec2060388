"""Benchmarks of the kernels and the training step, the baseline guard and the plots."""
