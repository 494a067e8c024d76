"""The implementations behind the public ops as ``torch.library`` custom operators (namespace ``msa``).

Each operator has a fake implementation (output shapes and dtypes without
computing them), and the differentiable ones register their backward with
``register_autograd``, so that ``torch.compile(fullgraph=True)`` traces
through the public ops, forward and backward, without graph breaks.
Operators take packed contiguous tensors, ints, floats and bools; the
validation and the :class:`msa.ops.selection.Selection` stay in the Python
layer above them. ``torch_*`` operators run the PyTorch path
(:mod:`msa.ops.block_select`, :mod:`msa.ops.block_outer`), ``triton_*`` ones
the launchers of :mod:`msa.kernels`. The differentiable operators take the
call's ``deterministic`` (resolved by the ops: a bool) for their backward.

``tile_plan`` tiles a selection for the PyTorch path once (its outputs'
sizes depend on the selection's values, so its fake implementation gives
them unbacked sizes); ``torch_sparse_attention`` with its backward and
``torch_index_kl`` all take its tensors.
"""

from __future__ import annotations

import collections

import torch
from torch import Tensor
from torch.library import custom_op, get_ctx

from msa.fp8 import quantize_rows
from msa.ops import block_outer, block_select


# --------------------------------------------------------------------------- the PyTorch path

@custom_op("msa::tile_plan", mutates_args=())
def tile_plan(block_indices: Tensor, cu_seqlens: Tensor, cu_seqlens_k: Tensor, n_keys: int, block_size: int,
              heads_per_group: int, pairs_per_chunk: int) -> list[Tensor]:
    """The tensors of :func:`msa.ops.block_outer.plan`'s :class:`~msa.ops.block_outer.TilePlan` (queries of
    ``cu_seqlens``, the last of their sequences' ``n_keys`` keys of ``cu_seqlens_k``)."""
    return list(block_outer.plan(block_indices, cu_seqlens, block_size, heads_per_group, pairs_per_chunk,
                                 cu_seqlens_k=cu_seqlens_k, n_keys=n_keys))


