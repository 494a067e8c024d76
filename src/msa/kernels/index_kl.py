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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from msa.kernels.block_csr import BlockCSR, invert_selection
from msa.kernels.sparse_attention import LIST_PARTS, KVOuterConfig, SparseForwardConfig, sparse_attention_lse
from msa.kernels.tiles import INTERPRET, LOG2E, entry_range, head_constants, key_layout, kv_block, launch, \
    load_block, pow2, query_outer_heads, query_position_args, query_program

KL_TOKENS = 16  # fewest tokens per step of the KV-outer KL kernels: the student's products need 16 rows


@dataclass(frozen=True)
class IndexKLConfig:
    """Launches of the KV-outer KL kernels (``rows``: teacher (token, head) rows per step; the fastest of the sweep
    at 128K: see benchmarks/results/2026-11-23-h100-26-kl-fused-tuning), and of the teacher's LSE pass."""

    forward: KVOuterConfig = KVOuterConfig(64, 8, 2)
    backward: KVOuterConfig = KVOuterConfig(32, 8, 2)
    fused: KVOuterConfig = KVOuterConfig(32, 8, 2)  # the gradient kernel when it also writes the loss terms
    list_parts: int = LIST_PARTS  # the forward's, and the atomic gradient pass's
    teacher: SparseForwardConfig = SparseForwardConfig()


@triton.jit
def index_kl_fwd_partial_kernel(
    q, k, index_q, index_k,
    cu_seqlens, cu_seqlens_k, csr_offsets, csr_entries,
    teacher_lse,  # float32 [T, HQ]
    stats,  # float32 [4, T, G, TOPK]: sum p log p, sum p z, sum p, student LSE of this block; written
    scale_log2, index_scale, n_block_slots, n_rows_slots,  # n_rows_slots = T * G * TOPK
    HQ: tl.constexpr, G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr, TOPK: tl.constexpr, QT: tl.constexpr, HC: tl.constexpr,
    LIST_PARTS: tl.constexpr, TEACHER: tl.constexpr, UPCAST: tl.constexpr,
):
    """Without ``TEACHER`` only the student LSE of each block is written (the fused pass needs it first)."""
    block_slot = tl.program_id(0)
    group = tl.program_id(1)
    first, last = entry_range(csr_offsets, n_block_slots, block_slot, group, LIST_PARTS)
    if first == last:
        return
    start, seqlen, block_start, origin = kv_block(cu_seqlens, cu_seqlens_k, block_slot, MAX_BLOCKS, BLOCK_SIZE)
    k_tile, ik_tile, k_pos, key_ok = _key_tiles(k, index_k, start, seqlen, block_start, group, G, D, DI, BLOCK_SIZE,
                                                UPCAST)
    for entry in range(first, last, QT):
        token, slot, token_ok = _entry_tokens(csr_entries, entry, last, QT, TOPK)
        visible = _visible(token, token_ok, origin, k_pos, key_ok)
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
def _visible(token, token_ok, origin, k_pos, key_ok):
    """``[QT, BLOCK]``: which keys of the block each token sees (causal, in its sequence; ``origin``: the
    sequence's query origin, :func:`~msa.kernels.tiles.kv_block`)."""
    return token_ok[:, None] & (k_pos[None, :] <= (token - origin)[:, None]) & key_ok[None, :]


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
    q, k, index_q, index_k, block_indices,
    token_starts,  # int32 [T]: the packed index of each query's first key
    token_positions,  # int32 [T] with SUFFIX: each query's position among its keys
    teacher_lse,  # float32 [T, HQ]
    index_lse,  # float32 [T, G]
    grad_scale,  # float32 [1]: upstream gradient / number of rows
    d_index_q,  # float32 [T, G, DI], written
    scale_log2, index_scale,
    HQ: tl.constexpr, G: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr, SUFFIX: tl.constexpr, UPCAST: tl.constexpr,
):
    token, group, start, pos, head_index, head_ok, q_tile = query_program(q, token_starts, token_positions, HQ, R, RP,
                                                                          D, SUFFIX, UPCAST)
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
        k_tile, visible = load_block(k, start, block, pos, group, dims, G, D, BLOCK_SIZE)
        ik_tile, _ = load_block(index_k, start, block, pos, 0, index_dims, 1, DI, BLOCK_SIZE)
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
    cu_seqlens, cu_seqlens_k, csr_offsets, csr_entries,
    teacher_lse, index_lse, grad_scale,
    d_index_k,  # float32: [G, Tk, DI] per-group contributions, written; if ATOMIC [Tk, DI], zeroed and accumulated
    d_index_q_accum,  # float32 [T, G, DI], zeroed: accumulated if ATOMIC (else the query-outer kernel computes it)
    stats,  # float32 [4, T, G, TOPK]: with STATS, its first three terms are written as the forward kernel does
    scale_log2, index_scale, n_block_slots, n_keys, n_rows_slots,  # n_keys = Tk
    HQ: tl.constexpr, G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr, TOPK: tl.constexpr, QT: tl.constexpr, HC: tl.constexpr,
    LIST_PARTS: tl.constexpr, ATOMIC: tl.constexpr, STATS: tl.constexpr, UPCAST: tl.constexpr,
):
    """With ``STATS`` this is the fused forward + backward: one teacher evaluation gives the loss terms
    and the gradients (``index_lse`` then comes from the forward kernel's student-only pass)."""
    block_slot = tl.program_id(0)
    group = tl.program_id(1)
    start, seqlen, block_start, origin = kv_block(cu_seqlens, cu_seqlens_k, block_slot, MAX_BLOCKS, BLOCK_SIZE)
    first, last = entry_range(csr_offsets, n_block_slots, block_slot, group, LIST_PARTS)
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
        visible = _visible(token, token_ok, origin, k_pos, key_ok)
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
        out_rows = group * n_keys + start + k_pos
        tl.store(d_index_k + out_rows[:, None] * DI + index_dims[None, :], grad_ik * grad, mask=key_ok[:, None])


