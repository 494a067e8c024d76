"""Input validation for the public ops: clear errors instead of kernel crashes.

Every check names the argument and what was expected. Checks that must read
tensor values (``cu_seqlens`` monotone, ``block_indices`` in range) synchronise
with the device, so they are skipped while a CUDA graph is being captured or
``torch.compile`` traces the call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class Layout:
    """The token layout shared by all tensors of one call.

    Batched tensors are ``[B, S, ...]`` (``cu_seqlens is None``); packed varlen
    tensors are ``[T, ...]`` with ``cu_seqlens`` ``[n + 1]``. ``packed_cu_seqlens``
    and ``max_seqlen`` describe both as packed sequences for the backends.
    """

    lead: tuple[int, ...]
    cu_seqlens: torch.Tensor | None
    packed_cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def total_tokens(self) -> int:
        return math.prod(self.lead)

    def describe(self, *tail: str) -> str:
        return "[" + ", ".join(("T",) if self.varlen else ("B", "S")) + ", " + ", ".join(tail) + "]"

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, ...]`` -> ``[B*S, ...]``; packed tensors pass through."""
        return x if self.varlen else x.flatten(0, 1)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.varlen else x.unflatten(0, self.lead)


def capturing() -> bool:
    """Whether a CUDA graph is being captured or ``torch.compile`` traces: no reading of tensor values then."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_tensor(name: str, x, rank: int, expected: str, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have shape {expected}, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")


def check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_block_size(block_size) -> None:
    check_int("block_size", block_size)
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")


def check_scale(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {value}")


def check_flag(name: str, value) -> None:
    """``value`` must be None or a bool."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be None or a bool, got {type(value).__name__}")


def check_cu_seqlens(cu_seqlens, total: int, device: torch.device, tokens_of: str, *, name: str = "cu_seqlens",
                     dtypes=(torch.int32,)) -> list[int] | None:
    """``cu_seqlens`` must be a ``[n + 1]`` (n >= 1) tensor of one of ``dtypes`` on ``device``, non-decreasing from 0
    to ``total``, the tokens of the tensor named ``tokens_of``. Returns the sequence lengths, or None while
    :func:`capturing` (its values unread then)."""
    kinds = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be an {kinds} torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {kinds}, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must have shape [n + 1] with n >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} must be on {device} like {tokens_of}, got {cu_seqlens.device}")
    if capturing():
        return None
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at T={total} (the tokens of {tokens_of}), "
                         f"got {bounds[0]} .. {bounds[-1]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if min(lengths) < 0:
        raise ValueError(f"{name} must be non-decreasing")
    return lengths


def make_layout(name: str, x, cu_seqlens, max_seqlen=None, tail=("H", "D"), dtypes=FLOAT_DTYPES) -> Layout:
    """Infer the layout from the first tensor ``x`` (``[B, S, *tail]`` or ``[T, *tail]``, of one of ``dtypes``)."""
    if cu_seqlens is None:
        check_tensor(name, x, 4, f"[B, S, {', '.join(tail)}] (or [T, {', '.join(tail)}] with cu_seqlens)", dtypes)
        batch, seqlen = x.shape[:2]
        packed = torch.arange(batch + 1, dtype=torch.int32, device=x.device) * seqlen
        return Layout((batch, seqlen), None, packed, seqlen)
    check_tensor(name, x, 3, f"[T, {', '.join(tail)}] when cu_seqlens is given", dtypes)
    total = x.shape[0]
    lengths = check_cu_seqlens(cu_seqlens, total, x.device, name)
    if max_seqlen is not None:
        check_int("max_seqlen", max_seqlen, minimum=0)
    if lengths is not None:
        longest = max(lengths)
        if max_seqlen is not None and max_seqlen < longest:
            raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence ({longest})")
        max_seqlen = longest if max_seqlen is None else max_seqlen
    elif max_seqlen is None:
        raise ValueError("max_seqlen must be given with cu_seqlens while a CUDA graph is being captured or "
                         "torch.compile traces")
    return Layout((total,), cu_seqlens, cu_seqlens, max_seqlen)


