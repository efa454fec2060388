"""``python -m eclip.prepare``: option limits refused up front (folds, evaluation scenes, split
fractions, seeds, tokenizer options) and the built-in dataset's evaluation splits."""

import json

import pytest
from prepare_support import manifest_args, records
from test_prepare import run

from eclip import prepare
from eclip.data import synthetic
from eclip.data.cache import load_cache


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


def test_synthetic_evaluation_splits_are_the_distinct_scenes_and_train_may_repeat(tmp_path, capsys):
    out = tmp_path / "c"
    rc, _, err = run(["--dataset", "synthetic", "--num-train", 12, "--num-val", 12, "--num-test", 12,
                      "--image-size", 8, "--workers", 1, "--seed", 3, "--out", out], capsys)
    assert rc == 0, err
    recs = records(out)
    for split, unique in (("train", False), ("val", True), ("test", True)):
        want = [s.caption for s in synthetic.sample_split(3, split, 12, unique=unique)]
        assert [r["captions"][0] for r in recs if r["split"] == split] == want, split


@pytest.mark.parametrize("option,problem", [
    (["--vocab-size", "259"], "--vocab-size 259: must be at least 260 (256 byte symbols plus the special tokens) and at most 1048576"),
    (["--tokenizer", "tok.json"], "tok.json: not a valid tokenizer.json"),
    # the trainer's allocator aborted the process (SIGABRT) or the int overflowed, a traceback
    (["--vocab-size", "100000000000"], "--vocab-size 100000000000: must be at least 260 (256 byte symbols plus the "
                                       "special tokens) and at most 1048576"),
    # numpy's MemoryError, a traceback, before anything else was said
    (["--vocab-size", "300", "--image-size", "100000"], "--image-size 100000: at most 4096"),
    (["--vocab-size", "300", "--context-length", "1000000000"], "--context-length 1000000000: at most 8192"),
], ids=["vocab below the byte symbols", "a tokenizer file that is none", "vocab beyond any", "huge images",
        "huge context"])
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


def test_running_out_of_memory_within_the_bounds_is_one_line(images, tmp_path, capsys, monkeypatch):
    def no_room(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(prepare, "decode_all", no_room)
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n1.png,another\n")
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 1 and err.splitlines()[-1] + "\n" == (f"prepare: error: out of memory for {tmp_path / 'c'} (--image-size 8: a cache holds "
                               "every image uncompressed, 3 × size² bytes each); nothing was written\n")
    assert not (tmp_path / "c").exists()


def test_an_empty_or_single_image_val_or_test_split_is_warned_of(images, tmp_path, capsys):
    # the cache was built without a word, and eclip.train then refused it ("the val split is empty")
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n1.png,another\n")
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 0
    assert [line for line in err.splitlines() if "warning" in line] == [
        "prepare: warning: the val split is empty, and eclip.train scores on it (only --folds does without) "
        "(a source with more images, or a larger --val-frac)",
        "prepare: warning: the test split is empty, and eclip.train --final scores on it (a source with more "
        "images, or a larger --test-frac)"]
    # one image: ranked against none, any model ranks it first (eclip.train refuses it too)
    path.write_text("image,caption,split\n0.png,a,train\n1.png,b,val\n2.png,c,test\n")
    rc, _, err = run(manifest_args(images, path, tmp_path / "d"), capsys)
    assert rc == 0
    assert [line for line in err.splitlines() if "warning" in line] == [
        "prepare: warning: the val split has a single image (too few to rank: any model ranks it first), and "
        "eclip.train scores on it (only --folds does without) (a source with more images, or a larger --val-frac)",
        "prepare: warning: the test split has a single image (too few to rank: any model ranks it first), and "
        "eclip.train --final scores on it (a source with more images, or a larger --test-frac)"]
    from test_prepare import write_image
    write_image(images / "4.png", 20, 20, 4)
    path.write_text("image,caption,split\n0.png,a,train\n1.png,b,val\n2.png,c,test\n3.png,d,val\n4.png,e,test\n")
    rc, _, err = run(manifest_args(images, path, tmp_path / "e"), capsys)
    assert rc == 0 and "warning" not in err


def test_an_image_keeps_its_split_when_rows_are_removed_or_reordered(tmp_path, capsys):
    # the draws were made in row order: one row less moved 22 of 39 images to another split,
    # test images among them into train
    from test_prepare import write_image

    folder = tmp_path / "imgs"
    folder.mkdir()
    names = [f"{i}.png" for i in range(40)]
    for i, name in enumerate(names):
        write_image(folder / name, 8, 8, i)

    def splits(rows, out, where=folder):
        path = tmp_path / f"{out}.csv"
        path.write_text("image,caption\n" + "".join(f"{n},picture {n}\n" for n in rows))
        args = manifest_args(where, path, tmp_path / out)
        args[args.index("--val-frac") + 1] = "0.2"
        args[args.index("--test-frac") + 1] = "0.2"
        assert run(args, capsys)[0] == 0
        return {r["image"]: r["split"] for r in records(tmp_path / out)}

    whole = splits(names, "a")
    assert set(whole.values()) == {"train", "val", "test"}  # each image drawn on its own: the counts vary
    assert splits(names[1:][::-1], "b") == {n: whole[n] for n in names[1:]}
    assert splits([f"./{n}" for n in names[:20]], "c") == {f"./{n}": whole[n] for n in names[:20]}  # the same files
    # a store of links elsewhere, at another depth (a shared or versioned dataset): the same draws
    links = tmp_path / "deep" / "x" / "y" / "imgs"
    links.mkdir(parents=True)
    for n in names:
        (links / n).symlink_to(folder / n)
    assert splits(names, "d", links) == whole


def test_images_with_an_exif_rotation_are_counted_not_turned(images, tmp_path, capsys):
    # a phone's portrait photo, stored landscape with orientation 6: its pixels and boxes stay
    # in the stored frame (PIL's and torchvision's default), and prepare says so
    from PIL import Image

    photo = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(images / "portrait.jpg", exif=exif.tobytes())
    path = tmp_path / "m.jsonl"
    rows = [{"image": "portrait.jpg", "caption": "a portrait", "regions": [{"bbox": [30, 2, 40, 20], "phrase": "p"}]},
            {"image": "0.png", "caption": "upright"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, _, err = run(manifest_args(images, path, tmp_path / "c"), capsys)
    assert rc == 0, err
    assert ("prepare: note: 1 images carry an EXIF orientation (a rotation or flip a viewer applies); it is not "
            "applied: their pixels and boxes are read in the stored frame") in err
    cache = load_cache(tmp_path / "c")
    assert cache.region_boxes.tolist() == [[0.75, 0.10000000149011612, 1.0, 1.0]]  # in the 40x20 frame
