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


def suffix_positions(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int):
    """Per packed query token, when each sequence's queries are the last of its keys (bottom-right alignment):
    the packed index of its sequence's first key and its position among the keys (int64 ``[Tq]``).

    Runs on the device of the offsets without synchronising with the host.
    """
    sequences = token_sequences(cu_seqlens_q, total_q)
    query_starts, key_starts = cu_seqlens_q.long()[sequences], cu_seqlens_k.long()[sequences]
    offsets = (cu_seqlens_k.long().diff() - cu_seqlens_q.long().diff())[sequences]
    return key_starts, torch.arange(total_q, device=cu_seqlens_q.device) - query_starts + offsets
