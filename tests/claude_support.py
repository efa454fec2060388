"""Shared pieces of the Claude proposer tests (``test_claude_proposer*.py``): the test key, a
scripted runner, the loop's arguments, and helpers that read the journal, a recorded request's
tool results and build the usual edit and submission. Their fixtures, ``api`` (the fake
Messages API of ``tests/fake_messages.py``) and ``ws`` (a workspace past its baselines), are
conftest's."""

from agent import journal
from tests.fake_messages import tool

KEY = "sk-ant-test-DO-NOT-LEAK-4f2a9c"
LR_OLD, LR_NEW = '"lr": 1e-3,', '"lr": 2e-3,'


def scripted(ranks, calls=None):
    seq = iter(ranks)

    def fake(recipe, data, budget_s, out, **kw):
        if calls is not None:
            calls.append(recipe.read_text())
        r = next(seq)
        if r is None:
            return {"status": "crash", "val_mean_rank": None, "log_tail": "Traceback\nNameError: name 'lr2' is not defined"}
        return {"status": "ok", "val_mean_rank": r, "duration_s": 0.01}
    return fake


def _args(root, cache, max_experiments, proposer="claude", *extra):
    return ["--tag", "c", "--workspace-root", str(root), "--data", str(cache), "--budget-s", "1",
            "--noise-runs", "2", "--max-experiments", str(max_experiments), "--proposer", proposer,
            "--api-pause-s", "0.01", "--device", "cpu", *extra]


def _exps(ws):
    return journal.experiments(journal.read(ws.journal_path))


def _tool_results(request):
    """tool_result blocks of the last user message of a recorded request."""
    return [b for b in request["body"]["messages"][-1]["content"] if b.get("type") == "tool_result"]


def _edit(old=LR_OLD, new=LR_NEW, path="recipe.py"):
    return tool("edit", {"command": "str_replace", "path": path, "old_str": old, "new_str": new})


SUBMIT = tool("submit", {"hypothesis": "A higher peak rate converges faster in a short budget.",
                         "description": "lr 1e-3 -> 2e-3", "expected_effect": "mean rank -3"})
