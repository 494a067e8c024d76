"""What context parallelism costs on one GPU: ``context_parallel_attention`` over a process group of one rank
against the plain ops (issue #25, point 4: at most 5% at 128K).

The paper's layer (64 query / 4 KV heads, head dim 128, block 128, top-16), bf16, batch one sequence per
length. Both arms run the same training step of the attention: ``msa_attention`` (selection, sparse attention,
KL loss with the selection as support) forward, then backward of ``out`` and the KL loss into q, k, v and the index
tensors. The context-parallel arm wraps it in ``context_parallel_attention`` with ``msa_select``, as
``MSAAttention(context_parallel_group=...)`` does, over a group of this one process (NCCL on a GPU, gloo on a CPU).
Timed with CUDA events around each step (median of ``--repeats``), both arms alternating in the same run. Writes
``cp_overhead.json`` under ``--out``.

    PYTHONPATH=src python benchmarks/cp_overhead.py --out benchmarks/results/<run>
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import track

from flops import PAPER_LAYER  # noqa: E402  (benchmarks/ is the script's directory)
from msa.cli.bench import git_commit
from msa.cli.timing import median_ms
from msa.distributed import context_parallel_attention
from msa.nn.index_branch import msa_attention, msa_select


def inputs(seqlen: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """``q, k, v, index_q, index_k`` ``[1, S, H, D]`` of the paper's layer, leaves that take gradients."""
    generator = torch.Generator(device).manual_seed(seqlen)
    layer = PAPER_LAYER
    shapes = [(layer["heads"], layer["head_dim"]), (layer["groups"], layer["head_dim"]),
              (layer["groups"], layer["head_dim"]), (layer["groups"], layer["index_dim"]), (1, layer["index_dim"])]
    return [torch.randn(1, seqlen, heads, dim, device=device, generator=generator).to(dtype).requires_grad_()
            for heads, dim in shapes]


def training_step(attend, leaves: list[torch.Tensor]) -> None:
    out, kl, _ = attend(*leaves)
    torch.autograd.grad(out.float().square().mean() + kl, leaves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seqlens", default="32768,131072")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as rendezvous:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", world_size=1, rank=0,
                                init_method=f"file://{os.path.join(rendezvous, 'store')}")
        try:
            settings = dict(mode="sparse", block_size=PAPER_LAYER["block_size"], topk=PAPER_LAYER["topk"],
                            compute_kl_loss=True)
            attention = functools.partial(msa_attention, **settings)
            select = functools.partial(msa_select, block_size=settings["block_size"], topk=settings["topk"],
                                       compute_kl_loss=True)
            arms = {"plain": attention,
                    "context_parallel": functools.partial(context_parallel_attention, attention, select=select)}
            rows = []
            for seqlen in track([int(s) for s in args.seqlens.split(",")], description="lengths"):
                leaves = inputs(seqlen, device, dtype)
                row = dict(seqlen=seqlen)
                for _ in range(2):  # alternate the arms: a drifting clock favours neither
                    for name, attend in arms.items():
                        row.setdefault(f"{name}_ms", []).append(
                            median_ms(lambda: training_step(attend, leaves), device, repeats=args.repeats))
                for name in arms:
                    row[f"{name}_ms"] = min(row[f"{name}_ms"])
                row["overhead"] = row["context_parallel_ms"] / row["plain_ms"] - 1
                rows.append(row)
                Console().print(f"{seqlen}: plain {row['plain_ms']:.2f} ms, context parallel (1 rank) "
                                f"{row['context_parallel_ms']:.2f} ms, overhead {100 * row['overhead']:+.1f}%")
        finally:
            dist.destroy_process_group()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    record = dict(date=datetime.date.today().isoformat(), commit=git_commit(), device=device_name,
                  torch=torch.__version__, layer=PAPER_LAYER, config=vars(args) | dict(out=str(args.out)), rows=rows)
    (args.out / "cp_overhead.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
