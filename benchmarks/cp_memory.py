"""The memory and communication model of context-parallel MSA attention (all-gather of K, V and index keys).

Per layer and per rank, for ``W`` ranks that each hold ``S / W`` tokens of one
sequence (zig-zag chunks) and all-gather the keys, values and index keys of
the whole sequence before attending (``msa.distributed``):

- local tensors shrink as ``1 / W``: the rank's queries, outputs, its shards of
  K, V, index queries and index keys, the LSE and the block indices;
- gathered tensors do not shrink: K and V ``[S, G, D]`` and the index keys
  ``[S, Di]``, and in the backward pass their gradients before the
  reduce-scatter;
- communication: each rank receives ``(W - 1) / W`` of the gathered bytes in
  the forward pass and sends as much in the backward reduce-scatter, while its
  compute (index scoring over on average ``S / 2`` visible keys, sparse
  attention over ``topk * B`` keys) shrinks as ``1 / W``.

All-gather stops scaling where the gathered bytes rival the local ones, or
where the collective's time exceeds the compute it could hide behind. Link
bandwidth and compute rate are assumptions (arguments), not measurements.
Writes a markdown table (``--out``) and prints it.

    python benchmarks/cp_memory.py --out docs/context_parallel_memory.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

GIB = 2**30
LENGTHS = {"128K": 2**17, "512K": 2**19, "1M": 2**20}
RANKS = [1, 2, 4, 8, 16, 32, 64]


def layer_bytes(seqlen: int, ranks: int, heads: int, groups: int, head_dim: int, index_dim: int, topk: int,
                element: int) -> dict:
    """Bytes per rank of one layer's attention: local tensors, gathered tensors, their gradients."""
    local_tokens = seqlen // ranks
    local = local_tokens * (element * (2 * heads * head_dim + 2 * groups * head_dim + groups * index_dim + index_dim)
                            + 4 * heads + 4 * groups * topk)
    gathered = seqlen * element * (2 * groups * head_dim + index_dim) if ranks > 1 else 0  # one rank gathers nothing
    return dict(local=local, gathered=gathered, gathered_grads=gathered)


def layer_seconds(seqlen: int, ranks: int, heads: int, groups: int, head_dim: int, index_dim: int, topk: int,
                  block_size: int, element: int, flops_per_s: float, link_bytes_per_s: float) -> dict:
    """Forward compute and all-gather time per rank of one layer."""
    local_tokens = seqlen // ranks
    index_flops = local_tokens * (seqlen / 2) * groups * index_dim * 2
    attention_flops = local_tokens * heads * topk * block_size * head_dim * 4
    received = (ranks - 1) / ranks * seqlen * element * (2 * groups * head_dim + index_dim)
    return dict(compute=(index_flops + attention_flops) / flops_per_s, all_gather=received / link_bytes_per_s)


def table(args) -> str:
    shape = dict(heads=args.heads, groups=args.groups, head_dim=args.head_dim, index_dim=args.index_dim,
                 topk=args.topk, element=args.element_bytes)
    lines = [
        f"Per layer and rank: Hq={args.heads}, G={args.groups}, D={args.head_dim}, Di={args.index_dim}, "
        f"block {args.block_size} x topk {args.topk}, {args.element_bytes}-byte elements; compute at "
        f"{args.tflops:g} TFLOP/s, all-gather at {args.link_gbs:g} GB/s (fast link) and {args.slow_link_gbs:g} GB/s "
        "(slow link), both assumed.",
        "",
        "| tokens | ranks | local GiB | gathered GiB | + their grads GiB | gathered share | compute ms | "
        f"all-gather ms @{args.link_gbs:g} | all-gather ms @{args.slow_link_gbs:g} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, seqlen in LENGTHS.items():
        for ranks in RANKS:
            memory = layer_bytes(seqlen, ranks, **shape)
            fast = layer_seconds(seqlen, ranks, **shape, block_size=args.block_size, flops_per_s=args.tflops * 1e12,
                                 link_bytes_per_s=args.link_gbs * 1e9)
            slow = layer_seconds(seqlen, ranks, **shape, block_size=args.block_size, flops_per_s=args.tflops * 1e12,
                                 link_bytes_per_s=args.slow_link_gbs * 1e9)
            total = memory["local"] + memory["gathered"] + memory["gathered_grads"]
            share = (memory["gathered"] + memory["gathered_grads"]) / total
            lines.append(f"| {name} | {ranks} | {memory['local'] / GIB:.2f} | {memory['gathered'] / GIB:.2f} | "
                         f"{memory['gathered_grads'] / GIB:.2f} | {100 * share:.0f}% | {1e3 * fast['compute']:.1f} | "
                         f"{1e3 * fast['all_gather']:.1f} | {1e3 * slow['all_gather']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--index-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--element-bytes", type=int, default=2, help="2 for bf16")
    parser.add_argument("--tflops", type=float, default=400.0,
                        help="the attention's sustained rate per GPU (assumed; about half of an H200's bf16 peak)")
    parser.add_argument("--link-gbs", type=float, default=350.0,
                        help="all-gather bandwidth per GPU inside a node (assumed, NVLink class)")
    parser.add_argument("--slow-link-gbs", type=float, default=50.0,
                        help="all-gather bandwidth per GPU across nodes (assumed, one 400 Gb/s NIC per GPU)")
    args = parser.parse_args()
    text = table(args)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
