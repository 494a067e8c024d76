"""Sweep: the KV-outer forward (main tree's kernel) per (rows, warps, stages) x entries per list part."""

from __future__ import annotations

import json
import sys

import torch

sys.path.insert(0, "benchmarks")
from kernels import packed_attention_inputs, time_ms  # noqa: E402
from flops import PAPER_LAYER  # noqa: E402
from msa import kernels  # noqa: E402


def main():
    c = PAPER_LAYER
    out_path = sys.argv[1]
    record = {"rows": []}
    for seqlen in (131072, 524288):
        q, k, v, cu, starts, blocks, _ = packed_attention_inputs(c, seqlen, seed=seqlen)
        bs, scale = c["block_size"], c["head_dim"] ** -0.5

        def fwd():
            return kernels.sparse_attention_fwd(q, k, v, blocks, starts, cu, seqlen, bs, scale, schedule="kv")[0]

        reference = fwd().clone()
        defaults = kernels.KV_OUTER_FWD, kernels.KV_OUTER_PART_ENTRIES
        row = {"seqlen": seqlen, "ms": {}, "max_abs_diff": {}}
        for config in [(64, 4, 1), (64, 4, 2), (64, 4, 3), (128, 8, 1), (128, 8, 2), (32, 4, 1), (32, 4, 2)]:
            for entries in (64, 128):
                if seqlen > 131072 and config[0] == 32:
                    continue
                kernels.KV_OUTER_FWD, kernels.KV_OUTER_PART_ENTRIES = config, entries
                key = f"{config}/{entries}"
                try:
                    row["max_abs_diff"][key] = (fwd().float() - reference.float()).abs().max().item()
                    row["ms"][key] = time_ms(fwd, 2, 5)
                except Exception as error:
                    row["ms"][key] = str(error).splitlines()[0][:150]
                print(seqlen, key, row["ms"][key], flush=True)
        kernels.KV_OUTER_FWD, kernels.KV_OUTER_PART_ENTRIES = defaults
        record["rows"].append(row)
        with open(out_path, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
