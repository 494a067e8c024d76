"""Context parallelism: one sequence's attention over the ranks of a process group.

Each of the ``W`` ranks holds ``1 / W`` of every sequence as two zig-zag
chunks: the sequence is cut into ``2W`` equal chunks and rank ``r`` holds
chunks ``r`` and ``2W - 1 - r``, so that every rank gets the same causal work
(as ring attention and Megatron's context parallelism balance it). MSA reads
at most ``topk * block_size`` keys per query, so the ranks all-gather the
keys, values and index keys of the whole sequence (their gradients are
reduce-scattered in the backward pass) and each local chunk of queries
attends as the suffix of the key prefix that ends with it. No ring of
partial results is needed: the outputs, LSEs, the KL loss and every gradient
equal those of one process running the whole sequence.

Layouts: batched ``[B, S / W, H, D]`` shards of sequences of ``S`` tokens,
or packed ``[T / W, H, D]`` shards with the ``cu_seqlens`` of the whole
packed sequences; every length must be a multiple of ``2 W``.
:func:`shard` cuts full tensors into a rank's shard, :func:`gather` puts the
shards back together (differentiable).

The KL loss: the attention returns each call's mean over its (query, group)
rows; :func:`context_parallel_attention` returns the mean over the rows of
all ranks, the same value on every rank, whose gradient is this rank's share:
sum the parameters' gradients over the group (as data parallelism over a
``(dp, cp)`` mesh does once the loss is scaled by the ``cp`` size).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def _check_lengths(seqlens: list[int], world_size: int, name: str) -> None:
    for index, seqlen in enumerate(seqlens):
        if seqlen % (2 * world_size):
            raise ValueError(f"{name}: sequence {index} has {seqlen} tokens; context parallelism over {world_size} "
                             f"ranks needs lengths that are multiples of 2 x {world_size} = {2 * world_size}")


def zigzag_rows(seqlens: list[int], world_size: int, rank: int, device=None) -> torch.Tensor:
    """int64 ``[T / W]``: the rows of the packed sequences (lengths ``seqlens``) that ``rank`` holds, in its order:
    for each sequence, its chunk ``rank`` then its chunk ``2W - 1 - rank``."""
    rows, start = [], 0
    for seqlen in seqlens:
        chunk = seqlen // (2 * world_size)
        for index in (rank, 2 * world_size - 1 - rank):
            rows.append(torch.arange(start + index * chunk, start + (index + 1) * chunk, device=device))
        start += seqlen
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64, device=device)


def _group_info(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _seqlens(x: torch.Tensor, cu_seqlens: torch.Tensor | None, world_size: int, local: bool) -> list[int]:
    """The lengths of the whole sequences: from ``cu_seqlens``, or the batched layout's (``x`` a shard if
    ``local``)."""
    if cu_seqlens is not None:
        return cu_seqlens.diff().tolist()
    return [x.shape[1] * (world_size if local else 1)] * x.shape[0]


def shard(x: torch.Tensor, group=None, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's zig-zag shard of ``x``: batched ``[B, S, ...]`` -> ``[B, S / W, ...]``, packed ``[T, ...]`` (with
    the whole sequences' ``cu_seqlens``) -> ``[T / W, ...]``."""
    world_size, rank = _group_info(group)
    if world_size == 1:
        return x
    seqlens = _seqlens(x, cu_seqlens, world_size, local=False)
    _check_lengths(seqlens, world_size, "shard")
    if cu_seqlens is not None:
        return x.index_select(0, zigzag_rows(seqlens, world_size, rank, x.device))
    return x.index_select(1, zigzag_rows(seqlens[:1], world_size, rank, x.device))


class _AllGather(torch.autograd.Function):
    """All-gather of packed shards ``[T / W, ...]`` into the packed sequences ``[T, ...]`` (rows reordered by
    ``order``: the gathered row of each packed row); the backward pass reduce-scatters the gradient."""

    @staticmethod
    def forward(ctx, local, order, group):
        world_size = dist.get_world_size(group)
        gathered = local.new_empty((world_size * local.shape[0], *local.shape[1:]))
        dist.all_gather_into_tensor(gathered, local.contiguous(), group=group)
        ctx.save_for_backward(order)
        ctx.group, ctx.local_rows = group, local.shape[0]
        return gathered.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        world_size = dist.get_world_size(ctx.group)
        gathered = grad.new_empty((world_size * ctx.local_rows, *grad.shape[1:])).index_copy_(0, order, grad)
        local = grad.new_empty((ctx.local_rows, *grad.shape[1:]))
        dist.reduce_scatter_tensor(local, gathered, group=ctx.group)
        return local, None, None


def _gather_order(seqlens: list[int], world_size: int, device) -> torch.Tensor:
    """int64 ``[T]``: for each row of the packed sequences, its row in the rank-major all-gathered shards."""
    local_rows = sum(seqlens) // world_size
    order = torch.empty(sum(seqlens), dtype=torch.int64, device=device)
    for rank in range(world_size):
        rows = zigzag_rows(seqlens, world_size, rank, device)
        order[rows] = torch.arange(rank * local_rows, (rank + 1) * local_rows, device=device)
    return order


