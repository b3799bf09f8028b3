"""Batched ODE solvers side by side: pyro_hds vs torchdiffeq vs torchode, at equal accuracy.

Problem: Lotka-Volterra (``pyro_hds.models.lotka_volterra``), one parameter set per system
(rates uniform in [0.5, 1.5]), 41 observation times on [0, 10], float32. For the
heterogeneous case every system's rates are multiplied by its own factor, log-uniform in
[0.1, 10], so time scales differ 100-fold across the batch.

Equal accuracy: a float64 reference is computed with pyro_hds Dopri5 at rtol 1e-10; for every
solver the cheapest setting of a ladder (substeps for fixed-step, rtol for adaptive, atol =
rtol / 100) whose worst system's error, ``max |y - y_ref| / max |y_ref|`` over times and
states, is below ``--target`` is chosen, then timed (median of ``--repeats`` after a warm-up)
for the forward solve and for forward + backward (gradient of the sum of the solution with
respect to the rates). ``ratio`` is the peer's time over ours for the same kind of solver.

Run: ``python benchmarks/solvers.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, set_threads, time_call

from pyro_hds.models.lotka_volterra import rhs as lv_rhs
from pyro_hds.ode import solve
from pyro_hds.solvers import RK4, Dopri5

FIXED_LADDER = (1, 2, 4, 8, 16, 32, 64)
MAX_STEPS = 50_000  # per solve (per system for pyro_hds); a setting that needs more fails
RTOL_LADDER = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)


def problem(n: int, heterogeneous: bool, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    rates = 0.5 + torch.rand(n, 4, generator=gen, dtype=torch.float64)
    if heterogeneous:
        u = torch.rand(n, 1, generator=gen, dtype=torch.float64)
        factor = torch.exp((u - 0.5) * math.log(100))  # log-uniform in [0.1, 10]
        rates = rates * factor
    y0 = torch.tensor([1.5, 1.0], dtype=torch.float64).expand(n, 2).clone()
    ts = torch.linspace(0.0, 10.0, 41, dtype=torch.float64)
    return rates.to(dtype), y0.to(dtype), ts.to(dtype)


def params_of(rates):
    return {"alpha": rates[:, 0], "beta": rates[:, 1], "gamma": rates[:, 2], "delta": rates[:, 3]}


# -- the solvers, each as run(rates, y0, ts, setting) -> (B, T, S) ----------------------------


def ours_rk4(rates, y0, ts, substeps):
    return solve(lv_rhs, y0, ts, params_of(rates), solver=RK4(substeps=substeps)).ys


def ours_dopri5(rates, y0, ts, rtol):
    sol = solve(
        lv_rhs,
        y0,
        ts,
        params_of(rates),
        solver=Dopri5(rtol=rtol, atol=rtol / 100, max_steps=100_000),
    )
    return sol.ys


def _tdq_func(rates):
    p = params_of(rates)

    def f(t, y):
        return lv_rhs(t, y, p)

    return f


def tdq_rk4(rates, y0, ts, substeps):
    from torchdiffeq import odeint

    step = float(ts[1] - ts[0]) / substeps
    ys = odeint(_tdq_func(rates), y0, ts, method="rk4", options={"step_size": step})
    return ys.transpose(0, 1)


def tdq_dopri5(rates, y0, ts, rtol):
    from torchdiffeq import odeint

    ys = odeint(
        _tdq_func(rates),
        y0,
        ts,
        method="dopri5",
        rtol=rtol,
        atol=rtol / 100,
        options={"max_num_steps": 1_000_000},
    )
    return ys.transpose(0, 1)


def torchode_dopri5(rates, y0, ts, rtol):
    import torchode as to

    p = params_of(rates)
    term = to.ODETerm(lambda t, y: lv_rhs(t, y, p))
    method = to.Dopri5(term=term)
    controller = to.IntegralController(atol=rtol / 100, rtol=rtol, term=term)
    # a step budget: without it torchode keeps stepping at an underflowed step size
    solver = to.AutoDiffAdjoint(method, controller, max_steps=MAX_STEPS)
    problem_ = to.InitialValueProblem(y0=y0, t_eval=ts.expand(y0.shape[0], -1))
    return solver.solve(problem_).ys


SOLVERS = {
    "fixed": [("pyro_hds RK4", ours_rk4), ("torchdiffeq rk4", tdq_rk4)],
    "adaptive": [
        ("pyro_hds Dopri5", ours_dopri5),
        ("torchdiffeq dopri5", tdq_dopri5),
        ("torchode dopri5", torchode_dopri5),
    ],
}


def worst_error(ys, ref):
    ys = ys.double()
    scale = ref.abs().amax(dim=(1, 2))
    err = (ys - ref).abs().amax(dim=(1, 2)) / scale
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
    return float(err.max())


def choose(run, ladder, rates, y0, ts, ref, target):
    err = math.inf
    for setting in ladder:
        try:
            with torch.no_grad():
                err = worst_error(run(rates, y0, ts, setting), ref)
        except (AssertionError, RuntimeError) as failure:  # e.g. torchdiffeq's dt underflow
            print(f"#   {run.__name__} at {setting:g} failed: {failure}", flush=True)
            continue
        if err < target:
            return setting, err
    return None, err


def bench(n, heterogeneous, target, repeats, fp32=True):
    rates, y0, ts = problem(n, heterogeneous)
    r64, y64, t64 = problem(n, heterogeneous, dtype=torch.float64)
    with torch.no_grad():
        ref = ours_dopri5(r64, y64, t64, 1e-10)
    rows = []
    for kind, entries in SOLVERS.items():
        ladder = FIXED_LADDER if kind == "fixed" else RTOL_LADDER
        base = None
        for label, run in entries:
            setting, err = choose(run, ladder, rates, y0, ts, ref, target)
            if setting is None:
                rows.append(
                    (n, label, "none in ladder", err, math.nan, math.nan, math.nan, math.nan)
                )
                continue

            def fwd(run=run, setting=setting):
                with torch.no_grad():
                    run(rates, y0, ts, setting)

            def fwd_bwd(run=run, setting=setting):
                r = rates.clone().requires_grad_(True)
                run(r, y0, ts, setting).sum().backward()

            t_f = time_call(fwd, repeats=repeats).median
            t_b = time_call(fwd_bwd, repeats=repeats).median
            if base is None:
                base = (t_f, t_b)
            rows.append((n, label, f"{setting:g}", err, t_f, t_b, t_f / base[0], t_b / base[1]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10_000, 100_000])
    parser.add_argument("--target", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="sizes 10 and 100, one repeat")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["homogeneous", "heterogeneous"],
        choices=["homogeneous", "heterogeneous"],
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [10, 100], 1
    set_threads(args.threads)
    print(f"# {environment()}")
    print(f"# worst-system error target {args.target:g}; ratio = time / pyro_hds time (same kind)")
    header = (
        f"{'case':<13}{'size':>8}  {'solver':<20}{'setting':>15}{'error':>10}"
        f"{'fwd s':>10}{'f+b s':>10}{'fwd x':>8}{'f+b x':>8}"
    )
    for heterogeneous in [c == "heterogeneous" for c in args.cases]:
        print()
        print(header)
        print("-" * len(header))
        for n in args.sizes:
            reps = max(1, args.repeats if n < 100_000 else 1)
            for row in bench(n, heterogeneous, args.target, reps):
                n_, label, setting, err, tf, tb, rf, rb = row
                case = "heterogeneous" if heterogeneous else "homogeneous"
                print(
                    f"{case:<13}{n_:>8}  {label:<20}{setting:>15}{err:>10.2e}{tf:>10.4f}"
                    f"{tb:>10.4f}{rf:>8.2f}{rb:>8.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
