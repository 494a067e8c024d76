"""GPU time of every CUDA kernel that the MSA prefill launches, by ``torch.profiler``.

On the paper's layer (bf16, one sequence, random inputs as in ``kernels.py``),
profiles ``select_blocks`` + ``sparse_attention`` through the public ops (bf16
and FP8 index ranking) after a warm-up run, and writes, per length, the total
GPU milliseconds and launch count of each kernel name to
``prefill_breakdown.json`` under ``--out``.

    PYTHONPATH=src python benchmarks/prefill_breakdown.py --out benchmarks/results/<run> --seqlens 131072,524288
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections import defaultdict
from pathlib import Path

import torch
from rich.progress import track
from torch.profiler import ProfilerActivity, profile

import msa
from flops import PAPER_LAYER
from msa.cli.bench import git_commit


def kernel_times(run) -> dict:
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    totals = defaultdict(lambda: {"ms": 0.0, "launches": 0})
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name]["ms"] += event.device_time_total / 1e3
            totals[event.name]["launches"] += 1
    return dict(sorted(totals.items(), key=lambda item: -item[1]["ms"]))


def breakdown(seqlen: int) -> dict:
    c = PAPER_LAYER
    gen = torch.Generator(device="cuda").manual_seed(seqlen)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    q, k, v = randn(1, seqlen, c["heads"], c["head_dim"]), *(randn(1, seqlen, c["groups"], c["head_dim"]) for _ in "kv")
    index_q, index_k = randn(1, seqlen, c["groups"], c["index_dim"]), randn(1, seqlen, 1, c["index_dim"])

    def prefill(index_dtype=None):
        selected = msa.select_blocks(index_q, index_k, block_size=c["block_size"], topk=c["topk"],
                                     index_dtype=index_dtype)
        return msa.sparse_attention(q, k, v, selected, block_size=c["block_size"])

    return {"seqlen": seqlen, "bf16_ranking": kernel_times(prefill),
            "fp8_ranking": kernel_times(lambda: prefill(torch.float8_e4m3fn))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seqlens", default="131072,524288")
    args = parser.parse_args()
    record = {"benchmark": "prefill_breakdown", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "commit": git_commit(), "layer": PAPER_LAYER,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for seqlen in track([int(s) for s in args.seqlens.split(",")], description="prefill breakdown"):
        record["rows"].append(breakdown(seqlen))
        print(json.dumps(record["rows"][-1]), flush=True)
        (args.out / "prefill_breakdown.json").write_text(json.dumps(record, indent=2))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
