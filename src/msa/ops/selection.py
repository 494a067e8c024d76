"""``Selection``: a block selection validated once, and what the backends derive from it, built once."""

from __future__ import annotations

import torch

from msa.ops import block_outer, library
from msa.ops.checks import INDEX_DTYPES, Layout, check_block_indices, check_block_size, check_tensor, make_layout
from msa.varlen import token_positions

DEFAULT_BLOCK_SIZE = 128


class Selection:
    """The blocks each (query, GQA group) attends to, with their block size and token layout.

    ``block_indices``: int32 ``[B, S, G, topk]`` (``[T, G, topk]`` packed),
    distinct block numbers relative to the sequence start, ``-1`` in unused
    slots; ``layout``: the batched or packed layout of the tokens
    (``cu_seqlens``, ``max_seqlen``). :func:`msa.sparse_attention` and
    :func:`msa.index_kl_loss` take a Selection in place of ``block_indices``
    and do not check it again, and the structures the backends derive from
    it (the PyTorch path's tiles, the kernels' token offsets) are built on
    first use and kept, so the attention, its backward pass and the KL loss
    of a training step share them.

    Build one with ``msa.select_blocks(..., return_selection=True)`` or
    :meth:`from_indices`; the constructor trusts its arguments.
    """

    def __init__(self, block_indices: torch.Tensor, block_size: int, layout: Layout):
        self.block_indices, self.block_size, self.layout = block_indices, block_size, layout
        self._derived: dict = {}

    @classmethod
    def from_indices(cls, block_indices: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *,
                     cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> Selection:
        """Check ``block_indices`` once: int32 or int64 ``[B, S, G, topk]`` (``[T, G, topk]`` with int32
        ``cu_seqlens`` ``[n + 1]``), values in ``[-1, ceil(max_seqlen / block_size))``, distinct per row but -1."""
        check_block_size(block_size)
        layout = make_layout("block_indices", block_indices, cu_seqlens, max_seqlen, tail=("G", "topk"),
                             dtypes=INDEX_DTYPES)
        block_indices = check_block_indices(layout, block_indices, block_indices.shape[-2], block_size,
                                            block_indices.device)
        return cls(block_indices, block_size, layout)

    @property
    def cu_seqlens(self) -> torch.Tensor | None:
        return self.layout.cu_seqlens

    @property
    def max_seqlen(self) -> int:
        return self.layout.max_seqlen

    @property
    def n_groups(self) -> int:
        return self.block_indices.shape[-2]

    @property
    def topk(self) -> int:
        return self.block_indices.shape[-1]

    def _derive(self, key, build):
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def packed(self) -> torch.Tensor:
        """int32 ``[T, G, topk]``, contiguous."""
        return self._derive("packed", lambda: self.layout.pack(self.block_indices).contiguous())

    def token_starts(self) -> torch.Tensor:
        """int32 ``[T]``: the packed index of each token's sequence start (the kernels' launchers take it)."""
        return self._derive("token_starts", lambda: token_positions(self.layout.packed_cu_seqlens,
                                                                    self.layout.total_tokens)[0].int())

    def tile_plan(self, heads_per_group: int, head_dim: int) -> list[torch.Tensor]:
        """The PyTorch path's tiles (:func:`msa.ops.library.tile_plan`) for attention heads of ``head_dim`` in
        groups of ``heads_per_group``: the attention, its backward pass and the KL loss take the same."""
        pairs_per_chunk = block_outer.forward_chunk_pairs(heads_per_group, head_dim)
        return self._derive(("tile_plan", heads_per_group, pairs_per_chunk), lambda: library.tile_plan(
            self.packed(), self.layout.packed_cu_seqlens, self.block_size, heads_per_group, pairs_per_chunk))


def layout_of(block_indices, block_size, name: str, x, cu_seqlens, max_seqlen) -> Layout:
    """The layout of an op's inputs, ``x`` its first (named ``name``): the Selection's, if ``block_indices`` is one
    (``x`` must be of its tokens, the other arguments None or its own), else read from ``x``."""
    if not isinstance(block_indices, Selection):
        check_block_size(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
        return make_layout(name, x, cu_seqlens, max_seqlen)
    if block_size is not None and block_size != block_indices.block_size:
        raise ValueError(f"block_size={block_size} differs from the Selection's block_size={block_indices.block_size} "
                         "(leave it None)")
    if (cu_seqlens is not None and cu_seqlens is not block_indices.cu_seqlens) or \
            (max_seqlen is not None and max_seqlen != block_indices.max_seqlen):
        raise ValueError("cu_seqlens and max_seqlen come with the Selection: leave them None")
    layout = block_indices.layout
    check_tensor(name, x, len(layout.lead) + 2, layout.describe("H", "D"))
    if tuple(x.shape[:-2]) != layout.lead:
        raise ValueError(f"{name} must have shape {layout.describe('H', 'D')} with the Selection's "
                         f"{list(layout.lead)}, got {tuple(x.shape)}")
    return layout


def selection_of(block_indices, block_size, layout: Layout, n_groups: int, device: torch.device) -> Selection:
    """``block_indices`` as a :class:`Selection` of ``n_groups`` groups on ``device``: a Selection as it is, raw
    indices checked once (see :func:`~msa.ops.checks.check_block_indices`)."""
    if not isinstance(block_indices, Selection):
        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        return Selection(check_block_indices(layout, block_indices, n_groups, block_size, device), block_size, layout)
    if block_indices.n_groups != n_groups:
        raise ValueError(f"block_indices (a Selection) must have shape {layout.describe('G', 'topk')} with "
                         f"G={n_groups}, got {tuple(block_indices.block_indices.shape)}")
    if block_indices.block_indices.device != device:
        raise ValueError(f"block_indices (a Selection) must be on {device}, got {block_indices.block_indices.device}")
    return block_indices
