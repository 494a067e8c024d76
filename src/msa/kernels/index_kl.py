"""Triton kernels of the KL alignment loss: teacher recomputed from q, k and LSEs, never stored.

Per (token, group) row, on the support U (visible keys of the selected blocks):
teacher ``p_t = mean_h exp(c <q_h, k_t> - lse_h)``, student logits
``z_t = c_I <index_q, index_k_t>`` with LSE ``lse_z``, and
``KL = sum_t p_t log p_t - sum_t p_t z_t + lse_z * sum_t p_t``.

Forward (KV-outer): each (key block, group) program adds, per selecting
(token, slot), the block's share of the three sums and the block's student
LSE; the caller reduces over slots. Backward: the gradient with respect to
``z_t`` is ``softmax(z)_t - p_t``; the KV-outer kernel turns it into
per-group partials of ``d index_k`` and, with atomics, ``d index_q``; the
query-outer kernel computes ``d index_q`` deterministically.

Fused (training, non-deterministic): a student-only pass of the forward
kernel gives ``lse_z``, then the backward kernel writes the three sums too,
so the teacher, the costly part, is evaluated once instead of twice and the
gradient (of a unit upstream gradient) is ready before the backward.

The KV-outer kernels take QT tokens per step: the teacher's products run over
(token, head) rows in chunks of HC heads and are summed per token, so the
student logits, the KL terms and their gradients are computed once per token.
"""

from __future__ import annotations

import triton
import triton.language as tl

from msa.kernels.sparse_attention import LOG2E, _entry_range, _kv_block, _load_block, _query_program


@triton.jit
def index_kl_fwd_partial_kernel(
    q, k, index_q, index_k,
    cu_seqlens, csr_offsets, csr_entries,
    teacher_lse,  # float32 [T, HQ]
    stats,  # float32 [4, T, G, TOPK]: sum p log p, sum p z, sum p, student LSE of this block; written
    scale_log2, index_scale, n_block_slots, n_rows_slots,  # n_rows_slots = T * G * TOPK
    HQ: tl.constexpr, G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr, TOPK: tl.constexpr, QT: tl.constexpr, HC: tl.constexpr,
    SPLIT: tl.constexpr, TEACHER: tl.constexpr, UPCAST: tl.constexpr,
):
    """Without ``TEACHER`` only the student LSE of each block is written (the fused pass needs it first)."""
    block_slot = tl.program_id(0)
    group = tl.program_id(1)
    first, last = _entry_range(csr_offsets, n_block_slots, block_slot, group, SPLIT)
    if first == last:
        return
    start, seqlen, block_start = _kv_block(cu_seqlens, block_slot, MAX_BLOCKS, BLOCK_SIZE)
    k_tile, ik_tile, k_pos, key_ok = _key_tiles(k, index_k, start, seqlen, block_start, group, G, D, DI, BLOCK_SIZE,
                                                UPCAST)
    for entry in range(first, last, QT):
        token, slot, token_ok = _entry_tokens(csr_entries, entry, last, QT, TOPK)
        visible = _visible(token, token_ok, start, k_pos, key_ok)
        z, _ = _student(index_q, token, token_ok, group, ik_tile, index_scale, G, DI, UPCAST)
        out = stats + (token * G + group) * TOPK + slot
        if TEACHER:
            teacher = _teacher(q, teacher_lse, token, token_ok, group, visible, k_tile, scale_log2, HQ, G, R, D, QT,
                               HC, BLOCK_SIZE, UPCAST)
            _store_kl_terms(out, n_rows_slots, teacher, z, visible, token_ok)
        z = tl.where(visible, z, float("-inf"))
        z_max = tl.max(z, axis=1)
        safe_max = tl.where(z_max == float("-inf"), 0.0, z_max)
        z_lse = safe_max + tl.log(tl.sum(tl.exp(z - safe_max[:, None]), axis=1))
        tl.store(out + 3 * n_rows_slots, z_lse, mask=token_ok)


@triton.jit
def _store_kl_terms(out, n_rows_slots, teacher, z, visible, token_ok):
    """The block's share of sum p log p, sum p z and sum p, per token ``[QT]``, at ``out`` + i * n_rows_slots."""
    p_log_p = tl.sum(teacher * tl.log(tl.maximum(teacher, 1e-30)), axis=1)  # 0 log 0 = 0
    p_z = tl.sum(tl.where(visible, teacher * z, 0.0), axis=1)
    tl.store(out, p_log_p, mask=token_ok)
    tl.store(out + n_rows_slots, p_z, mask=token_ok)
    tl.store(out + 2 * n_rows_slots, tl.sum(teacher, axis=1), mask=token_ok)


