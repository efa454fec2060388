"""Shared pieces of the training-loop and harness tests (the ``test_train*.py`` and
``test_harness*.py`` files, ``test_sandbox.py``): a small model's options, recipes that wrap
the template's ``train_step`` or carry a small model, and a call of ``eclip.train.main``
in-process. The dataset they train on is conftest's ``train_cache`` (the harness's:
``small_cache``)."""

import json

from eclip import train

# A model small enough that a test run takes seconds on 2 cores.
SMALL = ["--model.vision.patch_size=16", "--model.vision.width=64", "--model.vision.depth=2",
         "--model.text.width=64", "--model.text.depth=1", "--model.embed_dim=64",
         "--model.expert.width=32", "--model.vision.pool=cls", "--model.text.pool=cls",
         "--batch_size=64", "--log-every=2"]


# The same small model as a recipe's HPARAMS["model"] entry, for runs through the harness.
SMALL_MODEL = ('"model": {"vision.width": 64, "vision.depth": 1, "text.width": 64, "text.depth": 1, '
               '"embed_dim": 64},')


def small_recipe(tmp_path, extra: str = "", model: str = SMALL_MODEL):
    """The template recipe with ``model`` as its model entry, plus ``extra`` code appended."""
    path = tmp_path / "recipe.py"
    path.write_text(train.TEMPLATE.read_text().replace('    "model": {},', "    " + model, 1) + extra)
    return path


def recipe_with(tmp_path, extra: str):
    """The template recipe plus ``extra`` code appended (to wrap train_step)."""
    path = tmp_path / "recipe.py"
    path.write_text(train.TEMPLATE.read_text() + "\n\n" + extra)
    return path


def recipe_at_call(tmp_path, before: str = "", after: str = "", prelude: str = ""):
    """The template recipe whose train_step counts its calls in ``_calls[0]`` and runs the
    code ``before`` ahead of the real step and ``after`` behind it (the step's metrics are
    ``out``), both written as at the function's top level, e.g.
    ``"if _calls[0] == 5:\\n    raise KeyboardInterrupt"``; ``prelude`` goes at module level."""
    def indent(code):
        return "".join(f"    {line}\n" for line in code.splitlines())
    return recipe_with(tmp_path, (
        f"{prelude}_base_train_step = train_step\n_calls = [0]\n\n"
        "def train_step(model, optimizer, batch, progress):\n"
        "    _calls[0] += 1\n"
        f"{indent(before)}"
        "    out = _base_train_step(model, optimizer, batch, progress)\n"
        f"{indent(after)}"
        "    return out\n"))


def run(argv, capsys):
    rc = train.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def metric_rows(out) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``, in order."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
