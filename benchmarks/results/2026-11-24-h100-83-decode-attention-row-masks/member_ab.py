"""A/B on the GPU: paged decode attention at HEAD (.scratch/paged_head.py: an element mask on every block) against
the working tree's kernel (a row mask, the scale in the exponent's FMA, the causal mask only on blocks that hold a
tile token's position), per schedule, overlapping selections (30.5 distinct blocks), CUDA-graph replays over
rotated layers. Writes member_ab.json (argv[1])."""
import json, sys
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".scratch")
import torch
from inference import LAYER, distinct_blocks, graph_ms, new_tokens, overlapping_index_q, paged_cache
from msa import kernels
from msa.inference import PagedSparseAttention
import paged_head

kernel_of = {"head": paged_head.paged_sparse_attention_kernel, "new": kernels.paged_sparse_attention_kernel}
out_path = sys.argv[1]
c = LAYER
record = []
for batch, seqlen in [(8, 131072), (8, 200000), (32, 200000), (64, 200000), (128, 200000), (32, 100000)]:
    q_len = 8
    cache, requests = paged_cache(batch, seqlen - q_len, q_len, max_layers=4, bytes_limit=int(60e9))
    att = PagedSparseAttention(cache, num_heads=c["heads"], topk=c["topk"])
    att.plan(requests, [q_len] * batch)
    q, k, v, index_q, index_k = new_tokens(batch * q_len)
    index_q, _ = overlapping_index_q(att, index_q, batch, q_len, 30.5, lambda iq: att.run(0, q, k, v, iq, index_k))
    reference = att.run(0, q, k, v, index_q, index_k).clone()
    union = distinct_blocks(att, batch, q_len)
    sel_bytes = union.sum().item() * c["block_size"] * 2 * c["head_dim"] * 2
    bi = att._view("block_indices", (batch * q_len, c["groups"], att.selected))
    layers = cache.num_layers
    rows = batch * q_len * c["heads"]
    case = dict(batch=batch, seqlen=seqlen, distinct=union.float().mean().item(), default_tokens=att.attention_tokens,
                default_split=att.split, timings=[])
    if batch < 32:
        configs = [(1, 4, 3, 1), (2, 4, 3, 2), (4, 4, 3, 2), (8, 8, 3, 2), (8, 8, 3, 4), (8, 4, 3, 4), (8, 8, 2, 4)]
    else:
        configs = [(8, 8, 3, 1), (8, 8, 2, 1), (8, 4, 3, 1), (4, 4, 3, 1), (4, 8, 3, 1), (2, 4, 3, 1), (1, 4, 3, 1)]
    for tokens, warps, stages, split in configs:
        tiles = torch.tensor(att.work_tiles(tokens), dtype=torch.int32, device="cuda")
        lists = torch.empty(kernels.paged_block_lists_numel(len(tiles), c["groups"], tokens, att.selected, split),
                            dtype=torch.int32, device="cuda")
        buffers = {} if split == 1 else dict(
            partial_out=torch.empty(rows, split, c["head_dim"], device="cuda"),
            partial_lse=torch.empty(rows, split, device="cuda"), lse=torch.empty(rows, device="cuda"))
        outs = {}
        for kind in ("head", "new", "head", "new"):
            kernels.paged_sparse_attention_kernel = kernel_of[kind]
            o = torch.full_like(q, float("nan"))

            def call(layer):
                kernels.paged_sparse_attention(q, cache.k[layer], cache.v[layer], cache.page_table, tiles, bi, lists,
                                               o, c["head_dim"] ** -0.5, tokens, split, **buffers, num_warps=warps,
                                               num_stages=stages)
            call(0)
            outs[kind] = o.clone()
            err = ((o.float() - reference.float()).norm() / reference.float().norm()).item()
            ms = graph_ms(lambda i: call(i % layers), 2 * layers)
            t = dict(kind=kind, tokens=tokens, warps=warps, stages=stages, split=split, ms=ms,
                     gbps=sel_bytes / ms / 1e6, rel_err_vs_default=err)
            case["timings"].append(t)
            print(batch, seqlen, t, flush=True)
        case["timings"][-1]["rel_diff_new_vs_head"] = (
            (outs["new"].float() - outs["head"].float()).norm() / outs["head"].float().norm()).item()
        kernels.paged_sparse_attention_kernel = kernel_of["new"]
    record.append(case)
    json.dump(dict(device=torch.cuda.get_device_name(), cases=record), open(out_path, "w"), indent=1)
    del cache, att
    torch.cuda.empty_cache()
