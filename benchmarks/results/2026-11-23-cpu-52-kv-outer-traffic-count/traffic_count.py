"""Bytes the KV-outer sparse forward moves on the paper's layer, with 8 list parts and with `_list_parts`,
fitted to the forward times of run 45; writes traffic_count.json beside this file. CPU only (no timing):
    PYTHONPATH=src python benchmarks/results/2026-11-23-cpu-52-kv-outer-traffic-count/traffic_count.py

Per (token, group, slot) entry: the 16 q rows read (4 KB), the bf16 partial written and read back by the merge
(4 + 4 KB). Per list part: the block's K and V (64 KB). Queries run in chunks of WORKSPACE_BYTES of partials; a
chunk reaches the blocks before cdiv(end, block_size).
"""

import json
import math
from pathlib import Path

from msa import kernels

HERE = Path(__file__).resolve().parent
HEADS, GROUPS, HEAD_DIM, BLOCK, TOPK = 64, 4, 128, 128, 16
KV_PART = 2 * BLOCK * HEAD_DIM * 2
ENTRY = 3 * (HEADS // GROUPS) * HEAD_DIM * 2


def kv_bytes(seqlen: int, parts) -> int:
    chunk = min(seqlen, kernels.WORKSPACE_BYTES // (HEADS * TOPK * (4 + HEAD_DIM * 2)))
    total = 0
    for start in range(0, seqlen, chunk):
        end = min(seqlen, start + chunk)
        reach = min(seqlen // BLOCK, math.ceil(end / BLOCK))
        total += reach * GROUPS * parts(end - start, reach) * KV_PART
    return total


run45 = json.loads((HERE.parent / "2026-11-23-h100-45-final-128k-1m-two-phase" / "kernels.json").read_text())
rows = []
for row in run45["rows"]:
    seqlen, measured = row["seqlen"], row["kernel_ms"]["sparse_fwd_kv"]
    entries = seqlen * GROUPS * TOPK * ENTRY
    before = kv_bytes(seqlen, lambda tokens, reach: kernels.KV_OUTER_SPLIT)
    after = kv_bytes(seqlen, lambda tokens, reach: kernels._list_parts(tokens, TOPK, reach))
    bandwidth = (entries + before) / (measured / 1e3)
    forward_ms = (entries + after) / bandwidth * 1e3
    prefill_ms = row["msa_prefill_ms"] - measured + forward_ms
    rows.append(dict(seqlen=seqlen, entry_gb=entries / 1e9, kv_gb_8_parts=before / 1e9, kv_gb_list_parts=after / 1e9,
                     measured_forward_ms=measured, effective_tb_s=bandwidth / 1e12,
                     predicted_forward_ms=forward_ms, predicted_prefill_ms=prefill_ms,
                     predicted_prefill_speedup_vs_cudnn=row["cudnn_fwd_ms"] / prefill_ms))
(HERE / "traffic_count.json").write_text(json.dumps(dict(
    what="traffic count of the KV-outer forward (a prediction, not a measurement)", device="none (CPU arithmetic)",
    inputs="results/2026-11-23-h100-45-final-128k-1m-two-phase/kernels.json", rows=rows), indent=2))
print(json.dumps(rows, indent=2))
