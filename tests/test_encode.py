"""``python -m eclip.encode``: a checkpoint's embeddings in a process of their own, and the
harness's evaluation through it (secretly ordered inputs, ranked by the harness)."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from eclip import encode, harness_eval, scoring, train
from eclip.data.cache import load_cache

# A small model set by overrides only: the template recipe builds it again in the encoding
# process just from the hyperparameters the checkpoint recorded.
SMALL = ["--model.vision.width=64", "--model.vision.depth=1", "--model.text.width=64", "--model.text.depth=1",
         "--model.embed_dim=32"]


@pytest.fixture(scope="module")
def run(small_cache, tmp_path_factory):
    """A 3-step run on the small cache, evaluated in its own process (eclip.train by hand)."""
    out = tmp_path_factory.mktemp("encode") / "run"
    assert train.main(["--data", str(small_cache), "--out", str(out), "--steps", "3", "--device", "cpu", *SMALL]) == 0
    return out


def inputs_of(cache_dir: Path, path: Path, split: str = "val", **spec_changes) -> Path:
    cache = load_cache(cache_dir)
    cache = cache.subset(cache.split_images(split))
    spec = {"vocab_size": cache.vocab_size, "context_length": cache.context_length,
            "phrase_length": int(cache.region_tokens.shape[1]), "image_size": cache.image_size} | spec_changes
    encode.write_inputs(path, cache.images, cache.tokens, spec)
    return path


def test_the_harness_scores_the_saved_checkpoint_as_the_run_itself_did(run, small_cache):
    by_hand = json.loads((run / "result.json").read_text())
    assert by_hand["metrics"] is not None and by_hand["eval_s"] > 0 and "ranked_by" not in by_hand
    args = SimpleNamespace(out=run, data=small_cache, final=False, recipe=train.TEMPLATE, device="cpu", budget_s=60.0)
    scored = harness_eval.evaluate({"status": "ok"}, args)
    # the same weights, the same images and captions, encoded one by one in another order:
    # fp32 on a CPU gives the same scores, so the same ranks
    assert scored["ranked_by"] == "harness" and scored["eval_split"] == "val"
    for key in ("mean_rank", "i2t_mean_rank", "t2i_mean_rank", "i2t_r5", "t2i_r10", "n_texts"):
        assert scored["metrics"][key] == pytest.approx(by_hand["metrics"][key], abs=1e-9), key
    leftovers = [f for part in harness_eval.PARTS for f in harness_eval.part_files(run, part) if f.exists()]
    assert leftovers == []  # secretly ordered inputs and embeddings are of no use once ranked


def test_encoding_follows_the_inputs_order_and_the_checkpoints_hparams(run, small_cache, tmp_path):
    inputs = inputs_of(small_cache, tmp_path / "in.safetensors")
    img, txt = encode.encode_checkpoint(train.TEMPLATE, run, inputs, "cpu")
    assert img.shape == (60, 32) and txt.shape[1] == 32  # embed_dim from the checkpoint, not the template's
    assert torch.allclose(img.norm(dim=1), torch.ones(60), atol=1e-5)
    # reversed inputs give the reversed rows: each item is encoded on its own
    tensors = encode.read_inputs(inputs)
    encode.write_inputs(inputs, tensors[0].flip(0), tensors[1].flip(0), tensors[2])
    img2, txt2 = encode.encode_checkpoint(train.TEMPLATE, run, inputs, "cpu", batch=7)
    torch.testing.assert_close(img2, img.flip(0), atol=1e-5, rtol=1e-5)  # (fp32, 1e-5, 1e-5): batch of 7, not 60
    torch.testing.assert_close(txt2, txt.flip(0), atol=1e-5, rtol=1e-5)


def test_an_item_gets_the_same_embedding_in_a_pair_as_among_the_split(run, small_cache, tmp_path):
    # what the harness's batch check asks of an honest model, met by the template's
    inputs = inputs_of(small_cache, tmp_path / "in.safetensors")
    img, txt = encode.encode_checkpoint(train.TEMPLATE, run, inputs, "cpu")  # one batch of 60
    images, tokens, spec = encode.read_inputs(inputs)
    picks = torch.tensor([3, 41, 17])  # ragged: two pairs would need 4
    encode.write_inputs(inputs, images[picks], tokens[picks], spec)
    longest = int((tokens != 0).sum(1).max())  # the padding the batch of 60 had
    img2, txt2 = encode.encode_checkpoint(train.TEMPLATE, run, inputs, "cpu", batch=2, text_length=longest)
    # (fp32, 1e-5, 1e-5): a pair and a single rather than a batch of 60, summed in another order
    torch.testing.assert_close(img2, img[picks], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt2, txt[picks], atol=1e-5, rtol=1e-5)
    assert scoring.batch_check(img[picks], img2, "images") < 1e-6


def test_cli_encodes_what_the_inputs_hold(run, small_cache, tmp_path, capsys):
    from safetensors.torch import load_file

    inputs = inputs_of(small_cache, tmp_path / "in.safetensors", split="test")
    images, tokens, spec = encode.read_inputs(inputs)
    for held, want in (((images, None), {"img": (20, 32)}), ((None, tokens), {"txt": (20, 32)}),
                       ((images, tokens), {"img": (20, 32), "txt": (20, 32)})):
        encode.write_inputs(inputs, *held, spec)
        out = tmp_path / "emb.safetensors"
        assert encode.main(["--recipe", str(train.TEMPLATE), "--checkpoint", str(run), "--inputs", str(inputs),
                            "--out", str(out), "--device", "cpu"]) == 0
        got = load_file(str(out))
        assert {k: tuple(v.shape) for k, v in got.items()} == want
        assert all(v.dtype == torch.float32 for v in got.values())
    assert "encode: 20 images, 20 captions ->" in capsys.readouterr().out


SPEC = {"vocab_size": "9", "context_length": "9", "phrase_length": "9", "image_size": "64"}


def with_hparams(run: Path, out: Path, hparams) -> Path:
    """A copy of ``run``'s checkpoint whose recorded hparams are ``hparams`` (None: none
    recorded), in the header of the tensors file, where the encoder reads them."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from eclip.checkpoint import HEADER_KEY, TENSORS

    out.mkdir()
    with safe_open(str(run / TENSORS), "pt") as f:
        meta = json.loads(f.metadata()[HEADER_KEY])
    if hparams is None:
        del meta["hparams"]
    else:
        meta["hparams"] = hparams if not isinstance(hparams, dict) else meta["hparams"] | hparams
    save_file(load_file(str(run / TENSORS)), str(out / TENSORS), metadata={HEADER_KEY: json.dumps(meta)})
    return out


