"""MiniMax Sparse Attention, defined in plain PyTorch: the spec in code.

Every other implementation in this package is tested against these functions.
They compute in the dtype they are given (pass float64 for a reference), work
on any device, and process queries in chunks so that a 16K-token sequence fits
in a few hundred MB of memory. They assume valid inputs: the public ops in
:mod:`msa.ops` validate, then dispatch to a fast implementation.

Layouts and argument meanings are those of the public ops (see ``msa.ops``):
batched ``[B, S, H, D]`` tensors, or packed ``[T, H, D]`` tensors with int32
``cu_seqlens`` of shape ``[n + 1]``. Returned LSEs keep the compute dtype.
"""

from __future__ import annotations

import math

import torch

from msa.fp8 import FP8_DTYPE, rounded

# Elements of one chunk's [queries, heads, keys] score tensor (2**24 floats
# take 128 MiB in float64).
_CHUNK_ELEMENTS = 2**24


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of ``logits`` over the last dim, restricted to ``mask``.

    Returns ``(probs, lse)``. A row whose mask is empty gets probabilities 0
    and ``lse = -inf``, without producing NaNs in the forward or backward pass.
    """
    if logits.shape[-1] == 0:
        return logits.clone(), logits.new_full(logits.shape[:-1], -math.inf)
    logits = logits.masked_fill(~mask, -math.inf)
    row_max = logits.amax(dim=-1, keepdim=True).detach()
    row_max = row_max.masked_fill(torch.isinf(row_max), 0.0)
    unnormalized = torch.exp(logits - row_max)
    denom = unnormalized.sum(dim=-1, keepdim=True)
    probs = unnormalized / denom.clamp_min(torch.finfo(logits.dtype).tiny)
    lse = (torch.log(denom) + row_max).squeeze(-1)
    return probs, lse


def support_mask(block_indices: torch.Tensor, positions: torch.Tensor, n_keys: int, block_size: int) -> torch.Tensor:
    """Which keys a query may attend to: visible (``t <= i``) and in a listed block.

    ``block_indices`` ``[C, G, K]`` (-1 = unused), ``positions`` ``[C]`` (query
    positions in the sequence). Returns bool ``[C, G, n_keys]``.
    """
    n_blocks = math.ceil(n_keys / block_size)
    block_ids = torch.arange(n_blocks, device=block_indices.device)
    chosen = (block_indices.unsqueeze(-1) == block_ids).any(dim=-2)
    in_blocks = chosen.repeat_interleave(block_size, dim=-1)[..., :n_keys]
    visible = torch.arange(n_keys, device=positions.device) <= positions[:, None]
    return in_blocks & visible[:, None, :]


def _split(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[torch.Tensor]:
    if cu_seqlens is None:
        return list(x.unbind(0))
    bounds = cu_seqlens.tolist()
    return [x[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def _join(parts: list[torch.Tensor], cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    return torch.cat(parts) if cu_seqlens is not None else torch.stack(parts)


def _chunks(n_queries: int, elements_per_query: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, elements_per_query))
    for start in range(0, max(n_queries, 1), step):  # one empty chunk for an empty sequence
        yield start, min(n_queries, start + step)


def _expand_groups(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[..., G, N]`` -> ``[..., Hq, N]``: group ``g`` serves heads ``g*R .. g*R+R-1``."""
    return x.repeat_interleave(n_heads // x.shape[-2], dim=-2)


# --------------------------------------------------------------------------- Index Branch


def _top_blocks(logits: torch.Tensor, positions: torch.Tensor, block_size: int, topk: int) -> torch.Tensor:
    """The selection of queries at ``positions`` ``[C]`` from their index logits ``[C, G, N]`` over keys
    ``0 .. N - 1``: int64 ``[C, G, topk]``, the local block first, -1 pads."""
    n_queries, n_groups, n_keys = logits.shape
    visible = torch.arange(n_keys, device=logits.device) <= positions[:, None]
    logits = logits.masked_fill(~visible[:, None, :], -math.inf)
    n_blocks = math.ceil(n_keys / block_size)
    padded = torch.nn.functional.pad(logits, (0, n_blocks * block_size - n_keys), value=-math.inf)
    block_scores = padded.unflatten(-1, (n_blocks, block_size)).amax(dim=-1)
    local = (positions // block_size)[:, None, None].expand(-1, n_groups, 1)
    block_scores.scatter_(-1, local, math.inf)
    top_scores, top_blocks = block_scores.topk(min(topk, n_blocks), dim=-1)
    block_indices = torch.full((n_queries, n_groups, topk), -1, dtype=torch.int64, device=logits.device)
    block_indices[..., : top_blocks.shape[-1]] = top_blocks.masked_fill(top_scores == -math.inf, -1)
    return block_indices


def _select_blocks_one(index_q, index_k, block_size, topk, scale, return_lse, fp8):
    seqlen, n_groups, _ = index_q.shape
    block_indices = torch.empty((seqlen, n_groups, topk), dtype=torch.int64, device=index_q.device)
    lse = torch.empty(seqlen, n_groups, dtype=index_q.dtype, device=index_q.device)
    rank_q, rank_k = (rounded(x).to(x.dtype) for x in (index_q, index_k)) if fp8 else (index_q, index_k)
    for start, end in _chunks(seqlen, n_groups * seqlen):
        positions = torch.arange(start, end, device=index_q.device)
        logits = scale * torch.einsum("qgd,kd->qgk", index_q[start:end], index_k[:end, 0])
        rank_logits = scale * torch.einsum("qgd,kd->qgk", rank_q[start:end], rank_k[:end, 0]) if fp8 else logits
        block_indices[start:end] = _top_blocks(rank_logits, positions, block_size, topk)
        if return_lse:
            mask = support_mask(block_indices[start:end], positions, end, block_size)
            lse[start:end] = masked_softmax(logits, mask)[1]
    return block_indices.to(torch.int32), lse


def select_blocks(index_q, index_k, *, block_size=128, topk=16, softmax_scale=None, cu_seqlens=None, return_lse=False,
                  index_dtype=None):
    """Index Branch: the local block plus the ``topk - 1`` best earlier blocks per (query, group).

    Block score = max over the block's visible keys of
    ``softmax_scale * <index_q[i, g], index_k[t]>``, with both vectors rounded
    to FP8 first (:mod:`msa.fp8`) when ``index_dtype`` is ``float8_e4m3fn``.
    Returns int32 ``block_indices`` ``[..., G, topk]`` (-1 pads), and with
    ``return_lse`` the logsumexp of the (unrounded) index logits over the
    selected visible keys ``[..., G]``.
    """
    scale = index_q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    results = [
        _select_blocks_one(iq, ik, block_size, topk, scale, return_lse, index_dtype == FP8_DTYPE)
        for iq, ik in zip(_split(index_q, cu_seqlens), _split(index_k, cu_seqlens))
    ]
    block_indices = _join([r[0] for r in results], cu_seqlens)
    if not return_lse:
        return block_indices
    return block_indices, _join([r[1] for r in results], cu_seqlens)


# --------------------------------------------------------------------------- Main Branch


def _attention_one(q, k, v, mask_fn, scale):
    """Softmax attention of ``q`` ``[S, Hq, D]`` over ``k, v`` ``[S, G, D]``.

    ``mask_fn(start, end)`` gives the bool ``[end - start, G, end]`` key mask of
    queries ``start .. end - 1`` (queries never see keys past ``end - 1``).
    """
    seqlen, n_heads, _ = q.shape
    outs, lses = [], []
    for start, end in _chunks(seqlen, n_heads * seqlen):
        mask = _expand_groups(mask_fn(start, end), n_heads)
        logits = scale * torch.einsum("qhd,khd->qhk", q[start:end], _expand_groups(k[:end], n_heads))
        probs, lse = masked_softmax(logits, mask)
        outs.append(torch.einsum("qhk,khd->qhd", probs, _expand_groups(v[:end], n_heads)))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _causal_mask_fn(n_groups, device):
    def mask_fn(start, end):
        visible = torch.arange(end, device=device) <= torch.arange(start, end, device=device)[:, None]
        return visible[:, None, :].expand(-1, n_groups, -1)

    return mask_fn


def _sparse_mask_fn(block_indices, block_size):
    def mask_fn(start, end):
        positions = torch.arange(start, end, device=block_indices.device)
        return support_mask(block_indices[start:end], positions, end, block_size)

    return mask_fn


def _attention(q, k, v, mask_fns, scale, cu_seqlens, return_lse):
    results = [
        _attention_one(qs, ks, vs, mask_fn, scale)
        for qs, ks, vs, mask_fn in zip(_split(q, cu_seqlens), _split(k, cu_seqlens), _split(v, cu_seqlens), mask_fns)
    ]
    out = _join([r[0] for r in results], cu_seqlens)
    if not return_lse:
        return out
    return out, _join([r[1] for r in results], cu_seqlens)


def sparse_attention(q, k, v, block_indices, *, block_size=128, softmax_scale=None, cu_seqlens=None, return_lse=False):
    """Main Branch: exact softmax attention of each query over the visible keys of its blocks."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    mask_fns = [_sparse_mask_fn(bi, block_size) for bi in _split(block_indices, cu_seqlens)]
    return _attention(q, k, v, mask_fns, scale, cu_seqlens, return_lse)


def dense_attention(q, k, v, *, softmax_scale=None, cu_seqlens=None, return_lse=False):
    """Causal GQA softmax attention, the dense baseline."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    n_sequences = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    mask_fns = [_causal_mask_fn(k.shape[-2], q.device)] * n_sequences
    return _attention(q, k, v, mask_fns, scale, cu_seqlens, return_lse)


# --------------------------------------------------------------------------- KL alignment loss


def support_kl(head_logits: torch.Tensor, index_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(teacher || student) on the support ``mask``.

    ``head_logits`` ``[C, G, R, N]``: scaled Main-Branch logits of the R query
    heads of each group (the teacher is their mean softmax, detached);
    ``index_logits`` ``[C, G, N]``; ``mask`` bool ``[C, G, N]``.
    """
    with torch.no_grad():
        head_probs, _ = masked_softmax(head_logits, mask.unsqueeze(2))
        teacher = head_probs.mean(dim=2)
    _, index_lse = masked_softmax(index_logits, mask)
    log_student = torch.where(mask, index_logits - index_lse.unsqueeze(-1), 0.0)
    return (torch.xlogy(teacher, teacher) - teacher * log_student).sum()


def _index_kl_sum_one(q, k, index_q, index_k, block_indices, block_size, scale, index_scale):
    seqlen, n_heads, _ = q.shape
    n_groups = k.shape[1]
    total = index_q.new_zeros(())
    for start, end in _chunks(seqlen, n_heads * seqlen):
        positions = torch.arange(start, end, device=q.device)
        mask = support_mask(block_indices[start:end], positions, end, block_size)
        head_logits = scale * torch.einsum("qhd,khd->qhk", q[start:end], _expand_groups(k[:end], n_heads))
        index_logits = index_scale * torch.einsum("qgd,kd->qgk", index_q[start:end], index_k[:end, 0])
        total = total + support_kl(head_logits.unflatten(1, (n_groups, -1)), index_logits, mask)
    return total


def index_kl_loss(q, k, index_q, index_k, block_indices, *, block_size=128, softmax_scale=None,
                  index_softmax_scale=None, cu_seqlens=None):
    """Mean over (query, group) rows of KL(teacher || student) on the row's support.

    Teacher: the group's mean Main-Branch softmax restricted to the support
    (detached). Student: softmax of the index logits on the support.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    index_scale = index_q.shape[-1] ** -0.5 if index_softmax_scale is None else index_softmax_scale
    q, k = q.detach(), k.detach()
    total = sum(
        _index_kl_sum_one(*parts, block_size, scale, index_scale)
        for parts in zip(*(_split(x, cu_seqlens) for x in (q, k, index_q, index_k, block_indices)))
    )
    n_rows = block_indices.shape[:-1].numel()
    return total / n_rows


# --------------------------------------------------------------------------- queries after a cached prefix


def msa_attention_suffix(q, k, v, index_q, index_k, *, block_size=128, topk=16, softmax_scale=None):
    """Both branches for the last ``Sq`` positions of one sequence whose ``Sk`` keys are all given.

    The decode / chunked-prefill case (flash-attn's bottom-right alignment):
    query ``i`` sits at position ``Sk - Sq + i``. ``q`` ``[Sq, Hq, D]``, ``k, v``
    ``[Sk, G, D]``, ``index_q`` ``[Sq, G, Di]``, ``index_k`` ``[Sk, Di]``.
    Returns ``out`` ``[Sq, Hq, D]`` and int64 ``block_indices`` ``[Sq, G, topk]``
    (-1 pads), the same selection and attention as :func:`select_blocks` and
    :func:`sparse_attention` give those rows on the whole sequence.
    """
    n_queries, n_heads, _ = q.shape
    n_keys = k.shape[0]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    positions = torch.arange(n_keys - n_queries, n_keys, device=q.device)
    # the index scale is left out: it does not change the ranking
    block_indices = _top_blocks(torch.einsum("qgd,kd->qgk", index_q, index_k), positions, block_size, topk)

    mask = _expand_groups(support_mask(block_indices, positions, n_keys, block_size), n_heads)
    logits = scale * torch.einsum("qhd,khd->qhk", q, _expand_groups(k, n_heads))
    probs, _ = masked_softmax(logits, mask)
    return torch.einsum("qhk,khd->qhd", probs, _expand_groups(v, n_heads)), block_indices
