"""``MSACache``: a transformers ``Cache`` over msa's paged KV cache, so that ``generate()`` runs MSA's kernels.

``generate()`` of a converted model makes one (sized for the prompt and the
new tokens) for greedy search and sampling, unless it is given a cache. Each forward plans its new tokens once
(when layer 0 updates the cache); every MSA layer's attention then goes
through :class:`msa.inference.PagedSparseAttention`, which appends the new K,
V and index keys to the pages and runs the index scan, the Top-k and sparse
attention over the selected pages: prefill and decode read at most
``topk x block_size`` keys per query, so the cost of a new token does not
grow like dense attention's. Layers left dense keep K/V in preallocated
buffers and attend with SDPA. One request per batch row, equal lengths.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from msa.fp8 import index_dtype_from_name
from msa.inference import PagedKVCache, PagedSparseAttention


class _PagedLayer(CacheLayerMixin):
    """An MSA layer: its K/V live in the pages (the attention call writes them); this counts them."""

    is_sliding = False

    def __init__(self, max_length: int):
        super().__init__()
        self.max_length, self.length = max_length, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]  # [B, G, 0, D]: shapes only
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.length += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_length


class _DenseLayer(_PagedLayer):
    """A layer left dense: K/V ``[B, G, max_length, D]`` preallocated at the first update."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, groups, _, head_dim = key_states.shape
        self.key_buffer, self.value_buffer = (x.new_empty(batch, groups, self.max_length, head_dim)
                                              for x in (key_states, value_states))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values


class MSACache(Cache):
    """The KV cache of a converted model (:func:`msa.integrations.hf.convert`) for ``batch_size`` sequences of
    at most ``max_length`` tokens; pass it as the model's cache, or let ``generate()`` make one."""

    def __init__(self, model: torch.nn.Module, *, batch_size: int, max_length: int):
        for name, value in dict(batch_size=batch_size, max_length=max_length).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        config, settings = model.config, model.config.msa
        parameter = next(model.parameters())
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        pages_per_request = math.ceil(max_length / settings["block_size"])
        self.pages = PagedKVCache(num_layers=len(settings["layers"]), num_pages=batch_size * pages_per_request,
                                  block_size=settings["block_size"], num_kv_heads=config.num_key_value_heads,
                                  head_dim=head_dim, index_head_dim=settings["index_head_dim"],
                                  max_requests=batch_size, max_pages_per_request=pages_per_request,
                                  dtype=parameter.dtype, index_dtype=index_dtype_from_name(settings["index_dtype"]),
                                  device=parameter.device)
        self.attention = PagedSparseAttention(self.pages, num_heads=config.num_attention_heads, topk=settings["topk"],
                                              softmax_scale=head_dim**-0.5)
        self.requests = [self.pages.add_request() for _ in range(batch_size)]
        self.paged_layer = {layer: i for i, layer in enumerate(settings["layers"])}  # model layer -> page layer
        super().__init__(layers=[_PagedLayer(max_length) if i in self.paged_layer else _DenseLayer(max_length)
                                 for i in range(config.num_hidden_layers)])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:  # the first layer of a forward: plan its new tokens once for all layers
            if key_states.shape[0] != len(self.requests):
                raise ValueError(f"this MSACache holds {len(self.requests)} sequences, got a batch of "
                                 f"{key_states.shape[0]}")
            self.attention.plan(self.requests, [key_states.shape[-2]] * len(self.requests))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               index_q: torch.Tensor, index_k: torch.Tensor, scaling: float | None = None):
        """MSA attention of the new tokens of layer ``layer_idx`` over the cache, after appending them.

        ``query`` ``[B, Hq, S, D]``, ``key``/``value`` ``[B, G, S, D]`` (the
        transformers layout), ``index_q`` ``[B, S, G, Di]``, ``index_k``
        ``[B, S, 1, Di]``. Returns ``([B, S, Hq, D], None)``.
        """
        if scaling is not None and scaling != self.attention.softmax_scale:
            raise ValueError(f"MSACache attends with softmax scale head_dim ** -0.5 ({self.attention.softmax_scale}); "
                             f"layer {layer_idx} asks for {scaling}")
        batch, _, length, _ = query.shape
        dtype = self.pages.dtype
        packed = [x.transpose(1, 2).flatten(0, 1).to(dtype) for x in (query, key, value)]  # [B * S, H, D]
        out = self.attention.run(self.paged_layer[layer_idx], *packed, index_q.flatten(0, 1).to(dtype),
                                 index_k.flatten(0, 1).to(dtype))
        return out.unflatten(0, (batch, length)), None

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} serves greedy search and sampling: no cache reset, "
                                  "cropping or reordering (transformers.DynamicCache runs the exact PyTorch path)")

    reset = reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported
