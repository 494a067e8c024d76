"""Rotary position embeddings in the Hugging Face convention (``rotate_half``, ``(cos, sin)``)."""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[..., H, Dr]`` by ``cos``/``sin`` ``[..., D]`` (broadcast over heads).

    ``cos``/``sin`` hold ``cat(freqs, freqs)`` angles as Hugging Face rotary
    modules return them. When ``Dr < D`` the ``Dr / 2`` highest frequencies
    are used, so index heads narrower than the model's heads get RoPE too.
    """
    half = x.shape[-1] // 2
    if cos.shape[-1] != x.shape[-1]:
        cos = torch.cat((cos[..., :half], cos[..., :half]), dim=-1)
        sin = torch.cat((sin[..., :half], sin[..., :half]), dim=-1)
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Computes ``(cos, sin)`` ``[..., S, D]`` for integer positions, like HF's ``LlamaRotaryEmbedding``."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32):
        angles = position_ids.float().unsqueeze(-1) * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)
