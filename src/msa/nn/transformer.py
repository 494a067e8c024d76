"""``MSATransformer``: a small Llama-style decoder whose attention layers are :class:`MSAAttention`.

Pre-norm blocks (RMSNorm, MSA self-attention with RoPE, RMSNorm, SwiGLU MLP),
an untied LM head. Used by ``msa generate`` and the inference tests; models
from the Hugging Face hub go through :mod:`msa.integrations.hf` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from msa.fp8 import index_dtype_from_name
from msa.nn.attention import MSAAttention
from msa.nn.checks import accepted_ranks, check_packed_offsets, check_token_ids
from msa.nn.rotary import RotaryEmbedding
from msa.varlen import token_positions


@dataclass
class MSAConfig:
    vocab_size: int = 256
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 768
    index_head_dim: int = 32
    block_size: int = 64
    topk: int = 8
    kl_topk: int | None = None  # the KL loss's support (None: the selection); see MSAAttention
    rope_theta: float = 10000.0
    mode: str = "sparse"
    index_dtype: str | None = None  # "float8_e4m3fn": FP8 index ranking (msa.fp8) in training, prefill and cache

    def __post_init__(self):
        index_dtype_from_name(self.index_dtype)  # validates

    @property
    def index_torch_dtype(self) -> torch.dtype | None:
        return index_dtype_from_name(self.index_dtype)

    def to_dict(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, config: MSAConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.attention = MSAAttention(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                                      index_head_dim=config.index_head_dim, block_size=config.block_size,
                                      topk=config.topk, mode=config.mode, kl_topk=config.kl_topk,
                                      index_dtype=config.index_torch_dtype)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, rope, attend, **varlen):
        attended, kl_loss = self.attention(self.attention_norm(x), rope, attend=attend, **varlen)
        x = x + attended
        h = self.mlp_norm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h)), kl_loss


class MSATransformer(nn.Module):
    """Decoder-only LM on MSA attention.

    ``forward(input_ids)`` with ``input_ids`` ``[B, S]``, or packed ``[T]``
    with ``cu_seqlens`` (int32 or int64 ``[n + 1]``); returns ``(logits,
    kl_loss)``, ``kl_loss`` the mean of the layers' KL losses (None when not
    computed). Bad input raises a ``ValueError`` / ``TypeError`` naming the
    argument, as the ops do.
    """

    def __init__(self, config: MSAConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, base=config.rope_theta)
        self.layers = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def set_mode(self, mode: str) -> None:
        """``"dense"`` (indexer warm-up) or ``"sparse"`` for every layer."""
        for layer in self.layers:
            layer.attention.set_mode(mode)
        self.config.mode = mode

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        compute_kl_loss: bool | None = None,
        attend: Callable[..., torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``attend(layer_index, q, k, v, index_q, index_k)``, when given, replaces attention
        (see :meth:`MSAAttention.forward`); ``position_ids`` then gives each token's position."""
        cu_seqlens = self._check_inputs(input_ids, position_ids, cu_seqlens, attend)
        if position_ids is None:
            if cu_seqlens is not None:
                position_ids = token_positions(cu_seqlens, input_ids.shape[0])[1]
            else:
                position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        x = self.embed(input_ids)
        rope = self.rotary(position_ids, dtype=x.dtype)
        kl_losses = []
        for index, layer in enumerate(self.layers):
            layer_attend = None if attend is None else (lambda *tensors, i=index: attend(i, *tensors))
            x, kl_loss = layer(x, rope, layer_attend, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                               compute_kl_loss=compute_kl_loss)
            if kl_loss is not None:
                kl_losses.append(kl_loss)
        logits = self.lm_head(self.norm(x))
        return logits, (torch.stack(kl_losses).mean() if kl_losses else None)

    def _check_inputs(self, input_ids, position_ids, cu_seqlens, attend):
        """The checks of :meth:`forward`'s token arguments; returns ``cu_seqlens`` as int32 (None stays None)."""
        ranks, expected = accepted_ranks(2, "[B, S]", "[T]", packed_given=cu_seqlens is not None,
                                         either=attend is not None)
        device = self.embed.weight.device
        check_token_ids("input_ids", input_ids, ranks, expected, device)
        if position_ids is not None:
            shape = list(input_ids.shape)
            check_token_ids("position_ids", position_ids, (input_ids.dim(),), f"{shape} like input_ids", device)
            if position_ids.shape != input_ids.shape:
                raise ValueError(f"position_ids must have shape {shape} like input_ids, got "
                                 f"{tuple(position_ids.shape)}")
        return None if cu_seqlens is None else check_packed_offsets(cu_seqlens, input_ids.shape[0], device,
                                                                    "input_ids")
