"""The offline search proposer: edits only HPARAMS values, deterministically, never repeats."""

import ast
import math
from pathlib import Path

import pytest

from agent.search import FROZEN, Proposal, SearchProposer, format_value, read_hparams, write_hparams
from eclip import policy

TEMPLATE = (Path(__file__).resolve().parents[1] / "eclip" / "recipe.py").read_text()

SMALL = '''"""A toy recipe."""
import math  # kept

HPARAMS = {
    "preset": "tiny",  # size
    "model": {},  # overrides
    "batch_size": 64,  # samples
    "lr": 1e-3,  # peak → rate
    "warmup": 0.05,  # fraction
    "beta2": 0.98,  # decay
    "flip": False,  # augmentation
    "precision": "auto",  # mode
    "seed": 0,  # seed
}
X = math.pi  # untouched
'''


def _entry(hp, rank, kept=True, status="keep"):
    return {"hparams": hp, "val_mean_rank": rank, "status": status, "kept": kept}


def _proposals(source, n, seed=0):
    """n successive proposals, each fed the history of the previous ones (none kept)."""
    prop, history, out = SearchProposer(seed=seed), [], []
    for _ in range(n):
        p = prop.propose(source, history)
        out.append(p)
        history.append(_entry(read_hparams(p.source), 10.0, kept=False, status="discard"))
    return out


def test_deterministic_for_a_seed():
    a = [p.source for p in _proposals(TEMPLATE, 5, seed=3)]
    b = [p.source for p in _proposals(TEMPLATE, 5, seed=3)]
    c = [p.source for p in _proposals(TEMPLATE, 5, seed=4)]
    assert a == b
    assert a != c


def test_only_hparams_values_change_and_comments_survive():
    tree = ast.parse(TEMPLATE)
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "HPARAMS")
    lines = TEMPLATE.splitlines()
    for p in _proposals(TEMPLATE, 20):
        new = p.source.splitlines()
        assert len(new) == len(lines)
        for i, (old_line, new_line) in enumerate(zip(lines, new, strict=True), start=1):
            if not node.lineno < i < node.end_lineno:
                assert old_line == new_line  # outside the literal: byte for byte
            elif old_line != new_line:
                key = old_line.split(":")[0].strip().strip('"')
                assert key in p.changes
                assert old_line.partition("#")[1:] == new_line.partition("#")[1:]  # the comment
                assert new_line.split(":")[0] == old_line.split(":")[0]


def test_changed_keys_are_allowed_and_match_the_source():
    for p in _proposals(TEMPLATE, 30):
        assert isinstance(p, Proposal)
        assert 1 <= len(p.changes) <= 2
        assert not FROZEN & set(p.changes)
        assert not {"flip", "crop_scale"} & set(p.changes)  # the captions name sides and positions
        new = read_hparams(p.source)
        old = read_hparams(TEMPLATE)
        assert {k for k in old if old[k] != new[k]} == set(p.changes)
        for key, (before, after) in p.changes.items():
            assert old[key] == before and new[key] == after
            assert type(after) is type(before)
        assert p.description and p.hypothesis.endswith(".")
        # expert is off in the template: its sub-weights would change nothing
        assert not any(k.startswith("expert_") for k in p.changes if not new["expert"])


def test_value_ranges_over_many_steps():
    for p in _proposals(SMALL, 40) + _proposals(TEMPLATE, 40, seed=1):
        hp = read_hparams(p.source)
        assert hp["lr"] > 0
        assert 0 <= hp["warmup"] <= 1
        assert 0 < hp["beta2"] < 1
        b = hp["batch_size"]
        assert 8 <= b <= 4096 and b & (b - 1) == 0 and isinstance(b, int)
        for key in ("min_lr_ratio", "crop_scale", "expert_probability"):
            if key in hp:
                assert 0 <= hp[key] <= 1


