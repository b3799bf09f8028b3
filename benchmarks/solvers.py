r"""Batched ODE solvers side by side at equal accuracy: pyro_hds against torchdiffeq and torchode.

Problems (one parameter set per system, 41 observation times):

* ``homogeneous`` (float32, the library's default dtype): Lotka-Volterra
  (``pyro_hds.models.lotka_volterra``) with rates ``alpha, beta, gamma, delta`` uniform in
  [0.5, 1.5], ``y0 = (1.5, 1)``, times on [0, 10].
* ``heterogeneous`` (float64): the same systems with all four rates multiplied by a per-system
  factor ``c``, log-uniform in [1, 100], over the shorter horizon [0, 1]. Scaling all rates by
  ``c`` scales time: the system runs through ``c`` times more of its orbit, so time scales
  differ 100-fold across the batch (``c = 1``: a sixth of a period; ``c = 100``: about 16
  periods). It runs in float64 because over 16 periods float32 round-off alone approaches
  the 1e-4 error target (torchdiffeq's dopri5 found no accurate rtol down to 1e-7 in float32).

Equal accuracy. A float64 reference is solved with pyro_hds Dopri5 at rtol 1e-10, atol 1e-12
and cross-checked on 32 systems (spread over the range of time scales) against torchdiffeq's
8th-order ``dopri8`` at rtol 1e-12. The error of a system is

.. math::

    e_b = \max_{t, s} |y_{bts} - y^{\mathrm{ref}}_{bts}| \,/\, \max_{t, s} |y^{\mathrm{ref}}_{bts}|,

and a solve is accurate when its WORST system's error ``max_b e_b`` is below ``--target``
(a system whose solver reports a failure counts as infinitely wrong). For every solver the
cheapest setting of a ladder that is accurate is chosen: substeps per observation interval for
fixed-step methods, rtol (atol = rtol / 100) for adaptive ones. The search walks the ladder
from the setting chosen at the previous (smaller, nested) batch size, looser while accurate and
tighter while not, so it assumes the error is monotone in the setting. A solver with no
accurate setting at one size is not tried at the larger ones (its worst error only grows with
the batch).

Known traps this exposes. torchdiffeq's adaptive solvers control one RMS error norm for the
whole batch, so a system's error can exceed the tolerance by up to sqrt(batch size) and the
rtol they need for a given worst-system error shrinks as the batch grows. torchode controls
each system's step, but it stops the whole batch when any system's norm becomes non-finite
(not triggered here: every system stays finite).

Compiled rows. ``pyro_hds Dopri5 compiled`` is ``Dopri5(compile=True)``: each step fused into
one kernel by ``torch.compile``. ``torchdiffeq dopri5 comp.rhs`` is the same peer with its rhs
compiled by ``torch.compile`` (what a torchdiffeq user can do without changing the library).
Their first calls compile; the script times them (``first calls (compiling)`` lines, with an
empty inductor cache in a temporary directory) and then times as for every solver. Their
``evals/sys`` come from the same solver without compilation (an evaluation counter cannot
count inside a compiled kernel). Ratios are against the eager pyro_hds solvers.

Timing: one warm-up call, then the median of ``--repeats`` calls (a third of them, at least
one, at 1e5 systems and more), with ``torch.set_num_threads(--threads)``. ``fwd`` solves under
``torch.no_grad()``; ``fwd+bwd`` solves with gradients on and back-propagates the sum of the
solution to the rates (backpropagation through the solver's operations for every library).
``ratio`` is the solver's time over pyro_hds's time for the same kind of method (fixed-step or
adaptive): above 1, pyro_hds is faster. ``evals/sys`` counts right-hand-side evaluations per
system in the forward solve (a batched call on ``w`` systems counts ``w``).

Run ``python benchmarks/solvers.py`` (about 17 minutes on 2 cores, 2 of them compiling),
``--quick`` for a smoke run of about a minute and a half (most of it compiling),
``--profile 10000`` to profile pyro_hds Dopri5 on 1e4 systems instead.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import math
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timing, environment, format_seconds, set_threads, time_call

from pyro_hds.models.lotka_volterra import rhs as lv_rhs
from pyro_hds.ode import solve
from pyro_hds.solvers import RK4, Dopri5

FIXED_LADDER: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
RTOL_LADDER: tuple[float, ...] = (
    *(1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7, 3e-8, 1e-8, 3e-9, 1e-9),
)
DTYPES = {"homogeneous": torch.float32, "heterogeneous": torch.float64}
ATOL_PER_RTOL = 1e-2
MAX_STEPS = 100_000  # adaptive step budget (per system for pyro_hds and torchode)
NUM_TIMES = 41
REF_RTOL, REF_ATOL = 1e-10, 1e-12
CHECK_SYSTEMS = 32  # systems re-solved by an independent solver to check the reference


# -- problems ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A batch of ``n`` systems: ``rhs(t, y, params)``, ``y0 (n, S)``, ``times (T,)`` and the
    rates ``theta (n, 4)`` from which :meth:`params` builds the parameter dict (gradients are
    taken with respect to ``theta``). ``scale (n,)`` is each system's time-scale factor."""

    case: str
    rhs: Callable[..., torch.Tensor]
    y0: torch.Tensor
    times: torch.Tensor
    theta: torch.Tensor
    scale: torch.Tensor

    @property
    def size(self) -> int:
        return self.y0.shape[0]

    @staticmethod
    def params(theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "alpha": theta[:, 0],
            "beta": theta[:, 1],
            "gamma": theta[:, 2],
            "delta": theta[:, 3],
        }

    def to(self, dtype: torch.dtype) -> Problem:
        return replace(
            self, y0=self.y0.to(dtype), times=self.times.to(dtype), theta=self.theta.to(dtype)
        )