@pytest.mark.parametrize("case,message", [
    ("neither", "in.safetensors: holds neither images nor tokens"),
    ("float images", "in.safetensors: images: expected uint8 [N, 3, 64, 64], got torch.float32 [2, 3, 64, 64]"),
    ("other size", "in.safetensors: images: expected uint8 [N, 3, 64, 64], got torch.uint8 [2, 3, 32, 32]"),
    ("float tokens", "in.safetensors: tokens: expected int32 or int64 [C, L], got torch.float32 [2, 9]"),
    ("no metadata", "in.safetensors: metadata vocab_size: missing (an inputs file carries the "
                    "training data's vocab_size, context_length, phrase_length, image_size)"),
    ("another model", "checkpoint.safetensors: checkpoint has model text.vocab_size"),
    ("no checkpoint", "checkpoint.json: no checkpoint here"),
    ("checkpoint file", "checkpoint.safetensors: a file; a checkpoint is named by its run directory"),
    ("not a file", "in.safetensors: unreadable"),
    ("short text length", "--text-length 1: must be between the longest caption given ("),
    ("metadata not a number", "in.safetensors: metadata image_size: expected an integer, got 'big'"),
    ("not square", "in.safetensors: images: expected uint8 [N, 3, 64, 64], got torch.uint8 [2, 3, 64, 32]"),
    ("int64 images", "in.safetensors: images: expected uint8 [N, 3, 64, 64], got torch.int64 [2, 3, 64, 64]"),
    ("flat tokens", "in.safetensors: tokens: expected int32 or int64 [C, L], got torch.int64 [18]"),
    ("no hparams", "checkpoint.safetensors: no hparams recorded"),
    # caught as the meta is read (eclip.checkpoint.check_meta), before the hparams are used
    ("hparams not a dict", "checkpoint.safetensors: checkpoint metadata has hparams = [], expected an object"),
    ("hparams the recipe refuses", "recipe: precision: expected one of auto, bf16, fp32, got 'fp16'"),
    # what the model indexed out of range, or refused, in a traceback and exit 1
    ("ids past the vocabulary", "in.safetensors: tokens: ids must lie in 0..8 (metadata vocab_size 9), got 0..9"),
    ("negative ids", "in.safetensors: tokens: ids must lie in 0..8 (metadata vocab_size 9), got -3..1"),
    ("captions too long", "in.safetensors: tokens: a caption of 10 tokens, longer than metadata context_length 9"),
])
def test_bad_input_is_one_line_and_exit_2(run, small_cache, tmp_path, capsys, case, message):
    from safetensors.torch import save_file

    inputs = tmp_path / "in.safetensors"
    ckpt_dir = run
    tensors = {"neither": {"other": torch.zeros(1)},
               "float images": {"images": torch.zeros(2, 3, 64, 64)},
               "other size": {"images": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)},
               "float tokens": {"tokens": torch.ones(2, 9)},
               "no metadata": {"tokens": torch.ones(2, 9, dtype=torch.int32)},
               "metadata not a number": {"tokens": torch.ones(2, 9, dtype=torch.int32)},
               "not square": {"images": torch.zeros(2, 3, 64, 32, dtype=torch.uint8)},
               "int64 images": {"images": torch.zeros(2, 3, 64, 64, dtype=torch.int64)},
               "flat tokens": {"tokens": torch.ones(18, dtype=torch.int64)},
               "ids past the vocabulary": {"tokens": torch.tensor([[1, 9, 0], [2, 0, 0]])},
               "negative ids": {"tokens": torch.tensor([[1, -3, 0], [1, 0, 0]])},
               "captions too long": {"tokens": torch.tensor([[1] * 10 + [0, 0], [1] * 5 + [0] * 7])}}
    metadata = {"no metadata": None, "metadata not a number": SPEC | {"image_size": "big"}}
    hparams = {"no hparams": None, "hparams not a dict": [], "hparams the recipe refuses": {"precision": "fp16"}}
    if case in tensors:
        save_file(tensors[case], str(inputs), metadata=metadata.get(case, SPEC))
    elif case in hparams:  # a damaged checkpoint: its recorded hyperparameters
        inputs_of(small_cache, inputs)
        ckpt_dir = with_hparams(run, tmp_path / "damaged", hparams[case])
    elif case == "another model":  # a vocabulary the checkpoint was not trained on
        inputs_of(small_cache, inputs, vocab_size=load_cache(small_cache).vocab_size + 1)
    elif case == "no checkpoint":
        inputs_of(small_cache, inputs)
        ckpt_dir = tmp_path / "empty"
        ckpt_dir.mkdir()
    elif case == "checkpoint file":  # the weights file given for its folder
        inputs_of(small_cache, inputs)
        ckpt_dir = run / "checkpoint.safetensors"
    elif case == "short text length":  # it would cut words off the captions
        inputs_of(small_cache, inputs)
    else:
        inputs.write_bytes(b"not safetensors")
    out = tmp_path / "emb.safetensors"
    rc = encode.main(["--recipe", str(train.TEMPLATE), "--checkpoint", str(ckpt_dir), "--inputs", str(inputs),
                      "--out", str(out), "--device", "cpu", *(["--text-length", "1"] if case == "short text length" else [])])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("encode: error: ") and err.count("\n") == 1, err
    assert re.search(re.escape(message), err), err
    assert not out.exists()  # nothing half-written


