"""Key-block-outer sparse attention and KL loss: the PyTorch path on CPUs.

Every (query, group, listed block) whose block holds a key the query sees is
a *pair*. The pairs are sorted by the key block they read and cut into tiles
of at most ``P`` pairs of one block, as in the KV-outer GPU kernels: a tile
multiplies its pairs' query heads ``[P * R, D]`` by the block's keys
``[B, D]`` in one matmul, so a key block is read once per tile instead of
once per query, and unused slots of ``block_indices`` cost nothing. Tiles
are processed in batches small enough for their scores to stay in cache.
The forward pass keeps each pair's unnormalised output and LSE, merges the
LSEs of a query's pairs, then scatter-adds the outputs with their weights;
the backward pass recomputes the scores from the final LSEs, and
scatter-adds dq into the queries' rows and dk, dv into the keys' rows. The
KL loss first merges the student's (and unless given the teacher's) LSEs,
then computes the loss and its gradients in a second pass. Tiles are built
per chunk of queries, so memory stays linear in T; :func:`plan` returns them
as a :class:`TilePlan` of tensors, built once per selection and shared by the
forward pass, the backward pass and the KL loss.

All tensors are packed and contiguous: ``q`` ``[T, Hq, D]``, ``k``/``v``
``[T, G, D]``, ``index_q`` ``[T, G, Di]``, ``index_k`` ``[T, 1, Di]``, int32
``block_indices`` ``[T, G, K]`` and ``cu_seqlens`` ``[n + 1]``; query head
``h`` belongs to group ``h // R`` with ``R = Hq // G``. The *row* of a
(token, group) is ``token * G + group``, its index in ``[T * G, ...]`` views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from msa.varlen import suffix_positions

# Pairs per chunk of queries: bounds the memory of a call (the tiles' indices).
_CHUNK_PAIRS = 2**17
# Elements of the forward pass's per-pair partial outputs [pairs, R * D] per chunk: small enough to be reused
# from chunk to chunk rather than mapped afresh.
_FORWARD_ELEMENTS = 2**22
# Elements of one batch of tiles' [tiles, P * R, B] scores: small enough to stay in cache.
_BATCH_ELEMENTS = 2**18
# Query-head rows per tile: the M of a tile's matmuls.
_TILE_ROWS = 128


@dataclass
class Tiles:
    """The pairs of the ``C * G`` rows from ``first_row`` in ``n_tiles`` tiles of ``P`` slots, masked tiles last.

    ``query_rows``: int64 ``[n * P]``, the row of each slot's query
    (``first_row`` in an empty slot, which ``empty`` marks). ``key_tokens``:
    int64 ``[n, B]``, the packed token of each key of the tile's block
    (clamped to the last key); ``key_rows``: the rows of the same keys. Tiles
    from ``first_masked`` on hold pairs whose query sees only part of the
    block: ``hidden`` ``[n - first_masked, P, 1, B]`` marks the keys it does
    not see. ``pair_slots``: int64 ``[C * G, K]``, the slot of each entry of
    ``block_indices``, or ``n * P`` (the extra slot of :meth:`lse_buffer`)
    where it is no pair.
    """

    n_tiles: int
    pairs_per_tile: int
    first_row: int
    query_rows: torch.Tensor
    empty: torch.Tensor
    key_tokens: torch.Tensor
    key_rows: torch.Tensor
    first_masked: int
    hidden: torch.Tensor
    pair_slots: torch.Tensor

    @property
    def n_slots(self) -> int:
        return self.n_tiles * self.pairs_per_tile

    def batches(self, elements_per_tile: int):
        """Consecutive ranges of tiles whose scores take about ``_BATCH_ELEMENTS`` elements:
        ``(first tile, number of tiles, their slots)``."""
        step = max(1, _BATCH_ELEMENTS // elements_per_tile)
        for first in range(0, self.n_tiles, step):
            count = min(step, self.n_tiles - first)
            yield first, count, slice(first * self.pairs_per_tile, (first + count) * self.pairs_per_tile)

    def hide(self, scores: torch.Tensor, first: int) -> torch.Tensor:
        """``-inf`` in place at the unseen keys of ``scores`` ``[tiles, P, R, B]``, of tiles ``first ..``."""
        masked, last = max(first, self.first_masked), first + scores.shape[0]
        if masked < last:
            scores[masked - first:].masked_fill_(self.hidden[masked - self.first_masked:last - self.first_masked],
                                                 -math.inf)
        return scores

    def lse_buffer(self, like: torch.Tensor, width: int) -> torch.Tensor:
        """Uninitialised per-slot LSEs ``[n * P + 1, width]``, ``-inf`` in the extra slot (see :meth:`merge_lse`)."""
        buffer = like.new_empty(self.n_slots + 1, width)
        buffer[-1] = -math.inf
        return buffer

    def per_slot(self, row_values: torch.Tensor, slots: slice, empty_value: float) -> torch.Tensor:
        """``row_values`` ``[C * G, X]`` -> ``[len(slots), X]``: the values of the slots' rows, ``empty_value`` in
        empty slots."""
        values = row_values.index_select(0, self.query_rows[slots] - self.first_row)
        return values.masked_fill_(self.empty[slots, None], empty_value)

    def merge_lse(self, slot_lse: torch.Tensor) -> torch.Tensor:
        """Per-slot LSEs (an :meth:`lse_buffer` ``[n * P + 1, X]``) -> the rows' LSEs ``[C * G, X]`` over all the
        blocks they list."""
        pair_lse = slot_lse.index_select(0, self.pair_slots.flatten()).view(*self.pair_slots.shape, -1)
        return torch.logsumexp(pair_lse, dim=1)


class TilePlan(NamedTuple):
    """The tiles of all chunks of queries as tensors (what the custom operators take); :func:`tiles_of` cuts them
    into each chunk's :class:`Tiles`.

    ``query_rows``, ``empty``: ``[N * P]``; ``key_tokens``, ``key_rows``:
    ``[N, B]``; ``hidden``: ``[M, P, B]`` for the ``M`` masked tiles;
    ``pair_slots``: ``[T * G, K]``, slots numbered from each chunk's first;
    ``chunks``: int64 ``[n_chunks, 4]``, each chunk's first row, end row,
    number of tiles and of masked tiles. Tiles are in chunk order.
    """

    query_rows: torch.Tensor
    empty: torch.Tensor
    key_tokens: torch.Tensor
    key_rows: torch.Tensor
    hidden: torch.Tensor
    pair_slots: torch.Tensor
    chunks: torch.Tensor


def forward_chunk_pairs(heads_per_group: int, head_dim: int) -> int:
    """Pairs per chunk of the plans of attention and the KL loss: the forward pass's partial outputs of a chunk
    stay within ``_FORWARD_ELEMENTS``."""
    return max(1, _FORWARD_ELEMENTS // (heads_per_group * head_dim))


def plan(block_indices, cu_seqlens, block_size: int, heads_per_group: int, pairs_per_chunk: int = _CHUNK_PAIRS, *,
         cu_seqlens_k=None, n_keys: int | None = None):
    """The tiles of ``block_indices`` ``[T, G, K]``, per chunk of queries of about ``pairs_per_chunk`` pairs.

    ``cu_seqlens_k`` and ``n_keys``: the offsets and number of the packed keys
    when each sequence's queries (``cu_seqlens``) are the last of its keys;
    default: the queries' own. Returns the :class:`TilePlan` of all chunks,
    whose lists are sorted at once.
    """
    n_tokens, n_groups, topk = block_indices.shape
    n_keys = n_tokens if n_keys is None else n_keys
    device = block_indices.device
    tokens_per_chunk = max(1, pairs_per_chunk // (n_groups * topk))
    n_chunks = -(-n_tokens // tokens_per_chunk)
    pairs_per_tile = max(1, _TILE_ROWS // heads_per_group)
    starts, positions = suffix_positions(cu_seqlens, cu_seqlens if cu_seqlens_k is None else cu_seqlens_k, n_tokens)
    first_key = (block_indices.long() * block_size).flatten()  # position of each block's first key in its sequence
    query_position = positions.repeat_interleave(n_groups * topk)
    pair_ids = ((block_indices.flatten() >= 0) & (first_key <= query_position)).nonzero().squeeze(1)
    first_key, query_position = first_key[pair_ids], query_position[pair_ids]
    masked = first_key + block_size - 1 > query_position
    token, group = pair_ids // (n_groups * topk), pair_ids // topk % n_groups
    block_start = starts[token] + first_key  # packed token of the block's first key
    # One list per (chunk, masked, group, key block), a chunk's unmasked lists first; each list is cut into tiles.
    list_key = (((token // tokens_per_chunk) * 2 + masked) * n_groups + group) * (n_keys + 1) + block_start
    order = torch.argsort(list_key, stable=True)
    pair_ids, first_key, masked, group, block_start, list_key = (
        x[order] for x in (pair_ids, first_key, masked, group, block_start, list_key))
    _, list_sizes = torch.unique_consecutive(list_key, return_counts=True)
    tiles_per_list = (list_sizes + pairs_per_tile - 1) // pairs_per_tile
    first_pair = list_sizes.cumsum(0) - list_sizes
    first_slot = (tiles_per_list.cumsum(0) - tiles_per_list) * pairs_per_tile
    n_pairs, n_tiles = pair_ids.numel(), int(tiles_per_list.sum())
    list_of_pair = torch.repeat_interleave(torch.arange(list_sizes.numel(), device=device), list_sizes,
                                           output_size=n_pairs)
    slot_of_pair = (first_slot - first_pair)[list_of_pair] + torch.arange(n_pairs, device=device)
    slot_pair = torch.full((n_tiles * pairs_per_tile,), -1, dtype=torch.int64, device=device)
    slot_pair[slot_of_pair] = pair_ids
    empty = slot_pair < 0
    slot_pair.clamp_(min=0)
    pair_slots = torch.full((n_tokens * n_groups * topk,), n_tiles * pairs_per_tile, dtype=torch.int64,
                            device=device)
    pair_slots[pair_ids] = slot_of_pair
    pair_slots = pair_slots.view(n_tokens * n_groups, topk)

    tile_pair = torch.repeat_interleave(first_pair, tiles_per_list, output_size=n_tiles)  # a pair of each tile
    tile_chunk, tile_masked = pair_ids[tile_pair] // (n_groups * topk * tokens_per_chunk), masked[tile_pair]
    offsets = torch.arange(block_size, device=device)
    key_tokens = (block_start[tile_pair, None] + offsets).clamp_(max=max(n_keys - 1, 0))
    key_rows = key_tokens * n_groups + group[tile_pair, None]
    slot_position = positions[slot_pair // (n_groups * topk)].masked_fill_(empty, n_keys + block_size)
    chunk_first_row = (tile_chunk * (tokens_per_chunk * n_groups)).repeat_interleave(pairs_per_tile)
    query_rows = torch.where(empty, chunk_first_row, slot_pair // topk)
    masked_tiles = tile_masked.nonzero().squeeze(1)
    hidden = first_key[tile_pair[masked_tiles], None, None] + offsets \
        > slot_position.view(n_tiles, pairs_per_tile)[masked_tiles, :, None]
    tiles_per_chunk = torch.bincount(tile_chunk, minlength=n_chunks)
    chunk_ids = torch.arange(n_chunks, device=device)
    end_rows = ((chunk_ids + 1) * tokens_per_chunk).clamp_(max=n_tokens) * n_groups
    chunks = torch.stack([chunk_ids * tokens_per_chunk * n_groups, end_rows, tiles_per_chunk,
                          torch.bincount(tile_chunk[tile_masked], minlength=n_chunks)], dim=1)
    # each chunk's slots from 0, the extra slot of Tiles.lse_buffer where an entry is no pair
    chunk_slots = tiles_per_chunk * pairs_per_tile
    row_chunk = torch.arange(n_tokens * n_groups, device=device) // (tokens_per_chunk * n_groups)
    pair_slots = torch.minimum(pair_slots - (chunk_slots.cumsum(0) - chunk_slots)[row_chunk, None],
                               chunk_slots[row_chunk, None])
    return TilePlan(query_rows, empty, key_tokens, key_rows, hidden, pair_slots, chunks)


def tiles_of(tile_plan: TilePlan) -> list[tuple[slice, Tiles]]:
    """Each chunk's slice of the ``[T * G]`` rows and its :class:`Tiles` (views of ``tile_plan``)."""
    pairs_per_tile = tile_plan.hidden.shape[1]
    chunks, first_tile, first_hidden = [], 0, 0
    for first_row, end_row, n_tiles, n_masked in tile_plan.chunks.tolist():
        rows, tiles = slice(first_row, end_row), slice(first_tile, first_tile + n_tiles)
        slots = slice(first_tile * pairs_per_tile, (first_tile + n_tiles) * pairs_per_tile)
        chunks.append((rows, Tiles(
            n_tiles, pairs_per_tile, first_row, tile_plan.query_rows[slots], tile_plan.empty[slots],
            tile_plan.key_tokens[tiles], tile_plan.key_rows[tiles], n_tiles - n_masked,
            tile_plan.hidden[first_hidden:first_hidden + n_masked].unsqueeze(2), tile_plan.pair_slots[rows])))
        first_tile, first_hidden = first_tile + n_tiles, first_hidden + n_masked
    return chunks


