"""A/B on the GPU: paged decode attention, the committed kernel vs the scratch-list variant (.scratch/paged_lists.py),
overlapping selections (30.5 distinct blocks per request and group), CUDA-graph replays over rotated layers."""
import json, sys
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".scratch")
import torch
from inference import LAYER, distinct_blocks, graph_ms, new_tokens, overlapping_index_q, paged_cache
from msa import kernels
from msa.inference import PagedSparseAttention
from paged_lists import launch, lists_size

out_path = sys.argv[1]
c = LAYER
record = []
for batch, seqlen in [(8, 131072), (8, 200000), (32, 200000), (64, 200000), (128, 200000)]:
    q_len = 8
    cache, requests = paged_cache(batch, seqlen - q_len, q_len, max_layers=4, bytes_limit=int(60e9))
    att = PagedSparseAttention(cache, num_heads=c["heads"], topk=c["topk"])
    att.plan(requests, [q_len] * batch)
    q, k, v, index_q, index_k = new_tokens(batch * q_len)
    index_q, _ = overlapping_index_q(att, index_q, batch, q_len, 30.5, lambda iq: att.run(0, q, k, v, iq, index_k))
    att.run(0, q, k, v, index_q, index_k)
    union = distinct_blocks(att, batch, q_len)
    sel_bytes = union.sum().item() * c["block_size"] * 2 * c["head_dim"] * 2
    bi = att._view("block_indices", (batch * q_len, c["groups"], att.selected))
    layers = cache.num_layers
    rows = batch * q_len * c["heads"]
    ref = None
    case = dict(batch=batch, seqlen=seqlen, default_tokens=att.attention_tokens, default_split=att.split, timings=[])
    configs = [("old", att.attention_tokens, att.split, None, 3), ("new", att.attention_tokens, att.split, None, 3),
               ("new", att.attention_tokens, att.split, None, 2), ("new", att.attention_tokens, att.split, None, 4)]
    if batch == 8:
        configs += [("old", 8, 4, None, 3), ("new", 8, 4, None, 3), ("new", 8, 2, None, 3), ("new", 1, 2, None, 3),
                    ("new", 4, 4, None, 3)]
    else:
        configs += [("new", 8, 1, 4, 3), ("new", 8, 2, None, 3), ("new", 4, 1, None, 3)]
    for kind, tokens, split, warps, stages in configs:
        tiles = torch.tensor(att.work_tiles(tokens), dtype=torch.int32, device="cuda")
        o = torch.full_like(q, float("nan"))
        bufs = {} if split == 1 else dict(partial_out=torch.empty(rows, split, c["head_dim"], device="cuda"),
                                          partial_lse=torch.empty(rows, split, device="cuda"),
                                          lse=torch.empty(rows, device="cuda"))
        lists = torch.empty(lists_size(tiles.shape[0], c["groups"], tokens, att.selected, split), dtype=torch.int32,
                            device="cuda")

        def call(layer):
            if kind == "old":
                kernels.paged_sparse_attention(q, cache.k[layer], cache.v[layer], cache.page_table, tiles, bi, o,
                                               c["head_dim"] ** -0.5, tokens, split, **bufs, num_warps=warps,
                                               num_stages=stages)
            else:
                launch(q, cache.k[layer], cache.v[layer], cache.page_table, tiles, bi, o, c["head_dim"] ** -0.5, tokens,
                       split, **bufs, lists=lists, num_warps=warps, num_stages=stages)
        try:
            call(0)
        except Exception as e:
            case["timings"].append(dict(kind=kind, tokens=tokens, split=split, warps=warps, stages=stages, error=repr(e)[:200]))
            continue
        if ref is None:
            ref = o.clone()
        err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
        ms = graph_ms(lambda i: call(i % layers), 2 * layers)
        t = dict(kind=kind, tokens=tokens, split=split, warps=warps, stages=stages, ms=ms, gbps=sel_bytes / ms / 1e6,
                 rel_err_vs_first=err)
        case["timings"].append(t)
        print(batch, seqlen, t, flush=True)
    record.append(case)
    json.dump(dict(device=torch.cuda.get_device_name(), cases=record), open(out_path, "w"), indent=1)
    del cache, att
    torch.cuda.empty_cache()
