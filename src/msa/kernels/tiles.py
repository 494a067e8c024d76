"""What several kernel files share: launch helpers on the host, and tile helpers inside the kernels.

Host side: the interpreter flag (under ``TRITON_INTERPRET=1`` the kernels
compute their matrix products in float32, ``UPCAST``: the interpreter's bf16
``tl.dot`` is wrong), the default workspace budget of the chunked launchers,
the launch with its out-of-shared-memory retry, head constants, and the bound
of the narrowed Top-k. Device side: the exp-free Top-k rounds (the indexer's
and the paged Top-k), and the loads and list walks of the query-outer and
KV-outer schedules (the sparse attention and KL kernels).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Default workspace of the chunked launchers (block scores, KV-outer partials): longer inputs run in chunks.
WORKSPACE_BYTES = 4 << 30
# Top-k rows of at least this many elements (rounded up to a power of two) are narrowed to their candidates.
NARROW_FROM = 128

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
LOWEST = tl.constexpr(-3.4028234663852886e38)  # the lowest finite float32


def launch(kernel, grid, *args, **kwargs):
    """Launch; a configuration that runs out of shared memory on this GPU retries with one stage."""
    try:
        kernel[grid](*args, **kwargs)
    except triton.runtime.errors.OutOfResources:
        if kwargs.get("num_stages") == 1:
            raise
        kernel[grid](*args, **dict(kwargs, num_stages=1))


def pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


@functools.cache
def sm_count(device_index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device (``None``: the current one)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def head_constants(q: torch.Tensor, k: torch.Tensor) -> dict:
    """HQ, G, R (query heads per group) and D of packed ``q`` ``[T, HQ, D]`` and ``k`` ``[T, G, D]``."""
    n_heads, n_groups = q.shape[1], k.shape[1]
    return dict(HQ=n_heads, G=n_groups, R=n_heads // n_groups, D=q.shape[2])


def query_outer_heads(q: torch.Tensor, k: torch.Tensor) -> dict:
    """Head constants of a query-outer kernel: one token's R head rows, padded to RP >= 16 rows."""
    heads = head_constants(q, k)
    return dict(heads, RP=pow2(heads["R"], 16))


def key_layout(cu_seqlens, max_seqlen: int, cu_seqlens_k, max_seqlen_k) -> tuple:
    """The keys' ``cu_seqlens`` and longest sequence: ``cu_seqlens_k`` and ``max_seqlen_k`` where the queries are the
    last of longer key sequences, else (``cu_seqlens_k`` None) the queries' own."""
    return (cu_seqlens, max_seqlen) if cu_seqlens_k is None else (cu_seqlens_k, max_seqlen_k)


def query_position_args(token_starts: torch.Tensor, token_positions: torch.Tensor | None) -> dict:
    """The ``token_positions`` and ``SUFFIX`` arguments of the query-outer kernels (see :func:`query_position`):
    ``token_positions`` int32 ``[T]`` for queries that are the last of longer key sequences; None where a query's
    position is its packed index minus ``token_starts`` (which then stands in for the unread pointer)."""
    suffix = token_positions is not None
    return dict(token_positions=token_positions if suffix else token_starts, SUFFIX=suffix)


def narrowing_segments(n: int, k: int, narrow_from: int = NARROW_FROM) -> int:
    """Segments of ``write_top_narrowed``'s bound for a Top-``k`` of rows of ``n`` elements (at most a quarter of
    them), or 0 where the rounds run over whole rows (rows of fewer than ``narrow_from`` elements)."""
    segments = 2 * pow2(k)
    return segments if k > 0 and pow2(n) >= max(narrow_from, 4 * segments) else 0


@triton.jit
def pop_max(scores, index, N: tl.constexpr):
    """One round of an exp-free Top-k over the last axis of ``scores`` ``[R, N]``: each row's best score and
    the ``index`` (``[1, N]`` or ``[R, N]``, distinct per row, below N) of it (ties go to the lower index),
    and the scores with it removed."""
    best = tl.max(scores, axis=1)
    chosen = tl.min(tl.where(scores == best[:, None], index, N), axis=1)
    return best, chosen, tl.where(index == chosen[:, None], float("-inf"), scores)


@triton.jit
def write_top(scores, index, N: tl.constexpr, out, row_ok, local, K: tl.constexpr):
    """Stores each row's selection at ``out`` + 0 .. K: the ``index`` of its ``min(local, K)`` best ``scores``
    (``pop_max`` rounds: descending, equal scores to the lower index), then ``local`` ``[R]``, then -1.
    ``scores``: those of the row's ``local`` blocks before the local one (none -inf), -inf for the others."""
    for slot in tl.static_range(K):
        _, chosen, scores = pop_max(scores, index, N)
        tl.store(out + slot, tl.where(slot < local, chosen, tl.where(slot == local, local, -1)), mask=row_ok)
    tl.store(out + K, tl.where(local >= K, local, -1), mask=row_ok)


