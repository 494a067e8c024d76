"""Hopper (sm_90) KV-outer forward partials in Gluon.

The schedule of ``sparse_attention_fwd_partial_kernel`` (one program per (key
block, group, list part) holds its K/V block in shared memory and walks the
(token, slot) entries that selected it, ROWS = QT tokens x R heads per tile,
``wgmma`` products) with one change Triton does not make: the q rows of a tile
are gathered by ``cp.async`` straight into a swizzled shared-memory ring of two
tiles, issued two tiles ahead, instead of through registers and a
shared-memory store per tile. Outputs are those of the Triton kernel, bit for
bit: one normalised partial output and natural-log LSE per (token, head, slot),
merged by ``merge_partials_kernel``.

It is launched by the KV-outer forward of :mod:`msa.kernels.sparse_attention`
in place of the Triton kernel where the device and shapes allow (and that one
where this Triton cannot compile it); that launcher imports this module
lazily, as a Triton without Gluon cannot import it.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import async_copy, fence_async_shared, warpgroup_mma

LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _tile_codes(csr_entries, entry, last, layout: gl.constexpr, ROWS: gl.constexpr, QT: gl.constexpr,
                R: gl.constexpr, TOPK: gl.constexpr):
    """(token, slot, head within group, valid) of the ROWS rows of the QT entries from ``entry``, in ``layout``."""
    rows = gl.arange(0, ROWS, layout=layout)
    entry_rows = entry + rows // R
    row_ok = (rows < QT * R) & (entry_rows < last)
    code = gl.load(csr_entries + entry_rows, mask=row_ok, other=0)
    return (code // TOPK).to(gl.int64), code % TOPK, rows % R, row_ok


@gluon.jit
def _gather_q(q, q_buffer, csr_entries, entry, last, group, gather_layout: gl.constexpr, HQ: gl.constexpr,
              R: gl.constexpr, D: gl.constexpr, ROWS: gl.constexpr, QT: gl.constexpr, TOPK: gl.constexpr):
    """Start the ``cp.async`` copies of a tile's q rows into ``q_buffer`` (zeros for rows past ``last``)."""
    token, _, heads, row_ok = _tile_codes(csr_entries, entry, last, gl.SliceLayout(1, gather_layout), ROWS, QT, R,
                                          TOPK)
    dims = gl.arange(0, D, layout=gl.SliceLayout(0, gather_layout))
    rows = token * HQ + group * R + heads
    async_copy.async_copy_global_to_shared(q_buffer, q + rows[:, None] * D + dims[None, :], mask=row_ok[:, None])
    async_copy.commit_group()


