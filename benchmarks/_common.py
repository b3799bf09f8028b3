"""Shared helpers of the benchmark scripts: thread settings, timing, environment description.

Benchmarks print their results; nothing here writes files. Times are wall-clock seconds from
:func:`time.perf_counter`, summarized by the median of repeats after warm-up runs (the first
call of a solver pays one-time costs: allocator growth, lazy imports, autograd graph setup).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def cold_compile() -> Iterator[None]:
    """Run a block with ``torch.compile``'s caches as a fresh install has them: empty.

    A timed run with ``compile=True`` must pay for its compiling as a user's first run does.
    Left alone, it would not: kernels compiled earlier in the process (an earlier size, an
    earlier fold) are reused whatever the batch size, and inductor keeps compiled graphs and
    kernels on disk (``/tmp/torchinductor_$USER``) from earlier processes, which cut a PK
    fit's compiling from about 45 s to nearly nothing here. Inside the block dynamo's caches
    and pyro_hds's compiled solver functions are reset and inductor works in a new temporary
    cache directory (``torch._inductor.utils.fresh_cache``, which also clears its in-memory
    caches), removed afterwards."""
    import torch._dynamo
    import torch._inductor.utils as inductor_utils

    from pyro_hds.solvers import _integrate

    fresh = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache

    def forget() -> None:
        torch._dynamo.reset()
        _integrate._COMPILED.clear()

    forget()
    try:
        with fresh():
            yield
    finally:  # the kernels point into the removed directory: never reuse them
        forget()
