"""Triton kernels of the Main Branch: block-sparse attention forward and backward.

Query-outer (forward, dq): one program per (token, GQA group) packs the
group's query heads into the rows of one tile (they share the selected
blocks) and runs an exact online softmax over the blocks of its row of
``block_indices``. Each program reads its own ``topk`` K/V blocks, so long
sequences make it memory-bound.

KV-outer (forward partials, dk/dv): one program per (key block, group) loads
its K/V block once and walks the (token, slot) entries that selected it (a
CSR built on the GPU by :mod:`msa.kernels.block_csr`), QT tokens x the
group's R heads per tile, unpadded (so groups of few heads still fill it).
The forward writes one normalised partial output and LSE per (token, head,
slot), merged by :func:`merge_partials_kernel`; the backward accumulates
dk/dv in registers (one writer each) and, unless the pass must be
deterministic, dq with float32 atomics. Both load a step's list entries two
tiles ahead and gather its rows one tile ahead (a software pipeline in
registers), and mask causally only the tiles that hold the block's own tokens.
Each (group, block) list is walked in LIST_PARTS parts, one program each
(early blocks are visible to more queries, and often selected); the forward
runs in query chunks whose partials fit its workspace.

Softmax runs in base 2: ``scale_log2 = softmax_scale * log2(e)``; LSEs are
stored in natural log.

The launchers take packed ``[T, H, D]`` contiguous tensors with int32
``cu_seqlens`` and/or the per-token sequence offsets ``token_starts`` (int32
``[T]``, for the query-outer kernels), allocate their outputs and launch.
Queries may be the last of longer key sequences (flash-attn's bottom-right
alignment): the keys then come with their own ``cu_seqlens_k`` and the
query-outer kernels with each query's position among them.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from msa.kernels.block_csr import BlockCSR, invert_selection
from msa.kernels.tiles import INTERPRET, LN2, LOG2E, WORKSPACE_BYTES, entry_range, head_constants, key_layout, \
    kv_block, launch, load_block, pow2, query_outer_heads, query_position_args, query_program

# Parts each KV-outer list is walked in by the passes that accumulate with atomics (the forward: at most this many).
LIST_PARTS = 8
# (head, slot) partial rows per program of merge_partials_kernel.
MERGE_ROWS = 16


@dataclass(frozen=True)
class KVOuterConfig:
    """Launch of a KV-outer kernel (attention forward partials and backward, KL forward and backward)."""

    rows: int  # (token, head) rows per tile (a KL kernel: per step)
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class SparseForwardConfig:
    """Schedule and launch of :func:`sparse_attention_fwd` and :func:`sparse_attention_lse`; the defaults are the
    tuned ones (sweeps at S=32K and 128K on an H100: see benchmarks/results/2026-11-22-h100-05-tuning-32k and
    benchmarks/results/2026-11-22-h100-11-tuning-128k)."""

    # schedule "auto": KV-outer from this many tokens on (see benchmarks/results/2026-11-23-h100-33-short-lengths)
    kv_outer_min_tokens: int = 1024
    tile: KVOuterConfig = KVOuterConfig(64, 4, 3)  # the Triton partials kernel's
    # The partials from the Gluon kernel of sparse_attention_hopper on sm_90 (16-bit inputs, head dim and block size
    # 64 or 128; outputs bitwise equal: see benchmarks/results/2026-11-24-h100-93-gluon-forward-partials); False:
    # the Triton kernel.
    hopper: bool = True
    max_list_parts: int = LIST_PARTS
    # A chunk's lists are walked in fewer parts when they are short: a part loads its K/V block (64 KB at D=128,
    # block 128) for at least this many entries on average (a 16K-token chunk puts ~250 entries in each list at
    # 128K tokens, ~32 in each of up to 8192 lists at 1M; outputs bitwise equal: see
    # benchmarks/results/2026-11-23-h100-54-kv-outer-parts-sweep).
    part_entries: int = 64
    merge_rows: int = MERGE_ROWS
    workspace_bytes: int = WORKSPACE_BYTES  # partials of one query chunk
    # One sort builds the lists of several query chunks, up to this many (chunk, group, block) lists.
    max_csr_lists: int = 1 << 24


@dataclass(frozen=True)
class SparseBackwardConfig:
    """Launch of :func:`sparse_attention_bwd`'s KV-outer kernel (the tuned values, as for the forward)."""

    tile: KVOuterConfig = KVOuterConfig(32, 8, 2)
    list_parts: int = LIST_PARTS  # the atomic pass's; the deterministic one walks each list whole