def _gather(rows_view: torch.Tensor, rows: torch.Tensor, *shape: int) -> torch.Tensor:
    return rows_view.index_select(0, rows.flatten()).view(*shape)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return lse.masked_fill(lse == -math.inf, 0.0)


def _add_rows(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, deterministic: bool) -> None:
    """``target[index[i]] += rows[i]``. On CPUs ``index_add_`` adds in order; on GPUs it adds with atomics, in no
    fixed order, unless deterministic algorithms are on (it then calls ``index_put_(accumulate=True)``, which adds
    after a stable sort of the indices): ``deterministic`` asks for that for this call."""
    if deterministic and target.is_cuda:
        target.index_put_((index,), rows, accumulate=True)
    else:
        target.index_add_(0, index, rows)


def attention_forward(q, k, v, chunks, block_size: int, scale: float, deterministic: bool = False):
    """Returns ``out`` ``[T, Hq, D]`` and ``lse`` ``[T, Hq]`` (``-inf``, with ``out`` 0, where no key is seen);
    ``deterministic``: see :func:`_add_rows`."""
    n_heads, head_dim = q.shape[1:]
    heads_per_group = n_heads // k.shape[1]
    row_width = heads_per_group * head_dim
    q_rows, k_rows, v_rows = q.view(-1, row_width), k.view(-1, head_dim), v.view(-1, head_dim)
    out, lse = torch.zeros_like(q_rows), q.new_empty(q_rows.shape[0], heads_per_group)
    # per-slot buffers, allocated once: unnormalised outputs exp(scores - slot_max) @ values, and slot_max
    most_slots = max((tiles.n_slots for _, tiles in chunks), default=0)
    out_buffer, max_buffer = q.new_empty(most_slots, row_width), q.new_empty(most_slots, heads_per_group)
    for rows, tiles in chunks:
        tile_rows = tiles.pairs_per_tile * heads_per_group
        slot_out, slot_max = out_buffer[:tiles.n_slots], max_buffer[:tiles.n_slots]
        slot_lse = tiles.lse_buffer(q, heads_per_group)
        for first, count, slots in tiles.batches(tile_rows * block_size):
            keys = _gather(k_rows, tiles.key_rows[first:first + count], count, block_size, head_dim).mul_(scale)
            values = _gather(v_rows, tiles.key_rows[first:first + count], count, block_size, head_dim)
            queries = _gather(q_rows, tiles.query_rows[slots], count, tile_rows, head_dim)
            scores = torch.bmm(queries, keys.transpose(1, 2))
            tiles.hide(scores.view(count, -1, heads_per_group, block_size), first)
            row_max = scores.amax(-1, keepdim=True)
            probs = scores.sub_(row_max).exp_()
            torch.bmm(probs, values, out=slot_out[slots].view(count, tile_rows, head_dim))
            slot_max[slots] = row_max.view(-1, heads_per_group)
            slot_lse[slots] = probs.sum(-1).log_().view(-1, heads_per_group).add_(slot_max[slots])
        lse[rows] = tiles.merge_lse(slot_lse)
        weights = slot_max.sub_(tiles.per_slot(_finite(lse[rows]), slice(None), math.inf)).exp_()  # empty slots: 0
        _add_rows(out, tiles.query_rows, slot_out.view(-1, heads_per_group, head_dim).mul_(weights.unsqueeze(-1))
                  .view(-1, row_width), deterministic)
    return out.view_as(q), lse.view(q.shape[:2])