def draws(n: int, seed: int = 0) -> torch.Tensor:
    """``(n, 5)`` uniform draws in float64; batches of different sizes share their prefix, so a
    smaller batch is a subset of a larger one."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 5, generator=gen, dtype=torch.float64)


def lotka_volterra(case: str, u: torch.Tensor, dtype: torch.dtype) -> Problem:
    """The ``homogeneous`` or ``heterogeneous`` Lotka-Volterra batch from draws ``u (n, 5)``."""
    n = u.shape[0]
    theta = 0.5 + u[:, :4]
    if case == "homogeneous":
        scale = torch.ones(n, dtype=torch.float64)
        horizon = 10.0
    elif case == "heterogeneous":
        scale = torch.exp(u[:, 4] * math.log(100.0))  # log-uniform in [1, 100]
        horizon = 1.0
    else:
        raise ValueError(f"unknown case {case!r}; use 'homogeneous' or 'heterogeneous'")
    theta = theta * scale[:, None]
    y0 = torch.tensor([1.5, 1.0], dtype=torch.float64).expand(n, 2).clone()
    times = torch.linspace(0.0, horizon, NUM_TIMES, dtype=torch.float64)
    return Problem(case, lv_rhs, y0, times, theta, scale).to(dtype)


# -- the solvers ------------------------------------------------------------------------------


class Counter:
    """Wraps an rhs and counts evaluations, weighted by the number of systems in each call."""

    def __init__(self, rhs: Callable[..., torch.Tensor]):
        self.rhs = rhs
        self.evals = 0

    def __call__(self, t, y, params):
        self.evals += y.shape[0]
        return self.rhs(t, y, params)


Run = Callable[[Problem, torch.Tensor, float, Callable[..., torch.Tensor]], tuple]
"""``run(problem, theta, setting, rhs) -> (ys (n, T, S), ok (n,) bool)``."""


def ours_rk4(pb: Problem, theta, substeps, rhs):
    sol = solve(rhs, pb.y0, pb.times, pb.params(theta), solver=RK4(substeps=int(substeps)))
    return sol.ys, sol.ok


def ours_dopri5(pb: Problem, theta, rtol, rhs, atol=None, compile=False):
    solver = Dopri5(rtol=rtol, atol=rtol * ATOL_PER_RTOL if atol is None else atol)
    solver = replace(solver, max_steps=MAX_STEPS, compile=compile)
    sol = solve(rhs, pb.y0, pb.times, pb.params(theta), solver=solver)
    return sol.ys, sol.ok


def ours_dopri5_compiled(pb: Problem, theta, rtol, rhs):
    # the fused step calls the rhs inside the compiled kernel, where the evaluation counter's
    # Python side effect would not count: trial() counts with the eager solver instead
    return ours_dopri5(pb, theta, rtol, getattr(rhs, "rhs", rhs), compile=True)


def _tdq(pb: Problem, theta, rhs):
    p = pb.params(theta)
    return lambda t, y: rhs(t, y, p)


def tdq_rk4(pb: Problem, theta, substeps, rhs):
    from torchdiffeq import odeint

    # a grid that contains every observation time (evenly spaced times here), so torchdiffeq's
    # interpolation between grid points is exact at the outputs
    step = float(pb.times[1] - pb.times[0]) / substeps
    ys = odeint(_tdq(pb, theta, rhs), pb.y0, pb.times, method="rk4", options={"step_size": step})
    ys = ys.transpose(0, 1)
    return ys, torch.isfinite(ys).all(-1).all(-1)


_COMPILED_RHS: dict[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] = {}


def tdq_dopri5_compiled(pb: Problem, theta, rtol, rhs):
    """torchdiffeq's dopri5 with the rhs compiled by ``torch.compile`` (what a torchdiffeq user
    can do without changing the library): one kernel per evaluation instead of about 15
    operations."""
    rhs = getattr(rhs, "rhs", rhs)  # not the counter: its side effect would not count
    if rhs not in _COMPILED_RHS:
        _COMPILED_RHS[rhs] = torch.compile(rhs, dynamic=True)
    return tdq_dopri5(pb, theta, rtol, _COMPILED_RHS[rhs])


def tdq_dopri5(pb: Problem, theta, rtol, rhs):
    from torchdiffeq import odeint

    opts = {"max_num_steps": MAX_STEPS}
    ys = odeint(
        _tdq(pb, theta, rhs),
        pb.y0,
        pb.times,
        method="dopri5",
        rtol=rtol,
        atol=rtol * ATOL_PER_RTOL,
        options=opts,
    )
    ys = ys.transpose(0, 1)
    return ys, torch.isfinite(ys).all(-1).all(-1)


def torchode_dopri5(pb: Problem, theta, rtol, rhs):
    import torchode as to

    p = pb.params(theta)
    term = to.ODETerm(lambda t, y: rhs(t, y, p))
    controller = to.IntegralController(atol=rtol * ATOL_PER_RTOL, rtol=rtol, term=term)
    # no gradient through the step-size controller (as in pyro_hds); a step budget, without
    # which torchode keeps stepping at an underflowed step size
    solver = to.AutoDiffAdjoint(
        to.Dopri5(term=term),
        controller,
        max_steps=MAX_STEPS,
        backprop_through_step_size_control=False,
    )
    ivp = to.InitialValueProblem(y0=pb.y0, t_eval=pb.times.expand(pb.size, -1))
    sol = solver.solve(ivp)
    return sol.ys, sol.status == 0


@dataclass(frozen=True)
class Solver:
    label: str
    kind: str  # "fixed" or "adaptive"
    run: Run
    requires: str | None = None  # an optional peer's module
    compiled: bool = False  # torch.compile inside: evaluations are counted by ``counted_by``
    counted_by: Run | None = None

    @property
    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    @property
    def ours(self) -> bool:
        return self.label.startswith("pyro_hds")

    @property
    def ladder(self) -> tuple[float, ...]:
        return FIXED_LADDER if self.kind == "fixed" else RTOL_LADDER

    def describe(self, setting: float) -> str:
        if self.kind == "fixed":
            return f"substeps {setting:g}"
        return f"rtol {setting:g}"


SOLVERS = (
    Solver("pyro_hds RK4", "fixed", ours_rk4),
    Solver("torchdiffeq rk4", "fixed", tdq_rk4),
    Solver("pyro_hds Dopri5", "adaptive", ours_dopri5),
    Solver("pyro_hds Dopri5 compiled", "adaptive", ours_dopri5_compiled, None, True, ours_dopri5),
    Solver("torchdiffeq dopri5", "adaptive", tdq_dopri5),
    Solver("torchdiffeq dopri5 comp.rhs", "adaptive", tdq_dopri5_compiled, None, True, tdq_dopri5),
    Solver("torchode dopri5", "adaptive", torchode_dopri5, requires="torchode"),
)


# -- accuracy ---------------------------------------------------------------------------------


def reference(pb: Problem) -> tuple[torch.Tensor, float]:
    """The float64 reference ``(n, T, S)``, and its largest relative deviation from
    torchdiffeq's dopri8 (rtol 1e-12) on :data:`CHECK_SYSTEMS` systems spread over the
    time scales."""
    from torchdiffeq import odeint

    p64 = pb.to(torch.float64)
    with torch.no_grad():
        ys, ok = ours_dopri5(p64, p64.theta, REF_RTOL, p64.rhs, atol=REF_ATOL)
        if not bool(ok.all()):
            raise RuntimeError("the reference solve failed; loosen REF_RTOL")
        order = torch.argsort(p64.scale, stable=True)
        pick = order[torch.linspace(0, pb.size - 1, min(CHECK_SYSTEMS, pb.size)).long()]
        sub = replace(p64, y0=p64.y0[pick], theta=p64.theta[pick], scale=p64.scale[pick])
        params = sub.params(sub.theta)
        check = odeint(
            lambda t, y: sub.rhs(t, y, params),
            sub.y0,
            sub.times,
            method="dopri8",
            rtol=1e-12,
            atol=1e-14,
        ).transpose(0, 1)
    return ys, max(system_errors(check, ys[pick], torch.ones_like(pick, dtype=torch.bool)))


def system_errors(ys: torch.Tensor, ref: torch.Tensor, ok: torch.Tensor) -> list[float]:
    """Per-system ``max |y - ref| / max |ref|``, infinite where the solver failed."""
    err = (ys.double() - ref).abs().amax(dim=(1, 2)) / ref.abs().amax(dim=(1, 2))
    err = torch.where(ok & torch.isfinite(err), err, torch.full_like(err, math.inf))
    return err.tolist()


@dataclass
class Trial:
    setting: float
    error: float  # worst system's error (inf: failed)
    evals: float  # rhs evaluations per system
    note: str = ""


def trial(solver: Solver, pb: Problem, ref: torch.Tensor, setting: float) -> Trial:
    counter = Counter(pb.rhs)
    try:
        with torch.no_grad():
            ys, ok = solver.run(pb, pb.theta, setting, counter)
            if solver.counted_by is not None:  # the same steps, without torch.compile
                solver.counted_by(pb, pb.theta, setting, counter)
    except (AssertionError, RuntimeError) as failure:  # torchdiffeq: "underflow in dt"
        return Trial(setting, math.inf, math.nan, f"{type(failure).__name__}: {failure}")
    errors = system_errors(ys, ref, ok)
    note = "" if bool(ok.all()) else f"{int((~ok).sum())} system(s) reported failure"
    return Trial(setting, max(errors), counter.evals / pb.size, note)


def choose(
    solver: Solver, pb: Problem, ref: torch.Tensor, target: float, start: float | None
) -> tuple[Trial | None, list[Trial]]:
    """The loosest accurate setting of the solver's ladder, walking from ``start``."""
    ladder = solver.ladder
    i = 0 if start is None else ladder.index(start)
    tried: dict[int, Trial] = {}

    def at(j: int) -> Trial:
        if j not in tried:
            tried[j] = trial(solver, pb, ref, ladder[j])
        return tried[j]

    if at(i).error < target:
        while i > 0 and at(i - 1).error < target:
            i -= 1
        best: Trial | None = at(i)
    else:
        best = None
        for j in range(i + 1, len(ladder)):
            if at(j).error < target:
                best = at(j)
                break
    return best, [tried[j] for j in sorted(tried)]


