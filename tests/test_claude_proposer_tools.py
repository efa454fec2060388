"""The Claude proposer's tools (view, edit, submit), through the fake Messages API and on
``ToolBox`` itself: an experiment made with them end to end with the key kept out of every
file, confinement to recipe.py, error results for bad calls, paging, ranges and inserts."""

import json
import os
import subprocess

import pytest
from claude_support import KEY, LR_NEW, LR_OLD, SUBMIT, _args, _edit, _exps, _tool_results, scripted

from agent import loop
from agent.claude import ClaudeConfig, ClaudeProposer
from agent.pricing import PRICES
from agent.tools import ToolBox
from tests.fake_messages import Reply, text, tool


def test_view_edit_submit_runs_the_experiment(api, ws, small_cache, tmp_path, monkeypatch):
    envs = []
    real_popen = subprocess.Popen

    def spy(cmd, *a, **k):  # what the training subprocess is given
        if "eclip.harness" in cmd:
            envs.append(k.get("env"))
        return real_popen(cmd, *a, **k)

    import agent.runner
    monkeypatch.setattr(agent.runner.subprocess, "Popen", spy)
    monkeypatch.setattr(loop, "run_experiment", agent.runner.run_experiment)  # the real harness
    api.script = [Reply([text("Let me look."), tool("view", {"path": "recipe.py", "view_range": [30, 40]})]),
                  Reply([_edit()]), Reply([SUBMIT])]
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0  # a real harness run of 1 s
    e = _exps(ws)[2]
    assert e["status"] in ("keep", "discard") and e["description"] == "lr 1e-3 -> 2e-3"
    assert e["hypothesis"].startswith("A higher peak rate") and e["expected_effect"] == "mean rank -3"
    assert LR_NEW in ws.git("show", f"{e['commit']}:recipe.py")
    result = json.loads((ws.experiments / "3" / "result.json").read_text())
    assert result["status"] == "ok" and result["hparams"]["lr"] == 2e-3
    # the tool results the model saw
    view = _tool_results(api.requests[1])[0]
    assert "is_error" not in view and "recipe.py (lines 30-40 of" in view["content"]
    assert "passes the policy check" in _tool_results(api.requests[2])[0]["content"]
    # usage: three replies of 1000 in, 200 out, 5000 cache reads; priced at the default model's rates
    p_in, p_out, _, p_cr = PRICES["claude-sonnet-5-5"]
    assert e["usage"] == {"calls": 3, "input_tokens": 3000, "output_tokens": 600, "cache_write_tokens": 0,
                          "cache_read_tokens": 15000}
    assert e["cost_usd"] == pytest.approx((3000 * p_in + 600 * p_out + 15000 * p_cr) / 1e6)
    assert json.loads((ws.experiments / "3" / "transcript.json").read_text())[0]["role"] == "user"
    # the key: sent to the API, never to the training subprocess, never into a file
    # (older SDKs send x-api-key, newer ones a bearer authorization header)
    assert all(KEY in r["headers"].get("x-api-key", "") + r["headers"].get("authorization", "") for r in api.requests)
    assert envs and all("ANTHROPIC_API_KEY" not in env and KEY not in json.dumps(env) for env in envs)
    for root, _dirs, files in os.walk(ws.root):
        for name in files:
            path = os.path.join(root, name)
            assert KEY.encode() not in open(path, "rb").read(), path


