"""Training data: token corpora, reproducible random batches, and key-value needles (byte tokens).

A corpus is a 1-D array of token ids (:func:`load_corpus`): a text file, a
directory's text files, or a ``.npy`` file of ids already tokenized. Batches
are drawn from a generator seeded by ``(seed, stream, step)``
(:class:`TokenBatches`), so a resumed run, or a second run that must see the
same tokens (dense vs MSA continuation), gets exactly the same batches; the
indexer warm-up draws from its own stream and leaves the LM stream untouched.

Needles teach and test long-context retrieval: ``n`` lines
``/* key NAME = DIGITS */`` are written into the text at chosen depths, and
the sequence ends with ``/* key NAME = `` followed by the digits of one of
them: predicting those digits needs attention to the right needle, however
far back it is. Needles are byte strings, so they need byte tokens (a
subword tokenizer would merge the digits with their neighbours in ways that
depend on the context).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from msa.training.tokens import Tokenizer

NAME_CHARS = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
DIGITS = np.frombuffer(b"0123456789", dtype=np.uint8)
# the seed streams of TokenBatches: batch ``step`` of a stream is drawn by default_rng([seed, step, *STREAMS[stream]])
# (the train stream seeds as the byte batches of earlier versions did, so their runs see the same batches)
STREAMS = {"train": (), "warmup": (1,), "eval": (2,)}


def read_text(path: Path) -> str | None:
    """The file's text, or None if it is binary (not UTF-8, or holds NUL bytes)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def corpus_texts(path: str | Path, suffix: str | None = None) -> list[str]:
    """The documents of a text file (one) or of a directory: its text files, recursively, in sorted path
    order; binary files, ``__pycache__`` and hidden files or directories are skipped, and with ``suffix``
    so are the files not ending in it."""
    path = Path(path)
    if path.is_file():
        text = read_text(path)
        if text is None:
            raise ValueError(f"{path} is not a UTF-8 text file")
        return [text]
    if not path.is_dir():
        raise ValueError(f"{path} does not exist")
    texts = []
    for file in sorted(path.rglob("*")):
        parts = file.relative_to(path).parts
        if (file.is_file() and "__pycache__" not in parts and not any(part.startswith(".") for part in parts)
                and (suffix is None or file.suffix == suffix) and (text := read_text(file)) is not None):
            texts.append(text)
    if not texts:
        raise ValueError(f"{path} holds no text files" + (f" ending in {suffix}" if suffix else ""))
    return texts


def tokenize(texts: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """The documents' tokens, joined by the tokenizer's document separator."""
    documents = tokenizer.encode(texts)
    pieces = [documents[0]]
    for document in documents[1:]:
        pieces += [tokenizer.document_separator, document]
    return np.concatenate(pieces)


def load_corpus(path: str | Path, tokenizer: Tokenizer) -> np.ndarray:
    """The tokens of ``path``: a ``.npy`` file of token ids (1-D integers below the vocabulary size), or the
    text of a file or directory (see :func:`corpus_texts`)."""
    path = Path(path)
    if path.suffix != ".npy":
        return tokenize(corpus_texts(path), tokenizer)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    tokens = np.load(path, mmap_mode="r")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{path}: expected a 1-D array of integer token ids, got {tokens.dtype} of shape "
                         f"{tokens.shape}")
    low, high = (int(tokens.min()), int(tokens.max())) if len(tokens) else (0, 0)
    if low < 0 or high >= tokenizer.vocab_size:
        raise ValueError(f"{path}: token ids must lie in [0, {tokenizer.vocab_size}) (the vocabulary of "
                         f"{tokenizer}), got ids in [{low}, {high}]")
    return tokens


@dataclass
class Needle:
    """Where a retrieval query's answer is: ``answer`` spans tokens ``answer_start .. answer_start + len - 1``
    of the sequence, and the needle holding it spans ``needle_start .. needle_end - 1``."""

    answer_start: int
    answer_len: int
    needle_start: int
    needle_end: int


def insert_needles(text: np.ndarray, depths: list[float], rng: np.random.Generator, digits: int = 5,
                   query: int | None = None) -> tuple[np.ndarray, Needle]:
    """``text`` (uint8) with one needle per depth (0 = start, 1 = end of the text) and a query at the end.

    Returns the new sequence (``len(text)`` tokens: the text is cut to make
    room) and where the queried needle and its answer sit. ``query`` picks
    the needle asked for (default: random).
    """
    names = [bytes(rng.choice(NAME_CHARS, 4)) for _ in depths]
    while len(set(names)) < len(names):
        names = [bytes(rng.choice(NAME_CHARS, 4)) for _ in depths]
    values = [bytes(rng.choice(DIGITS, digits)) for _ in depths]
    needles = [b"\n/* key " + name + b" = " + value + b" */\n" for name, value in zip(names, values)]
    asked = int(rng.integers(len(depths))) if query is None else query
    question = b"\n/* key " + names[asked] + b" = "
    room = len(text) - sum(map(len, needles)) - len(question) - digits
    if room < 0:
        raise ValueError(f"a sequence of {len(text)} tokens is too short for {len(depths)} needles")
    body = text[:room]
    cuts = sorted((int(round(d * room)), i) for i, d in enumerate(depths))
    parts, previous, spans = [], 0, {}
    position = 0
    for cut, i in cuts:
        parts.append(body[previous:cut])
        position += cut - previous
        spans[i] = (position, position + len(needles[i]))
        parts.append(np.frombuffer(needles[i], dtype=np.uint8))
        position += len(needles[i])
        previous = cut
    parts += [body[previous:], np.frombuffer(question + values[asked], dtype=np.uint8)]
    sequence = np.concatenate(parts)
    return sequence, Needle(len(sequence) - digits, digits, *spans[asked])


class TokenBatches:
    """Random ``[batch_size, seq_len]`` windows of a 1-D token array, a function of ``(seed, stream, step)``.

    ``stream`` (``"train"``, ``"warmup"`` or ``"eval"``) picks one of independent
    sequences of batches over the same tokens. With ``needle_rate`` > 0 that
    fraction of the windows carry 1..3 needles at random depths and end with
    a query; needles need byte tokens (``uint8``).
    """

    def __init__(self, tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int = 0, stream: str = "train",
                 needle_rate: float = 0.0):
        if len(tokens) <= seq_len:
            raise ValueError(f"the corpus ({len(tokens)} tokens) must be longer than seq_len ({seq_len})")
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {sorted(STREAMS)}, got {stream!r}")
        if needle_rate and tokens.dtype != np.uint8:
            raise ValueError(f"needles are byte strings: needle_rate > 0 needs byte tokens (uint8), got {tokens.dtype}")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.stream, self.needle_rate = seed, stream, needle_rate

    def __call__(self, step: int) -> torch.Tensor:
        """The batch of ``step`` (int64 ``[batch_size, seq_len]``), the same for the same (seed, stream, step)."""
        rng = np.random.default_rng([self.seed, step, *STREAMS[self.stream]])
        rows = []
        for start in rng.integers(0, len(self.tokens) - self.seq_len, self.batch_size):
            window = np.asarray(self.tokens[start:start + self.seq_len])
            if rng.random() < self.needle_rate:
                window, _ = insert_needles(window, list(rng.random(int(rng.integers(1, 4)))), rng)
            rows.append(torch.from_numpy(window.astype(np.int64)))
        return torch.stack(rows)
