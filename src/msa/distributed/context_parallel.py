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
equal those of one process running the whole sequence. The three
all-gathers are issued at once; with a ``select`` callable the blocks are
selected while those of the keys and values are still in flight (see
:func:`_attend_parts`).

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
from typing import NamedTuple

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


class _Pending:
    """A collective in flight, shared by the two autograd nodes of an all-gather: the one that issues it and the
    one that waits on it (in the backward pass the roles swap, for the reduce-scatter of the gradient)."""

    __slots__ = ("work", "result")

    def __init__(self):
        self.work, self.result = None, None


class _StartAllGather(torch.autograd.Function):
    """Issues the all-gather of packed shards ``[T / W, ...]`` into rank-major ``[T, ...]`` (rank ``r``'s shard in
    rows ``r T / W ..``) and returns its output before the data is there: :class:`_FinishAllGather` waits. Backward
    pass: waits on the reduce-scatter that :class:`_FinishAllGather`'s backward issued; returns its result."""

    @staticmethod
    def forward(ctx, local, pending, group):
        world_size = dist.get_world_size(group)
        gathered = local.new_empty((world_size * local.shape[0], *local.shape[1:]))
        pending.work = dist.all_gather_into_tensor(gathered, local.contiguous(), group=group, async_op=True)
        ctx.pending = pending
        return gathered

    @staticmethod
    def backward(ctx, grad):
        ctx.pending.work.wait()
        local, ctx.pending.result = ctx.pending.result, None
        return local, None, None


class _FinishAllGather(torch.autograd.Function):
    """Waits on the all-gather that :class:`_StartAllGather` issued and returns its output. Backward pass: issues
    the reduce-scatter of the gradient without waiting (:class:`_StartAllGather`'s backward waits), so that autograd
    issues the next ones (the other gathered tensors') before blocking on any."""

    @staticmethod
    def forward(ctx, gathered, pending, group):
        pending.work.wait()
        ctx.pending, ctx.group = pending, group
        return gathered

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        ctx.pending.result = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        ctx.pending.work = dist.reduce_scatter_tensor(ctx.pending.result, grad, group=ctx.group, async_op=True)
        return grad, None, None  # read by the reduce-scatter in flight; _StartAllGather's backward ignores it


def _start_all_gather(local: torch.Tensor, group) -> tuple[torch.Tensor, _Pending]:
    """Issue the differentiable all-gather of ``local`` ``[T / W, ...]``; :func:`_finish_all_gather` waits on it."""
    pending = _Pending()
    return _StartAllGather.apply(local, pending, group), pending


def _finish_all_gather(gathered: torch.Tensor, pending: _Pending, group) -> torch.Tensor:
    """Wait on an all-gather of :func:`_start_all_gather`: the rank-major shards of all ranks ``[T, ...]``."""
    return _FinishAllGather.apply(gathered, pending, group)


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
    # batched: the shards' positions [S / W, B, ...] are gathered, those of all the sequences at once
    rows, lengths = (x, seqlens) if cu_seqlens is not None else (x.transpose(0, 1), seqlens[:1])
    gathered = _finish_all_gather(*_start_all_gather(rows, group), group)
    gathered = gathered.index_select(0, _gather_order(lengths, world_size, x.device))
    return gathered if cu_seqlens is not None else gathered.transpose(0, 1)


def context_parallel_attention(attention: Callable, q, k, v, index_q, index_k, *, group=None,
                               cu_seqlens: torch.Tensor | None = None, select: Callable | None = None):
    """``attention`` of this rank's queries against the keys of the whole sequences.

    Args:
        attention: ``attention(q, k, v, index_q, index_k, *, cu_seqlens_q,
            cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` on packed tensors whose
            queries are the last of their sequences' keys; returns ``(out,
            kl_loss or None, block_indices)`` with ``kl_loss`` the mean over
            the call's (query, group) rows (e.g.
            :func:`msa.nn.index_branch.msa_attention` with its settings bound).
            With ``select``, it also takes ``selection=``.
        q: this rank's shard ``[B, S / W, Hq, D]`` (packed ``[T / W, Hq, D]``).
        k, v: ``[B, S / W, G, D]``; index_q: ``[B, S / W, G, Di]``;
            index_k: ``[B, S / W, 1, Di]`` (packed likewise).
        group: the context-parallel process group (default: the world).
        cu_seqlens: int32 ``[n + 1]`` offsets of the whole packed sequences.
        select: ``select(index_q, index_k, **varlen)`` (``varlen`` as
            ``attention``'s) -> the selection that ``attention(...,
            selection=...)`` takes in place of its own (e.g.
            :func:`msa.nn.index_branch.msa_select` with the settings of
            ``attention``'s :func:`~msa.nn.index_branch.msa_attention`). Over
            more than one rank it runs while the all-gathers of ``k`` and
            ``v`` are in flight; without it ``attention`` selects after them.

    Returns ``(out, kl_loss, block_indices)``: this rank's rows of the
    output and of the selection, and the KL loss's mean over all ranks' rows
    (None when ``attention`` computes none).
    """
    world_size, _ = _group_info(group)
    batched = cu_seqlens is None
    seqlens = _seqlens(q, cu_seqlens, world_size, local=True)
    queries, keys, values, index_queries, index_keys = (x.flatten(0, 1) if batched else x
                                                        for x in (q, k, v, index_q, index_k))
    if world_size == 1:  # nothing to gather or reorder: the whole sequences at once, the plain ops
        offsets = torch.tensor([0, *seqlens], dtype=torch.int32, device=q.device).cumsum(0, dtype=torch.int32)
        out, kl_loss, block_indices = attention(queries, keys, values, index_queries, index_keys,
                                                cu_seqlens_q=offsets, cu_seqlens_k=offsets,
                                                max_seqlen_q=max(seqlens, default=0),
                                                max_seqlen_k=max(seqlens, default=0))
    else:
        _check_lengths(seqlens, world_size, "q" if batched else "cu_seqlens")
        parts = _attend_parts(attention, select, queries, keys, values, index_queries, index_keys, seqlens, group)
        out, block_indices = (torch.cat([result[i] for _, result in parts]) for i in (0, 2))
        if len(seqlens) > 1:  # the two chunks of one sequence follow each other in the shard; of several, not
            local_order = torch.argsort(torch.cat([rows for rows, _ in parts]))
            out, block_indices = out.index_select(0, local_order), block_indices.index_select(0, local_order)
        kl_loss = _mean_kl([result for _, result in parts], sum(seqlens) * index_q.shape[-2], group)
    if batched:
        out, block_indices = out.unflatten(0, q.shape[:2]), block_indices.unflatten(0, q.shape[:2])
    return out, kl_loss, block_indices


