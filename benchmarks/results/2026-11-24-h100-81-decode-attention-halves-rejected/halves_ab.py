"""A/B on the GPU: paged decode attention with 8-token tiles, the kernel at HEAD vs the two-halves variant
(.scratch/paged_halves.py), overlapping selections (30.5 distinct blocks), CUDA-graph replays over rotated layers."""
import json, sys
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".scratch")
import torch
from inference import LAYER, distinct_blocks, graph_ms, new_tokens, overlapping_index_q, paged_cache
from msa import kernels
from msa.inference import PagedSparseAttention
from paged_halves import launch

out_path = sys.argv[1]
c = LAYER
record = []
for batch, seqlen in [(32, 200000), (64, 200000), (128, 200000), (32, 100000)]:
    q_len = 8
    cache, requests = paged_cache(batch, seqlen - q_len, q_len, max_layers=4, bytes_limit=int(60e9))
    att = PagedSparseAttention(cache, num_heads=c["heads"], topk=c["topk"])
    att.plan(requests, [q_len] * batch)
    q, k, v, index_q, index_k = new_tokens(batch * q_len)
    index_q, _ = overlapping_index_q(att, index_q, batch, q_len, 30.5, lambda iq: att.run(0, q, k, v, iq, index_k))
    att.run(0, q, k, v, index_q, index_k)
    bi = att._view("block_indices", (batch * q_len, c["groups"], att.selected))
    tiles = torch.tensor(att.work_tiles(8), dtype=torch.int32, device="cuda")
    lists = torch.empty(kernels.paged_block_lists_numel(len(tiles), c["groups"], 8, att.selected, 1),
                        dtype=torch.int32, device="cuda")
    layers = cache.num_layers
    case = dict(batch=batch, seqlen=seqlen, distinct=distinct_blocks(att, batch, q_len).float().mean().item(),
                timings=[])
    ref = None
    for kind, warps, stages in [("head", 8, 3), ("halves", 8, 3), ("halves", 8, 2), ("halves", 4, 3), ("head", 8, 3)]:
        o = torch.full_like(q, float("nan"))

        def call(layer):
            if kind == "head":
                kernels.paged_sparse_attention(q, cache.k[layer], cache.v[layer], cache.page_table, tiles, bi, lists, o,
                                               c["head_dim"] ** -0.5, 8, num_warps=warps, num_stages=stages)
            else:
                launch(q, cache.k[layer], cache.v[layer], cache.page_table, tiles, bi, o, c["head_dim"] ** -0.5, 8,
                       lists, num_warps=warps, num_stages=stages)
        try:
            call(0)
        except Exception as e:
            case["timings"].append(dict(kind=kind, warps=warps, stages=stages, error=repr(e)[:200]))
            continue
        if ref is None:
            ref = o.clone()
        err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
        ms = graph_ms(lambda i: call(i % layers), 2 * layers)
        t = dict(kind=kind, warps=warps, stages=stages, ms=ms, rel_err_vs_head=err)
        case["timings"].append(t)
        print(batch, seqlen, t, flush=True)
    record.append(case)
    json.dump(dict(device=torch.cuda.get_device_name(), cases=record), open(out_path, "w"), indent=1)
    del cache, att
    torch.cuda.empty_cache()