# -- the benchmark ----------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    size: int
    solver: Solver
    chosen: Trial | None
    fwd: Timing | None = None
    fwd_bwd: Timing | None = None


def calls(solver: Solver, pb: Problem, setting: float) -> tuple[Callable[[], None], ...]:
    """The timed calls: a forward solve under ``no_grad`` and a forward+backward one."""

    def fwd() -> None:
        with torch.no_grad():
            solver.run(pb, pb.theta, setting, pb.rhs)

    def fwd_bwd() -> None:
        theta = pb.theta.detach().requires_grad_(True)
        ys, _ = solver.run(pb, theta, setting, pb.rhs)
        ys.sum().backward()

    return fwd, fwd_bwd


def time_solver(solver: Solver, pb: Problem, setting: float, repeats: int) -> tuple[Timing, Timing]:
    fwd, fwd_bwd = calls(solver, pb, setting)
    return time_call(fwd, repeats=repeats), time_call(fwd_bwd, repeats=repeats)


def first_calls(solver: Solver, pb: Problem, setting: float) -> str:
    """Time the first forward and forward+backward solves of a compiled solver, which compile
    (forward and backward kernels are compiled separately, per dtype)."""

    def once(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    fwd, fwd_bwd = calls(solver, pb, setting)
    f, b = once(fwd), once(fwd_bwd)
    return f"first calls (compiling) {f:.1f} s forward, then {b:.1f} s forward+backward"


COLUMNS = (
    ("case", 13, "<"),
    ("size", 7, ">"),
    ("solver", 27, "<"),
    ("setting", 14, "<"),
    ("worst error", 11, ">"),
    ("evals/sys", 9, ">"),
    ("fwd s", 9, ">"),
    ("fwd+bwd s", 9, ">"),
    ("fwd ratio", 9, ">"),
    ("f+b ratio", 9, ">"),
)


def table_line(cells: Sequence[str]) -> str:
    parts = [f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, COLUMNS)]
    return "| " + " | ".join(parts) + " |"


