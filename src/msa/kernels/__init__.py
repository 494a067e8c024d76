"""Triton kernels of MSA and their launchers (no autograd, no validation: see :mod:`msa.ops`).

The training / prefill launchers take packed ``[T, H, D]`` contiguous tensors
with int32 ``cu_seqlens`` and/or the per-token sequence offsets
``token_starts`` (int32 ``[T]``, for the query-outer kernels), allocate their
outputs and launch. The paged launchers (``paged_*``, used by
:mod:`msa.inference`) write into buffers they are given and allocate nothing.
Under ``TRITON_INTERPRET=1`` the kernels compute their matrix products in
float32 (the interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import triton

from msa.kernels.block_csr import build_block_csr
from msa.kernels.index_kl import index_kl_bwd_dk_kernel, index_kl_bwd_dq_kernel, index_kl_fwd_partial_kernel
from msa.kernels.indexer import block_scores_kernel, support_lse_kernel, top_blocks_kernel
from msa.fp8 import INVERSE_FP8_MAX
from msa.kernels.paged import (
    paged_append_kernel,
    paged_block_scores_kernel,
    paged_sparse_attention_kernel,
    top_pages_kernel,
)
from msa.kernels.sparse_attention import (
    LOG2E,
    merge_partials_kernel,
    sparse_attention_bwd_dkv_kernel,
    sparse_attention_bwd_dq_kernel,
    sparse_attention_fwd_kernel,
    sparse_attention_fwd_partial_kernel,
)
from msa.varlen import token_sequences

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Workspace of the KV-outer forward's partial outputs; longer inputs run in query chunks.
WORKSPACE_BYTES = 4 << 30
# From this many tokens on, the forward runs KV-outer: faster from 1K tokens on (results/*33-short-lengths).
KV_OUTER_MIN_TOKENS = 1024
# (token, head) rows per tile, warps and pipeline stages of the KV-outer kernels (attention forward,
# attention backward, KL forward, KL backward, fused KL); parts each KV-outer list is split into
# (non-deterministic passes); (head, slot) partial rows per merge program. Chosen from the
# tuning sweeps at S=32K and 128K on an H100 recorded in benchmarks/results.
KV_OUTER_FWD = (64, 4, 3)  # (rows, num_warps, num_stages)
KV_OUTER_BWD = (32, 8, 2)
KL_FWD = (64, 8, 2)  # the KL configs: sweep at 128K of results/*26-kl-fused-tuning
KL_BWD = KL_FUSED = (32, 8, 2)  # KL_FUSED: the gradient kernel when it also writes the loss terms
KL_TOKENS = 16  # tokens per step of the KL kernels: the student's products need 16 rows
KV_OUTER_SPLIT = 8
# The forward splits a chunk's lists in fewer parts when they are short: a part loads its K/V block (64 KB at
# D=128, block 128) for at least this many entries on average (a 16K-token chunk puts ~250 entries in each list
# at 128K tokens, ~32 in each of up to 8192 lists at 1M). The sweep of results/*54-kv-outer-parts-sweep: 64 entries
# (vs 16) take the 1M forward from 495 to 448 ms, 512K from 238 to 215 ms, outputs bitwise equal.
KV_OUTER_PART_ENTRIES = 64
MERGE_ROWS = 16
# The forward partials run the Gluon kernel of sparse_attention_hopper on sm_90 (16-bit inputs, head dim and
# block size 64 or 128; partials 1.17x faster at 128K, outputs bitwise equal: results/*93); False: the Triton kernel.
HOPPER_FWD = True
_GLUON_FAILED: set = set()  # Gluon kernels this Triton could not compile (warned once)
# The forward sorts the lists of several query chunks at once, up to this many (chunk, group, block) lists.
CSR_MAX_LISTS = 1 << 24
# block_scores_kernel: (rows = queries x groups per program, num_warps, num_stages, keys per tile), for bf16/fp16
# index vectors and for FP8 ones: the fastest of the sweep at 128K, 512K and 1M on an H100
# (results/*43-indexer-schedules; 1.13-1.37x faster than the one-pass running Top-k it replaced).
INDEXER_CONFIG = (256, 8, 3, 128)
INDEXER_CONFIG_FP8 = (128, 8, 3, 256)
INDEXER_MAX_LOGITS = 256 * 128
# top_blocks_kernel narrows rows of at least this many blocks (rounded up to a power of two) to their candidates;
# top_pages from this many rows per SM on (fewer rows: one row per 4-warp program has the lower latency)
TOP_BLOCKS_NARROW_FROM = 128
TOP_PAGES_NARROW_ROWS_PER_SM = 4


def _narrowing_segments(n: int, k: int) -> int:
    """Segments of ``write_top_narrowed``'s bound for a Top-``k`` of rows of ``n`` elements (at most a quarter of
    them), or 0 where the rounds run over whole rows."""
    segments = 2 * _pow2(k)
    return segments if k > 0 and _pow2(n) >= max(TOP_BLOCKS_NARROW_FROM, 4 * segments) else 0


def _launch(kernel, grid, *args, **kwargs):
    """Launch; a configuration that runs out of shared memory on this GPU retries with one stage."""
    try:
        kernel[grid](*args, **kwargs)
    except triton.runtime.errors.OutOfResources:
        if kwargs.get("num_stages") == 1:
            raise
        kernel[grid](*args, **dict(kwargs, num_stages=1))


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


@functools.cache
def sm_count(device_index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device (``None``: the current one)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _heads(q: torch.Tensor, k: torch.Tensor) -> dict:
    n_heads, n_groups = q.shape[1], k.shape[1]
    return dict(HQ=n_heads, G=n_groups, R=n_heads // n_groups, D=q.shape[2])


def _query_outer_heads(q: torch.Tensor, k: torch.Tensor) -> dict:
    """Head constants of a query-outer kernel: one token's R head rows, padded to RP >= 16 rows."""
    heads = _heads(q, k)
    return dict(heads, RP=_pow2(heads["R"], 16))


