"""A paged KV cache for MSA: pages of ``block_size`` tokens, one page per key block.

A page holds, for every layer, the K and V of the ``G`` KV heads and the one
index-key head of ``block_size`` consecutive tokens of one request. Because a
page is exactly one MSA key block, the Index Branch's block ``b`` of a request
is page ``page_table[request, b]``: the kernels read the selected blocks
straight from the pages, with no gather.

Page bookkeeping (which pages are free, how many tokens each request holds)
lives on the host; :meth:`PagedKVCache.reserve` mirrors it into the device
``page_table`` that the kernels read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from msa.fp8 import FP8_DTYPE, check_index_dtype, quantize_rows


def check_step(requests: Sequence[int], q_lens: Sequence[int]) -> None:
    """The arguments of a step's ``plan``: as many requests as ``q_lens``, at least one, each with a new token."""
    if len(requests) != len(q_lens) or not requests:
        raise ValueError(f"requests and q_lens must be non-empty and of equal length, got {len(requests)} "
                         f"and {len(q_lens)}")
    if any(n < 1 for n in q_lens):
        raise ValueError(f"q_lens must be >= 1, got {list(q_lens)}")


class PagedKVCache:
    """K, V and index-key pages for ``num_layers`` layers, shared by up to ``max_requests`` requests.

    Tensors (``P = num_pages``, ``BS = block_size``):

    - ``k``, ``v``: ``[num_layers, P, BS, G, D]``
    - ``index_k``: ``[num_layers, P, BS, Di]``
    - ``page_table``: int32 ``[max_requests, max_pages_per_request]``; row ``r``
      lists the pages of request ``r`` in sequence order (unused entries 0).

    ``seq_lens[r]`` (host ints) counts the tokens request ``r`` holds.

    ``index_dtype=torch.float8_e4m3fn`` stores the index keys in FP8 with a
    float32 scale per key (``index_scale``: ``[num_layers, P, BS]``;
    :mod:`msa.fp8`): the index scan then reads Di + 4 bytes per key instead
    of 2 * Di and ranks with FP8 products, its queries rounded to FP8 too. K
    and V keep ``dtype``.
    """

    def __init__(self, *, num_layers: int, num_pages: int, block_size: int, num_kv_heads: int, head_dim: int,
                 index_head_dim: int, max_requests: int, max_pages_per_request: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, index_dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu"):
        for name, value in dict(num_layers=num_layers, num_pages=num_pages, block_size=block_size,
                                num_kv_heads=num_kv_heads, head_dim=head_dim, index_head_dim=index_head_dim,
                                max_requests=max_requests).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.block_size, self.num_kv_heads, self.head_dim = block_size, num_kv_heads, head_dim
        self.index_head_dim, self.num_layers = index_head_dim, num_layers
        self.max_pages_per_request = max_pages_per_request or num_pages
        self.dtype = dtype
        shape = (num_layers, num_pages, block_size)
        self.k = torch.zeros(*shape, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.device = self.k.device  # "cuda" resolved to "cuda:N"
        self.v = torch.zeros_like(self.k)
        check_index_dtype(index_dtype, dtype)
        self.index_dtype = index_dtype or dtype
        self.index_k = torch.zeros(*shape, index_head_dim, dtype=self.index_dtype, device=self.device)
        self.index_scale = torch.ones(shape, dtype=torch.float32, device=self.device) \
            if self.index_dtype == FP8_DTYPE else None
        self.page_table = torch.zeros(max_requests, self.max_pages_per_request, dtype=torch.int32, device=self.device)
        self.seq_lens = [0] * max_requests
        self._pages: list[list[int] | None] = [None] * max_requests
        self._free_pages = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first

    @property
    def max_requests(self) -> int:
        return len(self._pages)

    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def max_seq_len(self) -> int:
        return self.max_pages_per_request * self.block_size

    def add_request(self, capacity: int = 0) -> int:
        """A free request slot, holding no tokens yet, with pages for ``capacity`` tokens allocated up front."""
        for request, pages in enumerate(self._pages):
            if pages is None:
                self._pages[request], self.seq_lens[request] = [], 0
                try:
                    self._check_room([request], [capacity])
                except (ValueError, RuntimeError):
                    self._pages[request] = None
                    raise
                self._allocate(request, capacity)
                return request
        raise RuntimeError(f"all {self.max_requests} request slots are in use; free one or raise max_requests")

    def write_index_keys(self, layer: int, slots: torch.Tensor, index_k: torch.Tensor) -> None:
        """Store ``index_k`` ``[T, Di]`` at the flat ``slots`` (int64 ``[T]``) of ``layer``, rounded if FP8.

        The PyTorch path; the Triton one is :func:`msa.kernels.paged_append`.
        """
        pool = self.index_k[layer].view(-1, self.index_head_dim)
        if self.index_scale is None:
            pool.index_copy_(0, slots, index_k)
            return
        values, scale = quantize_rows(index_k)
        pool.view(torch.uint8).index_copy_(0, slots, values.view(torch.uint8))  # FP8 has no index_copy_
        self.index_scale[layer].view(-1).index_copy_(0, slots, scale)

    def index_keys(self, layer: int, pages: torch.Tensor) -> torch.Tensor:
        """The index keys of ``pages`` of ``layer``, ``[n_pages * block_size, Di]``, float32 if stored in FP8."""
        if self.index_scale is None:
            return self.index_k[layer][pages].flatten(0, 1)
        keys = self.index_k[layer].view(torch.uint8)[pages].view(FP8_DTYPE).flatten(0, 1)  # FP8 has no gathers
        return keys.float() * self.index_scale[layer][pages].flatten(0, 1)[:, None]

    def free(self, request: int) -> None:
        """Return the request's pages to the pool and its slot to the free slots."""
        self._free_pages.extend(reversed(self._pages_of(request)))
        self._pages[request], self.seq_lens[request] = None, 0

    def pages(self, request: int) -> list[int]:
        return list(self._pages_of(request))

    def reserve(self, request: int, n_new_tokens: int) -> int:
        """Make room for ``n_new_tokens`` more tokens; returns the request's length before them.

        Allocates pages as needed, writes them into ``page_table`` and counts
        the tokens as held (the next ``PagedSparseAttention.run`` writes them).
        """
        return self.reserve_all([request], [n_new_tokens])[0]

    def reserve_all(self, requests: Sequence[int], n_new_tokens: Sequence[int]) -> list[int]:
        """:meth:`reserve` ``n_new_tokens[i]`` for each ``requests[i]``, all or nothing.

        Returns the requests' lengths before the new tokens. Checks that every
        request fits before taking any page: when one does not, raises and
        leaves the cache (lengths, pages, free pages) as it was.
        """
        if len(requests) != len(n_new_tokens):
            raise ValueError(f"requests and n_new_tokens must have equal lengths, got {len(requests)} and "
                             f"{len(n_new_tokens)}")
        if len(set(requests)) != len(requests):
            raise ValueError(f"requests must be distinct, got {list(requests)}")
        if any(n < 0 for n in n_new_tokens):
            raise ValueError(f"n_new_tokens must be >= 0, got {list(n_new_tokens)}")
        for request in requests:
            self._pages_of(request)  # validates request
        prefix_lens = [self.seq_lens[request] for request in requests]
        new_lens = [prefix_len + n for prefix_len, n in zip(prefix_lens, n_new_tokens)]
        self._check_room(requests, new_lens)
        for request, new_len in zip(requests, new_lens):
            self._allocate(request, new_len)
            self.seq_lens[request] = new_len
        return prefix_lens

    def _check_room(self, requests: Sequence[int], n_tokens: Sequence[int]) -> None:
        """Raise unless each ``requests[i]`` may hold ``n_tokens[i]`` tokens and the free pages cover them all."""
        taken = 0
        for request, tokens in zip(requests, n_tokens):
            n_pages = math.ceil(tokens / self.block_size)
            if n_pages > self.max_pages_per_request:
                raise ValueError(f"request {request} would hold {tokens} tokens, more than max_pages_per_request "
                                 f"({self.max_pages_per_request}) x block_size ({self.block_size})")
            more = max(0, n_pages - len(self._pages_of(request)))
            if taken + more > len(self._free_pages):
                earlier = f" once the earlier requests of this call take {taken}" if taken else ""
                raise RuntimeError(f"out of KV-cache pages: request {request} needs {more} more, "
                                   f"{len(self._free_pages) - taken} free{earlier}")
            taken += more

    def _allocate(self, request: int, n_tokens: int) -> None:
        """Give the request pages for ``n_tokens`` tokens (keeps the pages it has) and list them in ``page_table``.

        The caller has checked the room with :meth:`_check_room`.
        """
        pages = self._pages_of(request)
        first_new, n_pages = len(pages), math.ceil(n_tokens / self.block_size)
        while len(pages) < n_pages:
            pages.append(self._free_pages.pop())
        if n_pages > first_new:
            new_pages = torch.tensor(pages[first_new:], dtype=torch.int32)
            self.page_table[request, first_new:n_pages].copy_(new_pages, non_blocking=True)

    def slots(self, request: int, start: int, end: int) -> torch.Tensor:
        """int64 flat cache slots (``page * block_size + offset``) of the request's positions ``start .. end - 1``."""
        pages = torch.tensor(self._pages_of(request), dtype=torch.int64)
        positions = torch.arange(start, end)
        return pages[positions // self.block_size] * self.block_size + positions % self.block_size

    def _pages_of(self, request: int) -> list[int]:
        if not 0 <= request < self.max_requests or self._pages[request] is None:
            raise ValueError(f"request {request} is not an active request of this cache")
        return self._pages[request]