def _mean_kl(results: list[tuple], n_rows: int, group) -> torch.Tensor | None:
    """The KL loss's mean over the whole sequences' ``n_rows`` (token, group) rows, from this rank's chunks' means
    (``attention``'s results; None where it computes no KL loss); its gradient flows into this rank's share only."""
    kl_parts = [kl * blocks.shape[:-1].numel() for _, kl, blocks in results if kl is not None]
    if not kl_parts:
        return None
    share = sum(kl_parts) / n_rows
    total = share.detach().clone()
    dist.all_reduce(total, group=group)
    return share + (total - share.detach())


class _Part(NamedTuple):
    """One of this rank's two chunks of every sequence, as a suffix of the key prefix that ends with it."""

    rows: torch.Tensor  # int64 [Tq]: the chunk's rows of this rank's packed shard
    key_rows: torch.Tensor  # int64 [Tk]: its key prefix's rows of the rank-major all-gathered shards
    varlen: dict  # cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k of the chunk against its prefix


def _part(seqlens: list[int], world_size: int, part: int, chunk_index: int, order: torch.Tensor) -> _Part:
    """The ``part``-th local chunk of every sequence, its chunk ``chunk_index`` (``order``: :func:`_gather_order`)."""
    device = order.device
    chunks = [seqlen // (2 * world_size) for seqlen in seqlens]
    prefixes = [(chunk_index + 1) * chunk for chunk in chunks]  # the keys up to the chunk's last query
    starts = [sum(seqlens[:i]) for i in range(len(seqlens))]
    rows = torch.cat([torch.arange(start // world_size + part * chunk, start // world_size + (part + 1) * chunk)
                      for start, chunk in zip(starts, chunks)]).to(device)
    key_rows = torch.cat([torch.arange(start, start + prefix) for start, prefix in zip(starts, prefixes)]).to(device)
    cu_seqlens_q, cu_seqlens_k = (torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
                                  for lengths in (chunks, prefixes))
    varlen = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max(chunks),
                  max_seqlen_k=max(prefixes))
    return _Part(rows, order.index_select(0, key_rows), varlen)


def _attend_parts(attention, select, queries, keys, values, index_queries, index_keys, seqlens, group):
    """``attention`` of this rank's two chunks of every sequence against the whole sequences' keys (packed
    shards in, as :func:`context_parallel_attention` takes them). Returns each chunk's local rows and
    ``attention``'s result.

    The three all-gathers are issued at once, in the order they are needed (on NCCL a group's collectives run
    one after another on its own stream): the index keys, waited on first for the selection, then the keys and
    values, waited on only after ``select`` has scored both chunks. In the backward pass autograd reaches the
    gathers' nodes in the reverse order: the reduce-scatters of dV, dK and d index_k are all issued before any is
    waited on."""
    index_keys, keys, values = (_start_all_gather(x, group) for x in (index_keys, keys, values))
    world_size, rank = _group_info(group)
    order = _gather_order(seqlens, world_size, queries.device)
    parts = [_part(seqlens, world_size, part, chunk_index, order)
             for part, chunk_index in enumerate((rank, 2 * world_size - 1 - rank))]
    index_keys = _finish_all_gather(*index_keys, group)
    index_inputs = [(index_queries.index_select(0, part.rows), index_keys.index_select(0, part.key_rows))
                    for part in parts]
    selections = [{} if select is None else {"selection": select(*inputs, **part.varlen)}
                  for part, inputs in zip(parts, index_inputs)]
    keys, values = _finish_all_gather(*keys, group), _finish_all_gather(*values, group)
    return [(part.rows, attention(queries.index_select(0, part.rows), keys.index_select(0, part.key_rows),
                                  values.index_select(0, part.key_rows), *inputs, **part.varlen, **selection))
            for part, inputs, selection in zip(parts, index_inputs, selections)]
