"""The main job: a real hierarchical fit on simulated pharmacokinetic data, end to end.

Run ``python -m pyro_hds.demo`` (``--help`` for options). It

1. simulates 102 individuals in three groups from the one-compartment oral-dose model of
   ``pyro_hds.models.pk_oral`` with known parameters (two doses each, 14 samples, noise);
2. fits the hierarchical model with the amortized guide (an MLP encoder; ``--semi-amortized``
   adds a learned correction per training individual) and the hierarchical IWAE bound
   (K = 64 inner particles, DReG gradients for the local guide); the ODE is integrated by
   ``RK4(substeps=4, compile=True)`` when a C++ compiler is on the path (each interval one
   fused kernel, forward and backward: faster per step, see docs/benchmarks.md; compiling takes
   tens of seconds on a fresh install and little once inductor's on-disk cache holds the
   kernels), else eagerly (``--no-compile`` forces that);
3. draws the posterior by particle Gibbs (``FitResult.gibbs``: 8 Markov chains started from
   the guide, the locals moved by proposals from Laplace approximations of their
   conditionals, whose stationary distribution is the exact posterior: the guide's errors
   slow the mixing but do not shift the target; ``--importance`` draws by importance
   resampling of the guide instead, which corrects only the individual parameters);
   prints a posterior summary of the population and group parameters beside the true values
   with the chains' bulk ESS and R-hat, and how often the 90% intervals of the individual
   parameters cover the truth;
4. predicts 21 NEW individuals with no retraining (the encoder reads their data; at most 500
   draws, each from ``--particles`` importance particles);
5. writes an ArviZ netCDF file and PNG figures of the fits with 90% bands and the training
   curve into ``--out`` (default ``pyro_hds_demo/``).
"""

from __future__ import annotations

import argparse
import functools
import shutil
import time
from pathlib import Path