def test_starts_from_best_kept_entry():
    hp = read_hparams(SMALL)
    good = {**hp, "lr": 3e-4, "batch_size": 256}
    worse = {**hp, "lr": 5e-3}
    history = [_entry(hp, 30.0, status="baseline"), _entry(worse, 40.0),
               _entry(good, 12.0), _entry({**hp, "lr": 1e-2}, 1.0, kept=False, status="discard")]
    p = SearchProposer(seed=0).propose(SMALL, history)
    new = read_hparams(p.source)
    mutated = [k for k in new if new[k] != good[k]]
    assert 1 <= len(mutated) <= 2
    assert all(k not in FROZEN for k in mutated)


def test_never_repeats_a_config_in_history():
    prop = SearchProposer(seed=0)
    first = prop.propose(SMALL, [])
    history = [_entry(read_hparams(first.source), 20.0, kept=False, status="discard")]
    second = prop.propose(SMALL, history)
    assert read_hparams(second.source) != read_hparams(first.source)
    seen = set()
    for p in _proposals(SMALL, 60):
        cfg = repr(sorted(read_hparams(p.source).items()))
        assert cfg not in seen
        seen.add(cfg)


def test_widens_when_the_neighbourhood_is_exhausted():
    # only a bool to mutate: one unseen neighbour, then none
    src = 'HPARAMS = {"ema": False, "seed": 0}\n'
    prop = SearchProposer(seed=0)
    p = prop.propose(src, [])
    assert read_hparams(p.source) == {"ema": True, "seed": 0}
    with pytest.raises(RuntimeError, match="no unseen configuration"):
        prop.propose(src, [_entry(read_hparams(p.source), 1.0, kept=False, status="discard")])


def test_an_interrupted_run_is_tried_again():
    # a Ctrl-C or a full disk says nothing of the configuration: it is not "seen"
    src = 'HPARAMS = {"ema": False, "seed": 0}\n'
    flipped = {"ema": True, "seed": 0}
    p = SearchProposer(seed=0).propose(src, [_entry(flipped, None, kept=False, status="interrupted")])
    assert read_hparams(p.source) == flipped


def test_the_expert_schedule_always_fits_in_training():
    # cold start and ramp are each drawn within their bounds (up to 0.9 and 1.0); a proposal
    # whose phases with the model's cool-down exceed training would fail at build time
    src = TEMPLATE.replace('"expert": False', '"expert": True').replace(
        '"model": {}', '"model": {"expert.cool_down": 0.7}')
    assert read_hparams(src)["model"] == {"expert.cool_down": 0.7}
    sums = []
    for seed in range(300):
        hp = read_hparams(SearchProposer(seed=seed).propose(src, [], {}).source)
        sums.append(hp["expert_cold_start"] + hp["expert_ramp"])
        assert sums[-1] + 0.7 <= 1 + 1e-9, (seed, hp["expert_cold_start"], hp["expert_ramp"])
    assert max(sums) > 0.25  # the schedule keys were mutated, upwards too (from 0.2)


def test_switching_the_expert_path_off_leaves_its_knobs_alone():
    # With the path off its knobs do nothing: "off, with another expert_probability" was a
    # new configuration to the duplicate check, and the same experiment to the recipe.
    src = TEMPLATE.replace('"expert": False', '"expert": True')
    base = read_hparams(src)
    knobs = ("expert_weight", "expert_probability", "expert_cold_start", "expert_ramp")
    off = 0
    for seed in range(200):
        hp = read_hparams(SearchProposer(seed=seed).propose(src, [], {}).source)
        if hp["expert"] is False:
            off += 1
            assert all(hp[k] == base[k] for k in knobs), (seed, {k: hp[k] for k in knobs})
    assert off > 0
    # and an "off" already run, with other inactive values, is not proposed again
    ran = dict(base, expert=False, expert_probability=0.123)
    history = [_entry(ran, 10.0, kept=False, status="discard")]
    for seed in range(60):
        hp = read_hparams(SearchProposer(seed=seed).propose(src, history, {}).source)
        assert hp != dict(base, expert=False), seed


