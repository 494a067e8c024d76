"""Shared helpers of the test suite: random MSA inputs, error measures, parameters marked slow."""

from __future__ import annotations

import math

import pytest
import torch

import msa


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


def slow_except(values: list, keep: int) -> list:
    """``values`` for ``pytest.mark.parametrize``, all but ``values[keep]`` marked slow: the fast subset
    (``make test-fast``) runs that one case, ``make test`` all of them."""
    kept = keep % len(values)
    return [value if i == kept else pytest.param(value, marks=pytest.mark.slow) for i, value in enumerate(values)]


def poison_allocations(monkeypatch) -> None:
    """Make ``torch.empty``/``empty_like`` return NaN (float) or 2**30 (int) so that unwritten outputs fail."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    @torch.no_grad()
    def poison(x):
        return x.fill_(math.nan) if x.is_floating_point() else x.fill_(2**30)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))


def block_scores(index_q, index_k, block_size):
    """float64 ``[B, S, G, n_blocks]`` max-pooled index logits (-inf for invisible blocks)."""
    seqlen, index_dim = index_q.shape[1], index_q.shape[-1]
    logits = torch.einsum("bqgd,bkd->bqgk", index_q.double(), index_k[:, :, 0].double()) * index_dim**-0.5
    visible = torch.arange(seqlen, device=logits.device) <= torch.arange(seqlen, device=logits.device)[:, None]
    logits = logits.masked_fill(~visible[None, :, None, :], -math.inf)
    n_blocks = math.ceil(seqlen / block_size)
    logits = torch.nn.functional.pad(logits, (0, n_blocks * block_size - seqlen), value=-math.inf)
    return logits.unflatten(-1, (n_blocks, block_size)).amax(-1)


def assert_selection_matches(blocks, index_q, index_k, block_size, topk, tol):
    """The float64 reference selection (``msa.reference.select_blocks``), layout included: exactly with ``tol``
    0 (inputs without near-ties, rounded alike: the CPU runs); with ``tol`` > 0 (GPU runs: bf16, TF32 and their
    accumulation orders) the local block and the -1s in the same slots, distinct blocks, and in under 1% of rows
    other blocks than the reference's, each scored within ``tol`` of the reference's block in its slot."""
    ref = msa.reference.select_blocks(index_q.double(), index_k.double(), block_size=block_size, topk=topk)
    assert blocks.dtype == torch.int32 and blocks.shape == ref.shape
    if tol == 0:
        assert torch.equal(blocks, ref)
        return
    local = (torch.arange(blocks.shape[1], device=blocks.device) // block_size)[None, :, None, None]
    assert torch.equal(blocks == local, ref == local) and torch.equal(blocks < 0, ref < 0)
    ordered = blocks.sort(-1).values
    assert ((ordered[..., 1:] != ordered[..., :-1]) | (ordered[..., :-1] < 0)).all(), "blocks repeat"
    scores = torch.nn.functional.pad(block_scores(index_q, index_k, block_size), (0, 1), value=-math.inf)

    def picked(b):
        return torch.gather(scores, -1, b.long().masked_fill(b < 0, scores.shape[-1] - 1))

    ranked = (ref >= 0) & (ref != local)
    assert ((picked(blocks) - picked(ref)).abs()[ranked] <= tol).all()
    differing = (blocks != ref).any(-1).double().mean().item()
    assert differing < 0.01, f"{differing:.2%} of rows select other blocks"
