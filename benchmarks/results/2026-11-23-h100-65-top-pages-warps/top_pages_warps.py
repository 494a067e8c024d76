"""Experiment: top_pages_kernel per num_warps on decode-shaped page scores (rows = requests x 8 tokens x 4 groups),
50 launches captured in a CUDA graph per timing (as decode replays them)."""
import json, sys, torch, triton
sys.path.insert(0, "benchmarks")
from kernels import time_ms
from msa.kernels.paged import top_pages_kernel

for rows, pages in ((256, 1024), (256, 1600), (1024, 1600), (4096, 1600), (256, 4096), (256, 8192)):
    scores = torch.randn(rows, pages, device="cuda")
    ref = scores.topk(16, dim=1).indices
    row = {"rows": rows, "pages": pages}
    for warps in (1, 2, 4, 8):
        out = torch.full((rows, 16), -7, dtype=torch.int64, device="cuda")
        launch = lambda: top_pages_kernel[(rows,)](scores, out, N=pages, NP=triton.next_power_of_2(pages), TOPK=16,
                                                   num_warps=warps)
        launch()
        ok = torch.equal(out, ref)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(50):
                launch()
        row[f"warps {warps} us"] = time_ms(graph.replay, 3, 10) * 1000 / 50 if ok else "differs"
    print(json.dumps(row), flush=True)
