"""Triton kernels of the Index Branch: block scoring, max-pooling and exp-free Top-k, and the support LSE.

The ``[S, S]`` score matrix is never materialised. Two phases per chunk of
query positions (chunks bound the workspace): ``block_scores_kernel`` holds a
tile of queries x all GQA groups (they share the index key, so one key tile
feeds every group through one matrix product), max-pools each key tile's
logits per block and writes the pooled scores (float32, 1/block_size of the
logits); ``top_blocks_kernel`` picks each row's Top-k from them. The
tensor-core loop thus carries no Top-k insertion (a running Top-k in that loop
measured 1.13-1.37x slower). Ranking needs no exponential and no softmax scale
(max-pooling and Top-k are monotone), and the local block is written last.

With ``SCALED`` the index vectors are FP8 rows (:mod:`msa.fp8`): FP8
products, each key's logits multiplied by its scale.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pop_max(scores, index, N: tl.constexpr):
    """One round of an exp-free Top-k over the last axis of ``scores`` ``[R, N]``: each row's best score and
    the ``index`` (``[1, N]`` or ``[R, N]``, distinct per row, below N) of it (ties go to the lower index),
    and the scores with it removed."""
    best = tl.max(scores, axis=1)
    chosen = tl.min(tl.where(scores == best[:, None], index, N), axis=1)
    return best, chosen, tl.where(index == chosen[:, None], float("-inf"), scores)


@triton.jit
def write_top(scores, index, N: tl.constexpr, out, row_ok, K: tl.constexpr):
    """Stores the ``index`` of each row's K best ``scores`` (``pop_max`` rounds) at ``out`` + 0 .. K - 1,
    -1 for -inf ones."""
    for slot in tl.static_range(K):
        best, chosen, scores = pop_max(scores, index, N)
        tl.store(out + slot, tl.where(best == float("-inf"), -1, chosen), mask=row_ok)


@triton.jit
def write_top_narrowed(scores, index, N: tl.constexpr, out, row_ok, K: tl.constexpr, scratch,
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
        write_top(candidate_scores, candidate_index, N + 1, out, row_ok, K)
    else:
        write_top(scores, index, N, out, row_ok, K)


@triton.jit
def block_scores_kernel(
    index_q,  # [T, G, DI]
    index_k,  # [T, DI] (the one index-key head)
    index_k_scale,  # float32 [T] with SCALED (FP8 keys), else unused
    cu_seqlens,  # int32 [n + 1]
    scores,  # float32 [n, C, G, NBLK], written: max-pooled logits of the blocks before each row's local one
    first_position,  # the chunk's first query position (in every sequence)
    n_positions,  # C: query positions in the chunk
    NBLK,  # blocks ranked per row: the chunk's last local block number
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
    start = tl.load(cu_seqlens + seq)
    seqlen = tl.load(cu_seqlens + seq + 1) - start
    end = tl.minimum(seqlen, first_position + n_positions)
    first_query = first_position + (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    if first_query >= end:
        return
    NB: tl.constexpr = BLOCK_N // BLOCK_SIZE
    ROWS: tl.constexpr = BLOCK_M * GP
    # the tile's rows: BLOCK_M query positions x all groups (rows past `end` or G load zeros)
    rows = tl.arange(0, ROWS)
    q_pos = first_query + rows // GP
    group = rows % GP
    row_ok = (q_pos < end) & (group < G)
    dims = tl.arange(0, DI)
    iq = tl.load(index_q + ((start + q_pos) * G + group)[:, None] * DI + dims[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        iq = iq.to(tl.float32)
    out = scores + ((seq * n_positions + q_pos - first_position) * G + group).to(tl.int64) * NBLK
    n_blocks = (tl.minimum(first_query + BLOCK_M, end) - 1) // BLOCK_SIZE  # blocks before the last local one
    for tile in range(0, tl.cdiv(n_blocks, NB)):
        k_pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        ik = tl.load(index_k + (start + k_pos)[:, None] * DI + dims[None, :], mask=(k_pos < seqlen)[:, None],
                     other=0.0)
        if UPCAST:
            ik = ik.to(tl.float32)
        logits = tl.dot(iq, tl.trans(ik))  # no softmax scale: a positive scale changes no ranking
        if SCALED:
            logits *= tl.load(index_k_scale + start + k_pos, mask=k_pos < seqlen, other=1.0)[None, :]
        blocks = tile * NB + tl.arange(0, NB)
        tl.store(out[:, None] + blocks[None, :], tl.max(tl.reshape(logits, (ROWS, NB, BLOCK_SIZE)), axis=2),
                 mask=row_ok[:, None] & (blocks[None, :] < n_blocks))


@triton.jit
def top_blocks_kernel(
    scores,  # float32 [n, C, G, NBLK] from block_scores_kernel
    cu_seqlens,  # int32 [n + 1]
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
    """Phase 2: per row, the TOPK - 1 best blocks before the local one by rounds of argmax (no sort; ties go
    to the lower block), -1 where there are fewer, and the local block in the last slot.

    With SEGMENTS the rounds run over a row's candidates only (:func:`write_top_narrowed`).
    """
    seq = tl.program_id(1)
    start = tl.load(cu_seqlens + seq)
    seqlen = tl.load(cu_seqlens + seq + 1) - start
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # position in the chunk * G + group
    q_pos = first_position + rows // G
    if first_position + tl.program_id(0) * ROWS // G >= seqlen:
        return
    row_ok = (q_pos < seqlen) & (rows < n_positions * G)
    local = q_pos // BLOCK_SIZE
    blocks = tl.arange(0, NP)[None, :]
    workspace_row = (seq * n_positions * G + rows).to(tl.int64)
    row_scores = tl.load(scores + workspace_row[:, None] * NBLK + blocks,
                         mask=row_ok[:, None] & (blocks < local[:, None]), other=float("-inf"))
    out = block_indices + ((start + q_pos) * G + rows % G) * TOPK
    if SEGMENTS > 0:
        scratch = candidates + workspace_row[:, None] * (2 * CANDIDATES)
        write_top_narrowed(row_scores, blocks, NP, out, row_ok, TOPK - 1, scratch, SEGMENTS, CANDIDATES)
    else:
        write_top(row_scores, blocks, NP, out, row_ok, TOPK - 1)
    tl.store(out + TOPK - 1, local, mask=row_ok)


@triton.jit
def support_lse_kernel(
    index_q,  # [T, G, DI]
    index_k,  # [T, DI]
    token_starts,  # int32 [T]: offset of each token's sequence
    block_indices,  # int32 [T, G, TOPK]
    lse,  # float32 [T, G], written
    scale,
    G: tl.constexpr,
    DI: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOPK: tl.constexpr,
):
    """Logsumexp of the index logits over the visible keys of the selected blocks, per (token, group)."""
    token = tl.program_id(0).to(tl.int64)  # offsets like token * HQ * D pass 2**31
    group = tl.program_id(1)
    start = tl.load(token_starts + token)
    pos = token - start
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
