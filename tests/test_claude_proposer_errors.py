"""The Claude proposer when the API fails or refuses: a missing key, authentication, the SDK's
retries and the loop-level pause after them, timeouts, persistent overload, and a
conversation past the context window."""

import json

import pytest
from claude_support import KEY, LR_NEW, LR_OLD, SUBMIT, _args, _edit, _exps, scripted

from agent import loop
from agent.claude import ClaudeConfig, ClaudeProposer, ProposerStop, ProposerUnavailable
from tests.fake_messages import Error, Hang, Reply, tool


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


def test_claude_needs_a_key_and_a_key_alone_never_selects_it(small_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert loop.main(_args(tmp_path, small_cache, 1)) == 2
    assert "--proposer claude needs ANTHROPIC_API_KEY" in capsys.readouterr().err
    assert loop.build_parser().parse_args([]).proposer == "search"


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


CTX = {"program": "brief", "experiments": [], "state": {"best": 100.0, "threshold": 0.0, "experiments": 0,
                                                          "baselines": 2}}


@pytest.mark.parametrize("error,message", [
    # SDK 2.14's class for it is a RateLimitError: it was paused on and tried 4 times
    (Error(429, "spend limit reached", code="enforced_spend_limit_reached"), "the API's spend limit is reached (429)"),
    (Error(529, headers={"x-should-retry": "false"}), "the API refused the request (529) and said not to retry it"),
])
def test_errors_a_retry_cannot_fix_stop_at_once(api, tmp_path, error, message):
    cfg = ClaudeConfig(sdk_retries=0, api_attempts=3, api_pause_s=0.01)
    api.script = [error] * 4
    with pytest.raises(ProposerStop) as stop:
        ClaudeProposer(cfg).propose('HPARAMS = {"lr": 1e-3,}\n', [], context=dict(CTX, workspace=tmp_path))
    assert str(stop.value).startswith(message) and not isinstance(stop.value, ProposerUnavailable)
    assert len(api.requests) == 1


def test_a_key_that_cannot_be_sent_stops_at_once_and_is_not_shown(api, tmp_path, monkeypatch):
    # a key pasted with its newline: the request fails before it leaves, on every try
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY + "\n")
    cfg = ClaudeConfig(sdk_retries=1, api_attempts=3, api_pause_s=0.01)
    with pytest.raises(ProposerStop) as stop:
        ClaudeProposer(cfg).propose('HPARAMS = {"lr": 1e-3,}\n', [], context=dict(CTX, workspace=tmp_path))
    assert str(stop.value) == ("the request could not be sent (an illegal header value): check ANTHROPIC_API_KEY "
                               "for spaces or newlines")
    assert stop.value.__cause__ is None and stop.value.__suppress_context__  # the SDK's error, which shows the key
    assert api.requests == []


def test_an_empty_reply_ends_the_proposal_rather_than_send_an_empty_turn(api, tmp_path):
    # the API refuses a request with an empty assistant turn (400), which stopped the study
    api.script = [Reply([], stop_reason="max_tokens")]
    prop = ClaudeProposer(ClaudeConfig()).propose('HPARAMS = {"lr": 1e-3,}\n', [], context=dict(CTX, workspace=tmp_path))
    assert prop.extra["reason"] == "the model's reply was empty (stop_reason max_tokens)"
    assert prop.description.startswith("no-op: ") and len(api.requests) == 1


def test_text_that_is_not_utf8_is_sent_made_valid(api, tmp_path):
    # a lone surrogate (a JSON escape) in a run's reason, quoted in every later proposal's
    # history, and in the model's own reply, sent back: each once failed every request after
    exps = [{"n": 3, "kind": "experiment", "ended": True, "status": "crash", "description": "lr up",
             "hypothesis": "h", "val_mean_rank": None,
             "result": {"reason": "CUDA error \ud800 here", "log_tail": "RuntimeError: \udcff"}}]
    api.script = [Reply([tool("view", {"path": "recipe\ud800.py"})]), Reply([_edit(), SUBMIT])]
    source = 'HPARAMS = {"lr": 1e-3,}\n'
    prop = ClaudeProposer(ClaudeConfig()).propose(source, [], context=dict(CTX, workspace=tmp_path,
                                                                           experiments=exps))
    assert prop.source == source.replace(LR_OLD, LR_NEW) and len(api.requests) == 2
    first = json.dumps(api.requests[0]["body"]["messages"])
    assert "RuntimeError: ?" in first and "\\ud" not in first
    assert api.requests[1]["body"]["messages"][1]["content"][0]["input"] == {"path": "recipe?.py"}