def gather(x: torch.Tensor, group=None, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`shard`, differentiable: every rank gets the whole tensor; in the backward pass each
    rank gets the sum over ranks of the gradients of its rows."""
    world_size, _ = _group_info(group)
    if world_size == 1:
        return x
    seqlens = _seqlens(x, cu_seqlens, world_size, local=True)
    _check_lengths(seqlens, world_size, "gather")
    if cu_seqlens is not None:
        return _AllGather.apply(x, _gather_order(seqlens, world_size, x.device), group)
    order = _gather_order(seqlens[:1], world_size, x.device)
    return _AllGather.apply(x.transpose(0, 1), order, group).transpose(0, 1)


def context_parallel_attention(attention: Callable, q, k, v, index_q, index_k, *, group=None,
                               cu_seqlens: torch.Tensor | None = None):
    """``attention`` of this rank's queries against the keys of the whole sequences.

    Args:
        attention: ``attention(q, k, v, index_q, index_k, *, cu_seqlens_q,
            cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` on packed tensors whose
            queries are the last of their sequences' keys; returns ``(out,
            kl_loss or None, block_indices)`` with ``kl_loss`` the mean over
            the call's (query, group) rows (e.g.
            :func:`msa.nn.index_branch.msa_attention` with its settings bound).
        q: this rank's shard ``[B, S / W, Hq, D]`` (packed ``[T / W, Hq, D]``).
        k, v: ``[B, S / W, G, D]``; index_q: ``[B, S / W, G, Di]``;
            index_k: ``[B, S / W, 1, Di]`` (packed likewise).
        group: the context-parallel process group (default: the world).
        cu_seqlens: int32 ``[n + 1]`` offsets of the whole packed sequences.

    Returns ``(out, kl_loss, block_indices)``: this rank's rows of the
    output and of the selection, and the KL loss's mean over all ranks' rows
    (None when ``attention`` computes none).
    """
    world_size, rank = _group_info(group)
    batched = cu_seqlens is None
    seqlens = _seqlens(q, cu_seqlens, world_size, local=True)
    queries, keys, values, index_queries, index_keys = (x.flatten(0, 1) if batched else x
                                                        for x in (q, k, v, index_q, index_k))
    if world_size == 1:  # nothing to gather: the whole sequences at once
        offsets = torch.tensor([0, *seqlens], dtype=torch.int32, device=q.device).cumsum(0, dtype=torch.int32)
        parts = [(torch.arange(queries.shape[0], device=q.device),
                  attention(queries, keys, values, index_queries, index_keys, cu_seqlens_q=offsets,
                            cu_seqlens_k=offsets, max_seqlen_q=max(seqlens, default=0),
                            max_seqlen_k=max(seqlens, default=0)))]
    else:
        _check_lengths(seqlens, world_size, "q" if batched else "cu_seqlens")
        order = _gather_order(seqlens, world_size, q.device)
        keys, values, index_keys = (_AllGather.apply(x, order, group) for x in (keys, values, index_keys))
        parts = [_attend_part(attention, queries, keys, values, index_queries, index_keys, seqlens, world_size, part,
                              chunk_index)
                 for part, chunk_index in enumerate((rank, 2 * world_size - 1 - rank))]

    local_order = torch.argsort(torch.cat([rows for rows, _ in parts]))
    out, block_indices = (torch.cat([result[i] for _, result in parts]).index_select(0, local_order) for i in (0, 2))
    if batched:
        out, block_indices = out.unflatten(0, q.shape[:2]), block_indices.unflatten(0, q.shape[:2])
    kl_parts = [result[1] * result[2].shape[:-1].numel() for _, result in parts if result[1] is not None]
    if not kl_parts:
        return out, None, block_indices
    share = sum(kl_parts) / (sum(seqlens) * index_q.shape[-2])
    total = share.detach().clone()
    if world_size > 1:
        dist.all_reduce(total, group=group)
    return out, share + (total - share.detach()), block_indices


def _attend_part(attention, queries, keys, values, index_queries, index_keys, seqlens, world_size, part,
                 chunk_index):
    """``attention`` of the ``part``-th local chunk of every sequence (its chunk ``chunk_index``) against the key
    prefix ending with it. Returns the chunk's local rows and ``attention``'s result."""
    device = queries.device
    chunks = [seqlen // (2 * world_size) for seqlen in seqlens]
    prefixes = [(chunk_index + 1) * chunk for chunk in chunks]  # the keys up to the chunk's last query
    starts = [sum(seqlens[:i]) for i in range(len(seqlens))]
    rows = torch.cat([torch.arange(start // world_size + part * chunk, start // world_size + (part + 1) * chunk)
                      for start, chunk in zip(starts, chunks)]).to(device)
    key_rows = torch.cat([torch.arange(start, start + prefix) for start, prefix in zip(starts, prefixes)]).to(device)
    cu_seqlens_q = torch.tensor([0, *chunks], dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
    cu_seqlens_k = torch.tensor([0, *prefixes], dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
    return rows, attention(queries.index_select(0, rows), keys.index_select(0, key_rows),
                           values.index_select(0, key_rows), index_queries.index_select(0, rows),
                           index_keys.index_select(0, key_rows), cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                           max_seqlen_q=max(chunks), max_seqlen_k=max(prefixes))
