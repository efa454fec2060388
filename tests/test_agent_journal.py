"""The journal's reading of a study: each experiment's spending, the results table rebuilt
from it, and the settings of the newest session."""

import pytest

from agent import journal


def test_an_experiment_sums_the_spending_of_all_its_replies():
    # a proposal takes several API replies, each journaled as it arrives: the experiment's
    # cost and tokens are their sum (the report's per-row figures), not the last reply's
    events = [{"event": "usage", "n": 3, "cost_usd": 0.25, "usage": {"calls": 1, "input_tokens": 100,
                                                                      "output_tokens": 10}},
              {"event": "usage", "n": 3, "cost_usd": 0.5, "usage": {"calls": 1, "input_tokens": 40,
                                                                     "output_tokens": 2, "cache_read_tokens": 7}},
              {"event": "start", "n": 3, "kind": "experiment", "description": "wider"},
              {"event": "usage", "n": 4, "cost_usd": 0.125, "usage": {"calls": 1, "input_tokens": 1}}]
    three, four = journal.experiments(events)
    assert three["api_cost_usd"] == 0.75 and four["api_cost_usd"] == 0.125
    assert three["api_usage"] == {"calls": 2, "input_tokens": 140, "output_tokens": 12, "cache_read_tokens": 7}
    assert journal.spent_usd(events) == 0.875


def test_the_rebuilt_table_has_one_row_per_ended_experiment(tmp_path):
    # a run still in flight (a start, no end) has no outcome yet: it gets its row when it ends
    events = [{"event": "start", "n": 1, "kind": "baseline", "commit": "a" * 40, "description": "baseline"},
              {"event": "end", "n": 1, "status": "baseline", "val_mean_rank": 12.5, "kept": False,
               "result": {"peak_memory_gb": 1.5, "samples_per_s": 2048.0}},
              {"event": "start", "n": 2, "kind": "experiment", "commit": "b" * 40, "description": "wider"}]
    path = tmp_path / "results.tsv"
    journal.rebuild_results(path, events)
    header, *rows = path.read_text().splitlines()
    assert header.split("\t") == list(journal.COLUMNS)
    # each figure under its own column: memory in GB, throughput in samples per second
    assert [row.split("\t") for row in rows] == [["aaaaaaa", "12.5", "1.5", "2048", "baseline", "baseline"]]


def test_the_newest_session_holds_the_settings():
    # a study resumed with other settings (a new --min-delta, another device): the report's
    # noise floor and the final run's defaults come from the last session, not the first
    events = [{"event": "session", "min_delta": 1.0, "device": "cpu"},
              {"event": "start", "n": 1},
              {"event": "session", "min_delta": 5.0, "device": "cuda"},
              {"event": "end", "n": 1}]
    assert journal.last_session(events) == {"event": "session", "min_delta": 5.0, "device": "cuda"}
    assert journal.last_session([{"event": "start", "n": 1}]) == {}


def test_a_line_that_is_not_utf8_is_skipped_with_a_warning(tmp_path, capsys):
    # a description edited by hand in a Latin-1 editor: that line is skipped, not the journal
    # (decoding the whole file at once made every report and loop start a traceback)
    path = tmp_path / "journal.jsonl"
    journal.append(path, {"event": "start", "n": 1})
    with open(path, "ab") as f:
        f.write('{"event": "end", "n": 1, "description": "caf\u00e9"}\n'.encode("latin-1"))
    journal.append(path, {"event": "end", "n": 1, "val_mean_rank": 3.0})
    assert [e["event"] for e in journal.read(path)] == ["start", "end"]
    assert journal.read(path)[1]["val_mean_rank"] == 3.0
    assert capsys.readouterr().err == f"journal: {path}:2: not UTF-8 text; line skipped\n"


