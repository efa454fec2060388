"""``python -m eclip.train`` on a small built-in dataset, on the CPU: a short run that learns,
runs that diverge or run out of memory, ``--folds`` and ``--final``, and the pieces of a step
(augmentation, the logit scale's clamp, the evaluation's masking of caption padding)."""

import json

import pytest
import torch
from train_support import SMALL, metric_rows, recipe_at_call, run

from eclip import prepare, train
from eclip.loop import load_recipe


def test_short_run_learns(train_cache, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", train_cache, "--out", out, "--steps", 200, *SMALL], capsys)
    assert rc == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == 200 and result["eval_split"] == "val"
    rows = metric_rows(out)
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)
    random = (100 - 1) / 2
    assert result["val_mean_rank"] < random / 3, result["val_mean_rank"]
    assert result["warmup_s"] > 0 and result["samples_per_s"] > 0 and result["mfu"] is None  # CPU: no peak known
    assert 1 <= result["logit_scale"] <= 100
    for line in ("status:         ok", "val_mean_rank:", "steps:          200", "i2t_R@5:"):
        assert line in stdout
    assert (out / "checkpoint.safetensors").is_file() and (out / "checkpoint.json").is_file()


def test_nan_loss_is_reported_as_diverged(train_cache, tmp_path, capsys):
    nan = recipe_at_call(tmp_path, after="if _calls[0] == 3:\n    out['loss'] = out['loss'] * float('nan')")
    out = tmp_path / "run"
    rc, stdout, _ = run(["--data", train_cache, "--out", out, "--steps", 20, "--recipe", nan, *SMALL], capsys)
    assert rc == 1 and "status:         diverged" in stdout
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged" and result["val_mean_rank"] is None
    # read back without a sync: the NaN of step 3 is pushed at step 4 (--log-every=2) and
    # read at the next log point, step 6; it is still reported at step 3
    assert "loss nan at step 3" in result["reason"] and result["steps"] == 6
    assert f"reason:         {result['reason']}\n" in stdout  # the summary says why, as the JSON does


def test_a_metric_that_is_not_finite_is_written_as_null(train_cache, tmp_path, capsys):
    # Python's json wrote a bare NaN, no JSON: jq and JavaScript refuse the whole file
    odd = recipe_at_call(tmp_path, after="out['logit_scale'] = float('nan')\nout['odd'] = float('-inf')")
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", train_cache, "--out", out, "--steps", 3, "--recipe", odd, *SMALL], capsys)
    assert rc == 0, err

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    result = strict((out / "result.json").read_text())
    assert result["status"] == "ok" and result["logit_scale"] is None and result["loss"] > 0
    rows = [strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["logit_scale"], r["odd"]) for r in rows if "loss" in r] == [(1, None, None), (2, None, None),
                                                                                        (3, None, None)]
    assert "logit_scale:    nan\n" in stdout  # the summary, from the run's own figures, says what it was


@pytest.mark.parametrize("nan_step", [None, 3, 5])
def test_out_of_memory_mid_run_keeps_the_row_in_flight(train_cache, tmp_path, capsys, nan_step):
    # An OOM at step 6 (--log-every=2: rows pushed at steps 1, 2, 4): the row of step 4, still
    # in flight, is logged, then step 5's, and a NaN not yet read back — in that row (step 3) or after it
    # (step 5) — makes the run "diverged" rather than "oom".
    hog = recipe_at_call(tmp_path, before="if _calls[0] == 6:\n    raise torch.OutOfMemoryError('CUDA out of memory (simulated)')",
                         after=f"if _calls[0] == {nan_step}:\n    out['loss'] = out['loss'] * float('nan')")
    out = tmp_path / "run"
    rc, _, _ = run(["--data", train_cache, "--out", out, "--steps", 20, "--recipe", hog, *SMALL], capsys)
    result = json.loads((out / "result.json").read_text())
    assert rc == 1 and result["steps"] == 5
    if nan_step:
        assert result["status"] == "diverged" and f"loss nan at step {nan_step}" in result["reason"]
    else:
        assert result["status"] == "oom" and "out of memory (simulated)" in result["reason"]
        rows = metric_rows(out)
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 4, 5]  # and step 5, never pushed


