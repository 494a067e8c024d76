"""GPU sweep of the paged decode attention kernel's schedule: tokens per tile x warps x stages x KV splits.

For decode cases of the suite (8 tokens per request, overlapping selections
calibrated as in ``inference.py``: 30.5 distinct blocks per request and group),
times ``kernels.paged_sparse_attention`` alone as CUDA-graph replays over
rotated layers for every configuration, checks each configuration's output
against the default one, and writes ``decode_attention_sweep.json`` under
``--out`` after every case.

    PYTHONPATH=src python benchmarks/decode_attention_sweep.py --out benchmarks/results/<run>
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
from pathlib import Path

import torch
from rich.progress import Progress

from inference import LAYER, distinct_blocks, graph_ms, new_tokens, overlapping_index_q, paged_cache
from msa import kernels
from msa.cli.bench import git_commit
from msa.inference import PagedSparseAttention


def sweep_case(batch: int, seqlen: int, q_len: int, draft_union: float, configs) -> dict:
    c = LAYER
    cache, requests = paged_cache(batch, seqlen - q_len, q_len, max_layers=4, bytes_limit=int(60e9))
    attention = PagedSparseAttention(cache, num_heads=c["heads"], topk=c["topk"])
    attention.plan(requests, [q_len] * batch)
    q, k, v, index_q, index_k = new_tokens(batch * q_len)
    index_q, _ = overlapping_index_q(attention, index_q, batch, q_len, draft_union,
                                     lambda iq: attention.run(0, q, k, v, iq, index_k))
    reference = attention.run(0, q, k, v, index_q, index_k).clone()
    union = distinct_blocks(attention, batch, q_len)
    selected_bytes = union.sum().item() * c["block_size"] * 2 * c["head_dim"] * 2
    block_indices = attention._view("block_indices", (batch * q_len, c["groups"], attention.selected))
    rows = batch * q_len * c["heads"]
    layers = cache.num_layers
    timings = []
    for tokens_per_tile, num_warps, num_stages, split in configs:
        tiles = torch.tensor(attention.work_tiles(tokens_per_tile), dtype=torch.int32, device="cuda")
        out = torch.full_like(q, float("nan"))
        buffers = {} if split == 1 else dict(
            partial_out=torch.empty(rows, split, c["head_dim"], device="cuda"),
            partial_lse=torch.empty(rows, split, device="cuda"), lse=torch.empty(rows, device="cuda"))

        block_lists = torch.empty(kernels.paged_block_lists_numel(len(tiles), c["groups"], tokens_per_tile,
                                                                  attention.selected, split),
                                  dtype=torch.int32, device="cuda")

        def call(layer):
            kernels.paged_sparse_attention(q, cache.k[layer], cache.v[layer], cache.page_table, tiles, block_indices,
                                           block_lists, out, c["head_dim"] ** -0.5, tokens_per_tile, split,
                                           **buffers, config=kernels.PagedAttentionConfig(num_warps, num_stages))

        try:
            call(0)
        except Exception as error:  # noqa: BLE001 - e.g. out of shared memory: record and go on
            timings.append(dict(tokens=tokens_per_tile, warps=num_warps, stages=num_stages, split=split,
                                error=type(error).__name__))
            continue
        relative_error = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
        ms = graph_ms(lambda i: call(i % layers), 2 * layers)
        timings.append(dict(tokens=tokens_per_tile, warps=num_warps, stages=num_stages, split=split, ms=ms,
                            gbps=selected_bytes / ms / 1e6, relative_error=relative_error))
    return dict(batch=batch, seqlen=seqlen, q_len=q_len, distinct_blocks=union.float().mean().item(),
                default_split=attention.split, timings=timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default="8x131072,8x200000,32x200000,128x200000", help="BATCHxSEQLEN,...")
    parser.add_argument("--tokens", default="1,2,4,8")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--splits", default="1,2,4,8", help="KV splits tried for batches below 32 (else 1, 2)")
    parser.add_argument("--draft-union", type=float, default=30.5)
    args = parser.parse_args()

    def ints(text):
        return [int(x) for x in text.split(",")]

    cases = [tuple(int(x) for x in case.split("x")) for case in args.cases.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "decode_attention_sweep.json"
    record = dict(benchmark="paged decode attention sweep", device=torch.cuda.get_device_name(),
                  torch=torch.__version__, commit=git_commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), layer=LAYER,
                  draft_union=args.draft_union, cases=[])
    with Progress() as progress:
        task = progress.add_task("sweep", total=len(cases))
        for batch, seqlen in cases:
            progress.update(task, description=f"B={batch} S={seqlen}")
            splits = ints(args.splits) if batch < 32 else [1, 2]
            configs = list(itertools.product(ints(args.tokens), ints(args.warps), ints(args.stages), splits))
            row = sweep_case(batch, seqlen, 8, args.draft_union, configs)
            record["cases"].append(row)
            path.write_text(json.dumps(record, indent=2))
            best = min((t for t in row["timings"] if "ms" in t), key=lambda t: t["ms"])
            progress.console.print(f"B={batch} S={seqlen}: best {best}")
            torch.cuda.empty_cache()
            progress.advance(task)


if __name__ == "__main__":
    main()
