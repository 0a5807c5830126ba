"""Batch-1 latency: warm-up, many repetitions, median and p95, variants interleaved.

Variants are timed round-robin (one call each per repetition, order rotated) so that load from
other processes on a shared machine hits all of them alike and the ratios stay fair.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np


def summarise(times_s: Sequence[float]) -> dict:
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    if len(ms) == 0:
        return {"p50": float("nan"), "p95": float("nan"), "mean": float("nan"), "n": 0}
    return {"p50": float(np.median(ms)), "p95": float(np.percentile(ms, 95)), "mean": float(ms.mean()),
            "n": int(len(ms))}


def interleaved(fns: dict[str, Callable[[np.ndarray], object]], inputs: Sequence[np.ndarray],
                warmup: int = 30, repeats: int = 300) -> dict[str, dict]:
    """Time each ``fn(x)`` on batch-1 ``inputs`` (cycled): ``{name: {p50, p95, mean, n}}`` in ms."""
    names = list(fns)
    for name in names:
        for i in range(warmup):
            fns[name](inputs[i % len(inputs)])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        x = inputs[r % len(inputs)]
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name](x)
            times[name].append(time.perf_counter() - t0)
    return {n: summarise(t) for n, t in times.items()}


def timed(fn: Callable[[np.ndarray], object], inputs: Sequence[np.ndarray], warmup: int = 3,
          repeats: int = 20, max_seconds: float | None = None) -> dict:
    """Time one model alone (for slow peers): stops early after ``max_seconds`` (at least 5 calls)."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times: list[float] = []
    start = time.perf_counter()
    for r in range(repeats):
        t0 = time.perf_counter()
        fn(inputs[r % len(inputs)])
        times.append(time.perf_counter() - t0)
        if max_seconds and r >= 4 and time.perf_counter() - start > max_seconds:
            break
    return summarise(times)


@contextmanager
def torch_threads(n: int):
    """Temporarily set torch's intra-op threads."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
