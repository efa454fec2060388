"""retrieval_ranks against a float64 brute force: ties, several captions per image, top-k.

Embeddings are small integers in most tests, so every score is an exact integer in fp32,
fp16-input and bf16-input arithmetic alike: ranks must then match the float64 brute force
exactly (tolerance: (any dtype, atol 0, rtol 0)), and ties are frequent, which exercises
the "ties count against the model" rule. On a CUDA machine the same tests run the Triton
kernel (the default backend for CUDA tensors).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels
from kernels import Ranks, retrieval_ranks, retrieval_ranks_ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def brute_ranks(img: torch.Tensor, txt: torch.Tensor, txt_image: np.ndarray):
    """Rank definitions of the contract, written out with loops over a float64 matrix."""
    s = (img.double() @ txt.double().T).cpu().numpy()  # [Ni, Nt]
    n_img, n_txt = s.shape
    t2i = np.zeros(n_txt, dtype=np.int64)
    for c in range(n_txt):
        p = s[txt_image[c], c]
        t2i[c] = sum(1 for k in range(n_img) if k != txt_image[c] and s[k, c] >= p)
    i2t = np.zeros(n_img, dtype=np.int64)
    for i in range(n_img):
        own = [c for c in range(n_txt) if txt_image[c] == i]
        p = max(s[i, c] for c in own)
        i2t[i] = sum(1 for j in range(n_txt) if txt_image[j] != i and s[i, j] >= p)
    return i2t, t2i


def int_embeddings(n: int, d: int, seed: int, dtype, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (n, d), generator=g).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "n,d,dtype",
    [(1, 5, torch.float32), (7, 3, torch.float16), (133, 33, torch.float32), (70, 64, torch.bfloat16)],
)
def test_ranks_one_to_one_match_brute_force(n, d, dtype, device):
    img = int_embeddings(n, d, 1, dtype, device)
    txt = int_embeddings(n, d, 2, dtype, device)
    want_i2t, want_t2i = brute_ranks(img, txt, np.arange(n))
    got = retrieval_ranks(img, txt)
    assert isinstance(got, Ranks) and got.i2t_topk is None and got.t2i_topk is None
    assert got.i2t.dtype == torch.int64 and got.t2i.dtype == torch.int64
    np.testing.assert_array_equal(got.i2t.cpu().numpy(), want_i2t)
    np.testing.assert_array_equal(got.t2i.cpu().numpy(), want_t2i)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_img,per,d", [(1, 3, 4), (29, 5, 16), (60, 2, 7)])
def test_ranks_several_captions_per_image(n_img, per, d, device):
    g = torch.Generator().manual_seed(n_img)
    n_txt = n_img * per - (1 if n_img > 1 else 0)  # ragged: one image has a caption fewer
    txt_image = torch.arange(n_txt) % n_img
    txt_image = txt_image[torch.randperm(n_txt, generator=g)]  # captions not grouped
    img = int_embeddings(n_img, d, 3, torch.float32, device)
    txt = int_embeddings(n_txt, d, 4, torch.float32, device)
    want_i2t, want_t2i = brute_ranks(img, txt, txt_image.numpy())
    got = retrieval_ranks(img, txt, txt_image.to(device))
    np.testing.assert_array_equal(got.i2t.cpu().numpy(), want_i2t)
    np.testing.assert_array_equal(got.t2i.cpu().numpy(), want_t2i)


@pytest.mark.parametrize("device", DEVICES)
def test_ranks_with_a_strided_caption_table(device):
    # txt_image taken as a column of a [Nt, 2] table (stride 2), already sorted so no
    # reordering copy is made: it must reach the kernels contiguous.
    n_img, per, d = 40, 3, 8
    table = torch.stack([torch.arange(n_img * per) // per, torch.zeros(n_img * per, dtype=torch.int64)], 1)
    txt_image = table.to(device)[:, 0]
    assert txt_image.stride() == (2,)
    img = int_embeddings(n_img, d, 7, torch.float32, device)
    txt = int_embeddings(n_img * per, d, 8, torch.float32, device)
    want_i2t, want_t2i = brute_ranks(img, txt, table[:, 0].numpy())
    got = retrieval_ranks(img, txt, txt_image)
    np.testing.assert_array_equal(got.i2t.cpu().numpy(), want_i2t)
    np.testing.assert_array_equal(got.t2i.cpu().numpy(), want_t2i)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_collapsed_model_gets_worst_rank(dtype, device):
    # All scores equal: every query must rank N-1 (ties against the model), never 0. The
    # value 0.1 is not exact in binary, so a positive computed by a different summation
    # order than its row could round differently and break the tie. Under the interpreter
    # tl.dot is numpy's matmul, whose BLAS may round one dot product differently by its
    # position in the output tile (OpenBLAS's Haswell kernel on an AMD EPYC: 448 of 1,024
    # entries of a 32×32 tile of identical rows differ in the last bit), which no kernel can
    # control: there a value whose products and sums are exact checks the tie rule alone.
    n, d = 300, 48
    value = 0.125 if kernels._common.INTERPRET and device == "cpu" else 0.1
    img = torch.full((n, d), value, dtype=dtype, device=device)
    txt = torch.full((n, d), value, dtype=dtype, device=device)
    got = retrieval_ranks(img, txt)
    assert (got.i2t == n - 1).all() and (got.t2i == n - 1).all()
    ref = retrieval_ranks_ref(img, txt)
    assert (ref.i2t == n - 1).all() and (ref.t2i == n - 1).all()
    # With several captions per image an image ranks Nt - #own captions.
    txt_image = torch.arange(2 * n, device=device) // 2
    txt2 = torch.full((2 * n, d), value, dtype=dtype, device=device)
    got = retrieval_ranks(img, txt2, txt_image)
    assert (got.i2t == 2 * n - 2).all() and (got.t2i == n - 1).all()


@pytest.mark.parametrize("n,d,seed", [(5, 64, 1), (7, 33, 3), (33, 100, 5), (300, 48, 0)])
def test_copies_of_one_random_vector_all_rank_last_in_the_reference(n, d, seed):
    # a CPU fp32 matmul rounded the same dot product by its place in the output: 5 copies of
    # one random vector ranked 4, 4, 4, 4, 0 (a collapsed model could score R@1 > 0); the
    # constant rows of the test above round alike everywhere, a random direction does not
    row = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    emb = row.expand(n, d).contiguous()
    for chunk in (1, 2, 3, 5, n):  # the ranks once depended on the chunk size too
        got = retrieval_ranks_ref(emb, emb, chunk=chunk)
        assert (got.i2t == n - 1).all() and (got.t2i == n - 1).all(), chunk


@pytest.mark.parametrize("device", DEVICES)
def test_nan_scores_count_against_the_model(device):
    img = int_embeddings(9, 4, 5, torch.float32, device)
    txt = int_embeddings(9, 4, 6, torch.float32, device)
    img[2, 0] = float("nan")  # row 2 of s is NaN: image 2 ranks worst, and beats everyone
    got = retrieval_ranks(img, txt)
    assert int(got.i2t[2]) == 8
    assert int(got.t2i[2]) == 8  # text 2's positive s[2, 2] is NaN
    ref = retrieval_ranks_ref(img, txt)
    assert torch.equal(got.i2t.cpu(), ref.i2t.cpu()) and torch.equal(got.t2i.cpu(), ref.t2i.cpu())
    s = img.double().cpu() @ txt.double().cpu().T
    for c in [0, 5]:  # the NaN score of image 2 counts against every other text
        # (the own score counts itself once in ">=" and the NaN competitor never does)
        assert int(got.t2i[c]) == int((s[:, c] >= s[c, c]).sum()) - 1 + 1


@pytest.mark.parametrize("device", DEVICES)
def test_topk_indices_are_the_k_best_scores(device):
    # Random continuous embeddings: distinct scores, so the top-k set is unique.
    g = torch.Generator().manual_seed(7)
    img = torch.randn(45, 20, generator=g).to(device)
    txt = torch.randn(90, 20, generator=g).to(device)
    txt_image = (torch.arange(90) // 2).to(device)
    got = retrieval_ranks(img, txt, txt_image, topk=6)
    s = img.double() @ txt.double().T
    assert got.i2t_topk.shape == (45, 6) and got.t2i_topk.shape == (90, 6)
    assert got.i2t_topk.dtype == torch.int64
    want_i2t = s.topk(6, dim=1).indices
    want_t2i = s.T.topk(6, dim=1).indices
    assert torch.equal(got.i2t_topk.sort(1).values, want_i2t.sort(1).values)
    assert torch.equal(got.t2i_topk.sort(1).values, want_t2i.sort(1).values)


@pytest.mark.parametrize("device", DEVICES)
def test_a_callers_autocast_does_not_reach_the_scores(device):
    # Continuous scores whose order bf16 would change: under a caller's bf16 autocast the
    # fp32 matmuls of the reference (and of the top-k on every backend) ran in bf16 and
    # reordered hundreds of near ties. Ranks and top-k must be the fp32 ones, bit for bit.
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(300, 64, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + 0.9 * torch.randn(300, 64, generator=g), dim=1)
    img, txt = img.to(device), txt.to(device)
    want = [retrieval_ranks(img, txt, topk=5), retrieval_ranks_ref(img, txt, topk=5)]
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        got = [retrieval_ranks(img, txt, topk=5), retrieval_ranks_ref(img, txt, topk=5)]
    for w, r in zip(want, got, strict=True):
        for name, a, b in zip(Ranks._fields, w, r, strict=True):
            assert torch.equal(a, b), name


def test_meta_tensors_give_shapes_without_data():
    # the autocast guard must not refuse a device type that has no autocast
    img, txt = torch.empty(5, 8, device="meta"), torch.empty(5, 8, device="meta")
    for fn in (retrieval_ranks, retrieval_ranks_ref):
        r = fn(img, txt, topk=2)
        assert r.i2t.shape == (5,) and r.i2t.device.type == "meta" and r.t2i_topk.shape == (5, 2)


def test_reference_chunking_does_not_change_ranks():
    img = int_embeddings(101, 9, 8, torch.float32, "cpu")
    txt = int_embeddings(101, 9, 9, torch.float32, "cpu")
    full = retrieval_ranks_ref(img, txt, topk=3)
    for chunk in (1, 7, 100):
        part = retrieval_ranks_ref(img, txt, topk=3, chunk=chunk)
        assert torch.equal(part.i2t, full.i2t) and torch.equal(part.t2i, full.t2i)


def test_non_contiguous_inputs():
    img = int_embeddings(40, 24, 10, torch.float32, "cpu")[:, ::2]  # stride 2 along D
    txt = int_embeddings(24, 40, 11, torch.float32, "cpu").T[:, :12]  # transposed view
    want_i2t, want_t2i = brute_ranks(img, txt, np.arange(40))
    got = retrieval_ranks(img, txt)
    np.testing.assert_array_equal(got.i2t.numpy(), want_i2t)
    np.testing.assert_array_equal(got.t2i.numpy(), want_t2i)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(img=torch.zeros(4), txt=torch.zeros(4, 3)), "img must be 2-d"),
        (dict(img=torch.zeros(4, 3), txt=torch.zeros(4, 5)), "same D"),
        (dict(img=torch.zeros(4, 3), txt=torch.zeros(5, 3)), "same N"),
        (dict(img=torch.zeros(4, 3, dtype=torch.float64), txt=torch.zeros(4, 3)), "img must be float32"),
        (dict(img=torch.zeros(4, 3), txt=torch.zeros(4, 3, dtype=torch.int32)), "txt must be float32"),
        (dict(img=torch.zeros(3, 2), txt=torch.zeros(4, 2), txt_image=torch.tensor([0, 1, 1, 0])), "image 2"),
        (dict(img=torch.zeros(3, 2), txt=torch.zeros(3, 2), txt_image=torch.tensor([0, 1, 3])), r"\[0, Ni\)"),
        (dict(img=torch.zeros(3, 2), txt=torch.zeros(3, 2), txt_image=torch.tensor([0, 1])), "shape"),
        (dict(img=torch.zeros(3, 2), txt=torch.zeros(3, 2), txt_image=torch.tensor([0.0, 1, 2])), "int64 or int32 .*got torch.float32"),
        (dict(img=torch.zeros(3, 2), txt=torch.zeros(3, 2), txt_image=[0, 1, 2]), "int64 or int32 .*got list"),
        (dict(img=torch.zeros(3, 2), txt=torch.zeros(3, 2), topk=4), "topk"),
        (dict(img=torch.zeros(3, 2), txt=torch.zeros(3, 2), topk=-1), "topk"),
        (dict(img=torch.zeros(3, 2), txt=torch.zeros(3, 2), backend="cuda"), "backend"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        retrieval_ranks(**kwargs)


@pytest.mark.skipif(kernels._common.INTERPRET, reason="under the interpreter CPU runs Triton")
def test_triton_backend_on_cpu_needs_the_interpreter():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        retrieval_ranks(torch.zeros(3, 2), torch.zeros(3, 2), backend="triton")


@pytest.mark.parametrize("device", DEVICES)
def test_topk_in_score_order_with_unsorted_captions(device):
    # Distinct continuous scores; captions not grouped by image, so the kernel path sorts the
    # texts and must map the top-k back: rows in the caller's text order, indices into the
    # caller's texts, best score first (only the order among equal scores is unspecified).
    g = torch.Generator().manual_seed(17)
    img = torch.randn(30, 12, generator=g).to(device)
    txt = torch.randn(75, 12, generator=g).to(device)
    txt_image = (torch.arange(75) % 30)[torch.randperm(75, generator=g)].to(device)
    got = retrieval_ranks(img, txt, txt_image, topk=5)
    s = img.double() @ txt.double().T
    assert torch.equal(got.i2t_topk, s.topk(5, dim=1).indices)
    assert torch.equal(got.t2i_topk, s.T.topk(5, dim=1).indices)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16)])
def test_mixed_input_dtypes(dtypes, device):
    # img and txt may come in different float dtypes (only D must agree).
    img = int_embeddings(40, 8, 12, dtypes[0], device)
    txt = int_embeddings(40, 8, 13, dtypes[1], device)
    want_i2t, want_t2i = brute_ranks(img, txt, np.arange(40))
    got = retrieval_ranks(img, txt)
    np.testing.assert_array_equal(got.i2t.cpu().numpy(), want_i2t)
    np.testing.assert_array_equal(got.t2i.cpu().numpy(), want_t2i)


@pytest.mark.parametrize("device", DEVICES)
def test_a_nan_caption_among_several_gives_its_image_the_worst_rank(device):
    # Image 3 has two captions; one of them (text 3) scores NaN with every image. A NaN own
    # score makes the positive NaN: image 3 ranks worst (Nt − 2), as the reference says,
    # even though its other caption scores finitely.
    img = int_embeddings(10, 4, 14, torch.float32, device)
    txt = int_embeddings(11, 4, 15, torch.float32, device)
    txt[3, 1] = float("nan")
    txt_image = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3], device=device)
    got = retrieval_ranks(img, txt, txt_image)
    assert int(got.i2t[3]) == 11 - 2
    ref = retrieval_ranks_ref(img, txt, txt_image)
    assert torch.equal(got.i2t.cpu(), ref.i2t.cpu()) and torch.equal(got.t2i.cpu(), ref.t2i.cpu())


def test_topk_up_to_min_n_and_negative_caption_images():
    r = retrieval_ranks(torch.eye(3), torch.eye(3), topk=3)  # topk = min(Ni, Nt) is allowed
    assert r.i2t_topk.shape == (3, 3) and torch.equal(r.i2t_topk[:, 0], torch.arange(3))
    with pytest.raises(ValueError, match=r"\[0, Ni\)"):
        retrieval_ranks(torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor([0, -1, 2]))
