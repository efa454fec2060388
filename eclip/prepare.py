"""``python -m eclip.prepare``: build a dataset cache that training loads in seconds.

Sources: the built-in ``--dataset synthetic``; ``--format odvg`` (Ukiyo-eVG JSONL files per
split); ``--format manifest`` (CSV/TSV/JSONL, one row per image–caption pair). The cache
layout is documented in :mod:`eclip.data.cache`. Running again with the same inputs and
options reuses the cache; any change rebuilds it. Bad input stops with one line naming the
file and line, exit code 2, nothing written — or, with ``--skip-bad``, is skipped and listed
in ``skipped.jsonl``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eclip.data import cache as cache_mod
from eclip.data import synthetic
from eclip.data.images import DECODE_VERSION, RESIZE_POLICIES, Job, decode_job
from eclip.data.sources import (
    READ_VERSION,
    Problems,
    Record,
    Region,
    read_manifest_file,
    read_odvg,
    resolve_image,
)
from eclip.errors import DataError, DefaultsFormatter, EclipError, OneLineParser
from eclip.evaluate import kfold_assign
from eclip.process import exit_main, sigterm_as_ctrl_c
from eclip.tokenizer import check_vocab_size, encode_batch, load_tokenizer, train_bpe

SPLIT_IDS = {name: i for i, name in enumerate(cache_mod.SPLITS)}
SYNTHETIC_VERSION = 2  # bump when the generator's output changes, so caches rebuild
MAX_FOLDS = int(np.iinfo(np.int8).max)  # fold ids are stored as int8 (see eclip.data.cache)
# bounds far beyond use that keep a mistyped option from asking for terabytes (the arrays
# are allocated before anything is written): the cache's side, its token contexts, decoders
MAX_SIZES = {"image_size": 4096, "context_length": 8192, "phrase_length": 8192, "workers": 1024,
             "num_train": 100_000_000}
DEFAULTS = {  # (real data, synthetic)
    "image_size": (224, 64),
    "vocab_size": (8192, 1024),
    "context_length": (77, 48),
    "phrase_length": (32, 16),
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m eclip.prepare", description=__doc__.split("\n\n")[0],
                      formatter_class=DefaultsFormatter)
    src = p.add_argument_group("source (one of)")
    src.add_argument("--dataset", choices=["synthetic"], help="the built-in dataset")
    src.add_argument("--format", choices=["odvg", "manifest"], help="a real dataset's annotation format")
    src.add_argument("--images", type=Path, help="directory the image paths are relative to")
    src.add_argument("--train", type=Path, help="odvg: training split JSONL")
    src.add_argument("--val", type=Path, help="odvg: validation split JSONL")
    src.add_argument("--test", type=Path, help="odvg: test split JSONL (optional)")
    src.add_argument("--manifest", type=Path, help="manifest: CSV, TSV or JSONL file")
    src.add_argument("--image-column", help="manifest: image path column (default: detected)")
    src.add_argument("--caption-column", help="manifest: caption column (default: detected)")
    src.add_argument("--regions-column", help="manifest: JSON regions column (default: 'regions' if present)")
    src.add_argument("--val-frac", type=float, default=0.1, help="manifest without a split column: share of images for val")
    src.add_argument("--test-frac", type=float, default=0.1, help="manifest without a split column: share of images for test")
    syn = p.add_argument_group("synthetic")
    syn.add_argument("--num-train", type=int, default=20_000, help="training scenes")
    syn.add_argument("--num-val", type=int, default=1_000, help="validation scenes (all distinct)")
    syn.add_argument("--num-test", type=int, default=1_000, help="test scenes (all distinct)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="cache directory to write")
    out.add_argument("--image-size", type=int, help="output resolution R (default 224; 64 for synthetic)")
    out.add_argument("--resize", choices=RESIZE_POLICIES, default="squash", help="how images become square")
    out.add_argument("--tokenizer", type=Path, help="use this tokenizer.json instead of training one")
    out.add_argument("--vocab-size", type=int, help="BPE vocabulary (default 8192; 1024 for synthetic)")
    out.add_argument("--context-length", type=int, help="caption tokens incl. <bos>/<eos> (default 77; 48 synthetic)")
    out.add_argument("--phrase-length", type=int, help="region phrase tokens (default 32; 16 synthetic)")
    out.add_argument("--folds", type=int, default=3, help="k for the k-fold assignment over train+val images (at most 127)")
    out.add_argument("--seed", type=int, default=42, help="seed for splits, folds and the synthetic scenes")
    out.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="image decoding processes")
    out.add_argument("--skip-bad", action="store_true", help="skip bad rows/images and list them in skipped.jsonl")
    out.add_argument("--force", action="store_true", help="rebuild even when the cache is current")
    return p


def _resolve_defaults(args) -> None:
    synth = args.dataset == "synthetic"
    for key, pair in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, pair[1] if synth else pair[0])
    for key in ("image_size", "context_length", "phrase_length", "folds", "workers",
                "num_train", "num_val", "num_test"):
        if getattr(args, key) < (1 if key not in ("image_size", "context_length", "phrase_length") else 3):
            raise EclipError(f"--{key.replace('_', '-')} {getattr(args, key)}: too small")
        if getattr(args, key) > MAX_SIZES.get(key, math.inf):  # checked before any memory is asked for
            raise EclipError(f"--{key.replace('_', '-')} {getattr(args, key)}: at most {MAX_SIZES[key]}")
    if not (0 <= args.val_frac < 1 and 0 <= args.test_frac < 1 and args.val_frac + args.test_frac < 1):
        raise EclipError("--val-frac and --test-frac must lie in [0, 1) and sum below 1")
    if args.tokenizer is None:  # here, not after minutes of decoding
        check_vocab_size(args.vocab_size)
    if args.folds > MAX_FOLDS:  # a larger id would wrap around to a negative one
        raise EclipError(f"--folds {args.folds}: at most {MAX_FOLDS} (fold ids are stored as int8)")
    if synth:  # checked up front: the generator cannot draw more distinct scenes than exist
        for key in ("num_val", "num_test"):
            if getattr(args, key) > synthetic.MAX_EVAL_SCENES:
                raise EclipError(f"--{key.replace('_', '-')} {getattr(args, key)}: the built-in dataset has at most "
                                 f"{synthetic.MAX_EVAL_SCENES} distinct evaluation scenes")


def _stat_digest(paths: list[Path]) -> str:
    """Hash of (name, size, mtime) of every image: catches replaced files without reading
    gigabytes of pixels on every run."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def gather_records(args, problems: Problems) -> tuple[list[Record], list[dict], dict]:
    """Read the source into records. Returns records, source descriptions and extra info."""
    if (args.dataset is None) == (args.format is None):
        raise EclipError("give exactly one of --dataset synthetic or --format {odvg,manifest}")
    if args.dataset == "synthetic":
        recs = []
        for split, n in (("train", args.num_train), ("val", args.num_val), ("test", args.num_test)):
            for i, scene in enumerate(synthetic.sample_split(args.seed, split, n, unique=split != "train")):
                where = f"synthetic:{split}:{i}"
                recs.append(Record(image=f"synthetic/{split}/{i}", captions=[scene.caption],
                                   regions=[Region([], o.phrase, where, k) for k, o in enumerate(scene.objects)],
                                   split=split, where=where, scene=scene))
        return recs, [{"kind": "synthetic", "version": SYNTHETIC_VERSION}], {}
    if args.images is None:
        raise EclipError(f"--format {args.format} needs --images, the folder the image paths are relative to")
    if not args.images.is_dir():
        raise EclipError(f"--images {args.images}: not a directory")
    sources, recs, extra = [], [], {}
    if args.format == "odvg":
        if args.train is None or args.val is None:
            raise EclipError("--format odvg needs --train and --val (and optionally --test)")
        seen: dict[str, tuple[str, str]] = {}
        for split in ("train", "val", "test"):
            f = getattr(args, split)
            if f is None:
                continue
            if not f.is_file():
                raise EclipError(f"--{split} {f}: file not found")
            sources.append({"kind": f"odvg:{split}", "path": str(f), "sha256": cache_mod.sha256_file(f)})
            recs += read_odvg(f, split, args.images, problems, seen)
    else:
        if args.manifest is None:
            raise EclipError("--format manifest needs --manifest FILE (a CSV, TSV or JSONL of image, caption)")
        if not args.manifest.is_file():
            raise EclipError(f"--manifest {args.manifest}: file not found")
        sources.append({"kind": "manifest", "path": str(args.manifest), "sha256": cache_mod.sha256_file(args.manifest)})
        recs, cols = read_manifest_file(args.manifest, args.images, problems, args.image_column,
                                        args.caption_column, args.regions_column)
        extra["columns"] = cols
        print(f"manifest: image column {cols['image']!r}, caption column {cols['caption']!r}"
              + (f", regions column {cols['regions']!r}" if cols["regions"] else "")
              + (f", split column {cols['split']!r}" if cols["split"] else ""), file=sys.stderr)
        root = os.path.abspath(args.images)  # once: not a syscall per row
        for r in recs:  # seeded split by image, never by caption
            if r.split is None:
                x = split_draw(args.seed, root, r.image)
                r.split = "test" if x < args.test_frac else "val" if x < args.test_frac + args.val_frac else "train"
    paths = [resolve_image(args.images, r.image) for r in recs]
    sources.append({"kind": "images", "path": str(args.images), "count": len(paths), "stat_sha256": _stat_digest(paths)})
    return recs, sources, extra


