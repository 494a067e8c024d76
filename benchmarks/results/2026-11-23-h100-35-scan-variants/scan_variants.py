"""Variants of the paged index scan (bf16 vs FP8 keys) and of Top-k, plus the FP8 indexer, on the GPU."""
import json
import math
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from inference import copy_gbps, graph_ms  # noqa: E402

from msa import kernels  # noqa: E402
from msa.fp8 import quantize_rows  # noqa: E402


@triton.jit
def scan_kernel(index_q, index_k, index_scale, page_table, tiles, scores, G: tl.constexpr, GP: tl.constexpr,
                DI: tl.constexpr, BLOCK_SIZE: tl.constexpr, MAX_PAGES: tl.constexpr, QT: tl.constexpr,
                PAGES: tl.constexpr, NB: tl.constexpr, FP8: tl.constexpr, SCALED: tl.constexpr,
                PIPE: tl.constexpr, NSTAGES: tl.constexpr):
    tile = tl.program_id(0)
    request = tl.load(tiles + tile * 4)
    first_token = tl.load(tiles + tile * 4 + 1).to(tl.int64)
    count = tl.load(tiles + tile * 4 + 2)
    first_position = tl.load(tiles + tile * 4 + 3)
    ROWS: tl.constexpr = QT * GP
    rows = tl.arange(0, ROWS)
    token = rows // GP
    group = rows % GP
    row_ok = (token < count) & (group < G)
    position = first_position + token
    local = position // BLOCK_SIZE
    last_local = (first_position + count - 1) // BLOCK_SIZE
    score_rows = scores + ((first_token + token) * G + group).to(tl.int64)[:, None] * MAX_PAGES
    page_run = tl.arange(0, NB)
    first_page = tl.program_id(1) * PAGES
    if first_page > last_local:
        for step in tl.static_range(0, PAGES, NB):
            page = first_page + step + page_run
            tl.store(score_rows + page[None, :], tl.full((ROWS, NB), float("-inf"), tl.float32),
                     mask=row_ok[:, None] & (page[None, :] < MAX_PAGES))
        return
    dims = tl.arange(0, DI)
    iq = tl.load(index_q + ((first_token + token) * G + group)[:, None] * DI + dims[None, :], mask=row_ok[:, None],
                 other=0.0)
    if FP8:
        x = iq.to(tl.float32)
        s = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1.1754943508222875e-38), 448.0)
        iq = tl.div_rn(x, s[:, None]).to(tl.float8e4nv)
    offsets = tl.arange(0, BLOCK_SIZE)
    if PIPE:
        for step in tl.range(0, PAGES, NB, num_stages=NSTAGES):
            page = first_page + step + page_run
            read = page <= last_local
            physical = tl.load(page_table + request * MAX_PAGES + page, mask=read, other=0).to(tl.int64)
            key_rows = tl.reshape(physical[:, None] * BLOCK_SIZE + offsets[None, :], (NB * BLOCK_SIZE,))
            key_read = tl.reshape(read[:, None] & (offsets[None, :] >= 0), (NB * BLOCK_SIZE,))
            ik = tl.load(index_k + key_rows[:, None] * DI + dims[None, :], mask=key_read[:, None], other=0.0)
            logits = tl.dot(iq, tl.trans(ik))
            if SCALED:
                logits *= tl.load(index_scale + key_rows, mask=key_read, other=1.0)[None, :]
            key_position = tl.reshape((page * BLOCK_SIZE)[:, None] + offsets[None, :], (NB * BLOCK_SIZE,))
            logits = tl.where(key_position[None, :] <= position[:, None], logits, float("-inf"))
            pooled = tl.max(tl.reshape(logits, (ROWS, NB, BLOCK_SIZE)), axis=2)
            pooled = tl.where(page[None, :] == local[:, None], float("inf"), pooled)
            tl.store(score_rows + page[None, :], pooled, mask=row_ok[:, None] & (page[None, :] < MAX_PAGES))
    else:
        for step in tl.static_range(0, PAGES, NB):
            page = first_page + step + page_run
            read = page <= last_local
            physical = tl.load(page_table + request * MAX_PAGES + page, mask=read, other=0).to(tl.int64)
            key_rows = tl.reshape(physical[:, None] * BLOCK_SIZE + offsets[None, :], (NB * BLOCK_SIZE,))
            key_read = tl.reshape(read[:, None] & (offsets[None, :] >= 0), (NB * BLOCK_SIZE,))
            ik = tl.load(index_k + key_rows[:, None] * DI + dims[None, :], mask=key_read[:, None], other=0.0)
            logits = tl.dot(iq, tl.trans(ik))
            if SCALED:
                logits *= tl.load(index_scale + key_rows, mask=key_read, other=1.0)[None, :]
            key_position = tl.reshape((page * BLOCK_SIZE)[:, None] + offsets[None, :], (NB * BLOCK_SIZE,))
            logits = tl.where(key_position[None, :] <= position[:, None], logits, float("-inf"))
            pooled = tl.max(tl.reshape(logits, (ROWS, NB, BLOCK_SIZE)), axis=2)
            pooled = tl.where(page[None, :] == local[:, None], float("inf"), pooled)
            tl.store(score_rows + page[None, :], pooled, mask=row_ok[:, None] & (page[None, :] < MAX_PAGES))


