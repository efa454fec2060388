"""The Claude proposer's conversation through the real ``anthropic`` client, pointed at a fake
Messages API on 127.0.0.1 (``tests/fake_messages.py``): the request and its cached prompt, the
history it carries, turns, breakpoints, nudges and fix attempts."""

import json

import pytest
from claude_support import KEY, LR_NEW, LR_OLD, SUBMIT, _args, _edit, _exps, scripted

from agent import loop
from agent.claude import ClaudeConfig, ClaudeProposer
from agent.tools import TOOLS
from tests.fake_messages import Reply, text, tool


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


def test_a_reply_cut_off_while_thinking_gets_one_nudge(api, ws, small_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "run_experiment", scripted([99]))
    api.script = [Reply([text("Let me think about the schedule in great detail")], stop_reason="max_tokens"),
                  Reply([_edit(), SUBMIT])]
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0
    nudge = api.requests[1]["body"]["messages"][-1]["content"][-1]
    assert "reached max_tokens before any tool call" in nudge["text"]
    assert _exps(ws)[2]["status"] == "keep"


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


def test_a_key_the_model_echoes_is_written_nowhere(api, ws, small_cache, tmp_path, monkeypatch):
    # a key the model was shown (pasted into program.md, say) and repeats: the transcript,
    # the journal, results.tsv and the commit message once kept it
    monkeypatch.setattr(loop, "run_experiment", scripted([99]))
    submit = tool("submit", {"hypothesis": f"the key {KEY} says so", "description": f"lr up {KEY}"})
    api.script = [Reply([text(f"I was shown {KEY}."), _edit(), submit])]
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0
    exps = _exps(ws)
    assert exps[2]["status"] == "keep" and exps[2]["description"] == "lr up [redacted]"
    assert exps[2]["hypothesis"] == "the key [redacted] says so"
    for path in (ws.journal_path, ws.results_path, ws.experiments / "3" / "transcript.json"):
        assert KEY not in path.read_text() and "[redacted]" in path.read_text(), path
    assert KEY not in ws.git("log", "--format=%B") and "experiment 3: lr up [redacted]" in ws.git("log", "--format=%B")
