"""``python -m eclip.prepare`` on awkward sources: JSONL rows with differing keys, CSV and TSV
quoting, boxes found bad at decoding, regions repeated across rows, image paths that are no
file name, deep images."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from prepare_support import manifest_args, records
from test_prepare import run

from eclip.data.cache import load_cache, read_manifest


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


@pytest.mark.parametrize("row,problem", [
    ({"filename": 8, "grounding": {"caption": "a"}}, "field 'filename' must be a non-empty path, got 8"),
    ({"grounding": {"caption": "a"}}, "missing field 'filename'"),
    ({"filename": "0.png", "grounding": "a"}, "field 'grounding' must be an object, got str"),
    ({"filename": "0.png"}, "missing field 'grounding'"),
], ids=["a number for a file name", "no file name", "a string for grounding", "no grounding"])
def test_odvg_fields_of_the_wrong_type_are_not_called_missing(images, tmp_path, capsys, row, problem):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text(json.dumps({"filename": "1.png", "grounding": {"caption": "b"}}) + "\n" + json.dumps(row) + "\n")
    val.write_text(json.dumps({"filename": "2.png", "grounding": {"caption": "c"}}) + "\n")
    rc, _, err = run(["--format", "odvg", "--images", images, "--train", train, "--val", val, "--out", tmp_path / "e",
                      "--image-size", 8, "--workers", 1, "--vocab-size", 300, "--folds", 1], capsys)
    assert rc == 2 and f"train.jsonl:2: {problem}" in err, err


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
    ({"bbox": [0, 0, 5, 5], "phrase": 5}, "region 1: phrase must be text, got 5"),  # once "empty phrase"
    ({"bbox": [0, 0, 5, 5]}, "region 1: missing phrase"),
], ids=["five numbers", "a bool", "nan", "infinity", "no width", "no height", "negative y", "blank phrase",
        "a number for a phrase", "no phrase"])
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


def test_a_nul_in_an_image_path_is_a_row_problem(images, tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    rows = [{"image": "0.png", "caption": "fine"}, {"image": "a\u0000b.png", "caption": "broken"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 2 and "m.jsonl:2: image path holds a NUL character" in err, err
    rc, _, err = run(manifest_args(images, path, tmp_path / "c", "--skip-bad"), capsys)
    assert rc == 0, err
    assert load_cache(tmp_path / "c").images.shape[0] == 1


BIG_INT = "1" + "0" * 400  # JSON's numbers have no bound: too large for a float
LONG_INT = "7" * 5000  # past Python's 4,300-digit limit on parsing an int


@pytest.mark.parametrize("line,problem", [
    ('{"image": "0.png", "caption": "a", "regions": [{"bbox": [1, 1, ' + BIG_INT + ', 5], "phrase": "p"}]}',
     "region 0: bbox must be four finite numbers"),  # was OverflowError, a traceback
    ('{"image": "0.png", "caption": "a", "id": ' + LONG_INT + "}",
     "unreadable JSON (Exceeds the limit (4300 digits) for integer string conversion"),  # was ValueError
    ('{"image": "0.png", "caption": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "unreadable JSON (nested too deeply)"),  # was RecursionError
    ('{"image": "0.png", "caption": "half an emoji \\ud83d"}',
     "caption holds a lone surrogate ('\\ud83d' at character 15), which is no UTF-8 text"),  # tokenizer's error
    ('{"image": "0.png", "caption": "a", "regions": [{"bbox": [1, 1, 4, 5], "phrase": "x\\udcff"}]}',
     "region 0: phrase holds a lone surrogate"),
    ('{"image": "0\\ud800.png", "caption": "a"}', "image path holds a lone surrogate"),
], ids=["huge int box", "4300 digits", "deep nesting", "surrogate caption", "surrogate phrase", "surrogate path"])
def test_valid_json_the_reader_cannot_take_is_one_line_at_its_row(images, tmp_path, capsys, line, problem):
    # each once ended in a traceback (exit 1), --skip-bad or not; now refused at its row, or skipped
    path = tmp_path / "m.jsonl"
    path.write_text(line + '\n{"image": "1.png", "caption": "fine"}\n')
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 2 and f"m.jsonl:1: {problem}" in err and "Traceback" not in err, err
    assert err.strip().count("\n") == 0
    rc, _, err = run(manifest_args(images, path, tmp_path / "s", "--skip-bad"), capsys)
    assert rc == 0, err
    assert [r["image"] for r in records(tmp_path / "s")] == ["1.png"]


def test_the_same_rows_of_an_odvg_file_are_refused_too(images, tmp_path, capsys):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text('{"filename": "0.png", "grounding": {"caption": "a", "n": ' + LONG_INT + "}}\n")
    val.write_text('{"filename": "1.png", "grounding": {"caption": "b \\ud83d"}}\n')
    args = ["--format", "odvg", "--images", images, "--train", train, "--val", val, "--out", tmp_path / "c",
            "--image-size", 8, "--workers", 1, "--vocab-size", 300, "--folds", 1]
    rc, _, err = run(args, capsys)
    assert rc == 2 and "train.jsonl:1: unreadable JSON (Exceeds the limit" in err, err
    train.write_text('{"filename": "0.png", "grounding": {"caption": "a"}}\n')
    rc, _, err = run(args, capsys)
    assert rc == 2 and "val.jsonl:1: caption holds a lone surrogate" in err, err


def test_a_file_name_with_a_newline_keeps_the_error_on_one_line(images, tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"image": "x\nprepare: error: a second line.png", "caption": "a"}) + "\n")
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 2 and err.count("\n") == 1 and "x\\nprepare: error: a second line.png" in err, err


def test_a_bad_csv_row_is_never_skipped_since_the_rows_after_it_cannot_be_trusted(images, tmp_path, capsys):
    # with --skip-bad the reader went on at the next line, inside a quoted caption: "2.png"
    # and "3.png" rows vanished into a caption, one skip reported, exit 0
    path = tmp_path / "m.csv"
    path.write_text('image,caption\n0.png,fine\n1.png,"a "bad" quote\n2.png,two\n3.png,three\n')
    rc, _, err = run(manifest_args(images, path, tmp_path / "c", "--skip-bad"), capsys)
    assert rc == 2 and "m.csv:3: malformed CSV row" in err and "cannot be skipped" in err, err
    assert not (tmp_path / "c").exists()


def test_a_caption_longer_than_csvs_default_field_limit_is_read(images, tmp_path, capsys):
    import csv as csv_module

    before = csv_module.field_size_limit()
    path = tmp_path / "m.csv"
    write_csv(path, [["0.png", "word " * 40_000, ""], ["1.png", "short", ""]])  # 200 KB, over 131,072
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 0, err
    assert [r["image"] for r in records(tmp_path / "c")] == ["0.png", "1.png"]
    assert csv_module.field_size_limit() == before  # the module's setting is given back


@pytest.mark.parametrize("header,problem", [
    ("image,caption,caption", "m.csv:1: column 'caption' appears more than once in the header"),
    ("Image,image,caption", "m.csv:2: columns 'Image' and 'image' could both be the image column; "
                            "name one with --image-column"),
])
def test_a_column_the_header_names_twice_is_refused(images, tmp_path, capsys, header, problem):
    # the row's dict kept the last such column, unsaid
    path = tmp_path / "m.csv"
    path.write_text(f"{header}\n0.png,0.png,a\n")
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 2 and problem in err, err


def test_a_repeated_column_the_build_never_reads_is_no_matter(images, tmp_path, capsys):
    # a spreadsheet export's blank columns ("image,caption,,") and notes: not refused
    path = tmp_path / "m.csv"
    path.write_text("image,caption,,,notes,notes\n0.png,a picture,,,x,y\n1.png,another,,,,\n")
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 0, err
    assert [r["captions"] for r in records(tmp_path / "c")] == [["a picture"], ["another"]]
