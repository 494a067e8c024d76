"""Why the equivalence check's top-1 agreement fell short on the GPU (PROTOCOL.md, Deviations 2), on a CPU.

The base model (the GGUF, float32) on held-out windows of ``--length`` tokens:
MSA with every block selected (``block_size`` x ``length / block_size``)
against dense attention, both in float32 (the definition: they must agree to
rounding), and dense attention under bf16 autocast against float32 (how far
bf16 alone moves the logits). Writes one JSON.

    python experiments/smollm2/equivalence_cpu.py --data DATA --base GGUF --out FILE.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
import transformers

from msa.cli.bench import git_commit
from msa.integrations import hf


@torch.no_grad()
def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return dict(top1_agreement=(a.argmax(-1) == b.argmax(-1)).double().mean().item(),
                max_abs_logit_diff=(a - b).abs().max().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--windows", type=int, default=2, help="per domain")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dense = transformers.AutoModelForCausalLM.from_pretrained(args.base.parent, gguf_file=args.base.name,
                                                              dtype=torch.float32).eval()
    every_block = hf.convert(copy.deepcopy(dense), block_size=args.block_size, topk=args.length // args.block_size)
    rows = []
    for domain in ("code", "prose"):
        for window in np.load(args.data / f"heldout_{domain}.npy")[:args.windows, :args.length]:
            ids = torch.as_tensor(window, dtype=torch.long)[None]
            with torch.no_grad():
                reference = dense(ids).logits.float()
                msa = every_block(ids).logits.float()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    dense_bf16 = dense(ids).logits.float()
            rows.append(dict(domain=domain, msa_fp32_vs_dense_fp32=compare(msa, reference),
                             dense_bf16_vs_dense_fp32=compare(dense_bf16, reference)))
            print(rows[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(commit=git_commit(), device="cpu (2 cores)", length=args.length,
                                        block_size=args.block_size, torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
