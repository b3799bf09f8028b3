"""Shared helpers of the benchmark scripts: thread settings, timing, environment description.

Benchmarks print their results; nothing here writes files. Times are wall-clock seconds from
:func:`time.perf_counter`, summarized by the median of repeats after warm-up runs (the first
call of a solver pays one-time costs: allocator growth, lazy imports, autograd graph setup).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Median and spread of repeated wall-clock measurements, in seconds."""

    median: float
    minimum: float
    maximum: float
    repeats: int

    def __str__(self) -> str:
        return format_seconds(self.median)


def time_call(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then the median of ``repeats`` timed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return Timing(statistics.median(samples), min(samples), max(samples), repeats)


def set_threads(threads: int) -> None:
    """Fix torch's intra-op (and, when still possible, inter-op) thread counts."""
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set, or parallel work has started: keep the default
        pass


def environment() -> str:
    """One line naming the date, machine, core count, Python and torch versions and threads."""
    today = datetime.date.today().isoformat()
    cpu = platform.processor() or platform.machine()
    return (
        f"{today}; {platform.system()} {cpu}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}; torch {torch.__version__}; "
        f"torch threads {torch.get_num_threads()}"
    )


def format_seconds(seconds: float) -> str:
    """Seconds with a unit chosen for 3 significant digits (``12.3 ms``, ``4.56 s``)."""
    if seconds != seconds:  # NaN: not measured
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"
