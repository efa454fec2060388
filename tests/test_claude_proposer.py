"""The Claude proposer through the real ``anthropic`` client, pointed at a fake Messages API
on 127.0.0.1 (``tests/fake_messages.py``): tools, confinement, retries, stops, cost, secrets."""

import json
import os
import subprocess

import pytest

from agent import journal, loop, report
from agent.claude import ClaudeConfig, ClaudeProposer, ProposerUnavailable
from agent.pricing import PRICES, Usage
from agent.tools import TOOLS, ToolBox
from agent.workspace import Workspace
from tests.fake_messages import Error, FakeMessagesAPI, Hang, Reply, text, tool

KEY = "sk-ant-test-DO-NOT-LEAK-4f2a9c"
LR_OLD, LR_NEW = '"lr": 1e-3,', '"lr": 2e-3,'


@pytest.fixture
def api(monkeypatch, tmp_path):
    with FakeMessagesAPI() as fake:
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "no-config"))  # no profile on disk
        monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
        yield fake


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


@pytest.fixture
def ws(small_cache, tmp_path, monkeypatch):
    """A workspace past its two baselines (100 and 100: noise floor 0)."""
    monkeypatch.setattr(loop, "run_experiment", scripted([100, 100]))
    assert loop.main(_args(tmp_path, small_cache, 0, proposer="search")) == 0
    return Workspace(tmp_path / "c")


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


def test_rate_limit_and_overload_are_retried(api, ws, small_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "run_experiment", scripted([99]))
    api.script = [Error(429), Error(529), Reply([_edit(), SUBMIT])]
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0
    assert len(api.requests) == 3  # the SDK's retries, honouring retry-after-ms
    assert _exps(ws)[2]["status"] == "keep" and _exps(ws)[2]["usage"]["calls"] == 1


def test_loop_level_pause_after_the_sdk_gives_up(api, tmp_path):
    cfg = ClaudeConfig(sdk_retries=0, api_attempts=2, api_pause_s=0.01)
    state = {"best": 100.0, "threshold": 0.0, "experiments": 0, "baselines": 2}
    ctx = {"workspace": tmp_path, "program": "brief", "experiments": [], "state": state}
    source = 'HPARAMS = {"lr": 1e-3,}\n'
    api.script = [Error(529), Error(500), Reply([_edit(LR_OLD, LR_NEW), SUBMIT])]
    prop = ClaudeProposer(cfg).propose(source, [], context=ctx)
    assert prop.source == source.replace(LR_OLD, LR_NEW) and len(api.requests) == 3
    # 408 and 409, which the SDK retries too, once stopped the loop as refused requests
    api.script = [Error(408), Error(409), Reply([_edit(LR_OLD, LR_NEW), SUBMIT])]
    prop = ClaudeProposer(cfg).propose(source, [], context=ctx)
    assert prop.source == source.replace(LR_OLD, LR_NEW) and len(api.requests) == 6
    api.script = [Error(529)] * 3
    proposer = ClaudeProposer(cfg)
    with pytest.raises(ProposerUnavailable, match=r"kept failing \(529\) after 3 attempts"):
        proposer.propose(source, [], context=ctx)


def test_a_request_that_times_out_is_not_tried_again_and_again(api, tmp_path):
    # A timed-out request may be a reply paid for and never seen (no usage comes back): after
    # the SDK's retries the proposal stops instead of the loop-level rounds (20 requests a turn).
    cfg = ClaudeConfig(sdk_retries=1, api_attempts=3, api_pause_s=0.01, timeout_s=0.3)
    ctx = {"workspace": tmp_path, "program": "brief", "experiments": [],
           "state": {"best": 100.0, "threshold": 0.0, "experiments": 0, "baselines": 2}}
    api.script = [Hang(1.0), Hang(1.0), Reply([SUBMIT])]
    with pytest.raises(ProposerUnavailable, match="did not answer within the request timeout, 2 times"):
        ClaudeProposer(cfg).propose('HPARAMS = {"lr": 1e-3,}\n', [], context=ctx)
    assert len(api.requests) == 2
    # by default the SDK's own timeout, whose check refuses a max_tokens it could not finish in
    import anthropic

    assert ClaudeProposer(ClaudeConfig()).client.timeout == anthropic.DEFAULT_TIMEOUT
    with pytest.raises(ValueError, match="Streaming is required"):
        ClaudeProposer(ClaudeConfig(max_tokens=loop.MAX_TOKENS + 1))._create([{"role": "user", "content": "x"}])
    assert len(api.requests) == 2  # refused before sending


