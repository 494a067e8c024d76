"""``DenseKVAttention``: dense causal attention over a contiguous KV cache, the baseline of MSA decode.

The requests' keys and values sit in preallocated ``[max_seq_len]`` rows (no
pages, no copies as the cache grows), and each step's new tokens attend to
their request's whole prefix through ``scaled_dot_product_attention``
(bottom-right causal mask for multi-token steps). It offers the interface
:class:`msa.inference.Generator` uses of :class:`PagedKVCache` and
:class:`PagedSparseAttention` (``add_request``, ``free``, ``plan``, ``run``),
so one model can be served both ways and timed side by side. The index
queries and keys the model computes are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.attention.bias import causal_lower_right
from torch.nn.functional import scaled_dot_product_attention

from msa.inference.cache import check_step


class DenseKVAttention:
    """Dense attention of new tokens over a contiguous cache of ``max_requests`` x ``max_seq_len`` tokens."""

    def __init__(self, *, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, max_requests: int,
                 max_seq_len: int, dtype: torch.dtype, device: torch.device | str | None = None,
                 softmax_scale: float | None = None):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.k = torch.zeros(num_layers, max_requests, num_kv_heads, max_seq_len, head_dim, dtype=dtype,
                             device=device)
        self.v = torch.zeros_like(self.k)
        self.device = self.k.device
        self.num_heads, self.max_seq_len = num_heads, max_seq_len
        self.softmax_scale = softmax_scale
        self.seq_lens = [0] * max_requests
        self._free_requests = list(range(max_requests - 1, -1, -1))
        self._active: set[int] = set()
        self.buffers_version = 0  # the buffers never move (Generator's CUDA graphs check this)
        self._planned = False

    def uses_kernels(self) -> bool:
        return False

    def add_request(self) -> int:
        if not self._free_requests:
            raise RuntimeError(f"all {len(self.seq_lens)} request slots are in use; free one or raise max_requests")
        request = self._free_requests.pop()
        self._active.add(request)
        return request

    def free(self, request: int) -> None:
        self._check_active(request)
        self._active.remove(request)
        self._free_requests.append(request)
        self.seq_lens[request] = 0

    def _check_active(self, request: int) -> None:
        if request not in self._active:
            raise ValueError(f"request {request} is not an active request of this cache")

    def plan(self, requests: Sequence[int], q_lens: Sequence[int]) -> None:
        """Count ``q_lens[i]`` new tokens of ``requests[i]`` (packed in this order in ``run``'s inputs)."""
        self._planned = False
        check_step(requests, q_lens)
        for request, q_len in zip(requests, q_lens):
            self._check_active(request)
            if self.seq_lens[request] + q_len > self.max_seq_len:
                raise ValueError(f"request {request} would hold {self.seq_lens[request] + q_len} tokens, more than "
                                 f"max_seq_len ({self.max_seq_len})")
        self.requests, self.q_lens = list(requests), list(q_lens)
        self.prefix_lens = [self.seq_lens[request] for request in requests]
        for request, q_len in zip(requests, q_lens):
            self.seq_lens[request] += q_len
        self._planned = True

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index_q: torch.Tensor,
            index_k: torch.Tensor) -> torch.Tensor:
        """``q`` ``[T, Hq, D]``, ``k``/``v`` ``[T, G, D]`` of the planned tokens -> ``[T, Hq, D]``."""
        if not self._planned:
            raise RuntimeError("no step is planned: call plan(requests, q_lens) before run()")
        outs, first = [], 0
        for request, prefix_len, q_len in zip(self.requests, self.prefix_lens, self.q_lens):
            end = prefix_len + q_len
            new = slice(first, first + q_len)
            self.k[layer, request, :, prefix_len:end] = k[new].transpose(0, 1)
            self.v[layer, request, :, prefix_len:end] = v[new].transpose(0, 1)
            mask = causal_lower_right(q_len, end) if q_len > 1 else None  # one token sees the whole prefix
            out = scaled_dot_product_attention(q[new].transpose(0, 1), self.k[layer, request, :, :end],
                                               self.v[layer, request, :, :end], attn_mask=mask,
                                               scale=self.softmax_scale, enable_gqa=True)
            outs.append(out.transpose(0, 1))
            first += q_len
        return torch.cat(outs)