def test_folds_and_final(train_cache, tmp_path, capsys):
    rc, stdout, err = run(["--data", train_cache, "--out", tmp_path / "cv", "--steps", 3, "--folds", 3, *SMALL], capsys)
    assert rc == 0, err
    r = json.loads((tmp_path / "cv" / "result.json").read_text())
    assert [f["status"] for f in r["folds"]] == ["ok", "ok", "ok"]
    ranks = [f["val_mean_rank"] for f in r["folds"]]
    assert r["val_mean_rank"] == pytest.approx(sum(ranks) / 3) and "folds_mean_rank:" in stdout
    assert "folds_done:     3/3\n" in stdout
    # a fold is not resumed on its own, and the message says what to do instead
    rc, _, err = run(["--data", train_cache, "--out", tmp_path / "cv" / "fold1", "--steps", 4, "--resume", *SMALL], capsys)
    assert rc == 2 and ("(a fold of a --folds run is not resumed on its own: resume the whole cross-validation, "
                        "--folds with --resume)") in err, err
    # each train+val image is validated exactly once over the folds, and never trained on then
    from eclip.data.cache import load_cache
    n_trainval = int((load_cache(train_cache).split <= 1).sum())
    folds = [json.loads((tmp_path / "cv" / f"fold{k}" / "result.json").read_text()) for k in range(3)]
    assert sum(f["metrics"]["n_images"] for f in folds) == n_trainval
    for f in folds:
        meta = json.loads((tmp_path / "cv" / f["eval_split"] / "checkpoint.json").read_text())
        assert meta["train_rows"] + f["metrics"]["n_images"] == n_trainval
    rc, stdout, err = run(["--data", train_cache, "--out", tmp_path / "fin", "--steps", 3, "--final", *SMALL], capsys)
    assert rc == 0, err
    assert "\ntest_mean_rank: " in stdout and "eval_split:     test\n" in stdout  # named for what it is
    r = json.loads((tmp_path / "fin" / "result.json").read_text())
    assert r["eval_split"] == "test" and r["metrics"]["n_images"] == 60 and r["test_mean_rank"] == r["val_mean_rank"]


