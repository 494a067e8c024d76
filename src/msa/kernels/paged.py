"""Triton kernels of MSA over a paged KV cache: block scores of the index scan, and sparse attention.

Both take a work list ``tiles`` (int32 ``[n_tiles, 4]``: request, first
packed token, token count, position of the first token): a tile is up to QT
consecutive new tokens of one request (the two kernels use different QT). Query ``i`` of a tile sits at
position ``first_position + i`` and sees the cached keys up to it. A page is
one key block (``BLOCK_SIZE`` tokens), so block ``b`` of a request lives in
page ``page_table[request, b]``.

``paged_block_scores_kernel`` is the index scan: each program scores one
tile's (token, group) rows against a run of pages of the index-key cache and
writes each page's max-pooled logit (-inf for pages after a row's local block,
+inf for the local block, which marks it). No exponential, no softmax scale
(it does not change the ranking): the Top-k over these scores
(``top_pages_kernel``: the pages before the marked one, then it) is the Index
Branch's selection, in the layout of :func:`msa.reference.rank_blocks`.
Splitting over pages keeps the GPU busy at any batch size, and the scores are
~1 byte per key read (the scan is memory-bound on the index keys, 2 * Di bytes
per key, or Di + 4 from an FP8 cache: ``paged_append_kernel``, which writes a step's K, V and
index keys in one launch, rounds the keys as :mod:`msa.fp8` does, and the
scan rounds its queries the same way).

``paged_sparse_attention_kernel`` runs one tile x one GQA group per program:
rows are the tile's tokens x the group's query heads, and the program walks
the union of the blocks its tokens selected, each block loaded once for all
the rows that selected it (exact online softmax, per-row masks): the tile's
distinct blocks are listed first, in a scratch row of its own (block, page,
bits of the tokens that selected it), so the loop over them loads its K/V
pages one load after the list's, with no branch and no reduction before
them, and they can be pipelined. With SPLIT > 1 (split-KV) the distinct
blocks are divided among SPLIT programs that write normalised partial outputs
and LSEs for :func:`msa.kernels.sparse_attention.merge_partials_kernel`.

The launchers (``paged_*``, ``top_pages``, used by :mod:`msa.inference`)
write into buffers they are given and allocate nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from msa.fp8 import INVERSE_FP8_MAX
from msa.kernels.sparse_attention import MERGE_ROWS, merge_partials
from msa.kernels.tiles import INTERPRET, LN2, LOG2E, narrowing_segments, pow2, sm_count, write_selection

# Tokens per tile of the index scan: one read of a request's index keys serves this many of its new tokens.
PAGED_SCAN_TOKENS = 16
# Attention tiles (msa.inference chooses): 1 token (each token reads its own blocks: no wasted rows; the fastest on
# small batches and on independent selections) or PAGED_ATTENTION_TOKENS tokens of a decode step (a request's tokens
# load each block of their union once: on selections that overlap as much as a trained model's, attention is faster
# at 200K x 32-128 once the batch fills the GPU). See, in benchmarks/results, 2026-11-23-h100-13-inference-union-tiles,
# 2026-11-23-h100-14-inference-decode, 2026-11-23-h100-15-inference-prefill,
# 2026-11-23-h100-19-inference-overlapping-tiles1, 2026-11-23-h100-20-inference-overlapping-tiles8,
# 2026-11-23-h100-48-decode-attention-sweep and 2026-11-23-h100-50-decode-final-tiles.
PAGED_ATTENTION_TOKENS = 8
PAGED_MAX_SPLIT = 8  # at most this many programs per tile and group split the attention of small batches
# top_pages narrows rows from this many rows per SM on (fewer rows: one row per 4-warp program has the lower latency)
TOP_PAGES_NARROW_ROWS_PER_SM = 4


@dataclass(frozen=True)
class PagedScanConfig:
    """Launch of ``paged_block_scores_kernel``."""

    pages: int  # pages per program
    pages_per_product: int  # divides ``pages``
    num_warps: int
    num_stages: int  # of the page loop's software pipeline


@dataclass(frozen=True)
class TopPagesConfig:
    """Launch of ``top_pages_kernel`` (one row per program)."""

    num_warps: int
    segments: int  # > 0: rows narrowed to their candidates first (needs a candidates scratch); 0: whole rows


@dataclass(frozen=True)
class PagedAttentionConfig:
    """Launch of ``paged_sparse_attention_kernel`` and of the merge of its split-KV partials."""

    num_warps: int
    num_stages: int
    merge_rows: int = MERGE_ROWS


@triton.jit
def _tile(tiles):
    tile = tl.program_id(0)
    request = tl.load(tiles + tile * 4)
    first_token = tl.load(tiles + tile * 4 + 1).to(tl.int64)
    count = tl.load(tiles + tile * 4 + 2)
    first_position = tl.load(tiles + tile * 4 + 3)
    return request, first_token, count, first_position


@triton.jit
def _nearest_e4m3(y):
    """The float8_e4m3fn value nearest to float32 ``y`` (|y| <= 448, ties to even), as float32: the grid step
    from y's exponent (3 mantissa bits, subnormals below 2**-6), then the 1.5 * 2**23 rounding trick. Rounded
    here because the interpreter's conversion sends values just below a power of two to half of it."""
    exponent = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse_step = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0
    return ((y * inverse_step + magic) - magic) * step


