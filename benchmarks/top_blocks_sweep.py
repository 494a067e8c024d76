"""GPU sweep of the indexer's Top-k phase (``top_blocks_kernel``): rows per program x warps.

For a chunk of query positions at the end of a long sequence (the paper's
layer: G=4, block 128, topk 16), fills a block-score workspace with random
scores and times the default launch (``kernels.top_blocks``), then with and
without narrowing rows to their candidates (``narrowed``, ``rounds``: argmax
rounds over all blocks) at each (rows, num_warps), checking every output
against the default's. Writes ``top_blocks_sweep.json`` under ``--out``.

    PYTHONPATH=src python benchmarks/top_blocks_sweep.py --out benchmarks/results/<run>
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

import torch

from kernels import time_ms
from msa import kernels
from msa.cli.bench import git_commit

GROUPS, BLOCK, TOPK = 4, 128, 16


def sweep(seqlen: int, positions: int, rows_options: list[int], warps_options: list[int]) -> dict:
    first = seqlen - positions
    n_blocks = (seqlen - 1) // BLOCK
    cu_seqlens = torch.tensor([0, seqlen], dtype=torch.int32, device="cuda")
    scores = torch.randn(1, positions, GROUPS, n_blocks, device="cuda")
    reference = torch.full((seqlen, GROUPS, TOPK), -7, dtype=torch.int32, device="cuda")
    kernels.top_blocks(scores, cu_seqlens, reference, first, positions, n_blocks, BLOCK)
    row = {"seqlen": seqlen, "positions": positions, "n_blocks": n_blocks, "ms": {}}

    def timed(config=None):
        out = torch.full_like(reference, -7)
        kernels.top_blocks(scores, cu_seqlens, out, first, positions, n_blocks, BLOCK, config)
        if not torch.equal(out, reference):
            return "output differs"
        return time_ms(lambda: kernels.top_blocks(scores, cu_seqlens, out, first, positions, n_blocks, BLOCK,
                                                  config), 2, 10)

    row["default_ms"] = timed()
    schedules = {"narrowed": kernels.top_blocks_config(n_blocks, TOPK, narrow_from=1),
                 "rounds": kernels.top_blocks_config(n_blocks, TOPK, narrow_from=2**62)}
    for schedule, config in schedules.items():
        row[f"{schedule}_ms"] = timed(config)
        for rows in rows_options:
            for warps in warps_options:
                row["ms"][f"{schedule}, rows {rows}, warps {warps}"] = timed(
                    dataclasses.replace(config, rows=rows, num_warps=warps))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seqlens", default="131072,524288,1048576")
    parser.add_argument("--positions", type=int, default=16384, help="query positions in the chunk")
    parser.add_argument("--rows", default="1,2,4", help="rows per program to time")
    parser.add_argument("--warps", default="1,2,4,8", help="num_warps to time")
    args = parser.parse_args()
    record = {"benchmark": "top_blocks_sweep", "device": torch.cuda.get_device_name(), "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for seqlen in (int(s) for s in args.seqlens.split(",")):
        record["rows"].append(sweep(seqlen, args.positions, [int(r) for r in args.rows.split(",")],
                                    [int(w) for w in args.warps.split(",")]))
        print(json.dumps(record["rows"][-1]), flush=True)
        (args.out / "top_blocks_sweep.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
