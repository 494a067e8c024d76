"""``MSAAttention``: a GQA self-attention layer with MiniMax Sparse Attention."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from msa.distributed import context_parallel_attention
from msa.nn.checks import (
    accepted_ranks, check_hidden_states, check_key_prefix, check_packed_offsets, check_position_embeddings,
)
from msa.nn.index_branch import MODES, IndexBranch, msa_select
from msa.nn.rotary import apply_rotary
from msa.ops.checks import check_flag


class KeyPrefix(NamedTuple):
    """The keys of earlier tokens that a chunk of queries attends to (:meth:`MSAAttention.forward`'s ``prefix``):
    rotated keys ``k`` ``[B, P, G, D]``, values ``v`` ``[B, P, G, D]`` and rotated index keys ``index_k``
    ``[B, P, 1, Di]``, as the layer computed them (``return_keys=True`` returns them, grown by the chunk)."""

    k: torch.Tensor
    v: torch.Tensor
    index_k: torch.Tensor


class MSAAttention(nn.Module):
    """GQA self-attention whose Main Branch reads only the blocks its Index Branch selects.

    The layer keeps the usual Q/K/V/O projections and adds the Index Branch
    (:class:`msa.nn.IndexBranch`, ``index_branch``): one index-query head per
    KV group and one index-key head shared by the groups, reading a detached
    copy of the hidden states, so the KL loss trains only them and the LM loss
    never reaches them. State dicts saved before the Index Branch was a
    submodule (``index_q_proj.weight`` beside ``q_proj.weight``) still load.

    ``mode="dense"`` is the indexer warm-up: the Main Branch is dense causal
    attention while the Index Branch learns from the KL loss against it
    (restricted to the Index Branch's own selection). ``mode="sparse"`` is MSA.
    Switch with :meth:`set_mode` or by assigning ``layer.mode``.

    ``kl_topk`` (default ``topk``) widens the KL loss's support to the top
    ``kl_topk`` blocks, so that the loss also ranks the blocks just outside
    the selection (see :func:`msa.nn.index_branch.msa_attention`).
    ``index_dtype=torch.float8_e4m3fn`` ranks blocks with FP8 index vectors
    (:mod:`msa.fp8`; faster prefill at long context, a selection no longer
    bit-comparable to the bf16 one).

    ``context_parallel_group`` (a process group, or a one-dimensional
    ``DeviceMesh`` such as ``mesh["cp"]``) splits every sequence over its
    ranks (:mod:`msa.distributed`): each rank passes its zig-zag shard of the
    hidden states and of the rotary embeddings (``msa.distributed.shard``),
    and gets its shard of the output and the KL loss of the whole batch.

    ``deterministic`` (flash-attn's argument) is passed to the sparse
    attention and the KL loss: True for gradients bitwise the same from run to
    run (backward passes without atomics, slower), False for the fast ones,
    None (default) to follow ``torch.use_deterministic_algorithms`` (see
    :func:`msa.sparse_attention`). The dense mode's attention (SDPA) follows
    torch's setting.

    Bad input to :meth:`forward` (shapes, dtypes, devices, ``cu_seqlens``)
    raises a ``ValueError`` / ``TypeError`` naming the argument, as the ops do.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None, *,
                 index_head_dim: int = 128, block_size: int = 128, topk: int = 16, mode: str = "sparse",
                 index_rope: bool = True, bias: bool = False, kl_topk: int | None = None,
                 index_dtype: torch.dtype | None = None, context_parallel_group=None,
                 deterministic: bool | None = None):
        super().__init__()
        check_flag("deterministic", deterministic)
        self.deterministic = deterministic
        head_dim = head_dim or hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.set_mode(mode)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.index_branch = IndexBranch(hidden_size, num_kv_heads, index_head_dim, head_dim=head_dim,
                                        block_size=block_size, topk=topk, index_rope=index_rope, kl_topk=kl_topk,
                                        index_dtype=index_dtype)
        self.register_load_state_dict_pre_hook(_move_index_projections)
        if isinstance(context_parallel_group, DeviceMesh):
            context_parallel_group = context_parallel_group.get_group()
        self.context_parallel_group = context_parallel_group

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
        prefix: KeyPrefix | None = None,
        return_keys: bool = False,
    ):
        """Args:
            hidden_states: ``[B, S, hidden]``, or packed ``[T, hidden]`` with ``cu_seqlens`` (int32 or int64
                ``[n + 1]``; with ``context_parallel_group``, the offsets of the whole sequences) or ``attend``;
                in the dtype of the parameters (any under autocast).
            position_embeddings: ``(cos, sin)`` of shape ``[B, S, head_dim]``
                (``[T, head_dim]`` packed), as Hugging Face rotary modules return.
            compute_kl_loss: default ``self.training``.
            attend: replaces both branches' attention: ``attend(q, k, v, index_q,
                index_k)`` (packed ``[T, H, D]`` tensors, ``index_k`` ``[T, 1, Di]``)
                returns ``[T, Hq, D]``. :mod:`msa.inference` passes one that
                attends over its paged KV cache. No KL loss is computed then.
            prefix: the keys of the ``P`` tokens before ``hidden_states`` (a
                :class:`KeyPrefix`; dense layout only): the queries are the
                causal suffix of the ``P + S`` keys, at positions ``P ..
                P + S - 1`` (``position_embeddings`` are theirs). Gradients reach
                the prefix tensors. Running a sequence in consecutive chunks, each
                with the keys of the chunks before it, equals running it whole;
                the KL losses then average each chunk's rows.
            return_keys: also return the :class:`KeyPrefix` of the ``P + S``
                keys (the prefix of the next chunk).

        Returns:
            ``(output, kl_loss)``, or ``(output, kl_loss, keys)`` with
            ``return_keys``: output like ``hidden_states``; ``kl_loss`` a scalar
            (the mean over this call's (query, group) rows) to add to the LM loss
            with a weight, or None when not computed.
        """
        cu_seqlens = self._check_inputs(hidden_states, position_embeddings, cu_seqlens, compute_kl_loss, attend,
                                        prefix, return_keys)
        lead = hidden_states.shape[:-1]
        cos, sin = position_embeddings
        q = apply_rotary(self.q_proj(hidden_states).unflatten(-1, (self.num_heads, self.head_dim)), cos, sin)
        k = apply_rotary(self.k_proj(hidden_states).unflatten(-1, (self.num_kv_heads, self.head_dim)), cos, sin)
        v = self.v_proj(hidden_states).unflatten(-1, (self.num_kv_heads, self.head_dim))

        index_q, index_k = self.index_branch(hidden_states, position_embeddings)
        if prefix is not None:  # the queries are the last S of P + S keys: the ops' suffix layout (Sq < Sk)
            k, v, index_k = (torch.cat([before.to(now.dtype), now], dim=1)
                             for before, now in zip(prefix, (k, v, index_k)))
        keys = (KeyPrefix(k, v, index_k),) if return_keys else ()
        if attend is not None:
            out = attend(q, k, v, index_q, index_k)
            return self.o_proj(out.reshape(*lead, -1)), None, *keys

        compute_kl_loss = self.training if compute_kl_loss is None else compute_kl_loss
        attention = functools.partial(self.index_branch.attend, mode=self.mode, compute_kl_loss=compute_kl_loss,
                                      deterministic=self.deterministic)
        if self.context_parallel_group is not None:
            branch = self.index_branch  # its blocks are selected while K and V are still being gathered
            select = None if branch.selector is not None else functools.partial(
                msa_select, block_size=branch.block_size, topk=branch.topk, compute_kl_loss=compute_kl_loss,
                kl_topk=branch.kl_topk, index_dtype=branch.index_dtype)
            out, kl_loss, _ = context_parallel_attention(attention, q, k, v, index_q, index_k, select=select,
                                                         group=self.context_parallel_group, cu_seqlens=cu_seqlens)
        else:
            out, kl_loss, _ = attention(q, k, v, index_q, index_k, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.o_proj(out.reshape(*lead, -1)), kl_loss, *keys

    def _check_inputs(self, hidden_states, position_embeddings, cu_seqlens, compute_kl_loss, attend, prefix,
                      return_keys):
        """The checks of :meth:`forward`'s arguments; returns ``cu_seqlens`` as int32 (None stays None)."""
        check_flag("return_keys", return_keys)
        if prefix is not None:
            if cu_seqlens is not None or self.context_parallel_group is not None or attend is not None:
                raise ValueError("prefix takes the dense layout [B, S, hidden] of one process: not with cu_seqlens, "
                                 "context_parallel_group or attend")
            check_key_prefix(prefix, hidden_states, self.num_kv_heads, self.head_dim,
                             self.index_branch.index_head_dim)
        ranks, expected = accepted_ranks(3, "[B, S, hidden]", "[T, hidden]", packed_given=cu_seqlens is not None,
                                         either=attend is not None)
        check_hidden_states(hidden_states, self.q_proj.in_features, self.q_proj.weight, ranks, expected)
        check_position_embeddings(position_embeddings, hidden_states, self.head_dim)
        check_flag("compute_kl_loss", compute_kl_loss)
        if attend is not None and not callable(attend):
            raise TypeError(f"attend must be callable or None, got {type(attend).__name__}")
        if cu_seqlens is None:
            return None
        world_size = 1 if self.context_parallel_group is None else dist.get_world_size(self.context_parallel_group)
        # with context parallelism hidden_states is this rank's shard of the sequences that cu_seqlens describes
        return check_packed_offsets(cu_seqlens, hidden_states.shape[0] * world_size, hidden_states.device,
                                    "hidden_states" if world_size == 1 else f"hidden_states on all {world_size} ranks")


def _move_index_projections(module, state_dict, prefix, *_) -> None:
    """Rename the Index Branch's weights of a state dict saved before it was a submodule."""
    for name in ("index_q_proj.weight", "index_k_proj.weight"):
        if prefix + name in state_dict:
            state_dict[prefix + "index_branch." + name] = state_dict.pop(prefix + name)
