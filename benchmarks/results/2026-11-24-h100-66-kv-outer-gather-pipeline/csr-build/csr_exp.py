"""Experiment: cost of building the KV-outer lists (BlockCSR) at 128K: per chunk vs once, int64 vs int32 keys."""

from __future__ import annotations

import json
import sys

import torch
import triton

sys.path.insert(0, "benchmarks")
from kernels import packed_attention_inputs, time_ms  # noqa: E402
from flops import PAPER_LAYER  # noqa: E402
from msa.kernels import _csr  # noqa: E402
from msa.varlen import token_sequences  # noqa: E402


def whole(block_indices, cu, seqlen, bs, chunk, key_dtype):
    n_tokens, n_groups, topk = block_indices.shape
    max_blocks = triton.cdiv(seqlen, bs)
    n_block_slots = (cu.numel() - 1) * max_blocks
    n_chunks = triton.cdiv(n_tokens, chunk)
    seqs = token_sequences(cu, n_tokens).to(key_dtype)
    chunks = torch.arange(n_tokens, device="cuda", dtype=key_dtype) // chunk
    groups = torch.arange(n_groups, device="cuda", dtype=key_dtype)[None, :, None]
    keys = (chunks[:, None, None] * n_groups + groups) * n_block_slots + (seqs * max_blocks)[:, None, None] \
        + block_indices.to(key_dtype)
    keys = torch.where(block_indices >= 0, keys, n_chunks * n_groups * n_block_slots).flatten()
    sorted_keys, order = torch.sort(keys, stable=True)
    entries = (order // (n_groups * topk)) * topk + order % topk
    bounds = torch.arange(n_chunks * n_groups * n_block_slots + 1, device="cuda", dtype=key_dtype)
    offsets = torch.searchsorted(sorted_keys, bounds).to(torch.int32)
    return offsets, entries.to(torch.int32)


def main():
    c = PAPER_LAYER
    seqlen = 131072
    q, k, v, cu, starts, blocks, _ = packed_attention_inputs(c, seqlen, seed=seqlen)
    bs = c["block_size"]
    chunk = 16384
    record = {}
    record["per_chunk_ms"] = time_ms(lambda: [_csr(blocks, cu, seqlen, bs, s, min(seqlen, s + chunk))
                                              for s in range(0, seqlen, chunk)], 3, 10)
    for dt in (torch.int64, torch.int32):
        record[f"whole_{dt}"] = time_ms(lambda: whole(blocks, cu, seqlen, bs, chunk, dt), 3, 10)
    keys64 = torch.randint(0, 32768, (seqlen * 64,), device="cuda")
    keys32 = keys64.int()
    record["sort_8M_int64"] = time_ms(lambda: torch.sort(keys64, stable=True), 3, 10)
    record["sort_8M_int32"] = time_ms(lambda: torch.sort(keys32, stable=True), 3, 10)
    record["sort_1M_int64"] = time_ms(lambda: torch.sort(keys64[: 1 << 20], stable=True), 3, 10)
    record["sort_1M_int32"] = time_ms(lambda: torch.sort(keys32[: 1 << 20], stable=True), 3, 10)
    record["sort_8M_int32_unstable"] = time_ms(lambda: torch.sort(keys32), 3, 10)
    # same lists as the per-chunk build?
    offsets, entries = whole(blocks, cu, seqlen, bs, chunk, torch.int32)
    n = 4 * triton.cdiv(seqlen, bs)
    same = True
    for i, s in enumerate(range(0, seqlen, chunk)):
        csr = _csr(blocks, cu, seqlen, bs, s, min(seqlen, s + chunk))
        o = offsets[i * n: (i + 1) * n + 1]
        same &= torch.equal(entries[o[0]: o[-1]], csr.entries[: csr.offsets[-1]]) and torch.equal(o - o[0], csr.offsets)
    record["same_lists"] = bool(same)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