def attention_backward(q, k, v, out, lse, dout, chunks, block_size: int, scale: float, deterministic: bool = False):
    """Gradients ``dq, dk, dv`` of :func:`attention_forward`'s ``out`` for the upstream ``dout`` (``deterministic``:
    see :func:`_add_rows`)."""
    n_heads, head_dim = q.shape[1:]
    heads_per_group = n_heads // k.shape[1]
    row_width = heads_per_group * head_dim
    q_rows, k_rows, v_rows = q.view(-1, row_width), k.view(-1, head_dim), v.view(-1, head_dim)
    dout_rows = dout.view(-1, row_width)
    lse_rows, delta_rows = lse.view(-1, heads_per_group), (dout * out).sum(-1).view(-1, heads_per_group)
    dq_rows, dk_rows, dv_rows = torch.zeros_like(q_rows), torch.zeros_like(k_rows), torch.zeros_like(v_rows)
    for rows, tiles in chunks:
        tile_rows = tiles.pairs_per_tile * heads_per_group
        for first, count, slots in tiles.batches(tile_rows * block_size):
            key_rows = tiles.key_rows[first:first + count].flatten()
            keys = _gather(k_rows, key_rows, count, block_size, head_dim).mul_(scale)
            values = _gather(v_rows, key_rows, count, block_size, head_dim)
            queries = _gather(q_rows, tiles.query_rows[slots], count, tile_rows, head_dim)
            grad_out = _gather(dout_rows, tiles.query_rows[slots], count, tile_rows, head_dim)
            scores = torch.bmm(queries, keys.transpose(1, 2))
            tiles.hide(scores.view(count, -1, heads_per_group, block_size), first)
            slot_lse = tiles.per_slot(lse_rows[rows], slots, math.inf)  # empty slots: probabilities 0
            probs = scores.sub_(slot_lse.view(count, tile_rows, 1)).exp_()
            _add_rows(dv_rows, key_rows, torch.bmm(probs.transpose(1, 2), grad_out).view(-1, head_dim), deterministic)
            dscores = torch.bmm(grad_out, values.transpose(1, 2))
            dscores.sub_(tiles.per_slot(delta_rows[rows], slots, 0.0).view(count, tile_rows, 1)).mul_(probs)
            _add_rows(dk_rows, key_rows, torch.bmm(dscores.transpose(1, 2), queries).mul_(scale).view(-1, head_dim),
                      deterministic)
            _add_rows(dq_rows, tiles.query_rows[slots], torch.bmm(dscores, keys).view(-1, row_width), deterministic)
    return dq_rows.view_as(q), dk_rows.view_as(k), dv_rows.view_as(v)