@triton.jit
def _key_tiles(k, index_k, start, seqlen, block_start, group, G: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, UPCAST: tl.constexpr):
    """The group's keys and the index keys of a KV-outer program's block."""
    k_pos = block_start + tl.arange(0, BLOCK_SIZE)
    key_ok = k_pos < seqlen
    k_tile = tl.load(k + ((start + k_pos) * G + group)[:, None] * D + tl.arange(0, D)[None, :], mask=key_ok[:, None],
                     other=0.0)
    ik_tile = tl.load(index_k + (start + k_pos)[:, None] * DI + tl.arange(0, DI)[None, :], mask=key_ok[:, None],
                      other=0.0)
    if UPCAST:
        k_tile, ik_tile = k_tile.to(tl.float32), ik_tile.to(tl.float32)
    return k_tile, ik_tile, k_pos, key_ok


@triton.jit
def _entry_tokens(csr_entries, entry, last, QT: tl.constexpr, TOPK: tl.constexpr):
    """Token, slot and validity of the QT entries from ``entry``."""
    index = entry + tl.arange(0, QT)
    token_ok = index < last
    code = tl.load(csr_entries + index, mask=token_ok, other=0)
    return (code // TOPK).to(tl.int64), code % TOPK, token_ok


@triton.jit
def _visible(token, token_ok, start, k_pos, key_ok):
    """``[QT, BLOCK]``: which keys of the block each token sees (causal, in its sequence)."""
    return token_ok[:, None] & (k_pos[None, :] <= (token - start)[:, None]) & key_ok[None, :]


@triton.jit
def _teacher(q, teacher_lse, token, token_ok, group, visible, k_tile, scale_log2, HQ: tl.constexpr, G: tl.constexpr,
             R: tl.constexpr, D: tl.constexpr, QT: tl.constexpr, HC: tl.constexpr, BLOCK_SIZE: tl.constexpr,
             UPCAST: tl.constexpr):
    """Teacher probabilities ``[QT, BLOCK]``: the mean over the group's R heads, computed HC heads at a time."""
    ROWS: tl.constexpr = QT * HC
    CHUNKS: tl.constexpr = (R + HC - 1) // HC
    rows = tl.arange(0, ROWS)
    row_token = tl.reshape(tl.broadcast_to(token[:, None], (QT, HC)), (ROWS,))
    row_token_ok = tl.reshape(tl.broadcast_to(token_ok[:, None], (QT, HC)), (ROWS,))
    row_visible = tl.reshape(tl.broadcast_to(visible[:, None, :], (QT, HC, BLOCK_SIZE)), (ROWS, BLOCK_SIZE))
    teacher = tl.zeros((QT, BLOCK_SIZE), tl.float32)
    for chunk in tl.static_range(CHUNKS):
        heads = chunk * HC + rows % HC
        row_ok = row_token_ok & (heads < R)
        head_index = row_token * HQ + group * R + heads
        q_rows = tl.load(q + head_index[:, None] * D + tl.arange(0, D)[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q_rows = q_rows.to(tl.float32)
        head_lse = tl.load(teacher_lse + head_index, mask=row_ok, other=0.0) * LOG2E
        head_probs = tl.where(row_visible & row_ok[:, None],
                              tl.exp2(tl.dot(q_rows, tl.trans(k_tile)) * scale_log2 - head_lse[:, None]), 0.0)
        teacher += tl.sum(tl.reshape(head_probs, (QT, HC, BLOCK_SIZE)), axis=1)
    return teacher / R


@triton.jit
def _student(index_q, token, token_ok, group, ik_tile, index_scale, G: tl.constexpr, DI: tl.constexpr,
             UPCAST: tl.constexpr):
    """Student logits ``[QT, BLOCK]`` and the tokens' index queries ``[QT, DI]``."""
    iq = tl.load(index_q + (token * G + group)[:, None] * DI + tl.arange(0, DI)[None, :], mask=token_ok[:, None],
                 other=0.0)
    if UPCAST:
        iq = iq.to(tl.float32)
    return tl.dot(iq.to(ik_tile.dtype), tl.trans(ik_tile)) * index_scale, iq


@triton.jit
def index_kl_bwd_dq_kernel(
    q, k, index_q, index_k, block_indices, token_starts,
    teacher_lse,  # float32 [T, HQ]
    index_lse,  # float32 [T, G]
    grad_scale,  # float32 [1]: upstream gradient / number of rows
    d_index_q,  # float32 [T, G, DI], written
    scale_log2, index_scale,
    HQ: tl.constexpr, G: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr, UPCAST: tl.constexpr,
):
    token, group, start, pos, head_index, head_ok, q_tile = _query_program(q, token_starts, HQ, R, RP, D, UPCAST)
    dims = tl.arange(0, D)
    index_dims = tl.arange(0, DI)
    iq = tl.load(index_q + (token * G + group) * DI + index_dims).to(tl.float32)
    head_lse = tl.load(teacher_lse + head_index, mask=head_ok, other=float("inf")) * LOG2E
    head_lse = tl.where(head_lse == float("-inf"), float("inf"), head_lse)
    z_lse = tl.load(index_lse + token * G + group)
    z_lse = tl.where(z_lse == float("-inf"), float("inf"), z_lse)

    grad_iq = tl.zeros((DI,), tl.float32)
    for slot in range(TOPK):
        block = tl.load(block_indices + (token * G + group) * TOPK + slot)
        k_tile, visible = _load_block(k, start, block, pos, group, dims, G, D, BLOCK_SIZE)
        ik_tile, _ = _load_block(index_k, start, block, pos, 0, index_dims, 1, DI, BLOCK_SIZE)
        ik_tile = ik_tile.to(tl.float32)
        if UPCAST:
            k_tile = k_tile.to(tl.float32)
        scores = tl.dot(q_tile, tl.trans(k_tile)) * scale_log2
        teacher = tl.sum(tl.where(visible[None, :], tl.exp2(scores - head_lse[:, None]), 0.0), axis=0) / R
        z = tl.sum(ik_tile * iq[None, :], axis=1) * index_scale
        dz = tl.where(visible, tl.exp(z - z_lse) - teacher, 0.0)
        grad_iq += tl.sum(dz[:, None] * ik_tile, axis=0)
    grad = tl.load(grad_scale) * index_scale
    tl.store(d_index_q + (token * G + group) * DI + index_dims, grad_iq * grad)


@triton.jit
def index_kl_bwd_dk_kernel(
    q, k, index_q, index_k,
    cu_seqlens, csr_offsets, csr_entries,
    teacher_lse, index_lse, grad_scale,
    d_index_k,  # float32: [G, T, DI] per-group contributions, written; if ATOMIC [T, DI], zeroed and accumulated
    d_index_q_accum,  # float32 [T, G, DI], zeroed: accumulated if ATOMIC (else the query-outer kernel computes it)
    stats,  # float32 [4, T, G, TOPK]: with STATS, its first three terms are written as the forward kernel does
    scale_log2, index_scale, n_block_slots, n_tokens, n_rows_slots,
    HQ: tl.constexpr, G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr, TOPK: tl.constexpr, QT: tl.constexpr, HC: tl.constexpr,
    SPLIT: tl.constexpr, ATOMIC: tl.constexpr, STATS: tl.constexpr, UPCAST: tl.constexpr,
):
    """With ``STATS`` this is the fused forward + backward: one teacher evaluation gives the loss terms
    and the gradients (``index_lse`` then comes from the forward kernel's student-only pass)."""
    block_slot = tl.program_id(0)
    group = tl.program_id(1)
    start, seqlen, block_start = _kv_block(cu_seqlens, block_slot, MAX_BLOCKS, BLOCK_SIZE)
    first, last = _entry_range(csr_offsets, n_block_slots, block_slot, group, SPLIT)
    skip = block_start >= seqlen  # no such block in this sequence
    if ATOMIC:
        skip = skip | (first == last)  # nothing to add
    if skip:
        return
    k_tile, ik_tile, k_pos, key_ok = _key_tiles(k, index_k, start, seqlen, block_start, group, G, D, DI, BLOCK_SIZE,
                                                UPCAST)
    index_dims = tl.arange(0, DI)
    grad = tl.load(grad_scale) * index_scale
    grad_ik = tl.zeros((BLOCK_SIZE, DI), tl.float32)
    for entry in range(first, last, QT):
        token, slot, token_ok = _entry_tokens(csr_entries, entry, last, QT, TOPK)
        visible = _visible(token, token_ok, start, k_pos, key_ok)
        teacher = _teacher(q, teacher_lse, token, token_ok, group, visible, k_tile, scale_log2, HQ, G, R, D, QT, HC,
                           BLOCK_SIZE, UPCAST)
        z, iq = _student(index_q, token, token_ok, group, ik_tile, index_scale, G, DI, UPCAST)
        if STATS:
            _store_kl_terms(stats + (token * G + group) * TOPK + slot, n_rows_slots, teacher, z, visible, token_ok)
        z_lse = tl.load(index_lse + token * G + group, mask=token_ok, other=0.0)
        dz = tl.where(visible, tl.exp(z - z_lse[:, None]) - teacher, 0.0).to(ik_tile.dtype)
        grad_ik += tl.dot(tl.trans(dz), iq.to(ik_tile.dtype))
        if ATOMIC:
            tl.atomic_add(d_index_q_accum + (token * G + group)[:, None] * DI + index_dims[None, :],
                          tl.dot(dz, ik_tile) * grad, mask=token_ok[:, None], sem="relaxed")
    if ATOMIC:
        tl.atomic_add(d_index_k + (start + k_pos)[:, None] * DI + index_dims[None, :], grad_ik * grad,
                      mask=key_ok[:, None], sem="relaxed")
    else:
        out_rows = group * n_tokens + start + k_pos
        tl.store(d_index_k + out_rows[:, None] * DI + index_dims[None, :], grad_ik * grad, mask=key_ok[:, None])
