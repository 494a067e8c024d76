"""Useful floating-point work of each benchmarked kernel (shared by kernels.py and report.py).

``attended`` counts (query, key) pairs per GQA group that the Main Branch reads.
"""

from __future__ import annotations

# The paper's layer, which the targets are set on.
PAPER_LAYER = dict(heads=64, groups=4, head_dim=128, index_dim=128, block_size=128, topk=16)


def kernel_flops(layer: dict, seqlen: int, attended: float) -> dict:
    heads, groups, dim, index_dim = layer["heads"], layer["groups"], layer["head_dim"], layer["index_dim"]
    attention = 2 * heads * dim * attended  # one heads x dim product per attended pair
    student = 2 * groups * index_dim * attended
    indexer = 2 * groups * index_dim * seqlen * (seqlen + 1) / 2  # every causal pair, every group
    return {
        "indexer": indexer,
        "indexer_fp8": indexer,  # the same products in FP8
        "sparse_fwd_query": 2 * attention,  # QK and PV
        "sparse_fwd_kv": 2 * attention,
        "sparse_bwd": 5 * attention,  # QK, P^T dO, dO V^T, dS^T Q, dS K
        "sparse_bwd_deterministic": 5 * attention,  # the same useful work (dq's pass recomputes QK and dO V^T)
        "kl_fwd": attention + student,  # teacher QK, student logits
        "kl_bwd": attention + 3 * student,  # teacher QK, student logits, d index_k, d index_q
        "kl_bwd_deterministic": attention + 3 * student,  # the same useful work (d index_q's pass recomputes logits)
        "kl_fused": attention + 3 * student,  # the same work in one teacher pass (the training step runs it)
    }