def _index_logits(tiles: Tiles, iq_rows, ik_rows, first: int, count: int, slots: slice, scale: float):
    """The index queries ``[count, P, Di]``, keys ``[count, B, Di]`` and logits ``[count, P, B]`` of a batch."""
    block_size = tiles.key_tokens.shape[1]
    index_queries = _gather(iq_rows, tiles.query_rows[slots], count, -1, iq_rows.shape[1])
    index_keys = _gather(ik_rows, tiles.key_tokens[first:first + count], count, block_size, ik_rows.shape[1])
    return index_queries, index_keys, torch.bmm(index_queries, index_keys.transpose(1, 2)).mul_(scale)


def _head_logits(tiles: Tiles, q_rows, k_rows, first: int, count: int, slots: slice, scale: float, heads: int):
    """The Main Branch's logits ``[count, P, R, B]`` of a batch, ``-inf`` at unseen keys."""
    block_size, head_dim = tiles.key_tokens.shape[1], k_rows.shape[1]
    keys = _gather(k_rows, tiles.key_rows[first:first + count], count, block_size, head_dim).mul_(scale)
    logits = torch.bmm(_gather(q_rows, tiles.query_rows[slots], count, -1, head_dim), keys.transpose(1, 2))
    return tiles.hide(logits.view(count, -1, heads, block_size), first)


