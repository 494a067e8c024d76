"""MiniMax Sparse Attention, defined in plain PyTorch: the spec in code.

Every other implementation in this package is tested against these functions.
They compute in the dtype they are given (pass float64 for a reference), work
on any device, and process queries in chunks so that a 16K-token sequence fits
in a few hundred MB of memory. They assume valid inputs: the public ops in
:mod:`msa.ops` validate, then dispatch to a fast implementation.

Layouts and argument meanings are those of the public ops (see ``msa.ops``):
batched ``[B, S, H, D]`` tensors, or packed ``[T, H, D]`` tensors with int32
``cu_seqlens`` of shape ``[n + 1]``. Returned LSEs keep the compute dtype.

Queries may be the suffix of the keys (flash-attn's bottom-right alignment):
with ``Sq <= Sk`` (batched ``[B, Sq, ...]`` queries, ``[B, Sk, ...]`` keys;
packed: ``cu_seqlens_q`` and ``cu_seqlens_k``), query ``i`` of a sequence sits
at position ``Sk - Sq + i`` and block ids count key blocks.
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


def _seqlens(cu_seqlens, cu_seqlens_q, cu_seqlens_k):
    """The query and key offsets: ``cu_seqlens`` for both, or ``cu_seqlens_q`` and ``cu_seqlens_k``."""
    if cu_seqlens is not None:
        return cu_seqlens, cu_seqlens
    return cu_seqlens_q, cu_seqlens_k


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


def rank_blocks(block_scores: torch.Tensor, local: torch.Tensor, topk: int) -> torch.Tensor:
    """The selection from block scores ``[C, G, N]`` of queries whose local blocks are ``local`` ``[C]``.

    Returns int64 ``[C, G, topk]`` in the layout of the official kernels:
    ``count = min(topk, local + 1)`` valid entries first, the ``count - 1``
    best earlier blocks by descending score (equal scores: the lower block id
    first), then the local block, then ``-1``. The scores of the local block
    and of the blocks after it are ignored.
    """
    n_blocks = block_scores.shape[-1]
    not_earlier = torch.arange(n_blocks, device=block_scores.device) >= local[:, None]
    block_scores = block_scores.masked_fill(not_earlier[:, None, :], -math.inf)
    ranked = block_scores.sort(dim=-1, descending=True, stable=True).indices[..., :topk]
    ranked = torch.nn.functional.pad(ranked, (0, topk - ranked.shape[-1]), value=-1)
    slots = torch.arange(topk, device=block_scores.device)
    n_earlier = local.clamp(max=topk - 1)[:, None, None]
    block_indices = torch.where(slots < n_earlier, ranked, -1)
    return torch.where(slots == n_earlier, local[:, None, None], block_indices)


def top_blocks_of_logits(logits: torch.Tensor, positions: torch.Tensor, block_size: int, topk: int) -> torch.Tensor:
    """:func:`rank_blocks` of queries at ``positions`` ``[C]`` from their index logits ``[C, G, N]`` over keys
    ``0 .. N - 1``: a block's score is the maximum over its keys (earlier blocks lie wholly before the query)."""
    n_keys = logits.shape[-1]
    n_blocks = math.ceil(n_keys / block_size)
    padded = torch.nn.functional.pad(logits, (0, n_blocks * block_size - n_keys), value=-math.inf)
    block_scores = padded.unflatten(-1, (n_blocks, block_size)).amax(dim=-1)
    return rank_blocks(block_scores, positions // block_size, topk)


def _select_blocks_one(index_q, index_k, block_size, topk, scale, return_lse, fp8):
    """``index_q`` ``[Sq, G, Di]``, the last queries of ``index_k`` ``[Sk, 1, Di]``."""
    n_queries, n_groups, _ = index_q.shape
    offset = index_k.shape[0] - n_queries
    block_indices = torch.empty((n_queries, n_groups, topk), dtype=torch.int64, device=index_q.device)
    lse = torch.empty(n_queries, n_groups, dtype=index_q.dtype, device=index_q.device)
    rank_q, rank_k = (rounded(x).to(x.dtype) for x in (index_q, index_k)) if fp8 else (index_q, index_k)
    for start, end in _chunks(n_queries, n_groups * (offset + n_queries)):
        positions = torch.arange(offset + start, offset + end, device=index_q.device)
        logits = scale * torch.einsum("qgd,kd->qgk", index_q[start:end], index_k[:offset + end, 0])
        rank_logits = scale * torch.einsum("qgd,kd->qgk", rank_q[start:end], rank_k[:offset + end, 0]) \
            if fp8 else logits
        block_indices[start:end] = top_blocks_of_logits(rank_logits, positions, block_size, topk)
        if return_lse:
            mask = support_mask(block_indices[start:end], positions, offset + end, block_size)
            lse[start:end] = masked_softmax(logits, mask)[1]
    return block_indices.to(torch.int32), lse


def select_blocks(index_q, index_k, *, block_size=128, topk=16, softmax_scale=None, cu_seqlens=None, return_lse=False,
                  index_dtype=None, cu_seqlens_q=None, cu_seqlens_k=None):
    """Index Branch: the ``topk - 1`` best earlier blocks and the local block per (query, group).

    Block score = max over the block's visible keys of
    ``softmax_scale * <index_q[i, g], index_k[t]>``, with both vectors rounded
    to FP8 first (:mod:`msa.fp8`) when ``index_dtype`` is ``float8_e4m3fn``.
    Returns int32 ``block_indices`` ``[..., G, topk]`` in the layout of
    :func:`top_blocks_of_logits`, and with ``return_lse`` the logsumexp of the
    (unrounded) index logits over the selected visible keys ``[..., G]``.
    """
    scale = index_q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    cu_q, cu_k = _seqlens(cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    results = [
        _select_blocks_one(iq, ik, block_size, topk, scale, return_lse, index_dtype == FP8_DTYPE)
        for iq, ik in zip(_split(index_q, cu_q), _split(index_k, cu_k))
    ]
    block_indices = _join([r[0] for r in results], cu_q)
    if not return_lse:
        return block_indices
    return block_indices, _join([r[1] for r in results], cu_q)


# --------------------------------------------------------------------------- Main Branch


def _attention_one(q, k, v, mask_fn, scale):
    """Softmax attention of ``q`` ``[Sq, Hq, D]``, the last queries of ``k, v`` ``[Sk, G, D]``.

    ``mask_fn(start, end, positions, n_keys)`` gives the bool ``[end - start,
    G, n_keys]`` key mask of queries ``start .. end - 1``, which sit at
    ``positions`` (no query sees a key at ``n_keys`` or after).
    """
    n_queries, n_heads, _ = q.shape
    offset = k.shape[0] - n_queries
    outs, lses = [], []
    for start, end in _chunks(n_queries, n_heads * (offset + n_queries)):
        positions = torch.arange(offset + start, offset + end, device=q.device)
        mask = _expand_groups(mask_fn(start, end, positions, offset + end), n_heads)
        logits = scale * torch.einsum("qhd,khd->qhk", q[start:end], _expand_groups(k[:offset + end], n_heads))
        probs, lse = masked_softmax(logits, mask)
        outs.append(torch.einsum("qhk,khd->qhd", probs, _expand_groups(v[:offset + end], n_heads)))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _causal_mask_fn(n_groups):
    def mask_fn(start, end, positions, n_keys):
        visible = torch.arange(n_keys, device=positions.device) <= positions[:, None]
        return visible[:, None, :].expand(-1, n_groups, -1)

    return mask_fn


def _sparse_mask_fn(block_indices, block_size):
    def mask_fn(start, end, positions, n_keys):
        return support_mask(block_indices[start:end], positions, n_keys, block_size)

    return mask_fn


def _attention(q, k, v, mask_fns, scale, cu_seqlens_q, cu_seqlens_k, return_lse):
    results = [
        _attention_one(qs, ks, vs, mask_fn, scale)
        for qs, ks, vs, mask_fn in zip(_split(q, cu_seqlens_q), _split(k, cu_seqlens_k), _split(v, cu_seqlens_k),
                                       mask_fns)
    ]
    out = _join([r[0] for r in results], cu_seqlens_q)
    if not return_lse:
        return out
    return out, _join([r[1] for r in results], cu_seqlens_q)


def sparse_attention(q, k, v, block_indices, *, block_size=128, softmax_scale=None, cu_seqlens=None, return_lse=False,
                     cu_seqlens_q=None, cu_seqlens_k=None):
    """Main Branch: exact softmax attention of each query over the visible keys of its blocks."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    cu_q, cu_k = _seqlens(cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    mask_fns = [_sparse_mask_fn(bi, block_size) for bi in _split(block_indices, cu_q)]
    return _attention(q, k, v, mask_fns, scale, cu_q, cu_k, return_lse)


def dense_attention(q, k, v, *, softmax_scale=None, cu_seqlens=None, return_lse=False, cu_seqlens_q=None,
                    cu_seqlens_k=None):
    """Causal GQA softmax attention, the dense baseline."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    cu_q, cu_k = _seqlens(cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    n_sequences = q.shape[0] if cu_q is None else cu_q.numel() - 1
    mask_fns = [_causal_mask_fn(k.shape[-2])] * n_sequences
    return _attention(q, k, v, mask_fns, scale, cu_q, cu_k, return_lse)


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
    n_queries, n_heads, _ = q.shape
    n_groups = k.shape[1]
    offset = k.shape[0] - n_queries
    total = index_q.new_zeros(())
    for start, end in _chunks(n_queries, n_heads * (offset + n_queries)):
        positions = torch.arange(offset + start, offset + end, device=q.device)
        mask = support_mask(block_indices[start:end], positions, offset + end, block_size)
        head_logits = scale * torch.einsum("qhd,khd->qhk", q[start:end], _expand_groups(k[:offset + end], n_heads))
        index_logits = index_scale * torch.einsum("qgd,kd->qgk", index_q[start:end], index_k[:offset + end, 0])
        total = total + support_kl(head_logits.unflatten(1, (n_groups, -1)), index_logits, mask)
    return total


def index_kl_loss(q, k, index_q, index_k, block_indices, *, block_size=128, softmax_scale=None,
                  index_softmax_scale=None, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None):
    """Mean over (query, group) rows of KL(teacher || student) on the row's support.

    Teacher: the group's mean Main-Branch softmax restricted to the support
    (detached). Student: softmax of the index logits on the support.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    index_scale = index_q.shape[-1] ** -0.5 if index_softmax_scale is None else index_softmax_scale
    q, k = q.detach(), k.detach()
    cu_q, cu_k = _seqlens(cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    total = sum(
        _index_kl_sum_one(*parts, block_size, scale, index_scale)
        for parts in zip(_split(q, cu_q), _split(k, cu_k), _split(index_q, cu_q), _split(index_k, cu_k),
                         _split(block_indices, cu_q))
    )
    n_rows = block_indices.shape[:-1].numel()
    return total / n_rows


# --------------------------------------------------------------------------- queries after a cached prefix


def msa_attention_suffix(q, k, v, index_q, index_k, *, block_size=128, topk=16, softmax_scale=None):
    """Both branches for the last ``Sq`` positions of one sequence whose ``Sk`` keys are all given.

    ``q`` ``[Sq, Hq, D]``, ``k, v`` ``[Sk, G, D]``, ``index_q`` ``[Sq, G, Di]``,
    ``index_k`` ``[Sk, Di]``. Returns ``out`` ``[Sq, Hq, D]`` and int64
    ``block_indices`` ``[Sq, G, topk]``: :func:`select_blocks` (index scale 1:
    the scale does not change the ranking) and :func:`sparse_attention`.
    """
    block_indices = select_blocks(index_q[None], index_k[None, :, None], block_size=block_size, topk=topk,
                                  softmax_scale=1.0)[0]
    out = sparse_attention(q[None], k[None], v[None], block_indices[None], block_size=block_size,
                           softmax_scale=softmax_scale)[0]
    return out, block_indices.long()
