"""Byte-level BPE tokenizer: trained on the training captions at prepare time, or user-given.

Byte-level means every string has an encoding (Japanese, emoji, anything) and decoding gives
the exact text back; no normaliser runs, so nothing is folded or lost. Ids 0–3 are the
special tokens below; 0 is padding, so a zero-filled row is an empty sequence.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from eclip.errors import EclipError, first_line

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID = 0
MIN_VOCAB = 256 + len(SPECIALS)  # the 256 byte symbols plus the special tokens


def _plain(tok: Tokenizer) -> Tokenizer:
    """``tok`` set to encode text as text: a caption that spells a special token ("<pad>")
    is ordinary bytes, not that token (a 0 inside a sequence would be read as its end, and
    the text would not decode back); and no padding or truncation of a loaded file's own
    (tokenizer.json may carry both), since :func:`encode_batch` does both. The first setting
    is not saved in tokenizer.json, so all are made on every load."""
    tok.encode_special_tokens = True
    tok.no_padding()
    tok.no_truncation()
    return tok


MAX_VOCAB = 1 << 20  # an embedding of a million rows; past it the trainer's memory (and the model's) runs out


def check_vocab_size(vocab_size: int) -> None:
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise EclipError(f"--vocab-size {vocab_size}: must be at least {MIN_VOCAB} "
                         f"(256 byte symbols plus the special tokens) and at most {MAX_VOCAB}")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; the 256 byte symbols are always in the vocabulary."""
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _plain(tok)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json; it must define the padding token as id 0."""
    path = Path(path)
    if not path.is_file():
        raise EclipError(f"{path}: tokenizer file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on malformed JSON
        raise EclipError(f"{path}: not a valid tokenizer.json ({first_line(e)})") from None
    if tok.token_to_id(PAD) != PAD_ID:
        raise EclipError(f"{path}: tokenizer must map {PAD} to id {PAD_ID} (padding is id 0)")
    # the model's embedding has vocab_size rows: an id past them fails inside the first step
    top, size = max(tok.get_vocab(with_added_tokens=True).values()), tok.get_vocab_size(with_added_tokens=True)
    if top >= size:
        raise EclipError(f"{path}: token ids run to {top} but the vocabulary has {size} entries; "
                         f"the ids must be 0..{size - 1}, with no gaps")
    if size > MAX_VOCAB:
        raise EclipError(f"{path}: a vocabulary of {size} tokens; at most {MAX_VOCAB} are supported")
    return _plain(tok)


def encode_batch(tok: Tokenizer, texts: list[str], context_length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode to a fixed context: ``<bos> ids… <eos>`` then zero padding.

    Returns ``(ids int32 [N, L], lengths int32 [N], truncated)``; a caption too long keeps its
    first L−2 tokens and still ends in ``<eos>``, and counts as truncated.
    """
    if context_length < 3:
        raise EclipError(f"context length {context_length}: must be at least 3")
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids = np.zeros((len(texts), context_length), dtype=np.int32)
    lengths = np.zeros(len(texts), dtype=np.int32)
    truncated = 0
    for i, enc in enumerate(tok.encode_batch(texts, add_special_tokens=False)):
        body = enc.ids
        if len(body) > context_length - 2:
            body = body[: context_length - 2]
            truncated += 1
        seq = ([bos] if bos is not None else []) + body + ([eos] if eos is not None else [])
        ids[i, : len(seq)] = seq
        lengths[i] = len(seq)
    return ids, lengths, truncated


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Inverse of :func:`encode_batch` for one row (specials and padding dropped)."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)
