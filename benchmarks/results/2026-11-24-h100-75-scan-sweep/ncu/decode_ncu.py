"""Nsight Compute target: one decode step's index scan and sparse attention, called alone (200K x BATCH,
overlapping selections). ncu --profile-from-start off: only the two calls between profiler start and stop."""
import sys

sys.path.insert(0, "benchmarks")
import torch  # noqa: E402

from inference import LAYER, new_tokens, overlapping_index_q, paged_cache  # noqa: E402
from msa import kernels  # noqa: E402
from msa.inference import PagedSparseAttention  # noqa: E402

batch, seqlen, q_len = int(sys.argv[1]), int(sys.argv[2]), 8
c = LAYER
cache, requests = paged_cache(batch, seqlen - q_len, q_len, max_layers=1, bytes_limit=int(60e9))
attention = PagedSparseAttention(cache, num_heads=c["heads"], topk=c["topk"])
attention.plan(requests, [q_len] * batch)
q, k, v, index_q, index_k = new_tokens(batch * q_len)
index_q, _ = overlapping_index_q(attention, index_q, batch, q_len, 30.5, lambda iq: attention.run(0, q, k, v, iq, index_k))
torch.cuda.synchronize()
scan_tiles = attention._view("scan_tiles", (attention.n_scan_tiles, 4))
groups, selected = c["groups"], attention.selected
scores = attention._view("scores", (batch * q_len * groups, cache.max_pages_per_request))
block_indices = attention._view("block_indices", (batch * q_len, groups, selected))
out = attention._view("out", (batch * q_len, c["heads"], c["head_dim"]))
tiles = attention._view("attention_tiles", (attention.n_attention_tiles, 4))
print("attention tokens", attention.attention_tokens, "split", attention.split, flush=True)
torch.cuda.profiler.start()
kernels.paged_block_scores(index_q, cache.index_k[0], cache.page_table, scan_tiles, scores, 0, attention.scan_tokens)
kernels.paged_sparse_attention(q, cache.k[0], cache.v[0], cache.page_table, tiles, block_indices, out,
                               c["head_dim"] ** -0.5, attention.attention_tokens, attention.split,
                               **attention.split_buffers())
torch.cuda.synchronize()
torch.cuda.profiler.stop()
