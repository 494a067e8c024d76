"""Run each MSA kernel once on the paper's layer, for a profiler (Nsight Compute) to measure.

    ncu --section SpeedOfLight --csv -k regex:'kernel' python benchmarks/profile_kernels.py 32768

(see scripts/gpu_profile.sh, which writes the table that benchmarks/README.md quotes).
"""

from __future__ import annotations

import sys

import torch

from msa import kernels
from msa.varlen import token_positions

HEADS, GROUPS, HEAD_DIM, INDEX_DIM, BLOCK, TOPK = 64, 4, 128, 128, 128, 16


def main(seqlen: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    q, k, v = randn(seqlen, HEADS, HEAD_DIM), randn(seqlen, GROUPS, HEAD_DIM), randn(seqlen, GROUPS, HEAD_DIM)
    index_q, index_k = randn(seqlen, GROUPS, INDEX_DIM), randn(seqlen, 1, INDEX_DIM)
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device="cuda")
    starts = token_positions(cu, seqlen)[0].int()
    scale, index_scale = HEAD_DIM**-0.5, INDEX_DIM**-0.5
    blocks = kernels.select_blocks(index_q, index_k, cu, seqlen, BLOCK, TOPK)
    out, lse = kernels.sparse_attention_fwd(q, k, v, blocks, starts, cu, seqlen, BLOCK, scale, schedule="kv")
    kernels.sparse_attention_fwd(q, k, v, blocks, starts, cu, seqlen, BLOCK, scale, schedule="query")
    kernels.sparse_attention_bwd(q, k, v, out, lse, torch.randn_like(q), blocks, starts, cu, seqlen, BLOCK, scale)
    _, index_lse, teacher_lse = kernels.index_kl_fwd(q, k, index_q, index_k, blocks, cu, seqlen, BLOCK, scale,
                                                     index_scale, lse)
    kernels.index_kl_bwd(q, k, index_q, index_k, blocks, starts, cu, seqlen, teacher_lse, index_lse,
                         torch.ones(1, device="cuda"), BLOCK, scale, index_scale)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 32768)
