"""``eclip.scoring``: the harness's ranking of a run's embeddings, and its check that each
embedding depends on its own input only."""

import re

import pytest
import torch
from safetensors.torch import save_file

from eclip.errors import EclipError
from eclip.scoring import BATCH_TOL, batch_check, score


@pytest.mark.parametrize("damage,message", [
    ("missing", "the evaluation left no readable embeddings"),
    ("rows", "img: expected float [60, E], got torch.float32 [59, 8]"),
    ("width", "img and txt widths differ (8 vs 4)"),
    ("empty", "img: expected float [60, E], got torch.float32 [60, 0]"),  # no direction to rank
])
def test_embeddings_that_do_not_fit_the_split_are_an_error(tmp_path, damage, message):
    img_f, txt_f = tmp_path / "img.safetensors", tmp_path / "txt.safetensors"
    order_i, order_t, pairs = torch.randperm(60), torch.randperm(60), torch.arange(60)
    if damage != "missing":
        width = 0 if damage == "empty" else 8
        save_file({"img": torch.randn(59 if damage == "rows" else 60, width)}, str(img_f))
        save_file({"txt": torch.randn(60, 4 if damage == "width" else width)}, str(txt_f))
    with pytest.raises(EclipError, match=re.escape(message)):
        score({"status": "ok"}, img_f, txt_f, order_i, order_t, pairs, "cpu", "val")
    # rows encoded in the secret orders are put back in place, then ranked against the
    # pairs given, whatever the run reported
    eye = torch.eye(60)
    save_file({"img": eye[order_i]}, str(img_f))
    save_file({"txt": eye[order_t]}, str(txt_f))
    r = score({"status": "ok", "val_mean_rank": 99.0}, img_f, txt_f, order_i, order_t, pairs, "cpu", "test")
    assert r["val_mean_rank"] == 0 and r["test_mean_rank"] == 0 and r["ranked_by"] == "harness"
    assert r["eval_split"] == "test"
    save_file({"txt": eye}, str(txt_f))  # captions left in the pairs' order
    assert score({"status": "ok"}, img_f, txt_f, order_i, order_t, pairs, "cpu", "val")["val_mean_rank"] > 0


def test_the_batch_check_names_the_part_and_how_far_off():
    emb = torch.nn.functional.normalize(torch.randn(12, 8, dtype=torch.float64), dim=1).float()
    first = emb[[0, 5]]
    assert batch_check(first, first.clone(), "images") < 1e-12  # the cosine of a row with itself, rounded
    moved = first.clone()
    moved[1] = torch.nn.functional.normalize(moved[1] + 0.2 * emb[1], dim=0)  # as a batch mean would
    gap = float(1 - torch.nn.functional.cosine_similarity(moved[1:].double(), first[1:].double()))
    assert gap > BATCH_TOL
    with pytest.raises(EclipError, match=re.escape(f"evaluation (texts): an item encoded again, fresh and in a "
                                                   f"pair, got another embedding than among the rest (1 - cosine "
                                                   f"{gap:.3g}, at most 0.001)")):
        batch_check(first, moved, "texts")
    # NaN in one of the two: as far off as can be
    moved[1] = float("nan")
    with pytest.raises(EclipError, match=re.escape("(1 - cosine 2, at most 0.001)")):
        batch_check(first, moved, "texts")
    # tiny but honest embeddings still have a direction (the ranking normalises them)
    assert batch_check(first * 1e-9, first * 1e-9, "images") < 1e-12
    # degenerate both times (zero or non-finite): a broken model, not a batch-dependent one
    broken = torch.stack([torch.zeros(8), torch.full((8,), float("nan"))])
    assert batch_check(broken, broken.clone(), "images") == 0.0
    with pytest.raises(EclipError, match=re.escape("(1 - cosine 1, at most 0.001)")):
        batch_check(first, torch.stack([first[0], torch.zeros(8)]), "images")


def test_copies_are_checked_before_the_ranking(tmp_path):
    img_f, txt_f, copies_f = (tmp_path / f"{n}.safetensors" for n in ("img", "txt", "copies"))
    order_i, order_t, pairs = torch.randperm(60), torch.randperm(60), torch.arange(60)
    picks = {"images": torch.tensor([4, 9, 30]), "texts": torch.tensor([0, 59, 7])}
    eye = torch.eye(60)
    img, txt = eye[order_i], eye[order_t]
    save_file({"img": img}, str(img_f))
    save_file({"txt": txt}, str(txt_f))
    save_file({"img": img[picks["images"]], "txt": txt[picks["texts"]]}, str(copies_f))
    r = score({"status": "ok"}, img_f, txt_f, order_i, order_t, pairs, "cpu", "val", (copies_f, picks))
    assert r["val_mean_rank"] == 0 and r["batch_gap"] == {"images": 0.0, "texts": 0.0}
    # copies of another width than the split's embeddings
    save_file({"img": img[picks["images"]][:, :59].contiguous(), "txt": txt[picks["texts"]]}, str(copies_f))
    with pytest.raises(EclipError, match=re.escape("copies.safetensors: img: expected float [3, 60], got "
                                                   "torch.float32 [3, 59]")):
        score({"status": "ok"}, img_f, txt_f, order_i, order_t, pairs, "cpu", "val", (copies_f, picks))
    # a copies file without its captions
    save_file({"img": img[picks["images"]]}, str(copies_f))
    with pytest.raises(EclipError, match=re.escape("copies.safetensors: txt: expected float [3, 60], got missing")):
        score({"status": "ok"}, img_f, txt_f, order_i, order_t, pairs, "cpu", "val", (copies_f, picks))
    # a copy that came out as another item's embedding is refused, naming its part
    save_file({"img": img[[4, 9, 31]], "txt": txt[picks["texts"]]}, str(copies_f))
    with pytest.raises(EclipError, match=re.escape("evaluation (images): an item encoded again, fresh and in a pair, "
                                                   "got another embedding than among the rest (1 - cosine 1,")):
        score({"status": "ok"}, img_f, txt_f, order_i, order_t, pairs, "cpu", "val", (copies_f, picks))


