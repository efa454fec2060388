"""``python -m eclip.prepare``: round trips per format, bad input, reuse, interrupted builds."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eclip import prepare
from eclip.data.cache import load_cache, read_manifest
from eclip.errors import EclipError
from eclip.tokenizer import decode, load_tokenizer

JAPANESE = "富士山と大波、葛飾北斎の浮世絵"


def write_image(path, w, h, seed, fmt=None):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def run(argv, capsys):
    rc = prepare.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture
def odvg(tmp_path):
    """Six images (PNG and JPEG, various sizes) in three ODVG split files."""
    images = tmp_path / "images"
    images.mkdir()
    rows = {"train": [], "val": [], "test": []}
    sizes = [(40, 30), (32, 32), (50, 20), (24, 48), (64, 40), (30, 30)]
    for i, (w, h) in enumerate(sizes):
        name = f"print_{i}.{'png' if i % 2 else 'jpg'}"
        write_image(images / name, w, h, seed=i)
        caption = JAPANESE if i == 0 else f"a woodblock print number {i} with a bridge"
        regions = [{"bbox": [2, 3, w / 2, h / 2], "phrase": "a bridge" if i else "大波"}] if i != 5 else []
        split = "train" if i < 4 else "val" if i == 4 else "test"
        rows[split].append({"filename": name, "height": h, "width": w,
                            "grounding": {"caption": caption, "regions": regions}})
    files = {}
    for split, rs in rows.items():
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs), encoding="utf-8")
    return {"images": images, "sizes": sizes, **files}


def odvg_args(fx, out, *extra):
    return ["--format", "odvg", "--images", fx["images"], "--train", fx["train"], "--val", fx["val"],
            "--test", fx["test"], "--out", out, "--image-size", 16, "--workers", 1, "--vocab-size", 300, *extra]


def test_odvg_round_trip(odvg, tmp_path, capsys):
    out = tmp_path / "cache"
    rc, stdout, _ = run(odvg_args(odvg, out), capsys)
    assert rc == 0, stdout
    assert "status:             built" in stdout
    c = load_cache(out)
    assert c.images.shape == (6, 3, 16, 16) and c.images.dtype == torch.uint8
    assert c.split.tolist() == [0, 0, 0, 0, 1, 2]
    assert c.fold[5] == -1 and set(c.fold[:5].tolist()) <= {0, 1, 2}
    # pixels: the squash resize of the original file
    src = Image.open(odvg["images"] / "print_1.png").convert("RGB").resize((16, 16), Image.Resampling.BICUBIC)
    assert np.array_equal(c.images[1].permute(1, 2, 0).numpy(), np.asarray(src))
    # captions decode back exactly, Japanese included
    tok = load_tokenizer(c.tokenizer_path)
    assert decode(tok, c.tokens[0, : c.lengths[0]].tolist()) == JAPANESE
    assert c.caption_image.tolist() == list(range(6))
    # regions: normalised boxes, phrases, image rows
    assert c.region_image.tolist() == [0, 1, 2, 3, 4]
    w, h = odvg["sizes"][2]
    assert c.region_boxes[2].tolist() == pytest.approx([2 / w, 3 / h, 0.5, 0.5])
    assert decode(tok, c.region_tokens[0, : c.region_lengths[0]].tolist()) == "大波"
    m = read_manifest(out)
    assert m["counts"]["images"] == 6 and m["counts"]["captions"] == 6 and m["counts"]["regions"] == 5
    assert {s["kind"] for s in m["sources"]} == {"odvg:train", "odvg:val", "odvg:test", "images"}
    assert all(len(s.get("sha256", s.get("stat_sha256"))) == 64 for s in m["sources"])


def test_center_crop_moves_and_drops_boxes(tmp_path, capsys):
    images = tmp_path / "im"
    images.mkdir()
    write_image(images / "wide.png", 100, 50, 0)
    rows = [{"filename": "wide.png", "grounding": {"caption": "wide", "regions": [
        {"bbox": [25, 0, 75, 50], "phrase": "middle"}, {"bbox": [0, 0, 10, 10], "phrase": "left edge"}]}}]
    (tmp_path / "t.jsonl").write_text(json.dumps(rows[0]) + "\n")
    out = tmp_path / "c"
    rc, _, err = run(["--format", "odvg", "--images", images, "--train", tmp_path / "t.jsonl", "--val",
                      tmp_path / "t.jsonl", "--out", out, "--image-size", 8, "--workers", 1,
                      "--resize", "center-crop", "--vocab-size", 300, "--folds", 2], capsys)
    assert rc == 2 and "duplicate id 'wide.png'" in err  # same file as train and val
    (tmp_path / "v.jsonl").write_text(json.dumps(dict(rows[0], filename="wide.png")).replace("wide.png", "w2.png") + "\n")
    write_image(images / "w2.png", 100, 50, 1)
    rc, _, err = run(["--format", "odvg", "--images", images, "--train", tmp_path / "t.jsonl", "--val",
                      tmp_path / "v.jsonl", "--out", out, "--image-size", 8, "--workers", 1,
                      "--resize", "center-crop", "--vocab-size", 300], capsys)
    assert rc == 2 and "--folds 3: only 2 train+val images to split" in err
    rc, _, err = run(["--format", "odvg", "--images", images, "--train", tmp_path / "t.jsonl", "--val",
                      tmp_path / "v.jsonl", "--out", out, "--image-size", 8, "--workers", 1,
                      "--resize", "center-crop", "--vocab-size", 300, "--folds", 2], capsys)
    assert rc == 0, err
    c = load_cache(out)
    # the 50x50 centre window starts at x=25: the middle box fills it, the edge box is gone
    assert c.region_boxes.tolist() == [[0.0, 0.0, 1.0, 1.0]] * 2
    assert read_manifest(out)["counts"]["regions_cropped_away"] == 2


@pytest.mark.parametrize("ext,delim", [("csv", ","), ("tsv", "\t"), ("jsonl", None)])
def test_manifest_groups_captions_and_splits_by_image(tmp_path, capsys, ext, delim):
    images = tmp_path / "imgs"
    images.mkdir()
    rows = []
    for i in range(12):
        write_image(images / f"{i}.png", 20, 20, i)
        for k in range(1 + i % 3):  # 1-3 captions per image, COCO style
            rows.append({"filepath": f"{i}.png", "title": f"picture {i} caption {k}" if i else JAPANESE + str(k)})
    path = tmp_path / f"m.{ext}"
    if delim is None:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text("filepath" + delim + "title\n" + "".join(
            f"{r['filepath']}{delim}{r['title']}\n" for r in rows), encoding="utf-8")
    out = tmp_path / "c"
    rc, _, err = run(["--format", "manifest", "--images", images, "--manifest", path, "--out", out,
                      "--image-size", 8, "--workers", 1, "--vocab-size", 300, "--val-frac", "0.25",
                      "--test-frac", "0.25"], capsys)
    assert rc == 0, err
    assert "image column 'filepath', caption column 'title'" in err
    c = load_cache(out)
    assert c.images.shape[0] == 12 and c.tokens.shape[0] == len(rows)
    tok = load_tokenizer(c.tokenizer_path)
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    for cap_row, img_row in enumerate(c.caption_image.tolist()):  # every caption with its image
        text = decode(tok, c.tokens[cap_row, : c.lengths[cap_row]].tolist())
        assert text in recs[img_row]["captions"]
    assert sorted(len(r["captions"]) for r in recs) == sorted(1 + i % 3 for i in range(12))
    assert set(c.split.tolist()) <= {0, 1, 2} and (c.split == 0).any()


def test_manifest_column_options_and_errors(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    write_image(images / "a.png", 10, 10, 0)
    path = tmp_path / "m.csv"
    path.write_text("picture,words\na.png,hello\n")
    base = ["--format", "manifest", "--images", images, "--manifest", path, "--out", tmp_path / "c",
            "--workers", 1, "--vocab-size", 300, "--val-frac", "0", "--test-frac", "0", "--folds", 1]
    rc, _, err = run(base, capsys)
    assert rc == 2 and "m.csv:2: no image column found among picture, words" in err
    rc, _, err = run(base + ["--image-column", "picture", "--caption-column", "words"], capsys)
    assert rc == 0, err
    rc, _, err = run(base + ["--image-column", "nope"], capsys)
    assert rc == 2 and "no image column 'nope'" in err
    path.write_bytes("picture,words\na.png,hello\na.png,caf\u00e9 au lait\n".encode("latin-1"))  # not UTF-8
    rc, _, err = run(base + ["--image-column", "picture", "--caption-column", "words"], capsys)
    assert rc == 2 and "m.csv:3: not UTF-8 text (byte 0xe9 at column 10)" in err, err
    assert err.strip().count("\n") == 0


def _corrupt(fx, case):
    """Apply one kind of damage to the ODVG fixture; return the expected message."""
    lines = fx["train"].read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[1])
    if case == "missing image":
        (fx["images"] / row["filename"]).unlink()
        return f"train.jsonl:2: image not found: {fx['images'] / row['filename']}"
    if case == "truncated image":
        p = fx["images"] / row["filename"]
        p.write_bytes(p.read_bytes()[:60])
        return "train.jsonl:2: unreadable or truncated image"
    if case == "unreadable image":
        (fx["images"] / row["filename"]).write_bytes(b"this is not an image at all")
        return "train.jsonl:2: unreadable or truncated image"
    if case == "empty caption":
        row["grounding"]["caption"] = "   "
        msg = "train.jsonl:2: empty caption"
    elif case == "malformed json":
        lines[1] = lines[1][:-5]
        fx["train"].write_text("\n".join(lines) + "\n", encoding="utf-8")
        return "train.jsonl:2: malformed JSON"
    elif case == "box outside":
        row["grounding"]["regions"] = [{"bbox": [0, 0, 500, 10], "phrase": "x"}]
        msg = "train.jsonl:2: region 0: bbox [0, 0, 500, 10] lies outside the 32x32 image"
    elif case == "x2<x1":
        row["grounding"]["regions"] = [{"bbox": [20, 0, 10, 10], "phrase": "x"}]
        msg = "train.jsonl:2: region 0: bbox [20, 0, 10, 10] has x2<=x1 or y2<=y1"
    elif case == "duplicate id":
        row["filename"] = json.loads(lines[0])["filename"]
        msg = "train.jsonl:2: duplicate id 'print_0.jpg' (first at"
    lines[1] = json.dumps(row, ensure_ascii=False)
    fx["train"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return msg


BAD_CASES = ["missing image", "truncated image", "unreadable image", "empty caption",
             "malformed json", "box outside", "x2<x1", "duplicate id"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_stops_with_one_line_and_writes_nothing(odvg, tmp_path, capsys, case):
    expected = _corrupt(odvg, case)
    out = tmp_path / "cache"
    rc, stdout, err = run(odvg_args(odvg, out), capsys)
    assert rc == 2
    assert err.strip().count("\n") == 0, err  # exactly one line
    assert err.startswith("prepare: error: ") and expected in err, err
    assert not out.exists() and not leftovers(tmp_path, "cache")


@pytest.mark.parametrize("case", BAD_CASES)
def test_skip_bad_skips_and_lists_reasons(odvg, tmp_path, capsys, case):
    expected = _corrupt(odvg, case)
    out = tmp_path / "cache"
    rc, stdout, err = run(odvg_args(odvg, out, "--skip-bad"), capsys)
    assert rc == 0, err
    assert "skipped 1 bad rows/images" in err and "skipped:            1" in stdout
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(skipped) == 1
    assert expected in f"{skipped[0]['where']}: {skipped[0]['problem']}"
    c = load_cache(out)
    assert c.images.shape[0] == 5
    assert c.images.shape[0] == len(c.split) == c.tokens.shape[0]


def test_unknown_format_and_missing_arguments(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    bad = tmp_path / "m.xml"
    bad.write_text("<x/>")
    rc, _, err = run(["--format", "manifest", "--images", images, "--manifest", bad, "--out", tmp_path / "c"], capsys)
    assert rc == 2 and "m.xml: unknown manifest format '.xml'" in err
    rc, _, err = run(["--format", "odvg", "--images", images, "--out", tmp_path / "c"], capsys)
    assert rc == 2 and "--format odvg needs --train and --val" in err
    rc, _, err = run(["--format", "manifest", "--manifest", bad, "--out", tmp_path / "c"], capsys)
    assert rc == 2 and "--format manifest needs --images, the folder the image paths are relative to" in err, err
    with pytest.raises(SystemExit) as e:
        prepare.main(["--format", "parquet", "--out", str(tmp_path / "c")])
    assert e.value.code == 2
    assert "invalid choice: 'parquet'" in capsys.readouterr().err
    rc, _, err = run(["--out", tmp_path / "c"], capsys)
    assert rc == 2 and "give exactly one of --dataset synthetic or --format" in err
    assert not (tmp_path / "c").exists()


def test_reuse_and_rebuild(odvg, tmp_path, capsys):
    out = tmp_path / "cache"
    assert run(odvg_args(odvg, out), capsys)[0] == 0
    first = load_cache(out).images.clone()
    rc, stdout, err = run(odvg_args(odvg, out), capsys)
    assert rc == 0 and "status:             reused" in stdout and "reusing cache" in err
    rc, stdout, _ = run(odvg_args(odvg, out, "--image-size", 8), capsys)  # an option changed
    assert rc == 0 and "status:             built" in stdout and load_cache(out).images.shape[-1] == 8
    text = odvg["val"].read_text(encoding="utf-8").replace("number 4", "number four")
    odvg["val"].write_text(text, encoding="utf-8")  # an annotation changed
    rc, stdout, _ = run(odvg_args(odvg, out), capsys)
    assert rc == 0 and "status:             built" in stdout
    assert torch.equal(load_cache(out).images, first)
    write_image(odvg["images"] / "print_1.png", 32, 32, seed=99)  # an image replaced
    rc, stdout, _ = run(odvg_args(odvg, out), capsys)
    assert rc == 0 and "status:             built" in stdout
    assert not leftovers(tmp_path, "cache")


def test_interrupted_build_leaves_nothing_valid_looking(odvg, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cache"
    assert run(odvg_args(odvg, out), capsys)[0] == 0
    before = read_manifest(out)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare.cache_mod.CacheWriter, "commit", boom)  # dies mid-write
    rc, _, err = run(odvg_args(odvg, out, "--image-size", 8), capsys)
    assert rc == 130 and "nothing was written" in err
    assert read_manifest(out) == before  # the old cache is untouched and still valid
    assert load_cache(out).images.shape[-1] == 16
    assert not leftovers(tmp_path, "cache")
    fresh = tmp_path / "fresh"
    rc, _, _ = run(odvg_args(odvg, fresh), capsys)
    assert rc == 130 and not fresh.exists() and not leftovers(tmp_path, "fresh")


def test_load_cache_errors(tmp_path, odvg, capsys):
    with pytest.raises(EclipError, match="no such cache directory"):
        load_cache(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EclipError, match="not a prepared cache, manifest.json missing"):
        load_cache(tmp_path / "empty")
    out = tmp_path / "cache"
    assert run(odvg_args(odvg, out), capsys)[0] == 0
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(m, format_version=0)))
    with pytest.raises(EclipError, match="cache format version 0, this code reads version 1"):
        load_cache(out)
    (out / "manifest.json").write_text(json.dumps(m))
    (out / "images.safetensors").unlink()
    with pytest.raises(EclipError, match="images.safetensors: missing from the cache"):
        load_cache(out)


def test_synthetic_small_in_parallel_is_deterministic(tmp_path, capsys):
    args = ["--dataset", "synthetic", "--num-train", 100, "--num-val", 20, "--num-test", 20]
    rc, stdout, err = run(args + ["--out", tmp_path / "a", "--workers", 2], capsys)
    assert rc == 0, err
    rc, _, err = run(args + ["--out", tmp_path / "b", "--workers", 1], capsys)
    assert rc == 0, err
    a, b = load_cache(tmp_path / "a"), load_cache(tmp_path / "b")
    assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
    assert a.images.shape == (140, 3, 64, 64)
    assert a.split_images("val").tolist() == list(range(100, 120))
    assert (a.region_boxes >= 0).all() and (a.region_boxes <= 1).all()
    assert a.region_tokens.shape[1] == 16 and a.tokens.shape[1] == 48
    assert "truncated_captions: 0" in stdout


def test_refuses_to_replace_a_folder_that_is_not_a_cache(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    rc, _, err = run(["--dataset", "synthetic", "--num-train", 10, "--num-val", 10, "--num-test", 10,
                      "--out", out, "--workers", 1], capsys)
    assert rc == 2 and "exists and is not a cache; refusing to replace it" in err
    assert (out / "notes.txt").read_text() == "precious"


def test_manifest_with_bom_and_a_split_on_a_later_row(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(4):
        write_image(images / f"{i}.png", 10, 10, i)
    path = tmp_path / "m.csv"
    path.write_bytes("\ufeffimage,caption,split\n0.png,first,\n0.png,second,test\n1.png,a,train\n"
                     "2.png,b,train\n3.png,c,val\n".encode("utf-8"))
    rc, _, err = run(["--format", "manifest", "--images", images, "--manifest", path, "--out", tmp_path / "c",
                      "--workers", 1, "--vocab-size", 300, "--folds", 1], capsys)
    assert rc == 0, err
    recs = [json.loads(x) for x in (tmp_path / "c" / "records.jsonl").read_text().splitlines()]
    assert recs[0]["image"] == "0.png" and recs[0]["split"] == "test" and recs[0]["captions"] == ["first", "second"]


def test_manifest_option_and_caption_type_messages(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    write_image(images / "a.png", 10, 10, 0)
    base = ["--format", "manifest", "--images", images, "--out", tmp_path / "c", "--workers", 1,
            "--vocab-size", 300, "--val-frac", "0", "--test-frac", "0", "--folds", 1]
    rc, _, err = run(base, capsys)  # --manifest forgotten
    assert rc == 2 and "--format manifest needs --manifest FILE" in err, err
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a.png", "caption": "a red square"}\n{"image": "a.png", "caption": 5}\n')
    rc, _, err = run(base + ["--manifest", path], capsys)
    assert rc == 2 and "m.jsonl:2: caption is int 5, not text" in err, err


def test_the_tokenizer_learns_from_training_captions_only(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    lines = ["image,caption,split"]
    for i, split in enumerate(["train"] * 4 + ["val", "test"]):
        write_image(images / f"{i}.png", 8, 8, i)
        lines.append(f"{i}.png,{'a red circle' if split == 'train' else 'zebraquokkaxylophone'},{split}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    rc, _, err = run(["--format", "manifest", "--images", images, "--manifest", tmp_path / "m.csv",
                      "--out", tmp_path / "c", "--image-size", 8, "--workers", 1, "--vocab-size", 300,
                      "--folds", 2], capsys)
    assert rc == 0, err
    tok = load_tokenizer(load_cache(tmp_path / "c").tokenizer_path)
    assert len(tok.encode("zebraquokkaxylophone").ids) > 10  # a word of val/test captions only: never merged


def test_manifest_without_a_split_column_deals_the_fractions_asked_for(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(80):
        write_image(images / f"{i}.png", 4, 4, i)
    (tmp_path / "m.csv").write_text("image,caption\n" + "".join(f"{i}.png,picture {i}\n" for i in range(80)))
    rc, _, err = run(["--format", "manifest", "--images", images, "--manifest", tmp_path / "m.csv",
                      "--out", tmp_path / "c", "--image-size", 4, "--workers", 1, "--vocab-size", 300,
                      "--val-frac", "0.1", "--test-frac", "0.4"], capsys)
    assert rc == 0, err
    split = load_cache(tmp_path / "c").split
    n_val, n_test = int((split == 1).sum()), int((split == 2).sum())
    assert 2 <= n_val <= 16 and 20 <= n_test <= 44, (n_val, n_test)  # about 8 and 32 of 80


def test_an_odvg_file_may_start_with_a_byte_order_mark(odvg, tmp_path, capsys):
    # as a manifest may: an editor's BOM is no part of line 1's JSON
    odvg["train"].write_bytes("\ufeff".encode() + odvg["train"].read_bytes())
    out = tmp_path / "cache"
    rc, stdout, err = run(odvg_args(odvg, out), capsys)
    assert rc == 0, err
    assert load_cache(out).split.tolist() == [0, 0, 0, 0, 1, 2]
    assert json.loads((out / "records.jsonl").read_text(encoding="utf-8").splitlines()[0])["image"] == "print_0.jpg"
