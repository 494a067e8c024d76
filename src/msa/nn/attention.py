"""``MSAAttention``: a GQA self-attention layer with MiniMax Sparse Attention."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from msa.ops import dense_attention, index_kl_loss, select_blocks, sparse_attention
from msa.nn.rotary import apply_rotary

MODES = ("dense", "sparse")


class MSAAttention(nn.Module):
    """GQA self-attention whose Main Branch reads only the blocks its Index Branch selects.

    The layer keeps the usual Q/K/V/O projections and adds the Index Branch:
    ``index_q_proj: hidden -> G * Di`` (one index-query head per KV group) and
    ``index_k_proj: hidden -> Di`` (one index-key head shared by the groups).
    The Index Branch reads a detached copy of the hidden states, so the KL loss
    trains only those two projections, and the LM loss never reaches them.

    ``mode="dense"`` is the indexer warm-up: the Main Branch is dense causal
    attention while the Index Branch learns from the KL loss against it
    (restricted to the Index Branch's own selection). ``mode="sparse"`` is MSA.
    Switch with :meth:`set_mode` or by assigning ``layer.mode``.

    ``kl_topk`` (default ``topk``) widens the KL loss's support to the top
    ``kl_topk`` blocks, so that the loss also ranks the blocks just outside
    the selection (see :func:`msa_attention`). ``index_dtype=torch.float8_e4m3fn``
    ranks blocks with FP8 index vectors (:mod:`msa.fp8`; faster prefill at
    long context, a selection no longer bit-comparable to the bf16 one).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None, *,
                 index_head_dim: int = 128, block_size: int = 128, topk: int = 16, mode: str = "sparse",
                 index_rope: bool = True, bias: bool = False, kl_topk: int | None = None,
                 index_dtype: torch.dtype | None = None):
        super().__init__()
        head_dim = head_dim or hidden_size // num_heads
        check_kl_topk(kl_topk, topk)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if index_rope and (index_head_dim > head_dim or index_head_dim % 2):
            raise ValueError(f"index_rope needs an even index_head_dim <= head_dim ({head_dim}), got {index_head_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.index_head_dim, self.block_size, self.topk, self.kl_topk = index_head_dim, block_size, topk, kl_topk
        self.index_rope, self.index_dtype = index_rope, index_dtype
        self.set_mode(mode)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.index_q_proj = nn.Linear(hidden_size, num_kv_heads * index_head_dim, bias=False)
        self.index_k_proj = nn.Linear(hidden_size, index_head_dim, bias=False)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        compute_kl_loss: bool | None = None,
        attend: Callable[..., torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Args:
            hidden_states: ``[B, S, hidden]``, or packed ``[T, hidden]`` with ``cu_seqlens``.
            position_embeddings: ``(cos, sin)`` of shape ``[B, S, head_dim]``
                (``[T, head_dim]`` packed), as Hugging Face rotary modules return.
            compute_kl_loss: default ``self.training``.
            attend: replaces both branches' attention: ``attend(q, k, v, index_q,
                index_k)`` (packed ``[T, H, D]`` tensors, ``index_k`` ``[T, 1, Di]``)
                returns ``[T, Hq, D]``. :mod:`msa.inference` passes one that
                attends over its paged KV cache. No KL loss is computed then.

        Returns:
            ``(output, kl_loss)``: output like ``hidden_states``; ``kl_loss`` a
            scalar to add to the LM loss with a weight, or None when not computed.
        """
        lead = hidden_states.shape[:-1]
        cos, sin = position_embeddings
        q = apply_rotary(self.q_proj(hidden_states).unflatten(-1, (self.num_heads, self.head_dim)), cos, sin)
        k = apply_rotary(self.k_proj(hidden_states).unflatten(-1, (self.num_kv_heads, self.head_dim)), cos, sin)
        v = self.v_proj(hidden_states).unflatten(-1, (self.num_kv_heads, self.head_dim))

        index_input = hidden_states.detach()
        index_q = self.index_q_proj(index_input).unflatten(-1, (self.num_kv_heads, self.index_head_dim))
        index_k = self.index_k_proj(index_input).unsqueeze(-2)
        if self.index_rope:
            index_q, index_k = apply_rotary(index_q, cos, sin), apply_rotary(index_k, cos, sin)

        if attend is not None:
            out = attend(q, k, v, index_q, index_k)
            return self.o_proj(out.reshape(*lead, -1)), None

        compute_kl_loss = self.training if compute_kl_loss is None else compute_kl_loss
        out, kl_loss, _ = msa_attention(q, k, v, index_q, index_k, mode=self.mode, block_size=self.block_size,
                                        topk=self.topk, compute_kl_loss=compute_kl_loss, kl_topk=self.kl_topk,
                                        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, index_dtype=self.index_dtype)
        return self.o_proj(out.reshape(*lead, -1)), kl_loss


def check_kl_topk(kl_topk: int | None, topk: int) -> None:
    if kl_topk is not None and (not isinstance(kl_topk, int) or kl_topk < topk):
        raise ValueError(f"kl_topk must be None or an int >= topk ({topk}), got {kl_topk!r}")


def msa_attention(q, k, v, index_q, index_k, *, mode: str, block_size: int, topk: int, compute_kl_loss: bool,
                  kl_topk: int | None = None, cu_seqlens=None, max_seqlen=None, softmax_scale=None, index_dtype=None):
    """Both branches of an MSA layer on projected, rotated inputs (the layouts of :mod:`msa.ops`).

    ``mode="sparse"``: attention over the Index Branch's blocks; ``"dense"``:
    causal attention (indexer warm-up). The Index Branch reads detached
    ``index_q``/``index_k`` for the selection; the KL loss, when computed,
    trains them against the detached Main Branch, on the selected support,
    or with ``kl_topk`` > ``topk`` on the top ``kl_topk`` blocks: the teacher
    is then the Main Branch's attention as it would be over that wider
    support (the KL pass computes its normalisation), so blocks ranked just
    below the selection get a gradient too. ``index_dtype``: the ranking's
    dtype (:func:`msa.select_blocks`). Returns
    ``(out, kl_loss or None, block_indices)``.
    """
    varlen = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def select(n_blocks):
        return select_blocks(index_q.detach(), index_k.detach(), block_size=block_size, topk=n_blocks,
                             index_dtype=index_dtype, **varlen)

    block_indices = select(topk)
    main_lse = None  # the teacher's normalisation on the selected support, when the Main Branch computed it
    if mode == "sparse":
        out, main_lse = sparse_attention(q, k, v, block_indices, block_size=block_size, softmax_scale=softmax_scale,
                                         return_lse=True, **varlen)
    else:
        out = dense_attention(q, k, v, softmax_scale=softmax_scale, **varlen)
    kl_loss = None
    if compute_kl_loss:
        kl_blocks = block_indices
        if kl_topk is not None and kl_topk > topk:
            kl_blocks, main_lse = select(kl_topk), None
        kl_loss = index_kl_loss(q, k, index_q, index_k, kl_blocks, block_size=block_size,
                                softmax_scale=softmax_scale, main_lse=main_lse, **varlen)
    return out, kl_loss, block_indices