def test_text_length_reaches_the_encoder_and_is_checked(run, small_cache, tmp_path, monkeypatch):
    # The batch check's copies are encoded with the split's caption length (--text-length),
    # so their padding matches; it must reach the encoding, and lie within the inputs.
    from eclip.errors import EclipError

    inputs = inputs_of(small_cache, tmp_path / "in.safetensors")
    width = encode.read_inputs(inputs)[1].shape[1]
    lengths = []
    real = encode.encode_in_order
    monkeypatch.setattr(encode, "encode_in_order", lambda *a: lengths.append(a[-1]) or real(*a))
    encode.encode_checkpoint(train.TEMPLATE, run, inputs, "cpu", text_length=width)
    assert lengths == [width]
    with pytest.raises(EclipError, match=f"--text-length {width + 1}: must be between"):
        encode.encode_checkpoint(train.TEMPLATE, run, inputs, "cpu", text_length=width + 1)
    with pytest.raises(EclipError, match="--batch 0: must be at least 1"):
        encode.encode_checkpoint(train.TEMPLATE, run, inputs, "cpu", batch=0)


def cli(run: Path, inputs: Path, out: Path, *extra: str) -> int:
    return encode.main(["--recipe", str(train.TEMPLATE), "--checkpoint", str(run), "--inputs", str(inputs),
                        "--out", str(out), "--device", "cpu", *extra])


