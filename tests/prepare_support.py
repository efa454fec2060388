"""Shared pieces of the ``eclip.prepare`` tests on awkward inputs (``test_prepare_sources.py``,
``test_prepare_out.py``, ``test_prepare_options.py``): the arguments of a manifest build and
the records a build wrote. The image folder they read is conftest's ``images``."""

import json


def manifest_args(images, path, out, *extra):
    """Every image in train, one fold: the split and folds are the source's, not a draw."""
    return ["--format", "manifest", "--images", images, "--manifest", path, "--out", out, "--image-size", 8,
            "--workers", 1, "--vocab-size", 300, "--val-frac", 0, "--test-frac", 0, "--folds", 1, *extra]


def records(out):
    return [json.loads(x) for x in (out / "records.jsonl").read_text(encoding="utf-8").splitlines()]
