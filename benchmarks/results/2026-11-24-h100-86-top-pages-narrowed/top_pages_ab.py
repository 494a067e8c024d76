"""A/B on the GPU: the decode Top-k (kernels.top_pages) narrowed to each row's candidates with one warp per row
against the rounds over whole rows (4 warps), alone on scan-like scores and inside whole decode steps
(PagedSparseAttention.run, overlapping selections), interleaved, CUDA-graph replays. Writes argv[1]."""
import json, sys
sys.path.insert(0, "benchmarks")
import torch
from inference import LAYER, graph_ms, new_tokens, overlapping_index_q, paged_cache
from msa import kernels
from msa.inference import PagedSparseAttention

narrowing = kernels._top_pages_narrowing
variants = {"narrowed": narrowing, "whole rows": lambda n_pages, k: 0}
out_path = sys.argv[1]
record = dict(device=torch.cuda.get_device_name(), alone=[], steps=[])
for rows, pages in [(256, 1024), (256, 1600), (1024, 1600), (2048, 1600), (4096, 1600), (128, 4096), (64, 8192)]:
    scores = torch.randn(rows, pages, device="cuda")
    scores[:, -3:] = float("-inf")
    scores[:, -4] = float("inf")
    out = torch.empty(rows, 16, dtype=torch.int64, device="cuda")
    candidates = torch.empty(kernels.top_pages_candidates_numel(rows, pages, 16), device="cuda")
    expected = torch.topk(scores, 16, dim=1).indices
    case = dict(rows=rows, pages=pages)
    for name in ("narrowed", "whole rows", "narrowed", "whole rows"):
        kernels._top_pages_narrowing = variants[name]
        out.fill_(-7)
        kernels.top_pages(scores, out, candidates)
        same = torch.equal(out.sort(1).values, expected.sort(1).values)
        us = graph_ms(lambda i: kernels.top_pages(scores, out, candidates), 50) * 1e3
        case.setdefault(name, []).append(us)
        case[name + " equal topk"] = same
    kernels._top_pages_narrowing = narrowing
    record["alone"].append(case)
    print(case, flush=True)

c = LAYER
for batch, seqlen in [(8, 131072), (8, 200000), (32, 200000), (64, 200000), (128, 200000)]:
    q_len = 8
    cache, requests = paged_cache(batch, seqlen - q_len, q_len, max_layers=4, bytes_limit=int(60e9))
    att = PagedSparseAttention(cache, num_heads=c["heads"], topk=c["topk"])
    att.plan(requests, [q_len] * batch)
    q, k, v, index_q, index_k = new_tokens(batch * q_len)
    index_q, _ = overlapping_index_q(att, index_q, batch, q_len, 30.5, lambda iq: att.run(0, q, k, v, iq, index_k))
    layers = cache.num_layers
    case = dict(batch=batch, seqlen=seqlen)
    outs = {}
    for name in ("narrowed", "whole rows", "narrowed", "whole rows"):
        kernels._top_pages_narrowing = variants[name]
        outs[name] = att.run(0, q, k, v, index_q, index_k).clone()
        ms = graph_ms(lambda i: att.run(i % layers, q, k, v, index_q, index_k), 2 * layers)
        case.setdefault(name, []).append(ms)
    kernels._top_pages_narrowing = narrowing
    case["outputs_equal"] = torch.equal(outs["narrowed"], outs["whole rows"])
    record["steps"].append(case)
    print(case, flush=True)
    json.dump(record, open(out_path, "w"), indent=1)
    del cache, att
    torch.cuda.empty_cache()
json.dump(record, open(out_path, "w"), indent=1)
