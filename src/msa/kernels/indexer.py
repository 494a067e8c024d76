"""Triton kernels of the Index Branch: fused scoring + max-pooling + running Top-k, and the support LSE.

``select_blocks_kernel`` never materialises the ``[S, S]`` score matrix: a
program holds a tile of queries x all GQA groups (they share the index key, so
one key tile feeds every group through one matrix product), walks the key
tiles up to its diagonal, max-pools each tile's logits per key block and keeps
a running Top-(k-1) of earlier blocks per row in registers. Ranking needs no
exponential and no softmax scale (max-pooling and Top-k are monotone). The
local block is written last. Memory is linear in the sequence length.
With ``SCALED`` the index vectors are FP8 rows (:mod:`msa.fp8`): FP8
products, each key's logits multiplied by its scale.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _score_tile(index_k, index_k_scale, start, seqlen, tile, iq, q_pos, local, dims, top_scores, top_blocks,
                CAUSAL: tl.constexpr, ROWS: tl.constexpr, KP: tl.constexpr, DI: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr, UPCAST: tl.constexpr):
    """Score one key tile, max-pool it per block and insert each block into the rows' running Top-k."""
    NB: tl.constexpr = BLOCK_N // BLOCK_SIZE
    k_pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    ik = tl.load(index_k + (start + k_pos)[:, None] * DI + dims[None, :], mask=(k_pos < seqlen)[:, None], other=0.0)
    if UPCAST:
        ik = ik.to(tl.float32)
    logits = tl.dot(iq, tl.trans(ik))  # no softmax scale: a positive scale changes no ranking
    if SCALED:
        logits *= tl.load(index_k_scale + start + k_pos, mask=k_pos < seqlen, other=1.0)[None, :]
    if CAUSAL:
        logits = tl.where(k_pos[None, :] <= q_pos[:, None], logits, float("-inf"))
    pooled = tl.max(tl.reshape(logits, (ROWS, NB, BLOCK_SIZE)), axis=2)
    slots = tl.arange(0, KP)
    for b in tl.static_range(NB):
        block = tile * NB + b
        score = tl.max(tl.where(tl.arange(0, NB)[None, :] == b, pooled, float("-inf")), axis=1)
        score = tl.where(local == block, float("-inf"), score)  # the local block is added at the end
        weakest = tl.min(top_scores, axis=1)
        weakest_slot = tl.min(tl.where(top_scores == weakest[:, None], slots[None, :], KP), axis=1)
        take = (score > weakest)[:, None] & (slots[None, :] == weakest_slot[:, None])
        top_scores = tl.where(take, score[:, None], top_scores)
        top_blocks = tl.where(take, block, top_blocks)
    return top_scores, top_blocks


@triton.jit
def select_blocks_kernel(
    index_q,  # [T, G, DI]
    index_k,  # [T, DI] (the one index-key head)
    index_k_scale,  # float32 [T] with SCALED (FP8 keys), else unused
    cu_seqlens,  # int32 [n + 1]
    block_indices,  # int32 [T, G, TOPK], written
    G: tl.constexpr,
    GP: tl.constexpr,  # G rounded up to a power of two
    DI: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,  # TOPK - 1 rounded up to a power of two (>= 1)
    BLOCK_M: tl.constexpr,  # queries per program; rows = BLOCK_M * GP
    BLOCK_N: tl.constexpr,  # keys per tile, a multiple of BLOCK_SIZE
    SCALED: tl.constexpr,  # FP8 index rows, key scales in index_k_scale
    UPCAST: tl.constexpr,  # compute the dot in fp32 (the interpreter's bf16 dot is broken)
):
    seq = tl.program_id(1)
    start = tl.load(cu_seqlens + seq)
    seqlen = tl.load(cu_seqlens + seq + 1) - start
    first_query = tl.program_id(0) * BLOCK_M
    if first_query >= seqlen:
        return
    ROWS: tl.constexpr = BLOCK_M * GP
    rows = tl.arange(0, ROWS)
    q_pos = first_query + rows // GP
    group = rows % GP
    row_ok = (q_pos < seqlen) & (group < G)
    dims = tl.arange(0, DI)
    iq = tl.load(index_q + ((start + q_pos) * G + group)[:, None] * DI + dims[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        iq = iq.to(tl.float32)
    local = q_pos // BLOCK_SIZE

    slots = tl.arange(0, KP)
    # Slots past TOPK - 1 hold +inf so they are never the minimum, never replaced.
    top_scores = tl.where(slots[None, :] < TOPK - 1, float("-inf"), float("inf")) + tl.zeros((ROWS, KP), tl.float32)
    top_blocks = tl.full((ROWS, KP), -1, tl.int32)

    last_query = tl.minimum(first_query + BLOCK_M, seqlen) - 1
    # tiles whose keys every query of the program sees need no causal mask
    n_open_tiles = (first_query + 1) // BLOCK_N
    for tile in range(0, n_open_tiles):
        top_scores, top_blocks = _score_tile(index_k, index_k_scale, start, seqlen, tile, iq, q_pos, local, dims,
                                             top_scores, top_blocks, False, ROWS, KP, DI, BLOCK_SIZE, BLOCK_N,
                                             SCALED, UPCAST)
    for tile in range(n_open_tiles, last_query // BLOCK_N + 1):
        top_scores, top_blocks = _score_tile(index_k, index_k_scale, start, seqlen, tile, iq, q_pos, local, dims,
                                             top_scores, top_blocks, True, ROWS, KP, DI, BLOCK_SIZE, BLOCK_N,
                                             SCALED, UPCAST)

    out = block_indices + ((start + q_pos) * G + group)[:, None] * TOPK
    tl.store(out + slots[None, :], top_blocks, mask=row_ok[:, None] & (slots[None, :] < TOPK - 1))
    tl.store(out + (TOPK - 1), local[:, None] + tl.zeros((ROWS, 1), tl.int32), mask=row_ok[:, None])


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
