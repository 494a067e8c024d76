"""Exploratory (outside PROTOCOL.md's arms): does 64 x 8 leave room for retrieval when the blocks are chosen well?

The A(seed 0) run found the trained Index Branch selecting the needle's blocks at the query position hardly more
often than chance, and MSA losing 20-35 points of retrieval. This asks what an ideal selector at the same budget would
do, on the base model (the GGUF, float32, on a CPU) and a few suite samples:

- ``oracle``: every layer attends to the local block and the 7 earlier blocks of largest group-mean dense attention
  mass (``evaluate.oracle_blocks``, computed from that layer's own q and k): its teacher-forced score and needle
  hits, and per layer and KV group the group-mean dense attention mass on the needle's blocks at the query position
  and the needle's best rank among the visible blocks by that mass (from the same q and k);
- the base model's own score on the same samples is stored by the GPU runs (R0, ``base``; bf16 there).

    python experiments/smollm2/needle_oracle_cpu.py --data DATA --base GGUF --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from rich.progress import track

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import evaluate  # noqa: E402
import ruler  # noqa: E402

from msa.cli.bench import git_commit  # noqa: E402
from msa.integrations import hf  # noqa: E402

BLOCK_SIZE, TOPK = 64, 8


class Capture:
    """A selector that keeps its layer's ``q``, ``k`` and the blocks ``choose(q, k)`` returned."""

    def __init__(self, choose):
        self.choose, self.last, self.blocks = choose, None, None

    def __call__(self, q, k, index_q, index_k):
        self.last, self.blocks = (q[0], k[0]), self.choose(q[0], k[0])
        return self.blocks[None]


def oracle(q, k):
    return evaluate.oracle_blocks(q, k, block_size=BLOCK_SIZE, topk=TOPK)


def attach(model, choose) -> list[Capture]:
    captures = [Capture(choose) for _ in hf.msa_layers(model)]
    for branch, capture in zip(hf.msa_layers(model), captures):
        branch.selector = capture
    return captures


def needle_mass(captures, position: int, span) -> dict:
    """Per layer and group at ``position``: dense attention mass on the needle's blocks and their best rank."""
    needle = list(range(span[0] // BLOCK_SIZE, (span[1] - 1) // BLOCK_SIZE + 1))
    mass, rank = [], []
    for capture in captures:
        q, k = capture.last
        block_mass = evaluate._group_block_mass(q, k, position, position + 1, BLOCK_SIZE, q.shape[-1] ** -0.5)[0]
        order = block_mass.argsort(-1, descending=True)  # [G, n_blocks]
        mass.append(block_mass[:, needle].sum(-1).tolist())
        rank.append([min(int((order[g] == b).nonzero()) for b in needle) for g in range(order.shape[0])])
    return dict(needle_mass=mass, needle_rank=rank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--tasks", default="passkey,multikey")
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--per-cell", type=int, default=2, help="samples per (task, length, depth): id %% 32 < this")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    base = transformers.AutoModelForCausalLM.from_pretrained(args.base.parent, gguf_file=args.base.name,
                                                             dtype=torch.float32).eval()
    sparse = hf.convert(base, block_size=BLOCK_SIZE, topk=TOPK)
    captures = attach(sparse, oracle)
    tasks, lengths = args.tasks.split(","), [int(n) for n in args.lengths.split(",")]
    samples = [s for s in ruler.load_suite(args.data)
               if s.task in tasks and s.length in lengths and s.id % 32 < args.per_cell]
    rows = []
    for sample in track(samples, description="samples"):
        span, position = sample.needle_span(), sample.query_position
        row = dict(id=sample.id, task=sample.task, length=sample.length, depth=sample.depth)
        row["oracle"] = ruler.score_sample(lambda ids: sparse(ids).logits, sample)
        selection = torch.stack([capture.blocks[position] for capture in captures])
        hits = evaluate.needle_hits(selection, position, span, block_size=BLOCK_SIZE, topk=TOPK)
        row["oracle"].update({key: hits[key] for key in ("all", "any", "chance_all", "hits_all")})
        row["oracle"].update(needle_mass(captures, position, span))
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(commit=git_commit(), device="cpu", block_size=BLOCK_SIZE, topk=TOPK,
                                        torch=torch.__version__, rows=rows), indent=1))
    print("oracle correct", np.mean([r["oracle"]["correct"] for r in rows]))
    print("oracle needle hits", np.mean([r["oracle"]["all"] for r in rows]),
          "chance", np.mean([r["oracle"]["chance_all"] for r in rows]))


if __name__ == "__main__":
    main()
