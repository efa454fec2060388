"""The prepared dataset cache: what ``eclip.prepare`` writes and training loads in seconds.

Layout of a cache directory (format version ``FORMAT_VERSION``)::

    images.safetensors       images          uint8   [N, 3, R, R]  RGB, one row per image
    annotations.safetensors  tokens          int32   [C, L]   caption token ids, 0 = padding
                             lengths         int32   [C]      tokens used per caption
                             caption_image   int64   [C]      image row of each caption
                             region_boxes    float32 [G, 4]   (x1, y1, x2, y2) in [0, 1]
                             region_image    int64   [G]      image row of each region
                             region_tokens   int32   [G, Lp]  phrase token ids
                             region_lengths  int32   [G]
                             split           int8    [N]      0 train, 1 val, 2 test
                             fold            int8    [N]      k-fold id over train+val, -1 for test
    tokenizer.json           the byte-level BPE used for tokens and region_tokens
    records.jsonl            per image: source key, captions, region phrases (for people)
    skipped.jsonl            rows dropped by --skip-bad, with reasons (only when any)
    manifest.json            written last: options, source hashes, counts, fingerprint

Captions and regions are grouped by image, and splits are per image, so no picture appears
in two splits. A directory without a readable ``manifest.json`` of the current format
version is not a cache; the writer builds in a temporary sibling directory and renames it
into place, so an interrupted build never leaves one that looks valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from eclip.errors import EclipError
from eclip.fileio import exclusive, read_tensors

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
ANNOTATION_KEYS = ("tokens", "lengths", "caption_image", "region_boxes", "region_image",
                   "region_tokens", "region_lengths", "split", "fold")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj) -> str:
    """A stable hash of a JSON-able description of the inputs and options."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def read_manifest(cache_dir: str | Path) -> dict | None:
    """The manifest of a complete cache, or None when ``cache_dir`` holds none."""
    path = Path(cache_dir) / "manifest.json"
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):  # ValueError: bad JSON or not UTF-8
        return None
    return manifest if isinstance(manifest, dict) else None


def is_current(cache_dir: str | Path, fp: str) -> bool:
    """True when ``cache_dir`` is a complete cache built from the inputs hashed as ``fp``."""
    m = read_manifest(cache_dir)
    if not m or m.get("format_version") != FORMAT_VERSION or m.get("fingerprint") != fp:
        return False
    # a subset (write_subset) keeps its cache's fingerprint but holds the training images only
    return "subset_of" not in m and not damaged_files(cache_dir, m)


def damaged_files(cache_dir: str | Path, manifest: dict) -> list[str]:
    """The manifest's files that are missing, or whose size differs from the one recorded at
    build time (a copy cut short, a file overwritten); sizes are checked where recorded."""
    sizes, files = manifest.get("sizes", {}), manifest.get("files", [])
    if not isinstance(sizes, dict) or not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return ["manifest.json"]  # its list of files is none: nothing it says can be checked
    bad = []
    for name in files:
        f = Path(cache_dir) / name
        if not f.is_file() or (name in sizes and f.stat().st_size != sizes[name]):
            bad.append(name)
    return bad


def ensure_replaceable(out: Path) -> None:
    """A build replaces ``out`` whole: only a missing or empty directory, or a cache holding
    nothing but its own files, may go, and never the working directory or one above it. Any
    ``manifest.json`` is not enough (other tools write one too): it must carry the fields the
    writer records, and list every file in ``out``."""
    out = Path(out)
    here = Path.cwd().resolve()
    if out.exists() and out.resolve() in (here, *here.parents):
        raise EclipError(f"{out}: is the working directory or holds it, and a build replaces --out whole; "
                         f"name a folder inside it (--out {os.path.join(str(out), 'cache')})")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    m = (read_manifest(out) if out.is_dir() else None) or {}
    files = m.get("files")
    # any format version: an older cache is still ours to replace
    if (not isinstance(m.get("format_version"), int) or not isinstance(m.get("fingerprint"), str)
            or not isinstance(files, list) or not all(isinstance(f, str) for f in files)):
        raise EclipError(f"{out}: exists and is not a cache; refusing to replace it (choose another --out)")
    foreign = sorted(set(os.listdir(out)) - set(files) - {"manifest.json"})
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise EclipError(f"{out}: holds {foreign[0]!r}{more}, which is not part of the cache; refusing to "
                         "replace it (move it elsewhere or choose another --out)")


