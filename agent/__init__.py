"""The autonomous recipe-research loop (propose, train through the harness, keep or revert)."""