def test_result_rows_keep_large_numbers_whole_and_small_ones_to_four_digits(tmp_path):
    # a GPU's samples/s in the thousands was written as 2.346e+04 in the table a person reads
    path = tmp_path / "results.tsv"
    journal.add_result_row(path, {"commit": "abc1234", "val_mean_rank": 21.87345, "memory_gb": 0.51234,
                                  "samples_per_s": 23456.4, "status": "keep", "description": "wider"})
    journal.add_result_row(path, {"commit": "def5678", "val_mean_rank": 1234.5, "memory_gb": 999.95,
                                  "samples_per_s": 999.4, "status": "discard", "description": "x"})
    header, first, second = path.read_text().splitlines()
    assert first.split("\t") == ["abc1234", "21.87", "0.5123", "23456", "keep", "wider"]
    assert second.split("\t") == ["def5678", "1234", "1000", "999.4", "discard", "x"]


@pytest.mark.parametrize("line,problem", [
    ('{"event": "end", "n": 7, "status": "discard", "kept": "false"}', "kept is 'false', not true or false"),
    ('{"event": "end", "n": 7, "status": "keep", "commit": 123}', "commit is 123, not a string"),
    ('{"event": "end", "n": 7, "status": "crash", "result": "x"}', "result is 'x', not an object"),
    ('{"event": "end", "n": 7, "status": 5}', "status is 5, not a string"),
    ('{"event": "start", "n": 7, "time": "x"}', "time is 'x', not a finite number"),
    ('{"event": "end", "n": 7, "status": "keep", "val_mean_rank": NaN}', "val_mean_rank is nan, not a finite number"),
    ('{"event": "end", "n": 7, "status": "ok", "result": {"peak_memory_gb": "lots"}}',
     "result.peak_memory_gb is 'lots', not a number"),
    ('{"event": "usage", "n": 7, "cost_usd": "abc"}', "cost_usd is 'abc', not a finite number"),
    ('{"event": "session", "min_delta": "0.5"}', "min_delta is '0.5', not a finite number"),
    ('{"event": "final", "commit": null, "status": "ok"}', "a final line without commit"),
    ('{"event": "final", "commit": "abc1234"}', "a final line without status"),
    ('{"event": "start", "kind": "experiment"}', "a start line without n"),
    ('{"event": "end", "n": 7, "status": "baseline", "val_mean_rank": null}', "a baseline line without val_mean_rank"),
    ('{"event": "usage", "n": 7, "usage": {"input_tokens": "x"}}', "usage.input_tokens is 'x', not a finite number"),
])
def test_a_field_of_the_wrong_type_skips_its_line_naming_the_field(tmp_path, capsys, line, problem):
    # found by a review: "kept": "false" (true to Python) made a discarded experiment the best
    # commit; other types ended the loop or the report in a traceback
    path = tmp_path / "journal.jsonl"
    journal.append(path, {"event": "start", "n": 1})
    with open(path, "a") as f:
        f.write(line + "\n")
    assert journal.read(path) == [{"event": "start", "n": 1}]
    assert capsys.readouterr().err == f"journal: {path}:2: {problem}; line skipped\n"


def test_a_journal_that_cannot_be_read_is_one_line_for_the_report(tmp_path, capsys):
    from agent import report

    (tmp_path / "t" / "journal.jsonl").mkdir(parents=True)
    assert report.main([str(tmp_path / "t")]) == 2
    path = tmp_path / "t" / "journal.jsonl"
    assert capsys.readouterr().err == f"report: error: {path}: cannot read the journal (Is a directory)\n"


def test_append_refuses_a_line_read_would_skip_and_writes_nothing(tmp_path):
    # the loop's own line of the wrong type would vanish on reading (a kept experiment with it)
    path = tmp_path / "journal.jsonl"
    journal.append(path, {"event": "start", "n": 1})
    with pytest.raises(ValueError, match=r"refusing to journal a line that could not be read back \(kept is 'yes', "
                                         r"not true or false\)$"):
        journal.append(path, {"event": "end", "n": 1, "status": "keep", "val_mean_rank": 2.0, "kept": "yes"})
    assert journal.read(path) == [{"event": "start", "n": 1}]
    journal.append(path, {"event": "end", "n": 1, "status": "crash", "result": {"samples_per_s": float("nan")}})
    assert len(journal.read(path)) == 2  # a run's own figure may be NaN: formatted, never compared