@triton.jit
def write_top_narrowed(scores, index, N: tl.constexpr, out, row_ok, local, K: tl.constexpr, scratch,
                       SEGMENTS: tl.constexpr, CANDIDATES: tl.constexpr):
    """:func:`write_top` over each row's candidates only. The maxima of SEGMENTS interleaved segments of a row
    are distinct elements, so their K-th best is a lower bound of the row's K-th best and the elements at or
    above it hold the answer, ties included (~22 of 4096 expected on i.i.d. scores, not counted on the GPU).
    They are compacted in index order into ``scratch`` (``[R, 1]`` pointers to a row's 2 * CANDIDATES floats:
    scores, then indices < 2**24); rows with more than CANDIDATES of them (ties) keep the rounds over all
    their elements."""
    ROWS: tl.constexpr = scores.shape[0]
    segment_max = tl.max(tl.reshape(scores, (ROWS, N // SEGMENTS, SEGMENTS)), axis=1)
    bound = tl.full((ROWS,), float("-inf"), tl.float32)
    for _round in tl.static_range(K):
        bound, _, segment_max = pop_max(segment_max, tl.arange(0, SEGMENTS)[None, :], SEGMENTS)
    is_candidate = (scores >= bound[:, None]) & (scores > float("-inf"))
    n_candidates = tl.sum(is_candidate.to(tl.int32), axis=1)
    if tl.max(n_candidates, axis=0) <= CANDIDATES:
        slot_of = tl.cumsum(is_candidate.to(tl.int32), axis=1) - 1
        tl.store(scratch + slot_of, scores, mask=is_candidate)
        tl.store(scratch + CANDIDATES + slot_of, index.to(tl.float32), mask=is_candidate)
        tl.debug_barrier()  # the stores above are read back by other threads of the program
        slots = tl.arange(0, CANDIDATES)[None, :]
        kept = slots < n_candidates[:, None]
        candidate_scores = tl.load(scratch + slots, mask=kept, other=float("-inf"))
        candidate_index = tl.load(scratch + CANDIDATES + slots, mask=kept, other=N).to(tl.int32)
        write_top(candidate_scores, candidate_index, N + 1, out, row_ok, local, K)
    else:
        write_top(scores, index, N, out, row_ok, local, K)


@triton.jit
def write_selection(scores, index, N: tl.constexpr, out, row_ok, local, K: tl.constexpr, scratch,
                    SEGMENTS: tl.constexpr, CANDIDATES: tl.constexpr):
    """Stores each row's selection in the layout of :func:`msa.reference.rank_blocks` at ``out`` + 0 .. K: the
    ``min(local, K)`` best of its blocks before ``local`` ``[R]`` (the ``index`` ``[1, N]`` or ``[R, N]`` of
    ``scores`` ``[R, N]``, whose other entries are ignored) in descending score, equal scores to the lower
    block, then ``local``, then -1. A -inf score ranks as the lowest float. With SEGMENTS > 0 the rounds run
    over each row's candidates (:func:`write_top_narrowed`, ``scratch``), else over whole rows."""
    earlier = tl.where(index < local[:, None], tl.maximum(scores, LOWEST), float("-inf"))
    if SEGMENTS > 0:
        write_top_narrowed(earlier, index, N, out, row_ok, local, K, scratch, SEGMENTS, CANDIDATES)
    else:
        write_top(earlier, index, N, out, row_ok, local, K)


@triton.jit
def load_block(ptr, start, block, pos, group, dims, G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Keys (or values) of ``block`` for one group, ``[BLOCK_SIZE, D]``, zero where not visible from ``pos``."""
    k_pos = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    visible = (block >= 0) & (k_pos <= pos)
    tile = tl.load(ptr + ((start + k_pos) * G + group)[:, None] * D + dims[None, :], mask=visible[:, None], other=0.0)
    return tile, visible


@triton.jit
def query_position(token, start, token_positions, SUFFIX: tl.constexpr):
    """The position among its keys of the query ``token`` (int64), whose sequence's first key is at ``start``: with
    SUFFIX the queries are the last of longer key sequences and ``token_positions`` holds the positions; without,
    a query's keys are the tokens of its sequence."""
    if SUFFIX:
        pos = tl.load(token_positions + token).to(tl.int64)
    else:
        pos = token - start
    return pos


@triton.jit
def query_program(q, token_starts, token_positions, HQ: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                  D: tl.constexpr, SUFFIX: tl.constexpr, UPCAST: tl.constexpr):
    """A query-outer program's token, group, the packed index of its sequence's first key, its position among the
    keys (:func:`query_position`), head rows and q tile ``[RP, D]``."""
    token = tl.program_id(0).to(tl.int64)  # offsets like token * HQ * D pass 2**31
    group = tl.program_id(1)
    start = tl.load(token_starts + token)
    pos = query_position(token, start, token_positions, SUFFIX)
    heads = tl.arange(0, RP)
    head_index = token * HQ + group * R + heads
    head_ok = heads < R
    q_tile = tl.load(q + head_index[:, None] * D + tl.arange(0, D)[None, :], mask=head_ok[:, None], other=0.0)
    if UPCAST:
        q_tile = q_tile.to(tl.float32)
    return token, group, start, pos, head_index, head_ok, q_tile


@triton.jit
def kv_block(cu_seqlens, cu_seqlens_k, block_slot, MAX_BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The block a KV-outer program owns: its sequence's key offset and length, its first key position, and the
    sequence's query origin, the packed index a query at key position 0 would have (a query's position is its
    packed index minus it: queries are the last keys of their sequence, ``cu_seqlens`` theirs)."""
    seq = block_slot // MAX_BLOCKS
    start = tl.load(cu_seqlens_k + seq)
    seqlen = tl.load(cu_seqlens_k + seq + 1) - start
    query_end = tl.load(cu_seqlens + seq + 1)
    return start, seqlen, (block_slot % MAX_BLOCKS) * BLOCK_SIZE, query_end - seqlen


@triton.jit
def entry_range(csr_offsets, n_block_slots, block_slot, group, LIST_PARTS: tl.constexpr):
    """Entries of this program's part (``program_id(2)`` of LIST_PARTS) of its (group, block) list.

    Splitting long lists (early blocks are visible to more queries, and often
    selected) keeps one program from serialising a whole sequence's worth of work.
    """
    first = tl.load(csr_offsets + group * n_block_slots + block_slot)
    count = tl.load(csr_offsets + group * n_block_slots + block_slot + 1) - first
    part = tl.program_id(2)
    return first + count * part // LIST_PARTS, first + count * (part + 1) // LIST_PARTS
