"""PyTorch modules built on the MSA ops."""

from msa.nn.attention import MSAAttention
from msa.nn.rotary import RotaryEmbedding, apply_rotary
from msa.nn.transformer import MSAConfig, MSATransformer

__all__ = ["MSAAttention", "MSAConfig", "MSATransformer", "RotaryEmbedding", "apply_rotary"]
