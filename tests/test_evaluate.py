"""The retrieval metrics against an independent brute-force sort, and the fold helpers."""

import numpy as np
import pytest
import torch

from eclip.evaluate import (
    fold_split,
    format_metrics,
    kfold_assign,
    metrics_from_ranks,
    retrieval_metrics,
)


def brute_ranks(img: np.ndarray, txt: np.ndarray, txt_image: np.ndarray) -> tuple[list[int], list[int]]:
    """Sort every candidate list with Python's sort in float64; ties are ordered so the true
    match comes last (ties count against the model), then read off its position."""
    s = img.astype(np.float64) @ txt.astype(np.float64).T
    i2t, t2i = [], []
    for i in range(len(img)):
        own = [j for j in range(len(txt)) if txt_image[j] == i]
        best = max(own, key=lambda j: s[i, j])
        cands = [j for j in range(len(txt)) if txt_image[j] != i] + [best]
        order = sorted(cands, key=lambda j: (-s[i, j], j == best))
        i2t.append(order.index(best))
    for c in range(len(txt)):
        true = int(txt_image[c])
        order = sorted(range(len(img)), key=lambda k: (-s[k, c], k == true))
        t2i.append(order.index(true))
    return i2t, t2i


def brute_metrics(i2t, t2i) -> dict:
    out = {}
    for name, r in (("i2t", np.array(i2t)), ("t2i", np.array(t2i))):
        out[f"{name}_mean_rank"] = r.mean()
        out[f"{name}_median_rank"] = np.median(r)
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = (r < k).mean()
    out["mean_rank"] = (out["i2t_mean_rank"] + out["t2i_mean_rank"]) / 2
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("n,d", [(1, 4), (7, 3), (64, 16), (257, 8)])
def test_metrics_match_brute_force_on_random_data(n, d):
    rng = np.random.default_rng(n)
    img, txt = _unit(rng.normal(size=(n, d))), _unit(rng.normal(size=(n, d)))
    m = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt))
    ref = brute_metrics(*brute_ranks(img, txt, np.arange(n)))
    for k, v in ref.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k


def test_ties_count_against_the_model():
    # Integer-valued unit-free embeddings: every score is exact, and many tie.
    rng = np.random.default_rng(0)
    img = rng.integers(0, 2, size=(40, 3)).astype(np.float64) + 1
    txt = rng.integers(0, 2, size=(40, 3)).astype(np.float64) + 1
    img, txt = _unit(img), _unit(txt)
    i2t, t2i = brute_ranks(img, txt, np.arange(40))
    m = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt))
    assert m["i2t_mean_rank"] == pytest.approx(np.mean(i2t))
    assert m["t2i_mean_rank"] == pytest.approx(np.mean(t2i))


@pytest.mark.parametrize("n", [1, 2, 100])
def test_collapsed_model_scores_worst_not_best(n):
    emb = torch.ones(n, 8)
    m = retrieval_metrics(emb, emb)
    assert m["mean_rank"] == n - 1
    assert m["i2t_median_rank"] == n - 1
    assert m["i2t_r1"] == (1.0 if n == 1 else 0.0)


def test_perfect_model_and_random_baseline():
    n = 500
    x = torch.randn(n, 32, generator=torch.Generator().manual_seed(1))
    assert retrieval_metrics(x, x)["mean_rank"] == 0
    y = torch.randn(n, 32, generator=torch.Generator().manual_seed(2))
    assert abs(retrieval_metrics(x, y)["mean_rank"] - (n - 1) / 2) < 25


def test_the_ranking_sees_directions_only_whatever_the_scale():
    # The harness's batch check compares directions, so a row's norm must not reach the
    # scores: below fp32 normalisation's eps (1e-12) it once scaled the row's scores, past
    # about 1.8e19 it overflowed to a zero row. Powers of two scale exactly: the metrics
    # must come out the same to the bit.
    g = torch.Generator().manual_seed(4)
    img = torch.randn(200, 16, generator=g)
    txt = img + 1.5 * torch.randn(200, 16, generator=g)
    want = retrieval_metrics(img, txt)
    powers = torch.randint(-100, 101, (200, 1), generator=g).float()
    for scaled in (txt * 2.0 ** -60, txt * 2.0 ** 90, txt * 2.0 ** powers):
        assert retrieval_metrics(img, scaled) == want
        assert retrieval_metrics(scaled, img) == retrieval_metrics(txt, img)
    assert retrieval_metrics(torch.zeros(3, 4), torch.zeros(3, 4))["mean_rank"] == 2  # zero rows: worst


