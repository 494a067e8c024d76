"""GPU benchmark of msa.inference on the paper's layer: the decode suite and the production prefill workload.

Decode (``workloads/decode_suite.json``): every request decodes 8
query tokens (1 main + 7 drafts) over its paged cache. MSA = one
``PagedSparseAttention.run`` (cache append, index scan, Top-k, sparse
attention); dense = SDPA over the same K/V pages (the pages of a request are
contiguous here, so SDPA reads them in place), the GQA heads folded into the
query length (so each K/V head is read once), cuDNN, FlashAttention-2 and
memory-efficient backends tried and the fastest kept. Both are timed as CUDA
graphs of several calls that rotate over layers (cold L2), 5 warm-up and 20
timed replays, median per call. The index scan alone is timed the same way and
compared with the device copy bandwidth measured in the same run.

Prefill (``workloads/prefill_production_b1.csv``): ``query_len``
new tokens after ``prefix_len`` cached ones through ``run`` (one plan per
row), against SDPA with a lower-right causal mask over contiguous K/V.

All requests of a decode case hold the nominal length (the published suite
varies lengths around it keeping the mean; the cost of both sides is linear
in the total). Writes ``inference.json`` under ``--out``.

Selections: with random index queries the 8 tokens of a request select
independent blocks (``--selections independent``, the default: the worst case
for MSA's traffic). In a trained model consecutive tokens mostly select the
same blocks: ``--selections overlapping`` mixes each request's 8 index queries
with one shared query, the mix calibrated so that the 8 tokens select
``--draft-union`` distinct blocks per group on average (default: 30.5 of 128,
what the trained 128 x 16 model of experiments/quality selects; see its
results table). ``--attention-tokens`` forces the attention tile (1: each
token reads its own blocks; 8: a request's tokens load each block of their
union once; default: ``PagedSparseAttention``'s choice, recorded per case).

    PYTHONPATH=src python benchmarks/inference.py --out benchmarks/results/<run>
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from msa import kernels
from msa.cli.bench import git_commit
from msa.fp8 import FP8_DTYPE, quantize_rows
from msa.inference import PagedKVCache, PagedSparseAttention

LAYER = dict(heads=64, groups=4, head_dim=128, index_dim=128, block_size=128, topk=16)
WORKLOADS = Path(__file__).resolve().parent / "workloads"  # copies of shared/workloads (see its README)
LONG_CASES = [(8, 131072), (4, 524288), (2, 1048576)]  # beyond the suite: the paper's long-context regime
DENSE_BACKENDS = {"cuDNN": SDPBackend.CUDNN_ATTENTION, "FlashAttention-2": SDPBackend.FLASH_ATTENTION,
                  "memory-efficient": SDPBackend.EFFICIENT_ATTENTION}
COLD_BYTES = 512 << 20  # rotate over enough layers that one call's data is not in L2 from the previous one


def graph_ms(step, n_calls: int, warmup: int = 5, timed: int = 20) -> float:
    """Median ms per call of ``step(i)``, i = 0 .. n_calls - 1, captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(n_calls):
            step(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_calls):
            step(i)
    for _ in range(warmup):
        graph.replay()
    samples = []
    for _ in range(timed):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / n_calls)
    del graph
    return sorted(samples)[len(samples) // 2]


def copy_gbps() -> float:
    """Device copy bandwidth (bytes read + written per second) of a 2 GiB buffer."""
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = graph_ms(lambda i: dst.copy_(src), 4)
    return 2 * src.numel() * 2 / ms / 1e6


def index_key_bytes(index_dtype) -> int:
    """Bytes the index scan reads per cached token."""
    return LAYER["index_dim"] + 4 if index_dtype == FP8_DTYPE else 2 * LAYER["index_dim"]


def paged_cache(batch: int, prefix_len: int, new_tokens: int, max_layers: int, bytes_limit: int,
                index_dtype=None):
    """A cache whose ``batch`` requests hold ``prefix_len`` random tokens, with room for ``new_tokens`` more."""
    c = LAYER
    pages = math.ceil((prefix_len + new_tokens) / c["block_size"])
    per_token = 2 * c["groups"] * c["head_dim"] * 2 + index_key_bytes(index_dtype)
    per_layer = batch * pages * c["block_size"] * per_token
    if per_layer > bytes_limit:
        return None
    layers = max(1, min(max_layers, math.ceil(COLD_BYTES / per_layer), bytes_limit // per_layer))
    cache = PagedKVCache(num_layers=layers, num_pages=batch * pages, block_size=c["block_size"],
                         num_kv_heads=c["groups"], head_dim=c["head_dim"], index_head_dim=c["index_dim"],
                         max_requests=batch, max_pages_per_request=pages, dtype=torch.bfloat16,
                         index_dtype=index_dtype, device="cuda")
    for pool in (cache.k, cache.v):
        pool.normal_()
    if cache.index_scale is None:
        cache.index_k.normal_()
    else:  # FP8 keys: random bf16 keys rounded, a few thousand pages at a time
        keys, scales = cache.index_k.flatten(0, 1), cache.index_scale.flatten(0, 1)
        for first in range(0, keys.shape[0], 4096):
            chunk = keys[first:first + 4096]
            values, scale = quantize_rows(torch.randn(chunk.shape, dtype=torch.bfloat16, device="cuda"))
            chunk.view(torch.uint8).copy_(values.view(torch.uint8))
            scales[first:first + 4096] = scale
    # pages allocated at admission, request after request: each request's pages are contiguous
    requests = [cache.add_request(capacity=prefix_len + new_tokens) for _ in range(batch)]
    for request in requests:
        cache.reserve(request, prefix_len)
    return cache, requests


def new_tokens(n: int):
    c = LAYER
    shapes = ((c["heads"], c["head_dim"]), (c["groups"], c["head_dim"]), (c["groups"], c["head_dim"]),
              (c["groups"], c["index_dim"]), (c["index_dim"],))
    return [torch.randn(n, *shape, device="cuda", dtype=torch.bfloat16) for shape in shapes]


def fastest_dense(call) -> tuple[float, str]:
    """(ms, backend) of the fastest SDPA backend that accepts ``call``."""
    best = (math.inf, "none")
    for name, backend in DENSE_BACKENDS.items():
        try:
            with sdpa_kernel([backend]):
                best = min(best, (call(), name))
        except RuntimeError:  # this backend does not take these shapes or layouts
            torch.cuda.synchronize()
    return best


def distinct_blocks(attention: PagedSparseAttention, batch: int, q_len: int) -> torch.Tensor:
    """Distinct blocks the ``q_len`` tokens of each request select, per (request, group): ``[batch, G]``."""
    groups, selected = attention.cache.num_kv_heads, attention.selected
    blocks = attention._view("block_indices", (batch, q_len, groups, selected))
    blocks = blocks.transpose(1, 2).flatten(2).sort(-1).values
    return (blocks[..., 1:] != blocks[..., :-1]).sum(-1) + 1


def overlapping_index_q(attention, index_q, batch: int, q_len: int, target: float, run) -> tuple[torch.Tensor, float]:
    """Index queries whose tokens share one query in part, so that they select ``target`` distinct blocks per
    (request, group) on average: ``(shared + spread * own) / sqrt(1 + spread^2)``, spread found by bisection."""
    own = index_q.view(batch, q_len, *index_q.shape[1:])
    shared = torch.randn_like(own[:, :1])

    def mixed(spread):
        return ((shared + spread * own) / math.sqrt(1 + spread**2)).reshape_as(index_q)

    low, high = 0.0, 4.0
    for _ in range(16):
        spread = (low + high) / 2
        run(mixed(spread))
        union = distinct_blocks(attention, batch, q_len).float().mean().item()
        low, high = (spread, high) if union < target else (low, spread)
    return mixed((low + high) / 2), (low + high) / 2


def decode_case(batch: int, seqlen: int, q_len: int, bytes_limit: int, draft_union: float | None,
                index_dtype=None, kv_splits: int | None = None, attention_tokens: int | None = None) -> dict | None:
    c = LAYER
    made = paged_cache(batch, seqlen - q_len, q_len, max_layers=4, bytes_limit=bytes_limit, index_dtype=index_dtype)
    if made is None:
        return None
    cache, requests = made
    attention = PagedSparseAttention(cache, num_heads=c["heads"], topk=c["topk"], kv_splits=kv_splits,
                                     attention_tokens=attention_tokens)
    attention.plan(requests, [q_len] * batch)
    q, k, v, index_q, index_k = new_tokens(batch * q_len)
    spread = None
    if draft_union is not None:
        index_q, spread = overlapping_index_q(attention, index_q, batch, q_len, draft_union,
                                              lambda iq: attention.run(0, q, k, v, iq, index_k))
    layers = cache.num_layers
    msa_ms = graph_ms(lambda i: attention.run(i % layers, q, k, v, index_q, index_k), 2 * layers)

    # the parts of one call, each timed alone the same way
    scan_tiles = attention._view("scan_tiles", (attention.n_scan_tiles, 4))
    _, _, first_token, tokens = attention.chunks[0]
    groups, selected = c["groups"], attention.selected
    scores = attention._view("scores", (tokens * groups, cache.max_pages_per_request))
    block_indices = attention._view("block_indices", (tokens, groups, selected))
    scales = cache.index_scale  # None for a bf16 index-key cache
    scan_ms = graph_ms(lambda i: kernels.paged_block_scores(
        index_q, cache.index_k[i % layers], cache.page_table, scan_tiles, scores, first_token, attention.scan_tokens,
        None if scales is None else scales[i % layers]), 2 * layers)
    candidates = attention._view("top_candidates", (attention.candidates_numel,))
    topk_ms = graph_ms(lambda i: kernels.top_pages(scores, block_indices.view(-1, selected), candidates), 2 * layers)
    out = attention._view("out", (batch * q_len, c["heads"], c["head_dim"]))
    attention_tiles = attention._view("attention_tiles", (attention.n_attention_tiles, 4))
    block_lists = attention._view("block_lists", (attention.block_lists_numel,))
    attention_ms = graph_ms(lambda i: kernels.paged_sparse_attention(
        q, cache.k[i % layers], cache.v[i % layers], cache.page_table, attention_tiles, block_indices, block_lists,
        out, c["head_dim"] ** -0.5, attention.attention_tokens, attention.split, **attention.split_buffers()),
        2 * layers)
    scan_bytes = batch * seqlen * index_key_bytes(index_dtype)
    attention.run(0, q, k, v, index_q, index_k)
    union = distinct_blocks(attention, batch, q_len)
    # K/V bytes of the selected blocks, each block counted once per (request, group) that selected it
    selected_bytes = union.sum().item() * c["block_size"] * 2 * c["head_dim"] * 2

    # dense: the same pages as [B, G, S, D] views, query heads folded into the query length
    pages = cache.max_pages_per_request
    per_group = c["heads"] // c["groups"]
    dense_q = q.view(batch, q_len, c["groups"], per_group, c["head_dim"]).permute(0, 2, 1, 3, 4) \
        .reshape(batch, c["groups"], q_len * per_group, c["head_dim"])

    def kv(pool, layer):
        return pool[layer][: batch * pages].view(batch, pages * c["block_size"], c["groups"], c["head_dim"])[
            :, :seqlen].transpose(1, 2)

    dense_ms, dense_backend = fastest_dense(lambda: graph_ms(
        lambda i: F.scaled_dot_product_attention(dense_q, kv(cache.k, i % layers), kv(cache.v, i % layers)),
        2 * layers))
    return dict(batch=batch, seqlen=seqlen, q_len=q_len, msa_ms=msa_ms, dense_ms=dense_ms,
                dense_backend=dense_backend, speedup=dense_ms / msa_ms, scan_ms=scan_ms, topk_ms=topk_ms,
                attention_ms=attention_ms, scan_gbps=scan_bytes / scan_ms / 1e6,
                attention_gbps=selected_bytes / attention_ms / 1e6,
                dense_bytes=2 * batch * seqlen * groups * c["head_dim"] * 2,
                msa_bytes=scan_bytes + selected_bytes, kv_splits=attention.split,
                attention_tokens=attention.attention_tokens, layers_rotated=layers,
                distinct_blocks=union.float().mean().item(), index_q_spread=spread)


def prefill_case(query_len: int, prefix_len: int, bytes_limit: int) -> dict:
    c = LAYER
    cache, requests = paged_cache(1, prefix_len, query_len, max_layers=2, bytes_limit=bytes_limit)
    attention = PagedSparseAttention(cache, num_heads=c["heads"], topk=c["topk"])
    attention.plan(requests, [query_len])
    q, k, v, index_q, index_k = new_tokens(query_len)
    layers = cache.num_layers
    msa_ms = graph_ms(lambda i: attention.run(i % layers, q, k, v, index_q, index_k), 2 * layers)

    seqlen = prefix_len + query_len
    dense_q = q.transpose(0, 1)[None]
    dense_k, dense_v = (torch.randn(1, c["heads"], seqlen, c["head_dim"], device="cuda", dtype=torch.bfloat16)
                        for _ in range(2))  # K/V already expanded to the query heads (not timed)
    mask = causal_lower_right(query_len, seqlen)
    dense_ms, dense_backend = fastest_dense(lambda: graph_ms(
        lambda i: F.scaled_dot_product_attention(dense_q, dense_k, dense_v, attn_mask=mask), 2))
    return dict(query_len=query_len, prefix_len=prefix_len, msa_ms=msa_ms, dense_ms=dense_ms,
                dense_backend=dense_backend, speedup=dense_ms / msa_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="decode,low_latency,long,prefill")
    parser.add_argument("--memory-gb", type=float, default=60.0, help="largest KV cache to build (GB)")
    parser.add_argument("--prefill-cases", default=None, help="comma-separated case_ids (default: every row)")
    parser.add_argument("--min-seqlen", type=int, default=0, help="decode: only cases at least this long")
    parser.add_argument("--selections", choices=["independent", "overlapping"], default="independent",
                        help="how the 8 tokens of a decode request select their blocks (see above)")
    parser.add_argument("--draft-union", type=float, default=30.5,
                        help="overlapping: distinct blocks the 8 tokens select per group, on average")
    parser.add_argument("--attention-tokens", type=int, default=None,
                        help="tokens per sparse-attention tile (default: PagedSparseAttention's choice)")
    parser.add_argument("--kv-splits", type=int, default=None,
                        help="decode: parts of each tile's blocks (default: PagedSparseAttention's choice)")
    parser.add_argument("--index-dtype", choices=["bf16", "fp8"], default="bf16",
                        help="decode: the index-key cache's dtype (fp8: msa.fp8; K and V stay bf16)")
    args = parser.parse_args()
    index_dtype = FP8_DTYPE if args.index_dtype == "fp8" else None
    draft_union = args.draft_union if args.selections == "overlapping" else None
    parts = args.parts.split(",")
    console = Console()
    suite = json.loads((WORKLOADS / "decode_suite.json").read_text())
    q_len = suite["queries_per_request"]
    cases = []
    if "decode" in parts:
        cases += [("decode", b, n) for b in suite["batch_sizes"] for n in suite["nominal_seq_lens"]]
    if "low_latency" in parts:
        low = suite["low_latency"]
        cases += [("low_latency", b, n) for b in low["batch_sizes"] for n in low["seq_lens"]]
    if "long" in parts:
        cases += [("long", b, n) for b, n in LONG_CASES]
    cases = [case for case in cases if case[2] >= args.min_seqlen]
    with (WORKLOADS / "prefill_production_b1.csv").open() as f:
        prefill_rows = list(csv.DictReader(f)) if "prefill" in parts else []
    if args.prefill_cases:
        prefill_rows = [row for row in prefill_rows if row["case_id"] in args.prefill_cases.split(",")]

    limit = int(args.memory_gb * 1e9)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "inference.json"
    record = dict(benchmark="msa inference", device=torch.cuda.get_device_name(), torch=torch.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  commit=git_commit(), layer=LAYER, selections=args.selections, draft_union=draft_union,
                  attention_tokens=args.attention_tokens, index_dtype=args.index_dtype, copy_gbps=copy_gbps(),
                  decode=[], prefill=[], skipped=[])
    torch.cuda.empty_cache()
    console.print(f"copy bandwidth {record['copy_gbps']:.0f} GB/s")
    with Progress(console=console) as progress:
        task = progress.add_task("inference", total=len(cases) + len(prefill_rows))
        for suite_name, batch, seqlen in cases:
            progress.update(task, description=f"{suite_name} B={batch} S={seqlen}")
            row = decode_case(batch, seqlen, q_len, limit, draft_union, index_dtype, args.kv_splits,
                              args.attention_tokens)
            if row is None:
                record["skipped"].append(dict(suite=suite_name, batch=batch, seqlen=seqlen, why="cache > --memory-gb"))
            else:
                record["decode"].append(dict(row, suite=suite_name))
                console.print(f"{suite_name} B={batch} S={seqlen}: MSA {row['msa_ms']:.3f} ms, dense "
                              f"{row['dense_ms']:.3f} ms ({row['dense_backend']}) = {row['speedup']:.2f}x; scan "
                              f"{row['scan_ms']:.3f} ms ({row['scan_gbps']:.0f} GB/s), top-k {row['topk_ms']:.3f}, "
                              f"attention {row['attention_ms']:.3f} ms ({row['attention_gbps']:.0f} GB/s)")
            torch.cuda.empty_cache()
            path.write_text(json.dumps(record, indent=2))  # after every case: a cut-off run keeps its rows
            progress.advance(task)
        for csv_row in prefill_rows:
            query_len, prefix_len = int(csv_row["query_len"]), int(csv_row["prefix_len"])
            progress.update(task, description=f"prefill {query_len} after {prefix_len}")
            row = dict(prefill_case(query_len, prefix_len, limit), case_id=csv_row["case_id"], tag=csv_row["tag"],
                       weight=int(csv_row["weight"]))
            record["prefill"].append(row)
            torch.cuda.empty_cache()
            path.write_text(json.dumps(record, indent=2))
            progress.advance(task)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