def test_persistent_overload_stops_the_loop_cleanly(api, ws, small_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "run_experiment", scripted([]))
    api.script = [Error(529)] * 40
    head = ws.head()
    assert loop.main(_args(tmp_path, small_cache, 3)) == 1
    assert "loop: stopping: the API kept failing (529)" in capsys.readouterr().err
    assert [e["n"] for e in _exps(ws)] == [1, 2] and ws.head() == head and ws.git("status", "--porcelain") == ""


def test_authentication_error_stops_with_one_line(api, ws, small_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "run_experiment", scripted([]))
    api.script = [Error(401, "invalid x-api-key")]
    journal_before = ws.journal_path.read_text()
    assert loop.main(_args(tmp_path, small_cache, 3)) == 1
    err = capsys.readouterr().err
    assert "loop: stopping: authentication failed (401): check ANTHROPIC_API_KEY" in err
    assert "Traceback" not in err and KEY not in err
    assert len(api.requests) == 1  # not retried
    new = ws.journal_path.read_text()[len(journal_before):].splitlines()
    assert [json.loads(line)["event"] for line in new] == ["session"]  # nothing but the session line
    assert ws.git("status", "--porcelain") == ""


def test_a_reply_without_tool_use_is_a_no_op(api, ws, small_cache, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "run_experiment", scripted([], calls))
    api.script = [Reply([text("Everything looks optimal already.")],
                        usage={"input_tokens": 7000, "output_tokens": 50, "cache_creation_input_tokens": 6000,
                               "cache_read_input_tokens": 0})]
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0
    e = _exps(ws)[2]
    assert e["status"] == "no-op" and calls == [] and e["commit"] is None
    p_in, p_out, p_cw, _ = PRICES["claude-sonnet-5-5"]
    assert e["cost_usd"] == pytest.approx((7000 * p_in + 50 * p_out + 6000 * p_cw) / 1e6)


def test_cost_is_summed_and_the_cap_stops_the_loop(api, ws, small_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "run_experiment", scripted([99, 98, 97]))
    big = {"input_tokens": 100_000, "output_tokens": 10_000, "cache_creation_input_tokens": 0,
           "cache_read_input_tokens": 0}  # $0.30 per reply at $2/$10
    api.script = [Reply([_edit()], usage=big), Reply([SUBMIT], usage=big),
                  Reply([_edit(LR_NEW, '"lr": 3e-3,')], usage=big), Reply([SUBMIT], usage=big)]
    assert loop.main(_args(tmp_path, small_cache, 10, "claude", "--max-cost-usd", "1.0")) == 0
    exps = _exps(ws)
    assert [e.get("cost_usd") for e in exps[2:]] == [pytest.approx(0.6), pytest.approx(0.6)]
    assert len(exps) == 4  # $1.20 spent ≥ $1.00: no third proposal
    assert "reached --max-cost-usd 1" in capsys.readouterr().err
    # a restart with the same cap does not spend more
    assert loop.main(_args(tmp_path, small_cache, 10, "claude", "--max-cost-usd", "1.0")) == 0
    assert len(api.requests) == 4
    assert report.main([str(ws.root)]) == 0
    out = capsys.readouterr().out
    assert "200000/20000/0/0" in out and "api_cost_usd:   1.2000" in out
    assert "api_tokens:     calls 4, input_tokens 400000, output_tokens 40000" in out


