"""Readers for real datasets: Ukiyo-eVG's ODVG JSONL and plain CSV/TSV/JSONL manifests.

Each reader turns its files into :class:`Record` s, one per image, with every caption and
region of that image, and the place (``FILE:LINE``) where it was defined, so that a problem
found later (a truncated image, a box outside the picture) can still be reported there.

Problems are raised as :class:`DataError`; with ``skip_bad`` they go to a list instead and
the offending row (or image) is dropped.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from eclip.errors import DataError

IMAGE_COLUMNS = ("image", "filepath", "file_name", "filename", "path", "image_path")
CAPTION_COLUMNS = ("caption", "text", "title")
REGION_COLUMNS = ("regions",)
SPLIT_COLUMNS = ("split",)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
# bump when reading a source changes its records, so caches rebuild (2: images keyed by the
# file they name, TSV split at tabs, a region kept while a row that gave it stays; 3: a
# manifest's random split drawn per image from a hash of its path, eclip.prepare.split_draw)
READ_VERSION = 3


class Region(NamedTuple):
    box: list[float]  # pixel box [x1, y1, x2, y2] (empty for synthetic scenes: they draw their own)
    phrase: str
    where: str = ""  # "FILE:LINE" of the row that gave it: a box found bad at decoding is reported there
    index: int = 0  # its place among that row's regions, as messages number it ("region 2")
    also: tuple[tuple[str, int], ...] = ()  # (where, index) of the image's later rows that repeated it

    def givers(self) -> list[tuple[str, int]]:
        """(where, index) of every row of the image that gave this region, first row first."""
        return [(self.where, self.index), *self.also]


@dataclass
class Record:
    image: str  # image path as written in the source (relative to the images directory)
    captions: list[str]  # one or more captions of this image
    regions: list[Region] = field(default_factory=list)
    split: str | None = None  # "train" / "val" / "test" when the source decides
    where: str = ""  # "FILE:LINE" of the row that introduced the image
    scene: object = None  # a synthetic.Scene to draw instead of decoding a file
    caption_where: list[str] = field(default_factory=list)  # "FILE:LINE" of each caption

    def __post_init__(self):
        if not self.caption_where:  # captions given with the record come from its first row
            self.caption_where = [self.where] * len(self.captions)

    def drop_rows(self, lines) -> list[bool]:
        """Forget the captions and regions that came from the rows at ``lines`` (with
        ``--skip-bad``, a row with a box outside the image goes; the image's other rows stay).
        Returns which of the regions were kept, in their order."""
        kept = [(c, w) for c, w in zip(self.captions, self.caption_where, strict=True) if w not in lines]
        self.captions = [c for c, _ in kept]
        self.caption_where = [w for _, w in kept]
        # a region stays while a row that gave it stays, credited to the first of those
        keep, regions = [], []
        for r in self.regions:
            alive = [(w, i) for w, i in r.givers() if w not in lines]
            keep.append(bool(alive))
            if alive:
                regions.append(r._replace(where=alive[0][0], index=alive[0][1], also=tuple(alive[1:])))
        self.regions = regions
        return keep


class Problems:
    """Collects errors: raises the first one, or records it when skipping bad rows."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.skipped: list[dict] = []

    def report(self, err: DataError) -> None:
        if not self.skip_bad:
            raise err
        self.skipped.append(err.to_json())


def json_row(where: str, text: str):
    """``text`` parsed as JSON, any failure a DataError at ``where``: besides malformed JSON,
    a number of over 4,300 digits (Python's limit on int parsing) and nesting too deep for
    the parser are valid JSON that ``json.loads`` refuses with other errors."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(where, f"malformed JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise DataError(where, f"unreadable JSON ({str(e).split(';')[0]})") from None
    except RecursionError:
        raise DataError(where, "unreadable JSON (nested too deeply)") from None


def _check_text(where: str, text: str, what: str) -> str:
    """``text`` (a caption, a phrase) if UTF-8 can hold it: a lone surrogate (a JSON escape
    of half an emoji, cut by a scraper) cannot be tokenized or written."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(where, f"{what} holds a lone surrogate ({text[e.start]!r} at character {e.start + 1}), "
                               "which is no UTF-8 text") from None
    return text


def _check_caption(where: str, caption) -> str:
    if not isinstance(caption, str):
        raise DataError(where, f"caption is {type(caption).__name__} {caption!r}, not text")
    if not caption.strip():
        raise DataError(where, "empty caption")
    return _check_text(where, caption.strip(), "caption")


