r"""pyro_hds and the reference implementation (microsoft/vi-hds) side by side on one fold.

The vi-hds case study's speed and accuracy comparison, run in one process on one machine:
DR_Constant on fold ``--fold`` of the wells (the reference's ``--split fold+1`` with the same
``--seed``: both draw the fold by ``numpy.random.RandomState(seed).permutation(312)`` cut in 4,
and both order the wells by file then CSV row), ``--epochs`` epochs of 234 training wells in
minibatches of 36, K = ``--particles`` importance samples, Adam lr 0.01, ``--threads`` torch
threads for each, one after the other. Then the held-out bound per well on the 78 test wells
with ``--eval-particles`` samples. pyro_hds keeps the learning rate constant
(``--lr-schedule constant``) as the reference does before its first decay at epoch 250 (it
multiplies its rate by 0.2 there). ``--dreg`` trains pyro_hds with the doubly reparameterized
gradient (the reference's HEAD declares a ``--dreg`` option, default on, but never reads it:
it trains with the plain IWAE gradient). Two diagnostics: ``--objective reference`` trains
pyro_hds with the reference's objective instead of the hierarchical one (the globals drawn
afresh with every importance sample and their prior-to-posterior ratio counted in every well's
bound, :class:`ReferenceObjective`), and ``--model well-noise`` fits
``double_receiver.model_well_noise`` (a noise precision per well and channel) instead of
DR_Constant.

The reference is not part of this project: point ``--reference`` at a checkout of
microsoft/vi-hds (its PyTorch HEAD) and ``--reference-python`` at an interpreter that can run it
(see docs/vihds.md for the versions used and the two numpy >= 1.24 fixes it needs). This
script only runs it, as a subprocess, and reads its printed log.

What is compared:

- *seconds per training epoch*: the reference prints its cumulative training time (batch loops
  only); pyro_hds's is timed at the same boundaries (``fit`` callbacks), first epoch included
  for both (for pyro_hds it also pays tracing the model and building the guide);
- pyro_hds spends the reference's K draws per well per step either as K local draws under one
  draw of the globals (S = 1) or as S global draws with K / S local draws each (the same
  number of ODE solves; more global draws give the global parameters lower-variance
  gradients);
- *held-out bound per well*, in nats on the common scale of unscaled, background-subtracted
  data: each side divides each channel by its own scale :math:`s_c` (the reference: maximum
  over all 312 wells, before the split; pyro_hds: over the training wells), which adds
  :math:`\sum_{t,c} \log s_c = 86 \sum_c \log s_c` to a well's log-density; that is subtracted.
  The reference's estimator re-samples the global parameters with every importance sample:
  :math:`\log \frac1K \sum_k p(y_i, \theta_{ik}, \phi_k) / q(\theta_{ik}, \phi_k)`, the
  global prior-to-posterior ratio inside every well's sum (its last-epoch value is printed; it
  would select the best validation epoch, which uses the test wells). pyro_hds's own metric
  (``FitResult.evaluate``) is the hierarchical one: the per-well bound given a draw of the
  globals, averaged over 4 draws. For a like-for-like row, pyro_hds's fit is also scored with
  the reference's estimator (K draws of globals and locals together, one local per global).

Run: ``python benchmarks/vihds_vs_reference.py --reference /path/to/vi-hds
--reference-python /path/to/venv/bin/python`` (defaults: fold 0, seed 1, 20 epochs, K = 200,
pyro_hds with S = 1 and S = 8, 2 threads, evaluation K = 1000). With seed 0 the reference's
bound diverges (its clipped-sample defect, see docs/vihds.md); seed 1 is the one
``../shared/VIHDS_REFERENCE.md`` measured.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pyro
import torch
from _common import cold_compile, environment, set_threads

import pyro_hds
from pyro_hds.datasets import ChannelScaler, folds, load_vihds, train_test
from pyro_hds.datasets.vihds import fetch_vihds
from pyro_hds.models import double_receiver as dr
from pyro_hds.plotting import plot_fits
from pyro_hds.solvers import Heun

BATCH = 36
#: the reference's log line after an evaluation epoch (vihds/training.py)
LOG_LINE = re.compile(
    r"epoch\s+(?P<epoch>\d+)\s*\|\s*train \(iwae-elbo = (?P<train>[-+.\deE]+), "
    r"time = (?P<mean>[-+.\deE]+), total = (?P<total>[-+.\deE]+)\)\s*\|\s*"
    r"val \(iwae-elbo = (?P<val>[-+.\deE]+)"
)


def parse_reference_log(text: str) -> dict[str, float]:
    """The last evaluation line of a reference log: epoch, training bound, mean seconds per
    epoch, cumulative training seconds and validation bound."""
    matches = list(LOG_LINE.finditer(text))
    if not matches:
        raise ValueError(
            "no 'epoch N | train (iwae-elbo = ..., time = ..., total = ...) | val (iwae-elbo "
            "= ...' line in the reference's output; is --reference a microsoft/vi-hds checkout?"
        )
    m = matches[-1].groupdict()
    return {k: float(v) for k, v in m.items()}


def log_scale_shift(scales: torch.Tensor, num_times: int) -> float:
    """:math:`T \\sum_c \\log s_c`: what dividing channel ``c`` by ``s_c`` adds to the
    log-density of one fully observed well of ``num_times`` times."""
    return num_times * float(torch.log(scales.double()).sum())


#: what the reference prints when a training batch's bound is NaN, before it stops
REFERENCE_NAN = "Cannot proceed with ELBO = nan"


def run_reference(args, data_dir: Path) -> tuple[dict[str, float] | None, float]:
    """Run the reference's DR_Constant on the fold; its parsed last log line (None when its
    training stopped on a NaN bound, which it reports and exits from with status 0) and wall
    time."""
    ref = Path(args.reference).resolve()
    script, spec = ref / "vihds" / "run_xval.py", ref / "specs" / "dr_constant_icml.yaml"
    for path in (script, spec):
        if not path.exists():
            raise SystemExit(f"--reference {ref}: {path.relative_to(ref)} not found")
    with tempfile.TemporaryDirectory(prefix="vihds_ref_") as work:
        env = dict(
            os.environ,
            PYTHONPATH=str(ref),
            INFERENCE_DATA_DIR=str(data_dir),
            INFERENCE_RESULTS_DIR=work,
            OMP_NUM_THREADS=str(args.threads),
            MKL_NUM_THREADS=str(args.threads),
        )
        cmd = [
            args.reference_python,
            str(script),
            str(spec),
            "--experiment=side_by_side",
            f"--seed={args.seed}",
            f"--split={args.fold + 1}",
            "--folds=4",
            f"--epochs={args.epochs}",
            f"--train_samples={args.particles}",
            f"--test_samples={args.eval_particles}",
            f"--test_epoch={args.epochs}",
            "--plot_epoch=0",
        ]
        print("# reference:", " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SystemExit(f"the reference failed (exit {proc.returncode}):\n{tail}")
    if REFERENCE_NAN in proc.stdout and not LOG_LINE.search(proc.stdout):
        return None, wall
    return parse_reference_log(proc.stdout), wall


def reference_estimator(result, test, num_samples: int, chunk: int = 250) -> float:
    r"""The reference's held-out estimator for a pyro_hds fit, mean over the test wells:
    :math:`\log \frac1K \sum_k w_k^{glob} w_{ik}` with ``num_samples`` joint draws of the
    globals and one draw of each well's locals per global draw (IWAE with K outer particles and
    one inner particle), in chunks of ``chunk`` draws."""
    parts_global, parts_local = [], []
    with result.parameters(), torch.no_grad():
        for start in range(0, num_samples, chunk):
            n = min(chunk, num_samples - start)
            objective = pyro_hds.IWAE(num_particles=1, num_outer_particles=n)
            w = objective.log_weights(result.model, result.guide, test)
            parts_global.append(w.global_terms.double())
            parts_local.append(w.local[:, 0, :].double())
    g, loc = torch.cat(parts_global), torch.cat(parts_local)  # (K,), (K, N)
    return float(joint_bounds(g, loc).mean())


def joint_bounds(global_terms: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    r"""``(N,)`` :math:`\log \frac1S \sum_s \exp(g_s + l_{si})` from the globals' terms
    ``(S,)`` and one local draw per global draw ``(S, N)``: every well's bound with the
    globals' prior-to-posterior ratio inside its own sum (the reference's estimator and
    objective)."""
    draws = global_terms.shape[0]
    return torch.logsumexp(global_terms[:, None] + local, 0) - math.log(draws)


class ReferenceObjective(pyro_hds.IWAE):
    r"""The reference's training objective, reproduced to diagnose its held-out figure (not
    for use): with :math:`S` joint draws :math:`(\phi_s, \theta_{is})` of the globals and
    one local draw per well under each, the loss is

    .. math::

        -\frac{N}{B} \sum_{i \in \text{batch}} \log \frac1S \sum_s
        \frac{p(\phi_s)\, p(\theta_{is} \mid \phi_s)\, p(y_i \mid \theta_{is}, \phi_s)}
             {q(\phi_s)\, q(\theta_{is} \mid y_i)},

    the globals' prior-to-posterior ratio inside every well's sum, as if each well had
    globals of its own (the reference re-draws them per well; in expectation the same). It
    is the defect named in the issue, which pyro_hds's own :class:`~pyro_hds.IWAE` does not
    have. Use it with ``num_particles=1``."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        w = self.log_weights(model, guide, *args, **kwargs)
        return -joint_bounds(w.global_terms, w.local[:, 0, :]).sum() * w.scale


