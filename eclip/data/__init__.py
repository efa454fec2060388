"""Data: the built-in synthetic dataset, readers for real formats, and the prepared cache."""