import numpy as np
import pyro
import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m pyro_hds.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", default="pyro_hds_demo", help="output directory")
    # 600: the chains correct what a longer fit would (the summary of 400, 600 and 1000 steps
    # agrees within a posterior SD; docs/benchmarks.md)
    parser.add_argument("--steps", type=int, default=600, help="optimisation steps")
    parser.add_argument("--particles", type=int, default=64, help="IWAE inner particles K")
    parser.add_argument(
        "--encoder",
        choices=["mlp", "conv"],
        default="mlp",
        help="encoder of the amortized guide: MLPEncoder, or vi-hds's ConvEncoder",
    )
    parser.add_argument(
        "--no-dreg", action="store_true", help="plain IWAE gradients instead of DReG"
    )
    parser.add_argument(
        "--semi-amortized",
        action="store_true",
        help="AmortizedGuide(semi_amortized=True): a learned correction per individual",
    )
    parser.add_argument("--batch-size", type=int, default=34, help="individuals per step")
    parser.add_argument("--per-group", type=int, default=34, help="individuals per group")
    parser.add_argument("--samples", type=int, default=1000, help="posterior draws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--gibbs",
        type=int,
        nargs=2,
        metavar=("CHAINS", "WARMUP"),
        help="particle Gibbs (FitResult.gibbs) with this many chains and warm-up sweeps "
        "(default: 8 30)",
    )
    parser.add_argument(
        "--importance",
        action="store_true",
        help="draw the posterior by importance resampling of the guide (FitResult.posterior) "
        "instead of particle Gibbs: the population parameters stay the guide's",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="integrate eagerly even when a C++ compiler is available for torch.compile",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.gibbs is not None and args.importance:
        parser.error("--gibbs and --importance exclude each other: choose one way to draw")
    args.gibbs = (8, 30) if args.gibbs is None else tuple(args.gibbs)
    if args.gibbs[0] < 1 or args.gibbs[1] < 0:
        parser.error("--gibbs needs CHAINS >= 1 and WARMUP >= 0")

    import pyro_hds
    from pyro_hds.models import pk_oral
    from pyro_hds.plotting import plot_fits, plot_training

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pyro.clear_param_store()
    data, truth = pk_oral.simulate(per_group=args.per_group, seed=args.seed)
    print(f"data: {data}")

    started = time.perf_counter()
    from pyro_hds.encoders import ConvEncoder, MLPEncoder
    from pyro_hds.guides import AmortizedGuide

    compile_ode = not args.no_compile and compiler_available()
    model = functools.partial(pk_oral.model, solver=pyro_hds.RK4(substeps=4, compile=compile_ode))
    print(
        "solver: RK4(substeps=4, compile=True), one fused kernel per interval (compiled "
        "before the first step: tens of seconds on a first run, little once cached)"
        if compile_ode
        else "solver: RK4(substeps=4), eager"
        + ("" if args.no_compile else " (no C++ compiler on the path for torch.compile)")
    )

    shape = (data.num_times, data.num_channels)
    pyro.set_rng_seed(args.seed)  # the encoder's initial weights come from the generator now
    encoder = MLPEncoder(*shape) if args.encoder == "mlp" else ConvEncoder(*shape)
    result = pyro_hds.fit(
        model,
        data,
        guide=AmortizedGuide(model, encoder=encoder, semi_amortized=args.semi_amortized),
        objective=pyro_hds.IWAE(num_particles=args.particles, dreg=not args.no_dreg),
        num_steps=args.steps,
        batch_size=min(args.batch_size, len(data)),
        lr=0.02,
        seed=args.seed,
        progress=not args.no_progress,
    )
    fit_seconds = time.perf_counter() - started
    drawing = time.perf_counter()
    if args.importance:
        posterior = result.posterior(num_samples=args.samples, num_particles=args.particles, seed=1)
        how = f"importance resampling, K = {args.particles}"
    else:
        # no importance step (num_particles=1; the guide's local draws rarely win here, its
        # ESS is a few of 64) and no random walk: the default Laplace step moves every
        # individual's locals to a near-fresh draw of their conditional (accepted 0.75-0.85
        # of the time in the benchmark's runs at N = 1000), two outer steps per sweep mix
        # the population parameters, and the Newton steps of the first five warm-up sweeps
        # bring them in: 30 warm-up sweeps (docs/benchmarks.md)
        posterior = result.gibbs(
            num_samples=args.samples,
            num_chains=args.gibbs[0],
            warmup=args.gibbs[1],
            num_particles=1,
            local_steps=0,
            outer_steps=2,
            seed=1,
            progress=not args.no_progress,
        )
        how = f"particle Gibbs, {args.gibbs[0]} chains after {args.gibbs[1]} warm-up sweeps"
        accept = ", ".join(f"{k} {v:.2f}" for k, v in posterior.diagnostics["acceptance"].items())
        print(f"\nparticle Gibbs: {args.gibbs[0]} chains, acceptance rates {accept}")

    draw_seconds = time.perf_counter() - drawing
    chains, num_draws = posterior.num_chains, len(posterior.samples["sigma"])
    print(
        f"\nfit: {args.steps} steps in {fit_seconds:.1f} s; {num_draws} posterior draws "
        f"({how}) in {draw_seconds:.1f} s"
    )
    by_gibbs = not args.importance
    print("\nposterior summary (population and group parameters)")
    header = f"{'site':<14}{'true':>9}{'mean':>9}{'sd':>9}{'5%':>9}{'95%':>9}  covered"
    if by_gibbs:
        header += f"{'ess':>7}{'r_hat':>7}"
    print(header)
    print("-" * len(header))
    rows = {}
    for name in ("ka_pop", "cl_pop", "v_pop", "group_sd", "omega", "sigma", "cl_group"):
        draws = posterior.samples[name]
        values = draws.reshape(draws.shape[0], -1).double().numpy()
        true = truth[name].reshape(-1)
        labels = [name] if values.shape[1] == 1 else [f"{name}[{g}]" for g in data.group_names]
        if by_gibbs:
            ess, rhat = chain_diagnostics(values, chains)
        for j, label in enumerate(labels):
            d = values[:, j]
            lo, hi = np.quantile(d, [0.05, 0.95])
            covered = bool(lo <= float(true[j]) <= hi)
            rows[label] = (float(true[j]), d.mean(), d.std(), lo, hi, covered)
            line = (
                f"{label:<14}{float(true[j]):>9.3f}{d.mean():>9.3f}{d.std():>9.3f}"
                f"{lo:>9.3f}{hi:>9.3f}  {'yes' if covered else 'NO ':<7}"
            )
            if by_gibbs:
                line += f"{ess[j]:>7.0f}{rhat[j]:>7.3f}"
            print(line.rstrip())
    print("\nindividual parameters: share of 90% intervals covering the truth")
    coverage = {}
    for name in ("ka", "cl", "v"):
        d = posterior.samples[name].double()
        lo, hi = torch.quantile(d, 0.05, dim=0), torch.quantile(d, 0.95, dim=0)
        coverage[name] = float(((lo <= truth[name]) & (truth[name] <= hi)).double().mean())
        print(f"  {name:<4}{coverage[name]:.2f}  (expected about 0.90)")
    if by_gibbs:
        print(
            f"\nchains: ess is the bulk effective sample size of the {num_draws} draws, "
            "r_hat the rank-normalized split R-hat (ArviZ); near 1 (say below 1.05) when "
            "the chains agree"
        )
    else:
        k = posterior.pareto_k
        print(
            f"\nimportance-sampling diagnostics: Pareto k-hat median {float(k.nanmedian()):.2f}, "
            f"{int((k > 0.7).sum())} of {len(k)} individuals above 0.7; "
            f"ESS median {float(posterior.ess.median()):.1f} of K = {args.particles}"
        )

    new_data, new_truth = pk_oral.simulate(num_groups=3, per_group=7, seed=args.seed + 100)
    predicting = time.perf_counter()
    # the cost grows with draws x particles x individuals (scratch timing, warm: 1000 x 64 x 21
    # solves took 3.4-5.5 s, 500 x 64 x 21 0.7-0.9 s); 500 draws summarize 21 individuals
    new_post = result.predict(
        new_data, num_samples=min(args.samples, 500), num_particles=args.particles
    )
    predict_seconds = time.perf_counter() - predicting
    err = (new_post.samples["cl"].mean(0) / new_truth["cl"]).log().abs().median()
    print(
        f"\n{len(new_data)} NEW individuals predicted without retraining in "
        f"{predict_seconds:.1f} s: median |log error| of clearance {float(err):.3f}"
    )

    writing = time.perf_counter()
    tree = pyro_hds.to_datatree(posterior, data)
    nc_path = out / "pk_posterior.nc"
    tree.to_netcdf(nc_path)
    fig_path = out / "pk_fits.png"
    plot_fits(posterior, data, "y", path=str(fig_path))
    plot_training(result.history, path=str(out / "pk_training.png"))
    print(
        f"\nwrote {nc_path} (ArviZ DataTree), {fig_path} and {out / 'pk_training.png'} in "
        f"{time.perf_counter() - writing:.1f} s"
    )
    return {"rows": rows, "coverage": coverage, "fit_seconds": fit_seconds, "result": result}


def chain_diagnostics(values: np.ndarray, chains: int) -> tuple[np.ndarray, np.ndarray]:
    """Bulk ESS and rank-normalized split R-hat (ArviZ) of each column of ``values`` ``(D,
    P)``, whose ``D`` draws are ``chains`` chains of equal length one after another."""
    import arviz_stats

    per_chain = values.reshape(chains, -1, values.shape[1])
    ess = np.asarray(arviz_stats.ess(per_chain, method="bulk"), dtype=float).reshape(-1)
    rhat = np.asarray(arviz_stats.rhat(per_chain), dtype=float).reshape(-1)
    return ess, rhat


def compiler_available() -> bool:
    """Whether a C++ compiler that torch.compile's CPU backend can call is on the path (the
    ``CXX`` variable, else ``c++``, ``g++`` or ``clang++``)."""
    import os

    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return any(shutil.which(name) for name in names)


if __name__ == "__main__":
    main()