def test_the_ready_line_is_printed_when_asked_and_only_then(run, small_cache, tmp_path, capsys):
    # The harness times the recipe from this line: it must come first, and a run without
    # --signal-ready prints none (a stray line would be read as the start of the recipe's time)
    inputs = inputs_of(small_cache, tmp_path / "in.safetensors", split="test")
    assert cli(run, inputs, tmp_path / "emb.safetensors", "--signal-ready") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == encode.READY and lines.count(encode.READY) == 1
    assert cli(run, inputs, tmp_path / "emb.safetensors") == 0
    assert encode.READY not in capsys.readouterr().out.splitlines()


def test_batch_sets_the_forward_passes_and_text_length_needs_captions(run, small_cache, tmp_path, monkeypatch):
    # --batch is what the harness's batch check relies on (pairs): it must reach the model's
    # forward passes; --text-length is about captions, so inputs without any ignore it
    from safetensors.torch import load_file

    images, _, spec = encode.read_inputs(inputs_of(small_cache, tmp_path / "in.safetensors", split="test"))
    inputs = tmp_path / "images.safetensors"
    encode.write_inputs(inputs, images, None, spec)  # 20 images, no captions
    sizes = []
    real = encode.encode_in_order

    def spy(model, *rest):
        encode_image = model.encode_image
        model.encode_image = lambda x: (sizes.append(x.shape[0]), encode_image(x))[1]
        return real(model, *rest)

    monkeypatch.setattr(encode, "encode_in_order", spy)
    out = tmp_path / "emb.safetensors"
    assert cli(run, inputs, out, "--batch", "7", "--text-length", "5") == 0
    assert sizes == [7, 7, 6]
    assert list(load_file(str(out))) == ["img"]


@pytest.mark.parametrize("raised,rc,message", [
    (KeyboardInterrupt(), 130, "encode: interrupted (no embeddings written)"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), 1,
     "encode: error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)"),
    (torch.OutOfMemoryError("no room"), 1, "encode: error: out of memory (no room)"),
])
def test_an_interruption_or_out_of_memory_is_its_exit_code_and_one_line(tmp_path, monkeypatch, capsys, raised, rc,
                                                                        message):
    # the harness tells these apart by the exit code and the encoder's own line (oom, interrupted)
    def fail(*args):
        raise raised

    monkeypatch.setattr(encode, "encode_checkpoint", fail)
    out = tmp_path / "emb.safetensors"
    assert cli(tmp_path, tmp_path / "in.safetensors", out) == rc
    assert capsys.readouterr().err == message + "\n"
    assert not out.exists()


