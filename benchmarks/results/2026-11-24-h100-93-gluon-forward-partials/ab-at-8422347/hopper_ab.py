"""A/B on the GPU: the KV-outer forward with the Triton partial kernel vs the Gluon Hopper one (two epilogues).

    PYTHONPATH=src python .scratch/g/hopper_ab.py --seqlens 32768,131072 --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from kernels import packed_attention_inputs, time_ms  # noqa: E402
from flops import PAPER_LAYER  # noqa: E402
from msa import kernels  # noqa: E402

VARIANTS = {"triton": dict(HOPPER_FWD=False), "gluon": dict(HOPPER_FWD=True)}


def use(name):
    for attr, value in VARIANTS[name].items():
        setattr(kernels, attr, value)


def kernel_ms(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by_name = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.key[:60]] = round(e.device_time_total / 1e3, 3)
    return dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:4])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", default="32768,131072")
    parser.add_argument("--out", default="/tmp/ab")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    c = PAPER_LAYER
    rows = []
    for seqlen in map(int, args.seqlens.split(",")):
        q, k, v, cu, starts, blocks, _ = packed_attention_inputs(c, seqlen, seed=1)
        bs, scale = c["block_size"], c["head_dim"] ** -0.5

        def fwd():
            return kernels.sparse_attention_fwd(q, k, v, blocks, starts, cu, seqlen, bs, scale, schedule="kv")

        results = {}
        for name in VARIANTS:
            use(name)
            out, lse = fwd()
            torch.cuda.synchronize()
            results[name] = dict(out=out, lse=lse)
        base = results["triton"]
        row = dict(seqlen=seqlen)
        for name, r in results.items():
            diff = (r["out"].float() - base["out"].float())
            row[name] = dict(
                nan=int(torch.isnan(r["out"]).sum()),
                out_rel=float(diff.norm() / base["out"].float().norm()),
                out_max=float(diff.abs().max()),
                lse_max=float((r["lse"] - base["lse"]).abs().max()),
                ms=[])
        del results
        for _ in range(args.rounds):
            for name in VARIANTS:
                use(name)
                row[name]["ms"].append(time_ms(fwd, 2, 5))
        for name in VARIANTS:
            use(name)
            row[name]["median_ms"] = sorted(row[name]["ms"])[len(row[name]["ms"]) // 2]
            row[name]["kernels"] = kernel_ms(fwd)
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "hopper_ab.json").write_text(json.dumps(dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