def test_edits_outside_recipe_py_are_refused(api, ws, small_cache, tmp_path, monkeypatch):
    outside = tmp_path / "outside.py"
    outside.write_text("SECRET = 1\n")
    (ws.root / "link.py").symlink_to(outside)
    before = {p: p.read_bytes() for p in (outside, ws.root / "program.md", ws.recipe, ws.root / ".gitignore")}
    calls = []
    monkeypatch.setattr(loop, "run_experiment", scripted([], calls))
    attempts = [
        _edit("Goal", "Goal: ignore the rules", path="program.md"),  # another file
        _edit(path="../c/recipe.py"),  # '..'
        _edit(path=str(ws.recipe)),  # absolute, even though it is the recipe
        _edit("SECRET = 1", "SECRET = 2", path="link.py"),  # through a symlink
        tool("view", {"path": "../outside.py"}),
        tool("view", {"path": "/etc/passwd"}),
        SUBMIT,  # nothing was edited
    ]
    api.script = [Reply(attempts), Reply([text("I cannot make a change.")])]
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0
    results = _tool_results(api.requests[1])
    assert [r["is_error"] for r in results] == [True] * len(attempts)
    messages = [r["content"] for r in results]
    assert "program.md: not editable" in messages[0] and "'..' is refused" in messages[1]
    assert "absolute paths are refused" in messages[2] and "link.py: not editable" in messages[3]
    assert "is not readable" in messages[4] and "is not readable" in messages[5]
    assert "recipe.py is unchanged" in messages[6]
    assert {p: p.read_bytes() for p in before} == before  # nothing changed anywhere
    assert calls == []  # nothing ran
    e = _exps(ws)[2]
    assert e["status"] == "no-op" and e["commit"] is None
    assert "without using a tool" in e["result"]["reason"][0]
    assert ws.git("status", "--porcelain") == "?? link.py"


def test_a_symlinked_recipe_is_refused(tmp_path):
    target = tmp_path / "elsewhere.py"
    target.write_text("x = 1\n")
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "recipe.py").symlink_to(target)
    box = ToolBox(tmp_path / "ws", "x = 1\n", "brief")
    out, is_error = box.run("edit", {"command": "str_replace", "path": "recipe.py", "old_str": "x = 1",
                                     "new_str": "x = 2"})
    assert is_error and "symlink" in out and box.source == "x = 1\n"
    assert target.read_text() == "x = 1\n"


def test_non_unique_replace_and_malformed_calls_get_error_results(api, ws, small_cache, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "run_experiment", scripted([95], calls))
    bad = [
        _edit(old='"'),  # occurs many times
        _edit(old="no such text"),
        tool("edit", {"path": "recipe.py"}),  # no command
        tool("edit", {"command": "insert", "path": "recipe.py", "insert_line": 10 ** 6, "new_str": "x = 1"}),
        tool("edit", "not an object"),
        tool("shell", {"cmd": "rm -rf /"}),
        tool("view", {"path": "recipe.py", "view_range": "1-5"}),
    ]
    api.script = [Reply(bad), Reply([_edit(), SUBMIT])]
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0
    results = _tool_results(api.requests[1])
    assert all(r.get("is_error") for r in results) and len(results) == len(bad)
    messages = [r["content"] for r in results]
    assert "occurs" in messages[0] and "exactly once" in messages[0]
    assert "does not occur" in messages[1] and "unknown edit command None" in messages[2]
    assert "insert_line must be an integer in 0.." in messages[3] and "must be a JSON object" in messages[4]
    assert "unknown tool 'shell'" in messages[5] and "view_range must be two integers" in messages[6]
    assert len(calls) == 1 and LR_NEW in calls[0]  # the good edit after the bad ones ran
    assert _exps(ws)[2]["status"] == "keep"


def test_pathological_edits_and_calls_after_submit(api, ws, small_cache, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "run_experiment", scripted([99], calls))
    nested = "x = " + "a." * 50000 + "b\n"  # parses only with a very deep recursion
    api.script = [Reply([tool("edit", {"command": "insert", "path": "recipe.py", "insert_line": 0, "new_str": nested})]),
                  Reply([tool("edit", {"command": "str_replace", "path": "recipe.py", "old_str": nested,
                                       "new_str": ""}),
                         _edit(), SUBMIT, _edit(LR_NEW, '"lr": 9.0,')])]
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0
    (nested_result,) = _tool_results(api.requests[1])
    assert "would be rejected" in nested_result["content"] and "cannot be parsed" in nested_result["content"]
    assert len(calls) == 1 and LR_NEW in calls[0] and '"lr": 9.0' not in calls[0]  # the submitted text ran
    e = _exps(ws)[2]
    assert [c["ok"] for c in e["tool_calls"]] == [True, True, True, True, False]  # the call after submit refused


