"""Variant: 8-token tiles as two halves of QT/2 tokens with their own softmax states; a half whose tokens did not
select a block skips its products (the K/V block is still loaded once for both)."""
import triton
import triton.language as tl

from msa.kernels.sparse_attention import LN2, online_softmax_step


@triton.jit
def _half_rows(q, first_token, count, first_position, group, dims, HALF_INDEX: tl.constexpr, HQ: tl.constexpr,
               R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, QH: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.arange(0, QH * RP)
    token = HALF_INDEX * QH + rows // RP
    row_ok = (token < count) & (rows % RP < R)
    head_index = (first_token + token) * HQ + group * R + rows % RP
    q_tile = tl.load(q + head_index[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q_tile = q_tile.to(tl.float32)
    return token, row_ok, head_index, q_tile, first_position + token


@triton.jit
def paged_sparse_attention_halves_kernel(
    q, k, v, page_table, tiles, block_indices, block_lists, out, scale_log2,
    HQ: tl.constexpr, G: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, MAX_PAGES: tl.constexpr, TOPK: tl.constexpr, TOPKP: tl.constexpr, QT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    request = tl.load(tiles + tile * 4)
    first_token = tl.load(tiles + tile * 4 + 1).to(tl.int64)
    count = tl.load(tiles + tile * 4 + 2)
    first_position = tl.load(tiles + tile * 4 + 3)
    group = tl.program_id(1)
    QH: tl.constexpr = QT // 2
    dims = tl.arange(0, D)
    token_a, ok_a, head_a, q_a, pos_a = _half_rows(q, first_token, count, first_position, group, dims, 0, HQ, R, RP, D,
                                                   QH, UPCAST)
    token_b, ok_b, head_b, q_b, pos_b = _half_rows(q, first_token, count, first_position, group, dims, 1, HQ, R, RP, D,
                                                   QH, UPCAST)
    last_position = first_position + count - 1

    ENTRIES: tl.constexpr = QT * TOPKP
    entries = tl.arange(0, ENTRIES)
    entry_token = entries // TOPKP
    slot = entries % TOPKP
    entry_ok = (entry_token < count) & (slot < TOPK)
    selected = tl.load(block_indices + ((first_token + entry_token) * G + group) * TOPK + slot, mask=entry_ok, other=-1)
    selected = tl.where(selected <= (first_position + entry_token) // BLOCK_SIZE, selected, -1)
    same = (selected[:, None] == selected[None, :]) & (selected[:, None] >= 0)
    first = (selected >= 0) & (tl.max((same & (entries[None, :] < entries[:, None])).to(tl.int32), axis=1) == 0)
    rank = tl.cumsum(first.to(tl.int32), axis=0) - 1
    n_distinct = tl.sum(first.to(tl.int32), axis=0)
    token_bits = tl.sum(tl.where(same, (1 << entry_token)[None, :], 0), axis=1)
    list_row = block_lists + (tl.program_id(0) * G + group).to(tl.int64) * 3 * ENTRIES
    tl.store(list_row + rank, selected, mask=first)
    tl.store(list_row + ENTRIES + rank, tl.load(page_table + request * MAX_PAGES + selected, mask=first), mask=first)
    tl.store(list_row + 2 * ENTRIES + rank, token_bits, mask=first)
    tl.debug_barrier()

    HALF_ROWS: tl.constexpr = QH * RP
    max_a = tl.full((HALF_ROWS,), float("-inf"), tl.float32)
    sum_a = tl.zeros((HALF_ROWS,), tl.float32)
    acc_a = tl.zeros((HALF_ROWS, D), tl.float32)
    max_b = tl.full((HALF_ROWS,), float("-inf"), tl.float32)
    sum_b = tl.zeros((HALF_ROWS,), tl.float32)
    acc_b = tl.zeros((HALF_ROWS, D), tl.float32)
    offsets = tl.arange(0, BLOCK_SIZE)
    LOW: tl.constexpr = (1 << QH) - 1
    for index in range(0, n_distinct):
        block = tl.load(list_row + index)
        page = tl.load(list_row + ENTRIES + index).to(tl.int64)
        kv_rows = ((page * BLOCK_SIZE + offsets) * G + group)[:, None] * D + dims[None, :]
        written = (block * BLOCK_SIZE + offsets <= last_position)[:, None]
        k_tile = tl.load(k + kv_rows, mask=written, other=0.0)
        v_tile = tl.load(v + kv_rows, mask=written, other=0.0)
        if UPCAST:
            k_tile, v_tile = k_tile.to(tl.float32), v_tile.to(tl.float32)
        bits = tl.load(list_row + 2 * ENTRIES + index)
        key_pos = block * BLOCK_SIZE + offsets
        if (bits & LOW) != 0:
            visible = (((bits >> token_a) & 1) != 0)[:, None] & (key_pos[None, :] <= pos_a[:, None])
            max_a, sum_a, acc_a = online_softmax_step(q_a, k_tile, v_tile, visible, max_a, sum_a, acc_a, scale_log2)
        if (bits >> QH) != 0:
            visible = (((bits >> token_b) & 1) != 0)[:, None] & (key_pos[None, :] <= pos_b[:, None])
            max_b, sum_b, acc_b = online_softmax_step(q_b, k_tile, v_tile, visible, max_b, sum_b, acc_b, scale_log2)

    acc_a = acc_a / tl.where(sum_a == 0.0, 1.0, sum_a)[:, None]
    acc_b = acc_b / tl.where(sum_b == 0.0, 1.0, sum_b)[:, None]
    tl.store(out + head_a[:, None] * D + dims[None, :], acc_a.to(out.dtype.element_ty), mask=ok_a[:, None])
    tl.store(out + head_b[:, None] * D + dims[None, :], acc_b.to(out.dtype.element_ty), mask=ok_b[:, None])


def launch(q, k, v, page_table, tiles, block_indices, out, scale, tokens_per_tile, lists, num_warps=8, num_stages=3):
    from msa.kernels import INTERPRET, LOG2E, _pow2
    n_heads, head_dim = q.shape[1:]
    block_size, n_groups = k.shape[1:3]
    topk = block_indices.shape[-1]
    rp = max(_pow2(n_heads // n_groups), triton.cdiv(32, tokens_per_tile))  # each half needs 16 rows
    paged_sparse_attention_halves_kernel[(tiles.shape[0], n_groups)](
        q, k, v, page_table, tiles, block_indices, lists, out, scale * LOG2E.value,
        HQ=n_heads, G=n_groups, R=n_heads // n_groups, RP=rp, D=head_dim,
        BLOCK_SIZE=block_size, MAX_PAGES=page_table.shape[1], TOPK=topk, TOPKP=_pow2(topk), QT=tokens_per_tile,
        UPCAST=INTERPRET, num_warps=num_warps, num_stages=num_stages)
