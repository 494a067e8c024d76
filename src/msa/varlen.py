"""Helpers on packed varlen layouts (``[T, ...]`` tensors with int32 ``cu_seqlens``)."""

from __future__ import annotations

import torch


def token_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per packed token: the offset of its sequence and its position inside it (int64 ``[T]``).

    Runs on the device of ``cu_seqlens`` without synchronising with the host.
    """
    cu = cu_seqlens.long()
    sequence = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff(), output_size=total)
    starts = cu[sequence]
    return starts, torch.arange(total, device=cu.device) - starts