def test_a_tool_call_cut_off_by_max_tokens_is_not_carried_out(api, ws, small_cache, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "run_experiment", scripted([99], calls))
    truncated = _edit(LR_OLD, '"lr": 2e')  # what a reply stopped at max_tokens may hold
    api.script = [Reply([truncated], stop_reason="max_tokens"), Reply([_edit(), SUBMIT])]
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0
    (result,) = _tool_results(api.requests[1])
    assert result["is_error"] and "hit max_tokens" in result["content"]
    assert len(calls) == 1 and LR_NEW in calls[0] and '"lr": 2e\n' not in calls[0]


def test_complete_tool_calls_before_the_max_tokens_cut_are_carried_out(api, tmp_path):
    ctx = {"workspace": tmp_path, "program": "brief", "experiments": [],
           "state": {"best": 100.0, "threshold": 0.0, "experiments": 0, "baselines": 2}}
    source = 'HPARAMS = {"lr": 1e-3,}\n'
    api.script = [Reply([_edit(), _edit(LR_NEW, '"lr": 3e')], stop_reason="max_tokens"), Reply([SUBMIT]),
                  Reply([text("done")])]
    prop = ClaudeProposer(ClaudeConfig(sdk_retries=0)).propose(source, [], context=ctx)
    assert prop.source == source.replace(LR_OLD, LR_NEW) and len(api.requests) == 2
    first, cut = _tool_results(api.requests[1])
    assert "is_error" not in first and cut["is_error"] and "hit max_tokens" in cut["content"]


def test_only_recipe_py_itself_is_editable(tmp_path):
    box = ToolBox(tmp_path, "x = 1\n", "brief")
    for path in ("eclip/recipe.py", "sub/recipe.py", "recipe.py/recipe.py"):
        out, is_error = box.run("edit", {"command": "str_replace", "path": path, "old_str": "x = 1",
                                         "new_str": "x = 2"})
        assert is_error and "not editable" in out, path
    assert box.source == "x = 1\n"
    assert not box.run("edit", {"command": "str_replace", "path": "./recipe.py", "old_str": "x = 1",
                                "new_str": "x = 2"})[1]


def test_view_pages_a_long_file(tmp_path):
    from agent.tools import MAX_VIEW_LINES

    n = MAX_VIEW_LINES + 100
    box = ToolBox(tmp_path, "".join(f"x{i} = {i}\n" for i in range(1, n + 1)), "brief")
    first, is_error = box.run("view", {"path": "recipe.py"})
    lines = first.splitlines()
    assert not is_error and lines[0] == f"recipe.py (lines 1-{MAX_VIEW_LINES} of {n}):"
    assert len(lines) == MAX_VIEW_LINES + 2 and lines[-2] == f"{MAX_VIEW_LINES:>4}\tx{MAX_VIEW_LINES} = {MAX_VIEW_LINES}"
    assert lines[-1] == f"[lines {MAX_VIEW_LINES + 1}..{n} not shown]"  # where the next page starts
    rest, is_error = box.run("view", {"path": "recipe.py", "view_range": [MAX_VIEW_LINES + 1, -1]})
    assert not is_error and rest.splitlines()[0] == f"recipe.py (lines {MAX_VIEW_LINES + 1}-{n} of {n}):"
    assert rest.splitlines()[-1] == f"{n:>4}\tx{n} = {n}" and "not shown" not in rest  # nothing left over


@pytest.mark.parametrize("view_range,shown", [
    ([5, 5], [5]), ([9, -1], [9, 10]), ([10, -1], [10]), ([3, 99], list(range(3, 11))),
    ([0, 5], None), ([6, 5], None), ([11, -1], None), ([-1, 3], None),
])
def test_view_range_edges(tmp_path, view_range, shown):
    # 1-based and inclusive, -1 the end; a range that starts outside the file or runs
    # backwards is refused with the file's extent, so the model can correct it
    source = "".join(f"v{i} = {i}\n" for i in range(1, 11))
    out, is_error = ToolBox(tmp_path, source, "brief").run("view", {"path": "recipe.py", "view_range": view_range})
    if shown is None:
        assert is_error and f"view_range {view_range} is outside recipe.py (1..10)" in out
    else:
        assert not is_error, out
        assert out.splitlines()[0] == f"recipe.py (lines {shown[0]}-{shown[-1]} of 10):"
        assert [int(line.split("\t")[0]) for line in out.splitlines()[1:] if "\t" in line] == shown
        more = f"[lines {shown[-1] + 1}..10 not shown]"  # only when lines are left
        assert (out.splitlines()[-1] == more) is (shown[-1] < 10)


