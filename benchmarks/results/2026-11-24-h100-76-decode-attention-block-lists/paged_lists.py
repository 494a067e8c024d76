"""Variant of paged_sparse_attention_kernel: the prologue writes the tile's distinct blocks (block, physical page,
token bits) to a per-program scratch row; the loop loads them (one load level before the K/V loads, no reduction)."""
import triton
import triton.language as tl

from msa.kernels.sparse_attention import LN2, online_softmax_step


@triton.jit
def paged_sparse_attention_lists_kernel(
    q, k, v, page_table, tiles, block_indices, out, partial_out, partial_lse, lists, scale_log2,
    HQ: tl.constexpr, G: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, MAX_PAGES: tl.constexpr, TOPK: tl.constexpr, TOPKP: tl.constexpr, QT: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    request = tl.load(tiles + tile * 4)
    first_token = tl.load(tiles + tile * 4 + 1).to(tl.int64)
    count = tl.load(tiles + tile * 4 + 2)
    first_position = tl.load(tiles + tile * 4 + 3)
    group = tl.program_id(1)
    part = tl.program_id(2)
    ROWS: tl.constexpr = QT * RP
    rows = tl.arange(0, ROWS)
    token = rows // RP
    row_ok = (token < count) & (rows % RP < R)
    position = first_position + token
    last_position = first_position + count - 1
    head_index = (first_token + token) * HQ + group * R + rows % RP
    dims = tl.arange(0, D)
    q_tile = tl.load(q + head_index[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q_tile = q_tile.to(tl.float32)

    ENTRIES: tl.constexpr = QT * TOPKP
    entries = tl.arange(0, ENTRIES)
    entry_token = entries // TOPKP
    slot = entries % TOPKP
    entry_ok = (entry_token < count) & (slot < TOPK)
    selected = tl.load(block_indices + ((first_token + entry_token) * G + group) * TOPK + slot, mask=entry_ok, other=-1)
    selected = tl.where(selected <= (first_position + entry_token) // BLOCK_SIZE, selected, -1)
    same = (selected[:, None] == selected[None, :]) & (selected[:, None] >= 0)
    earlier = same & (entries[None, :] < entries[:, None])
    first = (selected >= 0) & (tl.max(earlier.to(tl.int32), axis=1) == 0)
    rank = tl.cumsum(first.to(tl.int32), axis=0) - 1
    n_distinct = tl.sum(first.to(tl.int32), axis=0)
    token_bits = tl.sum(tl.where(same, (1 << entry_token)[None, :], 0), axis=1)  # a token selects a block once
    physical = tl.load(page_table + request * MAX_PAGES + selected, mask=first, other=0)
    list_row = lists + ((tile * G + group) * SPLIT + part).to(tl.int64) * 3 * ENTRIES
    tl.store(list_row + rank, selected, mask=first)
    tl.store(list_row + ENTRIES + rank, physical, mask=first)
    tl.store(list_row + 2 * ENTRIES + rank, token_bits, mask=first)
    tl.debug_barrier()

    row_max = tl.full((ROWS,), float("-inf"), tl.float32)
    row_sum = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    offsets = tl.arange(0, BLOCK_SIZE)
    for index in range(part * n_distinct // SPLIT, (part + 1) * n_distinct // SPLIT):
        block = tl.load(list_row + index)
        page = tl.load(list_row + ENTRIES + index).to(tl.int64)
        bits = tl.load(list_row + 2 * ENTRIES + index)
        kv_rows = ((page * BLOCK_SIZE + offsets) * G + group)[:, None] * D + dims[None, :]
        written = (block * BLOCK_SIZE + offsets <= last_position)[:, None]
        k_tile = tl.load(k + kv_rows, mask=written, other=0.0)
        v_tile = tl.load(v + kv_rows, mask=written, other=0.0)
        if UPCAST:
            k_tile, v_tile = k_tile.to(tl.float32), v_tile.to(tl.float32)
        member = ((bits >> token) & 1) != 0
        visible = member[:, None] & ((block * BLOCK_SIZE + offsets)[None, :] <= position[:, None])
        row_max, row_sum, acc = online_softmax_step(q_tile, k_tile, v_tile, visible, row_max, row_sum, acc, scale_log2)

    acc = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    if SPLIT == 1:
        tl.store(out + head_index[:, None] * D + dims[None, :], acc.to(out.dtype.element_ty), mask=row_ok[:, None])
    else:
        safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        partial_rows = head_index * SPLIT + part
        tl.store(partial_out + partial_rows[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(partial_lse + partial_rows, (safe_max + tl.log2(row_sum)) * LN2, mask=row_ok)


def launch(q, k, v, page_table, tiles, block_indices, out, scale, tokens_per_tile, split=1, partial_out=None,
           partial_lse=None, lse=None, lists=None, num_warps=None, num_stages=3):
    from msa.kernels import INTERPRET, LOG2E, MERGE_ROWS, PAGED_ATTENTION_WARPS, _pow2
    from msa.kernels.sparse_attention import merge_partials_kernel
    n_heads, head_dim = q.shape[1:]
    block_size, n_groups = k.shape[1:3]
    topk = block_indices.shape[-1]
    partial_out = out if split == 1 else partial_out
    partial_lse = out if split == 1 else partial_lse
    paged_sparse_attention_lists_kernel[(tiles.shape[0], n_groups, split)](
        q, k, v, page_table, tiles, block_indices, out, partial_out, partial_lse, lists, scale * LOG2E.value,
        HQ=n_heads, G=n_groups, R=n_heads // n_groups,
        RP=max(_pow2(n_heads // n_groups), triton.cdiv(16, tokens_per_tile)), D=head_dim,
        BLOCK_SIZE=block_size, MAX_PAGES=page_table.shape[1], TOPK=topk, TOPKP=_pow2(topk), QT=tokens_per_tile,
        SPLIT=split, UPCAST=INTERPRET, num_warps=num_warps or PAGED_ATTENTION_WARPS[tokens_per_tile > 1],
        num_stages=num_stages)
    if split > 1:
        rows = q.shape[0] * n_heads
        merge_partials_kernel[(triton.cdiv(rows, MERGE_ROWS),)](
            partial_out, partial_lse, out, lse, rows, TOPK=split, KP=_pow2(split), D=head_dim, HEADS=MERGE_ROWS,
            num_warps=4)


def lists_size(n_tiles, n_groups, tokens_per_tile, topk, split):
    return n_tiles * n_groups * split * 3 * tokens_per_tile * triton.next_power_of_2(topk)