@tile_plan.register_fake
def _(block_indices, cu_seqlens, cu_seqlens_k, n_keys, block_size, heads_per_group, pairs_per_chunk):
    n_tokens, n_groups, topk = block_indices.shape
    n_tiles, n_masked = get_ctx().new_dynamic_size(), get_ctx().new_dynamic_size()
    pairs_per_tile = max(1, block_outer._TILE_ROWS // heads_per_group)
    n_chunks = -(-n_tokens // max(1, pairs_per_chunk // (n_groups * topk)))
    def empty(*shape, dtype=torch.int64):
        return block_indices.new_empty(shape, dtype=dtype)

    return [empty(n_tiles * pairs_per_tile), empty(n_tiles * pairs_per_tile, dtype=torch.bool),
            empty(n_tiles, block_size), empty(n_tiles, block_size),
            empty(n_masked, pairs_per_tile, block_size, dtype=torch.bool), empty(n_tokens * n_groups, topk),
            empty(n_chunks, 4)]


def _tiles(plan_tensors: list[Tensor]):
    return block_outer.tiles_of(block_outer.TilePlan(*plan_tensors))


@custom_op("msa::torch_sparse_attention", mutates_args=())
def torch_sparse_attention(q: Tensor, k: Tensor, v: Tensor, plan_tensors: list[Tensor], block_size: int,
                           scale: float, deterministic: bool) -> tuple[Tensor, Tensor]:
    """``out`` ``[T, Hq, D]`` and ``lse`` ``[T, Hq]`` over the tiles of ``plan_tensors`` (:func:`tile_plan`)."""
    return block_outer.attention_forward(q, k, v, _tiles(plan_tensors), block_size, scale, deterministic)


@torch_sparse_attention.register_fake
def _(q, k, v, plan_tensors, block_size, scale, deterministic):
    return torch.empty_like(q), q.new_empty(q.shape[:2])


@custom_op("msa::torch_sparse_attention_backward", mutates_args=())
def torch_sparse_attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                                    plan_tensors: list[Tensor], block_size: int, scale: float,
                                    deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    return block_outer.attention_backward(q, k, v, out, lse, dout.contiguous(), _tiles(plan_tensors), block_size,
                                          scale, deterministic)


@torch_sparse_attention_backward.register_fake
def _(q, k, v, out, lse, dout, plan_tensors, block_size, scale, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_sparse_attention(ctx, inputs, output):
    q, k, v, plan_tensors, ctx.block_size, ctx.scale, ctx.deterministic = inputs
    ctx.save_for_backward(q, k, v, *output, *plan_tensors)


def _sparse_attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, *plan_tensors = ctx.saved_tensors
    grads = torch_sparse_attention_backward(q, k, v, out, lse, dout, plan_tensors, ctx.block_size, ctx.scale,
                                            ctx.deterministic)
    return *grads, [None] * len(plan_tensors), None, None, None


torch_sparse_attention.register_autograd(_sparse_attention_backward, setup_context=_save_sparse_attention)


@custom_op("msa::torch_index_kl", mutates_args=())
def torch_index_kl(q: Tensor, k: Tensor, index_q: Tensor, index_k: Tensor, plan_tensors: list[Tensor],
                   block_size: int, scale: float, index_scale: float, main_lse: Tensor | None,
                   with_grads: bool, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The summed row KLs and, with ``with_grads``, their gradients in ``index_q`` and ``index_k`` (computed in this
    pass, the teacher evaluated once; empty without)."""
    total, d_index_q, d_index_k = block_outer.index_kl(q, k, index_q, index_k, _tiles(plan_tensors), block_size,
                                                       scale, index_scale, main_lse, with_grads, deterministic)
    if not with_grads:
        return total, index_q.new_empty(0), index_k.new_empty(0)
    return total, d_index_q, d_index_k


@torch_index_kl.register_fake
def _(q, k, index_q, index_k, plan_tensors, block_size, scale, index_scale, main_lse, with_grads, deterministic):
    if not with_grads:
        return q.new_empty(()), index_q.new_empty(0), index_k.new_empty(0)
    return q.new_empty(()), torch.empty_like(index_q), torch.empty_like(index_k)


def _save_index_kl(ctx, inputs, output):
    ctx.n_plan_tensors = len(inputs[4])
    ctx.save_for_backward(*output[1:])


def _index_kl_backward(ctx, grad, _d_index_q_grad, _d_index_k_grad):
    d_index_q, d_index_k = ctx.saved_tensors
    return None, None, d_index_q * grad, d_index_k * grad, [None] * ctx.n_plan_tensors, *(None,) * 6


torch_index_kl.register_autograd(_index_kl_backward, setup_context=_save_index_kl)


@custom_op("msa::torch_select_blocks", mutates_args=())
def torch_select_blocks(index_q: Tensor, index_k: Tensor, cu_seqlens: Tensor, cu_seqlens_k: Tensor, block_size: int,
                        topk: int, scale: float, fp8: bool) -> Tensor:
    return block_select.select_blocks(index_q, index_k, cu_seqlens, block_size, topk, scale, fp8, cu_seqlens_k)


@torch_select_blocks.register_fake
def _(index_q, index_k, cu_seqlens, cu_seqlens_k, block_size, topk, scale, fp8):
    return index_q.new_empty(*index_q.shape[:2], topk, dtype=torch.int32)


@custom_op("msa::torch_support_lse", mutates_args=())
def torch_support_lse(index_q: Tensor, index_k: Tensor, block_indices: Tensor, cu_seqlens: Tensor,
                      cu_seqlens_k: Tensor, block_size: int, scale: float) -> Tensor:
    return block_outer.support_lse(index_q, index_k, block_indices, cu_seqlens, block_size, scale, cu_seqlens_k)


@torch_support_lse.register_fake
def _(index_q, index_k, block_indices, cu_seqlens, cu_seqlens_k, block_size, scale):
    return index_q.new_empty(index_q.shape[:2])


# --------------------------------------------------------------------------- the Triton kernels
# Queries that are the last of longer key sequences (flash-attn's bottom-right alignment) come with the keys'
# ``cu_seqlens_k`` and ``max_seqlen_k`` (for the KV-outer kernels and the selection), and ``token_starts`` then holds
# the packed index of each query's first key and ``token_positions`` its position among the keys (for the
# query-outer ones: :func:`msa.varlen.suffix_positions`); all None where the queries are their sequences' tokens.
# The attention and KL operators take the selection's whole block lists as ``list_offsets`` and ``list_entries``
# (``Selection.block_lists``), or None: their launchers then invert the selection themselves.


def _lists(list_offsets, list_entries, cu_seqlens, max_seqlen, block_size, block_indices, max_seqlen_k):
    """The Triton kernels' BlockCSR of a selection inverted whole, from an operator's two tensors (or None)."""
    from msa import kernels

    return kernels.block_lists(list_offsets, list_entries, cu_seqlens, max_seqlen if max_seqlen_k is None
                               else max_seqlen_k, block_size, block_indices.shape[1])


def _optional(ctx, **tensors) -> list[Tensor]:
    """The given ones of an operator's optional tensor inputs, to save for its backward; their names on ``ctx``."""
    ctx.optional = [name for name, tensor in tensors.items() if tensor is not None]
    return [tensors[name] for name in ctx.optional]


def _saved(ctx, saved: list[Tensor]) -> dict:
    """The optional inputs that :func:`_optional` saved, by name (None where not given)."""
    return collections.defaultdict(lambda: None, zip(ctx.optional, saved))


@custom_op("msa::triton_select_blocks", mutates_args=())
def triton_select_blocks(index_q: Tensor, index_k: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int,
                         topk: int, fp8: bool, cu_seqlens_k: Tensor | None = None,
                         max_seqlen_k: int | None = None) -> Tensor:
    """int32 ``[T, G, topk]``; with ``fp8`` ranked on the FP8-quantized rows (:mod:`msa.fp8`)."""
    from msa import kernels

    keys = dict(cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k)
    if not fp8:
        return kernels.select_blocks(index_q, index_k, cu_seqlens, max_seqlen, block_size, topk, **keys)
    (rank_q, _), (rank_k, k_scale) = quantize_rows(index_q), quantize_rows(index_k[:, 0])
    return kernels.select_blocks(rank_q, rank_k, cu_seqlens, max_seqlen, block_size, topk, index_k_scale=k_scale,
                                 **keys)


@triton_select_blocks.register_fake
def _(index_q, index_k, cu_seqlens, max_seqlen, block_size, topk, fp8, cu_seqlens_k=None, max_seqlen_k=None):
    return index_q.new_empty(*index_q.shape[:2], topk, dtype=torch.int32)


@custom_op("msa::triton_support_lse", mutates_args=())
def triton_support_lse(index_q: Tensor, index_k: Tensor, block_indices: Tensor, token_starts: Tensor,
                       block_size: int, scale: float, token_positions: Tensor | None = None) -> Tensor:
    from msa import kernels

    return kernels.support_lse(index_q, index_k, block_indices, token_starts, block_size, scale,
                               token_positions=token_positions)


@triton_support_lse.register_fake
def _(index_q, index_k, block_indices, token_starts, block_size, scale, token_positions=None):
    return index_q.new_empty(index_q.shape[:2], dtype=torch.float32)


@custom_op("msa::triton_sparse_attention", mutates_args=())
def triton_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, token_starts: Tensor,
                            cu_seqlens: Tensor, max_seqlen: int, block_size: int, scale: float,
                            deterministic: bool, token_positions: Tensor | None = None,
                            cu_seqlens_k: Tensor | None = None, max_seqlen_k: int | None = None,
                            list_offsets: Tensor | None = None,
                            list_entries: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``out`` and ``lse``; ``deterministic`` picks the backward's variant (the forward is deterministic).
    ``list_offsets``, ``list_entries``: the selection inverted whole (``Selection.block_lists``), walked by the
    forward where one query chunk holds every query and by the backward, or None (each inverts it then)."""
    from msa import kernels

    lists = _lists(list_offsets, list_entries, cu_seqlens, max_seqlen, block_size, block_indices, max_seqlen_k)
    return kernels.sparse_attention_fwd(q, k, v, block_indices, token_starts, cu_seqlens, max_seqlen, block_size,
                                        scale, token_positions=token_positions, cu_seqlens_k=cu_seqlens_k,
                                        max_seqlen_k=max_seqlen_k, lists=lists)


@triton_sparse_attention.register_fake
def _(q, k, v, block_indices, token_starts, cu_seqlens, max_seqlen, block_size, scale, deterministic,
      token_positions=None, cu_seqlens_k=None, max_seqlen_k=None, list_offsets=None, list_entries=None):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


@custom_op("msa::triton_sparse_attention_backward", mutates_args=())
def triton_sparse_attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                                     block_indices: Tensor, token_starts: Tensor, cu_seqlens: Tensor,
                                     max_seqlen: int, block_size: int, scale: float, deterministic: bool,
                                     token_positions: Tensor | None = None, cu_seqlens_k: Tensor | None = None,
                                     max_seqlen_k: int | None = None,
                                     list_offsets: Tensor | None = None,
                                     list_entries: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    from msa import kernels

    lists = _lists(list_offsets, list_entries, cu_seqlens, max_seqlen, block_size, block_indices, max_seqlen_k)
    return kernels.sparse_attention_bwd(q, k, v, out, lse, dout.contiguous(), block_indices, token_starts,
                                        cu_seqlens, max_seqlen, block_size, scale, deterministic=deterministic,
                                        token_positions=token_positions, cu_seqlens_k=cu_seqlens_k,
                                        max_seqlen_k=max_seqlen_k, lists=lists)


@triton_sparse_attention_backward.register_fake
def _(q, k, v, out, lse, dout, block_indices, token_starts, cu_seqlens, max_seqlen, block_size, scale, deterministic,
      token_positions=None, cu_seqlens_k=None, max_seqlen_k=None, list_offsets=None, list_entries=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_triton_sparse_attention(ctx, inputs, output):
    q, k, v, block_indices, token_starts, cu_seqlens, ctx.max_seqlen, ctx.block_size, ctx.scale, \
        ctx.deterministic, token_positions, cu_seqlens_k, ctx.max_seqlen_k, *lists = inputs
    ctx.save_for_backward(q, k, v, *output, block_indices, token_starts, cu_seqlens,
                          *_optional(ctx, token_positions=token_positions, cu_seqlens_k=cu_seqlens_k,
                                     list_offsets=lists[0], list_entries=lists[1]))


def _triton_sparse_attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, block_indices, token_starts, cu_seqlens, *optional = ctx.saved_tensors
    saved = _saved(ctx, optional)
    grads = triton_sparse_attention_backward(q, k, v, out, lse, dout, block_indices, token_starts, cu_seqlens,
                                             ctx.max_seqlen, ctx.block_size, ctx.scale, ctx.deterministic,
                                             saved["token_positions"], saved["cu_seqlens_k"], ctx.max_seqlen_k,
                                             saved["list_offsets"], saved["list_entries"])
    return *grads, *(None,) * 12


triton_sparse_attention.register_autograd(_triton_sparse_attention_backward,
                                          setup_context=_save_triton_sparse_attention)


@custom_op("msa::triton_index_kl", mutates_args=())
def triton_index_kl(q: Tensor, k: Tensor, index_q: Tensor, index_k: Tensor, block_indices: Tensor,
                    token_starts: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int, scale: float,
                    index_scale: float, main_lse: Tensor | None, deterministic: bool,
                    token_positions: Tensor | None = None, cu_seqlens_k: Tensor | None = None,
                    max_seqlen_k: int | None = None,
                    list_offsets: Tensor | None = None,
                    list_entries: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The summed row KLs, the student's ``index_lse`` ``[T, G]`` and the teacher's ``teacher_lse`` ``[T, Hq]``
    (what the backward reads; ``deterministic`` picks its variant). Lists as in :func:`triton_sparse_attention`."""
    from msa import kernels

    lists = _lists(list_offsets, list_entries, cu_seqlens, max_seqlen, block_size, block_indices, max_seqlen_k)
    kl_rows, index_lse, teacher_lse = kernels.index_kl_fwd(q, k, index_q, index_k, block_indices, cu_seqlens,
                                                           max_seqlen, block_size, scale, index_scale, main_lse,
                                                           cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k,
                                                           lists=lists)
    # main_lse, when given, comes back as the teacher's: the output must not be an input
    return kl_rows.sum(), index_lse, teacher_lse if main_lse is None else teacher_lse.clone()


@triton_index_kl.register_fake
def _(q, k, index_q, index_k, block_indices, token_starts, cu_seqlens, max_seqlen, block_size, scale, index_scale,
      main_lse, deterministic, token_positions=None, cu_seqlens_k=None, max_seqlen_k=None, list_offsets=None,
      list_entries=None):
    return (q.new_empty((), dtype=torch.float32), q.new_empty(index_q.shape[:2], dtype=torch.float32),
            q.new_empty(q.shape[:2], dtype=torch.float32))


@custom_op("msa::triton_index_kl_backward", mutates_args=())
def triton_index_kl_backward(q: Tensor, k: Tensor, index_q: Tensor, index_k: Tensor, block_indices: Tensor,
                             token_starts: Tensor, cu_seqlens: Tensor, max_seqlen: int, teacher_lse: Tensor,
                             index_lse: Tensor, grad: Tensor, block_size: int, scale: float, index_scale: float,
                             deterministic: bool, token_positions: Tensor | None = None,
                             cu_seqlens_k: Tensor | None = None, max_seqlen_k: int | None = None,
                             list_offsets: Tensor | None = None,
                             list_entries: Tensor | None = None) -> tuple[Tensor, Tensor]:
    from msa import kernels

    d_index_q, d_index_k = kernels.index_kl_bwd(
        q, k, index_q, index_k, block_indices, token_starts, cu_seqlens, max_seqlen, teacher_lse, index_lse,
        grad.float().reshape(1), block_size, scale, index_scale, deterministic=deterministic,
        token_positions=token_positions, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k,
        lists=_lists(list_offsets, list_entries, cu_seqlens, max_seqlen, block_size, block_indices, max_seqlen_k))
    return d_index_q.to(index_q.dtype), d_index_k.to(index_k.dtype)


@triton_index_kl_backward.register_fake
def _(q, k, index_q, index_k, block_indices, token_starts, cu_seqlens, max_seqlen, teacher_lse, index_lse, grad,
      block_size, scale, index_scale, deterministic, token_positions=None, cu_seqlens_k=None, max_seqlen_k=None,
      list_offsets=None, list_entries=None):
    return torch.empty_like(index_q), torch.empty_like(index_k)


def _save_triton_index_kl(ctx, inputs, output):
    q, k, index_q, index_k, block_indices, token_starts, cu_seqlens, *settings, _, ctx.deterministic, \
        token_positions, cu_seqlens_k, ctx.max_seqlen_k, list_offsets, list_entries = inputs
    ctx.max_seqlen, ctx.block_size, ctx.scale, ctx.index_scale = settings
    _, index_lse, teacher_lse = output
    ctx.save_for_backward(q, k, index_q, index_k, block_indices, token_starts, cu_seqlens, teacher_lse, index_lse,
                          *_optional(ctx, token_positions=token_positions, cu_seqlens_k=cu_seqlens_k,
                                     list_offsets=list_offsets, list_entries=list_entries))


def _triton_index_kl_backward(ctx, grad, _d_index_lse, _d_teacher_lse):
    q, k, index_q, index_k, block_indices, token_starts, cu_seqlens, teacher_lse, index_lse, *optional = \
        ctx.saved_tensors
    saved = _saved(ctx, optional)
    d_index_q, d_index_k = triton_index_kl_backward(q, k, index_q, index_k, block_indices, token_starts, cu_seqlens,
                                                    ctx.max_seqlen, teacher_lse, index_lse, grad, ctx.block_size,
                                                    ctx.scale, ctx.index_scale, ctx.deterministic,
                                                    saved["token_positions"], saved["cu_seqlens_k"],
                                                    ctx.max_seqlen_k, saved["list_offsets"], saved["list_entries"])
    return None, None, d_index_q, d_index_k, *(None,) * 14


triton_index_kl.register_autograd(_triton_index_kl_backward, setup_context=_save_triton_index_kl)


@custom_op("msa::triton_index_kl_fused", mutates_args=())
def triton_index_kl_fused(q: Tensor, k: Tensor, index_q: Tensor, index_k: Tensor, block_indices: Tensor,
                          cu_seqlens: Tensor, max_seqlen: int, block_size: int, scale: float, index_scale: float,
                          main_lse: Tensor | None, cu_seqlens_k: Tensor | None = None,
                          max_seqlen_k: int | None = None,
                          list_offsets: Tensor | None = None,
                          list_entries: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The summed row KLs and their float32 gradients in ``index_q`` and ``index_k``, from one pass that evaluates
    the teacher once (float32 atomics: not deterministic). Lists as in :func:`triton_sparse_attention`."""
    from msa import kernels

    lists = _lists(list_offsets, list_entries, cu_seqlens, max_seqlen, block_size, block_indices, max_seqlen_k)
    kl_rows, d_index_q, d_index_k = kernels.index_kl_fwd_bwd(q, k, index_q, index_k, block_indices, cu_seqlens,
                                                             max_seqlen, block_size, scale, index_scale, main_lse,
                                                             cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k,
                                                             lists=lists)
    return kl_rows.sum(), d_index_q, d_index_k


@triton_index_kl_fused.register_fake
def _(q, k, index_q, index_k, block_indices, cu_seqlens, max_seqlen, block_size, scale, index_scale, main_lse,
      cu_seqlens_k=None, max_seqlen_k=None, list_offsets=None, list_entries=None):
    return (q.new_empty((), dtype=torch.float32), index_q.new_empty(index_q.shape, dtype=torch.float32),
            index_k.new_empty(index_k.shape, dtype=torch.float32))


def _save_triton_index_kl_fused(ctx, inputs, output):
    ctx.dtypes = (inputs[2].dtype, inputs[3].dtype)
    ctx.save_for_backward(*output[1:])


def _triton_index_kl_fused_backward(ctx, grad, _d_index_q_grad, _d_index_k_grad):
    d_index_q, d_index_k = ctx.saved_tensors
    return (None, None, (d_index_q * grad).to(ctx.dtypes[0]), (d_index_k * grad).to(ctx.dtypes[1]),
            *(None,) * 11)


triton_index_kl_fused.register_autograd(_triton_index_kl_fused_backward, setup_context=_save_triton_index_kl_fused)