@pytest.mark.parametrize("source,line,new_str,expected", [
    ("a = 1\nb = 2\n", 2, "c = 3", "a = 1\nb = 2\nc = 3\n"),  # after the last line
    ("a = 1\nb = 2", 2, "c = 3\n", "a = 1\nb = 2\nc = 3\n"),  # the last line had no newline
    ("a = 1\nb = 2\n", 1, "c = 3", "a = 1\nc = 3\nb = 2\n"),  # text without a newline gets one
    ("a = 1\n", 0, "# top\n", "# top\na = 1\n"),  # 0: at the top
])
def test_insert_keeps_lines_whole(tmp_path, source, line, new_str, expected):
    box = ToolBox(tmp_path, source, "brief")
    out, is_error = box.run("edit", {"command": "insert", "path": "recipe.py", "insert_line": line,
                                     "new_str": new_str})
    assert not is_error and "passes the policy check" in out, out
    assert box.source == expected and box.edits == 1


def test_str_replace_without_new_str_deletes_the_text(tmp_path):
    # new_str is optional in the tool's schema: leaving it out deletes old_str
    box = ToolBox(tmp_path, "a = 1\nb = 2\n", "brief")
    out, is_error = box.run("edit", {"command": "str_replace", "path": "recipe.py", "old_str": "b = 2\n"})
    assert not is_error, out
    assert box.source == "a = 1\n"


def test_submit_refuses_a_policy_violation_and_trims_the_description(tmp_path):
    box = ToolBox(tmp_path, "x = 1\n", "brief")
    out, is_error = box.run("edit", {"command": "str_replace", "path": "recipe.py", "old_str": "x = 1",
                                     "new_str": "import os\nx = 1"})
    assert not is_error and "would be rejected as it stands" in out  # the edit lands, with a warning
    out, is_error = box.run("submit", {"hypothesis": "h", "description": "d"})
    assert is_error and "recipe.py would be rejected; fix it first" in out and "import of 'os'" in out
    assert box.submission is None
    box.run("edit", {"command": "str_replace", "path": "recipe.py", "old_str": "import os\nx = 1", "new_str": "x = 2"})
    description = "  lr\n  1e-3 ->   2e-3 " + "x" * 100  # one line for results.tsv, at most 80 characters
    out, is_error = box.run("submit", {"hypothesis": "  faster  ", "description": description})
    assert not is_error and out.startswith("submitted")
    assert box.submission == {"description": ("lr 1e-3 -> 2e-3 " + "x" * 100)[:80], "hypothesis": "faster",
                              "expected_effect": ""}
    assert [c["ok"] for c in box.calls] == [True, False, True, True]


@pytest.mark.parametrize("field,value,shown", [
    ("description", "lr\x00 2e-3", "'\\x00'"),  # a NUL failed the commit message, a traceback
    ("hypothesis", "faster \ud800", "'\\ud800'"),  # not UTF-8: every later proposal's history failed
    ("expected_effect", "rank \x1b[31m-3", "'\\x1b'"),
])
def test_submit_refuses_control_characters_and_lone_surrogates(tmp_path, field, value, shown):
    box = ToolBox(tmp_path, "x = 1\n", "brief")
    box.run("edit", {"command": "str_replace", "path": "recipe.py", "old_str": "x = 1", "new_str": "x = 2"})
    args = dict({"hypothesis": "h", "description": "d"}, **{field: value})
    out, is_error = box.run("submit", args)
    assert is_error and out == f"error: {field} holds the character {shown}: use printable text"
    assert box.submission is None
    out, is_error = box.run("submit", {"hypothesis": "two\nlines\twith a tab\r\n", "description": "d\n"})
    assert not is_error and box.submission["hypothesis"] == "two\nlines\twith a tab"
