"""Wall-clock timing of a callable on CPU or CUDA: warm-up, repeats, median."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    On CUDA each run is bracketed by events on the current stream, so only device
    time between them counts; on CPU a host clock brackets each call.
    """
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)
