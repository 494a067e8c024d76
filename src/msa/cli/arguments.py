"""Argument types for the ``msa`` subcommands: ``type=`` functions for ``argparse``.

Each parses one command-line string or raises ``argparse.ArgumentTypeError``
with the expected value, which argparse reports as
``msa CMD: error: argument --NAME: expected ..., got ...`` (exit status 2).
"""

from __future__ import annotations

import argparse
import math

import torch


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0, "a non-negative integer")


def power_of_two(text: str) -> int:
    """A power of two >= 1 (an MSA block size)."""
    value = _int_at_least(text, 1, "a power of two")
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"expected a power of two, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1, e.g. ``1024,2048``."""
    try:
        return [positive_int(item) for item in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None


def device(text: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, present on this machine."""
    try:
        value = torch.device(text)
    except RuntimeError:
        value = None
    if value is None or value.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if value.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"got {text!r}, but CUDA is not available on this machine")
        if value.index is not None and value.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"got {text!r}, but this machine has {torch.cuda.device_count()} CUDA "
                                             f"device(s)")
    return value
