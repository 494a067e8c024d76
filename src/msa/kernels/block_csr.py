"""The inverse of a block selection: for each (group, key block), the (token, slot) entries that selected it.

KV-outer kernels walk these lists so that each key block is loaded once for
all the queries that chose it. Built with sort and searchsorted on the device,
without synchronising with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from msa.varlen import token_sequences


@dataclass(frozen=True)
class BlockCSR:
    """Lists indexed by ``(chunk * G + group) * n_block_slots + sequence * max_blocks + block``.

    ``offsets`` int32 ``[n_chunks * G * n_block_slots + 1]``; ``entries`` int32
    ``token * topk + slot`` (packed token index, ascending within a list;
    entries past ``offsets[-1]`` are unused slots). A chunk's lists hold the
    entries of its tokens only (see :meth:`chunk_offsets`).
    """

    offsets: torch.Tensor
    entries: torch.Tensor
    max_blocks: int
    n_block_slots: int
    n_groups: int

    def chunk_offsets(self, chunk: int) -> torch.Tensor:
        """The offsets of one chunk's lists, indexed by ``group * n_block_slots + sequence * max_blocks + block``."""
        return self.offsets[chunk * self.n_groups * self.n_block_slots:]


def build_block_csr(block_indices: torch.Tensor, sequences: torch.Tensor, n_seqs: int, max_blocks: int,
                    token_offset: int = 0, chunk_tokens: int | None = None) -> BlockCSR:
    """Invert ``block_indices`` int32 ``[C, G, topk]`` of tokens ``token_offset .. token_offset + C - 1``.

    ``sequences`` int64 ``[C]``: their sequence numbers (see :func:`msa.varlen.token_sequences`).
    ``chunk_tokens``: lists per chunk of that many tokens (one sort for all chunks); default one chunk.
    """
    n_tokens, n_groups, topk = block_indices.shape
    n_block_slots = n_seqs * max_blocks
    n_chunks = -(-n_tokens // chunk_tokens) if chunk_tokens and n_tokens else 1
    n_lists = n_chunks * n_groups * n_block_slots
    device = block_indices.device
    key_dtype = torch.int32 if n_lists < 2**31 else torch.int64  # int32 keys sort about twice as fast
    token_lists = sequences.to(key_dtype) * max_blocks
    if n_chunks > 1:
        token_lists += torch.arange(n_tokens, device=device, dtype=key_dtype) // chunk_tokens * n_groups * n_block_slots
    groups = torch.arange(n_groups, device=device, dtype=key_dtype)[None, :, None] * n_block_slots
    keys = token_lists[:, None, None] + groups + block_indices.to(key_dtype)
    keys = torch.where(block_indices >= 0, keys, n_lists).flatten()
    sorted_keys, order = torch.sort(keys, stable=True)
    # flat index = (token * G + group) * topk + slot
    entries = (order // (n_groups * topk) + token_offset) * topk + order % topk
    bounds = torch.arange(n_lists + 1, device=device, dtype=key_dtype)
    offsets = torch.searchsorted(sorted_keys, bounds).to(torch.int32)
    return BlockCSR(offsets, entries.to(torch.int32), max_blocks, n_block_slots, n_groups)


def invert_selection(block_indices: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, block_size: int,
                     start: int = 0, end: int | None = None, chunk_tokens: int | None = None) -> BlockCSR:
    """The selection ``block_indices`` ``[T, G, topk]`` of tokens ``start .. end - 1`` inverted into per-(group,
    block) lists, per chunk of ``chunk_tokens`` tokens if given. ``cu_seqlens``: the queries' sequences;
    ``max_seqlen``: the longest key sequence (longer than the queries' where they are the last of its keys)."""
    sequences = token_sequences(cu_seqlens, block_indices.shape[0])[start:end]
    return build_block_csr(block_indices[start:end], sequences, cu_seqlens.numel() - 1,
                           max(1, triton.cdiv(max_seqlen, block_size)), token_offset=start, chunk_tokens=chunk_tokens)


def block_lists(offsets: torch.Tensor | None, entries: torch.Tensor | None, cu_seqlens: torch.Tensor,
                max_seqlen: int, block_size: int, n_groups: int) -> BlockCSR | None:
    """The :class:`BlockCSR` of :func:`invert_selection`'s whole lists (one chunk) whose ``offsets`` and ``entries``
    came through an operator's arguments (None when not given); ``cu_seqlens``, ``max_seqlen``, ``block_size`` as
    the selection was inverted with, ``n_groups`` its groups."""
    if offsets is None:
        return None
    max_blocks = max(1, triton.cdiv(max_seqlen, block_size))
    return BlockCSR(offsets, entries, max_blocks, (cu_seqlens.numel() - 1) * max_blocks, n_groups)
