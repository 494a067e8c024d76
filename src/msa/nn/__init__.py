"""PyTorch modules built on the MSA ops."""

from msa.nn.attention import KeyPrefix, MSAAttention
from msa.nn.index_branch import IndexBranch
from msa.nn.rotary import RotaryEmbedding, apply_rotary
from msa.nn.transformer import MSAConfig, MSATransformer

__all__ = ["IndexBranch", "KeyPrefix", "MSAAttention", "MSAConfig", "MSATransformer", "RotaryEmbedding", "apply_rotary"]