def select_blocks(index_q, index_k, cu_seqlens, max_seqlen: int, block_size: int, topk: int,
                  config: tuple[int, int, int, int] | None = None, index_k_scale=None):
    """``index_q`` ``[T, G, Di]``, ``index_k`` ``[T, 1, Di]`` -> int32 ``[T, G, topk]``.

    FP8 rows (:mod:`msa.fp8`) come with the keys' float32 scales
    ``index_k_scale`` ``[T]``. Two phases per chunk of query positions: the
    chunk's block scores into a workspace of at most ``WORKSPACE_BYTES``, then
    each row's Top-k. ``config``: (rows per program = queries x groups,
    num_warps, num_stages, keys per tile) of the scoring kernel; default
    ``INDEXER_CONFIG`` (``INDEXER_CONFIG_FP8`` for FP8 rows).
    """
    total, n_groups, index_dim = index_q.shape
    n_seqs = cu_seqlens.numel() - 1
    fp8 = index_k_scale is not None
    rows, num_warps, num_stages, keys_per_tile = config or (INDEXER_CONFIG_FP8 if fp8 else INDEXER_CONFIG)
    block_indices = torch.empty(total, n_groups, topk, dtype=torch.int32, device=index_q.device)
    max_seqlen = max(max_seqlen, 1)
    groups_pow2 = _pow2(n_groups)
    keys_per_tile = max(block_size, keys_per_tile)
    # at most the 256 x 128 logits of the measured configs per program (registers; shared memory of the max-pool)
    block_m = max(1, min(rows, INDEXER_MAX_LOGITS // keys_per_tile) // groups_pow2)
    scoring = dict(G=n_groups, GP=groups_pow2, DI=index_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
                   BLOCK_N=keys_per_tile, SCALED=fp8, UPCAST=INTERPRET,
                   num_warps=num_warps, num_stages=num_stages)
    scales = index_k_scale if fp8 else index_k
    most_blocks = max(1, (max_seqlen - 1) // block_size)
    per_tile = n_seqs * block_m * n_groups * most_blocks * 4  # workspace bytes per program row of queries
    chunk = min(triton.cdiv(max_seqlen, block_m), max(1, WORKSPACE_BYTES // per_tile)) * block_m
    workspace = torch.empty(n_seqs * chunk * n_groups * most_blocks, dtype=torch.float32, device=index_q.device)
    for first in range(0, max_seqlen, chunk):
        n_positions = min(chunk, max_seqlen - first)
        n_blocks = max(1, (first + n_positions - 1) // block_size)  # blocks before the chunk's last local one
        _launch(block_scores_kernel, (triton.cdiv(n_positions, block_m), n_seqs),
                index_q, index_k, scales, cu_seqlens, workspace, first, n_positions, n_blocks, **scoring)
        top_blocks(workspace, cu_seqlens, block_indices, first, n_positions, n_blocks, block_size)
    return block_indices


def top_blocks(scores, cu_seqlens, block_indices, first_position: int, n_positions: int, n_blocks: int,
               block_size: int, rows: int | None = None, num_warps: int | None = None):
    """Phase 2 of ``select_blocks``: the Top-k of each row of a chunk's block ``scores`` (float32
    ``[n, C, G, n_blocks]``, C = ``n_positions``) into ``block_indices`` ``[T, G, topk]``. ``rows`` per
    program and ``num_warps`` override the launch shape (``benchmarks/top_blocks_sweep.py``)."""
    n_seqs, n_groups, topk = cu_seqlens.numel() - 1, block_indices.shape[1], block_indices.shape[2]
    blocks_pow2 = _pow2(n_blocks)
    # rows of many blocks are first narrowed to the candidates at or above a bound (see the kernel); that
    # schedule is fastest with one warp per program up to 4096 scores, 64 scores per thread beyond
    # (top_blocks_sweep.py at 128K / 512K / 1M tokens: results 59, 61)
    segments = _narrowing_segments(n_blocks, topk - 1)
    narrow = segments > 0
    if narrow:
        rows = rows or _pow2(2048 // blocks_pow2)
        num_warps = num_warps or (1 if rows * blocks_pow2 <= 4096 else rows * blocks_pow2 // 2048)
    else:
        segments = 0
        rows = rows or _pow2(min(64, 4096 // blocks_pow2))
        num_warps = num_warps or (8 if rows * blocks_pow2 > 4096 else 4)
    n_candidates = 2 * segments
    candidates = torch.empty(n_seqs * n_positions * n_groups if narrow else 1, 2 * n_candidates,
                             dtype=torch.float32, device=scores.device)
    top_blocks_kernel[(triton.cdiv(n_positions * n_groups, rows), n_seqs)](
        scores, cu_seqlens, block_indices, candidates, first_position, n_positions, n_blocks, G=n_groups,
        BLOCK_SIZE=block_size, TOPK=topk, NP=blocks_pow2, ROWS=rows, SEGMENTS=segments, CANDIDATES=n_candidates,
        num_warps=num_warps)


def support_lse(index_q, index_k, block_indices, token_starts, block_size: int, scale: float):
    """Float32 ``[T, G]`` logsumexp of the index logits over each row's selected support."""
    total, n_groups, index_dim = index_q.shape
    lse = torch.empty(total, n_groups, dtype=torch.float32, device=index_q.device)
    if total:
        support_lse_kernel[(total, n_groups)](
            index_q, index_k, token_starts, block_indices, lse, scale,
            G=n_groups, DI=index_dim, BLOCK_SIZE=block_size, TOPK=block_indices.shape[-1])
    return lse


def _csr(block_indices, cu_seqlens, max_seqlen: int, block_size: int, start: int = 0, end: int | None = None,
         chunk_tokens: int | None = None):
    """The selection of tokens ``start .. end - 1`` inverted into per-(group, block) lists, per chunk of
    ``chunk_tokens`` tokens if given."""
    sequences = token_sequences(cu_seqlens, block_indices.shape[0])[start:end]
    return build_block_csr(block_indices[start:end], sequences, cu_seqlens.numel() - 1,
                           max(1, triton.cdiv(max_seqlen, block_size)), token_offset=start, chunk_tokens=chunk_tokens)


def _list_parts(tokens: int, topk: int, n_lists: int) -> int:
    """Parts (a power of two, at most ``KV_OUTER_SPLIT``) that the forward splits the lists of a chunk of
    ``tokens`` queries into, when they select among ``n_lists`` (sequence, block) lists per group."""
    per_part = tokens * topk // max(1, n_lists) // KV_OUTER_PART_ENTRIES
    return min(KV_OUTER_SPLIT, 1 << max(0, per_part.bit_length() - 1))


def _kl_launch(q, k, config: tuple[int, int, int]) -> dict:
    """Head constants, tokens per step, heads per teacher chunk and launch options of a KL kernel."""
    rows, num_warps, num_stages = config
    heads = _heads(q, k)  # no more heads per chunk than the group has
    return dict(heads, QT=KL_TOKENS, HC=max(1, min(rows // KL_TOKENS, _pow2(heads["R"]))), num_warps=num_warps,
                num_stages=num_stages)


def _kv_outer_launch(q, k, config: tuple[int, int, int]) -> dict:
    """Head constants, tokens per tile and launch options of a KV-outer kernel."""
    rows, num_warps, num_stages = config
    heads = _heads(q, k)  # a tile packs the R head rows of QT tokens, unpadded
    rows = _pow2(max(rows, heads["R"]))
    return dict(heads, ROWS=rows, QT=rows // heads["R"], num_warps=num_warps, num_stages=num_stages)


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
        _launch(kernel, grid, *args, **kwargs)
    except triton.compiler.errors.CompilationError as error:
        _GLUON_FAILED.add(kernel)
        warnings.warn(f"msa: the Gluon forward partials do not compile with Triton {triton.__version__} "
                      f"({str(error).splitlines()[-1]}); using the Triton kernel")
        return False
    return True


def _hopper_partials(q: torch.Tensor, k: torch.Tensor, block_size: int):
    """The Gluon kernel if it takes this forward's shapes (a group's heads fit its 64-row tile), else None."""
    if not (HOPPER_FWD and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in (64, 128)
            and block_size in (64, 128) and q.shape[1] // k.shape[1] <= 64):
        return None
    kernel = _gluon_hopper_kernel(q.device)
    return None if kernel in _GLUON_FAILED else kernel


def _kv_outer_partials(q, k, v, block_indices, cu_seqlens, max_seqlen: int, block_size: int, scale: float,
                       out=None, lse=None):
    """KV-outer forward in query chunks whose partials fit ``WORKSPACE_BYTES``.

    With ``out`` (``[T, Hq, D]``) the merged output and ``lse`` are written;
    without, only ``lse`` (the LSE pass that the KL loss's teacher needs).
    """
    total, n_heads, head_dim = q.shape
    topk = block_indices.shape[-1]
    per_token = n_heads * topk * (4 + (head_dim * q.element_size() if out is not None else 0))
    chunk = max(1, min(total, WORKSPACE_BYTES // per_token))
    partial_lse = torch.empty(chunk, n_heads, topk, dtype=torch.float32, device=q.device)
    partial_out = torch.empty(chunk, n_heads, topk, head_dim, dtype=q.dtype, device=q.device) if out is not None \
        else partial_lse
    hopper = _hopper_partials(q, k, block_size) if out is not None else None
    # the Gluon kernel's tile: one warpgroup's 64-row wgmma
    launch = _kv_outer_launch(q, k, KV_OUTER_FWD if hopper is None else (64, 4, 1))
    n_seqs = cu_seqlens.numel() - 1
    max_blocks = max(1, triton.cdiv(max_seqlen, block_size))
    # one sort builds the lists of as many chunks as CSR_MAX_LISTS allows (results/*66: 3.2 -> 1.1 ms at 128K)
    build = chunk * max(1, CSR_MAX_LISTS // (k.shape[1] * n_seqs * max_blocks))
    for build_start in range(0, total, build):
        build_end = min(total, build_start + build)
        csr = _csr(block_indices, cu_seqlens, max_seqlen, block_size, build_start, build_end, chunk_tokens=chunk)
        for index, start in enumerate(range(build_start, build_end, chunk)):
            end = min(total, start + chunk)
            # a query's position is at most its packed index: the chunk reaches blocks before cdiv(end, block_size)
            split = _list_parts(end - start, topk, n_seqs * min(max_blocks, triton.cdiv(end, block_size)))
            partial_lse.fill_(float("-inf"))
            grid = (csr.n_block_slots, k.shape[1], split)
            args = (q, k, v, cu_seqlens, csr.chunk_offsets(index), csr.entries, partial_out, partial_lse,
                    scale * LOG2E.value, csr.n_block_slots, start)
            constants = dict(BLOCK_SIZE=block_size, MAX_BLOCKS=max_blocks, TOPK=topk, SPLIT=split)
            if hopper is not None and not _launch_hopper(hopper, grid, *args, **launch, **constants):
                hopper, launch = None, _kv_outer_launch(q, k, KV_OUTER_FWD)
            if hopper is None:
                _launch(sparse_attention_fwd_partial_kernel, grid, *args, **launch, **constants,
                        WRITE_OUT=out is not None, UPCAST=INTERPRET)
            rows = (end - start) * n_heads
            if out is None:
                lse[start:end] = torch.logsumexp(partial_lse[: end - start], dim=-1)
                continue
            merge_partials_kernel[(triton.cdiv(rows, MERGE_ROWS),)](
                partial_out, partial_lse, out[start:end], lse[start:end], rows, TOPK=topk, KP=_pow2(topk),
                D=head_dim, HEADS=MERGE_ROWS, num_warps=4)


def sparse_attention_fwd(q, k, v, block_indices, token_starts, cu_seqlens, max_seqlen: int, block_size: int,
                         scale: float, schedule: str = "auto"):
    """Returns ``out`` ``[T, Hq, D]`` (dtype of q) and float32 ``lse`` ``[T, Hq]``.

    ``schedule``: ``"query"`` (query-outer), ``"kv"`` (KV-outer with merged
    partials) or ``"auto"`` (KV-outer from ``KV_OUTER_MIN_TOKENS`` tokens on).
    """
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    if not q.shape[0]:
        return out, lse
    if schedule == "kv" or (schedule == "auto" and q.shape[0] >= KV_OUTER_MIN_TOKENS):
        _kv_outer_partials(q, k, v, block_indices, cu_seqlens, max_seqlen, block_size, scale, out, lse)
    else:
        sparse_attention_fwd_kernel[(q.shape[0], k.shape[1])](
            q, k, v, block_indices, token_starts, out, lse, scale * LOG2E.value,
            **_query_outer_heads(q, k), BLOCK_SIZE=block_size, TOPK=block_indices.shape[-1], UPCAST=INTERPRET,
            num_warps=4)
    return out, lse


def _row_dots(out, dout, chunk: int = 1 << 14):
    """float32 ``[T, Hq]`` = sum over D of out * dout, upcast a chunk of tokens at a time."""
    delta = torch.empty(out.shape[:2], dtype=torch.float32, device=out.device)
    for start in range(0, out.shape[0], chunk):
        end = start + chunk
        delta[start:end] = torch.einsum("thd,thd->th", out[start:end].float(), dout[start:end].float())
    return delta


def sparse_attention_bwd(q, k, v, out, lse, dout, block_indices, token_starts, cu_seqlens, max_seqlen: int,
                         block_size: int, scale: float, deterministic: bool = False):
    """Returns ``dq, dk, dv`` (dtypes of q, k, v).

    KV-outer kernel: dk/dv, and dq through float32 atomics, over lists split
    in ``KV_OUTER_SPLIT`` parts. With ``deterministic``: one writer per key
    block for dk/dv and the query-outer kernel for dq.
    """
    if not q.shape[0]:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = _row_dots(out, dout)
    topk = block_indices.shape[-1]
    if deterministic:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        sparse_attention_bwd_dq_kernel[(q.shape[0], k.shape[1])](
            q, k, v, block_indices, token_starts, dout, lse, delta, dq, scale * LOG2E.value, scale,
            **_query_outer_heads(q, k), BLOCK_SIZE=block_size, TOPK=topk, UPCAST=INTERPRET, num_warps=4)
    else:
        dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v))
    split = 1 if deterministic else KV_OUTER_SPLIT
    csr = _csr(block_indices, cu_seqlens, max_seqlen, block_size)
    _launch(sparse_attention_bwd_dkv_kernel, (csr.n_block_slots, k.shape[1], split),
        q, k, v, dout, lse, delta, cu_seqlens, csr.offsets, csr.entries, dk, dv, dq, scale * LOG2E.value, scale,
        csr.n_block_slots, **_kv_outer_launch(q, k, KV_OUTER_BWD), BLOCK_SIZE=block_size, MAX_BLOCKS=csr.max_blocks,
        TOPK=topk, SPLIT=split, ATOMIC=not deterministic, UPCAST=INTERPRET)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _teacher_lse(q, k, block_indices, cu_seqlens, max_seqlen: int, block_size: int, scale: float):
    """Float32 ``[T, Hq]``: the Main Branch LSE over the selected support (a KV-outer LSE-only pass)."""
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    if q.shape[0]:
        _kv_outer_partials(q, k, k, block_indices, cu_seqlens, max_seqlen, block_size, scale, lse=lse)
    return lse


def _kl_stats(index_q, topk: int):
    """Per (token, group, slot) terms of the KL kernels: sum p log p, sum p z, sum p, student block LSE."""
    stats = torch.zeros(4, *index_q.shape[:2], topk, dtype=torch.float32, device=index_q.device)
    stats[3] = float("-inf")
    return stats


def _kl_rows(stats, index_lse):
    """Float32 ``[T, G]`` KL of each row from the per-slot terms."""
    p_log_p, p_z, p_sum = (x.sum(-1) for x in stats[:3])
    return torch.where(p_sum > 0, p_log_p - p_z + index_lse * p_sum, 0.0)


def _kl_fwd_launch(q, k, index_q, index_k, cu_seqlens, csr, teacher_lse, stats, scale: float, index_scale: float,
                   block_size: int, teacher: bool):
    """The KV-outer KL forward kernel; without ``teacher`` it writes only the student's block LSEs."""
    _launch(index_kl_fwd_partial_kernel, (csr.n_block_slots, index_q.shape[1], KV_OUTER_SPLIT),
        q, k, index_q, index_k, cu_seqlens, csr.offsets, csr.entries, teacher_lse, stats, scale * LOG2E.value,
        index_scale, csr.n_block_slots, stats[0].numel(), **_kl_launch(q, k, KL_FWD),
        DI=index_q.shape[2], BLOCK_SIZE=block_size, MAX_BLOCKS=csr.max_blocks, TOPK=stats.shape[-1],
        SPLIT=KV_OUTER_SPLIT, TEACHER=teacher, UPCAST=INTERPRET)


def _kl_bwd_launch(q, k, index_q, index_k, cu_seqlens, csr, teacher_lse, index_lse, grad_scale, d_index_k, d_index_q,
                   scale: float, index_scale: float, block_size: int, topk: int, deterministic: bool, stats=None):
    """The KV-outer gradient kernel; with ``stats`` it also writes the KL terms (the fused pass)."""
    split = 1 if deterministic else KV_OUTER_SPLIT
    fused = stats is not None
    _launch(index_kl_bwd_dk_kernel, (csr.n_block_slots, index_q.shape[1], split),
        q, k, index_q, index_k, cu_seqlens, csr.offsets, csr.entries, teacher_lse, index_lse, grad_scale, d_index_k,
        d_index_q, stats if fused else index_lse, scale * LOG2E.value, index_scale, csr.n_block_slots, q.shape[0],
        stats[0].numel() if fused else 0, **_kl_launch(q, k, KL_FUSED if fused else KL_BWD), DI=index_q.shape[2],
        BLOCK_SIZE=block_size, MAX_BLOCKS=csr.max_blocks, TOPK=topk, SPLIT=split, ATOMIC=not deterministic,
        STATS=fused, UPCAST=INTERPRET)


def index_kl_fwd(q, k, index_q, index_k, block_indices, cu_seqlens, max_seqlen: int, block_size: int, scale: float,
                 index_scale: float, teacher_lse=None):
    """Returns float32 ``kl_rows`` ``[T, G]``, ``index_lse`` ``[T, G]`` and ``teacher_lse`` ``[T, Hq]``.

    ``teacher_lse`` (the Main Branch LSE over the same support) is computed
    by a KV-outer LSE pass when not given.
    """
    if teacher_lse is None:
        teacher_lse = _teacher_lse(q, k, block_indices, cu_seqlens, max_seqlen, block_size, scale)
    stats = _kl_stats(index_q, block_indices.shape[-1])
    if q.shape[0]:
        csr = _csr(block_indices, cu_seqlens, max_seqlen, block_size)
        _kl_fwd_launch(q, k, index_q, index_k, cu_seqlens, csr, teacher_lse, stats, scale, index_scale, block_size,
                       teacher=True)
    index_lse = torch.logsumexp(stats[3], dim=-1)
    return _kl_rows(stats, index_lse), index_lse, teacher_lse


def index_kl_fwd_bwd(q, k, index_q, index_k, block_indices, cu_seqlens, max_seqlen: int, block_size: int,
                     scale: float, index_scale: float, teacher_lse=None):
    """``kl_rows`` as :func:`index_kl_fwd` and the float32 gradients of ``sum(kl_rows)`` as
    :func:`index_kl_bwd` (unit ``grad_scale``), evaluating the teacher once (float32 atomics:
    not deterministic)."""
    total, _, index_dim = index_q.shape
    if teacher_lse is None:
        teacher_lse = _teacher_lse(q, k, block_indices, cu_seqlens, max_seqlen, block_size, scale)
    stats = _kl_stats(index_q, block_indices.shape[-1])
    d_index_q = torch.zeros(index_q.shape, dtype=torch.float32, device=q.device)
    d_index_k = torch.zeros(total, 1, index_dim, dtype=torch.float32, device=q.device)
    if not total:
        return _kl_rows(stats, torch.logsumexp(stats[3], dim=-1)), d_index_q, d_index_k
    csr = _csr(block_indices, cu_seqlens, max_seqlen, block_size)
    _kl_fwd_launch(q, k, index_q, index_k, cu_seqlens, csr, teacher_lse, stats, scale, index_scale, block_size,
                   teacher=False)
    index_lse = torch.logsumexp(stats[3], dim=-1)
    grad_scale = torch.ones(1, dtype=torch.float32, device=q.device)
    _kl_bwd_launch(q, k, index_q, index_k, cu_seqlens, csr, teacher_lse, index_lse, grad_scale, d_index_k, d_index_q,
                   scale, index_scale, block_size, stats.shape[-1], deterministic=False, stats=stats)
    return _kl_rows(stats, index_lse), d_index_q, d_index_k


def index_kl_bwd(q, k, index_q, index_k, block_indices, token_starts, cu_seqlens, max_seqlen: int,
                 teacher_lse, index_lse, grad_scale, block_size: int, scale: float, index_scale: float,
                 deterministic: bool = False):
    """Float32 gradients ``d index_q`` ``[T, G, Di]`` and ``d index_k`` ``[T, 1, Di]`` of
    ``grad_scale * sum(kl_rows)`` (``grad_scale`` a float32 ``[1]`` tensor)."""
    total, n_groups, index_dim = index_q.shape
    d_index_q = torch.zeros(total, n_groups, index_dim, dtype=torch.float32, device=q.device)
    # per-group contributions summed afterwards (deterministic), or one buffer accumulated with atomics
    d_index_k = torch.empty(n_groups, total, index_dim, dtype=torch.float32, device=q.device) if deterministic \
        else torch.zeros(1, total, index_dim, dtype=torch.float32, device=q.device)
    if not total:
        return d_index_q, d_index_k.sum(0).unsqueeze(1)
    topk = block_indices.shape[-1]
    if deterministic:
        index_kl_bwd_dq_kernel[(total, n_groups)](
            q, k, index_q, index_k, block_indices, token_starts, teacher_lse, index_lse, grad_scale, d_index_q,
            scale * LOG2E.value, index_scale, **_query_outer_heads(q, k), DI=index_dim, BLOCK_SIZE=block_size,
            TOPK=topk, UPCAST=INTERPRET, num_warps=4)
    csr = _csr(block_indices, cu_seqlens, max_seqlen, block_size)
    _kl_bwd_launch(q, k, index_q, index_k, cu_seqlens, csr, teacher_lse, index_lse, grad_scale, d_index_k, d_index_q,
                   scale, index_scale, block_size, topk, deterministic)
    return d_index_q, d_index_k.sum(0).unsqueeze(1)


# --------------------------------------------------------------------------- paged inference kernels

# Index scan, bf16 / FP8 keys: (pages per program, pages per matrix product, num_warps, pipeline stages);
# tokens per tile (one read of a request's index keys serves this many of its new tokens). bf16: within 2.4% of
# the fastest at every case of the sweep at 128K x 8 ... 1M x 2 (results/*75-scan-sweep; one page per product
# instead of two: 6% faster at 200K x 32-128); FP8: the fastest variant of results/*35-scan-variants.
PAGED_SCAN = (16, 1, 4, 3)
PAGED_SCAN_FP8 = (32, 2, 8, 3)
PAGED_SCAN_TOKENS = 16
# Attention tiles: 1 token (each token reads its own blocks: no wasted rows; the fastest on small batches and
# on independent selections, results 13-15, 19-20, 50) or PAGED_ATTENTION_TOKENS tokens of a decode step (a
# request's tokens load each block of their union once: on selections that overlap as much as a trained
# model's, attention 1.2-1.3x faster at 200K x 32-128 once the batch fills the GPU, results 48, 50).
# num_warps of one-token and of wider tiles, and pipeline stages: the fastest of 4/8 warps x 2/3 stages in the
# sweep of results 48 (8 warps on one-token tiles: 7% faster at 128K x 8, 1.5x slower at 512K x 4, results 49).
PAGED_ATTENTION_TOKENS = 8
PAGED_ATTENTION_WARPS = (4, 8)
PAGED_ATTENTION_STAGES = 3
PAGED_MAX_SPLIT = 8  # at most this many programs per tile and group split the attention of small batches


def paged_append(k, v, index_k, slots, k_pool, v_pool, index_pool, scale_pool=None):
    """Write a step's keys and values ``[T, G, D]`` and index keys ``[T, Di]`` at the flat ``slots``
    (int64 ``[T]``) of one layer's pools (``k_pool``, ``v_pool``: ``[P * block_size, G * D]``; ``index_pool``:
    ``[P * block_size, Di]``) in one launch. With ``scale_pool`` (float32 ``[P * block_size]``) the index pool is
    FP8 and each key is rounded to it with its own scale (:func:`msa.fp8.quantize_rows`)."""
    rows = 16
    groups, head_dim = k.shape[1:]
    paged_append_kernel[(triton.cdiv(k.shape[0], rows),)](
        k, v, index_k, slots, k_pool, v_pool, index_pool, index_pool if scale_pool is None else scale_pool,
        k.shape[0], k.stride(0), v.stride(0), index_k.stride(0), GD=groups * head_dim, GDP=_pow2(groups * head_dim),
        DI=index_k.shape[1], ROWS=rows, SCALED=scale_pool is not None, INVERSE_FP8_MAX=INVERSE_FP8_MAX)


def _scan_pages(pages: int, pages_per_product: int, n_tiles: int, max_pages: int, min_programs: int) -> int:
    """Pages per index-scan program: halved (down to one product) while the scan would run fewer than
    ``min_programs`` programs, as few requests over short contexts do (results/*82: 19-32 -> 4-17 us at
    1-4 requests x 1K-32K tokens)."""
    while pages > pages_per_product and n_tiles * triton.cdiv(max_pages, pages) < min_programs:
        pages //= 2
    return pages


def paged_block_scores(index_q, index_k, page_table, tiles, scores, token_offset: int, tokens_per_tile: int,
                       index_scale=None, config: tuple[int, int, int, int] | None = None):
    """Index scan of ``tiles`` into ``scores`` ``[rows, max_pages]`` (float32, rows = tokens x groups).

    ``index_q`` ``[T, G, Di]``, ``index_k`` ``[P, block_size, Di]`` (one layer's pages; FP8 with
    their scales ``index_scale`` ``[P, block_size]``). ``config``: (pages per program, pages per
    product, num_warps, num_stages); default ``PAGED_SCAN`` (``PAGED_SCAN_FP8`` for FP8 keys), with
    fewer pages per program where few programs would run (:func:`_scan_pages`).
    """
    n_groups, index_dim = index_q.shape[1:]
    block_size, max_pages = index_k.shape[1], page_table.shape[1]
    pages, pages_per_product, num_warps, num_stages = config or (PAGED_SCAN if index_scale is None else PAGED_SCAN_FP8)
    if config is None and index_q.is_cuda:  # enough programs to cover the GPU twice
        pages = _scan_pages(pages, pages_per_product, tiles.shape[0], max_pages, 2 * sm_count(index_q.device.index))
    groups = max(_pow2(n_groups), triton.cdiv(16, tokens_per_tile))  # tl.dot needs 16 rows
    paged_block_scores_kernel[(tiles.shape[0], triton.cdiv(max_pages, pages))](
        index_q, index_k, index_k if index_scale is None else index_scale, page_table, tiles, scores, token_offset,
        G=n_groups, GP=groups, DI=index_dim, BLOCK_SIZE=block_size, MAX_PAGES=max_pages, QT=tokens_per_tile,
        PAGES=pages, NB=pages_per_product, STAGES=num_stages, SCALED=index_scale is not None,
        INVERSE_FP8_MAX=INVERSE_FP8_MAX,
        UPCAST=INTERPRET, num_warps=num_warps)


def top_pages_candidates_numel(rows: int, n_pages: int, k: int) -> int:
    """float32 elements of :func:`top_pages`'s candidates scratch."""
    return rows * 4 * _narrowing_segments(n_pages, k)


def top_pages(scores, top_pages_out, candidates=None):
    """Writes the ``k`` best pages of each row of ``scores`` ``[rows, N]`` into int64 ``top_pages_out``
    ``[rows, k]`` (-1 for pages scored -inf), 3-5x faster than ``torch.topk`` (results/*35). With ``candidates``
    (float32 scratch of :func:`top_pages_candidates_numel` elements) and enough rows to fill the GPU several
    times, rows of many pages are first narrowed to their candidates and take one warp, as ``top_blocks`` does:
    1.7-1.8x faster from 1024 rows x 1600 pages on, 1.2x slower at 256 rows (results/*86)."""
    rows, n_pages = scores.shape
    k, pages_pow2 = top_pages_out.shape[1], _pow2(n_pages)
    many_rows = not scores.is_cuda or rows >= TOP_PAGES_NARROW_ROWS_PER_SM * sm_count(scores.device.index)
    segments = _narrowing_segments(n_pages, k) if candidates is not None and many_rows else 0
    num_warps = (1 if pages_pow2 <= 4096 else pages_pow2 // 2048) if segments else 4
    if rows:
        top_pages_kernel[(rows,)](scores, top_pages_out, scores if candidates is None else candidates, N=n_pages,
                                  NP=pages_pow2, TOPK=k, SEGMENTS=segments, CANDIDATES=2 * segments,
                                  num_warps=num_warps)


def paged_block_lists_numel(n_tiles: int, n_groups: int, tokens_per_tile: int, topk: int, split: int = 1) -> int:
    """int32 elements of the scratch in which ``paged_sparse_attention``'s programs list their tile's blocks."""
    return n_tiles * n_groups * split * 3 * tokens_per_tile * _pow2(topk)


def paged_sparse_attention(q, k, v, page_table, tiles, block_indices, block_lists, out, scale: float,
                           tokens_per_tile: int, split: int = 1, partial_out=None, partial_lse=None, lse=None, *,
                           num_warps: int | None = None, num_stages: int = PAGED_ATTENTION_STAGES):
    """Sparse attention of ``q`` ``[T, Hq, D]`` over the pages ``block_indices`` (int64 ``[T, G, topk]``) names.

    ``k``, ``v``: ``[P, block_size, G, D]`` (one layer's pages); ``block_lists``: int32 scratch of
    :func:`paged_block_lists_numel` elements. With ``split > 1`` the work buffers ``partial_out``
    (float32 ``[T * Hq, split, D]``), ``partial_lse`` (``[T * Hq, split]``) and ``lse`` (``[T * Hq]``)
    are used. Writes ``out`` ``[T, Hq, D]``; allocates nothing. ``tokens_per_tile``: 1 to 16.
    ``num_warps``: default ``PAGED_ATTENTION_WARPS`` by tile width.
    """
    n_heads, head_dim = q.shape[1:]
    block_size, n_groups = k.shape[1:3]
    topk = block_indices.shape[-1]
    partial_out = out if split == 1 else partial_out
    partial_lse = out if split == 1 else partial_lse
    paged_sparse_attention_kernel[(tiles.shape[0], n_groups, split)](
        q, k, v, page_table, tiles, block_indices, block_lists, out, partial_out, partial_lse, scale * LOG2E.value,
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
