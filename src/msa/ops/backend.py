"""Which implementation runs behind the public ops: ``MSA_BACKEND`` = auto | triton | torch.

``auto`` (default) runs the Triton kernels on CUDA tensors and the PyTorch
path elsewhere; ``triton`` forces the kernels (on CPU tensors only under
``TRITON_INTERPRET=1``); ``torch`` forces the PyTorch path. Shapes the kernels
do not support fall back to the PyTorch path with a one-time warning.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from msa.ops.checks import check_flag

BACKENDS = ("auto", "triton", "torch")
HAVE_TRITON = importlib.util.find_spec("triton") is not None
_warned: set[str] = set()


def _pow2_between(value: int, low: int, high: int) -> bool:
    return low <= value <= high and value & (value - 1) == 0


def unsupported_reason(*, dtype: torch.dtype, head_dim: int | None = None, index_dim: int | None = None,
                       block_size: int, topk: int, heads_per_group: int | None = None,
                       fp8_device: torch.device | None = None) -> str | None:
    """Why the Triton kernels cannot take this shape, or None if they can.

    ``fp8_device``: the device of a call that ranks with FP8 index products (:mod:`msa.fp8`).
    """
    widest = max(head_dim or 0, index_dim or 0)
    if dtype == torch.float32 and widest * block_size >= 128 * 128:
        return f"float32 tiles of {block_size} x {widest} (shared memory; use bf16/fp16 or smaller blocks)"
    if head_dim is not None and not _pow2_between(head_dim, 16, 256):
        return f"head dim {head_dim} (kernels take powers of two in 16..256)"
    if index_dim is not None and not _pow2_between(index_dim, 16, 256):
        return f"index head dim {index_dim} (kernels take powers of two in 16..256)"
    if not 16 <= block_size <= 256:
        return f"block_size {block_size} (kernels take 16..256)"
    if topk > 64:
        return f"topk {topk} (kernels take at most 64)"
    if heads_per_group is not None and heads_per_group > 64:
        return f"{heads_per_group} query heads per group (kernels take at most 64)"
    if fp8_device is not None and fp8_device.type == "cuda":
        if index_dim is not None and index_dim < 32:
            return f"FP8 index products of index head dim {index_dim} (FP8 tensor-core products take at least 32)"
        if torch.cuda.get_device_capability(fp8_device) < (8, 9):
            return "FP8 index products below compute capability 8.9"
    return None


def use_triton(op: str, device: torch.device, reason: str | None) -> bool:
    """Decide for one call of ``op`` on tensors of ``device``; ``reason`` from :func:`unsupported_reason`."""
    choice = os.environ.get("MSA_BACKEND", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"MSA_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch" or (choice == "auto" and (device.type != "cuda" or not HAVE_TRITON)):
        return False
    if not HAVE_TRITON:
        raise RuntimeError("MSA_BACKEND=triton but triton is not installed (pip install triton)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"MSA_BACKEND=triton needs CUDA tensors (got {device}) or TRITON_INTERPRET=1")
    if reason is not None:
        key = f"{op}: {reason}"
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"msa.{op}: the Triton kernels do not support {reason}; using the PyTorch path",
                          stacklevel=3)
        return False
    return True


def resolve_deterministic(deterministic: bool | None) -> bool:
    """An op's ``deterministic`` argument (checked): None follows ``torch.use_deterministic_algorithms``, a bool
    overrides it for the call."""
    check_flag("deterministic", deterministic)
    return torch.are_deterministic_algorithms_enabled() if deterministic is None else deterministic


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32 on the PyTorch paths."""
    return torch.promote_types(dtype, torch.float32)