def table_header() -> str:
    rule = "|" + "|".join("-" * (w + 1) + (":" if a == ">" else "-") for _, w, a in COLUMNS) + "|"
    return table_line([name for name, _, _ in COLUMNS]) + "\n" + rule


def format_row(row: Row, base: Row | None) -> str:
    def ratio(t: Timing | None, b: Timing | None) -> str:
        return "-" if t is None or b is None else f"{t.median / b.median:.2f}"

    c = row.chosen
    cells = [
        row.case,
        str(row.size),
        row.solver.label,
        "none in ladder" if c is None else row.solver.describe(c.setting),
        "-" if c is None else f"{c.error:.2e}",
        "-" if c is None else f"{c.evals:.0f}",
        "-" if row.fwd is None else f"{row.fwd.median:.4f}",
        "-" if row.fwd_bwd is None else f"{row.fwd_bwd.median:.4f}",
        ratio(row.fwd, None if base is None else base.fwd),
        ratio(row.fwd_bwd, None if base is None else base.fwd_bwd),
    ]
    return table_line(cells)


def run_case(
    case: str, sizes: Sequence[int], target: float, repeats: int, solvers: Sequence[Solver]
) -> list[Row]:
    u_all = draws(max(sizes))
    start: dict[str, float | None] = {s.label: None for s in solvers}
    rows: list[Row] = []
    hopeless: set[str] = set()
    print(f"\n### {case} ({str(DTYPES[case]).replace('torch.', '')})\n", flush=True)
    header_printed = False
    for n in sorted(sizes):
        pb = lotka_volterra(case, u_all[:n], DTYPES[case])
        ref, ref_dev = reference(pb)
        print(f"# {case}, {n} systems: reference deviation from dopri8 {ref_dev:.1e}", flush=True)
        if ref_dev > target / 100:
            print(f"# WARNING: the reference is not accurate enough for target {target:g}")
        reps = repeats if n < 100_000 else max(1, repeats // 3)
        base: dict[str, Row] = {}
        for solver in solvers:
            if solver.compiled and n == min(sizes) and solver.label not in hopeless:
                print(f"#   {solver.label}: {first_calls(solver, pb, solver.ladder[6])}")
            if solver.label in hopeless:
                print(f"#   {solver.label}: skipped (no accurate setting at a smaller size)")
                rows.append(Row(case, n, solver, None))
                continue
            chosen, tried = choose(solver, pb, ref, target, start[solver.label])
            for t in tried:
                if t.note:
                    print(f"#   {solver.label} at {solver.describe(t.setting)}: {t.note}")
            row = Row(case, n, solver, chosen)
            if chosen is None:
                hopeless.add(solver.label)
            else:
                start[solver.label] = chosen.setting
                row.fwd, row.fwd_bwd = time_solver(solver, pb, chosen.setting, reps)
            if solver.ours:
                base.setdefault(solver.kind, row)  # ratios against the eager solver
            rows.append(row)
            if not header_printed:
                print(table_header())
                header_printed = True
            print(format_row(row, base.get(solver.kind)), flush=True)
    return rows


def summary(rows: Sequence[Row]) -> list[str]:
    """pyro_hds Dopri5 (eager and compiled) against torchdiffeq dopri5 (plain and with a
    compiled rhs) on the heterogeneous case (target: 3x faster than plain dopri5)."""
    out = []
    by_key = {(r.case, r.size, r.solver.label): r for r in rows}
    pairs = (
        ("torchdiffeq dopri5", "pyro_hds Dopri5"),
        ("torchdiffeq dopri5", "pyro_hds Dopri5 compiled"),
        ("torchdiffeq dopri5 comp.rhs", "pyro_hds Dopri5 compiled"),
    )
    sizes = sorted({(r.case, r.size) for r in rows}, key=lambda k: (k[0] != "homogeneous", k[1]))
    for case, size in sizes:
        timed = [r for r in rows if (r.case, r.size) == (case, size) and r.fwd is not None]
        parts = []
        for kind in ("fwd", "fwd_bwd"):
            mine = [r for r in timed if r.solver.ours]
            peers = [r for r in timed if not r.solver.ours]
            if not mine or not peers:
                continue
            best = min(mine, key=lambda r: getattr(r, kind).median)
            rival = min(peers, key=lambda r: getattr(r, kind).median)
            ratio = getattr(rival, kind).median / getattr(best, kind).median
            parts.append(
                f"{'forward' if kind == 'fwd' else 'forward+backward'} {ratio:.2f}x "
                f"({best.solver.label} vs {rival.solver.label})"
            )
        if parts:
            out.append(f"{case} {size}: fastest peer / fastest pyro_hds: " + "; ".join(parts))
    for r in rows:
        for peer, ours_label in pairs:
            if r.case != "heterogeneous" or r.solver.label != peer:
                continue
            ours = by_key.get((r.case, r.size, ours_label))
            if ours is None:
                continue
            if ours.fwd is None or r.fwd is None:
                out.append(
                    f"heterogeneous {r.size}: {peer} / {ours_label}: no ratio (no accurate setting)"
                )
                continue
            assert ours.fwd_bwd is not None and r.fwd_bwd is not None
            f = r.fwd.median / ours.fwd.median
            b = r.fwd_bwd.median / ours.fwd_bwd.median
            verdict = "met" if min(f, b) >= 3 else "MISSED"
            target = f" (target >= 3: {verdict})" if peer == "torchdiffeq dopri5" else ""
            out.append(
                f"heterogeneous {r.size}: {peer} / {ours_label} = {f:.2f} forward, "
                f"{b:.2f} forward+backward{target}"
            )
    return out


# -- profile ----------------------------------------------------------------------------------


def profile(n: int, rtol: float, top: int = 15) -> None:
    """Where pyro_hds Dopri5's forward solve on ``n`` homogeneous systems spends its time.

    1. Fixed cost per batched step: the wall time per batched rhs call on 16 systems (where
       the arithmetic is negligible) against that on ``n`` systems; the ratio estimates the
       share of per-operation overhead (Python, dispatcher, allocation) at size ``n``.
    2. torch.profiler: the aten operators by own CPU time.
    3. cProfile: the Python functions by own time (which includes the arithmetic operators
       they call, since ``a * b`` on tensors is not a separately profiled call).
    """
    import torch.profiler as tp

    def setup(m: int):
        pb = lotka_volterra("homogeneous", draws(m), torch.float32)
        counter = Counter(pb.rhs)

        def fwd() -> None:
            with torch.no_grad():
                ours_dopri5(pb, pb.theta, rtol, counter)

        return pb, counter, fwd

    per_call = {}
    for m in (16, n):
        _, counter, fwd = setup(m)
        timing = time_call(fwd, repeats=5)
        counter.evals = 0
        fwd()
        calls = counter.evals / m  # rhs evaluations per system = batched calls (no compaction)
        per_call[m] = timing.median / calls
        print(
            f"# {m} systems: forward {format_seconds(timing.median)}, {calls:.0f} batched rhs "
            f"calls, {format_seconds(per_call[m])} per call (6 calls per Dopri5 step)"
        )
    share = per_call[16] / per_call[n]
    print(f"# fixed per-operation cost is about {100 * share:.0f}% of the time at {n} systems")

    pb, _, fwd = setup(n)
    steps = solve(
        pb.rhs, pb.y0, pb.times, pb.params(pb.theta), solver=Dopri5(rtol=rtol, atol=rtol / 100)
    ).num_steps
    print(
        f"# pyro_hds Dopri5, rtol {rtol:g}: steps per system mean {steps.double().mean():.1f}, "
        f"max {int(steps.max())}"
    )
    fwd()
    with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fwd()
    print(f"\n# torch.profiler, 3 forward solves on {n} systems, by own CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))

    cprof = cProfile.Profile()
    cprof.enable()
    for _ in range(3):
        fwd()
    cprof.disable()
    buf = io.StringIO()
    pstats.Stats(cprof, stream=buf).sort_stats("tottime").print_stats(top)
    print(f"# cProfile, 3 forward solves on {n} systems, by own time")
    print(buf.getvalue())


# -- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100, 1000, 10_000, 100_000],
        help="batch sizes of the homogeneous case",
    )
    parser.add_argument(
        "--hetero-sizes",
        type=int,
        nargs="+",
        default=[100, 1000, 10_000],
        help="batch sizes of the heterogeneous case",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["homogeneous", "heterogeneous"],
        choices=["homogeneous", "heterogeneous"],
    )
    parser.add_argument("--target", type=float, default=1e-4, help="worst-system error target")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 systems, one repeat")
    parser.add_argument(
        "--profile",
        type=int,
        metavar="N",
        help="profile pyro_hds Dopri5 on N homogeneous systems instead of benchmarking",
    )
    parser.add_argument("--profile-rtol", type=float, default=1e-5)
    args = parser.parse_args(argv)
    if args.target <= 0:
        parser.error(f"--target must be positive, got {args.target}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if min(args.sizes + args.hetero_sizes) < 1:
        parser.error("batch sizes must be >= 1")
    if args.quick:
        args.sizes, args.hetero_sizes, args.repeats = [32], [32], 1
    set_threads(args.threads)
    # compile from scratch: an inductor cache left by an earlier run would hide compile times
    cache = tempfile.TemporaryDirectory(prefix="pyro_hds_bench_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    print(f"# {environment()}")
    if args.profile is not None:
        profile(args.profile, args.profile_rtol)
        return 0
    print(
        f"# worst-system error target {args.target:g}; ratio = time / pyro_hds time for the same "
        "kind of method (above 1: pyro_hds is faster)"
    )
    solvers = [s for s in SOLVERS if s.available]
    for s in SOLVERS:
        if not s.available:
            print(f"# {s.label}: not installed, left out (pip install -e '.[peers]')")
    rows: list[Row] = []
    for case in args.cases:
        sizes = args.sizes if case == "homogeneous" else args.hetero_sizes
        rows += run_case(case, sizes, args.target, args.repeats, solvers)
    print()
    for line in summary(rows):
        print(f"# {line}")
    missing = [f"{r.case} {r.size} {r.solver.label}" for r in rows if r.chosen is None]
    if missing:
        print(f"# no accurate setting in the ladder: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
