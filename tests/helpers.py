"""Shared helpers of the test suite: random MSA inputs and error measures."""

from __future__ import annotations

import torch


def rand_inputs(batch, seqlen, heads, groups, head_dim, index_dim, dtype=torch.float64, seed=0, device="cpu"):
    """Fresh random ``q, k, v, index_q, index_k`` in the batched layout."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, device=device).to(dtype)

    return (randn(batch, seqlen, heads, head_dim), randn(batch, seqlen, groups, head_dim),
            randn(batch, seqlen, groups, head_dim), randn(batch, seqlen, groups, index_dim),
            randn(batch, seqlen, 1, index_dim))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN anywhere gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def pack(x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """Concatenate the first ``seqlens[b]`` tokens of each batch row: ``[B, S, ...]`` -> ``[T, ...]``."""
    return torch.cat([x[b, :n] for b, n in enumerate(seqlens)])


def cu_seqlens_of(seqlens: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor([0] + seqlens, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
