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


def test_the_smallest_vocabulary_is_accepted():
    # 256 byte symbols plus the 4 specials: no merge, yet every text still round-trips
    small = train_bpe(CORPUS, vocab_size=260)
    assert small.get_vocab_size() == 260
    ids, lengths, _ = encode_batch(small, [CORPUS[2]], context_length=64)
    assert decode(small, ids[0, : lengths[0]]) == CORPUS[2]
    with pytest.raises(EclipError, match="--vocab-size 259: must be at least 260"):
        train_bpe(CORPUS, vocab_size=259)


def test_context_of_three_is_the_smallest(tok):
    # <bos>, one token, <eos>: a shorter context cannot hold any text
    ids, lengths, truncated = encode_batch(tok, ["a large red circle"], context_length=3)
    assert lengths.tolist() == [3] and truncated == 1
    assert ids[0, 0] == tok.token_to_id("<bos>") and ids[0, 2] == tok.token_to_id("<eos>")
    with pytest.raises(EclipError, match="context length 2: must be at least 3"):
        encode_batch(tok, ["a"], context_length=2)


def test_a_caption_that_exactly_fits_is_not_truncated(tok):
    body = tok.encode(CORPUS[0], add_special_tokens=False).ids
    fit = len(body) + 2
    ids, lengths, truncated = encode_batch(tok, [CORPUS[0]], context_length=fit)
    assert truncated == 0 and lengths.tolist() == [fit] and decode(tok, ids[0]) == CORPUS[0]
    _, lengths, truncated = encode_batch(tok, [CORPUS[0]], context_length=fit - 1)
    assert truncated == 1 and lengths.tolist() == [fit - 1]


def test_a_given_tokenizer_without_bos_and_eos_encodes_the_text_alone(tmp_path):
    # A user's tokenizer.json needs only <pad> at id 0; without <bos>/<eos> the rows hold the
    # text's own ids, still truncated to L - 2.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.decoder = decoders.ByteLevel()
    bare.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    path = tmp_path / "tokenizer.json"
    bare.save(str(path))
    tok = load_tokenizer(path)
    assert tok.token_to_id("<bos>") is None and tok.token_to_id("<eos>") is None
    body = tok.encode(CORPUS[0], add_special_tokens=False).ids
    ids, lengths, truncated = encode_batch(tok, [CORPUS[0]], context_length=len(body) + 5)
    assert truncated == 0 and lengths.tolist() == [len(body)]
    assert ids[0, : len(body)].tolist() == body and (ids[0, len(body):] == PAD_ID).all()
    ids, lengths, truncated = encode_batch(tok, [CORPUS[0]], context_length=5)
    assert truncated == 1 and lengths.tolist() == [3] and ids[0, :3].tolist() == body[:3]


def test_a_given_tokenizer_whose_ids_leave_gaps_is_refused(tmp_path, tok):
    # ids up to 5,000 and more in a vocabulary of a few hundred: the cache recorded the size,
    # and the model's embedding of that many rows failed in the first step (IndexError)
    import json

    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    data = json.loads(path.read_text())
    data["model"]["vocab"] = {t: i if i < 4 else i + 5000 for t, i in data["model"]["vocab"].items()}
    top = max(data["model"]["vocab"].values())
    path.write_text(json.dumps(data))
    size = tok.get_vocab_size()
    with pytest.raises(EclipError) as e:
        load_tokenizer(path)
    assert str(e.value) == (f"{path}: token ids run to {top} but the vocabulary has {size} entries; the ids must be "
                            f"0..{size - 1}, with no gaps")