def test_another_error_of_the_recipe_is_not_called_out_of_memory(tmp_path, monkeypatch):
    # its traceback is the harness's reason (the last line of the log), not "out of memory"
    def fail(*args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(encode, "encode_checkpoint", fail)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        cli(tmp_path, tmp_path / "in.safetensors", tmp_path / "emb.safetensors")


def test_an_output_that_cannot_be_written_is_one_line_and_exit_2(run, small_cache, tmp_path, capsys):
    inputs = inputs_of(small_cache, tmp_path / "in.safetensors", split="test")
    out = tmp_path / "taken"
    out.mkdir()  # a folder where the embeddings should go
    assert cli(run, inputs, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("encode: error: ") and err.count("\n") == 1 and "Is a directory" in err, err
    assert out.is_dir() and list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "taken"]  # no temporary left


def test_a_failed_write_keeps_the_previous_embeddings(tmp_path, monkeypatch):
    # written to a temporary file and renamed: a write cut short (disk full) leaves the
    # previous file whole, not half of the new one
    import safetensors.torch

    out = tmp_path / "emb.safetensors"
    encode.save_embeddings(out, torch.ones(2, 4), None)
    before = out.read_bytes()

    def cut_short(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", cut_short)
    with pytest.raises(OSError, match="No space left"):
        encode.save_embeddings(out, torch.zeros(3, 4), torch.zeros(3, 4))
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["emb.safetensors"]


def test_an_output_folder_that_does_not_exist_is_one_line_and_exit_2(run, small_cache, tmp_path, capsys):
    # safetensors reports its write failures as its own error, not an OSError: a traceback
    inputs = inputs_of(small_cache, tmp_path / "in.safetensors", split="test")
    out = tmp_path / "missing" / "emb.safetensors"
    assert cli(run, inputs, out) == 2
    assert capsys.readouterr().err == f"encode: error: {out}: its folder {out.parent} does not exist\n"


def test_an_output_that_is_a_folder_is_named_as_given(run, small_cache, tmp_path, capsys):
    # the rename's error named the temporary file (".taken.tmp-<pid>"), which nobody asked for
    inputs = inputs_of(small_cache, tmp_path / "in.safetensors", split="test")
    (tmp_path / "taken").mkdir()
    assert cli(run, inputs, tmp_path / "taken") == 2
    assert capsys.readouterr().err == f"encode: error: {tmp_path / 'taken'}: Is a directory\n"


@pytest.mark.parametrize("hparams", ["abc", [1, 2], 7])
def test_hparams_of_another_type_than_a_dict_are_one_line(run, small_cache, tmp_path, capsys, hparams):
    # a damaged record: hp.get() on a string was an AttributeError traceback
    inputs = inputs_of(small_cache, tmp_path / "in.safetensors", split="test")
    ckpt = with_hparams(run, tmp_path / "damaged", hparams)
    assert cli(ckpt, inputs, tmp_path / "emb.safetensors") == 2
    shown = '"abc"' if hparams == "abc" else str(hparams)
    assert (f"checkpoint.safetensors: checkpoint metadata has hparams = {shown}, expected an object"
            in capsys.readouterr().err)


@pytest.mark.parametrize("seed", ["abc", 1.5, None])
def test_a_damaged_seed_is_one_line(run, small_cache, tmp_path, capsys, seed):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from eclip.checkpoint import HEADER_KEY, TENSORS

    inputs = inputs_of(small_cache, tmp_path / "in.safetensors", split="test")
    ckpt = tmp_path / "damaged"
    ckpt.mkdir()
    with safe_open(str(run / TENSORS), "pt") as f:
        meta = json.loads(f.metadata()[HEADER_KEY])
    meta["seed"] = seed
    save_file(load_file(str(run / TENSORS)), str(ckpt / TENSORS), metadata={HEADER_KEY: json.dumps(meta)})
    assert cli(ckpt, inputs, tmp_path / "emb.safetensors") == 2
    assert f"checkpoint.safetensors: seed: expected an integer, got {seed!r}" in capsys.readouterr().err


@pytest.mark.parametrize("part", ["images", "tokens"])
def test_inputs_with_no_rows_are_bad_input(run, small_cache, tmp_path, capsys, part):
    # an empty split (prepare allows --val-frac 0 for real data) ended in torch.cat's traceback
    inputs = inputs_of(small_cache, tmp_path / "in.safetensors", split="test")
    images, tokens, spec = encode.read_inputs(inputs)
    encode.write_inputs(inputs, images[:0] if part == "images" else None, tokens[:0] if part == "tokens" else None,
                        spec)
    assert cli(run, inputs, tmp_path / "emb.safetensors") == 2
    assert f"in.safetensors: {part}: no rows to encode" in capsys.readouterr().err


def test_what_the_recipes_module_code_draws_is_the_same_in_every_process(small_cache, tmp_path):
    # a fixed random permutation of the embedding, drawn as the recipe is imported: unseeded,
    # the images' process and the texts' process drew different ones, and a model that
    # trained well scored at chance
    recipe = tmp_path / "recipe.py"
    recipe.write_text(train.TEMPLATE.read_text() + '''

from eclip.model import EclipModel as _EclipModel

_PERM = torch.randperm(32)  # drawn at import: the same in every process only if seeded before it
_plain_build_model = build_model


class _Permuted(_EclipModel):
    def encode_image(self, images):
        return super().encode_image(images)[:, _PERM]

    def encode_text(self, tokens, mask):
        return super().encode_text(tokens, mask)[:, _PERM]


def build_model(spec):
    model = _plain_build_model(spec)
    permuted = _Permuted(model.cfg).to(spec.device)
    permuted.load_state_dict(model.state_dict())
    return permuted
''')
    out = tmp_path / "run"
    assert train.main(["--data", str(small_cache), "--out", str(out), "--steps", "1", "--device", "cpu",
                       "--recipe", str(recipe), *SMALL]) == 0
    inputs = inputs_of(small_cache, tmp_path / "in.safetensors")
    first = encode.encode_checkpoint(recipe, out, inputs, "cpu")
    torch.rand(5)  # the process's generator moved on, as another process's would differ
    again = encode.encode_checkpoint(recipe, out, inputs, "cpu")
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # (fp32, 0, 0): the same weights, inputs and draw
    # and the harness, whose images' and texts' processes each draw it, ranks as the run itself did
    scored = harness_eval.evaluate({"status": "ok"}, SimpleNamespace(out=out, data=small_cache, final=False,
                                                                     recipe=recipe, device="cpu", budget_s=60.0))
    by_hand = json.loads((out / "result.json").read_text())
    assert scored["metrics"]["mean_rank"] == pytest.approx(by_hand["metrics"]["mean_rank"], abs=1e-9)