def split_draw(seed: int, root: str, name: str) -> float:
    """An image's draw in [0, 1) for the manifest's random split: a hash of the seed and its
    path as the manifest names it, relative to ``root`` (``--images``, absolute) and written
    plainly (``./0.png`` is ``0.png``), so that each image keeps its split when rows are added,
    removed or reordered, and wherever the images lie (links not followed: a store of links
    elsewhere draws the same). Draws in row order moved half the images of a manifest
    rebuilt without one row to another split: a model trained on the first cache had seen
    test images of the second."""
    key = os.path.relpath(os.path.normpath(os.path.join(root, name)), root)
    digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def decode_all(recs: list[Record], args, problems: Problems) -> tuple[np.ndarray, list[list], list[int]]:
    """Decode every record's image in parallel. Returns images [n, 3, R, R] for the records
    kept, their normalised boxes, and the indices of the records kept."""
    jobs = [Job(path=None if r.scene else str(resolve_image(args.images, r.image)), scene=r.scene,
                boxes=[g.box for g in r.regions], size=args.image_size, policy=args.resize)
            for r in recs]
    images = np.empty((len(jobs), 3, args.image_size, args.image_size), dtype=np.uint8)
    boxes, keep, rotated = [], [], 0
    bar = tqdm(total=len(jobs), desc="decode", unit="img", file=sys.stderr, mininterval=1.0,
               disable=None)  # None: shown on a terminal, silent in logs and pipes
    if args.workers <= 1 or len(jobs) < 64:
        results = map(decode_job, jobs)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(min(args.workers, len(jobs)))
        results = pool.imap(decode_job, jobs, chunksize=64)
    try:
        for i, res in enumerate(results):
            bar.update()
            if res.error:
                problems.report(DataError(recs[i].where, res.error))
                continue
            kept_boxes = _drop_bad_boxes(recs[i], res.boxes, res.bad_boxes, problems)
            if not recs[i].captions:  # every row of the image had a bad box
                continue
            images[len(keep)] = res.image
            boxes.append(kept_boxes)
            keep.append(i)
            rotated += res.rotated
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    if rotated:
        print(f"prepare: note: {rotated} images carry an EXIF orientation (a rotation or flip a viewer applies); "
              "it is not applied: their pixels and boxes are read in the stored frame", file=sys.stderr)
    return images[: len(keep)], boxes, keep


