r"""pyro_hds against NumPyro NUTS on the same hierarchical population-PK model.

The model is ``pyro_hds.models.pk_oral`` (one compartment, first-order oral absorption, two
doses of 100 at t = 0 and 12 into the gut, 14 samples per individual):

.. math::

    k_{a,\mathrm{pop}} &\sim \mathrm{LogNormal}(0, 0.5), \quad
    CL_\mathrm{pop} \sim \mathrm{LogNormal}(\log 3, 0.5), \quad
    V_\mathrm{pop} \sim \mathrm{LogNormal}(\log 20, 0.5), \\
    s_g &\sim \mathrm{HalfNormal}(1), \quad \omega \sim \mathrm{HalfNormal}(0.5), \quad
    \sigma \sim \mathrm{HalfNormal}(0.5), \\
    CL_g &\sim \mathrm{LogNormal}(\log CL_\mathrm{pop}, s_g) \quad (g = 1..G = 3), \\
    k_{a,i} &\sim \mathrm{LogNormal}(\log k_{a,\mathrm{pop}}, \omega), \quad
    CL_i \sim \mathrm{LogNormal}(\log CL_{g(i)}, \omega), \quad
    V_i \sim \mathrm{LogNormal}(\log V_\mathrm{pop}, \omega), \\
    y_{it} &\sim \mathcal N(C(t; k_{a,i}, CL_i, V_i), \sigma^2),

with the closed-form concentration :math:`C` of ``pk_oral`` (superposed Bateman functions).

Sides.

* NumPyro NUTS (an optional peer: ``pip install -e '.[peers]'``) runs on the closed form
  written in ``jax.numpy`` (:func:`closed_form`), the best case for NUTS: no ODE solver. With
  ``--nuts-ode`` it integrates the ODE instead, by the method pyro_hds uses (RK4, 4 substeps
  per observation interval, :func:`rk4_concentration`, compiled by XLA): the comparison a user
  of a model without a closed form faces.
  :func:`numpyro_model` is centred by default, site for site the parameterisation of
  ``pk_oral.model``; ``centered=False`` gives the non-centred form, :math:`\log CL_g = \log
  CL_\mathrm{pop} + s_g z_g`, :math:`\log k_{a,i} = \log k_{a,\mathrm{pop}} + \omega z_{k,i}`
  (likewise :math:`CL_i, V_i`) with standard normal :math:`z`, the same joint distribution of
  the model's sites. ``tests/test_bench_vs_nuts.py`` checks that the centred log-density
  equals pyro_hds's at the same values and that the non-centred one differs from it by exactly
  the log-Jacobian :math:`\sum_g \log(s_g CL_g) + \sum_i \log(\omega^3 k_{a,i} CL_i V_i)`.
  The benchmark uses the centred form because the individuals are well identified by their 14
  samples: non-centred NUTS at N = 100 ran into the tree-depth limit (about 1000 leapfrog
  steps per iteration against about 30 centred). One chain of ``--warmup`` adaptation steps
  and ``--draws`` kept draws, ``init_to_median``, a fixed PRNG key, float32, started from cold
  JIT caches (``jax.clear_caches()``): its time includes compilation, whose part (XLA lowering
  and compiling, as ``jax.monitoring`` reports it) is printed apart.
* pyro_hds fits ``pk_oral.model`` as it is, with its default ODE solver (RK4, 4 substeps per
  observation interval; its deviation from the closed form at the true parameters is
  printed, in units of :math:`\sigma`), the amortized guide and the IWAE bound with
  ``--particles`` K (DReG gradients for the encoder unless ``--no-dreg``), ``--steps`` Adam
  steps on minibatches of ``--batch-size`` individuals, lr 0.02 decaying exponentially to
  ``--final-lr-fraction`` times that; then ``FitResult.posterior``
  draws ``--draws`` posterior draws with ``--draw-particles`` importance particles per
  individual and draw; with ``--gibbs CHAINS WARMUP`` (and ``--gibbs-particles``,
  ``--gibbs-local-steps``, ``--gibbs-outer-steps``, ``--gibbs-laplace-steps``),
  ``FitResult.gibbs`` draws them
  instead (particle Gibbs with the guide as proposal: exact in the limit, so the guide's bias
  in the globals does not reach the draws). ``--average-last`` averages the fit's parameters
  over its last steps, ``--trace-every`` prints the guide's population errors during the fit.
  Its time is fit plus draws (both printed). The defaults (K = 64 with
  DReG, 2000 steps) came out of a few trials at N = 100: against K = 16 without DReG for 1500
  steps (the demo's setting) they cost about 1.8x the fit time and cut the largest population
  error (that of sigma) from about 9 to about 3 NUTS SDs.

Reported for each training size N (individuals spread evenly over the 3 groups):

* the wall time to a posterior of each side and their ratio (NUTS over pyro_hds);
* for every population parameter the error :math:`|\bar\theta_\mathrm{hds} -
  \bar\theta_\mathrm{NUTS}| / \mathrm{sd}_\mathrm{NUTS}` of the posterior means in NUTS
  posterior standard deviations, and its maximum (NUTS's own Monte Carlo error in these units
  is about :math:`1/\sqrt{\mathrm{ESS}}`; the smallest bulk ESS is printed);
* the time to a posterior for ``--new`` NEW individuals (fresh data from the same
  population). NUTS reruns on the training and new individuals together (the exact joint
  posterior that a NUTS user would compute), pyro_hds calls ``FitResult.predict`` on the new
  individuals alone with no retraining and the same number of draws, once with K = 1 (the
  encoder's answer alone) and once with ``--draw-particles`` importance particles. Beside each
  the error of the new individuals' parameters: median over them of
  :math:`|\Delta \mathrm{mean}| / \mathrm{sd}_\mathrm{NUTS}`.

Targets (from the issue): population means within 0.25 NUTS SD; at N = 1000 at least 10x
faster than NUTS; new individuals at least 1000x faster.

Threads: torch uses ``--threads`` threads and XLA's CPU backend is limited to the same count
(``XLA_FLAGS``, set before jax is imported); the CPU time over wall time of each timed part is
printed so that the thread use is visible.

Run ``python benchmarks/vs_nuts.py`` (sizes 12, 100, 1000), ``--quick`` for a smoke run of
seconds (N = 12, few steps and draws: its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cold_compile, environment, format_seconds, set_threads

import pyro_hds
from pyro_hds.data import Dataset
from pyro_hds.models import pk_oral

GLOBALS = ("ka_pop", "cl_pop", "v_pop", "omega", "sigma", "group_sd")
LOCALS = ("ka", "cl", "v")
NUM_GROUPS = 3
TARGET_SD = 0.25  # population means within this many NUTS posterior SDs
TARGET_SPEEDUP = 10.0  # at the largest N
TARGET_NEW_SPEEDUP = 1000.0
PEERS_HINT = "pip install -e '.[peers]'"


# -- data -------------------------------------------------------------------------------------


def make_data(n: int, seed: int) -> tuple[Dataset, dict[str, torch.Tensor]]:
    """``n`` individuals simulated from ``pk_oral`` with its true parameters, spread evenly
    over the 3 groups (sizes differ by at most one); a data set of its own (``total_size = n``).

    :returns: ``(data, truth)`` as :func:`pk_oral.simulate`, individual truths ``(n,)``.
    """
    per_group = -(-n // NUM_GROUPS)
    full, truth = pk_oral.simulate(num_groups=NUM_GROUPS, per_group=per_group, seed=seed)
    counts = [n // NUM_GROUPS + (1 if g < n % NUM_GROUPS else 0) for g in range(NUM_GROUPS)]
    idx = torch.tensor([g * per_group + j for g in range(NUM_GROUPS) for j in range(counts[g])])
    sub = full[idx]
    data = sub.replace(total_size=n, indices=torch.arange(n))
    truth = {k: (v[idx] if k in LOCALS else v) for k, v in truth.items()}
    return data, truth


def concat(a: Dataset, b: Dataset) -> Dataset:
    """The individuals of ``a`` followed by those of ``b`` (same grid, groups and doses)."""
    if a.group_names != b.group_names or not torch.equal(a.times, b.times):
        raise ValueError("concat(): the data sets need the same groups and time grid")
    assert a.doses is not None and b.doses is not None
    return Dataset.from_arrays(
        torch.cat([a.observations, b.observations]),
        a.times,
        groups=torch.cat([a.groups, b.groups]),
        group_names=list(a.group_names),
        individual_ids=[*a.individual_ids, *(f"new_{i}" for i in b.individual_ids)],
        channel_names=list(a.channel_names),
        doses=pyro_hds.Doses(
            times=torch.cat([a.doses.times, b.doses.times]),
            amounts=torch.cat([a.doses.amounts, b.doses.amounts]),
            targets=torch.cat([a.doses.targets, b.doses.targets]),
        ),
    )


def numpyro_inputs(data: Dataset, ode: bool = False) -> dict[str, Any]:
    """The arrays :func:`numpyro_model` takes, as numpy (float64; the model casts them).

    ``obs`` and ``mask`` ``(N, T)``, ``times`` ``(T,)`` or ``(N, T)``, ``groups`` ``(N,)``,
    ``dose_times`` and ``dose_amounts`` ``(N, M)``, ``num_groups``. With ``ode``, every dose
    must fall at t = 0 or on its individual's observation times (where
    :func:`rk4_concentration` applies doses).
    """
    if data.num_channels != 1 or data.num_inputs != 0 or data.doses is None:
        raise ValueError("numpyro_inputs(): expects pk_oral data (one channel, doses)")
    if bool((data.doses.targets != 0).any()):
        raise ValueError("numpyro_inputs(): the closed form needs every dose into the gut")
    if ode:
        times = data.times.expand(len(data), -1)  # (N, T)
        dose = data.doses.times  # (N, M)
        on_grid = (dose[:, None, :] == times[:, :, None]).any(1)
        placed = on_grid | (dose == 0) | (dose > times[:, -1:])
        if not bool(placed.all()):
            i = int((~placed).any(-1).nonzero()[0])
            raise ValueError(
                f"numpyro_inputs(ode=True): individual {data.individual_ids[i]} has a dose "
                "between observation times; the RK4 solve applies doses only at t = 0 and at "
                "observation times"
            )

    def np_(x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().double().numpy()

    mask = data.mask[..., 0].cpu().numpy()
    return {
        "obs": np.where(mask, np_(data.observations[..., 0]), 0.0),
        "mask": mask,
        "times": np_(data.times),
        "groups": data.groups.cpu().numpy().astype(np.int32),
        "dose_times": np_(data.doses.times),
        "dose_amounts": np_(data.doses.amounts),
        "num_groups": data.num_groups,
    }


# -- the NumPyro model ------------------------------------------------------------------------


def closed_form(times, ka, cl, v, dose_times, dose_amounts):
    r"""``pk_oral.concentration`` in ``jax.numpy``: ``(N, T)`` for ``ka, cl, v`` ``(N,)``,
    ``times`` ``(T,)`` or ``(N, T)`` and doses ``(N, M)``.

    :math:`C_{it} = \sum_m [t > t_m] \frac{D_m k_a}{V (k_a - k)} (e^{-k (t - t_m)} -
    e^{-k_a (t - t_m)})` with :math:`k = CL / V`. A dose after ``t`` enters with elapsed time 0
    before the exponentials (then is masked out), so no exponential overflows and no NaN
    reaches the gradient.
    """
    import jax.numpy as jnp

    t = jnp.broadcast_to(times, (ka.shape[0], times.shape[-1]))
    dt = t[:, :, None] - dose_times[:, None, :]  # (N, T, M)
    after = dt > 0
    dt = jnp.where(after, dt, 0.0)
    k = (cl / v)[:, None, None]
    kab = ka[:, None, None]
    coef = dose_amounts[:, None, :] * kab / (v[:, None, None] * (kab - k))
    term = coef * (jnp.exp(-k * dt) - jnp.exp(-kab * dt))
    return jnp.where(after, term, 0.0).sum(-1)


def rk4_concentration(times, ka, cl, v, dose_times, dose_amounts, t0=0.0, substeps: int = 4):
    r"""``pk_oral``'s ODE solved in ``jax.numpy`` the way pyro_hds's ``RK4(substeps)`` solves
    it: ``(N, T)`` concentrations :math:`A_c / V` for ``ka, cl, v`` ``(N,)``, ``times`` ``(T,)``
    or ``(N, T)`` and doses ``(N, M)``.

    From :math:`A(t_0) = 0` plus the doses at :math:`t_0`, each interval between consecutive
    observation times is covered by ``substeps`` classical Runge-Kutta steps of
    :math:`\dot A_g = -k_a A_g,\ \dot A_c = k_a A_g - (CL/V) A_c`; the state at an observation
    time is recorded before the doses given at that time are added (the left limit, as in
    pyro_hds and in :func:`closed_form`). Doses must fall on ``t0`` or on an observation time
    (:func:`numpyro_inputs` checks it). Loops are ``lax.scan``, so XLA compiles one interval.
    """
    import jax
    import jax.numpy as jnp

    n = ka.shape[0]
    t = jnp.broadcast_to(times, (n, times.shape[-1]))
    start = jnp.full((n, 1), t0, dtype=t.dtype)
    grid = jnp.concatenate([start, t], axis=1)  # (N, T + 1)
    k = cl / v

    def rhs(y):
        gut, central = y[:, 0], y[:, 1]
        return jnp.stack([-ka * gut, ka * gut - k * central], axis=-1)

    def dosed(y, at):  # add the doses given at time `at` (N,) to the gut
        amount = jnp.sum(jnp.where(dose_times == at[:, None], dose_amounts, 0.0), axis=-1)
        return y.at[:, 0].add(amount)

    def interval(y, ends):
        t_start, t_end = ends
        h = ((t_end - t_start) / substeps)[:, None]

        def step(y, _):
            k1 = rhs(y)
            k2 = rhs(y + 0.5 * h * k1)
            k3 = rhs(y + 0.5 * h * k2)
            k4 = rhs(y + h * k3)
            return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), None

        y, _ = jax.lax.scan(step, y, None, length=substeps)
        return dosed(y, t_end), y

    y0 = dosed(jnp.zeros((n, 2), dtype=t.dtype), grid[:, 0])
    _, states = jax.lax.scan(interval, y0, (grid[:, :-1].T, grid[:, 1:].T))  # (T, N, 2)
    return states[..., 1].T / v[:, None]


def numpyro_model(
    obs,
    mask,
    times,
    groups,
    dose_times,
    dose_amounts,
    num_groups: int,
    centered: bool = True,
    ode: bool = False,
) -> None:
    """``pk_oral.model`` in NumPyro with the closed form (see the module docstring), or with
    the RK4 solution of its ODE if ``ode``.

    Sites: the globals of ``pk_oral`` and ``cl_group`` ``(G,)``, ``ka``, ``cl``, ``v`` ``(N,)``
    (deterministic when non-centred, beside the standard normal ``*_z`` sites), and ``y``
    ``(N, T)`` observed where ``mask``.
    """
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    dtype = jnp.result_type(float)
    obs, times = jnp.asarray(obs, dtype), jnp.asarray(times, dtype)
    dose_times, dose_amounts = jnp.asarray(dose_times, dtype), jnp.asarray(dose_amounts, dtype)
    ka_pop = numpyro.sample("ka_pop", nd.LogNormal(0.0, 0.5))
    cl_pop = numpyro.sample("cl_pop", nd.LogNormal(math.log(3.0), 0.5))
    v_pop = numpyro.sample("v_pop", nd.LogNormal(math.log(20.0), 0.5))
    group_sd = numpyro.sample("group_sd", nd.HalfNormal(1.0))
    omega = numpyro.sample("omega", nd.HalfNormal(0.5))
    sigma = numpyro.sample("sigma", nd.HalfNormal(0.5))

    def lognormal(name: str, log_center, scale):
        if centered:
            return numpyro.sample(name, nd.LogNormal(log_center, scale))
        z = numpyro.sample(f"{name}_z", nd.Normal(0.0, 1.0))
        return numpyro.deterministic(name, jnp.exp(log_center + scale * z))

    with numpyro.plate("groups", num_groups):
        cl_group = lognormal("cl_group", jnp.log(cl_pop), group_sd)
    with numpyro.plate("individuals", obs.shape[0]):
        ka = lognormal("ka", jnp.log(ka_pop), omega)
        cl = lognormal("cl", jnp.log(cl_group)[groups], omega)
        v = lognormal("v", jnp.log(v_pop), omega)
        concentration = rk4_concentration if ode else closed_form
        conc = concentration(times, ka, cl, v, dose_times, dose_amounts)
        numpyro.sample("y", nd.Normal(conc, sigma).mask(mask).to_event(1), obs=obs)


# -- the two sides ----------------------------------------------------------------------------


@dataclass
class Run:
    """One timed inference: wall and CPU seconds and posterior draws ``{site: (D, ...)}``."""

    seconds: float
    cpu_seconds: float
    draws: dict[str, np.ndarray]
    extra: dict[str, Any] = field(default_factory=dict)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(fn(), wall seconds, process CPU seconds)``."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _mcmc(kwargs: dict[str, Any], warmup: int, draws: int, seed: int):
    import jax
    from numpyro.infer import MCMC, NUTS, init_to_median

    mcmc = MCMC(
        NUTS(numpyro_model, init_strategy=init_to_median()),
        num_warmup=warmup,
        num_samples=draws,
        num_chains=1,
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(seed), **kwargs, extra_fields=("num_steps",))
    samples = mcmc.get_samples()
    jax.block_until_ready(samples)
    return mcmc, samples


class _CompileClock:
    """Sums the XLA lowering and compile durations that ``jax.monitoring`` reports."""

    EVENTS = (
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, event: str, duration_secs: float, **_: str | int) -> None:
        if event in self.EVENTS:
            self.seconds += duration_secs

    def __enter__(self) -> _CompileClock:
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc: object) -> None:
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self)


def run_nuts(data: Dataset, warmup: int, draws: int, seed: int, ode: bool = False) -> Run:
    """NUTS on ``data`` (the centred model; closed form, or the RK4 solve if ``ode``), one
    chain, from cold JIT caches.

    Returns the draws of the sites of ``pk_oral`` and, in ``extra``, the seconds of the run
    spent lowering and compiling XLA programs (from ``jax.monitoring``), the smallest bulk ESS
    and largest split R-hat over the population parameters, and the mean leapfrog steps per
    iteration.
    """
    import jax
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

    kwargs = dict(numpyro_inputs(data, ode=ode), ode=ode)
    jax.clear_caches()  # as in a fresh process: the run compiles everything it needs
    with _CompileClock() as clock:
        (mcmc, samples), wall, cpu = timed(lambda: _mcmc(kwargs, warmup, draws, seed))
    out = {k: np.asarray(v, dtype=np.float64) for k, v in samples.items() if not k.endswith("_z")}
    pop = [out[k].reshape(1, len(out[k]), -1) for k in (*GLOBALS, "cl_group")]
    extra = {
        "compile_seconds": clock.seconds,
        "min_ess": float(min(np.min(effective_sample_size(x)) for x in pop)),
        "max_rhat": float(max(np.max(split_gelman_rubin(x)) for x in pop)),
        "mean_steps": float(np.mean(mcmc.get_extra_fields()["num_steps"])),
    }
    return Run(wall, cpu, out, extra)


def draws_of(posterior) -> dict[str, np.ndarray]:
    """``{site: (D, ...)}`` float64 numpy draws of the latent sites of ``pk_oral`` (from a
    ``Posterior`` or from the dict that ``FitResult.encode`` returns)."""
    names = (*GLOBALS, "cl_group", *LOCALS)
    samples = posterior if isinstance(posterior, dict) else posterior.samples
    return {k: samples[k].detach().double().cpu().numpy() for k in names}


def run_pyro_hds(
    data: Dataset,
    *,
    steps: int,
    batch_size: int,
    particles: int,
    dreg: bool,
    draws: int,
    draw_particles: int,
    seed: int,
    semi_amortized: bool = False,
    compile: bool = False,
    compile_draws: bool = False,
    average_last: float = 0.0,
    final_lr_fraction: float = 0.1,
    gibbs: tuple[int, int] | None = None,
    gibbs_particles: int | None = None,
    gibbs_local_steps: int = 1,
    gibbs_outer_steps: int = 1,
    gibbs_laplace_steps: int = 0,
    trace_every: int = 0,
    reference: dict[str, np.ndarray] | None = None,
) -> tuple[Run, Any]:
    """Fit ``pk_oral.model`` (IWAE with ``particles``, lr 0.02) and draw its posterior with
    ``draw_particles`` importance particles per individual; returns the run and FitResult.
    With ``gibbs = (chains, warmup)`` the draws come from :meth:`FitResult.gibbs` instead
    (particle Gibbs, ``gibbs_particles`` particles in its importance step, default
    ``draw_particles``, ``gibbs_local_steps`` random-walk steps and ``gibbs_laplace_steps``
    independence steps with the Laplace mixture on the locals and ``gibbs_outer_steps`` on
    the global and group sites per sweep).

    With ``trace_every`` and NUTS draws as ``reference``, every ``trace_every`` steps the
    guide's medians of the population parameters are printed as signed errors
    ``(median - mean_NUTS) / sd_NUTS``: how the fit approaches NUTS's answer. The time spent
    tracing is left out of the reported times (it is printed).

    ``compile_draws``: the fit integrates as ``compile`` says, the draws with
    ``RK4(substeps=4, compile=True)`` (the same model; a short fit gains less from compiling
    than its compiling costs, long chains of draws more)."""
    pyro.clear_param_store()
    model = functools.partial(pk_oral.model, solver=pyro_hds.RK4(substeps=4, compile=compile))
    guide = pyro_hds.AmortizedGuide(model, semi_amortized=semi_amortized)
    traced = [0.0]

    def trace(step: int, loss: float) -> None:
        if reference is None or not trace_every or (step + 1) % trace_every:
            return
        begin = time.perf_counter()
        with torch.no_grad():
            median = {k: v.detach().double().cpu().numpy() for k, v in guide.median(data).items()}
        errors = signed_errors(median, reference)
        if step + 1 == trace_every:
            print("  trace: step, loss, " + ", ".join(errors), flush=True)
        text = " ".join(f"{e:+7.2f}" for e in errors.values())
        print(f"  trace: {step + 1:6d} {loss:12.1f} {text}", flush=True)
        traced[0] += time.perf_counter() - begin

    def go():
        result = pyro_hds.fit(
            model,
            data,
            guide=guide,
            objective=pyro_hds.IWAE(num_particles=particles, dreg=dreg),
            num_steps=steps,
            batch_size=min(batch_size, len(data)),
            lr=0.02,
            final_lr_fraction=final_lr_fraction,
            average_last=average_last,
            seed=seed,
            progress=False,
            callback=trace if trace_every else None,
        )
        fitted = time.perf_counter()
        if compile_draws:
            result.model = functools.partial(
                pk_oral.model, solver=pyro_hds.RK4(substeps=4, compile=True)
            )
        if gibbs is None:
            posterior = result.posterior(num_samples=draws, num_particles=draw_particles, seed=seed)
        else:
            posterior = result.gibbs(
                num_samples=draws,
                num_chains=gibbs[0],
                warmup=gibbs[1],
                num_particles=draw_particles if gibbs_particles is None else gibbs_particles,
                local_steps=gibbs_local_steps,
                outer_steps=gibbs_outer_steps,
                laplace_steps=gibbs_laplace_steps,
                seed=seed,
                progress=False,
            )
            report_chains(posterior)
        return result, posterior, time.perf_counter() - fitted

    with cold_compile() if compile or compile_draws else contextlib.nullcontext():
        (result, posterior, draw_seconds), wall, cpu = timed(go)
    wall -= traced[0]
    if traced[0]:
        print(f"  (tracing took {traced[0]:.1f} s, left out of the times)", flush=True)
    extra = {"draw_seconds": draw_seconds, "fit_seconds": wall - draw_seconds}
    return Run(wall, cpu, draws_of(posterior), extra), result


def report_chains(posterior) -> None:
    """Print the acceptance rates of :meth:`FitResult.gibbs` and the smallest bulk ESS and
    largest split R-hat of its chains over the population parameters."""
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

    diag = posterior.diagnostics
    rates = ", ".join(f"{k} {v:.2f}" for k, v in diag["acceptance"].items())
    chains = posterior.num_chains
    pop = [
        posterior.samples[k]
        .double()
        .cpu()
        .numpy()
        .reshape(chains, -1, *posterior.samples[k].shape[1:])
        for k in (*GLOBALS, "cl_group")
    ]
    ess = min(float(np.min(effective_sample_size(x))) for x in pop)
    rhat = max(float(np.max(split_gelman_rubin(x))) for x in pop)
    walk = diag["local_acceptance"]
    moved = diag["local_move_rate"]
    laplace = diag["laplace_acceptance"]
    print(
        f"  gibbs: acceptance {rates}; locals: random walk "
        f"{'none' if walk is None else f'{walk:.2f}'}, Laplace independence steps "
        f"{'none' if laplace is None else f'{laplace:.2f}'}, importance step "
        f"{'none' if moved is None else f'moved {moved:.2f} per sweep'}; population "
        f"parameters: min bulk ESS {ess:.0f} of {posterior.samples['sigma'].shape[0]}, "
        f"max split R-hat {rhat:.3f} ({chains} chains)",
        flush=True,
    )


def run_predict(result, new_data: Dataset, draws: int, particles: int, seed: int) -> Run:
    """The amortized posterior of new individuals: with K = 1 the encoder's answer alone
    (``result.encode``: no ODE solve), else ``result.predict`` with K importance particles."""
    pyro.set_rng_seed(seed)
    if particles == 1:
        posterior, wall, cpu = timed(lambda: result.encode(new_data, num_samples=draws))
    else:
        posterior, wall, cpu = timed(
            lambda: result.predict(new_data, num_samples=draws, num_particles=particles)
        )
    return Run(wall, cpu, draws_of(posterior))


# -- comparison -------------------------------------------------------------------------------


def population_errors(hds: dict[str, np.ndarray], nuts: dict[str, np.ndarray]) -> dict:
    """``{label: |mean_hds - mean_NUTS| / sd_NUTS}`` for the globals and ``cl_group[g]``."""
    means = {k: hds[k].reshape(hds[k].shape[0], -1).mean(0) for k in (*GLOBALS, "cl_group")}
    return {label: abs(e) for label, e in signed_errors(means, nuts).items()}


def signed_errors(values: dict[str, np.ndarray], nuts: dict[str, np.ndarray]) -> dict:
    """``{label: (value - mean_NUTS) / sd_NUTS}`` for the globals and ``cl_group[g]``, from
    point values ``{site: array}`` (a scalar, or one entry per group for ``cl_group``)."""
    out = {}
    for name in (*GLOBALS, "cl_group"):
        a, b = np.reshape(values[name], -1), nuts[name].reshape(len(nuts[name]), -1)
        labels = [name] if a.shape[0] == 1 else [f"{name}[{g}]" for g in range(a.shape[0])]
        for j, label in enumerate(labels):
            out[label] = float((a[j] - b[:, j].mean()) / b[:, j].std())
    return out


def local_errors(hds: dict[str, np.ndarray], nuts: dict[str, np.ndarray], rows) -> dict:
    """Median over individuals of ``|mean_hds - mean_NUTS| / sd_NUTS`` per local site;
    ``rows`` picks the NUTS columns that are the individuals of ``hds``."""
    out = {}
    for name in LOCALS:
        b = nuts[name][:, rows]
        out[name] = float(np.median(np.abs(hds[name].mean(0) - b.mean(0)) / b.std(0)))
    return out


def solver_deviation(data: Dataset, truth: dict[str, torch.Tensor]) -> float:
    """max |C_RK4 - C_closed| / sigma at the true individual parameters of ``data``."""
    t = data.times
    ka, cl, v = (truth[k].to(data.observations.dtype) for k in LOCALS)
    exact = pk_oral.concentration(
        t, ka[:, None], cl[:, None], v[:, None], pk_oral.DOSE_TIMES, [pk_oral.DOSE_AMOUNT] * 2
    )
    ys = pyro_hds.solve(
        pk_oral.rhs,
        torch.zeros(2, dtype=ka.dtype),
        t,
        {"ka": ka, "cl": cl, "v": v},
        solver=pyro_hds.RK4(substeps=4),
        t0=0.0,
        doses=data.doses,
    ).ys
    return float((ys[..., 1] / v[:, None] - exact).abs().max() / truth["sigma"])


def mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3g}x" if b > 0 else "-"


# -- main -------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[12, 100, 1000])
    p.add_argument(
        "--new", type=int, default=1000, help="NEW individuals to predict (0: skip that part)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: N = 12, tiny settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch and XLA CPU threads")
    p.add_argument("--warmup", type=int, default=1000, help="NUTS warm-up steps")
    p.add_argument("--draws", type=int, default=1000, help="posterior draws (both sides)")
    p.add_argument("--steps", type=int, default=2000, help="pyro_hds optimisation steps")
    p.add_argument("--batch-size", type=int, default=34, help="pyro_hds individuals per step")
    p.add_argument("--particles", type=int, default=64, help="pyro_hds IWAE particles K")
    p.add_argument(
        "--no-dreg", dest="dreg", action="store_false", help="plain IWAE gradients, not DReG"
    )
    p.add_argument(
        "--draw-particles",
        type=int,
        default=16,
        help="importance particles per individual for the posterior draws and predictions",
    )
    p.add_argument(
        "--nuts-ode",
        action="store_true",
        help="NUTS integrates the ODE (RK4, 4 substeps, in jax) instead of the closed form",
    )
    p.add_argument(
        "--semi-amortized",
        action="store_true",
        help="AmortizedGuide(semi_amortized=True): a learned correction per individual",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="pyro_hds integrates with RK4(substeps=4, compile=True) (compiling is timed, "
        "from empty caches: _common.cold_compile)",
    )
    p.add_argument(
        "--compile-draws",
        action="store_true",
        help="the posterior draws (not the fit) integrate with RK4(substeps=4, compile=True), "
        "compiling timed from empty caches",
    )
    p.add_argument(
        "--final-lr-fraction",
        type=float,
        default=0.1,
        help="pyro_hds's learning rate decays exponentially from 0.02 to this share of it",
    )
    p.add_argument(
        "--gibbs",
        type=int,
        nargs=2,
        metavar=("CHAINS", "WARMUP"),
        help="draw pyro_hds's posterior by FitResult.gibbs (particle Gibbs) with this many "
        "chains and warm-up sweeps, instead of importance resampling",
    )
    p.add_argument(
        "--gibbs-particles",
        type=int,
        default=None,
        help="K of FitResult.gibbs's importance step (default: --draw-particles; 1: none)",
    )
    p.add_argument(
        "--gibbs-local-steps",
        type=int,
        default=1,
        help="random-walk steps on the locals per sweep of FitResult.gibbs",
    )
    p.add_argument(
        "--gibbs-outer-steps",
        type=int,
        default=1,
        help="Metropolis steps on the global and group sites per sweep of FitResult.gibbs",
    )
    p.add_argument(
        "--gibbs-laplace-steps",
        type=int,
        default=0,
        help="independence Metropolis steps on the locals per sweep of FitResult.gibbs with "
        "the Laplace mixture (default 0, unlike FitResult.gibbs: the runs recorded before it)",
    )
    p.add_argument(
        "--average-last",
        type=float,
        default=0.0,
        help="fit(average_last=...): average the parameters over this share of the last steps",
    )
    p.add_argument(
        "--trace-every",
        type=int,
        default=0,
        help="print the guide's population errors against NUTS every this many steps",
    )
    args = p.parse_args(argv)
    if not 0.0 < args.final_lr_fraction <= 1.0:
        p.error("--final-lr-fraction must be in (0, 1]")
    if not 0.0 <= args.average_last <= 1.0:
        p.error("--average-last must be in [0, 1]")
    if args.gibbs is not None and (args.gibbs[0] < 1 or args.gibbs[1] < 0):
        p.error("--gibbs needs CHAINS >= 1 and WARMUP >= 0")
    if args.gibbs_particles is not None and args.gibbs_particles < 1:
        p.error("--gibbs-particles must be >= 1")
    if args.gibbs_local_steps < 0:
        p.error("--gibbs-local-steps must be >= 0")
    if args.gibbs_outer_steps < 1:
        p.error("--gibbs-outer-steps must be >= 1")
    if args.gibbs_laplace_steps < 0:
        p.error("--gibbs-laplace-steps must be >= 0")
    if args.trace_every < 0:
        p.error("--trace-every must be >= 0")
    if args.quick:
        args.sizes, args.new = [12], min(args.new, 24)
        args.warmup, args.draws, args.steps = 20, 20, 20
        args.particles, args.draw_particles = 4, 4
    if args.new < 0:
        p.error("--new must be >= 0")
    for name in ("warmup", "draws", "steps", "batch_size", "particles", "draw_particles"):
        if getattr(args, name) < 1 or (name in ("warmup", "draws") and getattr(args, name) < 4):
            p.error(f"--{name.replace('_', '-')} is too small")
    if min(args.sizes) < NUM_GROUPS:
        p.error(f"--sizes: need at least {NUM_GROUPS} individuals (one per group)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # limit XLA's CPU thread pools before jax is imported (the flags are read once)
    eigen = "true" if args.threads > 1 else "false"
    flags = f"--xla_cpu_multi_thread_eigen={eigen} intra_op_parallelism_threads={args.threads}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    if importlib.util.find_spec("numpyro") is None or importlib.util.find_spec("jax") is None:
        print(
            "benchmarks/vs_nuts.py compares with NumPyro NUTS, an optional peer that is not "
            f"installed: {PEERS_HINT}",
            file=sys.stderr,
        )
        return 2
    import jax
    import numpyro

    set_threads(args.threads)
    torch.set_default_dtype(torch.float32)  # the library's default; NUTS runs in float32 too
    jax.numpy.zeros(1).block_until_ready()  # start the backend outside the timed parts
    print(environment())
    print(
        f"jax {jax.__version__} ({jax.default_backend()}), numpyro {numpyro.__version__}, "
        f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}"
    )
    print(
        f"NUTS: 1 chain, {args.warmup} warm-up + {args.draws} draws, centred model "
        f"({'RK4(substeps=4) ODE solve in jax' if args.nuts_ode else 'closed form'}), "
        f"float32, seed {args.seed}."
    )
    averaging = (
        f", parameters averaged over the last {args.average_last:g} of the steps"
        if args.average_last
        else ""
    )
    gibbs_k = args.draw_particles if args.gibbs_particles is None else args.gibbs_particles
    print(
        f"pyro_hds: {args.steps} steps, batch {args.batch_size}, IWAE K = {args.particles}"
        f"{' (DReG)' if args.dreg else ''}"
        f"{', semi-amortized guide' if args.semi_amortized else ''}"
        f", lr 0.02 -> {0.02 * args.final_lr_fraction:g}"
        f", RK4(substeps=4{', compile=True' if args.compile else ''}), float32"
        f"{' (the draws compiled)' if args.compile_draws and not args.compile else ''}"
        f"{averaging}; {args.draws} draws "
        + (
            f"by particle Gibbs ({args.gibbs[0]} chains, {args.gibbs[1]} warm-up sweeps, "
            f"K = {gibbs_k} in the importance step, {args.gibbs_local_steps} random-walk "
            f"and {args.gibbs_laplace_steps} Laplace independence steps on the locals and "
            f"{args.gibbs_outer_steps} on the global and group sites "
            "per sweep)."
            if args.gibbs
            else f"with {args.draw_particles} importance particles per individual."
        )
    )
    new_data, new_truth = make_data(max(args.new, NUM_GROUPS), args.seed + 1000)
    print(
        "RK4(substeps=4) against the closed form at the true parameters of the new "
        f"individuals: max deviation {solver_deviation(new_data, new_truth):.3g} sigma"
    )

    rows = []
    for n in args.sizes:
        data, _ = make_data(n, args.seed)
        print(f"\nN = {n}: NUTS ...", flush=True)
        nuts = run_nuts(data, args.warmup, args.draws, args.seed, ode=args.nuts_ode)
        nuts_new = None
        if args.new:
            both = concat(data, new_data)
            print(f"N = {n}: NUTS on {len(both)} (training + new) ...", flush=True)
            nuts_new = run_nuts(both, args.warmup, args.draws, args.seed, ode=args.nuts_ode)
        print(f"N = {n}: pyro_hds ...", flush=True)
        hds, result = run_pyro_hds(
            data,
            steps=args.steps,
            batch_size=args.batch_size,
            particles=args.particles,
            dreg=args.dreg,
            draws=args.draws,
            draw_particles=args.draw_particles,
            seed=args.seed,
            semi_amortized=args.semi_amortized,
            compile=args.compile,
            compile_draws=args.compile_draws,
            average_last=args.average_last,
            final_lr_fraction=args.final_lr_fraction,
            gibbs=None if args.gibbs is None else tuple(args.gibbs),
            gibbs_particles=args.gibbs_particles,
            gibbs_local_steps=args.gibbs_local_steps,
            gibbs_outer_steps=args.gibbs_outer_steps,
            gibbs_laplace_steps=args.gibbs_laplace_steps,
            trace_every=args.trace_every,
            reference=nuts.draws,
        )
        predicted = {
            k: run_predict(result, new_data, args.draws, k, args.seed)
            for k in dict.fromkeys((1, args.draw_particles))
            if nuts_new is not None
        }
        rows.append(
            {
                "n": n,
                "nuts": nuts,
                "nuts_new": nuts_new,
                "hds": hds,
                "predicted": predicted,
                "errors": population_errors(hds.draws, nuts.draws),
                "new_errors": {
                    k: local_errors(p.draws, nuts_new.draws, slice(n, None))
                    for k, p in predicted.items()
                    if nuts_new is not None
                },
            }
        )
    report(rows, args)
    return 0


def _table(head: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def report(rows: list[dict], args: argparse.Namespace) -> None:
    """Print the markdown tables and the verdicts on the targets."""
    labels = list(rows[0]["errors"])
    print("\n### Time to a posterior and population-parameter error\n")
    head = ["N", "NUTS", "(compile)", "pyro_hds", "(fit + draws)", "NUTS / pyro_hds"]
    head += [*labels, "max", "NUTS min ESS", "NUTS max R-hat"]
    body = []
    for r in rows:
        nuts, hds, err = r["nuts"], r["hds"], r["errors"]
        cells = [
            str(r["n"]),
            format_seconds(nuts.seconds),
            format_seconds(nuts.extra["compile_seconds"]),
            format_seconds(hds.seconds),
            f"{format_seconds(hds.extra['fit_seconds'])} + "
            f"{format_seconds(hds.extra['draw_seconds'])}",
            ratio(nuts.seconds, hds.seconds),
        ]
        cells += [f"{err[lab]:.3f}" for lab in labels] + [f"{max(err.values()):.3f}"]
        cells += [f"{nuts.extra['min_ess']:.0f}", f"{nuts.extra['max_rhat']:.3f}"]
        body.append(cells)
    _table(head, body)
    print(
        "\nparameter columns: |mean_pyro_hds - mean_NUTS| / sd_NUTS of the posterior means; "
        "NUTS's own Monte Carlo error is about 1 / sqrt(ESS) in these units"
    )

    if args.new:
        _report_new(rows, args)

    print("\nNUTS mean leapfrog steps per iteration, and CPU seconds / wall seconds:")
    for r in rows:
        parts = {"nuts": r["nuts"], "pyro_hds": r["hds"]}
        if r["nuts_new"] is not None:
            parts["nuts_new"] = r["nuts_new"]
        parts.update({f"predict K={k}": p for k, p in r["predicted"].items()})
        text = ", ".join(f"{k} {v.cpu_seconds / v.seconds:.2f}" for k, v in parts.items())
        steps = f"{r['nuts'].extra['mean_steps']:.0f}"
        if r["nuts_new"] is not None:
            steps += f" / {r['nuts_new'].extra['mean_steps']:.0f}"
        print(f"  N = {r['n']}: steps {steps}; CPU/wall {text}")
    _report_targets(rows, args)


def _report_new(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\n### Time to a posterior for {args.new} NEW individuals\n")
    ks = list(rows[0]["predicted"])
    head = ["N", "NUTS on N + new"]
    for k in ks:
        head += [f"predict K={k}", "NUTS / predict", *(f"{s} error" for s in LOCALS)]
    body = []
    for r in rows:
        cells = [str(r["n"]), format_seconds(r["nuts_new"].seconds)]
        for k in ks:
            p = r["predicted"][k]
            cells += [format_seconds(p.seconds), ratio(r["nuts_new"].seconds, p.seconds)]
            cells += [f"{r['new_errors'][k][s]:.3f}" for s in LOCALS]
        body.append(cells)
    _table(head, body)
    print(
        "\nNUTS reruns on the training and new individuals together; pyro_hds predicts the new "
        "ones without retraining (K importance particles per individual and draw; K=1 is the "
        "encoder alone). Errors: median over the new individuals of |mean_pyro_hds - "
        "mean_NUTS| / sd_NUTS."
    )


def _report_targets(rows: list[dict], args: argparse.Namespace) -> None:
    print("\n### Targets\n")
    for r in rows:
        worst = max(r["errors"].values())
        print(
            f"- N = {r['n']}: population means within {TARGET_SD} NUTS SD: "
            f"{mark(worst <= TARGET_SD)} (max {worst:.3f})"
        )
    largest = max(rows, key=lambda r: r["n"])
    speed = largest["nuts"].seconds / largest["hds"].seconds
    print(
        f"- N = {largest['n']}: at least {TARGET_SPEEDUP:g}x faster than NUTS: "
        f"{mark(speed >= TARGET_SPEEDUP)} ({speed:.3g}x)"
    )
    for r in rows:
        for k, p in r["predicted"].items():
            speed = r["nuts_new"].seconds / p.seconds
            print(
                f"- N = {r['n']}: {args.new} new individuals at least {TARGET_NEW_SPEEDUP:g}x "
                f"faster (K={k}): {mark(speed >= TARGET_NEW_SPEEDUP)} ({speed:.3g}x)"
            )
    if args.quick:
        print("\n(--quick: a smoke run; its numbers say nothing about the targets)")


if __name__ == "__main__":
    sys.exit(main())
