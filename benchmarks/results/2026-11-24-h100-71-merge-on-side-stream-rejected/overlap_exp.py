"""Experiment: the KV-outer forward with each chunk's merge on a side stream, overlapping the next chunk's partials.

    PYTHONPATH=src:benchmarks python .scratch/overlap_exp.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, "benchmarks")
from kernels import packed_attention_inputs, time_ms  # noqa: E402
from flops import PAPER_LAYER  # noqa: E402
from msa import kernels  # noqa: E402
from msa.kernels import (_csr, _list_parts, _kv_outer_launch, LOG2E, _pow2, MERGE_ROWS, INTERPRET,  # noqa: E402
                         sparse_attention_fwd_partial_kernel, merge_partials_kernel)


def forward(q, k, v, blocks, cu, seqlen, bs, scale, workspace, buffers, overlap, priority):
    total, n_heads, head_dim = q.shape
    topk = blocks.shape[-1]
    chunk = min(total, workspace // (n_heads * topk * (4 + head_dim * 2)))
    bufs = [(torch.empty(chunk, n_heads, topk, dtype=torch.float32, device="cuda"),
             torch.empty(chunk, n_heads, topk, head_dim, dtype=q.dtype, device="cuda")) for _ in range(buffers)]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device="cuda")
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream(priority=priority) if overlap else main
    side.wait_stream(main)
    launch = _kv_outer_launch(q, k, kernels.KV_OUTER_FWD)
    max_blocks = triton.cdiv(seqlen, bs)
    csr = _csr(blocks, cu, seqlen, bs, 0, total, chunk_tokens=chunk)
    merged = [None] * buffers
    for index, start in enumerate(range(0, total, chunk)):
        end = min(total, start + chunk)
        partial_lse, partial_out = bufs[index % buffers]
        if merged[index % buffers] is not None:
            main.wait_event(merged[index % buffers])
        split = _list_parts(end - start, topk, min(max_blocks, triton.cdiv(end, bs)))
        partial_lse.fill_(float("-inf"))
        sparse_attention_fwd_partial_kernel[(csr.n_block_slots, k.shape[1], split)](
            q, k, v, cu, csr.chunk_offsets(index), csr.entries, partial_out, partial_lse, scale * LOG2E.value,
            csr.n_block_slots, start, **launch, BLOCK_SIZE=bs, MAX_BLOCKS=max_blocks, TOPK=topk, SPLIT=split,
            WRITE_OUT=True, UPCAST=INTERPRET)
        done = torch.cuda.Event()
        done.record(main)
        side.wait_event(done)
        rows = (end - start) * n_heads
        with torch.cuda.stream(side):
            merge_partials_kernel[(triton.cdiv(rows, MERGE_ROWS),)](
                partial_out, partial_lse, out[start:end], lse[start:end], rows, TOPK=topk, KP=_pow2(topk),
                D=head_dim, HEADS=MERGE_ROWS, num_warps=4)
            merged[index % buffers] = torch.cuda.Event()
            merged[index % buffers].record(side)
    main.wait_stream(side)
    return out, lse


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seqlens", default="131072,524288")
    args = parser.parse_args()
    c = PAPER_LAYER
    record = {"rows": []}
    for seqlen in [int(s) for s in args.seqlens.split(",")]:
        q, k, v, cu, starts, blocks, _ = packed_attention_inputs(c, seqlen, seed=seqlen)
        bs, scale = c["block_size"], c["head_dim"] ** -0.5
        reference = kernels.sparse_attention_fwd(q, k, v, blocks, starts, cu, seqlen, bs, scale, schedule="kv")[0]
        row = {"seqlen": seqlen, "main_ms": time_ms(lambda: kernels.sparse_attention_fwd(
            q, k, v, blocks, starts, cu, seqlen, bs, scale, schedule="kv"), 2, 5)}
        for name, ws, nbuf, overlap, prio in [("seq 4G x1", 4 << 30, 1, False, 0), ("seq 2G x2", 2 << 30, 2, False, 0),
                                              ("overlap 2G x2", 2 << 30, 2, True, 0),
                                              ("overlap 2G x2 high", 2 << 30, 2, True, -1),
                                              ("overlap 4G x2", 4 << 30, 2, True, 0),
                                              ("overlap 4G x2 high", 4 << 30, 2, True, -1),
                                              ("overlap 1G x4 high", 1 << 30, 4, True, -1)]:
            fn = lambda: forward(q, k, v, blocks, cu, seqlen, bs, scale, ws, nbuf, overlap, prio)  # noqa: E731
            out = fn()[0]
            row[name] = {"ms": time_ms(fn, 2, 5), "equal": bool(torch.equal(out, reference))}
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        record["rows"].append(row)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overlap_exp.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