def _finite(v) -> bool:
    """Whether ``v`` is a finite number (not a bool); an int too large for a float is not."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int of 400 digits
        return False


def parse_regions(where: str, regions) -> list[Region]:
    """Validate a list of ``{"bbox": [x1, y1, x2, y2], "phrase": str}`` in pixels."""
    if regions is None:
        return []
    if not isinstance(regions, list):
        raise DataError(where, "regions must be a list of {bbox, phrase}")
    out = []
    for k, reg in enumerate(regions):
        if not isinstance(reg, dict):
            raise DataError(where, f"region {k}: must be an object with bbox and phrase")
        box, phrase = reg.get("bbox"), reg.get("phrase")
        if (not isinstance(box, list) or len(box) != 4
                or not all(_finite(v) for v in box)):
            raise DataError(where, f"region {k}: bbox must be four finite numbers [x1, y1, x2, y2], got "
                                   f"{repr(box)[:200]}")
        x1, y1, x2, y2 = (float(v) for v in box)
        if x2 <= x1 or y2 <= y1:
            raise DataError(where, f"region {k}: bbox {box} has x2<=x1 or y2<=y1")
        if x1 < 0 or y1 < 0:
            raise DataError(where, f"region {k}: bbox {box} lies outside the image (negative coordinate)")
        if not isinstance(phrase, str):
            raise DataError(where, f"region {k}: " + ("missing phrase" if phrase is None
                                                       else f"phrase must be text, got {phrase!r}"))
        if not phrase.strip():
            raise DataError(where, f"region {k}: empty phrase")
        out.append(Region([x1, y1, x2, y2], _check_text(where, phrase.strip(), f"region {k}: phrase"), where, k))
    return out


def resolve_image(images_dir: Path, name: str) -> Path:
    """An image path as written in a source: absolute, or relative to the images directory."""
    return Path(name) if Path(name).is_absolute() else images_dir / name


def image_key(images_dir: Path, name: str) -> str:
    """The file an image path names, for telling images apart: ``0.png``, ``./0.png`` and
    ``sub/../0.png`` (or a link to it) are one image, which must never land in two splits."""
    return str(resolve_image(images_dir, name).resolve())


def check_image_path(where: str, images_dir: Path, name: str) -> Path:
    if "\0" in name:  # is_file() says False, resolve() raises ValueError
        raise DataError(where, f"image path holds a NUL character: {name[:80]!r}")
    _check_text(where, name, "image path")
    path = resolve_image(images_dir, name)
    try:
        found = path.is_file()
    except OSError as e:  # a name too long for the file system (a caption in the image column, say)
        raise DataError(where, f"image path unusable ({e.strerror or e}): {name[:80]!r}") from None
    if not found:
        raise DataError(where, f"image not found: {str(path)[-300:]}")
    return path


def read_odvg(path: Path, split: str, images_dir: Path, problems: Problems,
              seen: dict[str, tuple[str, str]]) -> list[Record]:
    """Ukiyo-eVG's ODVG JSONL: one image per line with ``filename``, ``grounding.caption`` and
    ``grounding.regions[].{bbox, phrase}``. ``seen`` maps images (``image_key``) to where
    they first appeared and their name there, across all split files, to refuse duplicates."""
    records = []
    _check_utf8(path)
    with open(path, encoding="utf-8-sig") as f:  # -sig: as the manifests, a leading BOM is no part of line 1
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json_row(where, line)
                if not isinstance(row, dict):
                    raise DataError(where, "expected a JSON object")
                name = row.get("filename")
                if not isinstance(name, str) or not name:
                    raise DataError(where, "missing field 'filename'" if name is None else
                                    f"field 'filename' must be a non-empty path, got {name!r}")
                grounding = row.get("grounding")
                if not isinstance(grounding, dict):
                    raise DataError(where, "missing field 'grounding'" if grounding is None else
                                    f"field 'grounding' must be an object, got {type(grounding).__name__}")
                caption = _check_caption(where, grounding.get("caption"))
                regions = parse_regions(where, grounding.get("regions"))
                check_image_path(where, images_dir, name)
                key = image_key(images_dir, name)
                if key in seen:
                    first_where, first = seen[key]
                    same = "" if first == name else f", the same file as {first!r}"
                    raise DataError(where, f"duplicate id {name!r} (first at {first_where}{same})")
            except DataError as e:
                problems.report(e)
                continue
            seen[key] = (where, name)
            records.append(Record(image=name, captions=[caption], regions=regions, split=split, where=where))
    return records


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str,
          where: str, required: bool) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(where, f"no {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    for cand in candidates:
        found = [c for c in columns if c.lower() == cand]
        if len(found) > 1:  # "Image" and "image": which one is meant?
            raise DataError(where, f"columns {found[0]!r} and {found[1]!r} could both be the {what} column; "
                                   f"name one with --{what}-column")
        if found:
            return found[0]
    if required:
        raise DataError(where, f"no {what} column found among {', '.join(columns)} "
                        f"(looked for {', '.join(candidates)}; name one with --{what}-column)")
    return None


def _check_utf8(path: Path) -> None:
    """A text input that is not UTF-8 (a Latin-1 export, say) is named by file and line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(str(path), f"unreadable ({e.strerror or e})") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}", f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); "
                                          "save the file as UTF-8") from None