def test_folds_cut_short_resume_in_the_fold_they_were_in(train_cache, tmp_path, capsys):
    base = ["--data", train_cache, "--steps", 3, "--folds", 3, *SMALL]
    rc, _, err = run([*base, "--out", tmp_path / "straight"], capsys)
    assert rc == 0, err
    # Ctrl-C before the second step of fold 1 (the fifth step in all: a file counts them, as
    # each fold loads the recipe afresh; resumed, the count has passed 5)
    count = tmp_path / "steps"
    stopper = recipe_at_call(tmp_path, before=f"with open({str(count)!r}, 'a') as f:\n    f.write('.')\n"
                                              f"if len(open({str(count)!r}).read()) == 5:\n    raise KeyboardInterrupt")
    out = tmp_path / "cv"
    import shutil
    shutil.copytree(tmp_path / "straight" / "fold2", out / "fold2")  # an earlier cross-validation's, in the way
    cv = [*base, "--out", out, "--recipe", stopper]
    rc, stdout, _ = run(cv, capsys)
    assert rc == 130 and "folds_done:     1/3\n" in stdout
    assert [f["status"] for f in json.loads((out / "result.json").read_text())["folds"]] == ["ok", "interrupted"]
    assert json.loads((out / "fold1" / "checkpoint.json").read_text())["step"] == 1
    # an attempt that went on past the checkpoint and died before saving logged a step (and a
    # torn line) that the resumed run trains again
    with open(out / "fold1" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "loss": 9.0}) + '\n{"step": 3, "lo')
    # resumed only under the settings it began with, each named
    for argv, what in [(["--steps", 4], "--steps"), (["--seed", 7, "--lr=2e-3"], "--seed, HPARAMS")]:
        rc, _, err = run([*cv, *argv, "--resume"], capsys)
        assert rc == 2 and err.startswith(f"train: error: {out / 'folds.json'}: this cross-validation began with "
                                          f"another {what}"), err
    # the same values written otherwise: the template's own preset, its lr spelt another way
    rc, stdout, err = run([*cv, "--resume", "--preset", "tiny", "--lr=0.001"], capsys)
    assert rc == 0, err
    # fold 0 had trained its 3 steps: evaluated again, not retrained; fold 1 goes on from its
    # step 1; fold 2 starts afresh (the checkpoint there is not of this cross-validation);
    # each fold's rank is the uninterrupted run's
    assert f"train: the checkpoint in {out / 'fold0'} has trained 3 steps" in err
    assert f"checkpoint in {out / 'fold2'}" not in err
    a, b = (json.loads((d / "result.json").read_text()) for d in (tmp_path / "straight", out))
    assert [f["status"] for f in b["folds"]] == ["ok"] * 3 and "folds_done:     3/3\n" in stdout
    assert [f["val_mean_rank"] for f in b["folds"]] == [f["val_mean_rank"] for f in a["folds"]]
    assert b["val_mean_rank"] == a["val_mean_rank"]
    for k in (1, 2):  # one log across the cut; fold 2's own from its step 1
        rows = [json.loads(line) for line in (out / f"fold{k}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and all(r.get("loss") != 9.0 for r in rows)
    # nothing to resume: one line, nothing trained
    rc, _, err = run([*base, "--out", tmp_path / "none", "--resume"], capsys)
    assert rc == 2 and err.strip() == (f"train: error: {tmp_path / 'none' / 'folds.json'}: no cross-validation to "
                                       "resume here; run --folds without --resume")
    assert not (tmp_path / "none").exists()


def test_folds_whose_first_fold_diverges_end_with_the_summary(train_cache, tmp_path, capsys):
    # no fold has a rank then: the summary once formatted None and the run died in a traceback
    nan = recipe_at_call(tmp_path, after="if _calls[0] == 3:\n    out['loss'] = out['loss'] * float('nan')")
    out = tmp_path / "cv"
    rc, stdout, _ = run(["--data", train_cache, "--out", out, "--steps", 20, "--folds", 3, "--recipe", nan, *SMALL], capsys)
    assert rc == 1 and "status:         diverged" in stdout and "folds_mean_rank: None" in stdout
    assert "folds_done:     0/3\n" in stdout  # one fold of three ran, and it failed
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged" and result["val_mean_rank"] is None
    assert [f["status"] for f in result["folds"]] == ["diverged"]  # the later folds are not run


def test_cache_without_regions_trains(tmp_path, capsys):
    # A plain caption manifest (no regions column) is the common OpenCLIP case.
    import numpy as np
    from PIL import Image
    images = tmp_path / "im"
    images.mkdir()
    rows = ["filepath,caption"]
    for i in range(12):
        Image.fromarray(np.full((20, 20, 3), i * 20, dtype=np.uint8)).save(images / f"{i}.png")
        rows.append(f"{i}.png,picture number {i}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    assert prepare.main(["--format", "manifest", "--images", str(images), "--manifest", str(tmp_path / "m.csv"),
                         "--out", str(tmp_path / "c"), "--image-size", "16", "--workers", "1",
                         "--vocab-size", "300", "--folds", "2", "--val-frac", "0.3", "--test-frac", "0"]) == 0
    rc, _, err = run(["--data", tmp_path / "c", "--out", tmp_path / "o", "--steps", 2, "--batch_size=4",
                      "--expert=true", "--expert_cold_start=0.0", "--expert_ramp=0.0", "--expert_probability=1.0",
                      "--model.vision.patch_size=8", "--model.vision.width=32", "--model.text.width=32",
                      "--model.expert.width=16"], capsys)
    assert rc == 0, err


def test_flip_only_mirrors_without_cropping(train_cache):
    from eclip.data.cache import load_cache
    from eclip.data.device import DeviceData
    c = load_cache(train_cache)
    rows = c.split_images("train")[:32]
    data = DeviceData(c, rows, torch.device("cpu"), seed=0, crop_scale=1.0, flip=True)
    plain = DeviceData(c, rows, torch.device("cpu"), seed=0)
    idx = data._indices(32)
    data.cursor = 0  # sample the same rows again, now through the augmentation
    batch = data.sample(32)
    originals = plain.images[idx].float() / 255
    same = (batch.images - originals).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (batch.images - originals.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same | mirrored).all()) and bool(same.any()) and bool(mirrored.any())
    boxes = plain.boxes[idx]
    flipped = torch.stack([1 - boxes[..., 2], boxes[..., 1], 1 - boxes[..., 0], boxes[..., 3]], -1) * plain.box_mask[idx][..., None]
    want = torch.where(mirrored[:, None, None], flipped, boxes) * batch.box_mask[..., None]  # the phrase's boxes
    assert batch.box_mask.any()
    torch.testing.assert_close(batch.boxes, want, atol=1e-5, rtol=0)


