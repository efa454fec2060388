"""The byte-level BPE: round trips (Japanese included), padding, truncation, given files."""

import json

import numpy as np
import pytest

from eclip.errors import EclipError
from eclip.tokenizer import PAD_ID, decode, encode_batch, load_tokenizer, train_bpe

CORPUS = [
    "a large red circle at the top left",
    "a small blue square at the bottom right and a large green star at the top right",
    "富士山を背景に波が立つ浮世絵",
    "歌川広重の東海道五十三次 with a bridge",
] * 5


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, vocab_size=400)


@pytest.mark.parametrize("text", [
    "a large red circle at the top left",
    "富士山を背景に波が立つ浮世絵",
    "unseen words: Ωmega, émigré, 😀 and ｆｕｌｌ-width",  # characters never seen in training
])
def test_round_trip_exact(tok, text):
    ids, lengths, truncated = encode_batch(tok, [text], context_length=200)
    assert truncated == 0
    assert decode(tok, ids[0, : lengths[0]]) == text
    assert (ids[0, lengths[0]:] == PAD_ID).all()


def test_fixed_context_truncation_is_counted(tok):
    texts = ["a large red circle at the top left and " * 10, "a red star"]
    ids, lengths, truncated = encode_batch(tok, texts, context_length=12)
    assert ids.shape == (2, 12) and ids.dtype == np.int32
    assert truncated == 1
    assert lengths[0] == 12 and lengths[1] < 12
    eos = tok.token_to_id("<eos>")
    assert ids[0, -1] == eos and ids[1, lengths[1] - 1] == eos
    assert ids[0, 0] == tok.token_to_id("<bos>")
    full, n, _ = encode_batch(tok, texts[:1], context_length=400)  # the caption's own start is what stays
    assert n[0] > 12 and np.array_equal(ids[0, 1:11], full[0, 1:11])


@pytest.mark.parametrize("text", ["a <pad> cat", "x<unk>y", "<bos>", "an <eos> in the middle"])
def test_text_that_spells_a_special_token_is_text(tok, text):
    # The library matches added tokens in the input even without add_special_tokens: "<pad>"
    # became id 0 inside a sequence (read as its end) and "<bos>" decoded to "".
    ids, lengths, _ = encode_batch(tok, [text], context_length=64)
    body = ids[0, 1 : lengths[0] - 1]
    assert (body != PAD_ID).all() and not set(body.tolist()) & {tok.token_to_id(t) for t in ("<bos>", "<eos>", "<unk>")}
    assert decode(tok, ids[0, : lengths[0]]) == text


def test_vocab_too_small_is_rejected():
    with pytest.raises(EclipError, match="--vocab-size 100: must be at least 260"):
        train_bpe(CORPUS, vocab_size=100)


def test_given_tokenizer_round_trip(tmp_path, tok):
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    again = load_tokenizer(path)
    a, _, _ = encode_batch(tok, CORPUS[:4], 64)
    b, _, _ = encode_batch(again, CORPUS[:4], 64)
    assert np.array_equal(a, b)


def test_a_given_tokenizer_pads_and_truncates_only_as_encode_batch_does(tmp_path, tok):
    # A tokenizer.json saved with its own padding and truncation once kept them: padding
    # landed before <eos> and a long caption was cut without counting as truncated.
    from tokenizers import Tokenizer

    other = Tokenizer.from_str(tok.to_str())
    other.enable_padding(pad_id=PAD_ID, pad_token="<pad>", length=20)
    other.enable_truncation(6)
    path = tmp_path / "tokenizer.json"
    other.save(str(path))
    texts = ["a cat", CORPUS[1]]
    a = encode_batch(tok, texts, 12)
    b = encode_batch(load_tokenizer(path), texts, 12)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] == 1


def test_bad_tokenizer_files(tmp_path, tok):
    with pytest.raises(EclipError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(EclipError, match="bad.json: not a valid tokenizer.json"):
        load_tokenizer(bad)
    # A tokenizer whose id 0 is not the padding token would make padding meaningful.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<pad>"]
    vocab = spec["model"]["vocab"]
    vocab.pop("<pad>")
    other = tmp_path / "nopad.json"
    other.write_text(json.dumps(spec))
    with pytest.raises(EclipError, match="must map <pad> to id 0"):
        load_tokenizer(other)
