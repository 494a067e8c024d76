"""``PagedSparseAttention``: MSA prefill and decode over a :class:`PagedKVCache`, in plan()/run() style.

One step of an engine:

1. ``attention.plan(requests, q_lens)`` once per step (host work): makes room
   for each request's ``q_len`` new tokens in the cache, and writes the step's
   metadata (work tiles, cache slots of the new tokens) into device buffers
   that it keeps from step to step.
2. ``attention.run(layer, q, k, v, index_q, index_k)`` per layer: writes the
   new K, V and index keys into the cache, runs the index scan (max-pooled
   index logits per page), the exp-free Top-k, and sparse attention over the
   selected pages. On the GPU it allocates nothing and never synchronises with
   the host, so a decode step can be captured in a CUDA graph and replayed
   after each ``plan`` of the same shape (same requests' ``q_lens``).

Query ``i`` of a request with ``prefix_len`` cached tokens sits at position
``prefix_len + i`` and sees keys ``0 .. prefix_len + i``: prefill chunks and
multi-token (MTP) decode steps are the same operation. A long chunk's index
scores are processed in query chunks (two-phase chunking) so that memory
stays bounded by ``score_workspace_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from msa.inference.cache import PagedKVCache, check_step
from msa.inference.paged_torch import paged_attention_torch
from msa.ops.backend import unsupported_reason, use_triton


class PagedSparseAttention:
    """Plans and runs MSA attention of new tokens over a paged KV cache.

    Args:
        cache: the :class:`PagedKVCache` (its ``block_size`` is the MSA block size).
        num_heads: query heads ``Hq`` (a multiple of the cache's ``G`` KV heads).
        topk: blocks per (query, group), the local block included.
        softmax_scale: default ``head_dim ** -0.5``.
        score_workspace_bytes: bound of the index-score buffer (float32,
            ``rows x max_pages_per_request``); longer chunks run in parts.
        kv_splits: parts the blocks of each (tile, group) are split into
            (split-KV); default: enough to fill the GPU when a batch is small.
        attention_tokens: tokens per sparse-attention tile, 1 to 16 (1: each
            token loads its own blocks; more: a request's tokens load each block
            of their union once). Default: ``kernels.PAGED_ATTENTION_TOKENS`` for
            decode steps (every ``q_len`` <= 16) whose tiles fill the GPU, else 1.
    """

    def __init__(self, cache: PagedKVCache, *, num_heads: int, topk: int = 16, softmax_scale: float | None = None,
                 score_workspace_bytes: int = 256 << 20, kv_splits: int | None = None,
                 attention_tokens: int | None = None):
        if num_heads % cache.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of the cache's num_kv_heads "
                             f"({cache.num_kv_heads})")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if attention_tokens is not None and not 1 <= attention_tokens <= 16:
            raise ValueError(f"attention_tokens must be in 1..16, got {attention_tokens}")
        self.cache, self.num_heads, self.topk = cache, num_heads, topk
        self.softmax_scale = cache.head_dim**-0.5 if softmax_scale is None else softmax_scale
        self.score_workspace_bytes, self.kv_splits = score_workspace_bytes, kv_splits
        self.requested_attention_tokens = attention_tokens
        self.selected = min(topk, cache.max_pages_per_request)  # Top-k width of the page scores
        self._buffers: dict[str, torch.Tensor] = {}
        self.buffers_version = 0  # bumped when a buffer is reallocated: CUDA graphs captured before are stale
        self._planned = False

    # ------------------------------------------------------------------ plan

    def plan(self, requests: Sequence[int], q_lens: Sequence[int]) -> None:
        """Reserve cache room for ``q_lens[i]`` new tokens of ``requests[i]`` and prepare the step.

        The new tokens of ``run``'s inputs are packed in this order. Host work;
        the device buffers are reused while they are large enough. All or
        nothing (:meth:`PagedKVCache.reserve_all`): when the cache has no room
        for every request, raises with the cache as it was and no step
        planned (``run`` raises until the next successful ``plan``).
        """
        self._planned = False
        check_step(requests, q_lens)
        cache = self.cache
        self.triton_path = self.uses_kernels()
        self.prefix_lens = cache.reserve_all(requests, q_lens)
        self.requests, self.q_lens = list(requests), list(q_lens)
        slots = [cache.slots(request, prefix_len, prefix_len + q_len)
                 for request, prefix_len, q_len in zip(requests, self.prefix_lens, q_lens)]
        self.total_tokens = sum(q_lens)
        self._buffer("slots", (self.total_tokens,), torch.int64).copy_(torch.cat(slots))
        if self.triton_path:
            self._plan_kernels()
        self._planned = True

    def _plan_kernels(self) -> None:
        """Work tiles, score chunks, split and work buffers of the Triton path."""
        from msa import kernels  # imported here: installs without triton run the PyTorch path

        cache, groups, n_heads, head_dim = self.cache, self.cache.num_kv_heads, self.num_heads, self.cache.head_dim
        self.scan_tokens = kernels.PAGED_SCAN_TOKENS
        self.attention_tokens = self._attention_tokens()
        scan_tiles, attention_tiles = self.work_tiles(self.scan_tokens), self.work_tiles(self.attention_tokens)
        self.n_scan_tiles, self.n_attention_tiles = len(scan_tiles), len(attention_tiles)
        self.chunks = self._score_chunks(scan_tiles)
        self.split = self._split()
        for name, tiles in (("scan_tiles", scan_tiles), ("attention_tiles", attention_tiles)):
            self._buffer(name, (len(tiles), 4), torch.int32).copy_(torch.tensor(tiles, dtype=torch.int32))
        max_rows = max(tokens for _, _, _, tokens in self.chunks) * groups
        self._buffer("scores", (max_rows * cache.max_pages_per_request,), torch.float32)
        self.candidates_numel = max(1, kernels.top_pages_candidates_numel(max_rows, cache.max_pages_per_request,
                                                                          self.selected))  # 1: no narrowing
        self._buffer("top_candidates", (self.candidates_numel,), torch.float32)
        self._buffer("block_indices", (self.total_tokens * groups * self.selected,), torch.int64)
        self._buffer("out", (self.total_tokens * n_heads * head_dim,), cache.dtype)
        self.block_lists_numel = kernels.paged_block_lists_numel(len(attention_tiles), groups, self.attention_tokens,
                                                                 self.selected, self.split)
        self._buffer("block_lists", (self.block_lists_numel,), torch.int32)
        if self.split > 1:
            self._buffer("partial_out", (self.total_tokens * n_heads * self.split * head_dim,), torch.float32)
            self._buffer("partial_lse", (self.total_tokens * n_heads * self.split,), torch.float32)
            self._buffer("lse", (self.total_tokens * n_heads,), torch.float32)

    def work_tiles(self, tokens_per_tile: int) -> list[tuple[int, int, int, int]]:
        """The planned step's kernel work list: (request, first packed token, token count, position of the
        first token) per tile of up to ``tokens_per_tile`` consecutive new tokens of one request."""
        tiles, first_token = [], 0
        for request, prefix_len, q_len in zip(self.requests, self.prefix_lens, self.q_lens):
            tiles += [(request, first_token + i, min(tokens_per_tile, q_len - i), prefix_len + i)
                      for i in range(0, q_len, tokens_per_tile)]
            first_token += q_len
        return tiles

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A view of a grow-only device buffer."""
        size = math.prod(shape)
        held = self._buffers.get(name)
        if held is None or held.numel() < size:
            held = self._buffers[name] = torch.empty(size, dtype=dtype, device=self.cache.device)
            self.buffers_version += 1
        return held[:size].view(shape)

    def _view(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._buffers[name][: math.prod(shape)].view(shape)

    def _score_chunks(self, tiles) -> list[tuple[int, int, int, int]]:
        """(first tile, end tile, first token, tokens) runs of whole tiles whose scores fit the workspace."""
        per_token = self.cache.num_kv_heads * self.cache.max_pages_per_request * 4
        budget = max(self.scan_tokens, self.score_workspace_bytes // per_token)
        chunks, first = [], 0
        for index, (_, token, count, _) in enumerate(tiles):
            start_token = tiles[first][1]
            if token + count - start_token > budget and index > first:
                chunks.append((first, index, start_token, token - start_token))
                first = index
        start_token = tiles[first][1]
        chunks.append((first, len(tiles), start_token, self.total_tokens - start_token))
        return chunks

    def _attention_tokens(self) -> int:
        """Tokens per attention tile: a decode step's tokens together once the batch fills the GPU."""
        if self.requested_attention_tokens is not None:
            return self.requested_attention_tokens
        from msa import kernels

        wide = kernels.PAGED_ATTENTION_TOKENS
        if self.cache.device.type != "cuda" or max(self.q_lens) > 16:
            return 1
        programs = sum(math.ceil(n / wide) for n in self.q_lens) * self.cache.num_kv_heads
        # 8-token tiles lose at 32 programs on 132 SMs and win at 128
        # (benchmarks/results/2026-11-23-h100-48-decode-attention-sweep)
        return wide if 2 * programs >= self._sm_count() else 1

    def _split(self) -> int:
        """Parts each (tile, group)'s blocks are split into, so that small batches fill the GPU."""
        if self.kv_splits is not None:
            return self.kv_splits
        if self.cache.device.type != "cuda":
            return 1
        from msa import kernels

        programs = self.n_attention_tiles * self.cache.num_kv_heads
        per_sm = 2 if self.attention_tokens == 1 else 1  # one-token programs are light: two per SM
        return max(1, min(kernels.PAGED_MAX_SPLIT, per_sm * self._sm_count() // programs))

    def _sm_count(self) -> int:
        from msa import kernels

        return kernels.sm_count(self.cache.device.index)

    def split_buffers(self) -> dict[str, torch.Tensor]:
        """The split-KV work buffers of ``kernels.paged_sparse_attention`` for the planned step (none unsplit)."""
        if self.split == 1:
            return {}
        rows, head_dim = self.total_tokens * self.num_heads, self.cache.head_dim
        return dict(partial_out=self._view("partial_out", (rows, self.split, head_dim)),
                    partial_lse=self._view("partial_lse", (rows, self.split)), lse=self._view("lse", (rows,)))

    # ------------------------------------------------------------------ run

    def uses_kernels(self) -> bool:
        """Whether ``run`` takes the Triton path (capturable in CUDA graphs) or the PyTorch one (``MSA_BACKEND``)."""
        cache = self.cache
        reason = unsupported_reason(dtype=cache.dtype, head_dim=cache.head_dim, index_dim=cache.index_head_dim,
                                    block_size=cache.block_size, topk=self.topk,
                                    heads_per_group=self.num_heads // cache.num_kv_heads,
                                    fp8_device=None if cache.index_scale is None else cache.device)
        return use_triton("inference.PagedSparseAttention", cache.device, reason)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index_q: torch.Tensor,
            index_k: torch.Tensor, *, return_block_indices: bool = False):
        """Attention of the planned new tokens of one layer.

        Args (``T`` = the planned tokens, packed request by request):
            q: ``[T, Hq, D]``; k, v: ``[T, G, D]``; index_q: ``[T, G, Di]``;
            index_k: ``[T, Di]`` or ``[T, 1, Di]``. Same dtype as the cache.

        Returns ``out`` ``[T, Hq, D]`` (a view of a buffer the next ``run``
        overwrites: consume or copy it first), and with
        ``return_block_indices`` also the selected blocks, int64
        ``[T, G, min(topk, max_pages_per_request)]`` in the layout of
        :func:`msa.select_blocks` (allocates; not for graphs).
        """
        if not self._planned:
            raise RuntimeError("no step is planned: call plan(requests, q_lens) before run() (and again after a "
                               "plan that raised)")
        cache = self.cache
        if not 0 <= layer < cache.num_layers:
            raise ValueError(f"layer must be in 0..{cache.num_layers - 1}, got {layer}")
        if index_k.dim() == 3:
            index_k = index_k.squeeze(1)
        total, groups, n_heads = self.total_tokens, cache.num_kv_heads, self.num_heads
        expected = dict(q=(q, (total, n_heads, cache.head_dim)), k=(k, (total, groups, cache.head_dim)),
                        v=(v, (total, groups, cache.head_dim)), index_q=(index_q, (total, groups, cache.index_head_dim)),
                        index_k=(index_k, (total, cache.index_head_dim)))
        for name, (x, shape) in expected.items():
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(x).__name__}")
            if tuple(x.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)} (the planned tokens), got {tuple(x.shape)}")
            if x.dtype != cache.dtype or x.device != cache.device:
                raise ValueError(f"{name} must be {cache.dtype} on {cache.device} like the cache, got {x.dtype} on "
                                 f"{x.device}")

        slots = self._view("slots", (total,))
        index_scale = None if cache.index_scale is None else cache.index_scale[layer]
        if self.triton_path:  # K, V and index keys (rounded if FP8) in one launch
            from msa import kernels

            k, v, index_k = (x if x[0].is_contiguous() else x.contiguous() for x in (k, v, index_k))  # rows read whole
            kernels.paged_append(k, v, index_k, slots, cache.k[layer].view(-1, groups * cache.head_dim),
                                 cache.v[layer].view(-1, groups * cache.head_dim),
                                 cache.index_k[layer].view(-1, cache.index_head_dim),
                                 None if index_scale is None else index_scale.view(-1))
        else:
            cache.k[layer].view(-1, groups, cache.head_dim).index_copy_(0, slots, k)
            cache.v[layer].view(-1, groups, cache.head_dim).index_copy_(0, slots, v)
            cache.write_index_keys(layer, slots, index_k)

        if not self.triton_path:
            out, block_indices = paged_attention_torch(cache, layer, self.requests, self.prefix_lens, self.q_lens, q,
                                                       index_q, topk=self.topk, softmax_scale=self.softmax_scale)
            return (out, block_indices) if return_block_indices else out

        from msa import kernels

        q, index_q = q.contiguous(), index_q.contiguous()
        scan_tiles = self._view("scan_tiles", (self.n_scan_tiles, 4))
        block_indices = self._view("block_indices", (total, groups, self.selected))
        max_pages = cache.max_pages_per_request
        for first_tile, end_tile, first_token, tokens in self.chunks:
            scores = self._view("scores", (tokens * groups, max_pages))
            kernels.paged_block_scores(index_q, cache.index_k[layer], cache.page_table,
                                       scan_tiles[first_tile:end_tile], scores, first_token, self.scan_tokens,
                                       index_scale)
            kernels.top_pages(scores, block_indices[first_token:first_token + tokens].view(-1, self.selected),
                              self._view("top_candidates", (self.candidates_numel,)))
        out = self._view("out", (total, n_heads, cache.head_dim))
        kernels.paged_sparse_attention(q, cache.k[layer], cache.v[layer], cache.page_table,
                                       self._view("attention_tiles", (self.n_attention_tiles, 4)), block_indices,
                                       self._view("block_lists", (self.block_lists_numel,)), out, self.softmax_scale,
                                       self.attention_tokens, self.split, **self.split_buffers())
        return (out, block_indices.clone()) if return_block_indices else out
