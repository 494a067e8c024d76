"""Experiment: the KV-outer forward partial kernel at 128K: launch configs x register prefetch x diagnostics.

    PYTHONPATH=src:benchmarks python .scratch/kvfwd_exp.py --out DIR [--ncu]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, "benchmarks")
from kernels import packed_attention_inputs, time_ms  # noqa: E402
from flops import PAPER_LAYER  # noqa: E402
from msa import kernels  # noqa: E402
from msa.kernels.sparse_attention import LN2, _entry_range, _entry_rows, _kv_block, merge_partials_kernel  # noqa
from msa.kernels import _csr, _list_parts, _kv_outer_launch, LOG2E, _pow2, MERGE_ROWS  # noqa: E402


@triton.jit
def _load_q(q, token, heads, row_ok, group, dims, HQ: tl.constexpr, D: tl.constexpr, R: tl.constexpr):
    return tl.load(q + (token * HQ + group * R + heads)[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)


@triton.jit
def partial_exp_kernel(
    q, k, v, cu_seqlens, csr_offsets, csr_entries, partial_out, partial_lse, scale_log2, n_block_slots,
    token_offset,
    HQ: tl.constexpr, G: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr, TOPK: tl.constexpr,
    ROWS: tl.constexpr, QT: tl.constexpr, SPLIT: tl.constexpr,
    PREFETCH: tl.constexpr, FAST: tl.constexpr,
):
    block_slot = tl.program_id(0)
    group = tl.program_id(1)
    first, last = _entry_range(csr_offsets, n_block_slots, block_slot, group, SPLIT)
    if first == last:
        return
    start, seqlen, block_start = _kv_block(cu_seqlens, block_slot, MAX_BLOCKS, BLOCK_SIZE)
    k_pos = block_start + tl.arange(0, BLOCK_SIZE)
    dims = tl.arange(0, D)
    key_ok = k_pos < seqlen
    kv_rows = ((start + k_pos) * G + group)[:, None] * D + dims[None, :]
    k_tile = tl.load(k + kv_rows, mask=key_ok[:, None], other=0.0)
    v_tile = tl.load(v + kv_rows, mask=key_ok[:, None], other=0.0)
    token, slot, heads, row_ok = _entry_rows(csr_entries, first, last, ROWS, QT, R, TOPK)
    q_rows = _load_q(q, token, heads, row_ok, group, dims, HQ, D, R)
    if PREFETCH == 2:
        token1, slot1, heads1, row_ok1 = _entry_rows(csr_entries, first + QT, last, ROWS, QT, R, TOPK)
    for entry in range(first, last, QT):
        if PREFETCH == 1:
            n_token, n_slot, n_heads, n_row_ok = _entry_rows(csr_entries, entry + QT, last, ROWS, QT, R, TOPK)
            n_q_rows = _load_q(q, n_token, n_heads, n_row_ok, group, dims, HQ, D, R)
        elif PREFETCH == 2:
            token2, slot2, heads2, row_ok2 = _entry_rows(csr_entries, entry + 2 * QT, last, ROWS, QT, R, TOPK)
            n_q_rows = _load_q(q, token1, heads1, row_ok1, group, dims, HQ, D, R)
        else:
            token, slot, heads, row_ok = _entry_rows(csr_entries, entry, last, ROWS, QT, R, TOPK)
            q_rows = _load_q(q, token, heads, row_ok, group, dims, HQ, D, R)
        head_index = token * HQ + group * R + heads
        partial_index = (head_index - token_offset * HQ) * TOPK + slot
        if FAST:
            scores = tl.dot(q_rows, tl.trans(k_tile))
            first_pos = tl.min(tl.where(row_ok, token - start, BLOCK_SIZE + block_start))
            if first_pos < block_start + BLOCK_SIZE - 1:  # some row does not see the whole block
                visible = row_ok[:, None] & (k_pos[None, :] <= (token - start)[:, None])
                scores = tl.where(visible, scores, float("-inf"))
            row_max = tl.max(scores, axis=1)
            scaled_max = tl.where(row_max == float("-inf"), 0.0, row_max * scale_log2)
            probs = tl.exp2(scores * scale_log2 - scaled_max[:, None])
            row_sum = tl.sum(probs, axis=1)
            inv_sum = 1.0 / tl.where(row_sum == 0.0, 1.0, row_sum)
            out_rows = tl.dot(probs.to(v_tile.dtype), v_tile) * inv_sum[:, None]
            safe_max = scaled_max
        else:
            visible = row_ok[:, None] & (k_pos[None, :] <= (token - start)[:, None]) & key_ok[None, :]
            scores = tl.where(visible, tl.dot(q_rows, tl.trans(k_tile)) * scale_log2, float("-inf"))
            row_max = tl.max(scores, axis=1)
            safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
            probs = tl.exp2(scores - safe_max[:, None])
            row_sum = tl.sum(probs, axis=1)
            out_rows = tl.dot(probs.to(v_tile.dtype), v_tile) / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        tl.store(partial_out + partial_index[:, None] * D + dims[None, :],
                 out_rows.to(partial_out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(partial_lse + partial_index, (safe_max + tl.log2(row_sum)) * LN2, mask=row_ok)
        if PREFETCH == 1:
            token, slot, heads, row_ok, q_rows = n_token, n_slot, n_heads, n_row_ok, n_q_rows
        elif PREFETCH == 2:
            token, slot, heads, row_ok, q_rows = token1, slot1, heads1, row_ok1, n_q_rows
            token1, slot1, heads1, row_ok1 = token2, slot2, heads2, row_ok2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seqlen", type=int, default=131072)
    parser.add_argument("--ncu", action="store_true", help="run each variant once (for a profiler)")
    args = parser.parse_args()
    c = PAPER_LAYER
    seqlen = args.seqlen
    q, k, v, cu, starts, blocks, _ = packed_attention_inputs(c, seqlen, seed=seqlen)
    bs, scale = c["block_size"], c["head_dim"] ** -0.5
    total, n_heads, head_dim = q.shape
    topk = blocks.shape[-1]
    chunk = max(1, min(total, kernels.WORKSPACE_BYTES // (n_heads * topk * (4 + head_dim * 2))))
    partial_lse = torch.empty(chunk, n_heads, topk, dtype=torch.float32, device="cuda")
    partial_out = torch.empty(chunk, n_heads, topk, head_dim, dtype=q.dtype, device="cuda")
    chunks = []
    for start in range(0, total, chunk):
        end = min(total, start + chunk)
        csr = _csr(blocks, cu, seqlen, bs, start, end)
        split = _list_parts(end - start, topk, min(csr.max_blocks, triton.cdiv(end, bs)))
        chunks.append((start, end, csr, split))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device="cuda")

    def run(config, prefetch, fast, merge=True):
        rows, warps, stages = config
        launch = _kv_outer_launch(q, k, config)
        for start, end, csr, split in chunks:
            partial_lse.fill_(float("-inf"))
            partial_exp_kernel[(csr.n_block_slots, k.shape[1], split)](
                q, k, v, cu, csr.offsets, csr.entries, partial_out, partial_lse, scale * LOG2E.value,
                csr.n_block_slots, start, HQ=launch["HQ"], G=launch["G"], R=launch["R"], D=head_dim,
                BLOCK_SIZE=bs, MAX_BLOCKS=csr.max_blocks, TOPK=topk, ROWS=launch["ROWS"], QT=launch["QT"],
                SPLIT=split, PREFETCH=prefetch, FAST=fast, num_warps=warps, num_stages=stages)
            if merge:
                n = (end - start) * n_heads
                merge_partials_kernel[(triton.cdiv(n, MERGE_ROWS),)](
                    partial_out, partial_lse, out[start:end], lse[start:end], n, TOPK=topk, KP=_pow2(topk),
                    D=head_dim, HEADS=MERGE_ROWS, num_warps=4)
        return out

    reference = kernels.sparse_attention_fwd(q, k, v, blocks, starts, cu, seqlen, bs, scale, schedule="kv")[0].clone()
    record = {"seqlen": seqlen, "chunks": [(s, e, sp) for s, e, _, sp in chunks], "rows": []}
    record["default_ms"] = time_ms(lambda: kernels.sparse_attention_fwd(q, k, v, blocks, starts, cu, seqlen, bs, scale,
                                                                        schedule="kv"), 2, 5)
    print("default", record["default_ms"], flush=True)
    variants = [(cfg, pf, fast) for cfg in [(64, 4, 1), (64, 4, 2), (64, 4, 3)] for pf in (0, 1, 2) for fast in (0, 1)]
    if args.ncu:
        variants = [((64, 4, 2), 1, 1)]
    for cfg, pf, fast in variants:
        name = f"{cfg} prefetch={pf} fast={fast}"
        try:
            got = run(cfg, pf, fast).clone()
            if args.ncu:
                continue
            row = {"config": cfg, "prefetch": pf, "fast": fast}
            diff = got.float() - reference.float()
            row["max_abs_diff"] = diff.abs().max().item()
            row["rel_diff"] = (diff.norm() / reference.float().norm()).item()
            row["partials_ms"] = time_ms(lambda: run(cfg, pf, fast, merge=False), 2, 5)
            row["with_merge_ms"] = time_ms(lambda: run(cfg, pf, fast), 2, 5)
        except Exception as error:
            row = {"config": cfg, "prefetch": pf, "fast": fast, "error": str(error).splitlines()[0][:200]}
        print(name, json.dumps(row), flush=True)
        record["rows"].append(row)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kvfwd_exp.json").write_text(json.dumps(record, indent=2))
    csr_times = {}
    for name, fn in csr_builders().items():
        csr_times[name] = time_ms(lambda: [fn(blocks, cu, seqlen, bs, s, e) for s, e, _, _ in chunks], 2, 5)
    record["csr_ms"] = csr_times
    print("csr", csr_times)
    (args.out / "kvfwd_exp.json").write_text(json.dumps(record, indent=2))


def csr_builders():
    from msa.varlen import token_sequences

    def int32_keys(block_indices, cu_seqlens, max_seqlen, block_size, start, end):
        sequences = token_sequences(cu_seqlens, block_indices.shape[0])[start:end]
        bi = block_indices[start:end]
        n_tokens, n_groups, topk = bi.shape
        max_blocks = max(1, triton.cdiv(max_seqlen, block_size))
        n_block_slots = (cu_seqlens.numel() - 1) * max_blocks
        groups = torch.arange(n_groups, device=bi.device, dtype=torch.int32)[None, :, None]
        keys = groups * n_block_slots + (sequences.to(torch.int32) * max_blocks)[:, None, None] + bi
        keys = torch.where(bi >= 0, keys, n_groups * n_block_slots).flatten()
        sorted_keys, order = torch.sort(keys, stable=True)
        order = order.to(torch.int32)
        entries = (order // (n_groups * topk) + start) * topk + order % topk
        bounds = torch.arange(n_groups * n_block_slots + 1, device=bi.device, dtype=torch.int32)
        offsets = torch.searchsorted(sorted_keys, bounds).to(torch.int32)
        return offsets, entries

    return {"current": _csr, "int32_keys": int32_keys}

if __name__ == "__main__":
    main()
