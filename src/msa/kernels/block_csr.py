"""The inverse of a block selection: for each (group, key block), the (token, slot) entries that selected it.

KV-outer kernels walk these lists so that each key block is loaded once for
all the queries that chose it. Built with sort and searchsorted on the device,
without synchronising with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockCSR:
    """Lists indexed by ``group * n_block_slots + sequence * max_blocks + block``.

    ``offsets`` int32 ``[G * n_block_slots + 1]``; ``entries`` int32
    ``token * topk + slot`` (packed token index, ascending within a list;
    entries past ``offsets[-1]`` are unused slots).
    """

    offsets: torch.Tensor
    entries: torch.Tensor
    max_blocks: int
    n_block_slots: int


def build_block_csr(block_indices: torch.Tensor, sequences: torch.Tensor, n_seqs: int, max_blocks: int,
                    token_offset: int = 0) -> BlockCSR:
    """Invert ``block_indices`` int32 ``[C, G, topk]`` of tokens ``token_offset .. token_offset + C - 1``.

    ``sequences`` int64 ``[C]``: their sequence numbers (see :func:`msa.varlen.token_sequences`).
    """
    n_tokens, n_groups, topk = block_indices.shape
    n_block_slots = n_seqs * max_blocks
    device = block_indices.device
    groups = torch.arange(n_groups, device=device)[None, :, None]
    keys = groups * n_block_slots + sequences[:, None, None] * max_blocks + block_indices.long()
    keys = torch.where(block_indices >= 0, keys, n_groups * n_block_slots).flatten()
    sorted_keys, order = torch.sort(keys, stable=True)
    # flat index = (token * G + group) * topk + slot
    entries = (order // (n_groups * topk) + token_offset) * topk + order % topk
    bounds = torch.arange(n_groups * n_block_slots + 1, device=device)
    offsets = torch.searchsorted(sorted_keys, bounds).to(torch.int32)
    return BlockCSR(offsets, entries.to(torch.int32), max_blocks, n_block_slots)
