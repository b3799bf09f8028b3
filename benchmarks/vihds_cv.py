r"""Cross-validation and zero-shot evaluation of the double-receiver models on the vi-hds data.

For each of ``--folds`` seeded folds over wells (``pyro_hds.datasets.folds``) and for each
held-out device of ``--zero-shot`` (``heldout_device_split``: every well of that device is a
test well, none is trained on), the script

1. fits the channel scales on the training wells only (``ChannelScaler``);
2. fits ``--model`` (DR_Constant by default; DR_Growth, DR_Constant with a noise precision
   per well, DR_Blackbox, DR_HierarchicalBlackbox or the hybrid) for ``--epochs`` epochs
   (batch 36, IWAE with ``--particles`` draws per well per step, spent as
   ``--outer-particles`` S draws of the globals with ``particles / S`` local draws each; Adam
   lr 0.01, 0.005 for the black boxes, decaying tenfold; float32; seed 0; ``--compile``:
   Heun's method compiled), keeping the last parameters (no epoch is selected, so the test
   wells never influence training);
3. reports the held-out importance-weighted bound per test well with ``--eval-particles``
   particles (``FitResult.evaluate``; the paper's metric), its mean over the test wells, and
   the fit time.

Run: ``python benchmarks/vihds_cv.py`` (defaults: 4 folds, 100 epochs, K = 100, evaluation with
K = 1000, zero-shot R33S32 and RS100S34); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Sequence

import pyro
import torch
from _common import environment, format_seconds, set_threads

import pyro_hds
from pyro_hds.datasets import folds, heldout_device_split, load_vihds, train_test
from pyro_hds.models import double_receiver as dr
from pyro_hds.solvers import Heun

BATCH = 36


def make_model(name: str, compile: bool = False):
    """A fresh model (its own networks, for the neural ones) and its learning rate;
    ``compile``: Heun's method with ``compile=True`` (else the models' default solver)."""
    from pyro_hds.models import double_receiver_blackbox as bb

    solver = Heun(compile=True) if compile else None
    makers = {
        "constant": lambda: (functools.partial(dr.model, solver=solver), 0.01),
        "growth": lambda: (functools.partial(dr.model_growth, solver=solver), 0.01),
        "well-noise": lambda: (functools.partial(dr.model_well_noise, solver=solver), 0.01),
        "blackbox": lambda: (bb.make_model(solver), 0.005),
        "hierarchical": lambda: (bb.make_model(solver, hierarchical=True), 0.005),
        "hybrid": lambda: (dr.make_hybrid_model(solver), 0.01),
    }
    return makers[name]()


def run_split(data, train_idx, test_idx, args) -> tuple[float, float, int]:
    """Fit on ``train_idx`` and return (mean held-out bound per well, fit seconds, test wells)."""
    train, test = train_test(data, train_idx, test_idx, dtype=torch.float32)
    steps_per_epoch = -(-len(train) // BATCH)
    pyro.clear_param_store()
    model, lr = make_model(args.model, args.compile)
    start = time.perf_counter()
    result = pyro_hds.fit(
        model,
        train,
        objective=pyro_hds.IWAE(
            num_particles=args.particles // args.outer_particles,
            num_outer_particles=args.outer_particles,
        ),
        num_steps=steps_per_epoch * args.epochs,
        batch_size=BATCH,
        lr=lr,
        seed=0,
        progress=False,
    )
    seconds = time.perf_counter() - start
    torch.manual_seed(1)
    bound = result.evaluate(test, num_particles=args.eval_particles)
    return float(bound.mean()), seconds, len(test)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--model",
        default="constant",
        choices=["constant", "growth", "well-noise", "blackbox", "hierarchical", "hybrid"],
        help="DR_Constant, DR_Growth, DR_Constant with a noise precision per well, "
        "DR_Blackbox, DR_HierarchicalBlackbox or the hybrid",
    )
    parser.add_argument("--compile", action="store_true", help="integrate with Heun(compile=True)")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument(
        "--particles", type=int, default=100, help="training draws per well per step"
    )
    parser.add_argument(
        "--outer-particles",
        type=int,
        default=1,
        help="S global draws per step, each with particles / S local draws (must divide)",
    )
    parser.add_argument("--eval-particles", type=int, default=1000, help="evaluation K")
    parser.add_argument("--zero-shot", nargs="*", default=["R33S32", "RS100S34"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 folds, tiny budget")
    args = parser.parse_args(argv)
    if args.quick:
        args.folds, args.epochs, args.particles, args.eval_particles = 2, 1, 5, 20
        args.zero_shot = args.zero_shot[:1]
    if args.folds < 2 or args.epochs < 1 or args.particles < 1 or args.eval_particles < 1:
        parser.error("--folds must be >= 2; --epochs and particle counts >= 1")
    if args.outer_particles < 1 or args.particles % args.outer_particles:
        parser.error("--outer-particles must be >= 1 and divide --particles")
    set_threads(args.threads)
    print(f"# {environment()}")
    print(
        f"# model {args.model}, {args.epochs} epochs, batch {BATCH}, IWAE S = "
        f"{args.outer_particles} x K = {args.particles // args.outer_particles}, "
        f"held-out bound with K = {args.eval_particles}, float32, seed 0"
        f"{', Heun(compile=True)' if args.compile else ''}"
    )
    data = load_vihds(download=False)
    print("\n| split | test wells | held-out bound per well | fit time |")
    print("|---|---|---|---|")
    bounds = []
    for k, (train_idx, test_idx) in enumerate(folds(data, k=args.folds, seed=0)):
        bound, seconds, n = run_split(data, train_idx, test_idx, args)
        bounds.append(bound)
        print(f"| fold {k} | {n} | {bound:.1f} | {format_seconds(seconds)} |", flush=True)
    mean = sum(bounds) / len(bounds)
    spread = (sum((b - mean) ** 2 for b in bounds) / (len(bounds) - 1)) ** 0.5
    print(f"| mean of {len(bounds)} folds (sd) | | {mean:.1f} ({spread:.1f}) | |", flush=True)
    for device in args.zero_shot:
        train_idx, test_idx = heldout_device_split(data, device)
        bound, seconds, n = run_split(data, train_idx, test_idx, args)
        print(f"| zero-shot {device} | {n} | {bound:.1f} | {format_seconds(seconds)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
