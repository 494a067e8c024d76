"""Under TRITON_INTERPRET=1: the paged decode attention with 1, 2 and 4 loop steps per block against one step."""
import math, sys
import torch
from msa import kernels
from msa.inference import PagedKVCache, PagedSparseAttention

torch.manual_seed(0)
for heads, groups in ((8, 2), (64, 4)):
    D, Di, bs, topk = 16, 16, 16, 4
    lengths, q_len = [90, 61, 40], 8
    cache = PagedKVCache(num_layers=1, num_pages=3 * 8, block_size=bs, num_kv_heads=groups, head_dim=D,
                         index_head_dim=Di, max_requests=3, max_pages_per_request=8, dtype=torch.float32, device="cpu")
    for pool in (cache.k, cache.v, cache.index_k):
        pool.normal_()
    att = PagedSparseAttention(cache, num_heads=heads, topk=topk)
    reqs = [cache.add_request() for _ in lengths]
    for r, n in zip(reqs, lengths):
        cache.reserve(r, n - q_len)
    att.plan(reqs, [q_len] * 3)
    T = 3 * q_len
    q, k, v = torch.randn(T, heads, D), torch.randn(T, groups, D), torch.randn(T, groups, D)
    iq, ik = torch.randn(T, groups, Di), torch.randn(T, Di)
    ref = att.run(0, q, k, v, iq, ik).clone()
    bi = att._view("block_indices", (T, groups, att.selected))
    for tokens in (1, 8):
        tiles = torch.tensor(att.work_tiles(tokens), dtype=torch.int32)
        for keys in (16, 8, 4):
            o = torch.full_like(q, math.nan)
            lists = torch.full((kernels.paged_block_lists_numel(tiles.shape[0], groups, tokens, att.selected, 1),),
                               2**30, dtype=torch.int32)
            kernels.paged_sparse_attention(q, cache.k[0], cache.v[0], cache.page_table, tiles, bi, lists, o, D ** -0.5,
                                           tokens, keys_per_step=keys)
            print(heads, tokens, keys, ((o - ref).norm() / ref.norm()).item(), torch.isnan(o).any().item())
