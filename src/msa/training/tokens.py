"""Tokenizers for training and generation: UTF-8 bytes, or a Hugging Face tokenizer.

Both have the same small interface: ``vocab_size``, ``special_ids``,
``encode(texts)`` (one token array per text), ``decode(ids)``,
``document_separator`` (the tokens put between two documents of a corpus)
and ``save(directory)`` (beside a model, so that
:func:`load_saved_tokenizer` finds it again).

* :class:`ByteTokenizer`: tokens are bytes (vocabulary 256): nothing to ship,
  every text encodes; the default of the small models trained from scratch.
  Saved as ``msa_tokenizer.json`` (``{"type": "bytes"}``).
* :class:`HFTokenizer`: a ``transformers`` tokenizer (from a ``tokenizer.json``
  file, a directory ``AutoTokenizer`` loads, or a GGUF file), local files
  only. Saved with ``save_pretrained``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

BYTES_MARKER = "msa_tokenizer.json"  # beside a model trained on byte tokens
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ByteTokenizer:
    """UTF-8 bytes as tokens; token arrays are ``uint8``."""

    vocab_size = 256
    special_ids: set[int] = set()
    document_separator = np.frombuffer(b"\n", dtype=np.uint8)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        (Path(directory) / BYTES_MARKER).write_text(json.dumps({"type": "bytes"}) + "\n")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A ``transformers`` tokenizer; token arrays are ``int32``. Documents are separated by its EOS token
    (a newline's tokens if it has none); no other special tokens are added."""

    def __init__(self, tokenizer, source: str):
        self.tokenizer, self.source = tokenizer, source
        self.vocab_size = len(tokenizer)
        self.special_ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        eos = tokenizer.eos_token_id
        self.document_separator = (np.array([eos], dtype=np.int32) if eos is not None else self.encode(["\n"])[0])

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int32) for ids in encoded]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def save(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(directory)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source}, vocab {self.vocab_size})"


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(path: str | Path) -> HFTokenizer:
    """A Hugging Face tokenizer from a ``tokenizer.json`` file or a directory ``AutoTokenizer`` loads."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"tokenizer {path}: expected a tokenizer.json file or a tokenizer directory")
        from transformers import PreTrainedTokenizerFast

        return HFTokenizer(PreTrainedTokenizerFast(tokenizer_file=str(path)), str(path))
    if path.is_dir() and any((path / name).exists() for name in HF_TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True), str(path))
    raise ValueError(f"tokenizer {path}: not a tokenizer.json file nor a directory holding one of "
                     f"{', '.join(HF_TOKENIZER_FILES)}")


def load_saved_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The tokenizer saved beside a model in ``directory`` (bytes or Hugging Face), None if there is none."""
    directory = Path(directory)
    if (directory / BYTES_MARKER).exists():
        return ByteTokenizer()
    if any((directory / name).exists() for name in HF_TOKENIZER_FILES):
        return load_tokenizer(directory)
    return None


def require_gguf(path: Path) -> None:
    """Loading a ``.gguf`` file needs the optional ``gguf`` and ``accelerate`` packages (transformers')."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"{path}: loading a GGUF file needs the {' and '.join(missing)} package"
                         f"{'s' * (len(missing) > 1)} (pip install {' '.join(missing)})")


def load_gguf_tokenizer(path: str | Path) -> HFTokenizer:
    """The tokenizer stored in a GGUF file."""
    from transformers import AutoTokenizer

    path = Path(path)
    require_gguf(path)
    return HFTokenizer(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True),
                       str(path))