@triton.jit
def topk_kernel(scores, top_blocks, N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, ROWS: tl.constexpr):
    """Top-K of each row of scores [R, N] by K rounds of argmax (ties: lowest index)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, NP)
    x = tl.load(scores + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=cols[None, :] < N,
                other=float("-inf"))
    for k in tl.static_range(K):
        best = tl.max(x, axis=1)
        arg = tl.min(tl.where(x == best[:, None], cols[None, :], NP), axis=1)
        tl.store(top_blocks + rows * K + k, tl.where(best == float("-inf"), -1, arg).to(tl.int64))
        x = tl.where(cols[None, :] == arg[:, None], float("-inf"), x)


def scan_case(batch, seqlen, qt=8, layers=None):
    di, bs = 128, 128
    pages = math.ceil((seqlen + qt) / bs)
    per_layer = batch * pages * bs * di * 2
    layers = max(1, min(8, math.ceil((512 << 20) / per_layer)))
    keys = [torch.randn(batch * pages, bs, di, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    fp8 = [quantize_rows(k) for k in keys]
    table = torch.randperm(batch * pages, device="cuda").view(batch, pages).int()
    tiles = torch.tensor([(r, r * qt, qt, seqlen) for r in range(batch)], dtype=torch.int32, device="cuda")
    iq = torch.randn(batch * qt, 4, di, device="cuda", dtype=torch.bfloat16)
    scores = torch.empty(batch * qt * 4, pages, device="cuda")
    out = {}
    configs = [("bf16", False, False, False, 16, 2, 4, 1), ("fp8", True, True, False, 16, 2, 4, 1),
               ("fp8-noscale", True, False, False, 16, 2, 4, 1), ("fp8-nb4", True, True, False, 16, 4, 4, 1),
               ("fp8-p32", True, True, False, 32, 2, 4, 1), ("fp8-w8", True, True, False, 16, 2, 8, 1),
               ("fp8-pipe3", True, True, True, 16, 2, 4, 3), ("fp8-p32-pipe3", True, True, True, 32, 2, 4, 3),
               ("fp8-p64-nb4-pipe2", True, True, True, 64, 4, 4, 2), ("bf16-pipe3", False, False, True, 16, 2, 4, 3),
               ("fp8-p32-w8-pipe3", True, True, True, 32, 2, 8, 3)]
    for name, is_fp8, scaled, pipe, p, nb, warps, stages in configs:
        def step(i):
            k, s = (fp8[i % layers] if is_fp8 else (keys[i % layers], keys[i % layers]))
            scan_kernel[(batch, triton.cdiv(pages, p))](
                iq, k, s, table, tiles, scores, G=4, GP=4, DI=di, BLOCK_SIZE=bs, MAX_PAGES=pages, QT=16, PAGES=p,
                NB=nb, FP8=is_fp8, SCALED=scaled, PIPE=pipe, NSTAGES=stages, num_warps=warps)
        try:
            ms = graph_ms(step, layers)
        except Exception as e:  # noqa: BLE001
            out[name] = repr(e)[:200]
            continue
        key_bytes = batch * seqlen * (di + 4 if is_fp8 else 2 * di)
        out[name] = dict(ms=ms, gbps=key_bytes / ms / 1e6)
    # Top-k of the scores
    blocks = torch.empty(batch * qt * 4, 16, dtype=torch.int64, device="cuda")
    vals = torch.empty(batch * qt * 4, 16, device="cuda")
    scores.normal_()
    out["torch.topk"] = graph_ms(lambda i: torch.topk(scores, 16, dim=-1, out=(vals, blocks)), 4)
    for rows in (1, 2, 4):
        for warps in (1, 4):
            out[f"topk_kernel rows{rows} w{warps}"] = graph_ms(lambda i: topk_kernel[(scores.shape[0] // rows,)](
                scores, blocks, N=pages, NP=triton.next_power_of_2(pages), K=16, ROWS=rows, num_warps=warps), 4)
    ref = torch.topk(scores, 16, dim=-1).indices
    topk_kernel[(scores.shape[0],)](scores, blocks, N=pages, NP=triton.next_power_of_2(pages), K=16, ROWS=1)
    out["topk_kernel_equal"] = bool(torch.equal(ref.sort(-1).values, blocks.sort(-1).values))
    return out


def indexer_case(seqlen):
    g, di = 4, 128
    iq = torch.randn(seqlen, g, di, device="cuda", dtype=torch.bfloat16)
    ik = torch.randn(seqlen, 1, di, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device="cuda")
    out = {}

    def timed(fn, reps):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return sorted(ts)[len(ts) // 2]

    reps = 5 if seqlen <= 131072 else 2
    out["bf16"] = timed(lambda: kernels.select_blocks(iq, ik, cu, seqlen, 128, 16), reps)
    (q8, _), (k8, ks) = quantize_rows(iq), quantize_rows(ik[:, 0])
    out["quantize"] = timed(lambda: (quantize_rows(iq), quantize_rows(ik[:, 0])), reps)
    for cfg in [(64, 4, 3, 128), (128, 8, 3, 128), (64, 4, 3, 256), (128, 8, 3, 256), (128, 4, 3, 128),
                (64, 4, 4, 128)]:
        try:
            out[f"fp8 {cfg}"] = timed(lambda: kernels.select_blocks(q8, k8, cu, seqlen, 128, 16, config=cfg,
                                                                   index_k_scale=ks), reps)
        except Exception as e:  # noqa: BLE001
            out[f"fp8 {cfg}"] = repr(e)[:200]
    a = kernels.select_blocks(iq, ik, cu, seqlen, 128, 16)
    b = kernels.select_blocks(q8, k8, cu, seqlen, 128, 16, index_k_scale=ks)
    out["rows_same_selection"] = (a.sort(-1).values == b.sort(-1).values).all(-1).float().mean().item()
    out["blocks_recall"] = ((b.long()[..., :, None] == a.long()[..., None, :]).any(-1).float().mean().item())
    return out


if __name__ == "__main__":
    res = dict(device=torch.cuda.get_device_name(), commit=os.environ.get("MSA_COMMIT"), copy_gbps=copy_gbps())
    for batch, seqlen in [(8, 131072), (8, 200000), (32, 200000)]:
        t = time.time()
        res[f"scan {batch}x{seqlen}"] = scan_case(batch, seqlen)
        print(batch, seqlen, json.dumps(res[f"scan {batch}x{seqlen}"], indent=1), time.time() - t, flush=True)
    for seqlen in [131072, 524288]:
        t = time.time()
        res[f"indexer {seqlen}"] = indexer_case(seqlen)
        print(seqlen, json.dumps(res[f"indexer {seqlen}"], indent=1), time.time() - t, flush=True)
    out_dir = os.environ.get("OUT", "/tmp")
    json.dump(res, open(os.path.join(out_dir, "scan_variants.json"), "w"), indent=1)