@triton.jit
def _fp8_rows(x, INVERSE_FP8_MAX: tl.constexpr):
    """Rows of ``x`` scaled by their amax / 448 and rounded to float8_e4m3fn, as :func:`msa.fp8.quantize_rows`
    computes them (the same float32 operations, round to nearest): returns (FP8 rows, float32 scales)."""
    x = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1.1754943508222875e-38) * INVERSE_FP8_MAX
    return _nearest_e4m3(tl.div_rn(x, scale[:, None])).to(tl.float8e4nv), scale


@triton.jit
def paged_append_kernel(
    k,  # [T, G, D]: the new tokens' keys (token stride ``k_stride``, each token's (G, D) row contiguous)
    v,  # [T, G, D] (token stride ``v_stride``)
    index_k,  # [T, DI] (token stride ``index_stride``)
    slots,  # int64 [T]: their flat cache slots (page * BLOCK_SIZE + offset)
    k_pool,  # [P * BLOCK_SIZE, G * D]: one layer's key pages, written at ``slots``
    v_pool,  # [P * BLOCK_SIZE, G * D]
    index_pool,  # [P * BLOCK_SIZE, DI] (float8_e4m3fn with SCALED)
    scale_pool,  # float32 [P * BLOCK_SIZE], written at ``slots`` with SCALED, else unused
    n_tokens, k_stride, v_stride, index_stride,
    GD: tl.constexpr,  # G * D
    GDP: tl.constexpr,  # GD rounded up to a power of two
    DI: tl.constexpr,
    ROWS: tl.constexpr,
    SCALED: tl.constexpr,  # round the index keys to FP8 with a scale per key (:mod:`msa.fp8`)
    INVERSE_FP8_MAX: tl.constexpr,
):
    """A decode or prefill step's cache append in one launch: K, V and index key of ROWS tokens per program."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_tokens
    slot = tl.load(slots + rows, mask=row_ok, other=0)
    columns = tl.arange(0, GDP)
    ok = row_ok[:, None] & (columns < GD)[None, :]
    token = rows.to(tl.int64)[:, None]
    target = slot[:, None] * GD + columns[None, :]
    tl.store(k_pool + target, tl.load(k + token * k_stride + columns[None, :], mask=ok), mask=ok)
    tl.store(v_pool + target, tl.load(v + token * v_stride + columns[None, :], mask=ok), mask=ok)
    dims = tl.arange(0, DI)
    keys = tl.load(index_k + rows.to(tl.int64)[:, None] * index_stride + dims[None, :], mask=row_ok[:, None],
                   other=0.0)
    if SCALED:
        keys, scale = _fp8_rows(keys, INVERSE_FP8_MAX)
        tl.store(scale_pool + slot, scale, mask=row_ok)
    tl.store(index_pool + slot[:, None] * DI + dims[None, :], keys, mask=row_ok[:, None])


@triton.jit
def paged_block_scores_kernel(
    index_q,  # [T, G, DI]
    index_k,  # [P, BLOCK_SIZE, DI]: one layer's index-key pages
    index_scale,  # float32 [P, BLOCK_SIZE] with SCALED (an FP8 cache), else unused
    page_table,  # int32 [max_requests, MAX_PAGES]
    tiles,  # int32 [n_tiles, 4]
    scores,  # float32 [rows, MAX_PAGES], row = (token - token_offset) * G + group; written
    token_offset,  # first token of the chunk ``scores`` holds
    G: tl.constexpr,
    GP: tl.constexpr,  # G rounded up to a power of two, and so that QT * GP >= 16
    DI: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    MAX_PAGES: tl.constexpr,
    QT: tl.constexpr,  # tokens per tile
    PAGES: tl.constexpr,  # pages per program
    NB: tl.constexpr,  # pages per matrix product (divides PAGES)
    STAGES: tl.constexpr,  # software-pipeline stages of the page loop
    SCALED: tl.constexpr,  # FP8 keys with per-key scales: the queries are rounded to FP8 too (FP8 products)
    INVERSE_FP8_MAX: tl.constexpr,
    UPCAST: tl.constexpr,
):
    request, first_token, count, first_position = _tile(tiles)
    ROWS: tl.constexpr = QT * GP
    rows = tl.arange(0, ROWS)
    token = rows // GP
    group = rows % GP
    row_ok = (token < count) & (group < G)
    position = first_position + token
    local = position // BLOCK_SIZE
    last_local = (first_position + count - 1) // BLOCK_SIZE
    score_rows = scores + ((first_token + token - token_offset) * G + group).to(tl.int64)[:, None] * MAX_PAGES
    page_run = tl.arange(0, NB)

    first_page = tl.program_id(1) * PAGES
    if first_page > last_local:  # every page of this run is after every row's local block
        for step in tl.static_range(0, PAGES, NB):
            page = first_page + step + page_run
            tl.store(score_rows + page[None, :], tl.full((ROWS, NB), float("-inf"), tl.float32),
                     mask=row_ok[:, None] & (page[None, :] < MAX_PAGES))
        return

    dims = tl.arange(0, DI)
    iq = tl.load(index_q + ((first_token + token) * G + group)[:, None] * DI + dims[None, :], mask=row_ok[:, None],
                 other=0.0)
    if SCALED:
        iq, _ = _fp8_rows(iq, INVERSE_FP8_MAX)  # a row's own scale changes none of its rankings
    if UPCAST:
        iq = iq.to(tl.float32)
    offsets = tl.arange(0, BLOCK_SIZE)
    for step in tl.range(0, PAGES, NB, num_stages=STAGES):
        page = first_page + step + page_run
        read = page <= last_local
        physical = tl.load(page_table + request * MAX_PAGES + page, mask=read, other=0).to(tl.int64)
        key_rows = tl.reshape(physical[:, None] * BLOCK_SIZE + offsets[None, :], (NB * BLOCK_SIZE,))
        key_read = tl.reshape(read[:, None] & (offsets[None, :] >= 0), (NB * BLOCK_SIZE,))
        ik = tl.load(index_k + key_rows[:, None] * DI + dims[None, :], mask=key_read[:, None], other=0.0)
        if UPCAST:
            ik = ik.to(tl.float32)
        logits = tl.dot(iq, tl.trans(ik))
        if SCALED:
            logits *= tl.load(index_scale + key_rows, mask=key_read, other=1.0)[None, :]
        if (first_page + step + NB) * BLOCK_SIZE - 1 > first_position:  # keys after a row's position
            key_position = tl.reshape((page * BLOCK_SIZE)[:, None] + offsets[None, :], (NB * BLOCK_SIZE,))
            logits = tl.where(key_position[None, :] <= position[:, None], logits, float("-inf"))
        pooled = tl.max(tl.reshape(logits, (ROWS, NB, BLOCK_SIZE)), axis=2)
        pooled = tl.where(page[None, :] == local[:, None], float("inf"), pooled)
        tl.store(score_rows + page[None, :], pooled, mask=row_ok[:, None] & (page[None, :] < MAX_PAGES))


@triton.jit
def top_pages_kernel(
    scores,  # float32 [rows, N]
    top_pages,  # int64 [rows, TOPK], written: each row's selection (see below)
    candidates,  # float32 [rows, 2 * CANDIDATES] scratch with SEGMENTS
    N: tl.constexpr,
    NP: tl.constexpr,  # N rounded up to a power of two
    TOPK: tl.constexpr,
    SEGMENTS: tl.constexpr,  # > 0: the rounds run over the row's candidates (write_top_narrowed)
    CANDIDATES: tl.constexpr,
):
    """The selection of one row of page scores whose local page is the one scored +inf: the (up to) TOPK - 1
    best pages before it by rounds of argmax (no sort; ties go to the lower page), then it, then -1."""
    row = tl.program_id(0).to(tl.int64)
    pages = tl.arange(0, NP)[None, :]
    row_scores = tl.load(scores + row * N + pages, mask=pages < N, other=float("-inf"))
    local = tl.min(tl.where(row_scores == float("inf"), pages, NP), axis=1)
    out = top_pages + row * TOPK + tl.arange(0, 1)
    row_ok = tl.full((1,), True, tl.int1)
    scratch = candidates + row * (2 * CANDIDATES) + tl.arange(0, 1)[:, None]
    write_selection(row_scores, pages, NP, out, row_ok, local, TOPK - 1, scratch, SEGMENTS, CANDIDATES)


@triton.jit
def _member_rows_step(scores, v_tile, member, row_max, row_sum, acc, scale_log2):
    """One block of an exact online softmax (base 2) in which only the ``member`` rows take part: ``scores``
    ``[M, N]`` unscaled (-inf where masked), the scale folded into the exponent's FMA, a row mask instead of an
    element mask (other rows keep their state: their exponent's bias is +inf)."""
    block_max = tl.max(scores, axis=1) * scale_log2
    new_max = tl.where(member, tl.maximum(row_max, block_max), row_max)
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.exp2(row_max - safe_max)
    probs = tl.exp2(scores * scale_log2 - tl.where(member, safe_max, float("inf"))[:, None])
    row_sum = row_sum * alpha + tl.sum(probs, axis=1)
    acc = acc * alpha[:, None] + tl.dot(probs.to(v_tile.dtype), v_tile)
    return new_max, row_sum, acc


@triton.jit
def paged_sparse_attention_kernel(
    q,  # [T, HQ, D]
    k,  # [P, BLOCK_SIZE, G, D]: one layer's key pages
    v,  # [P, BLOCK_SIZE, G, D]
    page_table,  # int32 [max_requests, MAX_PAGES]
    tiles,  # int32 [n_tiles, 4]
    block_indices,  # int64 [T, G, TOPK]: entries after a token's local block are ignored
    block_lists,  # int32 [n_tiles * G * SPLIT, 3, QT * TOPKP]: scratch, a row per program
    out,  # [T, HQ, D], written when SPLIT == 1
    partial_out,  # float32 [T * HQ, SPLIT, D], written when SPLIT > 1
    partial_lse,  # float32 [T * HQ, SPLIT], written when SPLIT > 1
    scale_log2,
    HQ: tl.constexpr,
    G: tl.constexpr,
    R: tl.constexpr,  # query heads per group
    RP: tl.constexpr,  # R rounded up to a power of two, and so that QT * RP >= 16
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    MAX_PAGES: tl.constexpr,
    TOPK: tl.constexpr,
    TOPKP: tl.constexpr,  # TOPK rounded up to a power of two
    QT: tl.constexpr,  # tokens per tile (at most 16: the tokens that selected a block are bits of an int32)
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    request, first_token, count, first_position = _tile(tiles)
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

    # The tile's selections, flattened: entry e = token * TOPKP + slot; -1 where unused or after the local block.
    ENTRIES: tl.constexpr = QT * TOPKP
    entries = tl.arange(0, ENTRIES)
    entry_token = entries // TOPKP
    slot = entries % TOPKP
    entry_ok = (entry_token < count) & (slot < TOPK)
    selected = tl.load(block_indices + ((first_token + entry_token) * G + group) * TOPK + slot, mask=entry_ok,
                       other=-1).to(tl.int32)
    selected = tl.where(selected <= (first_position + entry_token) // BLOCK_SIZE, selected, -1)
    # The distinct blocks in order of first appearance, with the bits of the tokens that selected each (a token
    # selects a block once), written to this program's scratch row: the loop below then loads a block's K/V one
    # load after its list entry, with no reduction and no branch before them, and the compiler pipelines them
    # (faster than finding each block by a reduction in the loop: see
    # benchmarks/results/2026-11-24-h100-76-decode-attention-block-lists; that in turn was faster than a branch at
    # each entry's first occurrence: see benchmarks/results/2026-11-23-h100-42-decode-block-loops).
    same = (selected[:, None] == selected[None, :]) & (selected[:, None] >= 0)
    first = (selected >= 0) & (tl.max((same & (entries[None, :] < entries[:, None])).to(tl.int32), axis=1) == 0)
    rank = tl.cumsum(first.to(tl.int32), axis=0) - 1
    n_distinct = tl.sum(first.to(tl.int32), axis=0)
    token_bits = tl.sum(tl.where(same, (1 << entry_token)[None, :], 0), axis=1)
    list_row = block_lists + ((tl.program_id(0) * G + group) * SPLIT + part).to(tl.int64) * 3 * ENTRIES
    tl.store(list_row + rank, selected, mask=first)
    tl.store(list_row + ENTRIES + rank, tl.load(page_table + request * MAX_PAGES + selected, mask=first), mask=first)
    tl.store(list_row + 2 * ENTRIES + rank, token_bits, mask=first)
    tl.debug_barrier()  # the row's stores are visible to all the program's threads

    row_max = tl.full((ROWS,), float("-inf"), tl.float32)
    row_sum = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    offsets = tl.arange(0, BLOCK_SIZE)
    for index in range(part * n_distinct // SPLIT, (part + 1) * n_distinct // SPLIT):
        block = tl.load(list_row + index)
        page = tl.load(list_row + ENTRIES + index).to(tl.int64)
        kv_rows = ((page * BLOCK_SIZE + offsets) * G + group)[:, None] * D + dims[None, :]
        written = (block * BLOCK_SIZE + offsets <= last_position)[:, None]  # the rest of a page is stale
        k_tile = tl.load(k + kv_rows, mask=written, other=0.0)
        v_tile = tl.load(v + kv_rows, mask=written, other=0.0)
        if UPCAST:
            k_tile, v_tile = k_tile.to(tl.float32), v_tile.to(tl.float32)
        member = ((tl.load(list_row + 2 * ENTRIES + index) >> token) & 1) != 0  # rows whose token selected it
        scores = tl.dot(q_tile, tl.trans(k_tile))
        if block * BLOCK_SIZE + BLOCK_SIZE - 1 > first_position:  # holds a tile token's position: causal mask
            scores = tl.where((block * BLOCK_SIZE + offsets)[None, :] <= position[:, None], scores, float("-inf"))
        row_max, row_sum, acc = _member_rows_step(scores, v_tile, member, row_max, row_sum, acc, scale_log2)

    acc = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    if SPLIT == 1:
        tl.store(out + head_index[:, None] * D + dims[None, :], acc.to(out.dtype.element_ty), mask=row_ok[:, None])
    else:
        safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        partial_rows = head_index * SPLIT + part
        tl.store(partial_out + partial_rows[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(partial_lse + partial_rows, (safe_max + tl.log2(row_sum)) * LN2, mask=row_ok)


def paged_append(k, v, index_k, slots, k_pool, v_pool, index_pool, scale_pool=None):
    """Write a step's keys and values ``[T, G, D]`` and index keys ``[T, Di]`` at the flat ``slots``
    (int64 ``[T]``) of one layer's pools (``k_pool``, ``v_pool``: ``[P * block_size, G * D]``; ``index_pool``:
    ``[P * block_size, Di]``) in one launch. With ``scale_pool`` (float32 ``[P * block_size]``) the index pool is
    FP8 and each key is rounded to it with its own scale (:func:`msa.fp8.quantize_rows`)."""
    rows = 16
    groups, head_dim = k.shape[1:]
    paged_append_kernel[(triton.cdiv(k.shape[0], rows),)](
        k, v, index_k, slots, k_pool, v_pool, index_pool, index_pool if scale_pool is None else scale_pool,
        k.shape[0], k.stride(0), v.stride(0), index_k.stride(0), GD=groups * head_dim, GDP=pow2(groups * head_dim),
        DI=index_k.shape[1], ROWS=rows, SCALED=scale_pool is not None, INVERSE_FP8_MAX=INVERSE_FP8_MAX)


def _scan_pages(pages: int, pages_per_product: int, n_tiles: int, max_pages: int, min_programs: int) -> int:
    """Pages per index-scan program: halved (down to one product) while the scan would run fewer than
    ``min_programs`` programs, as few requests over short contexts do (faster at 1-4 requests x 1K-32K tokens:
    see benchmarks/results/2026-11-24-h100-82-short-context-scan-programs)."""
    while pages > pages_per_product and n_tiles * triton.cdiv(max_pages, pages) < min_programs:
        pages //= 2
    return pages


def paged_scan_config(fp8: bool, n_tiles: int, max_pages: int, device: torch.device) -> PagedScanConfig:
    """The index scan's launch for bf16 / fp16 index keys, or FP8 ones, with fewer pages per program on a GPU
    where few programs would run (:func:`_scan_pages`: enough to cover the GPU twice). bf16: within a few percent
    of the fastest at every case of the sweep at 128K x 8 ... 1M x 2, one page per product faster than two at 200K
    x 32-128 (see benchmarks/results/2026-11-24-h100-75-scan-sweep); FP8: the fastest variant of
    benchmarks/results/2026-11-23-h100-35-scan-variants."""
    config = PagedScanConfig(32, 2, 8, 3) if fp8 else PagedScanConfig(16, 1, 4, 3)
    if device.type == "cuda":
        pages = _scan_pages(config.pages, config.pages_per_product, n_tiles, max_pages, 2 * sm_count(device.index))
        config = dataclasses.replace(config, pages=pages)
    return config


def paged_block_scores(index_q, index_k, page_table, tiles, scores, token_offset: int, tokens_per_tile: int,
                       index_scale=None, config: PagedScanConfig | None = None):
    """Index scan of ``tiles`` into ``scores`` ``[rows, max_pages]`` (float32, rows = tokens x groups): each page's
    max-pooled index logit, +inf for a row's local page, -inf after it (:func:`top_pages` ranks them).

    ``index_q`` ``[T, G, Di]``, ``index_k`` ``[P, block_size, Di]`` (one layer's pages; FP8 with
    their scales ``index_scale`` ``[P, block_size]``). ``config``: default :func:`paged_scan_config`.
    """
    n_groups, index_dim = index_q.shape[1:]
    block_size, max_pages = index_k.shape[1], page_table.shape[1]
    config = config or paged_scan_config(index_scale is not None, tiles.shape[0], max_pages, index_q.device)
    groups = max(pow2(n_groups), triton.cdiv(16, tokens_per_tile))  # tl.dot needs 16 rows
    paged_block_scores_kernel[(tiles.shape[0], triton.cdiv(max_pages, config.pages))](
        index_q, index_k, index_k if index_scale is None else index_scale, page_table, tiles, scores, token_offset,
        G=n_groups, GP=groups, DI=index_dim, BLOCK_SIZE=block_size, MAX_PAGES=max_pages, QT=tokens_per_tile,
        PAGES=config.pages, NB=config.pages_per_product, STAGES=config.num_stages, SCALED=index_scale is not None,
        INVERSE_FP8_MAX=INVERSE_FP8_MAX,
        UPCAST=INTERPRET, num_warps=config.num_warps)


def top_pages_candidates_numel(rows: int, n_pages: int, k: int) -> int:
    """float32 elements of :func:`top_pages`'s candidates scratch for selections of ``k`` pages."""
    return rows * 4 * narrowing_segments(n_pages, k - 1)


def top_pages_config(rows: int, n_pages: int, k: int, device: torch.device, scratch: bool,
                     narrow_rows_per_sm: int = TOP_PAGES_NARROW_ROWS_PER_SM) -> TopPagesConfig:
    """The Top-k launch for ``rows`` rows of ``n_pages`` scores and selections of ``k`` pages (the rounds pick up
    to ``k - 1``, the local page follows them): with a candidates ``scratch`` and at least
    ``narrow_rows_per_sm`` rows per SM, rows of many pages are first narrowed to their candidates and take one
    warp, as ``top_blocks`` does (faster from 1024 rows x 1600 pages on, slower at 256 rows: see
    benchmarks/results/2026-11-24-h100-86-top-pages-narrowed)."""
    many_rows = device.type != "cuda" or rows >= narrow_rows_per_sm * sm_count(device.index)
    segments = narrowing_segments(n_pages, k - 1) if scratch and many_rows else 0
    pages_pow2 = pow2(n_pages)
    return TopPagesConfig((1 if pages_pow2 <= 4096 else pages_pow2 // 2048) if segments else 4, segments)


def top_pages(scores, top_pages_out, candidates=None, config: TopPagesConfig | None = None):
    """Writes the selection of each row of ``scores`` ``[rows, N]`` (a row's local page scored +inf, as
    :func:`paged_block_scores` writes them) into int64 ``top_pages_out`` ``[rows, k]``: the ``min(local, k - 1)``
    best pages before the local one (descending, equal scores to the lower page), the local page, then -1 (the
    layout of :func:`msa.reference.rank_blocks`; scores after the local page are ignored). Faster than
    ``torch.topk`` (see benchmarks/results/2026-11-23-h100-35-scan-variants). ``candidates``: float32 scratch of
    :func:`top_pages_candidates_numel` elements, which a config that narrows needs. ``config``: default
    :func:`top_pages_config`."""
    rows, n_pages = scores.shape
    k = top_pages_out.shape[1]
    config = config or top_pages_config(rows, n_pages, k, scores.device, candidates is not None)
    if rows:
        top_pages_kernel[(rows,)](scores, top_pages_out, scores if candidates is None else candidates, N=n_pages,
                                  NP=pow2(n_pages), TOPK=k, SEGMENTS=config.segments,
                                  CANDIDATES=2 * config.segments, num_warps=config.num_warps)


def paged_block_lists_numel(n_tiles: int, n_groups: int, tokens_per_tile: int, topk: int, split: int = 1) -> int:
    """int32 elements of the scratch in which ``paged_sparse_attention``'s programs list their tile's blocks."""
    return n_tiles * n_groups * split * 3 * tokens_per_tile * pow2(topk)


def paged_attention_config(tokens_per_tile: int) -> PagedAttentionConfig:
    """num_warps of one-token and of wider tiles, and pipeline stages: the fastest of 4/8 warps x 2/3 stages in
    the sweep of benchmarks/results/2026-11-23-h100-48-decode-attention-sweep (8 warps on one-token tiles: faster
    at 128K x 8, slower at 512K x 4: see benchmarks/results/2026-11-23-h100-49-decode-8-token-tiles)."""
    return PagedAttentionConfig(num_warps=8 if tokens_per_tile > 1 else 4, num_stages=3)


def paged_sparse_attention(q, k, v, page_table, tiles, block_indices, block_lists, out, scale: float,
                           tokens_per_tile: int, split: int = 1, partial_out=None, partial_lse=None, lse=None, *,
                           config: PagedAttentionConfig | None = None):
    """Sparse attention of ``q`` ``[T, Hq, D]`` over the pages ``block_indices`` (int64 ``[T, G, topk]``) names.

    ``k``, ``v``: ``[P, block_size, G, D]`` (one layer's pages); ``block_lists``: int32 scratch of
    :func:`paged_block_lists_numel` elements. With ``split > 1`` (split-KV: the blocks of each tile and group
    divided among ``split`` programs) the work buffers ``partial_out`` (float32 ``[T * Hq, split, D]``),
    ``partial_lse`` (``[T * Hq, split]``) and ``lse`` (``[T * Hq]``) are used. Writes ``out`` ``[T, Hq, D]``;
    allocates nothing. ``tokens_per_tile``: 1 to 16. ``config``: default :func:`paged_attention_config`.
    """
    config = config or paged_attention_config(tokens_per_tile)
    n_heads, head_dim = q.shape[1:]
    block_size, n_groups = k.shape[1:3]
    topk = block_indices.shape[-1]
    partial_out = out if split == 1 else partial_out
    partial_lse = out if split == 1 else partial_lse
    paged_sparse_attention_kernel[(tiles.shape[0], n_groups, split)](
        q, k, v, page_table, tiles, block_indices, block_lists, out, partial_out, partial_lse, scale * LOG2E.value,
        HQ=n_heads, G=n_groups, R=n_heads // n_groups,
        RP=max(pow2(n_heads // n_groups), triton.cdiv(16, tokens_per_tile)), D=head_dim,
        BLOCK_SIZE=block_size, MAX_PAGES=page_table.shape[1], TOPK=topk, TOPKP=pow2(topk), QT=tokens_per_tile,
        SPLIT=split, UPCAST=INTERPRET, num_warps=config.num_warps, num_stages=config.num_stages)
    if split > 1:
        merge_partials(partial_out, partial_lse, out, lse, q.shape[0] * n_heads, split, config.merge_rows)
