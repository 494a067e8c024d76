"""Triton kernels of the KL alignment loss: teacher recomputed from q, k and LSEs, never stored.

Per (token, group) row, on the support U (visible keys of the selected blocks):
teacher ``p_t = mean_h exp(c <q_h, k_t> - lse_h)``, student logits
``z_t = c_I <index_q, index_k_t>`` with LSE ``lse_z``, and
``KL = sum_t p_t log p_t - sum_t p_t z_t + lse_z * sum_t p_t``.
Its gradient with respect to ``z_t`` is ``softmax(z)_t - p_t``: the
query-outer kernel turns it into ``d index_q``, the KV-outer kernel (one
program per key block and group, over the CSR of selecting tokens) into
per-group partials of ``d index_k``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from msa.kernels.sparse_attention import LN2, LOG2E, _load_block


@triton.jit
def _head_lse_log2(q_tile, k, start, pos, token, group, block_indices, dims,
                   G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr,
                   RP: tl.constexpr, UPCAST: tl.constexpr, scale_log2):
    """Base-2 LSE of each head's logits over the row's support ``[RP]``."""
    row_max = tl.full((RP,), float("-inf"), tl.float32)
    row_sum = tl.zeros((RP,), tl.float32)
    for slot in range(TOPK):
        block = tl.load(block_indices + (token * G + group) * TOPK + slot)
        k_tile, visible = _load_block(k, start, block, pos, group, dims, G, D, BLOCK_SIZE)
        if UPCAST:
            k_tile = k_tile.to(tl.float32)
        scores = tl.where(visible[None, :], tl.dot(q_tile, tl.trans(k_tile)) * scale_log2, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp2(row_max - safe_max) + tl.sum(tl.exp2(scores - safe_max[:, None]), axis=1)
        row_max = new_max
    return tl.where(row_max == float("-inf"), 0.0, row_max) + tl.log2(row_sum)


@triton.jit
def index_kl_fwd_kernel(
    q, k,  # [T, HQ, D], [T, G, D]
    index_q, index_k,  # [T, G, DI], [T, DI]
    block_indices, token_starts,
    teacher_lse,  # float32 [T, HQ]: read if HAVE_TEACHER_LSE, else written
    kl_rows,  # float32 [T, G], written
    index_lse,  # float32 [T, G], written
    scale_log2, index_scale,
    HQ: tl.constexpr, G: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr, HAVE_TEACHER_LSE: tl.constexpr, UPCAST: tl.constexpr,
):
    token = tl.program_id(0)
    group = tl.program_id(1)
    start = tl.load(token_starts + token)
    pos = token - start
    heads = tl.arange(0, RP)
    head_ok = heads < R
    dims = tl.arange(0, D)
    index_dims = tl.arange(0, DI)
    head_index = token * HQ + group * R + heads
    q_tile = tl.load(q + head_index[:, None] * D + dims[None, :], mask=head_ok[:, None], other=0.0)
    if UPCAST:
        q_tile = q_tile.to(tl.float32)
    iq = tl.load(index_q + (token * G + group) * DI + index_dims).to(tl.float32)
    if HAVE_TEACHER_LSE:
        head_lse = tl.load(teacher_lse + head_index, mask=head_ok, other=0.0) * LOG2E
    else:
        head_lse = _head_lse_log2(q_tile, k, start, pos, token, group, block_indices, dims, G, D, BLOCK_SIZE, TOPK,
                                  RP, UPCAST, scale_log2)
        tl.store(teacher_lse + head_index, head_lse * LN2, mask=head_ok)
    head_lse = tl.where(head_ok & (head_lse != float("-inf")), head_lse, float("inf"))  # no mass on those rows

    p_log_p = tl.zeros((), tl.float32)
    p_z = tl.zeros((), tl.float32)
    p_sum = tl.zeros((), tl.float32)
    z_max = tl.full((), float("-inf"), tl.float32)
    z_sum = tl.zeros((), tl.float32)
    for slot in range(TOPK):
        block = tl.load(block_indices + (token * G + group) * TOPK + slot)
        k_tile, visible = _load_block(k, start, block, pos, group, dims, G, D, BLOCK_SIZE)
        ik_tile, _ = _load_block(index_k, start, block, pos, 0, index_dims, 1, DI, BLOCK_SIZE)
        if UPCAST:
            k_tile = k_tile.to(tl.float32)
        scores = tl.dot(q_tile, tl.trans(k_tile)) * scale_log2
        teacher = tl.sum(tl.where(visible[None, :], tl.exp2(scores - head_lse[:, None]), 0.0), axis=0) / R
        z = tl.where(visible, tl.sum(ik_tile.to(tl.float32) * iq[None, :], axis=1) * index_scale, float("-inf"))
        p_log_p += tl.sum(teacher * tl.log(tl.maximum(teacher, 1e-30)), axis=0)  # 0 log 0 = 0
        p_z += tl.sum(tl.where(visible, teacher * z, 0.0), axis=0)
        p_sum += tl.sum(teacher, axis=0)
        new_max = tl.maximum(z_max, tl.max(z, axis=0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        z_sum = z_sum * tl.exp(z_max - safe_max) + tl.sum(tl.exp(z - safe_max), axis=0)
        z_max = new_max
    z_lse = tl.where(z_max == float("-inf"), 0.0, z_max) + tl.log(z_sum)
    kl = tl.where(p_sum > 0, p_log_p - p_z + z_lse * p_sum, 0.0)
    tl.store(kl_rows + token * G + group, kl)
    tl.store(index_lse + token * G + group, z_lse)


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
    token = tl.program_id(0)
    group = tl.program_id(1)
    start = tl.load(token_starts + token)
    pos = token - start
    heads = tl.arange(0, RP)
    head_ok = heads < R
    dims = tl.arange(0, D)
    index_dims = tl.arange(0, DI)
    head_index = token * HQ + group * R + heads
    q_tile = tl.load(q + head_index[:, None] * D + dims[None, :], mask=head_ok[:, None], other=0.0)
    if UPCAST:
        q_tile = q_tile.to(tl.float32)
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
    cu_seqlens, csr_offsets, csr_tokens,
    teacher_lse, index_lse, grad_scale,
    d_index_k_partial,  # float32 [G, T, DI], written: the contribution of each group
    scale_log2, index_scale, n_block_slots, n_tokens,
    HQ: tl.constexpr, G: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr, QT: tl.constexpr, UPCAST: tl.constexpr,
):
    block_slot = tl.program_id(0)
    group = tl.program_id(1)
    seq = block_slot // MAX_BLOCKS
    block = block_slot % MAX_BLOCKS
    start = tl.load(cu_seqlens + seq)
    seqlen = tl.load(cu_seqlens + seq + 1) - start
    if block * BLOCK_SIZE >= seqlen:
        return
    dims = tl.arange(0, D)
    index_dims = tl.arange(0, DI)
    k_pos = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    key_ok = k_pos < seqlen
    k_tile = tl.load(k + ((start + k_pos) * G + group)[:, None] * D + dims[None, :], mask=key_ok[:, None], other=0.0)
    ik_tile = tl.load(index_k + (start + k_pos)[:, None] * DI + index_dims[None, :], mask=key_ok[:, None], other=0.0)
    if UPCAST:
        k_tile = k_tile.to(tl.float32)
    ik_tile = ik_tile.to(tl.float32)

    ROWS: tl.constexpr = QT * RP
    rows = tl.arange(0, ROWS)
    heads = rows % RP
    first = tl.load(csr_offsets + group * n_block_slots + block_slot)
    last = tl.load(csr_offsets + group * n_block_slots + block_slot + 1)
    grad_ik = tl.zeros((BLOCK_SIZE, DI), tl.float32)
    for entry in range(first, last, QT):
        entry_rows = entry + rows // RP
        row_ok = (entry_rows < last) & (heads < R)
        token = tl.load(csr_tokens + entry_rows, mask=row_ok, other=0)
        head_index = token * HQ + group * R + heads
        q_rows = tl.load(q + head_index[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
        iq_rows = tl.load(index_q + (token * G + group)[:, None] * DI + index_dims[None, :], mask=row_ok[:, None],
                          other=0.0).to(tl.float32)
        if UPCAST:
            q_rows = q_rows.to(tl.float32)
        head_lse = tl.load(teacher_lse + head_index, mask=row_ok, other=0.0) * LOG2E
        z_lse = tl.load(index_lse + token * G + group, mask=row_ok, other=0.0)
        visible = row_ok[:, None] & (k_pos[None, :] <= (token - start)[:, None]) & key_ok[None, :]
        head_probs = tl.where(visible, tl.exp2(tl.dot(q_rows, tl.trans(k_tile)) * scale_log2 - head_lse[:, None]), 0.0)
        teacher = tl.sum(tl.reshape(head_probs, (QT, RP, BLOCK_SIZE)), axis=1) / R
        teacher = tl.reshape(tl.broadcast_to(teacher[:, None, :], (QT, RP, BLOCK_SIZE)), (ROWS, BLOCK_SIZE))
        z = tl.dot(iq_rows, tl.trans(ik_tile)) * index_scale
        # each of the token's R head rows carries 1/R of its gradient
        dz = tl.where(visible, (tl.exp(z - z_lse[:, None]) - teacher) / R, 0.0)
        grad_ik += tl.dot(tl.trans(dz), iq_rows)
    grad = tl.load(grad_scale) * index_scale
    out_rows = group * n_tokens + start + k_pos
    tl.store(d_index_k_partial + out_rows[:, None] * DI + index_dims[None, :], grad_ik * grad, mask=key_ok[:, None])
