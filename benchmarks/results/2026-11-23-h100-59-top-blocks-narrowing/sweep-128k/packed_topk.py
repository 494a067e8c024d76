"""Experiment: argmax rounds with one int64 max per round (score bits and block packed), vs kernels.top_blocks."""
import json, sys, torch, triton, triton.language as tl
sys.path.insert(0, "benchmarks")
from kernels import time_ms
from msa import kernels


@triton.jit
def packed_kernel(scores, block_indices, n_positions, NBLK, first_position, G: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  TOPK: tl.constexpr, NP: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    q_pos = first_position + rows // G
    row_ok = rows < n_positions * G
    local = q_pos // BLOCK_SIZE
    blocks = tl.arange(0, NP)[None, :]
    s = tl.load(scores + rows.to(tl.int64)[:, None] * NBLK + blocks, mask=row_ok[:, None] & (blocks < local[:, None]),
                other=float("-inf"))
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) | (NP - 1 - blocks).to(tl.int64)
    out = block_indices + (q_pos * G + rows % G) * TOPK
    ninf = (tl.full((), float("-inf"), tl.float32).to(tl.int32, bitcast=True) ^ 0x7FFFFFFF).to(tl.int64) << 32
    for slot in tl.static_range(TOPK - 1):
        best = tl.max(key, axis=1)
        block = (NP - 1 - (best & 0xFFFFFFFF)).to(tl.int32)
        tl.store(out + slot, tl.where(best < ninf + NP, -1, block), mask=row_ok)
        key = tl.where(key == best[:, None], -(2**62), key)
    tl.store(out + TOPK - 1, local, mask=row_ok)


res = []
for seqlen in (131072, 524288):
    positions, G, B, K = 16384, 4, 128, 16
    first = seqlen - positions
    n_blocks = (seqlen - 1) // B
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device="cuda")
    scores = torch.randn(1, positions, G, n_blocks, device="cuda")
    ref = torch.full((seqlen, G, K), -7, dtype=torch.int32, device="cuda")
    kernels.top_blocks(scores, cu, ref, first, positions, n_blocks, B)
    row = {"seqlen": seqlen}
    for rows in (1, 2, 4):
        for warps in (1, 2, 4, 8):
            out = torch.full_like(ref, -7)
            run = lambda: packed_kernel[(triton.cdiv(positions * G, rows),)](scores, out, positions, n_blocks, first, G=G,
                BLOCK_SIZE=B, TOPK=K, NP=triton.next_power_of_2(n_blocks), ROWS=rows, num_warps=warps)
            try:
                run()
                row[f"packed rows {rows} warps {warps}"] = time_ms(run, 2, 10) if torch.equal(out, ref) else "differs"
            except Exception as e:
                row[f"packed rows {rows} warps {warps}"] = repr(e)[:80]
    print(json.dumps(row), flush=True)
    res.append(row)
