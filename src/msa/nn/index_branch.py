"""The Index Branch of an MSA layer, and :func:`msa_attention`, the two branches it drives (its selection alone:
:func:`msa_select`).

:class:`IndexBranch` is the one implementation behind :class:`msa.nn.MSAAttention`
and the layers that :mod:`msa.integrations.hf` converts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from msa.nn.checks import check_hidden_states, check_position_embeddings
from msa.nn.rotary import apply_rotary
from msa.ops import Selection, dense_attention, index_kl_loss, select_blocks, sparse_attention

MODES = ("dense", "sparse")


def check_kl_topk(kl_topk: int | None, topk: int) -> None:
    if kl_topk is not None and (not isinstance(kl_topk, int) or kl_topk < topk):
        raise ValueError(f"kl_topk must be None or an int >= topk ({topk}), got {kl_topk!r}")


class IndexBranch(nn.Module):
    """One index-query head per KV group, one index-key head shared by the groups, and their selection's settings.

    ``index_q_proj``: hidden -> ``G * Di``; ``index_k_proj``: hidden -> ``Di``.
    Both read a detached copy of the hidden states, so the KL loss trains
    only them and the LM loss never reaches them. With ``index_rope`` the
    index heads are rotated by the layer's RoPE tables (``head_dim`` wide; the
    ``Di / 2`` highest frequencies when ``Di < head_dim``). ``block_size``,
    ``topk``, ``kl_topk`` and ``index_dtype`` configure the selection and the
    KL loss (see :func:`msa_attention`).

    ``selector``, when set, replaces the Index Branch's selection (evaluation
    ablations, oracles): ``selector(q, k, index_q, index_k)`` returns int32
    ``block_indices`` in the layout of the call, and no KL loss is computed.
    """

    def __init__(self, hidden_size: int, num_kv_heads: int, index_head_dim: int, *, head_dim: int, block_size: int,
                 topk: int, index_rope: bool = True, kl_topk: int | None = None,
                 index_dtype: torch.dtype | None = None):
        super().__init__()
        check_kl_topk(kl_topk, topk)
        if index_rope and (index_head_dim > head_dim or index_head_dim % 2):
            raise ValueError(f"index_rope needs an even index_head_dim <= head_dim ({head_dim}), got {index_head_dim}")
        self.num_kv_heads, self.index_head_dim, self.index_rope = num_kv_heads, index_head_dim, index_rope
        self.hidden_size, self.head_dim = hidden_size, head_dim
        self.block_size, self.topk, self.kl_topk, self.index_dtype = block_size, topk, kl_topk, index_dtype
        self.selector: Callable[..., torch.Tensor] | None = None
        self.index_q_proj = nn.Linear(hidden_size, num_kv_heads * index_head_dim, bias=False)
        self.index_k_proj = nn.Linear(hidden_size, index_head_dim, bias=False)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]):
        """``hidden_states`` ``[..., hidden]`` and its ``(cos, sin)`` ``[..., head_dim]`` -> index queries
        ``[..., G, Di]`` and index keys ``[..., 1, Di]`` of the detached hidden states (``...``: ``B, S`` or
        ``T``)."""
        check_hidden_states(hidden_states, self.hidden_size, self.index_k_proj.weight, (3, 2),
                            "[B, S, hidden] or [T, hidden]")
        if self.index_rope:
            check_position_embeddings(position_embeddings, hidden_states, self.head_dim)
        detached = hidden_states.detach()
        index_q = self.index_q_proj(detached).unflatten(-1, (self.num_kv_heads, self.index_head_dim))
        index_k = self.index_k_proj(detached).unsqueeze(-2)
        if self.index_rope:
            cos, sin = position_embeddings
            index_q, index_k = apply_rotary(index_q, cos, sin), apply_rotary(index_k, cos, sin)
        return index_q, index_k

    def attend(self, q, k, v, index_q, index_k, *, mode: str, compute_kl_loss: bool, softmax_scale=None,
               deterministic: bool | None = None, **varlen):
        """:func:`msa_attention` with this branch's settings, or sparse attention over the ``selector``'s blocks
        (``varlen``: the ops' packed layouts; ``deterministic``: the ops'). Returns ``(out, kl_loss or None,
        block_indices)``."""
        if self.selector is None:
            return msa_attention(q, k, v, index_q, index_k, mode=mode, block_size=self.block_size, topk=self.topk,
                                 compute_kl_loss=compute_kl_loss, kl_topk=self.kl_topk, softmax_scale=softmax_scale,
                                 index_dtype=self.index_dtype, deterministic=deterministic, **varlen)
        block_indices = self.selector(q, k, index_q, index_k)
        out = sparse_attention(q, k, v, block_indices, block_size=self.block_size, softmax_scale=softmax_scale,
                               deterministic=deterministic, **varlen)
        return out, None, block_indices


def msa_select(index_q, index_k, *, block_size: int, topk: int, compute_kl_loss: bool, kl_topk: int | None = None,
               index_dtype=None, **varlen) -> Selection:
    """The Index Branch's half of :func:`msa_attention`: the blocks it selects, from the detached index tensors
    alone (no ``q``, ``k`` or ``v``). With ``compute_kl_loss`` and ``kl_topk`` > ``topk`` the Selection ranks
    the KL loss's ``kl_topk`` blocks, and the attention's top-k is cut from it. Give it to :func:`msa_attention`
    (``selection=``) with the same settings and ``varlen``: context parallelism scores the blocks while the keys
    and values are still being gathered."""
    return select_blocks(index_q.detach(), index_k.detach(), block_size=block_size,
                         topk=_ranked_topk(topk, compute_kl_loss, kl_topk), index_dtype=index_dtype,
                         return_selection=True, **varlen)


def _ranked_topk(topk: int, compute_kl_loss: bool, kl_topk: int | None) -> int:
    """The blocks :func:`msa_select` ranks: the KL loss's wider support when it has one, else the attention's."""
    return kl_topk if compute_kl_loss and kl_topk is not None and kl_topk > topk else topk


def msa_attention(q, k, v, index_q, index_k, *, mode: str, block_size: int, topk: int, compute_kl_loss: bool,
                  kl_topk: int | None = None, softmax_scale=None, index_dtype=None, deterministic: bool | None = None,
                  selection: Selection | None = None, **varlen):
    """Both branches of an MSA layer on projected, rotated inputs (the layouts of :mod:`msa.ops`).

    ``mode="sparse"``: attention over the Index Branch's blocks; ``"dense"``:
    causal attention (indexer warm-up). The Index Branch reads detached
    ``index_q``/``index_k`` for the selection; the KL loss, when computed,
    trains them against the detached Main Branch, on the selected support,
    or with ``kl_topk`` > ``topk`` on the top ``kl_topk`` blocks: the teacher
    is then the Main Branch's attention as it would be over that wider
    support (the KL pass computes its normalisation), so blocks ranked just
    below the selection get a gradient too. ``index_dtype``: the ranking's
    dtype (:func:`msa.select_blocks`). ``varlen``: the ops' packed layouts
    (``cu_seqlens``, ``max_seqlen``, or ``cu_seqlens_q``, ``cu_seqlens_k``,
    ``max_seqlen_q``, ``max_seqlen_k`` for queries that are the suffix of
    longer key sequences). ``deterministic``: the backward passes' (:func:`msa.sparse_attention`; None follows
    ``torch.use_deterministic_algorithms``). ``selection``: the result of :func:`msa_select` on the same
    index tensors with the same settings and ``varlen``, computed beforehand (default: computed here).
    Returns ``(out, kl_loss or None, block_indices)``.
    """
    # one Selection, checked once, its derived structures shared by the attention, its backward and the KL loss; with
    # a wider KL support, one scoring pass ranks kl_topk blocks and the attention's top-k is cut from them
    ranked_topk = _ranked_topk(topk, compute_kl_loss, kl_topk)
    wide = ranked_topk > topk
    if selection is None:
        selection = msa_select(index_q, index_k, block_size=block_size, topk=topk, compute_kl_loss=compute_kl_loss,
                               kl_topk=kl_topk, index_dtype=index_dtype, **varlen)
    elif not isinstance(selection, Selection):
        raise TypeError(f"selection must be a Selection (from msa_select) or None, got {type(selection).__name__}")
    elif (selection.block_size, selection.topk) != (block_size, ranked_topk):
        raise ValueError(f"selection has block_size={selection.block_size}, topk={selection.topk}; these settings "
                         f"select block_size={block_size}, topk={ranked_topk} (msa_select with them)")
    kl_selection, selection = selection, selection.top(topk)
    main_lse = None  # the teacher's normalisation on the selected support, when the Main Branch computed it
    if mode == "sparse":
        out, main_lse = sparse_attention(q, k, v, selection, softmax_scale=softmax_scale, return_lse=True,
                                         deterministic=deterministic)
    else:
        out = dense_attention(q, k, v, softmax_scale=softmax_scale, **varlen)
    kl_loss = None
    if compute_kl_loss:
        kl_loss = index_kl_loss(q, k, index_q, index_k, kl_selection, softmax_scale=softmax_scale,
                                main_lse=None if wide else main_lse, deterministic=deterministic)
    return out, kl_loss, selection.block_indices