def _drop_bad_boxes(rec: Record, boxes: list, bad: list[tuple[int, str]], problems: Problems) -> list:
    """Report the rows of ``rec`` that gave a box outside the image, each at its own line and
    first bad region (as the readers report a row), and drop those rows' captions and
    regions; the image keeps what its other rows said. Returns the boxes of the regions kept.
    Without ``--skip-bad`` the first report raises."""
    if not bad:
        return boxes
    lines: dict[str, str] = {}
    for k, problem in bad:  # every row that gave the bad region goes, each at its own line
        for where, index in rec.regions[k].givers():
            lines.setdefault(where, f"region {index}: {problem}")
    for where, problem in lines.items():
        problems.report(DataError(where, problem))
    return [b for b, k in zip(boxes, rec.drop_rows(lines), strict=True) if k]


def build_annotations(recs: list[Record], boxes: list[list], tok, args, folds: np.ndarray) -> tuple[dict, dict]:
    """Token ids, region arrays and split/fold indices for the kept records (image row = index)."""
    captions, caption_image, phrases, region_boxes, region_image = [], [], [], [], []
    for row, (rec, bxs) in enumerate(zip(recs, boxes, strict=True)):
        for c in rec.captions:
            captions.append(c)
            caption_image.append(row)
        for region, b in zip(rec.regions, bxs, strict=True):
            if b is None:  # cropped away by --resize center-crop
                continue
            phrases.append(region.phrase)
            region_boxes.append(b)
            region_image.append(row)
    tokens, lengths, trunc_c = encode_batch(tok, captions, args.context_length)
    rtokens, rlengths, trunc_p = encode_batch(tok, phrases, args.phrase_length)
    arrays = {
        "tokens": tokens, "lengths": lengths,
        "caption_image": np.asarray(caption_image, dtype=np.int64),
        "region_boxes": np.asarray(region_boxes, dtype=np.float32).reshape(-1, 4),
        "region_image": np.asarray(region_image, dtype=np.int64),
        "region_tokens": rtokens, "region_lengths": rlengths,
        "split": np.asarray([SPLIT_IDS[r.split] for r in recs], dtype=np.int8),
        "fold": folds.astype(np.int8),
    }
    return arrays, {"truncated_captions": trunc_c, "truncated_phrases": trunc_p,
                    "regions_cropped_away": sum(b is None for bx in boxes for b in bx)}