def test_the_request_caches_the_system_prompt_and_offers_the_three_tools(api, ws, small_cache, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(loop, "run_experiment", scripted([]))
    api.script = [Reply([text("no change")])]
    assert loop.main(_args(tmp_path, small_cache, 1, "claude", "--model", "claude-haiku-5-5",
                           "--max-tokens", "2048")) == 0
    body = api.requests[0]["body"]
    assert body["model"] == "claude-haiku-5-5" and body["max_tokens"] == 2048
    assert [t["name"] for t in body["tools"]] == ["view", "edit", "submit"] == [t["name"] for t in TOOLS]
    assert body["tools"][1]["input_schema"]["properties"]["command"]["enum"] == ["view", "str_replace", "insert"]
    system = body["system"]
    assert system[-1]["cache_control"] == {"type": "ephemeral"}
    assert all("cache_control" not in b for b in system[:-1])
    # long enough to be cached by every model (minimum 4,096 tokens at most), counting at most
    # 4 characters per token (code and prose tokenize at about 3 to 4)
    prefix = json.dumps(body["tools"]) + "".join(b["text"] for b in system)
    assert len(prefix) >= 4 * 4096
    assert "The recipe contract" in system[0]["text"] and "class VisionConfig" in system[1]["text"]
    # the per-proposal context: the brief, the history, the current recipe
    (opening,) = body["messages"][0]["content"]  # one text block, carrying the moving breakpoint
    assert opening["cache_control"] == {"type": "ephemeral"}
    first = opening["text"]
    assert "# Research brief" in first and "Best val_mean_rank so far: 100.00" in first
    assert "#2 baseline: 100.00" in first and LR_OLD in first
    assert len(body["messages"]) == 1 and "tool_choice" not in body


def test_a_crash_gets_bounded_fix_attempts(api, ws, small_cache, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "run_experiment", scripted([None, None, 97], calls))
    api.script = [Reply([_edit(LR_OLD, '"lr": lr2,'), SUBMIT]),  # a change that crashes
                  Reply([_edit('"lr": lr2,', '"lr": 2e-3 * lr2,'), SUBMIT]),  # a fix that crashes too
                  Reply([_edit(), SUBMIT])]  # no attempts left: from the best recipe again
    assert loop.main(_args(tmp_path, small_cache, 3, "claude", "--fix-attempts", "1")) == 0
    exps = _exps(ws)
    assert [e["status"] for e in exps[2:]] == ["crash", "crash", "keep"]
    assert exps[3]["fix_of"] == 3 and "fix_of" not in exps[4]
    second, third = (r["body"]["messages"][0]["content"][0]["text"] for r in api.requests[1:3])
    assert "# Fix attempt" in second and '"lr": lr2,' in second and "NameError: name 'lr2'" in second
    assert "# Fix attempt" not in third and LR_OLD in third
    assert '"lr": 2e-3 * lr2,' in calls[1] and LR_NEW in calls[2]


def test_usage_cost_from_a_reply_dict():
    u = Usage()
    u.add_reply({"input_tokens": 10, "output_tokens": 5})  # cache fields absent: zero
    u.add_reply({"input_tokens": 1, "output_tokens": 1, "cache_creation_input_tokens": 100,
                 "cache_read_input_tokens": 1000})
    assert u.to_dict() == {"calls": 2, "input_tokens": 11, "output_tokens": 6, "cache_write_tokens": 100,
                           "cache_read_tokens": 1000}
    assert u.cost_usd("claude-opus-4-8") == pytest.approx((11 * 5 + 6 * 25 + 100 * 6.25 + 1000 * 0.5) / 1e6)
    # an unknown model is priced at the dearest rates, so the cap errs on the safe side
    assert u.cost_usd("claude-future-9") >= max(u.cost_usd(m) for m in PRICES)


def test_claude_needs_a_key_and_a_key_alone_never_selects_it(small_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert loop.main(_args(tmp_path, small_cache, 1)) == 2
    assert "--proposer claude needs ANTHROPIC_API_KEY" in capsys.readouterr().err
    assert loop.build_parser().parse_args([]).proposer == "search"


def test_turns_are_bounded(api, ws, small_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "run_experiment", scripted([]))
    api.script = [Reply([tool("view", {"path": "program.md"})]), Reply([_edit()]), Reply([SUBMIT])]
    assert loop.main(_args(tmp_path, small_cache, 1, "claude", "--max-turns", "2")) == 0
    e = _exps(ws)[2]
    assert e["status"] == "no-op" and e["result"]["reason"] == ["no submission within 2 turns"]
    assert len(api.requests) == 2 and e["usage"]["calls"] == 2 and e["edits"] == 1
    assert ws.git("status", "--porcelain") == "" and LR_OLD in ws.recipe.read_text()  # the edit never landed


def test_each_turn_moves_the_conversation_breakpoint(api, ws, small_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "run_experiment", scripted([99]))
    api.script = [Reply([tool("view", {"path": "program.md"})]), Reply([_edit(), SUBMIT])]
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0
    second = api.requests[1]["body"]["messages"]
    marks = [(i, j) for i, m in enumerate(second) for j, b in enumerate(m["content"]) if "cache_control" in b]
    assert marks == [(len(second) - 1, len(second[-1]["content"]) - 1)]  # one, on the newest block
    assert second[-1]["content"][-1]["type"] == "tool_result"


def test_spending_is_journaled_per_call_and_survives_a_stop_mid_proposal(api, ws, small_cache, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.setattr(loop, "run_experiment", scripted([]))
    api.script = [Reply([tool("view", {"path": "recipe.py"})]), Reply([tool("view", {"path": "program.md"})]),
                  Error(401)]
    assert loop.main(_args(tmp_path, small_cache, 3)) == 1
    events = journal.read(ws.journal_path)
    usage = [e for e in events if e["event"] == "usage"]
    p_in, p_out, _, p_cr = PRICES["claude-sonnet-5-5"]
    one = (1000 * p_in + 200 * p_out + 5000 * p_cr) / 1e6
    assert [e["n"] for e in usage] == [3, 3] and all(e["cost_usd"] == pytest.approx(one) for e in usage)
    assert usage[0]["usage"] == {"calls": 1, "input_tokens": 1000, "output_tokens": 200, "cache_write_tokens": 0,
                                 "cache_read_tokens": 5000}
    e = _exps(ws)[2]
    assert e["status"] == "no-op" and "authentication failed" in e["description"]
    assert e["cost_usd"] == pytest.approx(2 * one) and journal.spent_usd(events) == pytest.approx(2 * one)


def test_a_kill_mid_proposal_keeps_its_spending(api, ws, small_cache, tmp_path, monkeypatch, capsys):
    # what the journal holds after a kill -9 between two replies: usage lines, no start
    journal.append(ws.journal_path, {"event": "usage", "n": 3, "time": 1.0, "cost_usd": 0.25, "usage": {
        "calls": 1, "input_tokens": 900, "output_tokens": 30, "cache_write_tokens": 0, "cache_read_tokens": 0}})
    monkeypatch.setattr(loop, "run_experiment", scripted([99]))
    api.script = [Reply([_edit(), SUBMIT])]
    assert loop.main(_args(tmp_path, small_cache, 5, "claude", "--max-cost-usd", "0.252")) == 0
    exps = _exps(ws)
    assert [(e["n"], e["status"]) for e in exps[2:]] == [(3, "interrupted"), (4, "keep")]
    assert exps[2]["api_cost_usd"] == 0.25
    spent = journal.spent_usd(journal.read(ws.journal_path))
    assert spent == pytest.approx(0.25 + exps[3]["cost_usd"]) and spent > 0.252
    assert len(api.requests) == 1  # $0.25 already spent: one more proposal, then the cap
    # the report's row of the cut-off proposal shows what it spent, as the total counts it
    capsys.readouterr()
    assert report.main([str(ws.root)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("3 "))
    assert "interrupted" in row and "900/30/0/0" in row and "0.2500" in row


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


def test_a_reply_cut_off_while_thinking_gets_one_nudge(api, ws, small_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "run_experiment", scripted([99]))
    api.script = [Reply([text("Let me think about the schedule in great detail")], stop_reason="max_tokens"),
                  Reply([_edit(), SUBMIT])]
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0
    nudge = api.requests[1]["body"]["messages"][-1]["content"][-1]
    assert "reached max_tokens before any tool call" in nudge["text"]
    assert _exps(ws)[2]["status"] == "keep"


def test_a_conversation_past_the_context_window_ends_the_proposal_not_the_study(api, ws, small_cache, tmp_path,
                                                                                 monkeypatch):
    # A 400 "prompt is too long" once stopped the whole study like a malformed request; it
    # only means this proposal's conversation grew too long: a no-op, then a fresh one.
    monkeypatch.setattr(loop, "run_experiment", scripted([99]))
    api.script = [Reply([tool("view", {"path": "recipe.py"})]),
                  Error(400, "prompt is too long: 210000 tokens > 200000 maximum"),
                  Reply([_edit(), SUBMIT])]
    assert loop.main(_args(tmp_path, small_cache, 2)) == 0
    exps = _exps(ws)
    assert [e["status"] for e in exps[2:]] == ["no-op", "keep"]
    assert "outgrew the model's context window" in exps[2]["description"] and len(api.requests) == 3
    assert len(api.requests[2]["body"]["messages"]) == 1  # the next proposal: a fresh conversation


@pytest.mark.parametrize("status,shown", [("crash", True), ("error", True), ("discard", False)])
def test_failed_runs_show_their_log_tail(api, tmp_path, status, shown):
    # an "error" (the harness refusing a run after training: work past the budget, embeddings
    # that depend on the batch) is a recipe fault too: its log tail goes to the model
    exp = {"n": 3, "ended": True, "kind": "experiment", "status": status, "val_mean_rank": None,
           "description": "lr 1e-3 -> 2e-3", "result": {"log_tail": "RuntimeError: the tail of run 3"}}
    ctx = {"workspace": tmp_path, "program": "brief", "experiments": [exp],
           "state": {"best": 100.0, "threshold": 0.0, "experiments": 1, "baselines": 2}}
    api.script = [Reply([text("nothing to change")])]
    ClaudeProposer(ClaudeConfig(sdk_retries=0)).propose('HPARAMS = {"lr": 1e-3,}\n', [], context=ctx)
    first = json.dumps(api.requests[0]["body"]["messages"][0])
    assert ("RuntimeError: the tail of run 3" in first) is shown


def test_only_one_nudge_and_the_cost_cap_holds_through_it(api, tmp_path):
    # Replies cut off before any tool call once got a nudge each, up to --max-turns, and
    # skipped the cost check: 12 such replies spent $3.38 of a $0.01 budget.
    ctx = {"workspace": tmp_path, "program": "brief", "experiments": [],
           "state": {"best": 100.0, "threshold": 0.0, "experiments": 0, "baselines": 2}}
    cut = Reply([text("thinking at length")], stop_reason="max_tokens")
    api.script = [cut] * 3
    prop = ClaudeProposer(ClaudeConfig(sdk_retries=0)).propose('HPARAMS = {"lr": 1e-3,}\n', [], context=ctx)
    assert len(api.requests) == 2 and "stop_reason max_tokens, after a nudge" in prop.description
    api.script = [cut] * 3
    prop = ClaudeProposer(ClaudeConfig(sdk_retries=0)).propose('HPARAMS = {"lr": 1e-3,}\n', [],
                                                               context=dict(ctx, budget_usd=1e-6))
    assert len(api.requests) == 3 and "the cost cap was reached" in prop.description


def test_a_proposal_gets_only_what_is_left_of_the_cap(api, ws, small_cache, tmp_path, monkeypatch):
    # $0.90 of $1.00 spent: the next proposal stops after its first $0.30 reply (the cap may be
    # passed by one reply), not after replies worth the whole cap
    journal.append(ws.journal_path, {"event": "usage", "n": 3, "time": 1.0, "cost_usd": 0.9, "usage": {}})
    monkeypatch.setattr(loop, "run_experiment", scripted([99]))
    big = {"input_tokens": 100_000, "output_tokens": 10_000}  # $0.30 at $2/$10
    api.script = [Reply([tool("view", {"path": "recipe.py"})], usage=big),
                  Reply([tool("view", {"path": "program.md"})], usage=big), Reply([_edit(), SUBMIT], usage=big)]
    assert loop.main(_args(tmp_path, small_cache, 5, "claude", "--max-cost-usd", "1.0")) == 0
    assert len(api.requests) == 1
    assert "the cost cap was reached during the proposal" in _exps(ws)[3]["description"]


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


def test_the_loop_level_pause_doubles(api, tmp_path, monkeypatch):
    import time
    import types

    import agent.claude

    pauses = []
    monkeypatch.setattr(agent.claude, "time", types.SimpleNamespace(sleep=pauses.append, time=time.time))
    ctx = {"workspace": tmp_path, "program": "brief", "experiments": [],
           "state": {"best": 100.0, "threshold": 0.0, "experiments": 0, "baselines": 2}}
    api.script = [Error(529)] * 3 + [Reply([_edit(), SUBMIT])]
    ClaudeProposer(ClaudeConfig(sdk_retries=0, api_attempts=3, api_pause_s=0.5)).propose(
        'HPARAMS = {"lr": 1e-3,}\n', [], context=ctx)
    assert pauses == [0.5, 1.0, 2.0] and len(api.requests) == 4


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


def test_the_history_summary_shows_the_latest_runs_and_failures():
    from agent import prompt

    crashes, keeps = (4, 7, 11), {5: 60.0, 9: 40.0}
    exps = []
    for n in range(1, 16):
        status = "baseline" if n <= 2 else "keep" if n in keeps else "crash" if n in crashes else "discard"
        exps.append({"n": n, "ended": True, "status": status, "kept": n in keeps, "description": f"change {n}",
                     "val_mean_rank": None if n in crashes else keeps.get(n, 80.0),
                     "result": {"reason": f"NameError in run {n}" if n in crashes else f"why {n}"}})
    exps.append({"n": 16, "status": None, "description": "still running"})  # not ended: not listed
    tails = {n: "\n".join(f"run {n} line {i}" for i in range(1, 31)) for n in crashes}
    state = {"best": 40.0, "threshold": 1.5, "experiments": 13, "baselines": 2}
    text = prompt.journal_summary(exps, state, {"budget_s": 60, "device": "cpu"}, tails)
    lines = text.splitlines()
    assert "Best val_mean_rank so far: 40.00 (experiment 9: change 9)" in lines  # the latest keep is the best
    assert "Experiments so far: 13 after 2 baseline runs; 2 kept." in lines
    listed = [int(line.split()[1][1:]) for line in lines if line.startswith("- #")]
    assert listed == list(range(15 - prompt.LAST_K + 1, 16))  # the most recent, in order
    assert f"The last {prompt.LAST_K} runs (n, status, val_mean_rank, samples/s, description):" in lines
    crash = next(line for line in lines if line.startswith("- #11 "))
    assert crash.startswith("- #11 crash: -, -") and crash.endswith(" | reason: NameError in run 11")
    assert not any("why 9" in line for line in lines)  # a keep's reason is not a failure's
    # the log tails of the two most recent failures, their last lines only
    shown = sorted(int(line.split("#")[1].rstrip(":")) for line in lines if line.startswith("Log tail of failed run"))
    assert shown == [7, 11] == sorted(crashes)[-prompt.FAILURES_SHOWN:]
    tail_lines = {line for line in lines if line.startswith("run 11 line")}
    assert tail_lines == {f"run 11 line {i}" for i in range(30 - prompt.TAIL_LINES + 1, 31)}


def test_a_reply_that_spends_exactly_the_budget_ends_the_proposal(api, tmp_path):
    # "stops after the reply that spends budget_usd": reaching the budget is spending it
    one = Usage()
    one.add_reply(Reply([]).usage)  # what each scripted reply costs
    ctx = {"workspace": tmp_path, "program": "brief", "experiments": [],
           "state": {"best": 100.0, "threshold": 0.0, "experiments": 0, "baselines": 2},
           "budget_usd": one.cost_usd("claude-sonnet-5-5")}
    api.script = [Reply([tool("view", {"path": "recipe.py"})]), Reply([_edit(), SUBMIT])]
    source = 'HPARAMS = {"lr": 1e-3,}\n'
    prop = ClaudeProposer(ClaudeConfig(sdk_retries=0, api_attempts=0)).propose(source, [], context=ctx)
    assert len(api.requests) == 1 and prop.source == source
    assert prop.description == "no-op: the cost cap was reached during the proposal"
    assert prop.extra["cost_usd"] == pytest.approx(ctx["budget_usd"])


def test_a_proposal_reports_its_turns_edits_and_calls(api, tmp_path):
    ctx = {"workspace": tmp_path, "program": "brief", "experiments": [],
           "state": {"best": 100.0, "threshold": 0.0, "experiments": 0, "baselines": 2}}
    api.script = [Reply([tool("view", {"path": "program.md"}), tool("view", {"path": "nope.py"})]),
                  Reply([_edit(), SUBMIT])]
    # no retries: a proposer that went on past the submission would fail at once on the empty script
    prop = ClaudeProposer(ClaudeConfig(sdk_retries=0, api_attempts=0)).propose('HPARAMS = {"lr": 1e-3,}\n', [],
                                                                               context=ctx)
    assert prop.extra["turns"] == 2 and prop.extra["edits"] == 1  # model replies, not messages
    assert prop.extra["tool_calls"] == [{"tool": "view", "ok": True}, {"tool": "view", "ok": False},
                                        {"tool": "edit", "ok": True}, {"tool": "submit", "ok": True}]
    assert prop.extra["expected_effect"] == "mean rank -3" and prop.extra["reason"] is None
    assert prop.description == "lr 1e-3 -> 2e-3" and prop.hypothesis.startswith("A higher peak rate")