class _TsvReader:
    """Rows of a TSV file as ``csv.reader`` gives them (with its ``line_num``), by the TSV
    convention: one row a line, fields split at every tab, so a quote never joins lines or
    hides a tab. A field wholly in double quotes, as spreadsheet and pandas exports write a
    field holding a quote, is unquoted ("" inside is one quote); any other quote is text
    (a caption may start with one: ``"Stop" sign on a road``)."""

    def __init__(self, f):
        self.lines = iter(f)
        self.line_num = 0

    def __iter__(self):
        return self

    def __next__(self) -> list[str]:
        line = next(self.lines)
        self.line_num += 1
        return [_unquote(v) for v in line.rstrip("\r\n").split("\t")]


def _unquote(field: str) -> str:
    """``field`` without its wrapping quotes when it is one quoted field (every quote inside
    doubled), else as written: ``"Stop" or "Go"`` is text that starts and ends with a quote."""
    inner = field[1:-1]
    if len(field) >= 2 and field[0] == field[-1] == '"' and '"' not in inner.replace('""', ""):
        return inner.replace('""', '"')
    return field


def _manifest_rows(path: Path, wanted: frozenset[str] = frozenset()):
    """Yield ``(line, dict)`` for each row of a CSV, TSV or JSONL manifest, or ``(line,
    DataError)`` for a row that cannot be read."""
    _check_utf8(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        with open(path, encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json_row(f"{path}:{lineno}", line)
                except DataError as e:
                    yield lineno, e
                    continue
                if not isinstance(row, dict):
                    yield lineno, DataError(f"{path}:{lineno}", "expected a JSON object")
                    continue
                yield lineno, row
        return
    if suffix not in (".csv", ".tsv", ".txt"):
        raise DataError(str(path), f"unknown manifest format {suffix!r} (use .csv, .tsv or .jsonl)")
    limit = csv.field_size_limit(FIELD_CHARS)  # a caption of 200 KB is valid CSV: 128 KB was the limit
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            yield from _csv_rows(path, _TsvReader(f) if suffix == ".tsv" else csv.reader(f, strict=True), wanted)
    finally:
        csv.field_size_limit(limit)


FIELD_CHARS = 1 << 30  # the longest CSV field read (csv's own default: 131,072 characters)


def _csv_rows(path: Path, reader, wanted: frozenset[str]):
    """``_manifest_rows`` of a CSV or TSV file's ``reader``. ``wanted``: the column names
    (lower case) the build may read, which the header must not repeat."""
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(str(path), "empty manifest") from None
    except csv.Error as e:
        raise DataError(f"{path}:1", f"malformed header ({e})") from None
    # a dict of the row would keep the last such column's value, unsaid; a repeat of another
    # name (a spreadsheet's blank columns, "image,caption,,") is no matter
    repeated = sorted({c for c in header if header.count(c) > 1 and c.lower() in wanted})
    if repeated:
        raise DataError(f"{path}:1", f"column {repeated[0]!r} appears more than once in the header")
    while True:
        start = reader.line_num + 1  # a quoted field may span lines: name the row's first
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            # never skipped (--skip-bad): the reader goes on at the next line, which may lie
            # inside a quoted field, and would make rows of a caption's text
            raise DataError(f"{path}:{start}", f"malformed CSV row ({e}); the rows after it cannot be read "
                                               "reliably, so it cannot be skipped") from None
        if not values or values == [""]:
            continue
        if len(values) != len(header):
            yield start, DataError(
                f"{path}:{start}",
                f"malformed row: expected {len(header)} fields, found {len(values)}")
            continue
        yield start, dict(zip(header, values, strict=True))


def read_manifest_file(path: Path, images_dir: Path, problems: Problems,
                       image_column: str | None = None, caption_column: str | None = None,
                       regions_column: str | None = None) -> tuple[list[Record], dict]:
    """An OpenCLIP-style manifest: one row per (image, caption). Rows of one image (COCO and
    Flickr list several captions each) are grouped into one record. Returns the records and
    the columns used."""
    by_image: dict[str, Record] = {}
    cols: dict | None = None
    wanted = frozenset(c.lower() for c in (*IMAGE_COLUMNS, *CAPTION_COLUMNS, *REGION_COLUMNS, *SPLIT_COLUMNS,
                                           image_column or "", caption_column or "", regions_column or "") if c)
    rows = _manifest_rows(path, wanted)
    names = None  # CSV/TSV: every row has the header's columns, so the first row tells them
    if path.suffix.lower() in JSONL_SUFFIXES:
        # JSON rows need not share keys: a "split" or "regions" that row 1 leaves out may be
        # in row 9, so the columns are looked for among the keys of every row.
        rows = list(rows)
        names = list(dict.fromkeys(k for _, row in rows if isinstance(row, dict) for k in row))
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        if isinstance(row, DataError):
            problems.report(row)
            continue
        if cols is None:  # outside the try: a missing column is wrong for every row, never skipped
            names = names if names is not None else list(row.keys())
            cols = {
                "image": _pick(names, image_column, IMAGE_COLUMNS, "image", where, True),
                "caption": _pick(names, caption_column, CAPTION_COLUMNS, "caption", where, True),
                "regions": _pick(names, regions_column, REGION_COLUMNS, "regions", where, False),
                "split": _pick(names, None, SPLIT_COLUMNS, "split", where, False),
            }
        try:
            for key in ("image", "caption"):
                if cols[key] not in row:  # only a JSON row can lack a column
                    raise DataError(where, f"missing field {cols[key]!r}")
            name = row[cols["image"]]
            if not isinstance(name, str) or not name.strip():
                raise DataError(where, f"empty image path in column {cols['image']!r}")
            name = name.strip()
            caption = _check_caption(where, row[cols["caption"]])
            regions = []
            if cols["regions"] and row.get(cols["regions"]) not in (None, ""):
                raw = row[cols["regions"]]
                if isinstance(raw, str):
                    try:
                        raw = json_row(where, raw)
                    except DataError as e:
                        raise DataError(where, f"regions column: {e.problem}") from None
                regions = parse_regions(where, raw)
            split = None
            if cols["split"] and row.get(cols["split"]) is not None:  # JSON null: no split, like ""
                split = str(row[cols["split"]]).strip().lower() or None
                if split not in (None, "train", "val", "test"):
                    raise DataError(where, f"unknown split {split!r} (use train, val or test)")
            check_image_path(where, images_dir, name)  # first: a name image_key cannot resolve is refused here
            key = image_key(images_dir, name)
            rec = by_image.get(key)
            if rec is None:
                by_image[key] = Record(image=name, captions=[caption], regions=regions, split=split, where=where)
            else:
                if split is not None and rec.split is not None and split != rec.split:
                    same = "" if rec.image == name else f" (the same file as {rec.image!r})"
                    raise DataError(where, f"image {name!r}{same} is in split {rec.split!r} at {rec.where}, "
                                    f"here in {split!r}")
                if rec.split is None:
                    rec.split = split
                rec.captions.append(caption)
                rec.caption_where.append(where)
                # rows of one image often repeat its regions: keep one of each (box, phrase),
                # credited to the first row that gave it, with the later rows noted (a row
                # dropped with --skip-bad takes a region along only if no other row gave it)
                have = {(tuple(r.box), r.phrase): k for k, r in enumerate(rec.regions)}
                for r in regions:
                    same = (tuple(r.box), r.phrase)
                    k = have.get(same)
                    if k is None:
                        have[same] = len(rec.regions)
                        rec.regions.append(r)
                    else:
                        rec.regions[k] = rec.regions[k]._replace(also=(*rec.regions[k].also, (r.where, r.index)))
        except DataError as e:
            problems.report(e)
    if cols is None:
        raise DataError(str(path), "manifest has no rows")
    return list(by_image.values()), cols
