"""``eclip.data.cache.load_cache`` on caches whose tensors break the documented layout (a
cache written by other tools, or edited by hand): one line naming the file and the tensor,
never a traceback inside training, and never a silent read of the wrong rows."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from eclip.data.cache import load_cache, read_manifest
from eclip.errors import EclipError


def tampered(small_cache, tmp_path, file: str, change) -> object:
    """A copy of ``small_cache`` whose ``file`` (a safetensors name, or the manifest) went
    through ``change``, its recorded size kept in step (so only the layout check can tell)."""
    out = tmp_path / "c"
    shutil.copytree(small_cache, out)
    m = read_manifest(out)
    if file == "manifest.json":
        change(m)
    else:
        arrays = load_file(str(out / file))
        change(arrays)
        save_file(arrays, str(out / file))
        m["sizes"][file] = (out / file).stat().st_size
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def negative_row(a):
    a["caption_image"][3] = -1  # indexed the last image, silently: its caption paired with another picture


def token_past_vocab(a):
    a["tokens"][0, 1] = 10**6


def short_split(a):
    a["split"] = a["split"][:-5]


def float_images(a):
    a["images"] = a["images"].astype(np.float32)


def one_channel(a):
    a["images"] = a["images"][:, :1]


def renamed(a):
    a["pixels"] = a.pop("images")


def nan_box(a):
    a["region_boxes"][0, 0] = np.nan


def split_three(a):
    a["split"][0] = 3


def uncaptioned(a):
    # image 0's captions handed to image 1: training drew a neighbour's caption for image 0,
    # and a scored split with it failed in the evaluation, after the whole budget
    ci = a["caption_image"]
    ci[ci == 0] = 1


def captions_interleaved(a):
    # the records list each image's captions together; a cache in another order paired an
    # HF tower's retokenized captions with the wrong images
    ci = a["caption_image"]
    ci[0], ci[-1] = ci[-1], ci[0]


def lengths_zeroed(a):
    # training trimmed every caption to its <bos> by lengths; the evaluation read the tokens
    a["lengths"][:] = 0


def phrase_gap(a):
    a["region_tokens"][0, 1] = 0  # padding inside a phrase


def regions_interleaved(a):
    ri = a["region_image"]
    ri[0], ri[-1] = ri[-1], ri[0]


@pytest.mark.parametrize("file,change,message", [
    ("annotations.safetensors", negative_row, "annotations.safetensors: caption_image holds values in -1..379, "
                                              "outside 0..379; rebuild the cache"),
    ("annotations.safetensors", token_past_vocab, "annotations.safetensors: tokens holds values in 0..1000000, "
                                                  "outside 0.."),  # the embedding's IndexError in the first step
    ("annotations.safetensors", short_split, "annotations.safetensors: split is torch.int8 [375], not int8 [N] "
                                             "(N=380 images"),
    ("annotations.safetensors", nan_box, "annotations.safetensors: region_boxes holds values that are not finite"),
    ("annotations.safetensors", split_three, "annotations.safetensors: split holds values in 0..3, outside 0..2"),
    ("annotations.safetensors", uncaptioned, "annotations.safetensors: caption_image leaves 1 image(s) without a "
                                             "caption (first: image 0); rebuild the cache"),
    ("annotations.safetensors", captions_interleaved, "annotations.safetensors: caption_image is not grouped by "
                                                      "image (entry 1 names image 1 after image 379)"),
    ("annotations.safetensors", lengths_zeroed, "annotations.safetensors: lengths disagrees with tokens at row 0 "
                                                "(0 where the row holds"),
    ("annotations.safetensors", phrase_gap, "annotations.safetensors: region_lengths disagrees with region_tokens "
                                            "at row 0"),
    ("annotations.safetensors", regions_interleaved, "annotations.safetensors: region_image is not grouped by image "
                                                     "(entry 1 names image"),
    ("images.safetensors", float_images, "images.safetensors: images is torch.float32 [380, 3, 64, 64], "
                                         "not uint8 [N, 3, R, R]"),
    ("images.safetensors", one_channel, "images.safetensors: images is torch.uint8 [380, 1, 64, 64]"),
    ("images.safetensors", renamed, "images.safetensors: missing tensor images"),
    ("manifest.json", lambda m: m["tokenizer"].update(vocab_size="abc"),
     "manifest.json: tokenizer.vocab_size is 'abc', not a positive integer"),
    ("manifest.json", lambda m: m.pop("tokenizer"), "manifest.json: tokenizer.vocab_size is None"),
    # a string: its characters were taken for file names ("c/i: missing from the cache")
    ("manifest.json", lambda m: m.update(files="images.safetensors"),
     "manifest.json: lists its files and sizes in a form this code cannot read; rebuild it"),
], ids=["negative image row", "token past the vocabulary", "split too short", "NaN box", "split id 3",
        "an image without a caption", "captions not grouped", "lengths zeroed", "a gap in a phrase", "regions not grouped",
        "float images", "one channel", "images renamed", "vocab size no number", "no tokenizer", "files a string"])
def test_a_cache_off_its_layout_is_refused_in_one_line(small_cache, tmp_path, file, change, message):
    out = tampered(small_cache, tmp_path, file, change)
    with pytest.raises(EclipError) as e:
        load_cache(out)
    assert message in str(e.value) and str(e.value).startswith(str(out)) and "\n" not in str(e.value)


def test_the_cache_as_built_passes(small_cache):
    cache = load_cache(small_cache)
    assert tuple(cache.images.shape) == (380, 3, 64, 64)
    assert int(cache.tokens.max()) < cache.vocab_size == read_manifest(small_cache)["tokenizer"]["vocab_size"]