def out_in_cache_error(out: Path, data: Path) -> str | None:
    """Why the run directory ``out`` may not be used with the prepared cache ``data``: it is
    the cache or lies inside it (checkpoints and logs among its files, which ``eclip.prepare``
    then refuses to replace); None otherwise, and when either path cannot be resolved (a link
    loop, no permission): the run directory's own errors follow."""
    try:
        inside = (Path(data) / "manifest.json").is_file() and Path(out).resolve().is_relative_to(Path(data).resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop, before Python 3.13
        return None
    return f"--out {out}: lies inside the cache --data {data}; give a run directory outside it" if inside else None


def build_lock(out: Path):
    """Hold ``.NAME.lock`` beside ``out`` (``eclip.fileio.exclusive``) for a build: one build
    of a cache at a time, and ``recover`` only where no build is under way, whatever host or
    PID namespace runs it. Re-entrant within a process (``eclip.prepare`` holds it around
    the check that a cache is current and the ``CacheWriter`` that replaces it). EclipError
    when another process holds it."""
    return exclusive(out, "another build of this cache")


LEFTOVER = {"tmp": r"\.{name}\.tmp-\d+-.+", "old": r"\.{name}\.old-\d+"}  # what a build writes beside out


def recover(out: Path) -> None:
    """Clean up after a build killed before it could (``kill -9``, a power cut), under
    ``build_lock`` (so no build is under way): its temporary sibling ``.NAME.tmp-PID-*`` (a
    whole cache's size) is removed, and a previous cache it had moved aside to
    ``.NAME.old-PID`` is put back when no cache came in its place (a new one complete in
    its temporary folder is removed all the same: it was never committed), or removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    patterns = {kind: re.compile(rx.format(name=re.escape(out.name))) for kind, rx in LEFTOVER.items()}
    for entry in sorted(out.parent.iterdir()):
        kind = next((k for k, rx in patterns.items() if rx.fullmatch(entry.name)), None)
        if kind == "old" and not out.exists() and not out.is_symlink() and (
                entry.is_symlink() or (entry / "manifest.json").is_file()):
            os.replace(entry, out)  # moved aside, and the new one never came: back (a link as a link)
        elif kind is not None and entry.is_symlink():
            entry.unlink()
        elif kind is not None and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


class CacheWriter:
    """Builds a cache in a temporary sibling of ``out`` and renames it into place on commit.

    Use as a context manager: leaving the block with an exception (or a Ctrl-C) removes the
    temporary directory and leaves any previous cache at ``out`` untouched; what a killed
    build left is cleaned up by the next (``recover``).
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.files: list[str] = []
        self.tmp: Path | None = None
        self.lock = contextlib.ExitStack()

    def __enter__(self) -> CacheWriter:
        with contextlib.ExitStack() as stack:
            stack.enter_context(build_lock(self.out))
            recover(self.out)
            ensure_replaceable(self.out)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent))
            self.lock = stack.pop_all()  # held until the block ends
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.tmp is not None and self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self.lock.close()

    def path(self, name: str) -> Path:
        assert self.tmp is not None
        self.files.append(name)
        return self.tmp / name

    def save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(self.path(name)))

    def write_jsonl(self, name: str, rows) -> None:
        with open(self.path(name), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def commit(self, manifest: dict) -> None:
        """Write the manifest last, then swap the directory into place."""
        assert self.tmp is not None
        manifest = dict(manifest, format_version=FORMAT_VERSION, files=sorted(self.files),
                        sizes={name: (self.tmp / name).stat().st_size for name in sorted(self.files)})
        with open(self.tmp / "manifest.json", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it private; a cache is not
        for name in [*self.files, "manifest.json"]:  # nor its files (safetensors writes them 0600)
            os.chmod(self.tmp / name, 0o666 & ~umask)
        old = None
        if self.out.exists() or self.out.is_symlink():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        self.tmp = None
        if old is not None and old.is_symlink():  # --out was a link: rmtree would leave it there
            old.unlink()
        elif old is not None:
            shutil.rmtree(old, ignore_errors=True)


@dataclass
class Cache:
    """A loaded cache: CPU tensors plus the manifest. ``.to(device)`` moves the tensors."""

    path: Path
    manifest: dict
    images: torch.Tensor  # uint8 [N, 3, R, R]
    tokens: torch.Tensor  # int32 [C, L]
    lengths: torch.Tensor  # int32 [C]
    caption_image: torch.Tensor  # int64 [C]
    region_boxes: torch.Tensor  # float32 [G, 4]
    region_image: torch.Tensor  # int64 [G]
    region_tokens: torch.Tensor  # int32 [G, Lp]
    region_lengths: torch.Tensor  # int32 [G]
    split: torch.Tensor  # int8 [N]
    fold: torch.Tensor  # int8 [N]
    rows: torch.Tensor | None = None  # int64 [N]: the file's image rows kept by subset(); None: all

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def context_length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def split_images(self, name: str) -> torch.Tensor:
        """Image rows of a split ("train", "val" or "test"), int64 [n]."""
        return torch.nonzero(self.split == SPLITS.index(name)).flatten()

    def subset(self, rows: torch.Tensor) -> Cache:
        """A cache of image ``rows`` only (int64, ascending), with their captions and regions,
        re-indexed from 0: what a process holds when it must not see the other images. Built
        from copies, so the full tensors are freed once the caller drops them."""
        rows = rows.to(torch.int64)
        if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            raise ValueError("Cache.subset: rows must be strictly ascending")
        new = torch.full((self.images.shape[0],), -1, dtype=torch.int64)
        new[rows] = torch.arange(rows.numel())
        cap = torch.nonzero(new[self.caption_image] >= 0).flatten()  # stays grouped by image
        reg = torch.nonzero(new[self.region_image] >= 0).flatten()
        kept = rows if self.rows is None else self.rows[rows]
        return Cache(path=self.path, manifest=self.manifest, images=self.images[rows].clone(),
                     tokens=self.tokens[cap].clone(), lengths=self.lengths[cap].clone(),
                     caption_image=new[self.caption_image[cap]], region_boxes=self.region_boxes[reg].clone(),
                     region_image=new[self.region_image[reg]], region_tokens=self.region_tokens[reg].clone(),
                     region_lengths=self.region_lengths[reg].clone(), split=self.split[rows].clone(),
                     fold=self.fold[rows].clone(), rows=kept)


def load_cache(path: str | Path) -> Cache:
    """Load a complete cache written by ``eclip.prepare``; one-line errors otherwise."""
    path = Path(path)
    hint = f"run: python -m eclip.prepare --out {path} ..."
    if not path.is_dir():
        raise EclipError(f"{path}: no such cache directory ({hint})")
    m = read_manifest(path)
    if m is None:
        raise EclipError(f"{path}: not a prepared cache, manifest.json missing or unreadable ({hint})")
    if m.get("format_version") != FORMAT_VERSION:
        raise EclipError(f"{path}/manifest.json: cache format version {m.get('format_version')}, "
                         f"this code reads version {FORMAT_VERSION}; rebuild it ({hint})")
    for name in damaged_files(path, m):
        what = ("lists its files and sizes in a form this code cannot read" if name == "manifest.json" else
                "has another size than when it was built" if (path / name).is_file() else "missing from the cache")
        raise EclipError(f"{path}/{name}: {what}; rebuild it ({hint})")
    stored = read_tensors(path / "images.safetensors", f"rebuild the cache ({hint})")
    if "images" not in stored:
        raise EclipError(f"{path}/images.safetensors: missing tensor images; rebuild it ({hint})")
    ann = read_tensors(path / "annotations.safetensors", f"rebuild the cache ({hint})")
    missing = [k for k in ANNOTATION_KEYS if k not in ann]
    if missing:
        raise EclipError(f"{path}/annotations.safetensors: missing tensors {', '.join(missing)}")
    check_layout(path, m, stored["images"], ann)
    return Cache(path=path, manifest=m, images=stored["images"], **{k: ann[k] for k in ANNOTATION_KEYS})


# the annotations' dtypes and shapes (N images, C captions, G regions; None: any length)
LAYOUT = {"tokens": (torch.int32, ("C", None)), "lengths": (torch.int32, ("C",)),
          "caption_image": (torch.int64, ("C",)), "region_boxes": (torch.float32, ("G", 4)),
          "region_image": (torch.int64, ("G",)), "region_tokens": (torch.int32, ("G", None)),
          "region_lengths": (torch.int32, ("G",)), "split": (torch.int8, ("N",)), "fold": (torch.int8, ("N",))}


def check_layout(path: Path, m: dict, images: torch.Tensor, ann: dict[str, torch.Tensor]) -> None:
    """One-line errors for a cache whose tensors break the layout above (a cache written by
    other tools, or edited): a wrong dtype or shape, an image row, a split or a token id out
    of range, would otherwise fail inside training with a traceback, or silently index
    another image (a negative row) and train on the wrong pairs."""
    def bad(name: str, problem: str) -> EclipError:
        where = "images.safetensors" if name == "images" else "annotations.safetensors"
        return EclipError(f"{path}/{where}: {name} {problem}; rebuild the cache")

    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise bad("images", f"is {images.dtype} {list(images.shape)}, not uint8 [N, 3, R, R]")
    sizes = {"N": images.shape[0], "C": ann["tokens"].shape[0] if ann["tokens"].dim() else -1,
             "G": ann["region_boxes"].shape[0] if ann["region_boxes"].dim() else -1}
    for name, (dtype, dims) in LAYOUT.items():
        t = ann[name]
        want = [sizes.get(d, d) for d in dims]
        if t.dtype != dtype or t.dim() != len(dims) or any(w is not None and w != n for w, n in zip(want, t.shape, strict=True)):
            shown = ", ".join("?" if d is None else str(d) for d in dims)
            raise bad(name, f"is {t.dtype} {list(t.shape)}, not {str(dtype).removeprefix('torch.')} [{shown}] "
                            f"(N={sizes['N']} images, C={sizes['C']} captions, G={sizes['G']} regions)")
    vocab = (m.get("tokenizer") or {}).get("vocab_size") if isinstance(m.get("tokenizer"), dict) else None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise EclipError(f"{path}/manifest.json: tokenizer.vocab_size is {vocab!r}, not a positive integer; "
                         "rebuild the cache")
    ranges = {"caption_image": (0, sizes["N"] - 1), "region_image": (0, sizes["N"] - 1),
              "split": (0, len(SPLITS) - 1), "fold": (-1, int(np.iinfo(np.int8).max)),
              "tokens": (0, vocab - 1), "region_tokens": (0, vocab - 1),
              "lengths": (0, ann["tokens"].shape[1]), "region_lengths": (0, ann["region_tokens"].shape[1])}
    for name, (low, high) in ranges.items():
        t = ann[name]
        if t.numel() and (int(t.min()) < low or int(t.max()) > high):
            raise bad(name, f"holds values in {int(t.min())}..{int(t.max())}, outside {low}..{high}")
    if ann["region_boxes"].numel() and not bool(torch.isfinite(ann["region_boxes"]).all()):
        raise bad("region_boxes", "holds values that are not finite")
    # lengths say how many leading tokens are real, and the rest is padding (id 0): training trims
    # captions by lengths, the mask and the evaluation by the tokens that are not 0, so a cache
    # where they disagree trained on other text than it was scored on (lengths of 0: on nothing)
    for toks, lens in (("tokens", "lengths"), ("region_tokens", "region_lengths")):
        t, n = ann[toks], ann[lens]
        for start in range(0, t.shape[0], 1 << 16):  # in chunks: a bool [C, L] of a large cache at once is GBs
            chunk, want = t[start:start + (1 << 16)], n[start:start + (1 << 16)].to(torch.int64)
            wrong = ((chunk != 0) != (torch.arange(t.shape[1]) < want[:, None])).any(1)  # [rows]
            if bool(wrong.any()):
                row = start + int(torch.nonzero(wrong)[0, 0])
                raise bad(lens, f"disagrees with {toks} at row {row} ({int(want[row - start])} where the row "
                                f"holds {int((chunk[row - start] != 0).sum())} tokens before its padding, or "
                                "padding between them)")
    for name in ("caption_image", "region_image"):  # grouped by image: what the records' order assumes
        t = ann[name]
        if t.numel() > 1 and not bool((t[1:] >= t[:-1]).all()):
            at = int(torch.nonzero(t[1:] < t[:-1])[0, 0]) + 1
            raise bad(name, f"is not grouped by image (entry {at} names image {int(t[at])} after image {int(t[at - 1])})")
    # an image without a caption: training drew a neighbour's caption for it (a wrong pair,
    # silently), and the evaluation failed after the whole budget
    missing = torch.nonzero(torch.bincount(ann["caption_image"], minlength=sizes["N"]) == 0).flatten()
    if missing.numel():
        raise bad("caption_image", f"leaves {missing.numel()} image(s) without a caption (first: image "
                                   f"{int(missing[0])})")


def write_subset(cache: Cache, rows: torch.Tensor, out: str | Path) -> None:
    """Write a cache at ``out`` holding only image ``rows`` of ``cache`` (int64, ascending)
    with their captions, regions and records, under the same fingerprint: what an isolated
    training process (``eclip.harness run --isolate``) is given in place of the whole cache,
    whose held-out splits it must not be able to read. ``subset_of`` in its manifest names
    the cache it came from."""
    sub = cache.subset(rows)
    records = cache.path / "records.jsonl"
    lines = None
    if records.is_file():  # one JSON line per image, in the cache's order; copied as they are
        with open(records, encoding="utf-8") as f:
            all_lines = [line for line in f if line.strip()]
        if len(all_lines) == cache.images.shape[0]:
            lines = [all_lines[i] for i in rows.tolist()]
    kept = {k: v for k, v in cache.manifest.items() if k not in ("files", "sizes", "format_version")}
    with CacheWriter(out) as w:
        w.save_arrays("images.safetensors", {"images": sub.images.numpy()})
        w.save_arrays("annotations.safetensors", {k: getattr(sub, k).numpy() for k in ANNOTATION_KEYS})
        if cache.tokenizer_path.is_file():  # a cache written by other tools may have none
            shutil.copyfile(cache.tokenizer_path, w.path("tokenizer.json"))
        if lines is not None:
            with open(w.path("records.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(line if line.endswith("\n") else line + "\n" for line in lines)
        w.commit(dict(kept, subset_of=str(cache.path), subset_images=int(rows.numel())))