def test_read_write_round_trip():
    hp = read_hparams(TEMPLATE)
    assert hp["lr"] == 1e-3 and hp["preset"] == "tiny" and hp["model"] == {}
    assert write_hparams(TEMPLATE, {}) == TEMPLATE
    assert write_hparams(TEMPLATE, {k: hp[k] for k in ("lr", "eps", "flip")}) == TEMPLATE.replace(
        '"lr": 1e-3', '"lr": 0.001')
    updates = {"lr": 6.2e-4, "batch_size": 128, "flip": True, "beta2": 0.99875}
    assert read_hparams(write_hparams(TEMPLATE, updates)) == {**hp, **updates}


def test_float_format_round_trips():
    for x in (1e-3, 6.2e-4, 1.0, 0.99875, 1e-6, 2e3, 0.1 + 0.2, 123456.0):
        text = format_value(x)
        assert isinstance(ast.literal_eval(text), float) and float(text) == x
    assert format_value(1e-6) == "1e-6" and format_value(1.0) == "1.0"
    assert format_value(True) == "True" and format_value(64) == "64"


def test_template_proposal_passes_policy():
    for p in _proposals(TEMPLATE, 10):
        ast.parse(p.source)
        assert policy.check_source(p.source) == []
    assert policy.check_source(TEMPLATE) == []


def test_history_entries_without_rank_or_hparams():
    history = [_entry(None, None, kept=True, status="crash"), {"status": "rejected", "kept": False,
               "val_mean_rank": None, "hparams": {}}]
    p = SearchProposer(seed=0).propose(SMALL, history)
    assert not math.isnan(read_hparams(p.source)["lr"])


@pytest.mark.parametrize("source", ["x = 1\n", "HPARAMS = dict(lr=1)\n",
                                    "def f():\n    HPARAMS = {'lr': 1.0}\n", "HPARAMS = {"])
def test_source_without_literal_hparams(source):
    with pytest.raises(ValueError, match="HPARAMS|parse") as info:
        SearchProposer().propose(source, [])
    assert "\n" not in str(info.value)


def test_step_adapts_to_success():
    from agent.search import GROW, SIGMA, SIGMA_RANGE, adapted_sigma

    hp = read_hparams(SMALL)
    misses = [_entry(hp, 10.0, kept=False, status="discard")] * 8
    hits = [_entry(hp, 5.0, kept=True, status="keep")] * 2
    # baselines, unrun edits and interrupted runs say nothing about the step size
    neutral = [_entry(hp, 10.0, kept=False, status=s) for s in ("baseline", "no-op", "rejected", "interrupted")]
    assert adapted_sigma(neutral) == SIGMA
    assert adapted_sigma(misses) == pytest.approx(SIGMA * GROW ** -2)  # 8 misses: two quarter-steps ×4
    assert adapted_sigma(hits) == pytest.approx(SIGMA * GROW ** 2)
    # one keep in five holds the step still (the one-fifth rule)
    assert adapted_sigma((misses[:4] + hits[:1]) * 3) == pytest.approx(SIGMA)
    crashes = [_entry(hp, None, kept=False, status="crash")] * 200
    assert adapted_sigma(crashes) == SIGMA_RANGE[0]  # bounded below: never a frozen search
    assert adapted_sigma(hits * 100) == SIGMA_RANGE[1]


