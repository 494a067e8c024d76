"""PyTorch modules built on the MSA ops."""

from msa.nn.attention import MSAAttention
from msa.nn.rotary import RotaryEmbedding, apply_rotary

__all__ = ["MSAAttention", "RotaryEmbedding", "apply_rotary"]