def summary_lines(manifest: dict, status: str, seconds: float) -> list[str]:
    c = manifest["counts"]
    rows = [("cache", manifest["out"]), ("status", status), ("images", c["images"]),
            ("train_images", c["train"]), ("val_images", c["val"]), ("test_images", c["test"]),
            ("captions", c["captions"]), ("regions", c["regions"]),
            ("vocab_size", manifest["tokenizer"]["vocab_size"]),
            ("context_length", manifest["tokenizer"]["context_length"]),
            ("truncated_captions", c["truncated_captions"]), ("truncated_phrases", c["truncated_phrases"]),
            ("skipped", c["skipped"]), ("prepare_s", f"{seconds:.1f}")]
    return ["---"] + [f"{k + ':':<20}{v}" for k, v in rows]


def run(args) -> dict:
    t0 = time.perf_counter()
    _resolve_defaults(args)
    problems = Problems(args.skip_bad)
    recs, sources, extra = gather_records(args, problems)
    options = {k: getattr(args, k) for k in (
        "dataset", "format", "image_size", "resize", "vocab_size", "context_length", "phrase_length",
        "folds", "seed", "skip_bad", "num_train", "num_val", "num_test", "val_frac", "test_frac",
        "image_column", "caption_column", "regions_column")}
    if args.tokenizer is not None:
        if not args.tokenizer.is_file():
            raise EclipError(f"--tokenizer {args.tokenizer}: file not found")
        sources.append({"kind": "tokenizer", "path": str(args.tokenizer), "sha256": cache_mod.sha256_file(args.tokenizer)})
    fp = cache_mod.fingerprint({"options": options, "sources": [dict(s, path=None) for s in sources],
                                "format_version": cache_mod.FORMAT_VERSION, "decode_version": DECODE_VERSION,
                                "read_version": READ_VERSION})
    with cache_mod.build_lock(args.out):  # one build of a cache at a time, from the check to the commit
        cache_mod.recover(args.out)  # a killed build's leftovers; its previous cache back in place
        if not args.force and cache_mod.is_current(args.out, fp):
            manifest = cache_mod.read_manifest(args.out)
            print(f"prepare: reusing cache {args.out} (inputs and options unchanged; --force rebuilds)", file=sys.stderr)
            print("\n".join(summary_lines(dict(manifest, out=str(args.out)), "reused", time.perf_counter() - t0)))
            return manifest
        cache_mod.ensure_replaceable(args.out)  # before minutes of decoding, not after
        tok = load_tokenizer(args.tokenizer) if args.tokenizer is not None else None  # likewise: a bad file fails now
        if not recs:
            raise EclipError("no usable images in the source")
        images, boxes, keep = decode_all(recs, args, problems)
        recs = [recs[i] for i in keep]
        counts = {s: sum(r.split == s for r in recs) for s in cache_mod.SPLITS}
        if counts["train"] == 0:
            raise EclipError("no training images left (every training row was bad or the split is empty)")
        if tok is None:
            tok = train_bpe((c for r in recs if r.split == "train" for c in r.captions), args.vocab_size)
        folds = np.full(len(recs), -1, dtype=np.int64)
        trainval = np.array([i for i, r in enumerate(recs) if r.split != "test"], dtype=np.int64)
        if len(trainval) < args.folds:
            raise EclipError(f"--folds {args.folds}: only {len(trainval)} train+val images to split")
        folds[trainval] = kfold_assign(len(trainval), args.folds, args.seed)
        arrays, tstats = build_annotations(recs, boxes, tok, args, folds)
        manifest = {
            "out": str(args.out), "fingerprint": fp, "options": options, "sources": sources,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "counts": {"images": len(recs), **counts, "captions": int(arrays["tokens"].shape[0]),
                       "regions": int(arrays["region_boxes"].shape[0]), "skipped": len(problems.skipped), **tstats},
            "tokenizer": {"vocab_size": tok.get_vocab_size(), "context_length": args.context_length,
                          "phrase_length": args.phrase_length, "trained": args.tokenizer is None},
            **extra,
        }
        with cache_mod.CacheWriter(args.out) as w:
            w.save_arrays("images.safetensors", {"images": images})
            w.save_arrays("annotations.safetensors", arrays)
            tok.save(str(w.path("tokenizer.json")))
            # "phrases": the regions kept, in the cache's row order (a pretrained text tower
            # re-tokenizes them from here); "cropped_phrases": those center-crop removed
            w.write_jsonl("records.jsonl", ({"image": r.image, "split": r.split, "captions": r.captions,
                                             "phrases": [g.phrase for g, b in zip(r.regions, bx, strict=True)
                                                         if b is not None],
                                             "cropped_phrases": [g.phrase for g, b in zip(r.regions, bx, strict=True)
                                                                 if b is None]}
                                            for r, bx in zip(recs, boxes, strict=True)))
            if problems.skipped:
                w.write_jsonl("skipped.jsonl", problems.skipped)
            w.commit(manifest)
        if problems.skipped:
            print(f"prepare: skipped {len(problems.skipped)} bad rows/images, listed in {args.out / 'skipped.jsonl'}",
                  file=sys.stderr)
        for split, use in (("val", "eclip.train scores on it (only --folds does without)"),
                           ("test", "eclip.train --final scores on it")):
            if counts[split] < 2:  # built all the same: a cache for cross-validation needs no val split
                what = "is empty" if counts[split] == 0 else "has a single image (too few to rank: any model ranks it first)"
                print(f"prepare: warning: the {split} split {what}, and {use} (a source with more images, or a "
                      f"larger --{split}-frac)", file=sys.stderr)
        print("\n".join(summary_lines(manifest, "built", time.perf_counter() - t0)))
        return manifest


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seed < 0:
        print(f"prepare: error: --seed {args.seed}: must be 0 or more", file=sys.stderr)
        return 2
    try:
        with sigterm_as_ctrl_c():  # a scheduler's stop (or timeout's) cleans up as Ctrl-C does
            run(args)
    except EclipError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # mostly an --out that cannot be written (read-only, not a directory, full)
        named = f"{e.filename}: {e.strerror or e}" if e.filename else e.strerror or e
        print(f"prepare: error: {args.out}: cannot write the cache ({named})", file=sys.stderr)
        return 2
    except MemoryError:  # within the bounds, the images of a large source at a large size
        print(f"prepare: error: out of memory for {args.out} (--image-size {args.image_size}: a cache holds "
              "every image uncompressed, 3 × size² bytes each); nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    exit_main(main)
