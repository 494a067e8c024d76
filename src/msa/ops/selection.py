"""``Selection``: a block selection validated once, and what the backends derive from it, built once."""

from __future__ import annotations

from typing import NamedTuple

import torch

from msa.ops import block_outer, library
from msa.ops.checks import (
    INDEX_DTYPES, Layout, check_block_indices, check_block_size, check_tensor, make_key_layout, make_layout,
    resolve_varlen,
)
from msa.varlen import suffix_positions, token_positions

DEFAULT_BLOCK_SIZE = 128


class KernelOffsets(NamedTuple):
    """The arguments of the Triton operators (:mod:`msa.ops.library`) that place a Selection's queries among their
    keys: ``token_starts``, int32 ``[T]``, the packed index of each query's sequence's first key; where the queries
    are the last of longer key sequences, ``token_positions``, int32 ``[T]``, each query's position among its keys,
    and the keys' ``cu_seqlens_k`` and ``max_seqlen_k`` (else None)."""

    token_starts: torch.Tensor
    token_positions: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_k: int | None = None


class Selection:
    """The blocks each (query, GQA group) attends to, with their block size and token layout.

    ``block_indices``: int32 ``[B, S, G, topk]`` (``[T, G, topk]`` packed),
    distinct block numbers relative to the sequence start, ``-1`` in unused
    slots; ``layout``: the batched or packed layout of the tokens
    (``cu_seqlens``, ``max_seqlen``); ``key_layout``: that of the keys when
    the queries are the suffix of longer key sequences (block ids count key
    blocks), else ``layout`` itself. :func:`msa.sparse_attention` and
    :func:`msa.index_kl_loss` take a Selection in place of ``block_indices``
    and do not check it again, and the structures the backends derive from
    it (the PyTorch path's tiles, the kernels' token offsets) are built on
    first use and kept, so the attention, its backward pass and the KL loss
    of a training step share them.

    Build one with ``msa.select_blocks(..., return_selection=True)`` or
    :meth:`from_indices`; the constructor trusts its arguments. ``ranked``:
    the rows are in the selection contract's order (``select_blocks`` makes
    them so), which :meth:`top` needs.
    """

    def __init__(self, block_indices: torch.Tensor, block_size: int, layout: Layout, key_layout: Layout | None = None,
                 *, ranked: bool = False):
        self.block_indices, self.block_size, self.layout = block_indices, block_size, layout
        self.key_layout = layout if key_layout is None else key_layout
        self.ranked = ranked
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
    def suffix(self) -> bool:
        """Whether the queries are the suffix of longer key sequences."""
        return self.key_layout is not self.layout

    @property
    def n_groups(self) -> int:
        return self.block_indices.shape[-2]

    @property
    def topk(self) -> int:
        return self.block_indices.shape[-1]

    def top(self, topk: int) -> Selection:
        """The selection of the best ``topk`` blocks, cut from this wider ranked one without scoring again.

        Under the selection contract a row holds the earlier blocks in descending score, then the local block,
        then -1s; ``select_blocks(..., topk=topk)`` on the same inputs is therefore this row's first ``topk``
        entries with the local block moved into slot ``topk - 1`` where the row holds more than ``topk`` blocks.
        So one index scoring pass serves the attention's selection and a wider KL support (``kl_topk``).
        """
        if not self.ranked:
            raise ValueError("Selection.top needs a ranked selection (from msa.select_blocks), not one of given "
                             "block_indices, whose order is not known")
        if not isinstance(topk, int) or not 1 <= topk <= self.topk:
            raise ValueError(f"topk must be an int in [1, {self.topk}] (the Selection's topk), got {topk!r}")
        if topk == self.topk:
            return self
        blocks = self.block_indices
        count = (blocks >= 0).sum(-1, keepdim=True)
        local = blocks.gather(-1, (count - 1).clamp_min(0))
        head = blocks[..., :topk].clone()
        head[..., -1:] = torch.where(count > topk, local, head[..., -1:])
        return Selection(head, self.block_size, self.layout, self.key_layout, ranked=True)

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

    def kernel_offsets(self) -> KernelOffsets:
        """Where the queries sit among their keys, as the Triton operators take it (:class:`KernelOffsets`)."""
        if not self.suffix:
            return KernelOffsets(self.token_starts())

        def build():
            starts, positions = suffix_positions(self.layout.packed_cu_seqlens, self.key_layout.packed_cu_seqlens,
                                                 self.layout.total_tokens)
            return starts.int(), positions.int()

        starts, positions = self._derive("suffix_positions", build)
        return KernelOffsets(starts, positions, self.key_layout.packed_cu_seqlens, self.key_layout.max_seqlen)

    def block_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The Triton kernels' (group, block) -> (token, slot) lists of the whole selection (the ``offsets`` and
        ``entries`` of :func:`msa.kernels.invert_selection`): the attention's forward, its backward and the KL loss
        walk the same lists, built once."""
        from msa import kernels

        def build():
            lists = kernels.invert_selection(self.packed(), self.layout.packed_cu_seqlens, self.key_layout.max_seqlen,
                                             self.block_size)
            return lists.offsets, lists.entries

        return self._derive("block_lists", build)

    def tile_plan(self, heads_per_group: int, head_dim: int) -> list[torch.Tensor]:
        """The PyTorch path's tiles (:func:`msa.ops.library.tile_plan`) for attention heads of ``head_dim`` in
        groups of ``heads_per_group``: the attention, its backward pass and the KL loss take the same."""
        pairs_per_chunk = block_outer.forward_chunk_pairs(heads_per_group, head_dim)
        return self._derive(("tile_plan", heads_per_group, pairs_per_chunk), lambda: library.tile_plan(
            self.packed(), self.layout.packed_cu_seqlens, self.key_layout.packed_cu_seqlens,
            self.key_layout.total_tokens, self.block_size, heads_per_group, pairs_per_chunk))


def layouts_of(block_indices, block_size, q_name: str, q, k_name: str, k, varlen: dict) -> tuple[Layout, Layout]:
    """The layouts of an op's queries ``q`` and keys ``k``: the Selection's, if ``block_indices`` is one (``q``
    and ``k`` must be of its tokens, the other arguments None or its own), else read from them. ``varlen``: the
    op's ``cu_seqlens``, ``max_seqlen``, ``cu_seqlens_q``, ``cu_seqlens_k``, ``max_seqlen_q``, ``max_seqlen_k``."""
    if not isinstance(block_indices, Selection):
        check_block_size(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
        cu_q, max_q, cu_k, max_k = resolve_varlen(**varlen)
        layout = make_layout(q_name, q, cu_q, max_q)
        return layout, make_key_layout(layout, k_name, k, cu_k, max_k)
    if block_size is not None and block_size != block_indices.block_size:
        raise ValueError(f"block_size={block_size} differs from the Selection's block_size={block_indices.block_size} "
                         "(leave it None)")
    layout, key_layout = block_indices.layout, block_indices.key_layout
    own = dict(cu_seqlens=layout.cu_seqlens, max_seqlen=layout.max_seqlen, cu_seqlens_q=layout.cu_seqlens,
               max_seqlen_q=layout.max_seqlen, cu_seqlens_k=key_layout.cu_seqlens, max_seqlen_k=key_layout.max_seqlen)
    for name, value in varlen.items():
        if value is not None and value is not own[name] and not (isinstance(value, int) and value == own[name]):
            raise ValueError(f"{name} comes with the Selection: leave it None")
    for name, x, layout in ((q_name, q, block_indices.layout), (k_name, k, block_indices.key_layout)):
        check_tensor(name, x, len(layout.lead) + 2, layout.describe("H", "D"))
        if tuple(x.shape[:-2]) != layout.lead:
            raise ValueError(f"{name} must have shape {layout.describe('H', 'D')} with the Selection's "
                             f"{list(layout.lead)}, got {tuple(x.shape)}")
    return block_indices.layout, block_indices.key_layout


def selection_of(block_indices, block_size, layout: Layout, key_layout: Layout, n_groups: int,
                 device: torch.device) -> Selection:
    """``block_indices`` as a :class:`Selection` of ``n_groups`` groups on ``device``: a Selection as it is, raw
    indices checked once (see :func:`~msa.ops.checks.check_block_indices`)."""
    if not isinstance(block_indices, Selection):
        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        return Selection(check_block_indices(layout, block_indices, n_groups, block_size, device, key_layout),
                         block_size, layout, key_layout)
    if block_indices.n_groups != n_groups:
        raise ValueError(f"block_indices (a Selection) must have shape {layout.describe('G', 'topk')} with "
                         f"G={n_groups}, got {tuple(block_indices.block_indices.shape)}")
    if block_indices.block_indices.device != device:
        raise ValueError(f"block_indices (a Selection) must be on {device}, got {block_indices.block_indices.device}")
    return block_indices