@gluon.jit
def sparse_attention_fwd_partial_hopper_kernel(
    q, k, v,
    cu_seqlens, csr_offsets, csr_entries,
    partial_out,  # [T, HQ, TOPK, D]: this block's normalised output per (token, head, slot), written
    partial_lse,  # float32 [T, HQ, TOPK]: natural-log LSE per (token, head, slot), written
    scale_log2, n_block_slots,
    token_offset,  # first token of the chunk the partial buffers hold
    HQ: gl.constexpr, G: gl.constexpr, R: gl.constexpr, D: gl.constexpr,
    BLOCK_SIZE: gl.constexpr, MAX_BLOCKS: gl.constexpr, TOPK: gl.constexpr,
    ROWS: gl.constexpr, QT: gl.constexpr,  # (token, head) rows per tile (64: one warpgroup), tokens per tile
    LIST_PARTS: gl.constexpr,
):
    block_slot = gl.program_id(0)
    group = gl.program_id(1)
    part = gl.program_id(2)
    first = gl.load(csr_offsets + group * n_block_slots + block_slot)
    count = gl.load(csr_offsets + group * n_block_slots + block_slot + 1) - first
    first, last = first + count * part // LIST_PARTS, first + count * (part + 1) // LIST_PARTS
    if first == last:
        return
    seq = block_slot // MAX_BLOCKS
    start = gl.load(cu_seqlens + seq)
    seqlen = gl.load(cu_seqlens + seq + 1) - start
    block_start = (block_slot % MAX_BLOCKS) * BLOCK_SIZE
    last_key = block_start + BLOCK_SIZE - 1

    dtype: gl.constexpr = q.dtype.element_ty
    # 16-byte vectors along D for the gathers, the K/V loads and the partial stores
    gather_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // D, D // 8], [4, 1], [1, 0])
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_SIZE, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    out_rows: gl.constexpr = gl.SliceLayout(1, gather_layout)

    # the K/V block, once
    k_pos = block_start + gl.arange(0, BLOCK_SIZE, layout=out_rows)
    dims = gl.arange(0, D, layout=gl.SliceLayout(0, gather_layout))
    kv_offsets = ((start + k_pos) * G + group)[:, None] * D + dims[None, :]
    key_ok = (k_pos < seqlen)[:, None]
    kv_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_SIZE, D], dtype)
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_SIZE, D], kv_smem_layout,
                                       gl.load(k + kv_offsets, mask=key_ok, other=0.0))
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_SIZE, D], kv_smem_layout,
                                       gl.load(v + kv_offsets, mask=key_ok, other=0.0))
    score_keys = block_start + gl.arange(0, BLOCK_SIZE, layout=gl.SliceLayout(0, s_layout))
    zero_scores = gl.zeros([ROWS, BLOCK_SIZE], gl.float32, s_layout)
    zero_out = gl.zeros([ROWS, D], gl.float32, o_layout)

    # two q buffers: tile t's rows are read by its product while tile t+1's land
    q_bufs = gl.allocate_shared_memory(dtype, [2, ROWS, D], gl.NVMMASharedLayout.get_default_for([ROWS, D], dtype))
    _gather_q(q, q_bufs.index(0), csr_entries, first, last, group, gather_layout, HQ, R, D, ROWS, QT, TOPK)
    _gather_q(q, q_bufs.index(1), csr_entries, first + QT, last, group, gather_layout, HQ, R, D, ROWS, QT, TOPK)
    token, slot, heads, row_ok = _tile_codes(csr_entries, first, last, s_rows, ROWS, QT, R, TOPK)
    for entry in range(first, last, QT):
        buffer = ((entry - first) // QT) % 2
        async_copy.wait_group(1)  # this tile's rows have landed (the next tile's may not have)
        fence_async_shared()
        gl.thread_barrier()
        scores = warpgroup_mma(q_bufs.index(buffer), k_smem.permute((1, 0)), zero_scores, use_acc=False)
        gl.thread_barrier()  # every warp is past the product: the buffer takes the rows of the tile after next
        _gather_q(q, q_bufs.index(buffer), csr_entries, entry + 2 * QT, last, group, gather_layout, HQ, R, D, ROWS,
                  QT, TOPK)
        next_token, next_slot, next_heads, next_ok = _tile_codes(csr_entries, entry + QT, last, s_rows, ROWS, QT, R,
                                                                 TOPK)
        # entries ascend by token within a list: only tiles starting inside the block hold tokens that see part of it
        if gl.load(csr_entries + entry) // TOPK - start < last_key:
            visible = row_ok[:, None] & (score_keys[None, :] <= (token - start)[:, None])
            scores = gl.where(visible, scores, float("-inf"))
        row_max = gl.max(scores, axis=1)
        scaled_max = gl.where(row_max == float("-inf"), 0.0, row_max * scale_log2)
        probs = gl.exp2(scores * scale_log2 - scaled_max[:, None])
        row_sum = gl.sum(probs, axis=1)
        partial_index = (token * HQ + group * R + heads - token_offset * HQ) * TOPK + slot
        gl.store(partial_lse + partial_index, (scaled_max + gl.log2(row_sum)) * LN2, mask=row_ok)
        out = warpgroup_mma(gl.convert_layout(probs.to(dtype), p_layout), v_smem, zero_out, use_acc=False)
        inv_sum = gl.convert_layout(1.0 / gl.where(row_sum == 0.0, 1.0, row_sum), gl.SliceLayout(1, o_layout))
        out = gl.convert_layout((out * inv_sum[:, None]).to(dtype), gather_layout)
        gl.store(partial_out + gl.convert_layout(partial_index, out_rows)[:, None] * D + dims[None, :], out,
                 mask=gl.convert_layout(row_ok, out_rows)[:, None])
        token, slot, heads, row_ok = next_token, next_slot, next_heads, next_ok
    async_copy.wait_group(0)