def test_train_step_clamps_the_logit_scale_after_the_optimizer_step(train_cache):
    # A gradient that always asks for a larger scale: Adam then raises the log-scale by the
    # learning rate each step, so only the clamp in train_step keeps it at ln 100.
    from eclip.data.cache import load_cache
    from eclip.data.device import DeviceData
    from eclip.loop import ModelSpec
    recipe = load_recipe(train.TEMPLATE)
    recipe.HPARAMS["model"] = {"vision.width": 64, "vision.depth": 1, "text.width": 64, "text.depth": 1}
    c = load_cache(train_cache)
    spec = ModelSpec(vocab_size=c.vocab_size, context_length=c.context_length,
                     phrase_length=int(c.region_tokens.shape[1]), image_size=c.image_size, device=torch.device("cpu"))
    model = recipe.build_model(spec)
    opt = recipe.build_optimizer(model)
    model.logit_scale.register_hook(lambda g: torch.full_like(g, -1.0))
    hi = torch.tensor(model.cfg.logit_scale_max, dtype=torch.float32)
    with torch.no_grad():
        model.logit_scale.fill_(float(hi) - 0.0015)
    data = DeviceData(c, c.split_images("train"), torch.device("cpu"), seed=0)
    values = []
    for _ in range(5):
        metrics = recipe.train_step(model, opt, data.sample(8), 0.5)
        values.append(model.logit_scale.detach().clone())
    assert values[1] > values[0] > float(hi) - 0.0015  # below the bound it moves: the gradient arrives
    assert torch.equal(values[-1], hi)  # and is clamped in place, never beyond
    assert float(metrics["logit_scale"]) == pytest.approx(100.0, rel=1e-6)


def test_the_seed_decides_the_batches(train_cache, tmp_path, capsys):
    rec = recipe_at_call(tmp_path, after="out['batch'] = batch.images.double().mean() + batch.tokens.double().mean()")
    seen = []
    for k, seed in enumerate((1, 2, 1)):
        out = tmp_path / f"run{k}"
        rc, _, err = run(["--data", train_cache, "--out", out, "--steps", 1, "--recipe", rec, *SMALL, "--seed", seed],
                         capsys)
        assert rc == 0, err
        seen.append(metric_rows(out)[0]["batch"])
    assert seen[0] == seen[2] != seen[1]


def test_final_trains_on_train_and_val_but_never_on_test(train_cache, tmp_path, capsys):
    from eclip.data.cache import load_cache

    out = tmp_path / "fin"
    rc, stdout, err = run(["--data", train_cache, "--out", out, "--steps", 1, "--final", *SMALL], capsys)
    assert rc == 0, err
    split = load_cache(train_cache).split
    assert json.loads((out / "checkpoint.json").read_text())["train_rows"] == int((split != 2).sum())
    # the summary names the test split's rank as such; it printed it as val_mean_rank too
    result = json.loads((out / "result.json").read_text())
    assert f"test_mean_rank: {result['test_mean_rank']:.4g}\n" in stdout and "val_mean_rank" not in stdout
    assert result["eval_split"] == "test" and result["val_mean_rank"] == result["test_mean_rank"]


def test_the_evaluation_masks_the_padding_of_captions():
    from eclip.loop import encode_in_order
    from eclip.model import build_model, model_config

    torch.manual_seed(0)
    model = build_model(model_config("tiny", image_size=32, vocab_size=50, context_length=8,
                                     **{"expert.enabled": False}))
    tokens = torch.tensor([[1, 5, 7, 2, 0, 0, 0], [1, 9, 2, 0, 0, 0, 0], [1, 4, 4, 4, 4, 6, 2]])
    _, txt = encode_in_order(model, None, tokens, torch.device("cpu"))
    for row, t in zip(txt, tokens, strict=True):
        n = int((t != 0).sum())
        with torch.no_grad():
            alone = model.encode_text(t[None, :n], torch.ones(1, n, dtype=torch.bool))
        torch.testing.assert_close(row[None], alone, atol=1e-5, rtol=0)
