"""Triton kernels of the Index Branch: block scoring, max-pooling and exp-free Top-k, and the support LSE.

The ``[S, S]`` score matrix is never materialised. Two phases per chunk of
query positions (chunks bound the workspace): ``block_scores_kernel`` holds a
tile of queries x all GQA groups (they share the index key, so one key tile
feeds every group through one matrix product), max-pools each key tile's
logits per block and writes the pooled scores (float32, 1/block_size of the
logits); ``top_blocks_kernel`` picks each row's Top-k from them. The
tensor-core loop thus carries no Top-k insertion (a running Top-k in that loop
measured slower: see benchmarks/results/2026-11-23-h100-43-indexer-schedules).
Ranking needs no exponential and no softmax scale (max-pooling and Top-k are
monotone); each row is written in the layout of :func:`msa.reference.rank_blocks`
(the ranked earlier blocks, then the local block, then -1).

With ``SCALED`` the index vectors are FP8 rows (:mod:`msa.fp8`): FP8
products, each key's logits multiplied by its scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from msa.kernels.tiles import INTERPRET, NARROW_FROM, WORKSPACE_BYTES, key_layout, launch, narrowing_segments, pow2, \
    query_position, query_position_args, write_selection

# At most the 256 x 128 logits of the measured configurations per scoring program (registers; shared memory of the
# max-pool), whatever the configuration.
MAX_LOGITS = 256 * 128


@dataclass(frozen=True)
class IndexerConfig:
    """Launch of ``block_scores_kernel`` and the workspace of :func:`select_blocks`."""

    rows: int  # queries x groups per program
    num_warps: int
    num_stages: int
    keys_per_tile: int
    workspace_bytes: int = WORKSPACE_BYTES  # block scores of one chunk of query positions


def indexer_config(fp8: bool) -> IndexerConfig:
    """The scoring configuration for bf16 / fp16 index vectors, or FP8 ones: the fastest of the sweep at 128K,
    512K and 1M tokens on an H100 (see benchmarks/results/2026-11-23-h100-43-indexer-schedules)."""
    return IndexerConfig(128, 8, 3, 256) if fp8 else IndexerConfig(256, 8, 3, 128)


@dataclass(frozen=True)
class TopBlocksConfig:
    """Launch of ``top_blocks_kernel``."""

    rows: int  # (query, group) rows per program
    num_warps: int
    segments: int  # > 0: rows narrowed to their candidates first (``write_top_narrowed``); 0: rounds over whole rows


# Rows of at most this many blocks take argmax rounds over the whole row with 4 rows and one warp per program: at
# 127 blocks 0.084 ms against 0.214 for the narrowed schedule (paper layer, 16K positions; see
# benchmarks/results/2026-12-06-h100-105-model-step-graphs-and-tuning-at-9355ac8/top_blocks).
WHOLE_ROW_BLOCKS = 128


def top_blocks_config(n_blocks: int, topk: int, narrow_from: int = 2 * WHOLE_ROW_BLOCKS) -> TopBlocksConfig:
    """The Top-k launch for rows of ``n_blocks`` block scores and a selection of ``topk`` slots (the rounds pick
    up to ``topk - 1`` blocks, the local block follows them). Rows of many blocks are first narrowed to the
    candidates at or above a bound (see ``write_top_narrowed``); that schedule is fastest with one warp per
    program up to 4096 scores, 64 scores per thread beyond (``benchmarks/top_blocks_sweep.py``: see
    benchmarks/results/2026-11-23-h100-59-top-blocks-narrowing and
    benchmarks/results/2026-11-23-h100-61-512k-1m-and-1m-top-k-sweep); rows of up to ``WHOLE_ROW_BLOCKS`` take
    rounds over the whole row."""
    blocks_pow2 = pow2(n_blocks)
    segments = narrowing_segments(n_blocks, topk - 1, narrow_from)
    if segments:
        rows = pow2(2048 // blocks_pow2)
        return TopBlocksConfig(rows, 1 if rows * blocks_pow2 <= 4096 else rows * blocks_pow2 // 2048, segments)
    if blocks_pow2 <= WHOLE_ROW_BLOCKS:
        return TopBlocksConfig(4, 1, 0)
    rows = pow2(min(64, 4096 // blocks_pow2))
    return TopBlocksConfig(rows, 8 if rows * blocks_pow2 > 4096 else 4, 0)


@triton.jit
def _sequence(cu_seqlens, cu_seqlens_k, seq):
    """A sequence's query offset and count, key offset, and the key position of its first query (its queries are
    its last keys)."""
    start = tl.load(cu_seqlens + seq)
    seqlen = tl.load(cu_seqlens + seq + 1) - start
    key_start = tl.load(cu_seqlens_k + seq)
    return start, seqlen, key_start, tl.load(cu_seqlens_k + seq + 1) - key_start - seqlen


@triton.jit
def block_scores_kernel(
    index_q,  # [T, G, DI]
    index_k,  # [Tk, DI] (the one index-key head)
    index_k_scale,  # float32 [Tk] with SCALED (FP8 keys), else unused
    cu_seqlens,  # int32 [n + 1]: the queries' sequences
    cu_seqlens_k,  # int32 [n + 1]: the keys' (a sequence's queries are its last keys)
    scores,  # float32 [n, C, G, NBLK], written: max-pooled logits of the blocks before each row's local one
    first_position,  # the chunk's first query (its index in every sequence's queries)
    n_positions,  # C: queries per sequence in the chunk
    NBLK,  # blocks ranked per row: the chunk's last local block number, or more
    G: tl.constexpr,
    GP: tl.constexpr,  # G rounded up to a power of two
    DI: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program; rows = BLOCK_M * GP
    BLOCK_N: tl.constexpr,  # keys per tile, a multiple of BLOCK_SIZE
    SCALED: tl.constexpr,  # FP8 index rows, key scales in index_k_scale
    UPCAST: tl.constexpr,  # compute the dot in fp32 (the interpreter's bf16 dot is broken)
):
    """Phase 1 of the selection: the block scores of BLOCK_M queries x all groups, one key tile at a time.

    Only blocks before a row's local block are ranked and those are fully visible: no causal mask (a row's
    entries from its local block on are left unspecified). The longest programs (last queries) run first.
    """
    seq = tl.program_id(1)
    start, seqlen, key_start, offset = _sequence(cu_seqlens, cu_seqlens_k, seq)
    end = tl.minimum(seqlen, first_position + n_positions)
    first_query = first_position + (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    if first_query >= end:
        return
    NB: tl.constexpr = BLOCK_N // BLOCK_SIZE
    ROWS: tl.constexpr = BLOCK_M * GP
    # the tile's rows: BLOCK_M queries x all groups (rows past `end` or G load zeros)
    rows = tl.arange(0, ROWS)
    q_pos = first_query + rows // GP
    group = rows % GP
    row_ok = (q_pos < end) & (group < G)
    dims = tl.arange(0, DI)
    iq = tl.load(index_q + ((start + q_pos) * G + group)[:, None] * DI + dims[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        iq = iq.to(tl.float32)
    out = scores + ((seq * n_positions + q_pos - first_position) * G + group).to(tl.int64) * NBLK
    # blocks before the last local one (the keys of these blocks all exist: no key mask)
    n_blocks = (offset + tl.minimum(first_query + BLOCK_M, end) - 1) // BLOCK_SIZE
    for tile in range(0, tl.cdiv(n_blocks, NB)):
        k_pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = k_pos < n_blocks * BLOCK_SIZE
        ik = tl.load(index_k + (key_start + k_pos)[:, None] * DI + dims[None, :], mask=key_ok[:, None], other=0.0)
        if UPCAST:
            ik = ik.to(tl.float32)
        logits = tl.dot(iq, tl.trans(ik))  # no softmax scale: a positive scale changes no ranking
        if SCALED:
            logits *= tl.load(index_k_scale + key_start + k_pos, mask=key_ok, other=1.0)[None, :]
        blocks = tile * NB + tl.arange(0, NB)
        tl.store(out[:, None] + blocks[None, :], tl.max(tl.reshape(logits, (ROWS, NB, BLOCK_SIZE)), axis=2),
                 mask=row_ok[:, None] & (blocks[None, :] < n_blocks))


@triton.jit
def top_blocks_kernel(
    scores,  # float32 [n, C, G, NBLK] from block_scores_kernel
    cu_seqlens,  # int32 [n + 1]: the queries' sequences
    cu_seqlens_k,  # int32 [n + 1]: the keys'
    block_indices,  # int32 [T, G, TOPK], written for the chunk's tokens
    candidates,  # float32 [n * C * G, 2 * CANDIDATES] scratch with SEGMENTS: scores, then block numbers (< 2**24)
    first_position,
    n_positions,  # C
    NBLK,
    G: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOPK: tl.constexpr,
    NP: tl.constexpr,  # NBLK rounded up to a power of two
    ROWS: tl.constexpr,  # (query, group) rows per program
    SEGMENTS: tl.constexpr,  # > 0: first narrow each row to its candidates (see below), a power of two >= TOPK
    CANDIDATES: tl.constexpr,  # most candidates per row kept for the rounds, a power of two
):
    """Phase 2: per row, the (up to) TOPK - 1 best blocks before the local one by rounds of argmax (no sort;
    ties go to the lower block), then the local block, then -1 (:func:`write_selection`).

    With SEGMENTS the rounds run over a row's candidates only (:func:`write_top_narrowed`).
    """
    seq = tl.program_id(1)
    start, seqlen, _, offset = _sequence(cu_seqlens, cu_seqlens_k, seq)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # query in the chunk * G + group
    q_pos = first_position + rows // G
    if first_position + tl.program_id(0) * ROWS // G >= seqlen:
        return
    row_ok = (q_pos < seqlen) & (rows < n_positions * G)
    local = (offset + q_pos) // BLOCK_SIZE
    blocks = tl.arange(0, NP)[None, :]
    workspace_row = (seq * n_positions * G + rows).to(tl.int64)
    row_scores = tl.load(scores + workspace_row[:, None] * NBLK + blocks,
                         mask=row_ok[:, None] & (blocks < local[:, None]), other=float("-inf"))
    out = block_indices + ((start + q_pos) * G + rows % G) * TOPK
    scratch = candidates + workspace_row[:, None] * (2 * CANDIDATES)
    write_selection(row_scores, blocks, NP, out, row_ok, local, TOPK - 1, scratch, SEGMENTS, CANDIDATES)


@triton.jit
def support_lse_kernel(
    index_q,  # [T, G, DI]
    index_k,  # [Tk, DI]
    token_starts,  # int32 [T]: the packed index of each query's first key
    token_positions,  # int32 [T] with SUFFIX: each query's position among its keys
    block_indices,  # int32 [T, G, TOPK]
    lse,  # float32 [T, G], written
    scale,
    G: tl.constexpr,
    DI: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOPK: tl.constexpr,
    SUFFIX: tl.constexpr,  # the queries are the last of longer key sequences
):
    """Logsumexp of the index logits over the visible keys of the selected blocks, per (token, group)."""
    token = tl.program_id(0).to(tl.int64)  # offsets like token * HQ * D pass 2**31
    group = tl.program_id(1)
    start = tl.load(token_starts + token)
    pos = query_position(token, start, token_positions, SUFFIX)
    dims = tl.arange(0, DI)
    offsets = tl.arange(0, BLOCK_SIZE)
    iq = tl.load(index_q + (token * G + group) * DI + dims).to(tl.float32)
    row_max = tl.full((), float("-inf"), tl.float32)
    row_sum = tl.zeros((), tl.float32)
    for slot in range(TOPK):
        block = tl.load(block_indices + (token * G + group) * TOPK + slot)
        k_pos = block * BLOCK_SIZE + offsets
        ok = (block >= 0) & (k_pos <= pos)
        ik = tl.load(index_k + (start + k_pos)[:, None] * DI + dims[None, :], mask=ok[:, None], other=0.0)
        logits = tl.where(ok, tl.sum(ik.to(tl.float32) * iq[None, :], axis=1) * scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - safe_max) + tl.sum(tl.exp(logits - safe_max), axis=0)
        row_max = new_max
    tl.store(lse + token * G + group, tl.log(row_sum) + tl.where(row_max == float("-inf"), 0.0, row_max))


def select_blocks(index_q, index_k, cu_seqlens, max_seqlen: int, block_size: int, topk: int,
                  config: IndexerConfig | None = None, index_k_scale=None, *, cu_seqlens_k=None, max_seqlen_k=None):
    """``index_q`` ``[T, G, Di]``, ``index_k`` ``[T, 1, Di]`` -> int32 ``[T, G, topk]``.

    FP8 rows (:mod:`msa.fp8`) come with the keys' float32 scales
    ``index_k_scale`` ``[Tk]``. Two phases per chunk of query positions: the
    chunk's block scores into a workspace of at most ``config.workspace_bytes``,
    then each row's Top-k. ``config``: default :func:`indexer_config`.
    Queries that are the last of longer key sequences (``index_k``
    ``[Tk, 1, Di]``, bottom-right causal alignment) come with the keys'
    ``cu_seqlens_k`` and ``max_seqlen_k``.
    """
    total, n_groups, index_dim = index_q.shape
    n_seqs = cu_seqlens.numel() - 1
    fp8 = index_k_scale is not None
    config = config or indexer_config(fp8)
    suffix = cu_seqlens_k is not None
    cu_seqlens_k, max_seqlen_k = key_layout(cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    block_indices = torch.empty(total, n_groups, topk, dtype=torch.int32, device=index_q.device)
    max_seqlen = max(max_seqlen, 1)
    groups_pow2 = pow2(n_groups)
    keys_per_tile = max(block_size, config.keys_per_tile)
    block_m = max(1, min(config.rows, MAX_LOGITS // keys_per_tile) // groups_pow2)
    scoring = dict(G=n_groups, GP=groups_pow2, DI=index_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
                   BLOCK_N=keys_per_tile, SCALED=fp8, UPCAST=INTERPRET,
                   num_warps=config.num_warps, num_stages=config.num_stages)
    scales = index_k_scale if fp8 else index_k
    most_blocks = max(1, (max(max_seqlen_k, 1) - 1) // block_size)  # the most blocks a row ranks
    per_tile = n_seqs * block_m * n_groups * most_blocks * 4  # workspace bytes per program row of queries
    chunk = min(triton.cdiv(max_seqlen, block_m), max(1, config.workspace_bytes // per_tile)) * block_m
    workspace = torch.empty(n_seqs * chunk * n_groups * most_blocks, dtype=torch.float32, device=index_q.device)
    for first in range(0, max_seqlen, chunk):
        n_positions = min(chunk, max_seqlen - first)
        # blocks before the chunk's last local one; with suffix queries the positions of the chunk's queries
        # depend on their sequences' offsets, bounded by the longest key sequence
        n_blocks = most_blocks if suffix else max(1, (first + n_positions - 1) // block_size)
        launch(block_scores_kernel, (triton.cdiv(n_positions, block_m), n_seqs),
               index_q, index_k, scales, cu_seqlens, cu_seqlens_k, workspace, first, n_positions, n_blocks, **scoring)
        top_blocks(workspace, cu_seqlens, block_indices, first, n_positions, n_blocks, block_size,
                   cu_seqlens_k=cu_seqlens_k)
    return block_indices


def top_blocks(scores, cu_seqlens, block_indices, first_position: int, n_positions: int, n_blocks: int,
               block_size: int, config: TopBlocksConfig | None = None, *, cu_seqlens_k=None):
    """Phase 2 of ``select_blocks``: the Top-k of each row of a chunk's block ``scores`` (float32
    ``[n, C, G, n_blocks]``, C = ``n_positions``) into ``block_indices`` ``[T, G, topk]``. ``config``: default
    :func:`top_blocks_config`. ``cu_seqlens_k``: the keys' offsets of suffix queries (see :func:`select_blocks`)."""
    n_seqs, n_groups, topk = cu_seqlens.numel() - 1, block_indices.shape[1], block_indices.shape[2]
    config = config or top_blocks_config(n_blocks, topk)
    n_candidates = 2 * config.segments
    candidates = torch.empty(n_seqs * n_positions * n_groups if config.segments else 1, 2 * n_candidates,
                             dtype=torch.float32, device=scores.device)
    top_blocks_kernel[(triton.cdiv(n_positions * n_groups, config.rows), n_seqs)](
        scores, cu_seqlens, cu_seqlens if cu_seqlens_k is None else cu_seqlens_k, block_indices, candidates,
        first_position, n_positions, n_blocks, G=n_groups, BLOCK_SIZE=block_size, TOPK=topk, NP=pow2(n_blocks),
        ROWS=config.rows, SEGMENTS=config.segments, CANDIDATES=n_candidates, num_warps=config.num_warps)


def support_lse(index_q, index_k, block_indices, token_starts, block_size: int, scale: float, *,
                token_positions=None):
    """Float32 ``[T, G]`` logsumexp of the index logits over each row's selected support (suffix queries as in
    :func:`msa.kernels.sparse_attention.sparse_attention_fwd`: ``token_starts``, ``token_positions``)."""
    total, n_groups, index_dim = index_q.shape
    lse = torch.empty(total, n_groups, dtype=torch.float32, device=index_q.device)
    if total:
        support_lse_kernel[(total, n_groups)](
            index_q, index_k, token_starts, block_indices=block_indices, lse=lse, scale=scale,
            **query_position_args(token_starts, token_positions), G=n_groups, DI=index_dim, BLOCK_SIZE=block_size,
            TOPK=block_indices.shape[-1])
    return lse
