"""GPU A/B of the KV-outer forward's partials: the Triton kernel against the Gluon Hopper one.

On the paper's layer (bf16, one sequence, selections of ``select_blocks`` on
random index vectors as in ``kernels.py``), runs
``kernels.sparse_attention_fwd(schedule="kv")`` with ``SparseForwardConfig.hopper``
off (``triton``) and on (``gluon``; sm_90 only, elsewhere both variants run the
Triton kernel), compares each output and LSE with the Triton one's, times the
whole forward in interleaved rounds and takes the GPU time of its kernels under
``torch.profiler``. Writes ``hopper_ab.json`` under ``--out``.

    PYTHONPATH=src python benchmarks/hopper_ab.py --out benchmarks/results/<run> --seqlens 32768,131072
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from kernels import packed_attention_inputs, time_ms
from flops import PAPER_LAYER
from msa import kernels
from msa.cli.bench import git_commit

VARIANTS = {"triton": False, "gluon": True}  # the forward config's ``hopper``


def kernel_ms(forward) -> dict:
    """GPU ms of the four costliest kernels of one call, by name (cut to 60 characters)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        forward()
        torch.cuda.synchronize()
    by_name = {event.key[:60]: round(event.device_time_total / 1e3, 3) for event in profile.key_averages()
               if event.device_type == torch.autograd.DeviceType.CUDA}
    return dict(sorted(by_name.items(), key=lambda item: -item[1])[:4])


def compare_length(seqlen: int, rounds: int) -> dict:
    c = PAPER_LAYER
    q, k, v, cu, starts, blocks, _ = packed_attention_inputs(c, seqlen, seed=1)

    def forward(hopper: bool):
        return kernels.sparse_attention_fwd(q, k, v, blocks, starts, cu, seqlen, c["block_size"],
                                            c["head_dim"] ** -0.5, schedule="kv",
                                            config=kernels.SparseForwardConfig(hopper=hopper))

    outputs = {}
    for name, hopper in VARIANTS.items():
        outputs[name] = forward(hopper)
    torch.cuda.synchronize()
    base_out, base_lse = outputs["triton"]
    row = {"seqlen": seqlen}
    for name, (out, lse) in outputs.items():
        diff = out.float() - base_out.float()
        row[name] = {"nan": int(torch.isnan(out).sum()), "out_rel": float(diff.norm() / base_out.float().norm()),
                     "out_max": float(diff.abs().max()), "lse_max": float((lse - base_lse).abs().max()), "ms": []}
    del outputs, base_out, base_lse
    for _ in range(rounds):
        for name, hopper in VARIANTS.items():
            row[name]["ms"].append(time_ms(lambda: forward(hopper), 2, 5))
    for name, hopper in VARIANTS.items():
        row[name]["median_ms"] = sorted(row[name]["ms"])[len(row[name]["ms"]) // 2]
        row[name]["kernels"] = kernel_ms(lambda: forward(hopper))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seqlens", default="32768,131072")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the median is reported")
    args = parser.parse_args()
    record = {"benchmark": "hopper_ab", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "layer": PAPER_LAYER, "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for seqlen in (int(s) for s in args.seqlens.split(",")):
        record["rows"].append(compare_length(seqlen, args.rounds))
        print(json.dumps(record["rows"][-1]), flush=True)
        (args.out / "hopper_ab.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
