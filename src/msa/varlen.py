"""Helpers on packed varlen layouts (``[T, ...]`` tensors with int32 ``cu_seqlens``)."""

from __future__ import annotations

import torch


def token_sequences(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 ``[T]``: the sequence each packed token belongs to (no host synchronisation)."""
    n_seqs = cu_seqlens.numel() - 1
    return torch.repeat_interleave(torch.arange(n_seqs, device=cu_seqlens.device), cu_seqlens.long().diff(),
                                   output_size=total)


def token_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per packed token: the offset of its sequence and its position inside it (int64 ``[T]``).

    Runs on the device of ``cu_seqlens`` without synchronising with the host.
    """
    starts = cu_seqlens.long()[token_sequences(cu_seqlens, total)]
    return starts, torch.arange(total, device=cu_seqlens.device) - starts
