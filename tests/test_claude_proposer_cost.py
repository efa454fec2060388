"""The Claude proposer's spending: usage priced per model, journaled per call and kept through
stops and kills, the --max-cost-usd cap across and within proposals, and what a proposal
reports of its turns, edits and tool calls."""

import pytest
from claude_support import LR_NEW, LR_OLD, SUBMIT, _args, _edit, _exps, scripted

from agent import journal, loop, report
from agent.claude import ClaudeConfig, ClaudeProposer
from agent.pricing import PRICES, Usage
from tests.fake_messages import Error, Reply, text, tool


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
    # interrupted: nothing was tried, so it counts as no experiment (as a kill mid-proposal)
    assert e["status"] == "interrupted" and "authentication failed" in e["description"]
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


def test_a_ctrl_c_mid_proposal_costs_no_experiment_and_leaves_a_pending_fix_due(api, ws, small_cache, tmp_path,
                                                                                 monkeypatch):
    # recorded no-op, it counted against --max-experiments and ended the fix of the crash
    # before it (a kill at the same point, recorded interrupted by reconcile, did neither)
    calls = []
    monkeypatch.setattr(loop, "run_experiment", scripted([None, 97], calls))
    api.script = [Reply([_edit(LR_OLD, '"lr": lr2,'), SUBMIT])]  # a change that crashes
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0
    real = ClaudeProposer._create
    replies = []

    def cut_after_one(self, messages):  # one reply paid for, then Ctrl-C
        if replies:
            raise KeyboardInterrupt
        replies.append(real(self, messages))
        return replies[-1]

    monkeypatch.setattr(ClaudeProposer, "_create", cut_after_one)
    api.script = [Reply([tool("view", {"path": "recipe.py"})])]
    assert loop.main(_args(tmp_path, small_cache, 2)) == 130
    assert [(e["n"], e["status"]) for e in _exps(ws)[2:]] == [(3, "crash"), (4, "interrupted")]
    monkeypatch.setattr(ClaudeProposer, "_create", real)
    api.script = [Reply([_edit('"lr": lr2,', '"lr": 2e-3,'), SUBMIT])]
    assert loop.main(_args(tmp_path, small_cache, 2)) == 0  # the second experiment is still to come
    exps = _exps(ws)
    assert [(e["n"], e["status"]) for e in exps[2:]] == [(3, "crash"), (4, "interrupted"), (5, "keep")]
    assert exps[4]["fix_of"] == 3 and "# Fix attempt" in api.requests[-1]["body"]["messages"][0]["content"][0]["text"]


@pytest.mark.parametrize("counts,read", [
    ({"input_tokens": -1_000_000, "output_tokens": 10}, (0, 10, 0, 0)),  # a negative count lowered the cap's sum
    ({"input_tokens": 10**400, "cache_read_input_tokens": float("inf")}, (10**9, 0, 0, 10**9)),  # OverflowError
    ({"output_tokens": float("nan"), "cache_creation_input_tokens": "12", "input_tokens": True}, (0, 0, 0, 0)),
    ({"input_tokens": 7, "output_tokens": 3, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 1},
     (7, 3, 2, 1)),
])
def test_token_counts_a_reply_cannot_mean_are_bounded(counts, read):
    usage = Usage()
    usage.add_reply(counts)
    assert (usage.input_tokens, usage.output_tokens, usage.cache_write_tokens, usage.cache_read_tokens) == read
    assert usage.cost_usd("claude-sonnet-5-5") >= 0 and usage.cost_usd("claude-sonnet-5-5") < float("inf")