def test_proposals_shrink_after_misses_and_grow_after_keeps():
    """The drawn lr step follows the adapted σ: median |log(new/old)| over many seeds."""
    source = SMALL.replace('"batch_size": 64', '"batch_size": -1').replace('"flip": False', '"flip": "x"')
    keys_hp = read_hparams(source)

    def median_log_step(history):
        steps = []
        for seed in range(150):
            p = SearchProposer(seed=seed).propose(source, history)
            assert p.step is not None
            if "lr" in p.changes:
                steps.append(abs(math.log(p.changes["lr"][1] / keys_hp["lr"])))
        steps.sort()
        return steps[len(steps) // 2]

    far = dict(keys_hp, lr=0.5, warmup=0.4, beta2=0.5)  # seen configs far away: no widening
    misses = [_entry(far, 10.0, kept=False, status="discard")] * 12
    small, medium = median_log_step(misses), median_log_step([])
    assert small < 0.6 * medium
    # keeps of a configuration equal to the source's own values: the base stays, σ grows
    hits = [_entry(dict(keys_hp), 5.0, kept=True, status="keep")] * 3
    assert median_log_step(hits) > 1.5 * medium


def test_mutation_bounds_hold_from_the_edges_at_a_wide_step():
    import random

    from agent.search import _mutate

    rng = random.Random(0)
    for _ in range(300):
        b = _mutate("batch_size", 4096, rng, 2.0)
        assert 8 <= _mutate("batch_size", 8, rng, 2.0) and b <= 4096 and isinstance(b, int)
        assert 0.5 <= _mutate("beta2", 0.98, rng, 2.0) <= 1 - 1e-4  # 1 - β within ONE_MINUS
        assert 0.5 <= _mutate("beta1", 0.9, rng, 2.0) <= 1 - 1e-3


def test_write_hparams_refuses_an_entry_the_dict_does_not_have():
    # an update for a missing key once vanished silently: the caller believed it was written
    with pytest.raises(ValueError, match=r"HPARAMS has no entries \['nope'\]"):
        write_hparams(SMALL, {"lr": 2e-3, "nope": 1})


def test_zero_entries_an_int_is_left_alone_a_float_can_be_switched_on():
    # no factor of 2 moves an int 0 (a count that is off), while a float 0.0 such as
    # grad_clip restarts from its lower bound: the search can switch it on
    src = 'HPARAMS = {"accumulate": 0, "grad_clip": 0.0, "seed": 0}\n'
    for seed in range(20):
        p = SearchProposer(seed=seed).propose(src, [])
        assert set(p.changes) == {"grad_clip"}, (seed, p.changes)
        assert 0.05 <= p.changes["grad_clip"][1] <= 100.0


def test_batch_size_is_both_doubled_and_halved():
    src = 'HPARAMS = {"batch_size": 64, "seed": 0}\n'
    sizes = {read_hparams(SearchProposer(seed=seed).propose(src, []).source)["batch_size"] for seed in range(40)}
    assert any(b > 64 for b in sizes) and any(b < 64 for b in sizes), sizes
    assert all(b in (8, 16, 32, 128, 256, 512, 1024, 2048, 4096) for b in sizes), sizes


def test_proposed_floats_are_what_a_person_would_write():
    # three significant digits (of 1 - beta for the betas): "0.98", not 0.9800000000000001,
    # so the recipe text and the results table stay readable and near-duplicates collapse
    seen = set()
    for seed in range(60):
        p = SearchProposer(seed=seed).propose(SMALL, [])
        for key, (_, new) in p.changes.items():
            if key == "lr":
                assert float(f"{new:.3g}") == new, new
            elif key == "beta2":
                gap = float(f"{1 - new:.3g}")
                assert new == round(1 - gap, 12) and format_value(new) == repr(round(1 - gap, 12)), new
                assert len(format_value(new)) <= 8, format_value(new)
            seen.add(key)
    assert {"lr", "beta2"} <= seen


def test_an_unknown_fraction_stays_a_fraction():
    # a float key without bounds of its own, at or below 1, is taken for a fraction
    src = 'HPARAMS = {"mix": 0.9, "seed": 0}\n'
    values = [SearchProposer(seed=seed).propose(src, []).changes["mix"][1] for seed in range(30)]
    assert all(0 < v <= 1.0 for v in values), values
    assert min(values) < 0.9 and max(values) == 1.0  # moved both ways, clipped at 1 from above


@pytest.mark.parametrize("cold,ramp,cool,fits", [
    (0.33, 0.56, 0.11, True),  # sums to 1.0000000000000002 in binary: the model config accepts it
    (0.3, 0.2, 0.5, True),
    (0.3, 0.2, 0.51, False),
])
def test_the_expert_schedule_check_matches_the_model_configs(cold, ramp, cool, fits):
    from agent.search import _schedule_fits
    from eclip.model import ExpertConfig

    hp = {"expert_cold_start": cold, "expert_ramp": ramp, "model": {"expert.cool_down": cool}}
    assert _schedule_fits(hp) is fits
    if fits:  # what the search lets through, the model builds
        ExpertConfig(cold_start=cold, ramp=ramp, cool_down=cool)
    else:
        with pytest.raises(ValueError, match="must not exceed 1"):
            ExpertConfig(cold_start=cold, ramp=ramp, cool_down=cool)


def test_frozen_entries_of_the_best_are_not_adopted():
    # the recipe's preset and seed (edited by hand since) stay; the best's lr is adopted
    src = SMALL.replace('"preset": "tiny"', '"preset": "small"').replace('"seed": 0', '"seed": 7')
    best = {**read_hparams(SMALL), "lr": 3e-4, "seed": 0}
    p = SearchProposer(seed=0).propose(src, [_entry(best, 5.0)])
    new = read_hparams(p.source)
    assert new["preset"] == "small" and new["seed"] == 7
    assert "seed" not in p.changes and "preset" not in p.changes
    assert p.description.endswith(" (from best kept)")
    assert p.hypothesis.startswith("Starting from the best kept configuration, ")


def test_the_step_widens_when_every_near_neighbour_was_tried():
    # 16, 32, 128 and 256 tried: one or two doublings away is seen; only a wider step
    # (8, 512 or more) is new, which the first attempts at the adapted sigma hardly draw
    src = 'HPARAMS = {"batch_size": 64, "seed": 0}\n'
    history = [_entry({"batch_size": b, "seed": 0}, 10.0, kept=False, status="discard") for b in (16, 32, 128, 256)]
    for seed in range(5):
        p = SearchProposer(seed=seed).propose(src, history)
        assert p.changes["batch_size"][1] in (8, 512, 1024, 2048, 4096), p.changes
        assert p.step > 0.5 * 1.5 ** -1  # drawn at a widened sigma


def test_one_or_two_entries_change_per_proposal():
    counts = {len(SearchProposer(seed=seed).propose(SMALL, []).changes) for seed in range(30)}
    assert counts == {1, 2}


def test_the_hypothesis_names_each_change_in_the_right_direction():
    for seed in range(30):
        p = SearchProposer(seed=seed).propose(SMALL, [])
        for key, (old, new) in p.changes.items():
            if isinstance(new, bool):
                verb = f"turning {key} {'on' if new else 'off'}"
            else:
                verb = f"{'raising' if new > old else 'lowering'} {key} to {format_value(new)}"
            assert verb in p.hypothesis, (p.hypothesis, key, old, new)
            assert f"{key} {format_value(old)} -> {format_value(new)}" in p.description


@pytest.mark.parametrize("extra,line", [
    ('HPARAMS["lr"] = 5e-3', 2), ("HPARAMS.update(lr=5e-3)", 2), ("HPARAMS = {**HPARAMS, 'lr': 5e-3}", 2),
    ("HPARAMS |= {'lr': 5e-3}", 2), ("def f():\n    global HPARAMS\n    del HPARAMS['lr']", 4),
])
def test_a_recipe_that_writes_hparams_again_is_refused_at_that_line(extra, line):
    # the proposer mutated the literal, the recipe trained on the later value, and the
    # journal recorded the literal's: "lr 0.001 -> 0.000964" for a run at lr 0.002
    from agent.search import read_hparams

    with pytest.raises(ValueError, match=rf"^recipe line {line}: HPARAMS is written again after its literal"):
        read_hparams('HPARAMS = {"lr": 1e-3}\n' + extra + "\n")
    assert read_hparams('HPARAMS = {"lr": 1e-3}\nrate = HPARAMS.get("lr")\n') == {"lr": 1e-3}  # reads are fine
