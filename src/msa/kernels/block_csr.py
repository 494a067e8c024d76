"""The inverse of a block selection: for each (group, key block), the tokens that selected it.

KV-outer kernels walk these lists so that each key block is loaded once for
all the queries that chose it. Built with sort and searchsorted on the device,
without synchronising with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockCSR:
    """Lists of selecting tokens, indexed by ``group * n_block_slots + seq * max_blocks + block``.

    ``offsets`` int32 ``[G * n_block_slots + 1]``; ``tokens`` int32 ``[T * G * topk]``
    (ascending within a list; entries past ``offsets[-1]`` are unused slots).
    """

    offsets: torch.Tensor
    tokens: torch.Tensor
    max_blocks: int
    n_block_slots: int


def build_block_csr(block_indices: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                    block_size: int) -> BlockCSR:
    """``block_indices`` int32 ``[T, G, topk]`` (-1 = unused) of packed sequences ``cu_seqlens``."""
    total, n_groups, topk = block_indices.shape
    n_seqs = cu_seqlens.numel() - 1
    max_blocks = max(1, -(-max_seqlen // block_size))
    n_block_slots = n_seqs * max_blocks
    device = block_indices.device
    cu = cu_seqlens.long()
    sequence = torch.repeat_interleave(torch.arange(n_seqs, device=device), cu.diff(), output_size=total)
    groups = torch.arange(n_groups, device=device)[None, :, None]
    keys = groups * n_block_slots + sequence[:, None, None] * max_blocks + block_indices.long()
    keys = torch.where(block_indices >= 0, keys, n_groups * n_block_slots).flatten()
    sorted_keys, order = torch.sort(keys, stable=True)
    tokens = (order // (n_groups * topk)).to(torch.int32)
    bounds = torch.arange(n_groups * n_block_slots + 1, device=device)
    offsets = torch.searchsorted(sorted_keys, bounds).to(torch.int32)
    return BlockCSR(offsets, tokens, max_blocks, n_block_slots)
