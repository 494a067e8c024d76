"""FP8 index keys and queries: each row scaled by its amax / 448 and rounded to ``float8_e4m3fn``.

The PyTorch definition that the paged FP8 index scan matches (``msa.kernels.paged``):
an FP8 index-key cache stores ``round(k / s_k)`` and ``s_k`` per key, the scan
rounds each index query the same way and scores ``s_q * s_k * <round(q / s_q), round(k / s_k)>``.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def nearest_e4m3(y: torch.Tensor) -> torch.Tensor:
    """The float8_e4m3fn value nearest to float32 ``y`` (|y| <= FP8_MAX; ties to even), as float32.

    Rounded here rather than by ``.to(float8_e4m3fn)``, whose CPU conversion maps some values just below
    a power of two (e.g. 126.8) to half of it; converting the exact result is then exact everywhere.
    """
    _, exponent = torch.frexp(y)  # y = m * 2**exponent, 0.5 <= |m| < 1
    step = torch.ldexp(torch.ones_like(y), (exponent - 1).clamp(min=-6) - 3)  # 3 mantissa bits; subnormal floor
    return torch.round(y / step) * step


def round_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., n]`` -> (FP8 rows, float32 scales ``[...]``): rows scaled by amax / FP8_MAX, rounded to nearest."""
    scale = x.float().abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / FP8_MAX
    return nearest_e4m3(x.float() / scale[..., None]).to(FP8_DTYPE), scale


def rounded(x: torch.Tensor) -> torch.Tensor:
    """``x`` as its FP8 rounding represents it, in float32."""
    values, scale = round_rows(x)
    return values.float() * scale[..., None]