@triton.jit
def online_softmax_step(q_tile, k_tile, v_tile, visible, row_max, row_sum, acc, scale_log2):
    """One key tile of an exact online softmax: rows ``q_tile`` ``[M, D]``, keys/values ``[N, D]``,
    ``visible`` broadcastable to ``[M, N]``; returns the updated (row max, row sum, unnormalised output)."""
    scores = tl.where(visible, tl.dot(q_tile, tl.trans(k_tile)) * scale_log2, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.exp2(row_max - safe_max)
    probs = tl.exp2(scores - safe_max[:, None])
    row_sum = row_sum * alpha + tl.sum(probs, axis=1)
    acc = acc * alpha[:, None] + tl.dot(probs.to(v_tile.dtype), v_tile)
    return new_max, row_sum, acc


@triton.jit
def sparse_attention_fwd_kernel(
    q,  # [T, HQ, D]
    k,  # [T, G, D]
    v,  # [T, G, D]
    block_indices,  # int32 [T, G, TOPK]
    token_starts,  # int32 [T]: the packed index of each query's first key
    token_positions,  # int32 [T] with SUFFIX: each query's position among its keys
    out,  # [T, HQ, D], written
    lse,  # float32 [T, HQ], written (natural log)
    scale_log2,
    HQ: tl.constexpr,
    G: tl.constexpr,
    R: tl.constexpr,  # query heads per group
    RP: tl.constexpr,  # R rounded up to a power of two >= 16
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOPK: tl.constexpr,
    SUFFIX: tl.constexpr,  # the queries are the last of longer key sequences
    UPCAST: tl.constexpr,
):
    token, group, start, pos, head_index, head_ok, q_tile = query_program(q, token_starts, token_positions, HQ, R, RP,
                                                                          D, SUFFIX, UPCAST)
    dims = tl.arange(0, D)
    rows = head_index[:, None] * D + dims[None, :]

    row_max = tl.full((RP,), float("-inf"), tl.float32)
    row_sum = tl.zeros((RP,), tl.float32)
    acc = tl.zeros((RP, D), tl.float32)
    for slot in range(TOPK):
        block = tl.load(block_indices + (token * G + group) * TOPK + slot)
        k_tile, visible = load_block(k, start, block, pos, group, dims, G, D, BLOCK_SIZE)
        v_tile, _ = load_block(v, start, block, pos, group, dims, G, D, BLOCK_SIZE)
        if UPCAST:
            k_tile, v_tile = k_tile.to(tl.float32), v_tile.to(tl.float32)
        row_max, row_sum, acc = online_softmax_step(q_tile, k_tile, v_tile, visible[None, :], row_max, row_sum, acc,
                                                    scale_log2)

    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    acc = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    tl.store(out + rows, acc.to(out.dtype.element_ty), mask=head_ok[:, None])
    tl.store(lse + head_index, (safe_max + tl.log2(row_sum)) * LN2, mask=head_ok)


@triton.jit
def _entry_rows(csr_entries, entry, last, ROWS: tl.constexpr, QT: tl.constexpr, R: tl.constexpr,
                TOPK: tl.constexpr):
    """Rows (token, head) of the QT entries from ``entry``, packed ``R`` head rows per entry with no
    padding (so groups of few heads still fill the tile): token, slot, head within group, valid."""
    rows = tl.arange(0, ROWS)
    heads = rows % R
    entry_rows = entry + rows // R
    row_ok = (rows < QT * R) & (entry_rows < last)
    code = tl.load(csr_entries + entry_rows, mask=row_ok, other=0)
    return (code // TOPK).to(tl.int64), code % TOPK, heads, row_ok


@triton.jit
def _gather_rows(ptr, token, heads, row_ok, group, dims, HQ: tl.constexpr, R: tl.constexpr, D: tl.constexpr):
    """Rows ``[ROWS, D]`` of a ``[T, HQ, D]`` tensor at (token, group's head), zero where not ``row_ok``."""
    return tl.load(ptr + (token * HQ + group * R + heads)[:, None] * D + dims[None, :], mask=row_ok[:, None],
                   other=0.0)


@triton.jit
def _tile_needs_mask(token, row_ok, origin, last_key):
    """Whether a KV-outer tile holds a token of the block itself (which sees only part of it): only such tiles need
    the causal mask. Keys past the end of a sequence need none: no token of the sequence sits past them. ``origin``:
    the sequence's query origin (:func:`~msa.kernels.tiles.kv_block`)."""
    return tl.min(tl.where(row_ok, token - origin, last_key)) < last_key


@triton.jit
def sparse_attention_fwd_partial_kernel(
    q, k, v,
    cu_seqlens,  # int32 [n + 1]: the queries' sequences
    cu_seqlens_k,  # int32 [n + 1]: the keys' (the queries are the last keys of each sequence)
    csr_offsets, csr_entries,
    partial_out,  # [T, HQ, TOPK, D]: this block's normalised output per (token, head, slot), written
    partial_lse,  # float32 [T, HQ, TOPK]: natural-log LSE per (token, head, slot), written
    scale_log2, n_block_slots,
    token_offset,  # first token of the chunk the partial buffers hold
    HQ: tl.constexpr, G: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr, TOPK: tl.constexpr,
    ROWS: tl.constexpr, QT: tl.constexpr,  # (token, head) rows per tile (a power of two), tokens per tile
    LIST_PARTS: tl.constexpr,  # programs per list, each walking a part of it
    WRITE_OUT: tl.constexpr,  # False: only the partial LSEs (the KL loss's teacher normalisation)
    UPCAST: tl.constexpr,
):
    block_slot = tl.program_id(0)
    group = tl.program_id(1)
    first, last = entry_range(csr_offsets, n_block_slots, block_slot, group, LIST_PARTS)
    if first == last:
        return
    start, seqlen, block_start, origin = kv_block(cu_seqlens, cu_seqlens_k, block_slot, MAX_BLOCKS, BLOCK_SIZE)
    last_key = block_start + BLOCK_SIZE - 1
    k_pos = block_start + tl.arange(0, BLOCK_SIZE)
    dims = tl.arange(0, D)
    key_ok = k_pos < seqlen
    kv_rows = ((start + k_pos) * G + group)[:, None] * D + dims[None, :]
    k_tile = tl.load(k + kv_rows, mask=key_ok[:, None], other=0.0)
    v_tile = k_tile
    if WRITE_OUT:
        v_tile = tl.load(v + kv_rows, mask=key_ok[:, None], other=0.0)
    if UPCAST:
        k_tile, v_tile = k_tile.to(tl.float32), v_tile.to(tl.float32)
    # Software pipeline of the gathers (list entry -> token -> q rows): each step loads the entries two tiles
    # ahead and the q rows of the next tile before the products of this one (faster: see
    # benchmarks/results/2026-11-24-h100-66-kv-outer-gather-pipeline).
    token, slot, heads, row_ok = _entry_rows(csr_entries, first, last, ROWS, QT, R, TOPK)
    q_rows = _gather_rows(q, token, heads, row_ok, group, dims, HQ, R, D)
    next_token, next_slot, _, next_ok = _entry_rows(csr_entries, first + QT, last, ROWS, QT, R, TOPK)
    for entry in range(first, last, QT):
        after_token, after_slot, _, after_ok = _entry_rows(csr_entries, entry + 2 * QT, last, ROWS, QT, R, TOPK)
        next_q = _gather_rows(q, next_token, heads, next_ok, group, dims, HQ, R, D)
        q_tile = q_rows
        if UPCAST:
            q_tile = q_rows.to(tl.float32)
        scores = tl.dot(q_tile, tl.trans(k_tile))
        if _tile_needs_mask(token, row_ok, origin, last_key):
            scores = tl.where(row_ok[:, None] & (k_pos[None, :] <= (token - origin)[:, None]), scores, float("-inf"))
        row_max = tl.max(scores, axis=1)
        scaled_max = tl.where(row_max == float("-inf"), 0.0, row_max * scale_log2)
        probs = tl.exp2(scores * scale_log2 - scaled_max[:, None])
        row_sum = tl.sum(probs, axis=1)
        partial_index = (token * HQ + group * R + heads - token_offset * HQ) * TOPK + slot
        if WRITE_OUT:
            out_rows = tl.dot(probs.to(v_tile.dtype), v_tile) * (1.0 / tl.where(row_sum == 0.0, 1.0, row_sum))[:, None]
            tl.store(partial_out + partial_index[:, None] * D + dims[None, :],
                     out_rows.to(partial_out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(partial_lse + partial_index, (scaled_max + tl.log2(row_sum)) * LN2, mask=row_ok)
        token, slot, row_ok, q_rows = next_token, next_slot, next_ok, next_q
        next_token, next_slot, next_ok = after_token, after_slot, after_ok


@triton.jit
def merge_partials_kernel(
    partial_out,  # [T * HQ, TOPK, D]
    partial_lse,  # float32 [T * HQ, TOPK]: -inf for slots nothing wrote
    out,  # [T * HQ, D], written
    lse,  # float32 [T * HQ], written
    n_rows,
    TOPK: tl.constexpr, KP: tl.constexpr, D: tl.constexpr, HEADS: tl.constexpr,
):
    """LSE-weighted sum of the partial outputs of HEADS consecutive (token, head) rows."""
    rows = tl.program_id(0).to(tl.int64) * HEADS + tl.arange(0, HEADS)
    row_ok = rows < n_rows
    slots = tl.arange(0, KP)
    dims = tl.arange(0, D)
    slot_lse = tl.load(partial_lse + rows[:, None] * TOPK + slots[None, :],
                       mask=row_ok[:, None] & (slots[None, :] < TOPK), other=float("-inf"))
    row_max = tl.max(slot_lse, axis=1)
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    weights = tl.exp(slot_lse - safe_max[:, None])
    total = tl.sum(weights, axis=1)
    weights = weights / tl.where(total == 0.0, 1.0, total)[:, None]
    acc = tl.zeros((HEADS, D), tl.float32)
    for slot in tl.static_range(TOPK):
        w = tl.sum(tl.where(slots[None, :] == slot, weights, 0.0), axis=1)
        part = tl.load(partial_out + (rows[:, None] * TOPK + slot) * D + dims[None, :], mask=w[:, None] > 0, other=0.0)
        acc += w[:, None] * part.to(tl.float32)
    tl.store(out + rows[:, None] * D + dims[None, :], acc.to(out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse + rows, safe_max + tl.log(total), mask=row_ok)


@triton.jit
def sparse_attention_bwd_dq_kernel(
    q, k, v, block_indices, token_starts, token_positions,
    dout,  # [T, HQ, D]
    lse,  # float32 [T, HQ]
    delta,  # float32 [T, HQ]: rowsum(out * dout)
    dq,  # [T, HQ, D], written
    scale_log2,
    scale,
    HQ: tl.constexpr,
    G: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOPK: tl.constexpr,
    SUFFIX: tl.constexpr,
    UPCAST: tl.constexpr,
):
    token, group, start, pos, head_index, head_ok, q_tile = query_program(q, token_starts, token_positions, HQ, R, RP,
                                                                          D, SUFFIX, UPCAST)
    dims = tl.arange(0, D)
    rows = head_index[:, None] * D + dims[None, :]
    do_tile = tl.load(dout + rows, mask=head_ok[:, None], other=0.0)
    if UPCAST:
        do_tile = do_tile.to(tl.float32)
    row_lse = tl.load(lse + head_index, mask=head_ok, other=float("inf")) * LOG2E
    row_lse = tl.where(row_lse == float("-inf"), float("inf"), row_lse)  # empty rows: no probability mass
    row_delta = tl.load(delta + head_index, mask=head_ok, other=0.0)

    dq_acc = tl.zeros((RP, D), tl.float32)
    for slot in range(TOPK):
        block = tl.load(block_indices + (token * G + group) * TOPK + slot)
        k_tile, visible = load_block(k, start, block, pos, group, dims, G, D, BLOCK_SIZE)
        v_tile, _ = load_block(v, start, block, pos, group, dims, G, D, BLOCK_SIZE)
        if UPCAST:
            k_tile, v_tile = k_tile.to(tl.float32), v_tile.to(tl.float32)
        scores = tl.dot(q_tile, tl.trans(k_tile)) * scale_log2
        probs = tl.where(visible[None, :], tl.exp2(scores - row_lse[:, None]), 0.0)
        dprobs = tl.dot(do_tile, tl.trans(v_tile))
        dscores = probs * (dprobs - row_delta[:, None])
        dq_acc += tl.dot(dscores.to(k_tile.dtype), k_tile)
    tl.store(dq + rows, (dq_acc * scale).to(dq.dtype.element_ty), mask=head_ok[:, None])


@triton.jit
def sparse_attention_bwd_dkv_kernel(
    q, k, v, dout, lse, delta,
    cu_seqlens, cu_seqlens_k, csr_offsets, csr_entries,
    dk,  # [Tk, G, D]: written, or float32 and zeroed if ATOMIC
    dv,  # [Tk, G, D]: written, or float32 and zeroed if ATOMIC
    dq_accum,  # float32 [T, HQ, D], zeroed: accumulated if ATOMIC (else the query-outer kernel computes dq)
    scale_log2, scale, n_block_slots,
    HQ: tl.constexpr, G: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr, TOPK: tl.constexpr,
    ROWS: tl.constexpr, QT: tl.constexpr,  # (token, head) rows per tile (a power of two), tokens per tile
    LIST_PARTS: tl.constexpr,
    ATOMIC: tl.constexpr,  # float32 atomics (lists walked in LIST_PARTS parts) vs one deterministic writer per block
    UPCAST: tl.constexpr,
):
    block_slot = tl.program_id(0)
    group = tl.program_id(1)
    start, seqlen, block_start, origin = kv_block(cu_seqlens, cu_seqlens_k, block_slot, MAX_BLOCKS, BLOCK_SIZE)
    first, last = entry_range(csr_offsets, n_block_slots, block_slot, group, LIST_PARTS)
    skip = block_start >= seqlen  # no such block in this sequence
    if ATOMIC:
        skip = skip | (first == last)  # nothing to add
    if skip:
        return
    k_pos = block_start + tl.arange(0, BLOCK_SIZE)
    dims = tl.arange(0, D)
    key_ok = k_pos < seqlen
    kv_rows = ((start + k_pos) * G + group)[:, None] * D + dims[None, :]
    k_tile = tl.load(k + kv_rows, mask=key_ok[:, None], other=0.0)
    v_tile = tl.load(v + kv_rows, mask=key_ok[:, None], other=0.0)
    if UPCAST:
        k_tile, v_tile = k_tile.to(tl.float32), v_tile.to(tl.float32)

    last_key = block_start + BLOCK_SIZE - 1
    dk_acc = tl.zeros((BLOCK_SIZE, D), tl.float32)
    dv_acc = tl.zeros((BLOCK_SIZE, D), tl.float32)
    # The forward's gather pipeline, faster with the mask skip below
    # (see benchmarks/results/2026-11-24-h100-66-kv-outer-gather-pipeline)
    token, _, heads, row_ok = _entry_rows(csr_entries, first, last, ROWS, QT, R, TOPK)
    q_rows = _gather_rows(q, token, heads, row_ok, group, dims, HQ, R, D)
    do_rows = _gather_rows(dout, token, heads, row_ok, group, dims, HQ, R, D)
    next_token, _, _, next_ok = _entry_rows(csr_entries, first + QT, last, ROWS, QT, R, TOPK)
    for entry in range(first, last, QT):
        after_token, _, _, after_ok = _entry_rows(csr_entries, entry + 2 * QT, last, ROWS, QT, R, TOPK)
        next_q = _gather_rows(q, next_token, heads, next_ok, group, dims, HQ, R, D)
        next_do = _gather_rows(dout, next_token, heads, next_ok, group, dims, HQ, R, D)
        q_tile, do_tile = q_rows, do_rows
        if UPCAST:
            q_tile, do_tile = q_rows.to(tl.float32), do_rows.to(tl.float32)
        head_index = token * HQ + group * R + heads
        row_lse = tl.load(lse + head_index, mask=row_ok, other=0.0) * LOG2E
        row_delta = tl.load(delta + head_index, mask=row_ok, other=0.0)
        probs = tl.where(row_ok[:, None], tl.exp2(tl.dot(q_tile, tl.trans(k_tile)) * scale_log2 - row_lse[:, None]),
                         0.0)
        if _tile_needs_mask(token, row_ok, origin, last_key):
            probs = tl.where(k_pos[None, :] <= (token - origin)[:, None], probs, 0.0)
        dv_acc += tl.dot(tl.trans(probs.to(do_tile.dtype)), do_tile)
        dprobs = tl.dot(do_tile, tl.trans(v_tile))
        dscores = probs * (dprobs - row_delta[:, None])
        dk_acc += tl.dot(tl.trans(dscores.to(q_tile.dtype)), q_tile)
        if ATOMIC:
            dq_rows = tl.dot(dscores.to(k_tile.dtype), k_tile) * scale
            tl.atomic_add(dq_accum + head_index[:, None] * D + dims[None, :], dq_rows, mask=row_ok[:, None],
                          sem="relaxed")
        token, row_ok, q_rows, do_rows = next_token, next_ok, next_q, next_do
        next_token, next_ok = after_token, after_ok
    if ATOMIC:
        tl.atomic_add(dk + kv_rows, dk_acc * scale, mask=key_ok[:, None], sem="relaxed")
        tl.atomic_add(dv + kv_rows, dv_acc, mask=key_ok[:, None], sem="relaxed")
    else:
        tl.store(dk + kv_rows, (dk_acc * scale).to(dk.dtype.element_ty), mask=key_ok[:, None])
        tl.store(dv + kv_rows, dv_acc.to(dv.dtype.element_ty), mask=key_ok[:, None])


def merge_partials(partial_out, partial_lse, out, lse, n_rows: int, n_parts: int, rows_per_program: int):
    """Writes ``out`` ``[n_rows, D]`` and float32 ``lse`` ``[n_rows]`` (any shapes of those numbers of elements):
    per row, the LSE-weighted sum of its ``n_parts`` normalised partial outputs ``partial_out``
    ``[n_rows, n_parts, D]`` with natural-log LSEs ``partial_lse`` ``[n_rows, n_parts]`` (-inf: none)."""
    merge_partials_kernel[(triton.cdiv(n_rows, rows_per_program),)](
        partial_out, partial_lse, out, lse, n_rows, TOPK=n_parts, KP=pow2(n_parts), D=out.shape[-1],
        HEADS=rows_per_program, num_warps=4)


def _kv_outer_launch(q, k, config: KVOuterConfig) -> dict:
    """Head constants, tokens per tile and launch options of a KV-outer kernel."""
    heads = head_constants(q, k)  # a tile packs the R head rows of QT tokens, unpadded
    rows = pow2(max(config.rows, heads["R"]))
    return dict(heads, ROWS=rows, QT=rows // heads["R"], num_warps=config.num_warps, num_stages=config.num_stages)


def _list_parts(tokens: int, topk: int, n_lists: int, config: SparseForwardConfig) -> int:
    """Parts (a power of two, at most ``config.max_list_parts``) that the forward walks the lists of a chunk of
    ``tokens`` queries in, when they select among ``n_lists`` (sequence, block) lists per group."""
    per_part = tokens * topk // max(1, n_lists) // config.part_entries
    return min(config.max_list_parts, 1 << max(0, per_part.bit_length() - 1))


# The Gluon kernel's tile: one warpgroup's 64-row wgmma.
_GLUON_TILE = KVOuterConfig(64, 4, 1)
_GLUON_FAILED: set = set()  # Gluon kernels this Triton could not compile (warned once)


@functools.cache
def _gluon_hopper_kernel(device: torch.device):
    """The Gluon forward partial kernel where this device can run it (sm_90, a Triton with Gluon), else None."""
    if INTERPRET or device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return None
    try:
        from msa.kernels.sparse_attention_hopper import sparse_attention_fwd_partial_hopper_kernel
    except (ImportError, AttributeError):  # a Triton before Gluon, or whose experimental Gluon API differs
        return None
    return sparse_attention_fwd_partial_hopper_kernel


def _launch_hopper(kernel, grid, *args, **kwargs) -> bool:
    """Launch the Gluon kernel; where this Triton cannot compile it (Gluon is experimental and changes between
    releases), warn once and return False so that the Triton kernel runs instead."""
    try:
        launch(kernel, grid, *args, **kwargs)
    except triton.compiler.errors.CompilationError as error:
        _GLUON_FAILED.add(kernel)
        warnings.warn(f"msa: the Gluon forward partials do not compile with Triton {triton.__version__} "
                      f"({str(error).splitlines()[-1]}); using the Triton kernel")
        return False
    return True


def _hopper_partials(q: torch.Tensor, k: torch.Tensor, block_size: int, config: SparseForwardConfig):
    """The Gluon kernel if the config lets it run and it takes this forward's shapes (a group's heads fit its
    64-row tile), else None."""
    if not (config.hopper and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in (64, 128)
            and block_size in (64, 128) and q.shape[1] // k.shape[1] <= 64):
        return None
    kernel = _gluon_hopper_kernel(q.device)
    return None if kernel in _GLUON_FAILED else kernel


def _kv_outer_partials(q, k, v, block_indices, cu_seqlens, max_seqlen: int, block_size: int, scale: float,
                       config: SparseForwardConfig, out=None, lse=None, cu_seqlens_k=None, max_seqlen_k=None,
                       lists: BlockCSR | None = None):
    """KV-outer forward in query chunks whose partials fit ``config.workspace_bytes``.

    With ``out`` (``[T, Hq, D]``) the merged output and ``lse`` are written;
    without, only ``lse`` (the LSE pass that the KL loss's teacher needs).
    ``cu_seqlens_k``, ``max_seqlen_k``: the keys' layout of suffix queries
    (see :func:`sparse_attention_fwd`). ``lists``: the whole selection's
    lists (:func:`~msa.kernels.block_csr.invert_selection`) where the caller
    has them, taken when one chunk holds every query.
    """
    suffix = cu_seqlens_k is not None
    cu_seqlens_k, max_seqlen_k = key_layout(cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    total, n_heads, head_dim = q.shape
    topk = block_indices.shape[-1]
    per_token = n_heads * topk * (4 + (head_dim * q.element_size() if out is not None else 0))
    chunk = max(1, min(total, config.workspace_bytes // per_token))
    partial_lse = torch.empty(chunk, n_heads, topk, dtype=torch.float32, device=q.device)
    partial_out = torch.empty(chunk, n_heads, topk, head_dim, dtype=q.dtype, device=q.device) if out is not None \
        else partial_lse
    # the Gluon kernel takes queries that are their sequences' tokens only (untested on suffix queries)
    hopper = _hopper_partials(q, k, block_size, config) if out is not None and not suffix else None
    launch_options = _kv_outer_launch(q, k, config.tile if hopper is None else _GLUON_TILE)
    n_seqs = cu_seqlens.numel() - 1
    max_blocks = max(1, triton.cdiv(max_seqlen_k, block_size))
    # one sort builds the lists of as many chunks as max_csr_lists allows (faster than a sort per chunk: see
    # benchmarks/results/2026-11-24-h100-66-kv-outer-gather-pipeline)
    build = chunk * max(1, config.max_csr_lists // (k.shape[1] * n_seqs * max_blocks))
    for build_start in range(0, total, build):
        build_end = min(total, build_start + build)
        csr = lists if lists is not None and chunk >= total else invert_selection(
            block_indices, cu_seqlens, max_seqlen_k, block_size, build_start, build_end, chunk_tokens=chunk)
        for index, start in enumerate(range(build_start, build_end, chunk)):
            end = min(total, start + chunk)
            # a query's position is at most its packed index, unless the queries are a suffix: the chunk reaches
            # blocks before cdiv(end, block_size)
            reached = max_blocks if suffix else min(max_blocks, triton.cdiv(end, block_size))
            parts = _list_parts(end - start, topk, n_seqs * reached, config)
            partial_lse.fill_(float("-inf"))
            grid = (csr.n_block_slots, k.shape[1], parts)
            lists = (csr.chunk_offsets(index), csr.entries, partial_out, partial_lse, scale * LOG2E.value,
                     csr.n_block_slots, start)
            constants = dict(BLOCK_SIZE=block_size, MAX_BLOCKS=max_blocks, TOPK=topk, LIST_PARTS=parts)
            if hopper is not None and not _launch_hopper(hopper, grid, q, k, v, cu_seqlens, *lists, **launch_options,
                                                         **constants):
                hopper, launch_options = None, _kv_outer_launch(q, k, config.tile)
            if hopper is None:
                launch(sparse_attention_fwd_partial_kernel, grid, q, k, v, cu_seqlens, cu_seqlens_k, *lists,
                       **launch_options, **constants, WRITE_OUT=out is not None, UPCAST=INTERPRET)
            rows = (end - start) * n_heads
            if out is None:
                lse[start:end] = torch.logsumexp(partial_lse[: end - start], dim=-1)
                continue
            merge_partials(partial_out, partial_lse, out[start:end], lse[start:end], rows, topk, config.merge_rows)


def sparse_attention_fwd(q, k, v, block_indices, token_starts, cu_seqlens, max_seqlen: int, block_size: int,
                         scale: float, schedule: str = "auto", config: SparseForwardConfig | None = None, *,
                         token_positions=None, cu_seqlens_k=None, max_seqlen_k=None, lists: BlockCSR | None = None):
    """Returns ``out`` ``[T, Hq, D]`` (dtype of q) and float32 ``lse`` ``[T, Hq]``.

    ``q`` ``[T, Hq, D]``, ``k``, ``v`` ``[T, G, D]``, ``block_indices`` int32
    ``[T, G, topk]``. ``schedule``: ``"query"`` (query-outer), ``"kv"``
    (KV-outer with merged partials) or ``"auto"`` (KV-outer from
    ``config.kv_outer_min_tokens`` tokens on). ``config``: default
    :class:`SparseForwardConfig`.

    Queries that are the last of longer key sequences (``k``, ``v``
    ``[Tk, G, D]``, bottom-right causal alignment) come with the keys'
    ``cu_seqlens_k`` and ``max_seqlen_k``, ``token_starts`` then the packed
    index of each query's first key and ``token_positions`` int32 ``[T]`` its
    position among the keys (:func:`msa.varlen.suffix_positions`).
    ``lists``: the selection inverted whole (:func:`~msa.kernels.block_csr.invert_selection`), if the caller
    keeps it for the backward pass too; the KV-outer schedule walks it when one query chunk holds every query.
    """
    config = config or SparseForwardConfig()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    if not q.shape[0]:
        return out, lse
    if schedule == "kv" or (schedule == "auto" and q.shape[0] >= config.kv_outer_min_tokens):
        _kv_outer_partials(q, k, v, block_indices, cu_seqlens, max_seqlen, block_size, scale, config, out, lse,
                           cu_seqlens_k, max_seqlen_k, lists)
    else:
        sparse_attention_fwd_kernel[(q.shape[0], k.shape[1])](
            q, k, v, block_indices, token_starts, out=out, lse=lse, scale_log2=scale * LOG2E.value,
            **query_position_args(token_starts, token_positions), **query_outer_heads(q, k), BLOCK_SIZE=block_size,
            TOPK=block_indices.shape[-1], UPCAST=INTERPRET, num_warps=4)
    return out, lse


def sparse_attention_lse(q, k, block_indices, cu_seqlens, max_seqlen: int, block_size: int, scale: float,
                         config: SparseForwardConfig | None = None, *, cu_seqlens_k=None, max_seqlen_k=None,
                         lists: BlockCSR | None = None):
    """Float32 ``[T, Hq]``: the attention's LSE over the selected support (a KV-outer LSE-only pass, which
    needs no values; suffix queries as in :func:`sparse_attention_fwd`). ``lists``: the selection inverted
    whole, if the caller has built it (the KL loss's kernels walk the same lists)."""
    config = config or SparseForwardConfig()
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    if q.shape[0]:
        _kv_outer_partials(q, k, k, block_indices, cu_seqlens, max_seqlen, block_size, scale, config, lse=lse,
                           cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k, lists=lists)
    return lse


def _row_dots(out, dout, chunk: int = 1 << 14):
    """float32 ``[T, Hq]`` = sum over D of out * dout, upcast a chunk of tokens at a time."""
    delta = torch.empty(out.shape[:2], dtype=torch.float32, device=out.device)
    for start in range(0, out.shape[0], chunk):
        end = start + chunk
        delta[start:end] = torch.einsum("thd,thd->th", out[start:end].float(), dout[start:end].float())
    return delta


def sparse_attention_bwd(q, k, v, out, lse, dout, block_indices, token_starts, cu_seqlens, max_seqlen: int,
                         block_size: int, scale: float, deterministic: bool = False,
                         config: SparseBackwardConfig | None = None, *, token_positions=None, cu_seqlens_k=None,
                         max_seqlen_k=None, lists: BlockCSR | None = None):
    """Returns ``dq, dk, dv`` (dtypes of q, k, v).

    KV-outer kernel: dk/dv, and dq through float32 atomics, over lists walked
    in ``config.list_parts`` parts (``lists``, the selection inverted whole,
    or inverted here). With ``deterministic``: one writer per key block for
    dk/dv and the query-outer kernel for dq. Suffix queries as in
    :func:`sparse_attention_fwd`.
    """
    config = config or SparseBackwardConfig()
    cu_seqlens_k, max_seqlen_k = key_layout(cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    if not q.shape[0]:  # keys without queries (suffix queries of none) get no gradient
        return torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = _row_dots(out, dout)
    topk = block_indices.shape[-1]
    if deterministic:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        sparse_attention_bwd_dq_kernel[(q.shape[0], k.shape[1])](
            q, k, v, block_indices, token_starts, dout=dout, lse=lse, delta=delta, dq=dq,
            scale_log2=scale * LOG2E.value, scale=scale, **query_position_args(token_starts, token_positions),
            **query_outer_heads(q, k), BLOCK_SIZE=block_size, TOPK=topk, UPCAST=INTERPRET, num_warps=4)
    else:
        dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v))
    parts = 1 if deterministic else config.list_parts
    csr = lists or invert_selection(block_indices, cu_seqlens, max_seqlen_k, block_size)
    launch(sparse_attention_bwd_dkv_kernel, (csr.n_block_slots, k.shape[1], parts),
           q, k, v, dout, lse, delta, cu_seqlens, cu_seqlens_k, csr.offsets, csr.entries, dk, dv, dq,
           scale * LOG2E.value, scale,
           csr.n_block_slots, **_kv_outer_launch(q, k, config.tile), BLOCK_SIZE=block_size,
           MAX_BLOCKS=csr.max_blocks, TOPK=topk, LIST_PARTS=parts, ATOMIC=not deterministic, UPCAST=INTERPRET)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
