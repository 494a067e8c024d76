"""Experiment: the KV-outer backward (dk/dv + atomic dq) with the forward's gather pipeline and mask skip, at 128K.

    PYTHONPATH=src:benchmarks python .scratch/bwd_exp.py --out DIR
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
from msa.kernels.sparse_attention import LOG2E, _entry_range, _entry_rows, _kv_block, _gather_rows  # noqa: E402
from msa.kernels import _csr, _kv_outer_launch, _row_dots  # noqa: E402


@triton.jit
def bwd_exp_kernel(
    q, k, v, dout, lse, delta, cu_seqlens, csr_offsets, csr_entries, dk, dv, dq_accum, scale_log2, scale,
    n_block_slots,
    HQ: tl.constexpr, G: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr, TOPK: tl.constexpr,
    ROWS: tl.constexpr, QT: tl.constexpr, SPLIT: tl.constexpr, PREFETCH: tl.constexpr, FAST: tl.constexpr,
):
    block_slot = tl.program_id(0)
    group = tl.program_id(1)
    start, seqlen, block_start = _kv_block(cu_seqlens, block_slot, MAX_BLOCKS, BLOCK_SIZE)
    first, last = _entry_range(csr_offsets, n_block_slots, block_slot, group, SPLIT)
    if (block_start >= seqlen) | (first == last):
        return
    last_key = block_start + BLOCK_SIZE - 1
    k_pos = block_start + tl.arange(0, BLOCK_SIZE)
    dims = tl.arange(0, D)
    key_ok = k_pos < seqlen
    kv_rows = ((start + k_pos) * G + group)[:, None] * D + dims[None, :]
    k_tile = tl.load(k + kv_rows, mask=key_ok[:, None], other=0.0)
    v_tile = tl.load(v + kv_rows, mask=key_ok[:, None], other=0.0)
    dk_acc = tl.zeros((BLOCK_SIZE, D), tl.float32)
    dv_acc = tl.zeros((BLOCK_SIZE, D), tl.float32)
    token, _, heads, row_ok = _entry_rows(csr_entries, first, last, ROWS, QT, R, TOPK)
    q_rows = _gather_rows(q, token, heads, row_ok, group, dims, HQ, R, D)
    do_rows = _gather_rows(dout, token, heads, row_ok, group, dims, HQ, R, D)
    next_token, _, _, next_ok = _entry_rows(csr_entries, first + QT, last, ROWS, QT, R, TOPK)
    for entry in range(first, last, QT):
        if PREFETCH:
            after_token, _, _, after_ok = _entry_rows(csr_entries, entry + 2 * QT, last, ROWS, QT, R, TOPK)
            next_q = _gather_rows(q, next_token, heads, next_ok, group, dims, HQ, R, D)
            next_do = _gather_rows(dout, next_token, heads, next_ok, group, dims, HQ, R, D)
        else:
            token, _, heads, row_ok = _entry_rows(csr_entries, entry, last, ROWS, QT, R, TOPK)
            q_rows = _gather_rows(q, token, heads, row_ok, group, dims, HQ, R, D)
            do_rows = _gather_rows(dout, token, heads, row_ok, group, dims, HQ, R, D)
        head_index = token * HQ + group * R + heads
        row_lse = tl.load(lse + head_index, mask=row_ok, other=0.0) * LOG2E
        row_delta = tl.load(delta + head_index, mask=row_ok, other=0.0)
        scores = tl.dot(q_rows, tl.trans(k_tile))
        if FAST:
            probs = tl.exp2(scores * scale_log2 - row_lse[:, None])
            probs = tl.where(row_ok[:, None], probs, 0.0)
            if tl.min(tl.where(row_ok, token - start, last_key)) < last_key:
                probs = tl.where(k_pos[None, :] <= (token - start)[:, None], probs, 0.0)
        else:
            visible = row_ok[:, None] & (k_pos[None, :] <= (token - start)[:, None]) & key_ok[None, :]
            probs = tl.where(visible, tl.exp2(scores * scale_log2 - row_lse[:, None]), 0.0)
        dv_acc += tl.dot(tl.trans(probs.to(do_rows.dtype)), do_rows)
        dprobs = tl.dot(do_rows, tl.trans(v_tile))
        dscores = probs * (dprobs - row_delta[:, None])
        dk_acc += tl.dot(tl.trans(dscores.to(q_rows.dtype)), q_rows)
        dq_rows = tl.dot(dscores.to(k_tile.dtype), k_tile) * scale
        tl.atomic_add(dq_accum + head_index[:, None] * D + dims[None, :], dq_rows, mask=row_ok[:, None],
                      sem="relaxed")
        if PREFETCH:
            token, row_ok, q_rows, do_rows = next_token, next_ok, next_q, next_do
            next_token, next_ok = after_token, after_ok
    tl.atomic_add(dk + kv_rows, dk_acc * scale, mask=key_ok[:, None], sem="relaxed")
    tl.atomic_add(dv + kv_rows, dv_acc, mask=key_ok[:, None], sem="relaxed")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seqlen", type=int, default=131072)
    args = parser.parse_args()
    c = PAPER_LAYER
    seqlen = args.seqlen
    q, k, v, cu, starts, blocks, randn = packed_attention_inputs(c, seqlen, seed=seqlen)
    bs, scale = c["block_size"], c["head_dim"] ** -0.5
    out, lse = kernels.sparse_attention_fwd(q, k, v, blocks, starts, cu, seqlen, bs, scale)
    dout = randn(*q.shape)
    reference = kernels.sparse_attention_bwd(q, k, v, out, lse, dout, blocks, starts, cu, seqlen, bs, scale)
    record = {"seqlen": seqlen, "rows": []}
    record["default_ms"] = time_ms(lambda: kernels.sparse_attention_bwd(q, k, v, out, lse, dout, blocks, starts, cu,
                                                                        seqlen, bs, scale), 2, 5)
    print("default", record["default_ms"], flush=True)
    csr = _csr(blocks, cu, seqlen, bs)
    delta = _row_dots(out, dout)

    def run(config, prefetch, fast):
        grads = [torch.zeros(x.shape, dtype=torch.float32, device="cuda") for x in (q, k, v)]
        bwd_exp_kernel[(csr.n_block_slots, k.shape[1], kernels.KV_OUTER_SPLIT)](
            q, k, v, dout, lse, delta, cu, csr.offsets, csr.entries, grads[1], grads[2], grads[0],
            scale * LOG2E.value, scale, csr.n_block_slots, **_kv_outer_launch(q, k, config), BLOCK_SIZE=bs,
            MAX_BLOCKS=csr.max_blocks, TOPK=blocks.shape[-1], SPLIT=kernels.KV_OUTER_SPLIT, PREFETCH=prefetch,
            FAST=fast)
        return grads

    for cfg in [(32, 8, 2), (32, 4, 2), (64, 8, 2), (32, 8, 1)]:
        for pf in (0, 1):
            for fast in (0, 1):
                row = {"config": cfg, "prefetch": pf, "fast": fast}
                try:
                    grads = run(cfg, pf, fast)
                    row["rel_diff"] = [((g - r.float()).norm() / r.float().norm()).item()
                                       for g, r in zip(grads, reference)]
                    row["kernel_ms"] = time_ms(lambda: run(cfg, pf, fast), 2, 5)
                except Exception as error:
                    row["error"] = str(error).splitlines()[0][:200]
                print(json.dumps(row), flush=True)
                record["rows"].append(row)
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "bwd_exp.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