def _kl_stats(index_q, topk: int):
    """Per (token, group, slot) terms of the KL kernels: sum p log p, sum p z, sum p, student block LSE."""
    stats = torch.zeros(4, *index_q.shape[:2], topk, dtype=torch.float32, device=index_q.device)
    stats[3] = float("-inf")
    return stats


def _kl_rows(stats, index_lse):
    """Float32 ``[T, G]`` KL of each row from the per-slot terms."""
    p_log_p, p_z, p_sum = (x.sum(-1) for x in stats[:3])
    return torch.where(p_sum > 0, p_log_p - p_z + index_lse * p_sum, 0.0)


def _kl_launch(q, k, config: KVOuterConfig) -> dict:
    """Head constants, tokens per step, heads per teacher chunk and launch options of a KL kernel: ``config.rows``
    (token, head) rows per step, as many of a token's heads per chunk as fit (no more than the group has), the
    rest in tokens (at least ``KL_TOKENS``; more where a group has few heads)."""
    heads = head_constants(q, k)
    chunk_heads = max(1, min(config.rows // KL_TOKENS, pow2(heads["R"])))
    return dict(heads, QT=max(KL_TOKENS, config.rows // chunk_heads), HC=chunk_heads, num_warps=config.num_warps,
                num_stages=config.num_stages)


def _kl_fwd_launch(q, k, index_q, index_k, cu_seqlens, cu_seqlens_k, csr, teacher_lse, stats, scale: float,
                   index_scale: float, block_size: int, teacher: bool, config: IndexKLConfig):
    """The KV-outer KL forward kernel; without ``teacher`` it writes only the student's block LSEs."""
    launch(index_kl_fwd_partial_kernel, (csr.n_block_slots, index_q.shape[1], config.list_parts),
           q, k, index_q, index_k, cu_seqlens, cu_seqlens_k, csr.offsets, csr.entries, teacher_lse, stats,
           scale * LOG2E.value, index_scale, csr.n_block_slots, stats[0].numel(), **_kl_launch(q, k, config.forward),
           DI=index_q.shape[2], BLOCK_SIZE=block_size, MAX_BLOCKS=csr.max_blocks, TOPK=stats.shape[-1],
           LIST_PARTS=config.list_parts, TEACHER=teacher, UPCAST=INTERPRET)


def _kl_bwd_launch(q, k, index_q, index_k, cu_seqlens, cu_seqlens_k, csr, teacher_lse, index_lse, grad_scale,
                   d_index_k, d_index_q, scale: float, index_scale: float, block_size: int, topk: int,
                   deterministic: bool, config: IndexKLConfig, stats=None):
    """The KV-outer gradient kernel; with ``stats`` it also writes the KL terms (the fused pass)."""
    parts = 1 if deterministic else config.list_parts
    fused = stats is not None
    launch(index_kl_bwd_dk_kernel, (csr.n_block_slots, index_q.shape[1], parts),
           q, k, index_q, index_k, cu_seqlens, cu_seqlens_k, csr.offsets, csr.entries, teacher_lse, index_lse,
           grad_scale, d_index_k, d_index_q, stats if fused else index_lse, scale * LOG2E.value, index_scale,
           csr.n_block_slots, index_k.shape[0], stats[0].numel() if fused else 0,
           **_kl_launch(q, k, config.fused if fused else config.backward), DI=index_q.shape[2],
           BLOCK_SIZE=block_size, MAX_BLOCKS=csr.max_blocks, TOPK=topk, LIST_PARTS=parts, ATOMIC=not deterministic,
           STATS=fused, UPCAST=INTERPRET)


def index_kl_fwd(q, k, index_q, index_k, block_indices, cu_seqlens, max_seqlen: int, block_size: int, scale: float,
                 index_scale: float, teacher_lse=None, config: IndexKLConfig | None = None, *, cu_seqlens_k=None,
                 max_seqlen_k=None, lists: BlockCSR | None = None):
    """Returns float32 ``kl_rows`` ``[T, G]``, ``index_lse`` ``[T, G]`` and ``teacher_lse`` ``[T, Hq]``.

    ``q`` ``[T, Hq, D]``, ``k`` ``[T, G, D]``, ``index_q`` ``[T, G, Di]``,
    ``index_k`` ``[T, 1, Di]``, ``block_indices`` int32 ``[T, G, topk]``.
    ``teacher_lse`` (the Main Branch LSE over the same support) is computed
    by a KV-outer LSE pass when not given. ``config``: default
    :class:`IndexKLConfig`. Queries that are the last of longer key
    sequences (``k`` ``[Tk, G, D]``, ``index_k`` ``[Tk, 1, Di]``) come with
    the keys' ``cu_seqlens_k`` and ``max_seqlen_k``. ``lists``: the selection
    inverted whole (:func:`~msa.kernels.block_csr.invert_selection`), if the
    caller has it; else inverted here, once for the LSE pass and the loss.
    """
    config = config or IndexKLConfig()
    keys = dict(cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k)
    cu_seqlens_k, max_seqlen_k = key_layout(cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    csr = lists or invert_selection(block_indices, cu_seqlens, max_seqlen_k, block_size) if q.shape[0] else None
    if teacher_lse is None:
        teacher_lse = sparse_attention_lse(q, k, block_indices, cu_seqlens, max_seqlen, block_size, scale,
                                           config.teacher, lists=csr, **keys)
    stats = _kl_stats(index_q, block_indices.shape[-1])
    if csr is not None:
        _kl_fwd_launch(q, k, index_q, index_k, cu_seqlens, cu_seqlens_k, csr, teacher_lse, stats, scale, index_scale,
                       block_size, teacher=True, config=config)
    index_lse = torch.logsumexp(stats[3], dim=-1)
    return _kl_rows(stats, index_lse), index_lse, teacher_lse


def index_kl_fwd_bwd(q, k, index_q, index_k, block_indices, cu_seqlens, max_seqlen: int, block_size: int,
                     scale: float, index_scale: float, teacher_lse=None, config: IndexKLConfig | None = None, *,
                     cu_seqlens_k=None, max_seqlen_k=None, lists: BlockCSR | None = None):
    """``kl_rows`` as :func:`index_kl_fwd` and the float32 gradients of ``sum(kl_rows)`` as
    :func:`index_kl_bwd` (unit ``grad_scale``), evaluating the teacher once (float32 atomics:
    not deterministic). Suffix queries and ``lists`` as in :func:`index_kl_fwd`."""
    config = config or IndexKLConfig()
    keys = dict(cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k)
    cu_seqlens_k, max_seqlen_k = key_layout(cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    stats = _kl_stats(index_q, block_indices.shape[-1])
    d_index_q = torch.zeros(index_q.shape, dtype=torch.float32, device=q.device)
    d_index_k = torch.zeros(index_k.shape, dtype=torch.float32, device=q.device)
    if not q.shape[0]:
        return _kl_rows(stats, torch.logsumexp(stats[3], dim=-1)), d_index_q, d_index_k
    csr = lists or invert_selection(block_indices, cu_seqlens, max_seqlen_k, block_size)
    if teacher_lse is None:
        teacher_lse = sparse_attention_lse(q, k, block_indices, cu_seqlens, max_seqlen, block_size, scale,
                                           config.teacher, lists=csr, **keys)
    _kl_fwd_launch(q, k, index_q, index_k, cu_seqlens, cu_seqlens_k, csr, teacher_lse, stats, scale, index_scale,
                   block_size, teacher=False, config=config)
    index_lse = torch.logsumexp(stats[3], dim=-1)
    grad_scale = torch.ones(1, dtype=torch.float32, device=q.device)
    _kl_bwd_launch(q, k, index_q, index_k, cu_seqlens, cu_seqlens_k, csr, teacher_lse, index_lse, grad_scale,
                   d_index_k, d_index_q, scale, index_scale, block_size, stats.shape[-1], deterministic=False,
                   config=config, stats=stats)
    return _kl_rows(stats, index_lse), d_index_q, d_index_k


def index_kl_bwd(q, k, index_q, index_k, block_indices, token_starts, cu_seqlens, max_seqlen: int,
                 teacher_lse, index_lse, grad_scale, block_size: int, scale: float, index_scale: float,
                 deterministic: bool = False, config: IndexKLConfig | None = None, *, token_positions=None,
                 cu_seqlens_k=None, max_seqlen_k=None, lists: BlockCSR | None = None):
    """Float32 gradients ``d index_q`` ``[T, G, Di]`` and ``d index_k`` ``[Tk, 1, Di]`` of
    ``grad_scale * sum(kl_rows)`` (``grad_scale`` a float32 ``[1]`` tensor). Suffix queries as in
    :func:`msa.kernels.sparse_attention.sparse_attention_fwd` (``token_starts``, ``token_positions``) and
    :func:`index_kl_fwd`, ``lists`` as there."""
    config = config or IndexKLConfig()
    cu_seqlens_k, max_seqlen_k = key_layout(cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    total, n_groups, index_dim = index_q.shape
    n_keys = index_k.shape[0]
    d_index_q = torch.zeros(total, n_groups, index_dim, dtype=torch.float32, device=q.device)
    if not total:  # keys without queries (suffix queries of none) get no gradient
        return d_index_q, torch.zeros(index_k.shape, dtype=torch.float32, device=q.device)
    # per-group contributions summed afterwards (deterministic), or one buffer accumulated with atomics
    d_index_k = torch.empty(n_groups, n_keys, index_dim, dtype=torch.float32, device=q.device) if deterministic \
        else torch.zeros(1, n_keys, index_dim, dtype=torch.float32, device=q.device)
    topk = block_indices.shape[-1]
    if deterministic:
        index_kl_bwd_dq_kernel[(total, n_groups)](
            q, k, index_q, index_k, block_indices, token_starts, teacher_lse=teacher_lse, index_lse=index_lse,
            grad_scale=grad_scale, d_index_q=d_index_q, scale_log2=scale * LOG2E.value, index_scale=index_scale,
            **query_position_args(token_starts, token_positions), **query_outer_heads(q, k), DI=index_dim,
            BLOCK_SIZE=block_size, TOPK=topk, UPCAST=INTERPRET, num_warps=4)
    csr = lists or invert_selection(block_indices, cu_seqlens, max_seqlen_k, block_size)
    _kl_bwd_launch(q, k, index_q, index_k, cu_seqlens, cu_seqlens_k, csr, teacher_lse, index_lse, grad_scale,
                   d_index_k, d_index_q, scale, index_scale, block_size, topk, deterministic, config)
    return d_index_q, d_index_k.sum(0).unsqueeze(1)