def resolve_varlen(cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """flash-attn's two spellings of packed layouts: ``cu_seqlens`` (queries and keys alike) or ``cu_seqlens_q``
    with ``cu_seqlens_k``. Returns ``(cu_seqlens_q, max_seqlen_q, cu_seqlens_k, max_seqlen_k)``."""
    if cu_seqlens_q is None and cu_seqlens_k is None and max_seqlen_q is None and max_seqlen_k is None:
        return cu_seqlens, max_seqlen, cu_seqlens, max_seqlen
    if cu_seqlens is not None or max_seqlen is not None:
        raise ValueError("give cu_seqlens / max_seqlen (queries and keys alike) or cu_seqlens_q / cu_seqlens_k, "
                         "not both")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k go together")
    return cu_seqlens_q, max_seqlen_q, cu_seqlens_k, max_seqlen_k


def make_key_layout(query_layout: Layout, name: str, x, cu_seqlens_k, max_seqlen_k=None,
                    tail=("G", "D")) -> Layout:
    """The layout of the keys ``x`` (``[B, Sk, *tail]``, or ``[T_k, *tail]`` with ``cu_seqlens_k``) of queries laid
    out as ``query_layout``: each sequence's queries are its last keys (flash-attn's bottom-right alignment), so no
    sequence may have fewer keys than queries. Returns ``query_layout`` itself when the keys are the queries'."""
    if cu_seqlens_k is None:
        check_tensor(name, x, 4, f"[B, Sk, {', '.join(tail)}] (or [T_k, {', '.join(tail)}] with cu_seqlens_k)")
        (batch, n_queries), (n_batch, n_keys) = query_layout.lead, x.shape[:2]
        if n_batch != batch or n_keys < n_queries:
            raise ValueError(f"{name} must have shape [B={batch}, Sk >= S={n_queries}, {', '.join(tail)}] (the "
                             f"queries are the last S of the Sk keys), got {tuple(x.shape)}")
        if n_keys == n_queries:
            return query_layout
        packed = torch.arange(batch + 1, dtype=torch.int32, device=x.device) * n_keys
        return Layout((batch, n_keys), None, packed, n_keys)
    if cu_seqlens_k is query_layout.cu_seqlens:
        check_tensor(name, x, 3, f"[T, {', '.join(tail)}]")
        return query_layout
    layout = make_layout(name, x, cu_seqlens_k, max_seqlen_k, tail)
    if cu_seqlens_k.shape != query_layout.cu_seqlens.shape:
        raise ValueError(f"cu_seqlens_k must have the shape of cu_seqlens_q {tuple(query_layout.cu_seqlens.shape)}, "
                         f"got {tuple(cu_seqlens_k.shape)}")
    if not capturing() and bool((cu_seqlens_k.diff() < query_layout.cu_seqlens.diff()).any()):
        raise ValueError("every sequence needs at least as many keys (cu_seqlens_k) as queries (cu_seqlens_q): "
                         "the queries are the last keys of their sequence")
    return layout


def check_like(layout: Layout, name: str, x, heads, dim, reference: torch.Tensor, head_name: str,
               dim_name: str) -> None:
    """``x`` must be ``layout`` + ``[heads, dim]`` (None = any) on the device and dtype of ``reference``."""
    expected = layout.describe(head_name, dim_name)
    check_tensor(name, x, len(layout.lead) + 2, expected)
    lead, (h, d) = tuple(x.shape[:-2]), x.shape[-2:]
    if lead != layout.lead or (heads is not None and h != heads) or (dim is not None and d != dim):
        raise ValueError(f"{name} must have shape {expected} = {list(layout.lead) + [heads or h, dim or d]}, "
                         f"got {tuple(x.shape)}")
    if x.device != reference.device:
        raise ValueError(f"{name} must be on {reference.device}, got {x.device}")
    if x.dtype != reference.dtype:
        raise TypeError(f"{name} must have dtype {reference.dtype} like the other inputs, got {x.dtype}")


def check_qkv(layout: Layout, q, k, v, key_layout: Layout | None = None) -> tuple[int, int]:
    """Returns ``(Hq, G)`` after checking GQA shapes (``k``, ``v`` laid out as ``key_layout``, default the
    queries' ``layout``)."""
    key_layout = layout if key_layout is None else key_layout
    n_heads, head_dim = q.shape[-2:]
    check_like(key_layout, "k", k, None, head_dim, q, "G", "D")
    n_groups = k.shape[-2]
    if v is not None:
        check_like(key_layout, "v", v, n_groups, head_dim, q, "G", "D")
    if n_heads % n_groups:
        raise ValueError(f"the number of query heads ({n_heads}) must be a multiple of the number of "
                         f"KV heads G ({n_groups})")
    return n_heads, n_groups


def check_block_indices(layout: Layout, block_indices, n_groups: int, block_size: int,
                        device: torch.device, key_layout: Layout | None = None) -> torch.Tensor:
    """Checks shape, dtype, device and values (block ids count the blocks of ``key_layout``, default ``layout``);
    returns ``block_indices`` as int32."""
    key_layout = layout if key_layout is None else key_layout
    expected = layout.describe("G", "topk")
    check_tensor("block_indices", block_indices, len(layout.lead) + 2, expected, dtypes=INDEX_DTYPES)
    if tuple(block_indices.shape[:-1]) != layout.lead + (n_groups,):
        raise ValueError(f"block_indices must have shape {expected} with G={n_groups}, "
                         f"got {tuple(block_indices.shape)}")
    if block_indices.device != device:
        raise ValueError(f"block_indices must be on {device}, got {block_indices.device}")
    block_indices = block_indices.to(torch.int32)
    if not capturing() and block_indices.numel():
        n_blocks = math.ceil(key_layout.max_seqlen / block_size)
        ordered = block_indices.sort(dim=-1).values
        repeated = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()
        # one synchronisation with the host for the three checks
        low, high, repeated = torch.stack([ordered[..., 0].min(), ordered[..., -1].max(), repeated.int()]).tolist()
        if low < -1 or high >= n_blocks:
            raise ValueError(f"block_indices must lie in [-1, {n_blocks - 1}] (-1 = unused, else a block of "
                             f"{block_size} tokens of a {key_layout.max_seqlen}-token sequence), got {low} .. {high}")
        if repeated:
            raise ValueError("block_indices must list distinct blocks per (token, group); -1 may repeat")
    return block_indices


def check_lse(layout: Layout, name: str, lse, n_heads: int, device: torch.device) -> None:
    """``lse`` must be float32 ``layout + [n_heads]`` on ``device``."""
    expected = layout.describe("Hq")
    check_tensor(name, lse, len(layout.lead) + 1, expected, dtypes=(torch.float32,))
    if tuple(lse.shape) != layout.lead + (n_heads,):
        raise ValueError(f"{name} must have shape {expected} = {list(layout.lead) + [n_heads]}, got {tuple(lse.shape)}")
    if lse.device != device:
        raise ValueError(f"{name} must be on {device}, got {lse.device}")
