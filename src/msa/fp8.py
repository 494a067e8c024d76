"""FP8 index ranking: the Index Branch's product in ``float8_e4m3fn``.

``select_blocks(..., index_dtype=torch.float8_e4m3fn)`` and an FP8 index-key
cache (:class:`msa.inference.PagedKVCache`) rank blocks with 8-bit index
vectors, as the paper's own kernels offer: half the index bytes, twice the
matrix throughput of bf16 on Hopper. Each index key is scaled by its amax /
448 and rounded to the nearest e4m3 value, its float32 scale kept; each index
query row is rounded the same way and its scale dropped (a positive factor of
a whole row changes no ranking). A block's score is then
``max over its visible keys of scale_k * <q8, k8>``: the selection is the
exact one for the rounded vectors, not bit-comparable to the bf16 one.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_NAME = "float8_e4m3fn"  # its name in configs saved as JSON
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
INVERSE_FP8_MAX = float(torch.tensor(1 / FP8_MAX, dtype=torch.float32))  # 1 / 448 rounded to float32


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., n]`` -> (``float8_e4m3fn`` rows, float32 scales ``[...]``) with ``x ~ rows * scales``."""
    x = x.float()
    # times the float32 reciprocal, as the kernels compute it (CUDA divides by a scalar that way, the CPU exactly)
    scale = x.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) * INVERSE_FP8_MAX
    return (x / scale[..., None]).to(FP8_DTYPE), scale


def rounded(x: torch.Tensor) -> torch.Tensor:
    """``x`` as its FP8 rows represent it, in float32."""
    values, scale = quantize_rows(x)
    return values.float() * scale[..., None]


def check_index_dtype(index_dtype: torch.dtype | None, dtype: torch.dtype) -> None:
    """``index_dtype`` of the ranking: None, the inputs' ``dtype`` or :data:`FP8_DTYPE`."""
    if index_dtype not in (None, dtype, FP8_DTYPE):
        raise ValueError(f"index_dtype must be None, the index inputs' dtype ({dtype}) or {FP8_DTYPE}, "
                         f"got {index_dtype}")


def index_dtype_from_name(name: str | None) -> torch.dtype | None:
    """A config's ``index_dtype`` entry (None or :data:`FP8_NAME`) as a torch dtype."""
    if name not in (None, FP8_NAME):
        raise ValueError(f"index_dtype must be None or {FP8_NAME!r}, got {name!r}")
    return None if name is None else FP8_DTYPE
