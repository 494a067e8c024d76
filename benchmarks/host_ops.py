"""The host's share of an MSA layer's work: the PyTorch operators each custom op issues around its Triton kernels.

On a GPU a small model's MSA training step is bound by the host (benchmarks/MODEL_STEP.md: 13,361 kernels per
step against dense's 4,966), so the operators the ops issue per call are a cost of their own. This counts them on
any machine, a CPU included: ``msa_attention`` (selection, sparse attention, KL loss, as ``MSAAttention`` calls it)
runs on the Triton path under the interpreter with every kernel launch stubbed out (no kernel runs, results are
garbage), inside ``torch.profiler``, and each ``msa::`` operator's nested ``aten::`` calls are counted, forward and
backward (a backward node's count includes its ``msa::`` backward operator's), and all of the layer's (the
Selection's derived structures, built outside the operators, included). Writes ``host_ops.json`` under
``--out`` and prints the table.

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/host_ops.py --out /tmp/host_ops
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from msa.cli.bench import git_commit


def stub_launches() -> None:
    """Every Triton kernel of msa.kernels launched as a no-op (the launchers' host work stays)."""
    from msa.kernels import index_kl, indexer, sparse_attention, tiles

    class NoKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for module in (index_kl, indexer, sparse_attention, tiles):
        for name, value in vars(module).copy().items():
            if hasattr(value, "run") and hasattr(value, "fn"):  # a @triton.jit function
                setattr(module, name, NoKernel())
        if hasattr(module, "launch"):
            setattr(module, "launch", lambda kernel, grid, *args, **kwargs: None)


def count(tokens: int, kl_topk: int | None) -> dict:
    from msa.nn.index_branch import msa_attention

    heads, groups, head_dim, index_dim, block_size, topk = 9, 3, 64, 64, 64, 8  # SmolLM2-135M converted 64 x 8
    q, k, v = (torch.randn(1, tokens, h, head_dim) for h in (heads, groups, groups))
    index_q = torch.randn(1, tokens, groups, index_dim, requires_grad=True)
    index_k = torch.randn(1, tokens, 1, index_dim, requires_grad=True)
    q.requires_grad_()
    with torch.profiler.profile() as prof:
        out, kl, _ = msa_attention(q, k, v, index_q, index_k, block_size=block_size, topk=topk, kl_topk=kl_topk,
                                   mode="sparse", compute_kl_loss=True)
        (out.float().sum() + kl).backward()
    events = prof.events()
    counts = collections.Counter()
    for op in events:
        if op.name.startswith("msa::"):
            name = op.name
        elif op.name.startswith("autograd::engine::evaluate_function: GeneratedBackwardFor_msa_"):
            name = "backward of msa::" + op.name.split("GeneratedBackwardFor_msa_")[1].split("_default")[0]
        else:
            continue
        counts[name] += sum(1 for e in events if e.name.startswith("aten::") and e.thread == op.thread
                            and op.time_range.start <= e.time_range.start and e.time_range.end <= op.time_range.end)
    counts["the whole layer, forward and backward"] = sum(1 for e in events if e.name.startswith("aten::"))
    return dict(tokens=tokens, kl_topk=kl_topk, aten_ops=dict(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
        raise SystemExit("run with TRITON_INTERPRET=1 on a machine without CUDA (the kernels are stubbed out)")
    os.environ["MSA_BACKEND"] = "triton"
    stub_launches()
    rows = [count(args.tokens, kl_topk) for kl_topk in (None, 32)]
    record = {"benchmark": "host_ops", "commit": git_commit(), "torch": torch.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_ops.json").write_text(json.dumps(record, indent=2))
    table = Table(title=f"aten operators per call, SmolLM2 layer (9/3 heads, 64 x 8), {args.tokens} tokens")
    table.add_column("operator")
    for row in rows:
        table.add_column(f"KL support {row['kl_topk'] or 'top-k'}", justify="right")
    for name in sorted({name for row in rows for name in row["aten_ops"]}):
        table.add_row(name, *(str(row["aten_ops"].get(name, "-")) for row in rows))
    Console().print(table)


if __name__ == "__main__":
    main()
