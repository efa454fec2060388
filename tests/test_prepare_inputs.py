"""``python -m eclip.prepare`` on awkward inputs: JSONL rows with differing keys, boxes found
bad at decoding, deep images, --out directories that are not ours, damaged caches, option limits."""

import csv
import json
import os
import stat

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file
from test_prepare import run, write_image

from eclip import prepare
from eclip.data import synthetic
from eclip.data.cache import load_cache, read_manifest
from eclip.errors import EclipError


def manifest_args(images, path, out, *extra):
    """Every image in train, one fold: the split and folds are the source's, not a draw."""
    return ["--format", "manifest", "--images", images, "--manifest", path, "--out", out, "--image-size", 8,
            "--workers", 1, "--vocab-size", 300, "--val-frac", 0, "--test-frac", 0, "--folds", 1, *extra]


def records(out):
    return [json.loads(x) for x in (out / "records.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def images(tmp_path):
    """Four 20x20 RGB images 0.png .. 3.png."""
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        write_image(d / f"{i}.png", 20, 20, i)
    return d


def test_jsonl_columns_may_first_appear_on_a_later_row(images, tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    rows = [{"image": "0.png", "caption": "first"},  # no split, no regions
            {"image": "1.png", "caption": "held out", "split": "test",
             "regions": [{"bbox": [0, 0, 5, 5], "phrase": "a corner"}]},
            {"image": "2.png", "caption": "third"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for extra in ([], ["--regions-column", "regions"]):
        out = tmp_path / f"c{len(extra)}"
        rc, _, err = run(manifest_args(images, path, out, *extra), capsys)
        assert rc == 0, err
        assert "regions column 'regions', split column 'split'" in err
        recs = records(out)
        assert [r["split"] for r in recs] == ["train", "test", "train"]  # not trained on
        assert recs[1]["phrases"] == ["a corner"] and read_manifest(out)["counts"]["regions"] == 1
    rows.append({"image": "3.png", "text": "no caption key"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 2 and "m.jsonl:4: missing field 'caption'" in err, err
    assert err.strip().count("\n") == 0


def test_a_missing_column_is_reported_even_with_skip_bad(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    rc, _, err = run(manifest_args(images, path, tmp_path / "c", "--skip-bad", "--image-column", "nope"), capsys)
    assert rc == 2 and "m.csv:2: no image column 'nope' (columns: image, caption)" in err, err
    assert not (tmp_path / "c").exists()


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["image", "caption", "regions"], *rows])


def test_a_bad_box_is_reported_at_the_row_that_gave_it(images, tmp_path, capsys):
    good = {"bbox": [1, 1, 9, 9], "phrase": "a dot"}
    bad = {"bbox": [0, 0, 500, 10], "phrase": "too wide"}
    path = tmp_path / "m.csv"
    write_csv(path, [["0.png", "plain", ""], ["1.png", "other", ""],
                     ["0.png", "boxed", json.dumps([good, bad])],  # line 4, its region 1
                     ["0.png", "fine", json.dumps([{"bbox": [2, 2, 6, 6], "phrase": "a spot"}])]])
    out = tmp_path / "c"
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 2 and "m.csv:4: region 1: bbox [0, 0, 500, 10] lies outside the 20x20 image" in err, err
    assert not out.exists()
    rc, _, err = run(manifest_args(images, path, out, "--skip-bad"), capsys)
    assert rc == 0, err
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["where"] for s in skipped] == [f"{path}:4"]
    # only line 4 goes: the image keeps the captions and regions of its other rows
    recs = records(out)
    assert recs[0]["image"] == "0.png" and recs[0]["captions"] == ["plain", "fine"]
    assert recs[0]["phrases"] == ["a spot"] and len(recs) == 2
    c = load_cache(out)
    assert c.caption_image.tolist() == [0, 0, 1] and c.region_boxes.tolist() == [pytest.approx([0.1, 0.1, 0.3, 0.3])]


def deep_image(path, mode):
    """A left-to-right ramp over the mode's typical values, stored as ``mode``."""
    ramp = np.tile(np.linspace(0, 1, 64), (32, 1))
    if mode == "I;16":
        Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(path)
    elif mode == "I;16B":  # big-endian, as TIFF scanners write it (convert() would clip it)
        Image.frombytes(mode, (64, 32), np.round(ramp * 65535).astype(">u2").tobytes()).save(path)
    elif mode == "I":
        Image.fromarray(np.round(100 + ramp * 40000).astype(np.int32)).save(path)
    else:  # float data in physical units, Hounsfield-like
        Image.fromarray((-1000 + ramp * 4000).astype(np.float32)).save(path)


def test_deep_images_are_scaled_to_8_bits_not_clipped(tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    modes = {"I;16": "a.png", "I;16B": "b.tiff", "I": "c.tiff", "F": "d.tiff"}
    for mode, name in modes.items():
        deep_image(d / name, mode)
        assert Image.open(d / name).mode == mode
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n" + "".join(f"{n},a ramp\n" for n in modes.values()))
    out = tmp_path / "c"
    rc, _, err = run(manifest_args(d, path, out), capsys)
    assert rc == 0, err
    for mode, img in zip(modes, load_cache(out).images.float(), strict=True):
        row = img[0, 4]  # one row of the 8 px ramp
        assert bool((img == img[0]).all()), mode  # grey: all channels alike
        assert row[0] < 20 and row[-1] > 235 and abs(float(img.mean()) - 127.5) < 15, (mode, row.tolist())
        assert bool((row[1:] >= row[:-1]).all()), mode


def test_out_with_a_manifest_of_another_tool_is_left_alone(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "ext"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my extension"}')
    (out / "precious.txt").write_text("precious")
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 2 and "exists and is not a cache; refusing to replace it" in err, err
    assert (out / "precious.txt").read_text() == "precious" and len(list(out.iterdir())) == 2
    # a real cache with a file of the user's put in it is not replaced either
    cache = tmp_path / "cache"
    assert run(manifest_args(images, path, cache), capsys)[0] == 0
    (cache / "notes.txt").write_text("mine")
    rc, _, err = run(manifest_args(images, path, cache, "--image-size", 4), capsys)
    assert rc == 2 and "holds 'notes.txt', which is not part of the cache" in err, err
    assert (cache / "notes.txt").read_text() == "mine" and load_cache(cache).image_size == 8
    (cache / "notes.txt").unlink()
    rc, stdout, err = run(manifest_args(images, path, cache, "--image-size", 4), capsys)
    assert rc == 0 and "status:             built" in stdout and load_cache(cache).image_size == 4


def test_cache_files_are_as_readable_as_the_cache_directory(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "c"
    old = os.umask(0o022)
    try:
        rc, _, err = run(manifest_args(images, path, out), capsys)
    finally:
        os.umask(old)
    assert rc == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert "images.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_folds_beyond_what_int8_holds_are_refused(tmp_path, capsys):
    args = ["--dataset", "synthetic", "--num-train", 130, "--num-val", 10, "--num-test", 10,
            "--image-size", 8, "--workers", 1]
    rc, _, err = run(args + ["--out", tmp_path / "a", "--folds", 128], capsys)
    assert rc == 2 and "--folds 128: at most 127 (fold ids are stored as int8)" in err, err
    assert not (tmp_path / "a").exists()
    rc, _, err = run(args + ["--out", tmp_path / "b", "--folds", 127], capsys)
    assert rc == 0, err
    fold = load_cache(tmp_path / "b").fold
    assert fold[:140].min() == 0 and fold[:140].max() == 126 and (fold[140:] == -1).all()


@pytest.mark.parametrize("option", ["--num-val", "--num-test"])
def test_more_evaluation_scenes_than_exist_fail_up_front(tmp_path, capsys, monkeypatch, option):
    def drawn(*a, **k):
        raise AssertionError("scenes drawn before the option was checked")

    monkeypatch.setattr(synthetic, "sample_split", drawn)  # drawing them never ended
    rc, _, err = run(["--dataset", "synthetic", option, 17000, "--out", tmp_path / "c"], capsys)
    assert rc == 2, err
    assert f"{option} 17000: the built-in dataset has at most 15920 distinct evaluation scenes" in err
    assert not (tmp_path / "c").exists()


def test_a_region_repeated_by_a_dropped_row_stays_with_the_rows_that_remain(images, tmp_path, capsys):
    cat = {"bbox": [1, 1, 10, 10], "phrase": "a cat"}
    wide = {"bbox": [0, 0, 500, 10], "phrase": "too wide"}
    path = tmp_path / "m.jsonl"
    rows = [{"image": "0.png", "caption": "first", "regions": [wide, cat]},  # line 1 goes (its region 0)
            {"image": "0.png", "caption": "second", "regions": [cat]},  # gave "a cat" too: it stays
            {"image": "1.png", "caption": "one", "regions": [wide]},  # a bad region given by two rows:
            {"image": "1.png", "caption": "two", "regions": [cat, wide]},  # both go, each at its line
            {"image": "1.png", "caption": "three", "regions": []}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "c"
    rc, _, err = run(manifest_args(images, path, out, "--skip-bad"), capsys)
    assert rc == 0, err
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["where"], s["problem"].split(":")[0]) for s in skipped] == [
        (f"{path}:1", "region 0"), (f"{path}:3", "region 0"), (f"{path}:4", "region 1")]
    recs = records(out)
    assert [(r["captions"], r["phrases"]) for r in recs] == [(["second"], ["a cat"]), (["three"], [])]


def test_one_image_under_two_spellings_is_one_image(images, tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    rows = [{"image": "0.png", "caption": "plain"}, {"image": "./0.png", "caption": "dotted"},
            {"image": str(images / "sub" / ".." / "0.png"), "caption": "absolute"},
            {"image": "link.png", "caption": "linked"},  # as a blob store serves files
            {"image": "1.png", "caption": "other"}]
    (images / "sub").mkdir()
    (images / "link.png").symlink_to(images / "0.png")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "c"
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 0, err
    assert [r["captions"] for r in records(out)] == [["plain", "dotted", "absolute", "linked"], ["other"]]
    # so it can never land in two splits: two spellings with two splits are refused
    rows[1]["split"], rows[0]["split"] = "test", "train"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, _, err = run(manifest_args(images, path, tmp_path / "d"), capsys)
    assert rc == 2 and (f"m.jsonl:2: image './0.png' (the same file as '0.png') is in split 'train' at {path}:1, "
                        "here in 'test'") in err, err
    # ODVG: a duplicate under another name says which
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text(json.dumps({"filename": "0.png", "grounding": {"caption": "a", "regions": []}}) + "\n")
    val.write_text(json.dumps({"filename": "link.png", "grounding": {"caption": "b", "regions": []}}) + "\n")
    rc, _, err = run(["--format", "odvg", "--images", images, "--train", train, "--val", val, "--out", tmp_path / "e",
                      "--image-size", 8, "--workers", 1, "--vocab-size", 300, "--folds", 1], capsys)
    assert rc == 2 and f"val.jsonl:1: duplicate id 'link.png' (first at {train}:1, the same file as '0.png')" in err


def test_tsv_quotes_are_text_unless_they_wrap_the_field(images, tmp_path, capsys):
    path = tmp_path / "m.tsv"
    path.write_text('image\tcaption\n'
                    '0.png\t"Stop" sign on a road\n'  # a quote that opens a caption
                    '1.png\t"a ""quoted"" word"\n'  # a field a spreadsheet quoted
                    '2.png\t"an unbalanced quote\n'  # once swallowed the rows after it
                    '3.png\ta dog in the park\n'
                    '1.png\t"Stop" or "Go"\n', encoding="utf-8")  # starts and ends with a quote, still text
    out = tmp_path / "c"
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 0, err
    assert [r["captions"] for r in records(out)] == [
        ['"Stop" sign on a road'], ['a "quoted" word', '"Stop" or "Go"'], ['"an unbalanced quote'],
        ["a dog in the park"]]
    path.write_text("image\tcaption\n0.png\ta\tb\n", encoding="utf-8")
    rc, _, err = run(manifest_args(images, path, tmp_path / "d"), capsys)
    assert rc == 2 and "m.tsv:2: malformed row: expected 2 fields, found 3" in err, err


def test_an_unusable_image_path_is_a_row_problem(images, tmp_path, capsys):
    # a caption in the image column: too long a name for the file system (ENAMETOOLONG)
    path = tmp_path / "m.jsonl"
    rows = [{"image": "0.png", "caption": "fine"}, {"image": "a very long sentence " * 15, "caption": "swapped"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 2 and "m.jsonl:2: image path unusable (File name too long): 'a very long" in err, err
    assert err.strip().count("\n") == 0
    rc, _, err = run(manifest_args(images, path, tmp_path / "c", "--skip-bad"), capsys)
    assert rc == 0 and [r["captions"] for r in records(tmp_path / "c")] == [["fine"]], err


def test_the_working_directory_is_refused_as_out_before_the_build(images, tmp_path, capsys, monkeypatch):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"image": "0.png", "caption": "fine"}) + "\n")
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", ".."):
        rc, _, err = run(manifest_args(images, path, out), capsys)
        assert rc == 2 and err.strip().splitlines()[-1] == (
            f"prepare: error: {out}: is the working directory or holds it, and a build replaces --out whole; "
            f"name a folder inside it (--out {out}/cache)")
        assert err.count("error") == 1
    assert here.is_dir() and not any(here.iterdir())


# Each region value the readers refuse, at the row (and region) that gave it: a box that slips
# through would be silently dropped at decoding (NaN, zero area) or crash it (five numbers).
@pytest.mark.parametrize("region,problem", [
    ({"bbox": [0, 0, 5, 5, 5], "phrase": "x"}, "region 1: bbox must be four finite numbers [x1, y1, x2, y2], got "
                                               "[0, 0, 5, 5, 5]"),
    ({"bbox": [True, 0, 5, 5], "phrase": "x"}, "region 1: bbox must be four finite numbers"),
    ({"bbox": [0, 0, float("nan"), 5], "phrase": "x"}, "region 1: bbox must be four finite numbers"),
    ({"bbox": [0, 0, 5, float("inf")], "phrase": "x"}, "region 1: bbox must be four finite numbers"),
    ({"bbox": [5, 0, 5, 10], "phrase": "x"}, "region 1: bbox [5, 0, 5, 10] has x2<=x1 or y2<=y1"),  # no width
    ({"bbox": [0, 4, 5, 4], "phrase": "x"}, "region 1: bbox [0, 4, 5, 4] has x2<=x1 or y2<=y1"),  # no height
    ({"bbox": [0, -1, 5, 5], "phrase": "x"}, "region 1: bbox [0, -1, 5, 5] lies outside the image (negative"),
    ({"bbox": [0, 0, 5, 5], "phrase": "   "}, "region 1: empty phrase"),
], ids=["five numbers", "a bool", "nan", "infinity", "no width", "no height", "negative y", "blank phrase"])
def test_bad_region_values_are_refused_at_their_row(images, tmp_path, capsys, region, problem):
    path = tmp_path / "m.jsonl"
    good = {"bbox": [1, 1, 4, 4], "phrase": "a dot"}
    rows = [{"image": "0.png", "caption": "fine"}, {"image": "1.png", "caption": "boxed", "regions": [good, region]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 2 and f"m.jsonl:2: {problem}" in err, err
    assert not (tmp_path / "c").exists()


def test_whitespace_around_names_captions_and_phrases_is_trimmed(images, tmp_path, capsys):
    # spreadsheet exports pad cells: " 0.png " names the file 0.png, and the padding never
    # reaches the tokenizer or records.jsonl
    path = tmp_path / "m.csv"
    write_csv(path, [[" 0.png ", "  a red dot  ", json.dumps([{"bbox": [1, 1, 9, 9], "phrase": " a dot "}])],
                     ["1.png", "plain", ""]])
    out = tmp_path / "c"
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 0, err
    recs = records(out)
    assert [(r["image"], r["captions"], r["phrases"]) for r in recs] == [
        ("0.png", ["a red dot"], ["a dot"]), ("1.png", ["plain"], [])]


def test_header_names_are_matched_whatever_their_case(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("Image,Caption,Split\n0.png,a picture,TRAIN\n1.png,another,Train\n")
    out = tmp_path / "c"
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 0, err
    assert "image column 'Image', caption column 'Caption', split column 'Split'" in err
    assert [r["captions"] for r in records(out)] == [["a picture"], ["another"]]


@pytest.mark.parametrize("value,split", [("Test", "test"), (" VAL ", "val"), (None, "train"), ("", "train")])
def test_split_values_ignore_case_and_null_means_none(images, tmp_path, capsys, value, split):
    # row 1's split is the one under test; with --val-frac 0 --test-frac 0 "none" deals train
    path = tmp_path / "m.jsonl"
    rows = [{"image": "0.png", "caption": "under test", "split": value},
            {"image": "1.png", "caption": "train", "split": "train"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "c"
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 0, err
    assert [r["split"] for r in records(out)] == [split, "train"]


@pytest.mark.parametrize("text,problem", [
    ("image,caption,split\n0.png,a,train\n1.png,b,dev\n", "m.csv:3: unknown split 'dev' (use train, val or test)"),
    # the quote swallows the rest of the file: the line to fix is where it opens, not the last
    ('image,caption\n0.png,fine\n1.png,"unclosed\n2.png,two\n3.png,three\n',
     "m.csv:3: malformed CSV row (unexpected end of data)"),
], ids=["unknown split", "unclosed quote"])
def test_a_bad_csv_row_is_refused_at_its_line(images, tmp_path, capsys, text, problem):
    path = tmp_path / "m.csv"
    path.write_text(text)
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 2 and problem in err, err


def test_only_the_rows_without_a_split_are_dealt(images, tmp_path, capsys):
    # every row without a split goes to test (--test-frac just below 1); the source's splits stay
    path = tmp_path / "m.csv"
    path.write_text("image,caption,split\n0.png,a,train\n1.png,b,\n2.png,c,val\n3.png,d,\n")
    out = tmp_path / "c"
    args = manifest_args(images, path, out)
    args[args.index("--test-frac") + 1] = "0.999999"
    rc, _, err = run(args, capsys)
    assert rc == 0, err
    assert [r["split"] for r in records(out)] == ["train", "test", "val", "test"]


def test_a_region_repeated_by_the_rows_of_an_image_is_kept_once(images, tmp_path, capsys):
    # COCO-style rows repeat the image's regions with each caption: one box, not three
    cat = {"bbox": [2, 2, 10, 10], "phrase": "a cat"}
    dog = {"bbox": [2, 2, 10, 10], "phrase": "a dog"}  # same box, another phrase: a region of its own
    path = tmp_path / "m.jsonl"
    rows = [{"image": "0.png", "caption": c, "regions": regs}
            for c, regs in (("one", [cat]), ("two", [cat, dog]), ("three", [dog, cat]))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "c"
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 0, err
    assert records(out)[0]["phrases"] == ["a cat", "a dog"]
    assert load_cache(out).region_boxes.tolist() == [pytest.approx([0.1, 0.1, 0.5, 0.5])] * 2


def test_tsv_with_windows_line_ends_and_blank_lines(images, tmp_path, capsys):
    # a spreadsheet's CRLF: the "\r" must not stay on the last field (it would keep a quoted
    # field from being unquoted), and a blank line is no row; a field that is one quote is text
    path = tmp_path / "m.tsv"
    path.write_bytes(b'image\tcaption\r\n0.png\t"a ""quoted"" word"\r\n\r\n1.png\t"\r\n2.png\tplain\r\n\r\n')
    out = tmp_path / "c"
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 0, err
    assert [r["captions"] for r in records(out)] == [['a "quoted" word'], ['"'], ["plain"]]


def test_a_jsonl_manifest_may_start_with_a_byte_order_mark(images, tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    path.write_bytes("\ufeff".encode() + (json.dumps({"image": "0.png", "caption": "first"}) + "\n").encode())
    out = tmp_path / "c"
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 0, err
    assert records(out)[0]["captions"] == ["first"]


@pytest.mark.parametrize("text,problem", [("", "m.csv: empty manifest"),
                                          ("image,caption\n", "m.csv: manifest has no rows"),
                                          ("image,caption\n\n\n", "m.csv: manifest has no rows")],
                         ids=["empty file", "header only", "header and blank lines"])
def test_a_manifest_without_rows_is_one_line(images, tmp_path, capsys, text, problem):
    path = tmp_path / "m.csv"
    path.write_text(text)
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 2 and err.strip().count("\n") == 0 and problem in err, err


def test_odvg_blank_lines_and_rows_without_regions(images, tmp_path, capsys):
    # a blank line is no row (and does not shift the line numbers after it); a grounding
    # without "regions" is an image with none
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    rows = [{"filename": "0.png", "grounding": {"caption": "no regions"}},
            {"filename": "1.png",
             "grounding": {"caption": "one", "regions": [{"bbox": [1, 1, 5, 5], "phrase": "a dot"}]}}]
    train.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n\n")
    val.write_text(json.dumps({"filename": "2.png", "grounding": {"caption": "val", "regions": []}}) + "\n")
    args = ["--format", "odvg", "--images", images, "--train", train, "--val", val, "--image-size", 8,
            "--workers", 1, "--vocab-size", 300, "--folds", 1]
    out = tmp_path / "c"
    rc, _, err = run(args + ["--out", out], capsys)
    assert rc == 0, err
    assert [(r["captions"], r["phrases"]) for r in records(out)] == [
        (["no regions"], []), (["one"], ["a dot"]), (["val"], [])]
    rows[1]["grounding"]["caption"] = " "
    train.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    rc, _, err = run(args + ["--out", tmp_path / "d"], capsys)
    assert rc == 2 and "train.jsonl:3: empty caption" in err, err


@pytest.mark.parametrize("damage", ["cut short", "deleted"])
def test_a_damaged_cache_is_rebuilt_not_reused(images, tmp_path, capsys, damage):
    # a copy cut short keeps its manifest: the sizes recorded at build time tell it apart
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "c"
    assert run(manifest_args(images, path, out), capsys)[0] == 0
    f = out / "images.safetensors"
    if damage == "cut short":
        f.write_bytes(f.read_bytes()[:-7])
        with pytest.raises(EclipError, match="images.safetensors: has another size than when it was built; rebuild"):
            load_cache(out)
    else:
        f.unlink()
    rc, stdout, err = run(manifest_args(images, path, out), capsys)
    assert rc == 0 and "status:             built" in stdout, err
    assert load_cache(out).images.shape == (1, 3, 8, 8)


def test_a_cache_missing_a_tensor_is_refused_by_name(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "c"
    assert run(manifest_args(images, path, out), capsys)[0] == 0
    ann = out / "annotations.safetensors"
    arrays = load_file(str(ann))
    del arrays["fold"]  # as written by an older prepare, say
    save_file(arrays, str(ann))
    m = read_manifest(out)
    m["sizes"]["annotations.safetensors"] = ann.stat().st_size
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EclipError, match=r"annotations.safetensors: missing tensors fold$"):
        load_cache(out)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"'])
def test_out_with_a_manifest_json_that_is_no_object_is_left_alone(images, tmp_path, capsys, text):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "other"
    out.mkdir()
    (out / "manifest.json").write_text(text)
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 2 and "other: exists and is not a cache; refusing to replace it" in err, err
    assert (out / "manifest.json").read_text() == text
    with pytest.raises(EclipError, match="not a prepared cache, manifest.json missing or unreadable"):
        load_cache(out)


def test_an_existing_empty_out_directory_is_used(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "made-by-hand"
    out.mkdir()
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 0, err
    assert load_cache(out).images.shape[0] == 1


def test_a_cache_holding_several_foreign_files_names_the_first_and_counts_the_rest(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "c"
    assert run(manifest_args(images, path, out), capsys)[0] == 0
    for name in ("b.txt", "a.txt", "c.txt"):
        (out / name).write_text("mine")
    # --force: without it the unchanged cache is reused as it is, and nothing is replaced
    rc, _, err = run(manifest_args(images, path, out, "--force"), capsys)
    assert rc == 2 and "holds 'a.txt' and 2 more, which is not part of the cache" in err, err


@pytest.mark.parametrize("change", [["--force"], ["--resize", "center-crop"], ["--seed", "7"],
                                    ["--phrase-length", "5"], ["bump", "READ_VERSION"], ["bump", "DECODE_VERSION"]],
                         ids=lambda c: " ".join(c))
def test_a_changed_option_or_reader_version_rebuilds(images, tmp_path, capsys, monkeypatch, change):
    # the same inputs and options reuse the cache; each of these must build it afresh
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "c"
    assert run(manifest_args(images, path, out), capsys)[0] == 0
    rc, stdout, _ = run(manifest_args(images, path, out), capsys)
    assert rc == 0 and "status:             reused" in stdout
    if change[0] == "bump":  # a new reader or decoder: caches of the old one are stale
        monkeypatch.setattr(prepare, change[1], getattr(prepare, change[1]) + 1)
        change = []
    rc, stdout, err = run(manifest_args(images, path, out, *change), capsys)
    assert rc == 0 and "status:             built" in stdout, err


@pytest.mark.parametrize("option,value", [("--image-size", 2), ("--context-length", 2), ("--phrase-length", 2),
                                          ("--folds", 0), ("--workers", 0), ("--num-train", 0)])
def test_options_below_their_minimum_are_refused(images, tmp_path, capsys, option, value):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    rc, _, err = run(manifest_args(images, path, tmp_path / "c", option, value), capsys)
    assert rc == 2 and err == f"prepare: error: {option} {value}: too small\n", err


@pytest.mark.parametrize("val,test", [("0.5", "0.5"), ("0.7", "0.6"), ("1", "0"), ("-0.1", "0")])
def test_split_fractions_must_leave_room_for_training(images, tmp_path, capsys, val, test):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    rc, _, err = run(manifest_args(images, path, tmp_path / "c", "--val-frac", val, "--test-frac", test), capsys)
    assert rc == 2 and "--val-frac and --test-frac must lie in [0, 1) and sum below 1" in err, err


def test_the_largest_evaluation_split_there_is_may_be_asked_for():
    args = prepare.build_parser().parse_args(["--dataset", "synthetic", "--out", "x",
                                              "--num-val", str(synthetic.MAX_EVAL_SCENES),
                                              "--num-test", str(synthetic.MAX_EVAL_SCENES)])
    prepare._resolve_defaults(args)  # not refused: exactly as many scenes as exist


def test_a_negative_seed_is_refused(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    rc, _, err = run(manifest_args(images, path, tmp_path / "c", "--seed", "-1"), capsys)
    assert rc == 2 and err == "prepare: error: --seed -1: must be 0 or more\n", err


def test_a_source_without_training_images_is_refused(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption,split\n0.png,a,val\n1.png,b,test\n")
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 2 and "no training images left (every training row was bad or the split is empty)" in err, err
    assert not (tmp_path / "c").exists()


def test_a_row_with_two_bad_boxes_is_reported_once_at_its_first(images, tmp_path, capsys):
    wide = {"bbox": [0, 0, 500, 10], "phrase": "too wide"}
    tall = {"bbox": [0, 0, 10, 500], "phrase": "too tall"}
    path = tmp_path / "m.jsonl"
    rows = [{"image": "0.png", "caption": "fine"}, {"image": "1.png", "caption": "bad", "regions": [wide, tall]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "c"
    rc, _, err = run(manifest_args(images, path, out, "--skip-bad"), capsys)
    assert rc == 0, err
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"where": f"{path}:2", "problem": "region 0: bbox [0, 0, 500, 10] lies outside the 20x20 image"}]


def test_synthetic_evaluation_splits_are_the_distinct_scenes_and_train_may_repeat(tmp_path, capsys):
    out = tmp_path / "c"
    rc, _, err = run(["--dataset", "synthetic", "--num-train", 12, "--num-val", 12, "--num-test", 12,
                      "--image-size", 8, "--workers", 1, "--seed", 3, "--out", out], capsys)
    assert rc == 0, err
    recs = records(out)
    for split, unique in (("train", False), ("val", True), ("test", True)):
        want = [s.caption for s in synthetic.sample_split(3, split, 12, unique=unique)]
        assert [r["captions"][0] for r in recs if r["split"] == split] == want, split


def test_a_nul_in_an_image_path_is_a_row_problem(images, tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    rows = [{"image": "0.png", "caption": "fine"}, {"image": "a\u0000b.png", "caption": "broken"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 2 and "m.jsonl:2: image path holds a NUL character" in err, err
    rc, _, err = run(manifest_args(images, path, tmp_path / "c", "--skip-bad"), capsys)
    assert rc == 0, err
    assert load_cache(tmp_path / "c").images.shape[0] == 1


def test_out_with_an_undecodable_manifest_json_is_refused_in_one_line(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "other"
    out.mkdir()
    (out / "manifest.json").write_bytes(b"\xff\xfe binary, another tool's")
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 2 and "exists and is not a cache; refusing to replace it" in err, err


@pytest.mark.parametrize("option,problem", [
    (["--vocab-size", "259"], "--vocab-size 259: must be at least 260 (256 byte symbols plus the special tokens)"),
    (["--tokenizer", "tok.json"], "tok.json: not a valid tokenizer.json"),
], ids=["vocab below the byte symbols", "a tokenizer file that is none"])
def test_tokenizer_options_are_refused_before_any_image_is_decoded(images, tmp_path, capsys, option, problem):
    # 1.png is no image: had decoding run first, its error (not the option's) would be the one line
    (images / "1.png").write_bytes(b"not a png")
    (tmp_path / "tok.json").write_text("{ this is no tokenizer")
    option = [str(tmp_path / o) if o.endswith(".json") else o for o in option]
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n1.png,another\n")
    args = [a for a in manifest_args(images, path, tmp_path / "c") if a is not None]
    at = args.index("--vocab-size")
    del args[at:at + 2]
    rc, _, err = run(args + option, capsys)
    assert rc == 2 and problem in err, err
    assert "1.png" not in err and err.count("error") == 1
    assert not (tmp_path / "c").exists()
