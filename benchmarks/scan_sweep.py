"""GPU sweep of the paged index scan's launch shape: tokens per tile x pages per program x pages per product x
warps x pipeline stages.

For decode cases (8 new tokens per request over a bf16 or FP8 index-key cache),
times ``kernels.paged_block_scores`` alone as CUDA-graph replays over rotated
layers (cold L2, as ``inference.py`` times it) for every configuration, checks
that each configuration's page scores equal the default one's, and writes
``scan_sweep.json`` under ``--out`` after every case, with the copy bandwidth
measured in the same run.

    PYTHONPATH=src python benchmarks/scan_sweep.py --out benchmarks/results/<run>
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
from pathlib import Path

import torch
from rich.progress import Progress

from inference import LAYER, copy_gbps, graph_ms, index_key_bytes, new_tokens, paged_cache
from msa import kernels
from msa.cli.bench import git_commit
from msa.fp8 import FP8_DTYPE
from msa.inference import PagedSparseAttention


def sweep_case(batch: int, seqlen: int, q_len: int, configs, index_dtype=None) -> dict:
    c = LAYER
    cache, requests = paged_cache(batch, seqlen - q_len, q_len, max_layers=4, bytes_limit=int(60e9),
                                  index_dtype=index_dtype)
    attention = PagedSparseAttention(cache, num_heads=c["heads"], topk=c["topk"])
    attention.plan(requests, [q_len] * batch)
    index_q = new_tokens(batch * q_len)[3]
    layers = cache.num_layers
    n_rows = batch * q_len * c["groups"]

    def scan(tokens_per_tile, config, scores, tiles, layer):  # config: None (the default) or a PagedScanConfig
        kernels.paged_block_scores(index_q, cache.index_k[layer], cache.page_table, tiles, scores, 0,
                                   tokens_per_tile, None if index_dtype is None else cache.index_scale[layer],
                                   config=config)

    def tiles_of(tokens_per_tile):
        return torch.tensor(attention.work_tiles(tokens_per_tile), dtype=torch.int32, device="cuda")

    reference = torch.empty(n_rows, cache.max_pages_per_request, device="cuda")
    default_tiles = tiles_of(kernels.PAGED_SCAN_TOKENS)
    default = kernels.paged_scan_config(index_dtype is not None, len(default_tiles), cache.page_table.shape[1],
                                        default_tiles.device)
    scan(kernels.PAGED_SCAN_TOKENS, None, reference, default_tiles, 0)
    scan_bytes = batch * seqlen * index_key_bytes(index_dtype)
    timings = []
    for tokens_per_tile, *shape in configs:
        tiles, scores = tiles_of(tokens_per_tile), torch.full_like(reference, float("nan"))
        entry = dict(tokens=tokens_per_tile, pages=shape[0], pages_per_product=shape[1], warps=shape[2],
                     stages=shape[3])
        config = kernels.PagedScanConfig(*shape)
        try:
            scan(tokens_per_tile, config, scores, tiles, 0)
        except Exception as error:  # noqa: BLE001 - e.g. out of shared memory: record and go on
            timings.append(dict(entry, error=type(error).__name__))
            continue
        equal = bool(torch.equal(scores, reference))  # layer 0's scores, before the timed calls rotate layers
        ms = graph_ms(lambda i: scan(tokens_per_tile, config, scores, tiles, i % layers), 2 * layers)
        timings.append(dict(entry, ms=ms, gbps=scan_bytes / ms / 1e6, equal=equal))
    return dict(batch=batch, seqlen=seqlen, q_len=q_len, layers_rotated=layers,
                default=list(dataclasses.astuple(default)), default_tokens=kernels.PAGED_SCAN_TOKENS, timings=timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default="8x131072,8x200000,32x200000,128x200000,2x1048576",
                        help="BATCHxSEQLEN,...")
    parser.add_argument("--tokens", default="8,16")
    parser.add_argument("--pages", default="16,32,64")
    parser.add_argument("--pages-per-product", default="1,2")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2,3,4")
    parser.add_argument("--index-dtype", choices=["bf16", "fp8"], default="bf16")
    args = parser.parse_args()
    index_dtype = FP8_DTYPE if args.index_dtype == "fp8" else None

    def ints(text):
        return [int(x) for x in text.split(",")]

    configs = list(itertools.product(ints(args.tokens), ints(args.pages), ints(args.pages_per_product),
                                     ints(args.warps), ints(args.stages)))
    cases = [tuple(int(x) for x in case.split("x")) for case in args.cases.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scan_sweep.json"
    record = dict(benchmark="paged index scan sweep", device=torch.cuda.get_device_name(), torch=torch.__version__,
                  commit=git_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  layer=LAYER, index_dtype=args.index_dtype, copy_gbps=copy_gbps(), cases=[])
    with Progress() as progress:
        task = progress.add_task("sweep", total=len(cases))
        for batch, seqlen in cases:
            progress.update(task, description=f"B={batch} S={seqlen}")
            row = sweep_case(batch, seqlen, 8, configs, index_dtype)
            record["cases"].append(row)
            path.write_text(json.dumps(record, indent=2))
            ranked = sorted((t for t in row["timings"] if "ms" in t), key=lambda t: t["ms"])
            for t in ranked[:5]:
                progress.console.print(f"B={batch} S={seqlen}: {t}")
            torch.cuda.empty_cache()
            progress.advance(task)


if __name__ == "__main__":
    main()
