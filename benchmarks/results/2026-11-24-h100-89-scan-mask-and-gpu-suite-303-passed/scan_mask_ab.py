"""A/B on the GPU: the index scan (kernels.paged_block_scores) with the causal mask on every page (HEAD,
.scratch/paged_scan_head.py) against the mask only on the products that hold keys after a tile token's position,
interleaved, CUDA-graph replays over rotated layers; page scores compared bitwise. Writes argv[1]."""
import json, sys
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".scratch")
import torch
from inference import LAYER, graph_ms, new_tokens, paged_cache
from msa import kernels
from msa.inference import PagedSparseAttention
import paged_scan_head

kernel_of = {"head": paged_scan_head.paged_block_scores_kernel, "new": kernels.paged_block_scores_kernel}
out_path = sys.argv[1]
c = LAYER
record = dict(device=torch.cuda.get_device_name(), cases=[])
for batch, seqlen, fp8 in [(8, 131072, False), (8, 200000, False), (32, 200000, False), (128, 200000, False),
                           (2, 1048576, False), (32, 200000, True), (8, 4096, False)]:
    q_len = 8
    index_dtype = torch.float8_e4m3fn if fp8 else None
    cache, requests = paged_cache(batch, seqlen - q_len, q_len, max_layers=4, bytes_limit=int(60e9),
                                  index_dtype=index_dtype)
    att = PagedSparseAttention(cache, num_heads=c["heads"], topk=c["topk"])
    att.plan(requests, [q_len] * batch)
    q, k, v, index_q, index_k = new_tokens(batch * q_len)
    att.run(0, q, k, v, index_q, index_k)
    layers = cache.num_layers
    tiles = att._view("scan_tiles", (att.n_scan_tiles, 4))
    rows = batch * q_len * c["groups"]
    scales = cache.index_scale
    case = dict(batch=batch, seqlen=seqlen, fp8=fp8)
    results = {}
    for kind in ("head", "new", "head", "new"):
        kernels.paged_block_scores_kernel = kernel_of[kind]
        scores = torch.full((rows, cache.max_pages_per_request), float("nan"), device="cuda")

        def call(i):
            kernels.paged_block_scores(index_q, cache.index_k[i % layers], cache.page_table, tiles, scores, 0,
                                       att.scan_tokens, None if scales is None else scales[i % layers])
        call(0)
        results[kind] = scores.clone()
        case.setdefault(kind, []).append(graph_ms(call, 2 * layers))
    kernels.paged_block_scores_kernel = kernel_of["new"]
    case["scores_equal"] = torch.equal(results["head"], results["new"])
    record["cases"].append(case)
    print(case, flush=True)
    json.dump(record, open(out_path, "w"), indent=1)
    del cache, att
    torch.cuda.empty_cache()
