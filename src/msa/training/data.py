"""Byte-level training data: a corpus of bytes, reproducible random batches, and key-value needles.

Tokens are bytes (vocabulary 256): no tokenizer to ship, and every text
corpus works. Batches are drawn from a generator seeded by ``(seed, step)``,
so a resumed run, or a second run that must see the same tokens (dense vs
MSA continuation), gets exactly the same batches.

Needles teach and test long-context retrieval: ``n`` lines
``/* key NAME = DIGITS */`` are written into the text at chosen depths, and
the sequence ends with ``/* key NAME = `` followed by the digits of one of
them: predicting those digits needs attention to the right needle, however
far back it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VOCAB_SIZE = 256
NAME_CHARS = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
DIGITS = np.frombuffer(b"0123456789", dtype=np.uint8)


def load_bytes(path: str | Path) -> np.ndarray:
    """A corpus as uint8 tokens: a ``.bin`` file of raw bytes, any other file, or a directory's files
    (sorted, joined by newlines)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise ValueError(f"no files under {path}")
        return np.frombuffer(b"\n".join(p.read_bytes() for p in files), dtype=np.uint8)
    if path.suffix == ".bin":
        return np.memmap(path, dtype=np.uint8, mode="r")
    return np.frombuffer(path.read_bytes(), dtype=np.uint8)


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


class ByteBatches:
    """Random ``[batch, seq_len]`` windows of a byte corpus; with ``needle_rate`` > 0 that fraction of the
    windows carry 1..3 needles at random depths and end with a query."""

    def __init__(self, data: np.ndarray, *, batch_size: int, seq_len: int, seed: int = 0, needle_rate: float = 0.0):
        if len(data) <= seq_len:
            raise ValueError(f"the corpus ({len(data)} tokens) must be longer than seq_len ({seq_len})")
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.seed, self.needle_rate = seed, needle_rate

    def __call__(self, step: int) -> torch.Tensor:
        """The batch of ``step`` (int64 ``[batch, seq_len]``), the same for the same (seed, step)."""
        rng = np.random.default_rng([self.seed, step])
        rows = []
        for start in rng.integers(0, len(self.data) - self.seq_len, self.batch_size):
            window = np.asarray(self.data[start:start + self.seq_len])
            if rng.random() < self.needle_rate:
                window, _ = insert_needles(window, list(rng.random(int(rng.integers(1, 4)))), rng)
            rows.append(torch.from_numpy(window.astype(np.int64)))
        return torch.stack(rows)