def support_lse(index_q, index_k, block_indices, cu_seqlens, block_size: int, scale: float,
                cu_seqlens_k=None) -> torch.Tensor:
    """LSE ``[T, G]`` of the index logits over the visible keys of each row's listed blocks (``cu_seqlens_k``: as
    in :func:`plan`)."""
    iq_rows, ik_rows = index_q.view(-1, index_q.shape[-1]), index_k.view(-1, index_k.shape[-1])
    lse = index_q.new_empty(iq_rows.shape[0], 1)
    for rows, tiles in tiles_of(plan(block_indices, cu_seqlens, block_size, 1, cu_seqlens_k=cu_seqlens_k,
                                     n_keys=index_k.shape[0])):
        slot_lse = tiles.lse_buffer(index_q, 1)
        for first, count, slots in tiles.batches(tiles.pairs_per_tile * block_size):
            logits = _index_logits(tiles, iq_rows, ik_rows, first, count, slots, scale)[2]
            slot_lse[slots] = torch.logsumexp(tiles.hide(logits.unsqueeze(2), first), dim=-1).view(-1, 1)
        lse[rows] = tiles.merge_lse(slot_lse)
    return lse.view(index_q.shape[:2])


def index_kl(q, k, index_q, index_k, chunks, block_size: int, scale: float, index_scale: float,
             main_lse: torch.Tensor | None, with_grads: bool, deterministic: bool = False):
    """Sum over rows of KL(teacher || student) on the support that ``chunks`` (:func:`tiles_of`) tile, and its
    gradients in ``index_q`` and ``index_k`` (None without ``with_grads``). ``main_lse`` ``[T, Hq]``: the teacher's
    LSEs, if known; ``deterministic``: see :func:`_add_rows`."""
    n_heads, head_dim = q.shape[1:]
    heads_per_group = n_heads // k.shape[1]
    q_rows, k_rows = q.view(-1, heads_per_group * head_dim), k.view(-1, head_dim)
    iq_rows, ik_rows = index_q.view(-1, index_q.shape[-1]), index_k.view(-1, index_k.shape[-1])
    d_iq_rows, d_ik_rows = (torch.zeros_like(iq_rows), torch.zeros_like(ik_rows)) if with_grads else (None, None)
    total = q.new_zeros(())
    for rows, tiles in chunks:
        tile_rows = tiles.pairs_per_tile * heads_per_group
        # The supports' normalisations first: the student's, and the teacher's unless given.
        slot_index_lse = tiles.lse_buffer(index_q, 1)
        slot_head_lse = tiles.lse_buffer(q, heads_per_group) if main_lse is None else None
        for first, count, slots in tiles.batches(tile_rows * block_size):
            logits = _index_logits(tiles, iq_rows, ik_rows, first, count, slots, index_scale)[2]
            slot_index_lse[slots] = torch.logsumexp(tiles.hide(logits.unsqueeze(2), first), dim=-1).view(-1, 1)
            if main_lse is None:
                head_logits = _head_logits(tiles, q_rows, k_rows, first, count, slots, scale, heads_per_group)
                slot_head_lse[slots] = torch.logsumexp(head_logits, dim=-1).view(-1, heads_per_group)
        index_lse = tiles.merge_lse(slot_index_lse)
        head_lse = tiles.merge_lse(slot_head_lse) if main_lse is None else main_lse.view(-1, heads_per_group)[rows]
        for first, count, slots in tiles.batches(tile_rows * block_size):
            head_logits = _head_logits(tiles, q_rows, k_rows, first, count, slots, scale, heads_per_group)
            slot_head = tiles.per_slot(head_lse, slots, math.inf).view(count, -1, heads_per_group, 1)
            teacher = head_logits.sub_(slot_head).exp_().mean(2)  # [count, P, B]; 0 at unseen keys, empty slots
            index_queries, index_keys, logits = _index_logits(tiles, iq_rows, ik_rows, first, count, slots,
                                                              index_scale)
            slot_index = tiles.per_slot(index_lse, slots, math.inf).view(count, -1, 1)
            # the student's LSE is inf in empty slots (whose teacher is 0): their NaN terms are dropped
            kl_slots = (torch.xlogy(teacher, teacher) - teacher * (logits - slot_index)).sum(-1)
            total += kl_slots.view(-1).masked_fill_(tiles.empty[slots], 0.0).sum()
            if with_grads:  # d KL / d index logit = student - teacher (the teacher has unit mass)
                student = tiles.hide(logits.unsqueeze(2), first).squeeze(2).sub_(slot_index).exp_()
                d_logits = student.sub_(teacher).mul_(index_scale)
                _add_rows(d_iq_rows, tiles.query_rows[slots], torch.bmm(d_logits, index_keys).flatten(0, 1),
                          deterministic)
                _add_rows(d_ik_rows, tiles.key_tokens[first:first + count].flatten(),
                          torch.bmm(d_logits.transpose(1, 2), index_queries).flatten(0, 1), deterministic)
    if not with_grads:
        return total, None, None
    return total, d_iq_rows.view_as(index_q), d_ik_rows.view_as(index_k)
