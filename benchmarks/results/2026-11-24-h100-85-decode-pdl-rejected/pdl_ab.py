"""A/B on the GPU: a whole decode step (PagedSparseAttention.run: append, index scan, Top-k, attention) with the
paged kernels launched with programmatic dependent launch (kernels.PAGED_PDL) and without, interleaved, CUDA-graph
replays over rotated layers, overlapping selections (30.5 distinct blocks). Writes argv[1]."""
import json, sys
sys.path.insert(0, "benchmarks")
import torch
from inference import LAYER, graph_ms, new_tokens, overlapping_index_q, paged_cache
from msa import kernels
from msa.inference import PagedSparseAttention

out_path = sys.argv[1]
c = LAYER
record = []
for batch, seqlen in [(1, 1024), (8, 1024), (8, 10000), (32, 10000), (1, 32768), (8, 131072), (8, 200000),
                      (32, 200000), (64, 200000)]:
    q_len = 8
    cache, requests = paged_cache(batch, seqlen - q_len, q_len, max_layers=4, bytes_limit=int(60e9))
    att = PagedSparseAttention(cache, num_heads=c["heads"], topk=c["topk"])
    att.plan(requests, [q_len] * batch)
    q, k, v, index_q, index_k = new_tokens(batch * q_len)
    index_q, _ = overlapping_index_q(att, index_q, batch, q_len, 30.5, lambda iq: att.run(0, q, k, v, iq, index_k))
    layers = cache.num_layers
    case = dict(batch=batch, seqlen=seqlen, timings=[])
    outs = {}
    for pdl in (True, False, True, False):
        kernels.PAGED_PDL = pdl
        outs[pdl] = att.run(0, q, k, v, index_q, index_k).clone()
        ms = graph_ms(lambda i: att.run(i % layers, q, k, v, index_q, index_k), 2 * layers)
        case["timings"].append(dict(pdl=pdl, ms=ms))
        print(batch, seqlen, pdl, round(ms, 4), flush=True)
    case["outputs_equal"] = torch.equal(outs[True], outs[False])
    kernels.PAGED_PDL = True
    record.append(case)
    json.dump(dict(device=torch.cuda.get_device_name(), cases=record), open(out_path, "w"), indent=1)
    del cache, att
    torch.cuda.empty_cache()
