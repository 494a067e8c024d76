"""GPU sweep of the KV-outer forward's chunking: partials workspace x entries per list part.

On the paper's layer (bf16, one sequence, selections of ``select_blocks`` on
random index vectors as in ``kernels.py``), times
``kernels.sparse_attention_fwd(schedule="kv")`` for every
(``workspace_bytes``, ``part_entries``) pair of its ``SparseForwardConfig``,
checks each output against the default config's, and writes ``kv_outer_parts_sweep.json`` under
``--out`` after every length.

    PYTHONPATH=src python benchmarks/kv_outer_parts_sweep.py --out benchmarks/results/<run>
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

import torch
from rich.progress import Progress

from kernels import packed_attention_inputs, time_ms
from flops import PAPER_LAYER
from msa import kernels
from msa.cli.bench import git_commit


def sweep_length(seqlen: int, workspaces_gib, part_entries, progress, task) -> dict:
    c = PAPER_LAYER
    q, k, v, cu, starts, blocks, _ = packed_attention_inputs(c, seqlen, seed=seqlen)
    bs, scale = c["block_size"], c["head_dim"] ** -0.5

    def forward(config):
        return kernels.sparse_attention_fwd(q, k, v, blocks, starts, cu, seqlen, bs, scale, schedule="kv",
                                            config=config)[0]

    default = kernels.SparseForwardConfig()
    reference = forward(default)

    def rel_diff(out):  # in slices of tokens: a float32 copy of a 1M-token output would take 32 GB
        diff = ref = 0.0
        for a, b in zip(out.split(65536), reference.split(65536)):
            diff += (a.float() - b.float()).pow(2).sum().item()
            ref += b.float().pow(2).sum().item()
        return (diff / ref) ** 0.5

    row = {"seqlen": seqlen, "default": {"workspace_gib": default.workspace_bytes / 2**30,
                                         "part_entries": default.part_entries}, "ms": {}, "rel_diff": {}}
    for gib in workspaces_gib:
        for entries in part_entries:
            config = dataclasses.replace(default, workspace_bytes=int(gib * 2**30), part_entries=entries)
            key = f"{gib}GiB/{entries}"
            progress.update(task, description=f"S={seqlen} workspace {gib} GiB, {entries} entries per part")
            try:
                row["rel_diff"][key] = rel_diff(forward(config))
                row["ms"][key] = time_ms(lambda: forward(config), 1, 3)
            except torch.OutOfMemoryError as error:  # the workspace beside the inputs and outputs
                row["ms"][key] = str(error).splitlines()[0]
            torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seqlens", default="524288,1048576")
    parser.add_argument("--workspaces-gib", default="4,8,16")
    parser.add_argument("--part-entries", default="8,16,32,64")
    args = parser.parse_args()
    workspaces = [float(x) for x in args.workspaces_gib.split(",")]
    entries = [int(x) for x in args.part_entries.split(",")]
    record = {"benchmark": "kv_outer_parts_sweep", "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "layer": PAPER_LAYER, "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    seqlens = [int(s) for s in args.seqlens.split(",")]
    with Progress() as progress:
        task = progress.add_task("sweep", total=len(seqlens))
        for seqlen in seqlens:
            record["rows"].append(sweep_length(seqlen, workspaces, entries, progress, task))
            print(json.dumps(record["rows"][-1]), flush=True)
            (args.out / "kv_outer_parts_sweep.json").write_text(json.dumps(record, indent=2))
            progress.advance(task)


if __name__ == "__main__":
    main()