def test_a_val_scoring_reports_no_test_rank(tmp_path):
    # Only a scoring of the test split may carry test_mean_rank (what --final and the agent's
    # report read as the held-out score).
    img_f, txt_f = tmp_path / "img.safetensors", tmp_path / "txt.safetensors"
    order, pairs, eye = torch.arange(20), torch.arange(20), torch.eye(20)
    save_file({"img": eye}, str(img_f))
    save_file({"txt": eye}, str(txt_f))
    r = score({"status": "ok"}, img_f, txt_f, order, order, pairs, "cpu", "val")
    assert r["val_mean_rank"] == 0 and "test_mean_rank" not in r


def test_the_batch_check_sees_directions_at_any_scale():
    # The ranking normalises any norm (eclip.evaluate.directions): honest embeddings of norm
    # 1e-20 still match, and the gap is never negative (1 - cosine rounded below 0).
    emb = torch.randn(200, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert 0.0 <= batch_check(emb * 1e-20, emb.clone() * 1e-20, "images") < 1e-12
    unit = torch.nn.functional.normalize(emb, dim=1)
    below = emb[(unit * unit).sum(1) > 1]  # rows whose cosine with themselves rounds above 1
    assert len(below) > 0
    assert batch_check(below, below.clone(), "images") == 0.0


@pytest.mark.parametrize("bad,shown", [
    (torch.ones(60, 8, dtype=torch.int64), "torch.int64 [60, 8]"),  # no direction to normalise
    (torch.ones(60, 8, 1), "torch.float32 [60, 8, 1]"),
    (torch.ones(60), "torch.float32 [60]"),
])
def test_embeddings_must_be_a_float_matrix(tmp_path, bad, shown):
    img_f, txt_f = tmp_path / "img.safetensors", tmp_path / "txt.safetensors"
    order = torch.randperm(60)
    save_file({"img": bad}, str(img_f))
    save_file({"txt": torch.randn(60, 8)}, str(txt_f))
    with pytest.raises(EclipError, match=re.escape(f"img.safetensors: img: expected float [60, E], got {shown}")):
        score({"status": "ok"}, img_f, txt_f, order, order, torch.arange(60), "cpu", "val")


def test_the_ranking_is_of_the_cache_pairs_with_several_captions_an_image(tmp_path):
    # COCO-like: 3 captions an image, so the captions' order has more rows than the images',
    # and each caption is ranked against its own image (txt_image), as an independent sort
    # finds; val_mean_rank is the average of the two directions' mean ranks
    g = torch.Generator().manual_seed(7)
    n_img, per = 12, 3
    txt_image = torch.arange(n_img).repeat_interleave(per)[torch.randperm(n_img * per, generator=g)]
    img = torch.randn(n_img, 6, generator=g, dtype=torch.float64)
    txt = img[txt_image] + 1.2 * torch.randn(n_img * per, 6, generator=g, dtype=torch.float64)
    order_i, order_t = torch.randperm(n_img, generator=g), torch.randperm(n_img * per, generator=g)
    img_f, txt_f = tmp_path / "img.safetensors", tmp_path / "txt.safetensors"
    save_file({"img": img[order_i].float()}, str(img_f))
    save_file({"txt": txt[order_t].float()}, str(txt_f))
    r = score({"status": "ok"}, img_f, txt_f, order_i, order_t, txt_image, "cpu", "val")

    unit = lambda e: torch.nn.functional.normalize(e.float().double(), dim=1)  # noqa: E731
    s = unit(img) @ unit(txt).T  # [images, captions]
    i2t = [int((s[i][txt_image != i] >= s[i][txt_image == i].max()).sum()) for i in range(n_img)]
    t2i = [int((s[:, c] >= s[txt_image[c], c]).sum()) - 1 for c in range(n_img * per)]
    want_i2t, want_t2i = sum(i2t) / n_img, sum(t2i) / (n_img * per)
    assert want_i2t != want_t2i  # the average of the two is then neither of them
    assert r["metrics"]["i2t_mean_rank"] == pytest.approx(want_i2t, abs=1e-12)
    assert r["metrics"]["t2i_mean_rank"] == pytest.approx(want_t2i, abs=1e-12)
    assert r["val_mean_rank"] == pytest.approx((want_i2t + want_t2i) / 2, abs=1e-12)
    assert r["metrics"]["n_images"] == n_img and r["metrics"]["n_texts"] == n_img * per
    assert "batch_gap" not in r  # no copies given, no batch check reported


def test_an_infinite_item_both_times_is_broken_not_batch_dependent():
    # infinite entries are as degenerate as NaN (the ranking puts such an item last); an
    # empty check has nothing off
    first = torch.tensor([[float("inf"), 1.0, 0.0], [1.0, -float("inf"), float("inf")], [0.6, 0.8, 0.0]])
    assert batch_check(first, first.clone(), "images") == 0.0
    with pytest.raises(EclipError, match=re.escape("(1 - cosine 2, at most 0.001)")):
        batch_check(first, torch.tensor([[1.0, 1.0, 0.0], *first[1:].tolist()]), "images")
    assert batch_check(torch.zeros(0, 3), torch.zeros(0, 3), "texts") == 0.0
