"""``Generator``: chunked prefill and greedy decode of an :class:`msa.nn.MSATransformer` over a paged KV cache.

Each step plans the new tokens of its requests once, then runs the model
with an ``attend`` hook that sends every layer's attention through
:class:`PagedSparseAttention`. Prompts are prefilled ``chunk_size`` tokens at a
time (each chunk attends to the cached prefix and to itself), which bounds
memory and gives the same result as one pass. On CUDA, decode steps of a
fixed batch replay a captured CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from msa.inference.cache import PagedKVCache
from msa.inference.dense_attention import DenseKVAttention
from msa.inference.paged_attention import PagedSparseAttention
from msa.nn.transformer import MSATransformer


class Generator:
    """Serves ``model`` for up to ``max_requests`` requests of at most ``max_seq_len`` tokens each.

    ``dense=True`` serves it with dense attention over a contiguous KV cache
    (:class:`DenseKVAttention`, no CUDA graphs) instead: the baseline.
    """

    def __init__(self, model: MSATransformer, *, max_requests: int = 1, max_seq_len: int = 8192,
                 chunk_size: int = 4096, cuda_graphs: bool | None = None, dense: bool = False):
        config = model.config
        parameter = next(model.parameters())
        self.model, self.chunk_size = model, chunk_size
        if dense:
            self.cache = self.attention = DenseKVAttention(
                num_layers=config.num_layers, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                head_dim=config.head_dim, max_requests=max_requests, max_seq_len=max_seq_len, dtype=parameter.dtype,
                device=parameter.device)
        else:
            pages_per_request = math.ceil(max_seq_len / config.block_size)
            self.cache = PagedKVCache(num_layers=config.num_layers, num_pages=max_requests * pages_per_request,
                                      block_size=config.block_size, num_kv_heads=config.num_kv_heads,
                                      head_dim=config.head_dim, index_head_dim=config.index_head_dim,
                                      max_requests=max_requests, max_pages_per_request=pages_per_request,
                                      dtype=parameter.dtype, index_dtype=config.index_torch_dtype,
                                      device=parameter.device)
            self.attention = PagedSparseAttention(self.cache, num_heads=config.num_heads, topk=config.topk)
        capturable = parameter.is_cuda and self.attention.uses_kernels()
        if cuda_graphs and not capturable:
            raise ValueError("cuda_graphs=True needs a CUDA model on the paged Triton path (MSA_BACKEND auto or "
                             "triton, not dense=True)")
        self.cuda_graphs = capturable if cuda_graphs is None else cuda_graphs
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._graphs_version = -1

    def add_request(self) -> int:
        return self.cache.add_request()

    def free(self, request: int) -> None:
        self.cache.free(request)

    def _positions(self) -> torch.Tensor:
        return torch.cat([torch.arange(p, p + n) for p, n in zip(self.attention.prefix_lens, self.attention.q_lens)])

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, position_ids=position_ids, attend=self.attention.run)[0]

    @torch.no_grad()
    def step(self, requests: Sequence[int], tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append ``tokens[i]`` to ``requests[i]``; returns the logits of every new token ``[T, vocab]``."""
        self.attention.plan(requests, [len(t) for t in tokens])
        device = self.cache.device
        input_ids = torch.tensor([t for request_tokens in tokens for t in request_tokens], device=device)
        position_ids = self._positions().to(device)
        if not self.cuda_graphs or any(len(t) > 16 for t in tokens):
            return self._forward(input_ids, position_ids)
        if self._graphs_version != self.attention.buffers_version:  # graphs point into replaced buffers
            self._graphs.clear()
            self._graphs_version = self.attention.buffers_version
        key = tuple((request, len(t)) for request, t in zip(requests, tokens))
        if key not in self._graphs:
            self._graphs[key] = self._capture(input_ids, position_ids)
        graph, static_ids, static_positions, static_logits = self._graphs[key]
        static_ids.copy_(input_ids)
        static_positions.copy_(position_ids)
        graph.replay()
        return static_logits.clone()

    def _capture(self, input_ids, position_ids):
        """A CUDA graph of one decode step (the cache writes it makes are redone on replay, same slots)."""
        static_ids, static_positions = input_ids.clone(), position_ids.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(static_ids, static_positions)  # warm-up: compiles kernels, fills workspaces
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = self._forward(static_ids, static_positions)
        return graph, static_ids, static_positions, static_logits

    @torch.no_grad()
    def prefill(self, request: int, prompt: Sequence[int]) -> torch.Tensor:
        """Append ``prompt`` in chunks of ``chunk_size``; returns the logits of its last token."""
        for start in range(0, len(prompt), self.chunk_size):
            logits = self.step([request], [list(prompt[start:start + self.chunk_size])])
        return logits[-1]

    @torch.no_grad()
    def generate(self, prompt: Sequence[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
        """Greedy continuation of ``prompt``: the new tokens and their logits ``[max_new_tokens, vocab]``."""
        request = self.add_request()
        try:
            logits = [self.prefill(request, prompt)]
            tokens = [int(logits[-1].argmax())]
            while len(tokens) < max_new_tokens:
                logits.append(self.step([request], [[tokens[-1]]])[-1])
                tokens.append(int(logits[-1].argmax()))
        finally:
            self.free(request)
        return tokens, torch.stack(logits)
