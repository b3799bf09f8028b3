r"""What a fit returns: posterior draws, predictions for new individuals, held-out bounds,
importance-sampling diagnostics, ArviZ export, and save/load.

Posterior draws use sampling-importance-resampling (SIR) with the per-individual weights of
the hierarchical bound: for each of ``num_samples`` draws :math:`(\theta_s, \phi_s) \sim
q(\theta, \phi)` of the globals and group latents, every individual's local latents are drawn
:math:`K` times from the amortized guide, :math:`z_{sik} \sim q(z_i \mid y_i)`, and one of them
is kept with probability :math:`\tilde w_{sik} = w_{sik} / \sum_{k'} w_{sik'}`,
:math:`w_{sik} = p(y_i, z_{sik} \mid \theta_s, \phi_s) / q(z_{sik} \mid y_i)`. As :math:`K`
grows the kept draw tends to the exact conditional posterior :math:`p(z_i \mid y_i, \theta_s,
\phi_s)`; the globals remain draws of :math:`q(\theta, \phi)`. Deterministic sites (ODE
trajectories) and observation sites (posterior predictive draws) are resampled with the same
index, so every returned draw is one consistent joint sample.

The quality of the guide for individual :math:`i` is reported by the Pareto :math:`\hat k` of
its importance weights (PSIS, Vehtari et al. 2024; :math:`\hat k > 0.7` means the guide is
unreliable there) and by the weights' effective sample size
:math:`(\sum_k w_k)^2 / \sum_k w_k^2`, which stays meaningful when :math:`\hat k` does not.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine

from pyro_hds.objectives import IWAE, LogWeights

__all__ = ["FitResult", "Posterior", "load"]

RESULT_FORMAT = 1


@dataclass
class Posterior:
    """Joint posterior draws for the individuals of one data set (draws first).

    :ivar samples: site name -> tensor. Globals ``(D, *event)``, group sites ``(D, G, *event)``,
        local and deterministic sites ``(D, N, *event)`` (ODE trajectories ``(D, N, T, S)``).
    :ivar predictive: observation site name -> posterior predictive draws ``(D, N, T, C)``.
    :ivar log_likelihood: observation site name -> ``(D, N)`` float64 log-likelihood of the
        observed data at each kept draw (for LOO over individuals).
    :ivar inner_bound: ``(D, N)`` float64 :math:`\\log \\frac1K \\sum_k w_{sik}` per draw.
    :ivar pareto_k: ``(N,)`` median over outer draws of the Pareto :math:`\\hat k` of the K
        weights (NaN for K < 25).
    :ivar ess: ``(N,)`` mean over draws of the weights' effective sample size (out of K).
    :ivar site_levels: site name -> "global", "group", "local" or "observed".
    :ivar event_coords: site name -> ``(dim, labels)``: names of the entries of the site's
        last event dim, from the model's ``infer={"event_coords": (dim, labels)}`` (the
        ArviZ export uses them as that dim's coordinate).
    :ivar num_chains: the draws are this many chains of equal length, one after another
        (Markov chains of :meth:`FitResult.gibbs`; 1 for independent resampled draws).
    :ivar diagnostics: what the sampler reports (:meth:`FitResult.gibbs`: acceptance rates,
        step sizes, how often the locals moved).
    """

    samples: dict[str, torch.Tensor]
    predictive: dict[str, torch.Tensor]
    log_likelihood: dict[str, torch.Tensor]
    inner_bound: torch.Tensor
    pareto_k: torch.Tensor
    ess: torch.Tensor
    site_levels: dict[str, str] = field(default_factory=dict)
    event_coords: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    num_particles: int = 1
    global_ess: float | None = None
    global_pareto_k: float | None = None
    num_chains: int = 1
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def select(self, index: torch.Tensor) -> Posterior:
        """The draws at ``index`` (along the draw dim) of every field."""

        def take(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {name: v[index.to(v.device)] for name, v in d.items()}

        return Posterior(
            samples=take(self.samples),
            predictive=take(self.predictive),
            log_likelihood=take(self.log_likelihood),
            inner_bound=self.inner_bound[index],
            pareto_k=self.pareto_k,
            ess=self.ess,
            site_levels=self.site_levels,
            event_coords=self.event_coords,
            num_particles=self.num_particles,
        )

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.samples:
            return self.samples[name]
        if name in self.predictive:
            return self.predictive[name]
        available = sorted(self.samples) + sorted(self.predictive)
        raise KeyError(f"no site {name!r}; available: {available}")

    def keys(self):
        return list(self.samples) + list(self.predictive)


def _level(site: dict) -> str:
    names = {f.name for f in site["cond_indep_stack"]}
    if "individuals" in names:
        return "local"
    if "groups" in names:
        return "group"
    return "global"


def _pareto_k(log_weights: torch.Tensor) -> torch.Tensor:
    r"""Pareto k-hat of importance weights along the last dim: the shape of a generalised
    Pareto distribution fitted to the largest weights (PSIS, Vehtari et al. 2024; above 0.7
    the importance estimate is unreliable); NaN when the tail has fewer than 5 draws
    (K < 25).

    The estimate is PSIS's, as ArviZ computes it row by row (``array_stats.psislw`` with
    ``r_eff = 1``), vectorized over rows: with the :math:`K` log weights of a row shifted to
    a maximum of 0 and sorted, the tail is the largest :math:`M = \lfloor K / 5 \rfloor`
    (:math:`\lfloor 3 \sqrt K \rfloor` when :math:`K > 225`) weights less the largest weight
    below them, :math:`x_1 \le \dots \le x_M`. The empirical-Bayes fit of Zhang and Stephens
    (2009) averages the profile estimates over the grid
    :math:`b_j = 1 / x_M + (1 - \sqrt{m / (j - 1/2)}) / (3 x_{\lfloor M/4 + 1/2 \rfloor})`,
    :math:`j = 1..m`, :math:`m = 30 + \lfloor \sqrt M \rfloor`, with weights proportional
    to :math:`\exp\{M (\log(-b_j / k_j) - k_j - 1)\}`,
    :math:`k_j = \frac1M \sum_i \log(1 - b_j x_i)`; then
    :math:`\hat k = \frac1M \sum_i \log(1 - \bar b x_i)`, shrunk towards 1/2 by a weak
    prior: :math:`(M \hat k + 5) / (M + 10)`. One call costs a few vectorized operations
    whatever the number of rows (ArviZ's loop took about 0.4 ms per row: 20 s for 500
    outer draws of 100 individuals).

    A set of weights whose tail cannot be fitted (fewer nonzero weights than the tail has
    draws, e.g. when most particles' ODE solutions failed, or a tail of equal values) gets
    k-hat = inf: the importance sampler is as unreliable as it gets."""
    lw = log_weights.detach().double().cpu().numpy()
    k = lw.shape[-1]
    m_tail = math.floor(3 * math.sqrt(k)) if k > 225 else k // 5
    if m_tail < 5:
        return torch.full(lw.shape[:-1], math.nan, dtype=torch.float64)
    flat = np.nan_to_num(lw.reshape(-1, k), nan=-1e300, neginf=-1e300)
    khat = np.full(flat.shape[0], math.inf)
    # a tail that reaches zero weights (failed particles) says nothing about the tail's shape
    fitted = np.flatnonzero((flat > -1e300).sum(-1) > m_tail)
    grid = 30 + int(math.sqrt(m_tail))
    base = 1.0 - np.sqrt(grid / (np.arange(1, grid + 1, dtype=np.float64) - 0.5))  # (m,)
    quarter = int(m_tail / 4 + 0.5) - 1
    eps = np.finfo(np.float64)
    for lo in range(0, fitted.size, 4096):  # (rows, m, M) temporaries of a few MB
        rows = fitted[lo : lo + 4096]
        part = flat[rows]
        part = np.sort(part - part.max(-1, keepdims=True), axis=-1)[:, -(m_tail + 1) :]
        tail = part[:, 1:]
        ok = (tail[:, -1] - tail[:, 0]) >= eps.tiny  # a tail of equal values cannot be fitted
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            x = np.exp(tail) - np.exp(part[:, :1])  # (R, M), ascending
            b = base / (3.0 * x[:, quarter : quarter + 1]) + 1.0 / x[:, -1:]  # (R, m)
            k_b = np.log1p(-b[:, :, None] * x[:, None, :]).mean(-1)  # (R, m)
            profile = m_tail * (np.log(-b / k_b) - k_b - 1.0)
            weights = np.exp(profile - profile.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            weights = np.where(weights >= 10 * eps.eps, weights, 0.0)  # as ArviZ drops them
            b_post = (b * weights).sum(-1) / weights.sum(-1)
            est = np.log1p(-b_post[:, None] * x).mean(-1)
        est = (m_tail * est + 10 * 0.5) / (m_tail + 10)
        khat[rows] = np.where(ok & np.isfinite(est), est, math.inf)
    return torch.as_tensor(khat.reshape(lw.shape[:-1]))


def _ess(log_weights: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / sum w^2 along the K dim (dim 1) of (S, K, N) log weights."""
    lw = log_weights.double()
    return torch.exp(2 * torch.logsumexp(lw, 1) - torch.logsumexp(2 * lw, 1))


def _choose(log_weights: torch.Tensor) -> torch.Tensor:
    """``(S, N)``: one particle per outer draw and individual, drawn with probability
    proportional to its weight among the ``K`` of ``log_weights`` ``(S, K, N)``."""
    s, k, n = log_weights.shape
    probs = torch.softmax(log_weights.double(), dim=1).permute(0, 2, 1).reshape(s * n, k)
    return torch.multinomial(probs, 1).reshape(s, n)


def _own_parameters(method):
    """Run a :class:`FitResult` method inside :meth:`FitResult.parameters`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.parameters():
            return method(self, *args, **kwargs)

    return wrapper


class FitResult:
    """The outcome of :func:`pyro_hds.fit`: model, trained guide, data and training history.

    Methods draw from the posterior of the training individuals
    (:meth:`posterior_samples`, :meth:`posterior`), of NEW individuals with no retraining
    (:meth:`predict`: the encoder maps their data to their local posterior), estimate held-out
    bounds (:meth:`evaluate`), and export to ArviZ (:meth:`to_arviz`).
    """

    def __init__(self, model, guide, data, objective=None, history=None) -> None:
        self.model = model
        self.guide = guide
        self.data = data
        self.objective = objective
        self.history = history or {"step": [], "loss": [], "val_step": [], "val_bound": []}
        # Pyro keeps parameters in one global store; a result remembers its own (the same
        # tensor objects) and puts them back while it works, so that a later fit() or
        # pyro.clear_param_store() cannot change what an earlier result computes
        self._store_state = pyro.get_param_store().get_state()

    @contextlib.contextmanager
    def parameters(self):
        """Context in which Pyro's parameter store holds exactly this result's parameters (the
        store's previous content is put back afterwards). Every method uses it; use it to run
        the model or guide by hand, e.g. with ``pyro.infer.Predictive``."""
        store = pyro.get_param_store()
        saved = store.get_state()
        store.clear()
        store.set_state(self._store_state)
        try:
            yield self
        finally:
            store.clear()
            store.set_state(saved)

    # -- draws --------------------------------------------------------------------------------

    def _num_particles(self, num_particles: int | None) -> int:
        if num_particles is not None:
            return int(num_particles)
        return int(getattr(self.objective, "num_particles", 10))

    @_own_parameters
    def posterior(
        self,
        data: Any = None,
        num_samples: int = 1000,
        num_particles: int | None = None,
        *,
        resample_globals: int | None = None,
        max_systems: int = 2_000_000,
        seed: int | None = None,
    ) -> Posterior:
        r"""Joint posterior draws for the individuals of ``data`` (default: the training data).

        :param num_samples: draws ``D`` (outer draws of the globals).
        :param num_particles: ``K`` guide draws per individual and outer draw among which one
            is kept by importance resampling; ``1`` gives the raw amortized guide. Defaults to
            the training objective's ``K``.
        :param resample_globals: if given, draw this many outer draws of the globals and
            resample ``num_samples`` of them by their joint importance weights
            :math:`W_s = \frac{N}{B}\sum_i \log \frac1K\sum_k w_{sik} + \log p(\theta_s,
            \phi_s) - \log q(\theta_s, \phi_s)`, correcting the globals' guide too. Useful
            with few individuals; with many the weights degenerate (check
            ``Posterior.global_ess``).
        :param max_systems: the largest ``S * K * N`` evaluated in one vectorized pass; larger
            requests are split into chunks of outer draws.
        """
        data = self.data if data is None else data
        k = self._num_particles(num_particles)
        if num_samples < 1 or k < 1:
            raise ValueError("posterior(): num_samples and num_particles must be >= 1")
        if seed is not None:
            pyro.set_rng_seed(seed)
        from pyro_hds.fit import _is_dataset

        n = len(data) if _is_dataset(data) else 1
        pool = num_samples if resample_globals is None else int(resample_globals)
        chunk = max(1, min(pool, max_systems // max(1, k * n)))
        parts: list[dict[str, Any]] = []
        done = 0
        while done < pool:
            s = min(chunk, pool - done)
            with torch.no_grad():
                weights = IWAE(num_particles=k, num_outer_particles=s).log_weights(
                    self.model, self.guide, data
                )
            parts.append(self._resample(weights))
            done += s
        posterior = self._merge(parts, k)
        posterior.event_coords = self._event_coords()
        if resample_globals is not None:
            log_w = torch.cat([p["joint"] for p in parts])
            probs = torch.softmax(log_w, 0)
            chosen = torch.multinomial(probs, num_samples, replacement=True)
            posterior = posterior.select(chosen)
            posterior.global_ess = float(1.0 / (probs**2).sum())
            posterior.global_pareto_k = float(_pareto_k(log_w[None]).reshape(()))
        return posterior

    def _event_coords(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """Site -> ``(dim, labels)`` from the model's ``infer={"event_coords": ...}``, read
        off the guide's trace of the model (``AmortizedGuide`` and Pyro's autoguides keep
        one): the traces of a pass replay the guide, and Pyro's replay gives each model site
        the guide site's ``infer``."""
        trace = getattr(self.guide, "prototype_trace", None)
        out: dict[str, tuple[str, tuple[str, ...]]] = {}
        if trace is None:
            return out
        for name, site in trace.nodes.items():
            named = site.get("infer", {}).get("event_coords") if site["type"] == "sample" else None
            if named is not None:
                dim, labels = named
                out[name] = (str(dim), tuple(str(x) for x in labels))
        return out

    @staticmethod
    def _resample(weights: LogWeights, chosen: torch.Tensor | None = None) -> dict[str, Any]:
        """One draw per outer particle: every individual keeps particle ``chosen`` ``(S, N)``
        (drawn by importance resampling when None)."""
        lw = weights.local  # (S, K, N)
        s, k, n = lw.shape
        if chosen is None:
            chosen = _choose(lw)  # (S, N)
        samples: dict[str, torch.Tensor] = {}
        predictive: dict[str, torch.Tensor] = {}
        loglik: dict[str, torch.Tensor] = {}
        levels: dict[str, str] = {}

        def pick(value: torch.Tensor, event_dim: int) -> torch.Tensor:
            # value: (S, K or 1, N or 1, *event) -> (S, N, *event)
            batch = value.shape[: value.dim() - event_dim]
            if len(batch) != 3:
                raise ValueError(
                    "posterior(): results support models whose plates are 'individuals' and "
                    f"'groups' at dim -1 only; found a site with batch shape {tuple(batch)}"
                )
            value = value.expand((s, k, n, *value.shape[3:]))
            index = chosen.reshape(s, 1, n, *([1] * event_dim)).expand((s, 1, n, *value.shape[3:]))
            return value.gather(1, index).squeeze(1)

        trace = weights.model_trace
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            level = _level(site)
            value = site["value"]
            event_dim = site["fn"].event_dim
            if site["is_observed"] and not site["infer"].get("_deterministic"):
                if level != "local":
                    continue
                levels[name] = "observed"
                draw = site["fn"].sample()
                predictive[name] = pick(draw, event_dim)
                lp = site["fn"].log_prob(site["value"])
                loglik[name] = pick(lp.double().expand(s, k, n), 0)
                continue
            levels[name] = "deterministic" if site["infer"].get("_deterministic") else level
            if level == "local":
                samples[name] = pick(value, event_dim)
            else:
                batch = value.shape[: value.dim() - event_dim]
                value = value.expand(s, *batch[1:], *value.shape[len(batch) :])
                event = value.shape[len(batch) :]
                if level == "group":
                    samples[name] = value.reshape(s, batch[-1], *event)
                else:
                    samples[name] = value.reshape(s, *event)
        return {
            "samples": samples,
            "predictive": predictive,
            "loglik": loglik,
            "inner": weights.inner.double(),
            # median over outer draws: single draws with degenerate weights give huge k-hats
            "pareto_k": _pareto_k(lw.permute(0, 2, 1)).nanmedian(0).values,
            "ess": _ess(lw).mean(0),
            "levels": levels,
            "weight": s,
            "joint": (weights.scale * weights.inner.sum(-1) + weights.global_terms).double(),
        }

    @staticmethod
    def _merge(parts: list[dict[str, Any]], k: int) -> Posterior:
        total = sum(p["weight"] for p in parts)

        def cat(key: str) -> dict[str, torch.Tensor]:
            return {name: torch.cat([p[key][name] for p in parts]) for name in parts[0][key]}

        def wmean(key: str) -> torch.Tensor:
            return sum(p[key] * p["weight"] for p in parts) / total

        return Posterior(
            samples=cat("samples"),
            predictive=cat("predictive"),
            log_likelihood=cat("loglik"),
            inner_bound=torch.cat([p["inner"] for p in parts]),
            pareto_k=wmean("pareto_k"),
            ess=wmean("ess"),
            site_levels=parts[0]["levels"],
            num_particles=k,
        )

    @_own_parameters
    def gibbs(
        self,
        data: Any = None,
        num_samples: int = 1000,
        *,
        num_chains: int = 4,
        warmup: int = 200,
        num_particles: int = 16,
        local_steps: int = 1,
        outer_steps: int = 1,
        laplace_steps: int = 1,
        seed: int | None = None,
        progress: bool = True,
    ) -> Posterior:
        r"""Draws from the exact joint posterior of ``data`` (default: the training data) by
        particle Gibbs with the trained guide as the proposal (:mod:`pyro_hds.gibbs`).

        Unlike :meth:`posterior`, whose globals are draws of the guide, every site is
        corrected: the chains target :math:`p(\theta, \phi, z \mid y)` whatever the guide's
        errors. Use it when the globals matter and the guide may be biased (many individuals,
        a short fit). Check ``diagnostics`` and the chains: ``pyro_hds.to_datatree(draws,
        data)`` hands ArviZ the ``num_chains`` chains, for its R-hat and ESS.

        :param num_samples: draws kept after warm-up, rounded up to a multiple of
            ``num_chains``; every sweep of every chain is kept.
        :param num_chains: chains run side by side (vectorized like particles).
        :param warmup: sweeps discarded first, during which the Metropolis step sizes adapt
            and the chains forget their start. With many individuals a population
            parameter's posterior can be far narrower than the fit's error (the benchmark's
            noise SD, 1000 individuals after a 100-step fit: 188 posterior SDs off), and the
            chains bring it in only as fast as the locals move. With Laplace steps they move
            to near-fresh draws every sweep, and with ``warmup >= 10`` the first five sweeps
            also climb each outer site's conditional by Newton steps and set the walk's step
            sizes from its curvature: there (25-step fit) 20 warm-up sweeps sufficed, about
            100 with the random walk alone (docs/benchmarks.md). Check R-hat, and if it is
            not near 1, raise ``warmup`` or fit longer.
        :param num_particles: ``K``: the current locals of each individual plus ``K - 1``
            draws of the guide, among which the importance step keeps one (1: no importance
            step).
        :param local_steps: random-walk Metropolis steps on every individual's locals per
            sweep (0: the importance step alone). The importance step costs ``K`` times a
            random-walk step; with a guide whose draws rarely win (``local_move_rate`` of a
            few percent) a few random-walk steps and ``num_particles=1`` move the locals for
            less.
        :param outer_steps: Metropolis steps on the global and group sites per sweep. In a
            centred model they solve no ODE and cost little beside the locals' steps, and a
            second one can mix the population parameters much faster (a scratch probe on the
            benchmark's PK model: smallest bulk ESS 198 against 62 of 1000 draws for 23%
            more time).
        :param laplace_steps: independence Metropolis steps per sweep on every individual's
            locals, proposed from the mixture of the chains' Laplace approximations of
            :math:`p(z_i \mid \theta, y_i)` (made before the first sweep, by Newton's method
            with gradients through the ODE solves, and again halfway through warm-up); the
            chains also start from draws of them, and the random walk follows their
            covariances. Each step costs one pass like a random-walk step; the
            approximations cost about ``D + 1`` passes with gradients per Newton iteration
            (``D`` local numbers per individual). 0: none of this (the random walk learns its
            covariances from the chains in warm-up). The model must be differentiable in
            its locals (every solver of this package is).
        :returns: a :class:`Posterior` whose draws are ``num_chains`` chains one after another
            (``num_chains`` set), with ``diagnostics``: ``acceptance`` and ``step_size`` per
            global and group site (a group site of at most 16 groups moves, and adapts its
            steps, one group at a time), ``local_acceptance`` and ``local_step_factor`` of the
            locals' random walk, ``local_covariance`` (whether the walk followed each
            individual's covariance: the Laplace approximations', or one learned in warm-up
            with ``warmup >= 20``), ``laplace_acceptance`` of the Laplace steps after
            warm-up and ``laplace_poor``, the share of chains and individuals whose last
            approximation failed or had a direction without curvature (left out of the
            mixture; None without Laplace steps),
            ``local_move_rate`` (the share of individuals whose locals the importance step
            changed per sweep; None without it), ``outer_groups`` (the moves that share a
            pass from early in warm-up on, see :mod:`pyro_hds.gibbs`) and, with at least 4
            draws per chain, ``split_rhat``: per global and group site the largest split
            :math:`\hat R` of its elements (:func:`pyro_hds.gibbs.split_rhat`); a
            ``RuntimeWarning`` names the worst site when it exceeds 1.1. Its ``pareto_k``,
            ``ess`` and ``inner_bound`` describe the weights of the importance steps, the
            current particle included.
        """
        from pyro_hds.fit import _is_dataset
        from pyro_hds.gibbs import RHAT_WARNING, particle_gibbs, split_rhat

        data = self.data if data is None else data
        if _is_dataset(data):
            data = data.standalone()
        if seed is not None:
            pyro.set_rng_seed(seed)
        parts, diagnostics = particle_gibbs(
            self.model,
            self.guide,
            data,
            num_samples=num_samples,
            num_chains=num_chains,
            warmup=warmup,
            num_particles=num_particles,
            local_steps=local_steps,
            outer_steps=outer_steps,
            laplace_steps=laplace_steps,
            progress=progress,
            record=self._resample,
        )
        posterior = self._merge(parts, num_particles)
        kept = sum(int(p["weight"]) for p in parts) // num_chains
        # the parts are runs of sweeps of all chains (sweep after sweep, chain after chain
        # within a sweep); order the draws chain after chain
        order = torch.arange(kept * num_chains).reshape(kept, num_chains).T.reshape(-1)
        posterior = posterior.select(order)
        posterior.num_chains = num_chains
        if kept >= 4:  # split R-hat of every global and group site, its worst element
            diagnostics["split_rhat"] = {
                name: float(split_rhat(posterior.samples[name], num_chains).max())
                for name in diagnostics["acceptance"]
            }
            worst = max(diagnostics["split_rhat"].items(), key=lambda kv: kv[1], default=None)
            if worst is not None and not worst[1] <= RHAT_WARNING:
                warnings.warn(
                    f"gibbs(): the chains disagree about {worst[0]!r} (split R-hat "
                    f"{worst[1]:.2f} > {RHAT_WARNING}): their draws are not yet draws of the "
                    "posterior. Raise warmup (the chains have not forgotten their start), "
                    "num_samples, or fit longer so that the chains start closer.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        posterior.diagnostics = diagnostics
        posterior.event_coords = self._event_coords()
        return posterior

    def posterior_samples(
        self, num_samples: int = 1000, num_particles: int | None = None, data: Any = None
    ) -> dict[str, torch.Tensor]:
        """Posterior draws as ``{site: tensor}`` with draws first (see :meth:`posterior`)."""
        return dict(self.posterior(data, num_samples, num_particles).samples)

    def posterior_predictive(
        self, num_samples: int = 1000, num_particles: int | None = None, data: Any = None
    ) -> dict[str, torch.Tensor]:
        """Posterior predictive draws of the observation sites and ODE trajectories."""
        post = self.posterior(data, num_samples, num_particles)
        out = dict(post.predictive)
        levels = post.site_levels
        out.update({n: v for n, v in post.samples.items() if levels.get(n) == "deterministic"})
        return out

    def predict(
        self,
        new_data: Any,
        num_samples: int = 1000,
        num_particles: int = 1,
        *,
        seed: int | None = None,
    ) -> Posterior:
        """The posterior of NEW individuals, without retraining.

        The encoder maps each new individual's series, inputs and group to its local posterior;
        globals and group latents come from the trained guide. ``num_particles = K > 1``
        refines the encoder's answer by importance resampling among K draws per individual.
        ``seed`` seeds the draws (None: leave the generators alone).
        """
        return self.posterior(new_data, num_samples, num_particles, seed=seed)

    @_own_parameters
    def encode(
        self, new_data: Any, num_samples: int = 1000, *, seed: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Draws of every latent from the amortized guide alone, for any individuals.

        No ODE is solved and the model is not evaluated: the encoder maps each individual's
        series, inputs and group to its approximate posterior and ``num_samples`` draws are
        taken from it (globals and group latents from their trained Gaussians). This is the
        fastest posterior pyro_hds gives for new individuals; :meth:`predict` with
        ``num_particles > 1`` corrects it by importance resampling (and adds predictive draws,
        log-likelihoods and diagnostics) at the cost of ``num_samples * K`` solves per
        individual.

        :returns: ``{site: tensor}`` with draws first: globals ``(D, *event)``, group latents
            ``(D, G, *event)``, locals ``(D, N, *event)``.
        """
        if num_samples < 1:
            raise ValueError(f"encode(num_samples={num_samples}): must be >= 1")
        if seed is not None:
            pyro.set_rng_seed(seed)
        levels = getattr(self.guide, "levels", None)
        if levels is None:
            raise TypeError("encode() needs an AmortizedGuide (a guide with site levels)")
        with torch.no_grad(), pyro.plate("_draws", num_samples, dim=-2):
            trace = poutine.trace(self.guide).get_trace(new_data)
        out: dict[str, torch.Tensor] = {}
        for name, level in levels.items():
            value = trace.nodes[name]["value"]
            event = value.shape[value.dim() - len(self.guide._shapes[name]) :]
            batch = value.shape[: value.dim() - len(event)]
            value = value.expand(num_samples, *batch[1:], *event)
            out[name] = value.reshape(num_samples, *event) if level == "global" else value
        return out

    @_own_parameters
    def evaluate(
        self,
        data: Any = None,
        num_particles: int = 1000,
        num_outer_particles: int = 4,
        *,
        max_systems: int = 2_000_000,
    ) -> torch.Tensor:
        r"""Held-out importance-weighted bound per individual, ``(N,)`` float64.

        :math:`\frac1S \sum_s \log \frac1K \sum_k w_{sik}`, a stochastic lower bound of
        :math:`E_{q(\theta,\phi)} \log p(y_i \mid \theta, \phi)`: the per-individual metric of
        the vi-hds paper. Individuals are processed in chunks of at most ``max_systems``
        particles.
        """
        data = self.data if data is None else data
        n = len(data)
        per = max(1, max_systems // (num_particles * num_outer_particles))
        out = []
        for start in range(0, n, per):
            idx = torch.arange(start, min(n, start + per))
            with torch.no_grad():
                objective = IWAE(
                    num_particles=num_particles, num_outer_particles=num_outer_particles
                )
                w = objective.log_weights(self.model, self.guide, data[idx])
            out.append(w.inner.double().mean(0))
        return torch.cat(out)

    # -- ArviZ --------------------------------------------------------------------------------

    @_own_parameters
    def to_arviz(self, data: Any = None, num_samples: int = 1000, num_particles: int | None = None):
        """An ArviZ ``xarray.DataTree`` of the posterior (see :func:`pyro_hds.to_datatree`)."""
        from pyro_hds.arviz import to_datatree

        data = self.data if data is None else data
        return to_datatree(self.posterior(data, num_samples, num_particles), data)

    # -- save / load --------------------------------------------------------------------------

    @_own_parameters
    def save(self, path: str | os.PathLike) -> None:
        """Write the trained parameters, guide options, history and data to ``path``.

        The file holds tensors, numbers and strings only (``torch.load(weights_only=True)``
        reads it), written atomically. Reload with :func:`pyro_hds.load` and the same model.
        """
        from pyro_hds.fit import _atomic_save, _param_state

        config = getattr(self.guide, "config", None)
        _atomic_save(
            {
                "format": RESULT_FORMAT,
                "params": _param_state(),
                "guide_config": config() if callable(config) else config,
                "objective": {
                    "num_particles": int(getattr(self.objective, "num_particles", 10)),
                    "num_outer_particles": int(getattr(self.objective, "num_outer_particles", 1)),
                },
                "history": self.history,
                "data": _dataset_state(self.data),
                "buffers": _module_buffers(self.guide),
            },
            Path(path),
        )


def _module_buffers(guide) -> dict[str, torch.Tensor]:
    """The guide's non-parameter state (an encoder's data scales, fixed on first use), which
    Pyro's parameter store does not hold."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(guide, torch.nn.Module):
        for name, buf in guide.named_buffers():
            out[name] = buf.detach().cpu().clone()
    return out


def _dataset_state(data) -> dict[str, Any]:
    from pyro_hds.data import Dataset

    if not isinstance(data, Dataset):
        raise TypeError("FitResult.save(): the training data must be a pyro_hds.Dataset")
    return data.state_dict()


def load(path: str | os.PathLike, model, guide=None) -> FitResult:
    """Read a :class:`FitResult` written by :meth:`FitResult.save`.

    :param model: the same model function the fit used (code is never stored in the file).
    :param guide: a guide constructed like the one that was trained; by default an
        :class:`~pyro_hds.AmortizedGuide` rebuilt from the stored options.

    Loading never executes pickled code (``torch.load(weights_only=True)``). The parameters
    are written into Pyro's global parameter store.
    """
    from pyro_hds.data import Dataset
    from pyro_hds.fit import _load_param_state

    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != RESULT_FORMAT:
        raise ValueError(f"{path}: not a pyro_hds result file")
    data = Dataset.from_state_dict(state["data"])
    if guide is None:
        from pyro_hds.guides import AmortizedGuide

        guide = AmortizedGuide.from_config(model, state["guide_config"] or {})
    attach = getattr(guide, "attach_training_data", None)
    if callable(attach):
        attach(data)
    objective = IWAE(**state["objective"])
    pyro.clear_param_store()
    with torch.no_grad():
        objective.log_weights(model, guide, data[torch.arange(min(2, len(data)))])
    _load_param_state(state["params"])
    saved = state.get("buffers", {})
    if isinstance(guide, torch.nn.Module):
        with torch.no_grad():
            for name, buf in guide.named_buffers():
                if name in saved:
                    buf.copy_(saved[name].to(buf))
    return FitResult(model, guide, data, objective, state["history"])
