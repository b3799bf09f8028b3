r"""Time per training epoch of the prescribed double-receiver model (DR_Constant), vi-hds setting.

The issue's speed target compares an epoch of pyro_hds with one of the reference implementation
(microsoft/vi-hds) on the same machine: 234 training wells (fold 0 of 4), minibatches of 36
wells (7 per epoch), K importance particles, Heun's method with one step per observation
interval, float32. This script measures pyro_hds: one ``pyro_hds.fit`` of ``--epochs`` + 1
epochs without validation, timed at every epoch boundary; the first epoch (which pays the
set-up: tracing the model, building the guide) is left out and the median of the others is
printed.

The reference is not run here (its code may not be committed or built by project scripts);
its figure, measured on a machine of this kind with two threads at K = 200, is quoted from
``../shared/VIHDS_REFERENCE.md``: 2.46 s per epoch (p10-p90 2.30-2.77). Run the reference beside
this script on the same machine before drawing a conclusion from a ratio.

Run: ``python benchmarks/vihds_epoch.py --particles 200 --threads 2`` (the reference's setting);
``--quick`` for a smoke run; ``--compile`` to integrate with ``Heun(compile=True)`` (the
warm-up epoch then also pays compiling); ``--breakdown`` to print where a step's time goes
(wall time per phase, median over the timed steps, measured by wrapping the functions that a
step calls: the traces of guide and model, within them the ODE solve's forward pass and the
guide's forward, the log-weights, the backward pass and the optimizer's step).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pyro
import torch
from _common import cold_compile, environment, format_seconds, set_threads

import pyro_hds
from pyro_hds.datasets import folds, load_vihds, train_test
from pyro_hds.models import double_receiver as dr
from pyro_hds.solvers import Heun

#: (label, a function giving the owner, attribute) of what --breakdown times; nested labels
#: (indented) are parts of the label above them
PHASES: list[tuple[str, Callable[[], object], str]] = [
    ("traces of guide and model", lambda: pyro_hds.objectives.IWAE, "_traces"),
    ("  of which the ODE solve, forward", lambda: sys.modules["pyro_hds.ode"], "solve"),
    ("  of which the guide's forward", lambda: pyro_hds.AmortizedGuide, "forward"),
    ("log-weights and bound", lambda: pyro_hds.objectives.IWAE, "_weights"),
    ("backward", lambda: torch.Tensor, "backward"),
    ("optimizer step", lambda: sys.modules["pyro_hds.fit"]._Adam, "step"),
]


@contextmanager
def breakdown(step_of: Callable[[], int]) -> Iterator[dict[str, dict[int, float]]]:
    """Wrap the functions of :data:`PHASES` so that each call adds its wall time to
    ``times[label][step]`` (``step_of()`` names the step running); restored on exit."""
    times: dict[str, dict[int, float]] = {label: defaultdict(float) for label, _, _ in PHASES}
    saved = []
    for label, owner_of, attr in PHASES:
        owner = owner_of()
        original = getattr(owner, attr)
        saved.append((owner, attr, original))

        def timed(*args, __fn=original, __acc=times[label], **kwargs):
            start = time.perf_counter()
            try:
                return __fn(*args, **kwargs)
            finally:
                __acc[step_of()] += time.perf_counter() - start

        setattr(owner, attr, timed)
    try:
        yield times
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def print_breakdown(times: dict[str, dict[int, float]], steps: dict[int, float]) -> None:
    """Median per step of each phase over the steps in ``steps`` (step -> wall time)."""
    print("\n| phase | ms per step (median) | share |")
    print("|---|---|---|")
    total = statistics.median(steps.values())
    top_level = 0.0
    for label, _, _ in PHASES:
        value = statistics.median(times[label].get(i, 0.0) for i in steps)
        if not label.startswith(" "):
            top_level += value
        print(f"| {label} | {value * 1e3:.1f} | {value / total:.0%} |")
    rest = total - top_level
    print(f"| the rest (data, clipping, checks, Python) | {rest * 1e3:.1f} | {rest / total:.0%} |")
    print(f"| whole step | {total * 1e3:.1f} | 100% |")


#: the reference's seconds per epoch at K = 200, two threads (VIHDS_REFERENCE.md)
REFERENCE_EPOCH_S = 2.46
BATCH = 36


@contextmanager
def _nothing() -> Iterator[dict[str, dict[int, float]]]:
    yield {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--particles", type=int, default=200, help="IWAE particles K")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (median)")
    parser.add_argument("--quick", action="store_true", help="smoke run: K = 5, 1 epoch")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Heun(compile=True): the solve as one torch.compile'd scan over the intervals",
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="print the wall time per phase of a step"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.particles, args.epochs = 5, 1
    if args.particles < 1 or args.epochs < 1:
        parser.error("--particles and --epochs must be >= 1")
    set_threads(args.threads)
    print(f"# {environment()}")
    data = load_vihds(download=False)
    train, _ = train_test(data, *folds(data, k=4, seed=0)[0], dtype=torch.float32)
    steps = -(-len(train) // BATCH)  # minibatches per epoch
    print(
        f"# DR_Constant, {len(train)} training wells, batch {BATCH} ({steps} steps per epoch), "
        f"K = {args.particles}, Heun one step per interval"
        f"{' (compiled)' if args.compile else ''}, float32"
    )
    pyro.clear_param_store()
    stamps: list[float] = []
    current = [0]  # the step running
    step_ends: dict[int, float] = {}

    def callback(step: int, loss: float) -> None:
        # fit() calls back after every step; an epoch ends every `steps` steps
        step_ends[step] = time.perf_counter()
        current[0] = step + 1
        if (step + 1) % steps == 0:
            stamps.append(time.perf_counter())

    start = time.perf_counter()
    with (
        breakdown(lambda: current[0]) if args.breakdown else _nothing() as phase_times,
        cold_compile() if args.compile else _nothing(),  # the warm-up epoch compiles from scratch
    ):
        pyro_hds.fit(
            functools.partial(dr.model, solver=Heun(compile=args.compile)),
            train,
            objective=pyro_hds.IWAE(num_particles=args.particles),
            num_steps=steps * (args.epochs + 1),
            batch_size=BATCH,
            lr=0.01,
            seed=0,
            progress=False,
            callback=callback,
        )
    bounds = [start, *stamps]
    times = [b - a for a, b in itertools.pairwise(bounds)]
    print(f"warm-up epoch (set-up included): {format_seconds(times[0])}")
    for i, t in enumerate(times[1:], 1):
        print(f"epoch {i}: {format_seconds(t)}", flush=True)
    times = times[1:]
    median = statistics.median(times)
    if args.breakdown:
        # the steps after the warm-up epoch, each timed from the previous step's end
        timed = {i: step_ends[i] - step_ends[i - 1] for i in range(steps, len(step_ends))}
        print_breakdown(phase_times, timed)
    print(f"\npyro_hds: {format_seconds(median)} per epoch (median of {len(times)})")
    if args.particles == 200 and args.threads == 2:
        print(
            f"reference (VIHDS_REFERENCE.md, not run here): {REFERENCE_EPOCH_S} s per epoch; "
            f"ratio reference / pyro_hds = {REFERENCE_EPOCH_S / median:.2f} (target >= 5)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
