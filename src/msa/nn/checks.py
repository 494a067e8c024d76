"""Input checks of the layers (:mod:`msa.nn`, :mod:`msa.integrations.hf`): the ops' checks (:mod:`msa.ops.checks`)
applied to what a layer takes, so that bad input raises a ``ValueError`` / ``TypeError`` naming the argument and
what was expected before any projection or kernel runs.

Like the ops' checks, those of ``cu_seqlens``' values read them (one synchronisation with the device) and are
skipped while a CUDA graph is being captured or ``torch.compile`` traces.
"""

from __future__ import annotations

import torch

from msa.ops.checks import INDEX_DTYPES, check_cu_seqlens, check_tensor


def _rank_of(x, ranks: tuple[int, ...]) -> int:
    """The rank :func:`check_tensor` is to check ``x`` against: its own if it is one of ``ranks``, else the first."""
    return x.dim() if isinstance(x, torch.Tensor) and x.dim() in ranks else ranks[0]


def accepted_ranks(rank: int, dense: str, packed: str, *, packed_given: bool, either: bool
                   ) -> tuple[tuple[int, ...], str]:
    """The ranks a layer's input may have, and how an error describes them: the dense layout (``rank``, described
    by ``dense``), the packed one (``rank - 1``, ``packed``) when ``cu_seqlens`` is given, either one with
    ``either`` (a custom ``attend`` takes both)."""
    if packed_given:
        return (rank - 1,), f"{packed} when cu_seqlens is given"
    if either:
        return (rank, rank - 1), f"{dense} or {packed}"
    return (rank,), f"{dense} (or {packed} with cu_seqlens)"


def check_hidden_states(x, width: int, parameter: torch.Tensor, ranks: tuple[int, ...], expected: str,
                        name: str = "hidden_states") -> None:
    """``x`` must be a floating tensor of one of ``ranks`` (``expected`` describes them) whose last dim is
    ``width``, on the device of the layer's ``parameter`` and of its dtype (any under autocast)."""
    check_tensor(name, x, _rank_of(x, ranks), expected)
    if x.shape[-1] != width:
        raise ValueError(f"{name} must have shape {expected} with hidden={width}, got shape {tuple(x.shape)}")
    if x.device != parameter.device:
        raise ValueError(f"{name} must be on {parameter.device} like the layer's parameters, got {x.device}")
    if x.dtype != parameter.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} must have dtype {parameter.dtype} like the layer's parameters (or run under "
                        f"autocast), got {x.dtype}")


def check_position_embeddings(position_embeddings, hidden_states: torch.Tensor, head_dim: int) -> None:
    """``position_embeddings`` must be a ``(cos, sin)`` pair of floating tensors of shape
    ``hidden_states.shape[:-1] + [head_dim]``, or one that broadcasts to it, on the device of ``hidden_states``."""
    target = tuple(hidden_states.shape[:-1]) + (head_dim,)
    expected = f"{list(target)} (the shape of hidden_states but the last dim, then head_dim)"
    if not isinstance(position_embeddings, (tuple, list)) or len(position_embeddings) != 2:
        raise TypeError(f"position_embeddings must be a (cos, sin) pair of tensors of shape {expected}, got "
                        f"{type(position_embeddings).__name__}")
    for part, table in zip(("cos", "sin"), position_embeddings):
        name = f"position_embeddings ({part})"
        check_tensor(name, table, table.dim() if isinstance(table, torch.Tensor) else 1, expected)
        shape = tuple(table.shape)
        if not shape or len(shape) > len(target) or shape[-1] != head_dim or any(
                size not in (1, wanted) for size, wanted in zip(shape[::-1], target[::-1])):
            raise ValueError(f"{name} must have shape {expected} or one that broadcasts to it, got "
                             f"{tuple(table.shape)}")
        if table.device != hidden_states.device:
            raise ValueError(f"{name} must be on {hidden_states.device} like hidden_states, got {table.device}")


def check_packed_offsets(cu_seqlens, total: int, device: torch.device, tokens_of: str) -> torch.Tensor:
    """A layer's ``cu_seqlens``: int32 or int64 ``[n + 1]`` on ``device``, non-decreasing from 0 to ``total``, the
    tokens of ``tokens_of`` (:func:`~msa.ops.checks.check_cu_seqlens`). Returns it as int32, what the ops take."""
    check_cu_seqlens(cu_seqlens, total, device, tokens_of, dtypes=INDEX_DTYPES)
    return cu_seqlens.to(torch.int32)


def check_token_ids(name: str, x, ranks: tuple[int, ...], expected: str, device: torch.device) -> None:
    """``x`` must be an int32 or int64 tensor of one of ``ranks`` (``expected`` describes them) on ``device``."""
    check_tensor(name, x, _rank_of(x, ranks), expected, dtypes=INDEX_DTYPES)
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like the model's parameters, got {x.device}")


def check_key_prefix(prefix, hidden_states: torch.Tensor, num_kv_heads: int, head_dim: int, index_head_dim: int) -> None:
    """``prefix``: a :class:`~msa.nn.attention.KeyPrefix` ``(k, v, index_k)`` of ``[B, P, G, D]``, ``[B, P, G, D]``
    and ``[B, P, 1, Di]`` floating tensors, ``B`` that of ``hidden_states`` ``[B, S, hidden]``, on its device."""
    if not isinstance(prefix, tuple) or len(prefix) != 3:
        raise TypeError(f"prefix must be a KeyPrefix (k, v, index_k), got {type(prefix).__name__}")
    batch = hidden_states.shape[0]
    length = prefix[0].shape[1] if isinstance(prefix[0], torch.Tensor) and prefix[0].dim() == 4 else "P"
    for name, x, tail in (("k", prefix[0], (num_kv_heads, head_dim)), ("v", prefix[1], (num_kv_heads, head_dim)),
                          ("index_k", prefix[2], (1, index_head_dim))):
        expected = f"[B={batch}, P={length}, {tail[0]}, {tail[1]}]"
        check_tensor(f"prefix.{name}", x, 4, expected)
        if x.shape[0] != batch or x.shape[1] != length or tuple(x.shape[2:]) != tail:
            raise ValueError(f"prefix.{name} must have shape {expected}, got {tuple(x.shape)}")
        if x.device != hidden_states.device:
            raise ValueError(f"prefix.{name} must be on {hidden_states.device} like hidden_states, got {x.device}")