def device_wells(data, group: int) -> list[int]:
    """Positions in ``data`` of the wells of device ``group``."""
    return [int(i) for i in torch.nonzero(data.groups == group).flatten()]


def reference_schedule(step: int, num_steps: int, steps_per_epoch: int) -> float:
    """The factor of the learning rate that the reference's HEAD applies: a
    ``MultiStepLR(milestones=[250, 1000], gamma=0.2)`` stepped after every epoch."""
    epoch = step // steps_per_epoch
    return 0.2 ** sum(epoch >= m for m in (250, 1000))


def run_pyro_hds(args, data, outer: int) -> tuple[float, float, float, float, float]:
    """Fit DR_Constant on the fold with ``outer`` draws of the globals per step and
    ``--particles / outer`` local draws per well under each: (s per epoch, held-out bound per
    well on the scaled data, the same by the reference's estimator, log-scale shift, wall
    time)."""
    train_idx, test_idx = folds(data, k=4, seed=args.seed)[args.fold]
    train, test = train_test(data, train_idx, test_idx, dtype=torch.float32)
    steps = -(-len(train) // BATCH)
    pyro.clear_param_store()
    stamps: list[float] = []

    def callback(step: int, loss: float) -> None:
        if (step + 1) % steps == 0:
            stamps.append(time.perf_counter())

    start = time.perf_counter()
    # compiling is timed from empty caches, as on a fresh install (not from the kernels of an
    # earlier S in this process or of an earlier run on disk)
    objective = (
        ReferenceObjective(num_particles=1, num_outer_particles=args.particles)
        if args.objective == "reference"
        else pyro_hds.IWAE(
            num_particles=args.particles // outer, num_outer_particles=outer, dreg=args.dreg
        )
    )
    model = dr.model_well_noise if args.model == "well-noise" else dr.model
    with cold_compile() if args.compile else contextlib.nullcontext():
        result = pyro_hds.fit(
            functools.partial(model, solver=Heun(compile=args.compile)),
            train,
            objective=objective,
            num_steps=steps * args.epochs,
            batch_size=BATCH,
            lr=0.01,
            lr_schedule=(
                functools.partial(reference_schedule, steps_per_epoch=steps)
                if args.lr_schedule == "reference"
                else args.lr_schedule
            ),
            seed=args.seed,
            progress=False,
            callback=callback,
        )
    per_epoch = (stamps[-1] - start) / len(stamps)
    durations = [b - a for a, b in itertools.pairwise([start, *stamps])]
    if len(durations) > 1:
        print(
            f"# pyro_hds S = {outer}: first epoch {durations[0]:.2f} s, later epochs median "
            f"{statistics.median(durations[1:]):.2f} s"
        )
    bound = float(result.evaluate(test, num_particles=args.eval_particles).mean())
    wall = time.perf_counter() - start
    if args.figure:
        path = f"{args.figure}_S{outer}.png"
        post = result.predict(test, num_samples=100, num_particles=10, seed=0)
        # the first two test wells of every device
        wells = [i for g in range(len(test.group_names)) for i in device_wells(test, g)[:2]]
        plot_fits(post, test, "y", individuals=wells, path=path)
        print(f"# wrote {path}: posterior predictive of two test wells per device")
    ref_style = reference_estimator(result, test, args.eval_particles)
    scales = ChannelScaler().fit(data[train_idx]).scales
    assert scales is not None
    shift = log_scale_shift(scales, data.observations.shape[1])
    return per_epoch, bound, ref_style, shift, wall


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--reference", required=True, help="a microsoft/vi-hds checkout")
    parser.add_argument(
        "--reference-python", default=sys.executable, help="the interpreter that runs it"
    )
    parser.add_argument("--fold", type=int, default=0, help="fold 0-3 (reference split + 1)")
    parser.add_argument("--seed", type=int, default=1, help="fold permutation and fit seed")
    parser.add_argument(
        "--lr-schedule",
        default="constant",
        choices=["constant", "exponential", "cosine", "reference"],
        help="pyro_hds's learning-rate schedule; 'reference': the reference's own (0.01, times "
        "0.2 from epoch 250 and again from epoch 1000)",
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--particles", type=int, default=200, help="training draws per well (the reference's K)"
    )
    parser.add_argument(
        "--outer-particles",
        type=int,
        nargs="+",
        default=[1, 8],
        help="pyro_hds runs: S global draws x K = particles / S local draws each",
    )
    parser.add_argument("--eval-particles", type=int, default=1000, help="evaluation K")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, each side")
    parser.add_argument("--skip-reference", action="store_true", help="run pyro_hds only")
    parser.add_argument(
        "--dreg",
        action="store_true",
        help="pyro_hds trains with IWAE(dreg=True) (the reference ignores its own --dreg)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="pyro_hds integrates with Heun(compile=True)"
    )
    parser.add_argument(
        "--model",
        default="constant",
        choices=["constant", "well-noise"],
        help="pyro_hds's model: DR_Constant, or with a noise precision per well and channel "
        "(double_receiver.model_well_noise)",
    )
    parser.add_argument(
        "--objective",
        default="hierarchical",
        choices=["hierarchical", "reference"],
        help="'reference': train pyro_hds with the reference's objective (globals re-drawn "
        "with every sample and counted in every well's bound; ReferenceObjective), a "
        "diagnostic of the reference's defect; one run with S = --particles, K = 1",
    )
    parser.add_argument(
        "--figure",
        metavar="PREFIX",
        help="write each pyro_hds fit's posterior predictive bands (median, 90%%) of two test "
        "wells per device to PREFIX_S<outer>.png",
    )
    args = parser.parse_args(argv)
    if args.objective == "reference":
        if args.dreg:
            parser.error("--dreg does not apply to --objective reference")
        args.outer_particles = [args.particles]
    if not 0 <= args.fold < 4 or args.epochs < 1 or args.particles < 1:
        parser.error("need 0 <= --fold < 4, --epochs >= 1, --particles >= 1")
    if any(s < 1 or args.particles % s for s in args.outer_particles):
        parser.error("every --outer-particles value must divide --particles")
    set_threads(args.threads)
    print(f"# {environment()}")
    print(
        f"# DR_Constant, fold {args.fold} of 4 (seed {args.seed}), {args.epochs} epochs, "
        f"batch {BATCH}, K = {args.particles}, held-out bound with K = {args.eval_particles}, "
        f"{args.threads} threads each; pyro_hds lr 0.01 {args.lr_schedule}"
        f"{', model ' + args.model if args.model != 'constant' else ''}"
        f"{', the reference objective' if args.objective == 'reference' else ''}"
        f"{', DReG' if args.dreg else ''}"
        f"{', Heun(compile=True)' if args.compile else ''}"
    )
    data_dir = fetch_vihds(download=False)
    data = load_vihds(data_dir, download=False)
    num_times = data.observations.shape[1]
    rows = []
    ref_failed = ref = None
    if not args.skip_reference:
        ref, ref_wall = run_reference(args, data_dir)
        if ref is None:
            ref_failed = (
                f"the reference stopped after {ref_wall:.0f} s: '{REFERENCE_NAN}. Exiting.' "
                "(a training minibatch's bound was NaN; it reports no epoch)"
            )
            print(f"# {ref_failed}")
    if ref is not None:
        if int(ref["epoch"]) != args.epochs:
            raise SystemExit(f"the reference's last evaluation is epoch {ref['epoch']}")
        ref_scales = ChannelScaler().fit(data).scales  # the reference's: all 312 wells
        assert ref_scales is not None
        ref_shift = log_scale_shift(ref_scales, num_times)
        ref_epoch = ref["total"] / ref["epoch"]
        rows.append(("reference (vi-hds HEAD)", ref_epoch, ref["val"], ref_shift, ref_wall))
    summary = []
    for outer in args.outer_particles:
        epoch_s, bound, ref_style, shift, wall = run_pyro_hds(args, data, outer)
        label = f"pyro_hds, S = {outer}, K = {args.particles // outer}"
        if args.objective == "reference":
            label = f"pyro_hds, the reference's objective, S = {outer}"
        if args.model != "constant":
            label += f", model {args.model}"
        rows.append((label, epoch_s, bound, shift, wall))
        rows.append((f"{label}, reference's estimator", epoch_s, ref_style, shift, 0.0))
        summary.append((label, epoch_s, bound - shift, ref_style - shift))

    print(
        "\n| implementation | s per epoch | held-out bound, own scaling | log-scale shift | "
        "held-out bound, unscaled | wall time |"
    )
    print("|---|---|---|---|---|---|")
    for name, epoch_s, bound, shift, wall in rows:
        print(
            f"| {name} | {epoch_s:.2f} | {bound:.1f} | {shift:.1f} | {bound - shift:.1f} | "
            f"{f'{wall:.0f} s' if wall else ''} |"
        )
    if ref_failed is not None:
        print(f"\nno comparison on this fold: {ref_failed}")
    elif not args.skip_reference:
        ref_row = rows[0]
        ref_unscaled = ref_row[2] - ref_row[3]
        print()
        for label, epoch_s, own, ref_style in summary:
            print(
                f"{label}: speed reference / pyro_hds = {ref_row[1] / epoch_s:.2f} (target >= "
                f"5); held-out bound minus the reference's (unscaled, nats per well): "
                f"{own - ref_unscaled:+.1f} (own metric), {ref_style - ref_unscaled:+.1f} (the "
                "reference's estimator)"
            )
    if not all(math.isfinite(r[2]) for r in rows):
        print("warning: a held-out bound is not finite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
