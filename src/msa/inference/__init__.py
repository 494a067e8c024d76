"""MSA inference over a paged KV cache: prefill chunks and multi-token decode, plan()/run(), CUDA graphs.

- :class:`PagedKVCache` - K, V and index-key pages (one page = one MSA key block).
- :class:`PagedSparseAttention` - ``plan(requests, q_lens)`` once per step,
  ``run(layer, q, k, v, index_q, index_k)`` per layer.
- :class:`Generator` - prefill and greedy decode of an :class:`msa.nn.MSATransformer`.
- :class:`DenseKVAttention` - dense attention over a contiguous KV cache, the baseline (``Generator(dense=True)``).
"""

from msa.inference.cache import PagedKVCache
from msa.inference.dense_attention import DenseKVAttention
from msa.inference.generate import Generator
from msa.inference.paged_attention import PagedSparseAttention

__all__ = ["DenseKVAttention", "Generator", "PagedKVCache", "PagedSparseAttention"]