def test_several_captions_per_image_use_the_standard_protocol():
    rng = np.random.default_rng(3)
    n_img, per = 30, 5
    img = _unit(rng.normal(size=(n_img, 6)))
    txt_image = np.repeat(np.arange(n_img), per)
    rng.shuffle(txt_image)
    txt = _unit(img[txt_image] + rng.normal(scale=0.9, size=(len(txt_image), 6)))
    m = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(txt_image))
    ref = brute_metrics(*brute_ranks(img, txt, txt_image))
    for k, v in ref.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k
    assert m["n_images"] == n_img and m["n_texts"] == n_img * per


def test_metrics_from_ranks_and_format():
    m = metrics_from_ranks(torch.tensor([0, 1, 2, 10]), torch.tensor([0, 0, 4, 9]))
    assert m["i2t_mean_rank"] == 3.25 and m["i2t_median_rank"] == 1.5
    assert m["i2t_r1"] == 0.25 and m["i2t_r5"] == 0.75 and m["t2i_r10"] == 1.0
    assert m["mean_rank"] == (3.25 + 3.25) / 2
    lines = format_metrics(m, prefix="val_")
    assert lines[0] == "val_mean_rank: 3.25"
    assert "val_i2t_R@5: 75.0%" in lines
    with pytest.raises(ValueError, match="no ranks"):
        metrics_from_ranks(torch.tensor([], dtype=torch.long), torch.tensor([0]))


def test_kfold_assign_is_deterministic_and_balanced():
    a = kfold_assign(100, 3, seed=42)
    assert np.array_equal(a, kfold_assign(100, 3, seed=42))
    assert not np.array_equal(a, kfold_assign(100, 3, seed=43))
    assert sorted(np.bincount(a).tolist()) == [33, 33, 34]
    with pytest.raises(ValueError, match="folds must be"):
        kfold_assign(10, 0, 1)
    with pytest.raises(ValueError, match="cannot split 2 items into 3 folds"):
        kfold_assign(2, 3, 1)


def test_fold_split_partitions_train_val_and_leaves_test_out():
    fold = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1])
    for k in range(3):
        train, val = fold_split(fold, k)
        assert set(val.tolist()) == {i for i in range(8) if fold[i] == k}
        assert set(train.tolist()) | set(val.tolist()) == {0, 1, 2, 4, 5, 6}
        assert not set(train.tolist()) & set(val.tolist())
    with pytest.raises(ValueError, match="fold 3 out of range"):
        fold_split(fold, 3)


def test_a_zero_embedding_stays_zero_and_scores_zero():
    # A zero row (a dead model output) has score 0 with everything: ranked last as a query
    # (ties count against it) and, as a competitor, beating only the texts whose own score
    # is <= 0, not every text (as it would if it became NaN).
    rng = np.random.default_rng(5)
    img, txt = _unit(rng.normal(size=(20, 6))), _unit(rng.normal(size=(20, 6)))
    img[4] = 0.0
    m = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt))
    ref = brute_metrics(*brute_ranks(img, txt, np.arange(20)))
    for k, v in ref.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k


def test_kfold_assign_allows_one_item_a_fold():
    assert sorted(kfold_assign(3, 3, seed=0).tolist()) == [0, 1, 2]


def test_fold_split_refuses_a_negative_fold():
    # fold -1 marks the held-out test split: as "fold -1" it would be validated on
    fold = torch.tensor([0, 1, -1, 0, 1, -1])
    with pytest.raises(ValueError, match=r"fold -1 out of range: the cache has folds 0\.\.1"):
        fold_split(fold, -1)
