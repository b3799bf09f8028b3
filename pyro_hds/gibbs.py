r"""Exact posterior draws with the trained guide as the proposal: particle Gibbs.

The importance-resampled draws of :meth:`FitResult.posterior` correct the local latents only;
the globals stay draws of the guide :math:`q(\theta, \phi)`. When the guide's globals are off
(with many individuals even a small bias in, say, the noise scale is many posterior standard
deviations), :func:`particle_gibbs` gives draws from the exact posterior instead: a Markov
chain whose stationary distribution is :math:`p(\theta, \phi, z \mid y)` whatever the guide,
the guide only setting how fast it mixes.

The state of each of :math:`C` chains is every latent outside the individuals plate
(:math:`\theta`: globals and group latents, here called *outer* sites) and every individual's
local latents :math:`z_i`. One sweep:

1. **Outer sites**, one site :math:`b` at a time in model order: random-walk Metropolis in
   unconstrained space. With :math:`\theta_b = T_b(u_b)` (``biject_to`` of the site's
   support), propose :math:`u_b' = u_b + s_b \odot \varepsilon`, :math:`\varepsilon \sim
   \mathcal N(0, I)`, and accept with probability

   .. math::

       \min\Big(1, \frac{p(\theta', z, y)\,|\det J_{T_b}(u_b')|}
                        {p(\theta, z, y)\,|\det J_{T_b}(u_b)|}\Big),

   where :math:`p(\theta, z, y)` is the model's joint density (one pass of the model with every
   latent fixed: one ODE solve per individual and chain). A group site of at most
   ``ELEMENTWISE_GROUPS`` groups moves one group at a time, each with its own step size:
   a joint step in several groups' values is accepted less often the more groups it moves.

   In the first sweeps every move is its own pass, and each move records its *footprint*:
   the elements of the model's log-density terms that it changed (a term per individual for
   a site in the individuals plate, per group for a group site). With ``warmup >= 5``, from
   sweep :math:`\max(5, \lfloor\mathrm{warmup}/10\rfloor)` on, moves whose footprints are
   pairwise disjoint (say a population mean whose only children are one local site, the
   noise scale whose only child is the likelihood, or two groups' values, each changing its
   own prior term and its own individuals) share one pass: they propose together and each
   is accepted on the change of its own footprint's elements. Such moves commute (the joint
   density factorizes over them), so this is the same kernel as one after another. A pass
   in which an element outside every footprint changes (by more than round-off,
   ``STRAY_TOLERANCE``) stops the run with an error. ``outer_steps`` repeats this step.
2. **Locals, random walk** (``local_steps`` times), all individuals at once: given the outer
   sites the target factorizes over individuals, so every individual's proposal
   :math:`u_i' = u_i + a\, \mathrm{sd}_q(u_i) \odot \varepsilon` (all its local sites
   together, scaled by the guide's spread for that individual) is accepted or rejected on its
   own, with the ratio of :math:`p(y_i, z_i \mid \theta)` and the Jacobians. The steps
   follow each individual's covariance: that of the Laplace approximations of step 3 when
   it runs, else the one the chains' states estimate, from three quarters of the way
   through warm-up on (:class:`_LocalWalk`).
3. **Locals, independence Metropolis with Laplace approximations** (``laplace_steps``
   times), all individuals at once. Before the first sweep, each chain finds every
   individual's mode of :math:`p(z_i \mid \theta_c, y_i)` by Newton's method (gradients by
   autograd through the model and its ODE solves, the Hessian by differences of them) and
   takes the Gaussian with the inverse of the negative Hessian there; halfway through
   warm-up, when the outer values have come near the posterior (and in the first sweeps,
   see below), it does so again from its current state. Individual :math:`i` then proposes
   :math:`z_i' \sim q_i`, the equal mixture of every chain's Gaussian for it with a small
   share of wider ones (:class:`_Laplace`), and accepts with probability
   :math:`\min\big(1, \frac{p(y_i, z_i' \mid \theta)\, q_i(z_i)}{p(y_i, z_i \mid
   \theta)\, q_i(z_i')}\big)` (in unconstrained space, with the Jacobians). Where the
   conditional is close to Gaussian, most proposals are accepted and the locals are close
   to fresh draws every sweep: the noise scale and the population spread, which the locals
   pin down, then mix in a few sweeps instead of the many that a random walk needs to carry
   every individual across its posterior. The mixture lets a chain whose Newton start sat
   in a minor mode of some individual (an absorption and an elimination rate swapped, say)
   jump to the others' modes.
4. **Locals, conditional importance sampling**, all individuals at once. For individual
   :math:`i`, particle 0 is the current :math:`z_i` and particles :math:`1..K-1` are fresh
   draws of the guide, :math:`z_{ik} \sim q(z_i \mid y_i)`; one of the :math:`K` is kept
   with probability proportional to :math:`w_{ik} = p(y_i, z_{ik} \mid \theta) / q(z_{ik}
   \mid y_i)`. This is the conditional SMC kernel of particle Gibbs (Andrieu, Doucet and
   Holenstein, 2010) with a single time step; it leaves :math:`p(z_i \mid \theta, y_i)`
   invariant for any proposal :math:`q`, and the closer :math:`q` is to that conditional the
   more often the chain moves. The random walk of step 2 keeps the locals moving where the
   guide's draws rarely win (a mean-field guide against correlated locals, say). With
   ``num_particles = 1`` this step is skipped.

Each step leaves the posterior invariant, so the sweep does. During ``warmup`` sweeps the
step sizes adapt (Robbins-Monro on :math:`\log s_b` and :math:`\log a` toward an acceptance
rate of 0.35, from :math:`s_b = 2.38\, \mathrm{sd}_q(u_b) / \sqrt{d_b}`, the guide's spread
over the site's :math:`d_b` dimensions, and :math:`a = 2.38 / \sqrt{d}` for :math:`d` local
dimensions per individual); after it they stay fixed and ``num_samples`` draws are kept (an
equal number per chain, every sweep). Chains start from draws of the guide, the locals from
importance resampling and then, with Laplace steps, from a draw of each chain's own Laplace
approximation.

With ``warmup >= 2 OUTER_NEWTON``, the first ``OUTER_NEWTON`` sweeps begin with a Newton
step on each outer block's conditional given the chain's locals (:func:`_outer_newton`):
it climbs instead of sampling, and it sets each block's step size from the conditional's
curvature (the guide's spread after a short fit can be ten times the conditional's, and the
walk's acceptance then stays near 0.1 through warm-up). With Laplace steps the
approximations are also made again at the start of sweeps ``LAPLACE_EARLY_REFITS``: the
noise scale and the locals pin each other down, and each needs the other near its
posterior before it can move there. On the benchmark's PK model with 1000 individuals
after a 25-step fit, the chains' mean noise scale was within one posterior SD after 15
sweeps (about 30 before), 20 warm-up sweeps sufficed in four seeds of four, and the smallest
bulk ESS of the population parameters about doubled (docs/benchmarks.md).

Cost per sweep: one pass with :math:`C K N` ODE solves for the importance step and one pass
with :math:`C N` per group of outer moves, per local random-walk step and per Laplace step.
Each Laplace approximation costs one pass with gradients and :math:`D + 1` more per Newton
iteration (:math:`D` local numbers per individual; more where a step is halved): 3 iterations
at the start (2 when one more follows at ``LAPLACE_EARLY_REFITS``), 1 at each of
``LAPLACE_EARLY_REFITS`` and halfway through warm-up. The
Newton steps on the outer sites cost 3 to 9 passes per block, in the first sweeps only.
The passes of step 1 run under :func:`pyro_hds.ode.reuse_solutions`: when the ODE parameters are the
individuals' locals (a centred hierarchy), a move of an outer site leaves them as they were,
and only the first of these passes solves. Without the importance step the kept states are
evaluated for the draws (trajectories, predictive draws, log-likelihoods) several sweeps at
a time, ``RECORD_SYSTEMS`` chains times individuals in one pass. The chains are vectorized
like the particles of :class:`IWAE`. The passes that set the chains up run with Pyro's
validation as it is; the sweeps run without it (their values lie in the supports by
construction, and the checks of every distribution's arguments cost about a third of a
pass that reuses its solutions), so a proposal at which the model's density is undefined
(NaN) is rejected like one of density zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import closing, nullcontext
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import biject_to

from pyro_hds.objectives import IWAE, LogWeights, _local_frame
from pyro_hds.ode import eager_solves, reuse_solutions
from pyro_hds.results import _choose

__all__ = ["particle_gibbs", "split_rhat"]

TARGET_ACCEPT = 0.35
START_PARTICLES = 16
ELEMENTWISE_GROUPS = 16  # group sites with at most this many groups move group by group
MIN_WARMUP_TO_GROUP = 5  # warm-up sweeps that record footprints before moves are grouped
LAPLACE_NEWTON = 3  # Newton iterations of the first Laplace approximations (all in all)
LAPLACE_REFRESH_NEWTON = 1  # and of those made again halfway through warm-up
# the first sweeps of a warm-up of at least 2 OUTER_NEWTON sweeps begin with a Newton step
# on each outer block's conditional (halved up to OUTER_HALVINGS times until it improves)
OUTER_NEWTON = 5
OUTER_HALVINGS = 6
LAPLACE_EARLY_REFITS = (3,)  # Newton sweeps at whose start the approximations are made again
RECORD_SYSTEMS = 1 << 15  # chains x individuals evaluated together when recording states
# a grouped pass changing a term outside its moves' footprints by less than this (relative)
# is round-off (float32 sums of trajectories laid out differently), not a dependency
STRAY_TOLERANCE = 1e-5
# FitResult.gibbs warns when a global or group site's split R-hat exceeds this (the classic
# threshold of Gelman and Rubin; ArviZ's rank-normalized R-hat is the one to report)
RHAT_WARNING = 1.1


def _latent(site: dict) -> bool:
    return (
        site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("_deterministic")
        and type(site["fn"]).__name__ != "_Subsample"
    )


class _Passes:
    """Vectorized passes of guide and model over ``C`` chains with some latents fixed."""

    def __init__(self, model, guide, data, chains: int) -> None:
        self.model, self.guide, self.data, self.chains = model, guide, data, chains
        # without gradients, like every pass: under grad mode the guide's draws need them, so
        # a compiled solver would compile its training kernel for this one pass
        with torch.no_grad():
            self.nesting = IWAE(num_outer_particles=chains)._nesting(model, guide, (data,), {})
        if self.nesting != 1:
            raise ValueError(
                "particle_gibbs(): supports models whose plates are 'individuals' and 'groups' "
                f"at dim -1 only (max_plate_nesting 1); this model nests {self.nesting} plates"
            )
        self._objectives: dict[tuple[int, int], IWAE] = {}
        # chains -> a guide trace with K = 1 and its latent sites
        self._templates: dict[int, tuple[Any, set[str]]] = {}

    def objective(self, k: int, chains: int | None = None) -> IWAE:
        c = self.chains if chains is None else chains
        if (k, c) not in self._objectives:
            self._objectives[(k, c)] = IWAE(
                num_particles=k, num_outer_particles=c, max_plate_nesting=self.nesting
            )
        return self._objectives[(k, c)]

    def release(self) -> None:
        """Detach the values a pass with gradients left in the cached guide traces."""
        for trace, _ in self._templates.values():
            for site in trace.nodes.values():
                value = site.get("value")
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    site["value"] = value.detach()

    def guide_trace(self, k: int, chains: int | None = None):
        iw = self.objective(k, chains)
        return poutine.trace(iw._wrap(self.guide, self.nesting)).get_trace(self.data)

    def run(
        self,
        k: int,
        outer: dict[str, torch.Tensor] | None,
        local: dict[str, torch.Tensor] | None,
        model_only: bool = False,
        chains: int | None = None,
    ) -> LogWeights:
        """One pass with ``k`` particles per individual and chain. ``outer`` values (``(C, 1,
        G or 1, *event)``) replace the guide's draws of those sites; ``local`` values
        (``(C, 1, N, *event)``) replace particle 0 of those sites. ``model_only``: the
        weights hold the model's terms alone (the guide's log-densities are not evaluated),
        enough for :func:`_site_terms`. ``chains``: ``C`` if not the run's number of chains
        (several sweeps' states evaluated together)."""
        c = self.chains if chains is None else chains
        iw = self.objective(k, c)
        given = set(outer or ()) | set(local or ())
        template = self._templates.get(c) if k == 1 else None
        if template is not None and given >= template[1]:
            # every latent is given: the guide's draws would all be replaced, so reuse the
            # trace of an earlier pass (its encoder need not run again)
            guide_trace = template[0]
        else:
            guide_trace = self.guide_trace(k, c)
            if k == 1 and template is None:
                sites = {n for n, st in guide_trace.nodes.items() if _latent(st)}
                self._templates[c] = (guide_trace, sites)
        for name, site in guide_trace.nodes.items():
            if not _latent(site):
                continue
            if outer is not None and name in outer:
                site["value"] = outer[name].expand_as(site["value"])
            elif local is not None and name in local:
                value = site["value"].clone()
                value[:, :1] = local[name]
                site["value"] = value
        model_trace = poutine.trace(
            poutine.replay(iw._wrap(self.model, self.nesting), trace=guide_trace)
        ).get_trace(self.data)
        weights = iw._weights(
            prune_subsample_sites(model_trace),
            prune_subsample_sites(guide_trace),
            self.nesting,
            (self.data,),
            include_guide=not model_only,
        )
        if not math.isclose(weights.scale, 1.0, rel_tol=1e-9):
            raise ValueError(
                "particle_gibbs(): the individuals plate scales the likelihood by "
                f"{weights.scale:g}: the data set is a subset of a larger one. Pass the "
                "individuals as a data set of their own (data.standalone())."
            )
        return weights


def _site_terms(weights: LogWeights, chosen: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The model's log-density terms of a pass, site by site and element by element, at
    particle ``chosen`` ``(C, N)`` of every individual (particle 0 when None), in float64
    (sums over many individuals: float32 would blur a Metropolis ratio): ``(C, N)`` for a
    site inside the individuals plate (see :func:`_local_keys`), ``(C, E)`` for one outside it
    (``E`` its number of groups, or 1). ``"_failed_local"`` ``(C, N)`` and ``"_failed_outer"``
    ``(C, 1)`` are ``-inf`` where an ODE solve failed (0 elsewhere)."""
    out: dict[str, torch.Tensor] = {}
    index = None if chosen is None else chosen[:, None, :]
    for kind, name, term in weights.contributions:
        if kind != "model":
            continue
        if term.dim() == 3:
            term = term.double()
            out[name] = (term[:, :1] if index is None else term.gather(1, index))[:, 0]
        else:
            out[name] = weights.outer_elements[name].double()
    at = (weights.local[:, :1] if index is None else weights.local.gather(1, index))[:, 0]
    zero = torch.zeros((), dtype=torch.float64, device=at.device)
    out["_failed_local"] = torch.where(torch.isneginf(at), -math.inf, zero).expand(at.shape)
    failed = torch.isneginf(weights.global_terms)[:, None]
    out["_failed_outer"] = torch.where(failed, -math.inf, zero).expand(failed.shape)
    return out


def _local_keys(weights: LogWeights) -> frozenset[str]:
    """The keys of :func:`_site_terms` that hold one term per individual."""
    names = {name for kind, name, term in weights.contributions if term.dim() == 3}
    return frozenset(names | {"_failed_local"})


def _local_total(terms: dict[str, torch.Tensor], local_keys: frozenset[str]) -> torch.Tensor:
    """``(C, N)``: each individual's log p(y_i, z_i | theta), the sum of its terms."""
    local = sum(t for k, t in terms.items() if k in local_keys)  # the terms' order
    assert isinstance(local, torch.Tensor)
    return local


def _log_density_change(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(C,)``: each chain's change of the model's log-density, summed over every term."""
    total = sum((new[k] - old[k]).sum(-1) for k in old)
    assert isinstance(total, torch.Tensor)
    return total


def _take_chains(accept: torch.Tensor, new: dict[str, torch.Tensor], terms) -> None:
    """Replace, in place, every term of the chains where ``accept`` ``(C,)`` by ``new``."""
    for k in terms:
        terms[k] = torch.where(accept[:, None], new[k], terms[k])


def _changed(new: torch.Tensor, old: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """``(E,)``: the elements of ``(C, E)`` terms that differ in some chain (NaN equal to NaN,
    -inf to -inf), by more than ``tolerance * (1 + |old|)`` where both are finite."""
    same = (new == old) | (torch.isnan(new) & torch.isnan(old))
    if tolerance:
        close = (new - old).abs() <= tolerance * (1 + old.abs())
        same = same | (close & torch.isfinite(new) & torch.isfinite(old))
    return ~same.all(0)


Footprint = dict[str, torch.Tensor]  # site -> (E,) bool: the elements whose terms a move changed


def _overlap(a: Footprint, b: Footprint) -> bool:
    """Whether two footprints share an element of some site."""
    return any(bool((a[k] & b[k]).any()) for k in a.keys() & b.keys())


def _check_strays(
    new: dict[str, torch.Tensor],
    old: dict[str, torch.Tensor],
    footprints: list[Footprint],
    moves,
    covered: frozenset[str] = frozenset(),
) -> None:
    """Raise when a joint pass of moves changed an element of a term outside all of their
    footprints: then the moves do not commute, and accepting each on its own terms would
    be wrong."""
    strays = []
    for k in old:
        if k in covered:  # a footprint holds every element of this term: no stray possible
            continue
        if torch.equal(new[k], old[k]):  # most other terms: one comparison
            continue
        changed = _changed(new[k], old[k], STRAY_TOLERANCE)
        for fp in footprints:
            if k in fp:
                changed = changed & ~fp[k]
        if bool(changed.any()):
            strays.append(k)
    if strays:
        raise RuntimeError(
            f"gibbs(): moving {[m[1] for m in moves]} together changed the log-density of "
            f"{strays} where none of their moves changed it in the first sweeps; the model's "
            "dependencies vary with the values. Report this with the model."
        )


def _group_blocks(footprints: list[Footprint]) -> list[list[int]]:
    """Greedy grouping, in order, of blocks whose footprints (the elements of the model's
    terms that their moves change) are pairwise disjoint: such moves commute, and one pass
    serves them all."""
    groups: list[list[int]] = []
    covered: list[Footprint] = []
    for b, fp in enumerate(footprints):
        for group, sites in zip(groups, covered, strict=True):
            if not _overlap(sites, fp):
                group.append(b)
                for k, mask in fp.items():
                    sites[k] = sites[k] | mask if k in sites else mask
                break
        else:
            groups.append([b])
            covered.append(dict(fp))
    return groups


def particle_gibbs(
    model,
    guide,
    data: Any,
    *,
    num_samples: int = 1000,
    num_chains: int = 4,
    warmup: int = 200,
    num_particles: int = 16,
    local_steps: int = 1,
    outer_steps: int = 1,
    laplace_steps: int = 1,
    progress: bool = False,
    record: Callable[[LogWeights, torch.Tensor], Any] = lambda weights, chosen: chosen,
) -> tuple[list[Any], dict[str, Any]]:
    """Run the chains (see the module docstring). Returns ``record(weights, chosen)`` for
    every kept sweep (``weights``: the pass of the importance step, ``chosen``: ``(C, N)``
    the particle kept for each chain and individual) or, with ``num_particles = 1``, for
    every run of ``R`` consecutive kept sweeps evaluated together (``weights``: a pass with
    ``R C`` chains, sweep after sweep, ``chosen`` zeros), and the diagnostics: per outer site the
    acceptance rate after warm-up and the final step sizes, and the share of individuals whose
    locals moved per sweep after warm-up (``local_move_rate``).

    Call it through :meth:`pyro_hds.FitResult.gibbs`, which turns the result into a
    :class:`~pyro_hds.Posterior`.
    """
    if (
        min(num_samples, num_chains, num_particles, outer_steps) < 1
        or min(warmup, local_steps, laplace_steps) < 0
    ):
        raise ValueError(
            "gibbs(): need num_samples >= 1, num_chains >= 1, warmup >= 0, num_particles >= 1, "
            f"local_steps >= 0, outer_steps >= 1 and laplace_steps >= 0 (got {num_samples}, "
            f"{num_chains}, {warmup}, {num_particles}, {local_steps}, {outer_steps}, "
            f"{laplace_steps})"
        )
    if num_particles == 1 and local_steps == 0 and laplace_steps == 0:
        raise ValueError(
            "gibbs(): with num_particles=1, local_steps=0 and laplace_steps=0 nothing would "
            "move the locals. Use local_steps >= 1 or laplace_steps >= 1."
        )
    passes = _Passes(model, guide, data, num_chains)
    kept = -(-num_samples // num_chains)

    # the passes of step 1 keep the locals: where the model is centred they change no ODE
    # parameter, and reuse_solutions() spares their solves
    with torch.no_grad(), reuse_solutions():
        # the guide's spread of each site in unconstrained space sets the first step sizes
        spread_trace = passes.guide_trace(1, chains=256)
        # the start: importance resampling among at least 16 draws of the guide
        first = passes.run(max(num_particles, START_PARTICLES), None, None)
        model_sites = {
            name: site for name, site in first.model_trace.nodes.items() if _latent(site)
        }
        outer_names = [name for name, site in model_sites.items() if _local_frame(site) is None]
        local_names = [name for name, site in model_sites.items() if _local_frame(site) is not None]
        transforms = {name: biject_to(site["fn"].support) for name, site in model_sites.items()}
        spread = {
            name: transforms[name]
            .inv(spread_trace.nodes[name]["value"].double())
            .std(0, keepdim=True)
            .clamp(min=1e-6)
            for name in model_sites
        }
        log_step: dict[str, torch.Tensor] = {
            name: (spread[name] * 2.38 / math.sqrt(max(1, spread[name].numel()))).log()
            for name in outer_names
        }
        # the local random walk: the guide's spread of each individual times one factor
        local_dim = sum(max(1, math.prod(spread[n].shape[3:])) for n in local_names)
        log_local_step = math.log(2.38 / math.sqrt(max(1, local_dim)))
        walk = _LocalWalk(local_names, transforms, spread, warmup)
        # a group site of a few groups moves one group at a time (its own step size and
        # acceptance); with more groups, or for a global, the whole site at once
        outer_blocks: list[tuple[str, torch.Tensor | None]] = []
        blocks: dict[str, int] = {}
        for name in outer_names:
            g = spread[name].shape[2] if spread[name].dim() > 2 else 1
            if 1 < g <= ELEMENTWISE_GROUPS:
                shape = [1] * spread[name].dim()
                shape[2] = g
                for j in range(g):
                    one = torch.zeros(g, dtype=torch.bool, device=spread[name].device)
                    one[j] = True
                    outer_blocks.append((name, one.reshape(shape)))
                blocks[name] = g
            else:
                outer_blocks.append((name, None))
                blocks[name] = 1
        outer = {
            name: first.guide_trace.nodes[name]["value"][:, :1].clone() for name in outer_names
        }
        # start the locals by importance resampling among the first pass's particles
        if bool(torch.isneginf(first.local).all(1).any()):
            raise ValueError(
                "gibbs(): every particle of some individual failed in the first pass; "
                "use more num_particles or check the guide"
            )
        chosen = _choose(first.local)
        local = {
            name: _pick(first.guide_trace.nodes[name]["value"], chosen) for name in local_names
        }
        start = passes.run(1, outer, local, model_only=True)
        terms = _site_terms(start)
        local_keys = _local_keys(start)
        # each chain's Laplace approximation of every individual's locals: each chain starts
        # from a draw of its own, and the random walk follows their covariances from the
        # first sweep on
        laplace = None
        held = torch.zeros(())  # see step 3: computed for the locals' tensors in held_at
        held_at: dict[str, torch.Tensor] = {}
        refresh = warmup // 2 if warmup >= 4 else None
        # warm-up sweeps that begin with a Newton step on every outer block (see _outer_newton)
        newton_until = OUTER_NEWTON if warmup >= 2 * OUTER_NEWTON else 0
        early_refits = [s for s in LAPLACE_EARLY_REFITS if s < newton_until]
        if laplace_steps and local_names:
            laplace = _Laplace(local_names, transforms, spread)
            # an approximation made again in the Newton sweeps continues Newton's method from
            # these modes: the first ones stop that many iterations early
            laplace.fit(passes, outer, local, local_keys, LAPLACE_NEWTON - len(early_refits))
            assert laplace.mode is not None and laplace.chol is not None
            assert laplace.ok is not None
            u = laplace.mode + (laplace.chol @ torch.randn_like(laplace.mode)[..., None])[..., 0]
            drawn, _ = laplace.values(u, local)
            local = {name: _where(laplace.ok, drawn[name], local[name]) for name in local_names}
            start = passes.run(1, outer, local, model_only=True)
            terms = _site_terms(start)
            walk.use(laplace.chol)
        local_shape = terms["_failed_local"].shape
        device = terms["_failed_local"].device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        nblocks = len(outer_blocks)
        footprints: list[Footprint] = [{} for _ in range(nblocks)]
        singles = [[i] for i in range(nblocks)]
        groups = singles
        covered: dict[tuple[int, ...], frozenset[str]] = {}
        # moves are grouped from this sweep on (footprints recorded in the sweeps before it)
        group_from = (
            max(MIN_WARMUP_TO_GROUP, warmup // 10) if warmup >= MIN_WARMUP_TO_GROUP else None
        )
        # the sweeps that make the Laplace approximations again: during the Newton sweeps,
        # which move the outer values far, and halfway through warm-up
        refits = set(early_refits) | (set() if refresh is None else {refresh})
        # without an importance step the kept states are evaluated RECORD_SYSTEMS solves at
        # a time, several sweeps together, instead of by a pass of their own every sweep
        per_record = max(1, RECORD_SYSTEMS // max(1, num_chains * local_shape[1]))
        pending: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

        def flush() -> None:
            count = len(pending)
            outer_all, local_all = (
                {name: torch.cat([state[side][name] for state in pending]) for name in names}
                for side, names in ((0, outer_names), (1, local_names))
            )
            weights = passes.run(1, outer_all, local_all, chains=count * num_chains)
            chosen = torch.zeros(
                (count * num_chains, local_shape[1]), dtype=torch.long, device=device
            )
            records.append(record(weights, chosen))
            pending.clear()

        def take(accept: torch.Tensor, proposals, new_terms) -> None:
            """Accept each chain's and individual's proposed locals where ``accept``."""
            for name in local_names:
                local[name] = _where(accept, proposals[name], local[name])
            for k in local_keys:  # terms outside the plate do not depend on the locals
                terms[k] = torch.where(accept, new_terms[k], terms[k])

        accepted = {name: 0.0 for name in outer_names}
        local_accepted = moved = laplace_accepted = 0.0
        records: list[Any] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=warmup + kept, desc="gibbs", dynamic_ncols=True)
        # the sweeps' values lie in their supports by construction (transforms of steps in
        # unconstrained space) and the passes above were validated: the sweeps skip the
        # distributions' checks of arguments and values (a proposal whose density the model
        # cannot evaluate gets a NaN log-density, which _accept rejects)
        with pyro.validation_enabled(False), closing(bar) if bar is not None else nullcontext():
            for sweep in range(warmup + kept):
                gain = 1.0 / math.sqrt(sweep + 1.0)
                # 1. the globals and group latents: block by block in the first sweeps (which
                # record each block's footprint), then in groups of commuting blocks
                grouped = group_from is not None and sweep >= group_from
                if sweep == group_from:
                    groups = _group_blocks(footprints)
                    # per group, the terms some footprint holds whole (no stray to look for)
                    covered = {
                        tuple(group): frozenset(
                            k for i in group for k, m in footprints[i].items() if bool(m.all())
                        )
                        for group in groups
                    }
                if not grouped:
                    # the terms of the state from one pass, so that a footprint holds what a
                    # move changed and not round-off: the walk's passes computed some
                    # individuals' terms from differently laid out trajectories
                    terms = _site_terms(passes.run(1, outer, local, model_only=True))
                if sweep < newton_until:
                    for name, mask in outer_blocks:
                        log_step[name] = _outer_newton(
                            passes,
                            outer,
                            local,
                            terms,
                            name,
                            mask,
                            transforms[name],
                            log_step[name],
                        )
                for group in (groups if grouped else singles) * outer_steps:
                    given = dict(outer)
                    moves = []
                    for i in group:
                        name, mask = outer_blocks[i]
                        value = outer[name]
                        step = log_step[name].exp()
                        u, proposal, u_new = _propose(
                            transforms[name], value, step if mask is None else step * mask
                        )
                        if mask is None:
                            given[name] = proposal
                        else:  # its group alone moves (other blocks may move the others)
                            proposal = torch.where(mask, proposal, value)
                            given[name] = torch.where(mask, proposal, given[name])
                        ladj = _ladj(transforms[name], u_new, proposal).sum(-1) - _ladj(
                            transforms[name], u, value
                        ).sum(-1)
                        moves.append((i, name, mask, proposal, ladj))
                    new_terms = _site_terms(passes.run(1, given, local, model_only=True))
                    if len(group) > 1:
                        _check_strays(
                            new_terms,
                            terms,
                            [footprints[i] for i in group],
                            moves,
                            covered[tuple(group)],
                        )
                    for i, name, mask, proposal, ladj in moves:
                        if len(group) == 1:  # every term, every element
                            if not grouped:
                                for k in terms:
                                    changed = _changed(new_terms[k], terms[k])
                                    if bool(changed.any()):
                                        old = footprints[i].get(k)
                                        footprints[i][k] = changed if old is None else old | changed
                            accept = _accept(ladj + _log_density_change(new_terms, terms))
                            _take_chains(accept, new_terms, terms)
                        else:  # the elements of its footprint alone
                            fp = footprints[i]
                            diff = sum(
                                torch.where(fp[k], new_terms[k] - terms[k], zero).sum(-1)
                                for k in fp
                            )
                            accept = _accept(ladj + diff)
                            for k, where in fp.items():
                                at = accept[:, None] & where
                                terms[k] = torch.where(at, new_terms[k], terms[k])
                        if mask is not None:  # keep what other blocks of the site did
                            proposal = torch.where(mask, proposal, outer[name])
                        outer[name] = _where(accept, proposal, outer[name])
                        rate = float(accept.double().mean())
                        if sweep < warmup:
                            change = gain * (rate - TARGET_ACCEPT)
                            log_step[name] = log_step[name] + (
                                change if mask is None else change * mask
                            )
                        else:
                            accepted[name] += rate / (blocks[name] * outer_steps)
                # 2. the locals by a random walk, every individual at once: given the globals
                # the target factorizes over individuals, so each is accepted on its own
                if walk.learning(sweep):
                    walk.learn(local)
                elif sweep == walk.switch:
                    walk.freeze()
                    log_local_step = math.log(2.38 / math.sqrt(max(1, local_dim)))
                for _ in range(local_steps):
                    proposals, log_jac = walk.propose(local, math.exp(log_local_step))
                    new_terms = _site_terms(passes.run(1, outer, proposals, model_only=True))
                    local_lp = _local_total(terms, local_keys)
                    new_local = _local_total(new_terms, local_keys)
                    accept = _accept(new_local - local_lp + log_jac)  # (C, N)
                    take(accept, proposals, new_terms)
                    rate = float(accept.double().mean())
                    if sweep < warmup:
                        log_local_step += gain * (rate - TARGET_ACCEPT)
                    else:
                        local_accepted += rate / local_steps
                # 3. the locals by independence Metropolis with the mixture of the chains'
                # Laplace approximations, made again in the Newton sweeps and halfway through
                # warm-up (the outer values the first ones were made at are the guide's,
                # often far off)
                if laplace is not None:
                    if sweep in refits:
                        # halfway through warm-up from the chains' states; in the Newton
                        # sweeps from the last modes, so that the mixture keeps every mode
                        # some chain had found while the outer values move under it
                        assert laplace.mode is not None
                        origin = (
                            local if sweep == refresh else laplace.values(laplace.mode, local)[0]
                        )
                        laplace.fit(passes, outer, origin, local_keys, LAPLACE_REFRESH_NEWTON)
                        assert laplace.chol is not None
                        walk.use(laplace.chol)
                    assert laplace.member is not None
                    usable = laplace.member.any(0)  # (N,): the mixture has a component
                    # the current state's log |det J| minus log q, kept while no other move
                    # has replaced the locals' tensors and the mixture is the same
                    if sweep in refits or any(local[n] is not held_at.get(n) for n in local):
                        held = _log_jac(local, local_names, transforms) - laplace.log_density(
                            laplace.flat(local)
                        )
                    for _ in range(laplace_steps):
                        u_new, _ = laplace.draw(num_chains)
                        proposals, jac_new = laplace.values(u_new, local)
                        new_held = jac_new - laplace.log_density(u_new)
                        new_terms = _site_terms(passes.run(1, outer, proposals, model_only=True))
                        log_alpha = (
                            _local_total(new_terms, local_keys)
                            + new_held
                            - _local_total(terms, local_keys)
                            - held
                        )
                        accept = _accept(log_alpha) & usable
                        held = torch.where(accept, new_held, held)
                        take(accept, proposals, new_terms)
                        held_at = dict(local)
                        if sweep >= warmup:
                            laplace_accepted += float(accept.double().mean()) / laplace_steps
                # 4. the locals by conditional importance sampling among the current ones and
                # K - 1 draws of the guide
                if num_particles > 1:
                    weights = passes.run(num_particles, outer, local)
                    chosen = _choose(weights.local)
                    local = {
                        name: _pick(weights.guide_trace.nodes[name]["value"], chosen)
                        for name in local_names
                    }
                    terms = _site_terms(weights, chosen)
                    if sweep >= warmup:
                        moved += float((chosen != 0).double().mean())
                        records.append(record(weights, chosen))
                elif sweep >= warmup:  # no importance step: record the state, in batches
                    pending.append((dict(outer), dict(local)))
                    if len(pending) == per_record:
                        flush()
                if bar is not None:
                    bar.update(1)
            if pending:
                flush()
    diagnostics = {
        "acceptance": {name: accepted[name] / kept for name in outer_names},
        "step_size": {name: log_step[name].exp().reshape(-1).tolist() for name in outer_names},
        "local_acceptance": local_accepted / kept if local_steps else None,
        "local_step_factor": math.exp(log_local_step),
        "local_covariance": walk.chol is not None,
        "local_move_rate": moved / kept if num_particles > 1 else None,
        "laplace_acceptance": laplace_accepted / kept if laplace is not None else None,
        "laplace_poor": (
            float((~laplace.ok).double().mean())
            if laplace is not None and laplace.ok is not None
            else None
        ),
        "laplace_steps": laplace_steps,
        "num_chains": num_chains,
        "warmup": warmup,
        "num_particles": num_particles,
        "local_steps": local_steps,
        "outer_steps": outer_steps,
        "outer_groups": [[_block_name(outer_blocks[i]) for i in group] for group in groups],
    }
    return records, diagnostics


def _outer_newton(
    passes: _Passes,
    outer: dict[str, torch.Tensor],
    local: dict[str, torch.Tensor],
    terms: dict[str, torch.Tensor],
    name: str,
    mask: torch.Tensor | None,
    transform,
    log_step: torch.Tensor,
) -> torch.Tensor:
    r"""A warm-up move of one outer block: a Newton step on its conditional log-density,
    every chain at once; updates ``outer`` and ``terms`` in place and returns the block's
    new log step sizes.

    With :math:`u` the block's unconstrained value, :math:`f(\delta)` the log of
    :math:`p(\theta, z, y)\,|\det J_T|` at :math:`u + \delta h e` minus its value at
    :math:`u` (:math:`e` the block's elements, :math:`h` a quarter of its step size), central
    differences give :math:`g = (f(1) - f(-1)) / 2` and :math:`H = f(1) + f(-1)`; a chain
    whose :math:`H < 0` moves to :math:`\delta = -g / H`, halved until :math:`f(\delta) > 0`
    (at most ``OUTER_HALVINGS`` times; otherwise it stays). The step size becomes
    :math:`2.38\, h / \sqrt{-H}` (the conditional's standard deviation, median over chains,
    over :math:`\sqrt d` for :math:`d` elements moved together), so that the random walk
    starts at the scale of the conditional, which a short fit's guide overstates by an
    order of magnitude or more.

    It is not a Metropolis move (it climbs), and serves the first warm-up sweeps only: the
    guide's outer values can sit hundreds of posterior standard deviations off (the noise
    scale of 1000 individuals after a 25-step fit), and climbing to the conditional mode
    given each chain's locals, which the Laplace steps redraw every sweep, brings them in
    within a few sweeps, where a random walk needs dozens. Costs 3 to 9 passes per block."""
    value = outer[name]
    chains = value.shape[0]
    u = transform.inv(value.double())
    elements = torch.ones_like(u) if mask is None else mask.to(u.dtype).expand_as(u)
    d = max(1, int(elements[0].sum()))
    h = log_step.exp() / 4
    ladj = _ladj(transform, u, value.double())
    shape = (chains,) + (1,) * (u.dim() - 1)

    def at(delta: torch.Tensor):
        u_new = u + delta.reshape(shape) * h * elements
        proposal = transform(u_new).to(value.dtype)
        if mask is not None:
            proposal = torch.where(mask, proposal, value)
        given = dict(outer)
        given[name] = proposal
        new_terms = _site_terms(passes.run(1, given, local, model_only=True))
        f = _log_density_change(new_terms, terms) + (
            _ladj(transform, u_new, proposal.double()) - ladj
        ).sum(-1)
        return torch.nan_to_num(f, nan=-math.inf), proposal, new_terms

    ones = torch.ones(chains, dtype=u.dtype, device=u.device)
    f_up, _, _ = at(ones)
    f_down, _, _ = at(-ones)
    g = (f_up - f_down) / 2
    curvature = f_up + f_down
    concave = torch.isfinite(curvature) & (curvature < 0)
    if not bool(concave.any()):
        return log_step
    sd = torch.where(concave, (-curvature).clamp(min=1e-300).rsqrt(), math.nan)
    new_log_step = (2.38 * h * sd.nanmedian() / math.sqrt(d)).log()
    if mask is not None:
        new_log_step = torch.where(mask, new_log_step, log_step)
    delta = torch.where(concave, -g / curvature, 0.0)
    pending = concave & torch.isfinite(delta) & (delta != 0)
    for _ in range(OUTER_HALVINGS + 1):
        if not bool(pending.any()):
            break
        f, proposal, new_terms = at(torch.where(pending, delta, 0.0))
        better = pending & (f > 0)
        outer[name] = _where(better, proposal, outer[name])
        _take_chains(better, new_terms, terms)
        pending = pending & ~better
        delta = delta / 2
    return new_log_step


class _LocalWalk:
    r"""The random walk on every individual's locals (all local sites together, in
    unconstrained space, flattened to ``(C, N, D)``).

    It starts scaled by the guide's spread of each individual. With ``warmup >= 20`` the
    chains' states in the middle half of warm-up (sweeps ``warmup // 4`` to ``3 warmup // 4``,
    all chains pooled) give each individual's covariance :math:`\Sigma_i`,
    shrunk toward the guide's variances with the weight of ``PRIOR_DRAWS`` draws; from sweep
    ``3 warmup // 4`` on the proposal is :math:`u_i' = u_i + a L_i \varepsilon` with
    :math:`L_i L_i^\top = \Sigma_i`, the factor :math:`a` adapting until the end of warm-up
    and fixed after. Posteriors of ODE parameters are often strongly correlated (a rate and a
    volume that only their ratio pins down), where a walk along the axes must take tiny steps.
    """

    PRIOR_DRAWS = 10.0

    def __init__(self, names, transforms, spread, warmup: int) -> None:
        self.names, self.transforms, self.spread = names, transforms, spread
        self.start, self.switch = (warmup // 4, 3 * warmup // 4) if warmup >= 20 else (-1, -1)
        self.chol: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.outer_sum: torch.Tensor | None = None
        self.count = 0

    def use(self, chol: torch.Tensor) -> None:
        """Follow these Cholesky factors ``(C or 1, N, D, D)`` from now on (and learn none)."""
        self.chol = chol
        self.start = self.switch = -1

    def learning(self, sweep: int) -> bool:
        return self.start <= sweep < self.switch

    def learn(self, local: dict[str, torch.Tensor]) -> None:
        u = _flatten(local, self.names, self.transforms)
        s1, s2 = u.sum(0), torch.einsum("cni,cnj->nij", u, u)
        self.sum = s1 if self.sum is None else self.sum + s1
        self.outer_sum = s2 if self.outer_sum is None else self.outer_sum + s2
        self.count += u.shape[0]

    def freeze(self) -> None:
        assert self.sum is not None and self.outer_sum is not None
        n = float(self.count)
        mean = self.sum / n
        cov = self.outer_sum / n - mean[:, :, None] * mean[:, None, :]
        guide_var = _flat_spread(self.spread, self.names).pow(2)  # (N, D)
        w = self.PRIOR_DRAWS
        cov = (n * cov + w * torch.diag_embed(guide_var)) / (n + w)
        chol, info = torch.linalg.cholesky_ex(cov)  # (N, D, D)
        # an individual whose states were not finite keeps the guide's spread
        failed = (info != 0) | ~torch.isfinite(chol).all(-1).all(-1)
        fallback = torch.diag_embed(guide_var.sqrt())
        self.chol = torch.where(failed[:, None, None], fallback, torch.nan_to_num(chol))

    def propose(self, local: dict[str, torch.Tensor], factor: float):
        """Proposals of every site and ``(C, N)`` log |det J| of the new minus the old."""
        proposals: dict[str, torch.Tensor] = {}
        log_jac: torch.Tensor | float = 0.0
        if self.chol is None:
            for name in self.names:
                u, proposal, u_new = _propose(
                    self.transforms[name], local[name], factor * self.spread[name]
                )
                proposals[name] = proposal
                log_jac = log_jac + _ladj(self.transforms[name], u_new, proposal)
                log_jac = log_jac - _ladj(self.transforms[name], u, local[name])
            return proposals, log_jac
        u = _flatten(local, self.names, self.transforms)
        eps = torch.randn_like(u)
        u_new = u + factor * (self.chol @ eps[..., None])[..., 0]
        proposals, log_jac = _unflatten(u_new, local, self.names, self.transforms)
        return proposals, log_jac - _log_jac(local, self.names, self.transforms)


class _Laplace:
    r"""Each chain's Laplace approximation of every individual's locals given its outer
    values, and the mixture of them all as an independence proposal.

    For chain :math:`c` and individual :math:`i`, with the locals in unconstrained space
    :math:`u` (all local sites together, flattened to ``D`` numbers) and
    :math:`\ell_{ci}(u) = \log p(y_i, z_i = T(u) \mid \theta_c) + \log|\det J_T(u)|`, Newton's
    method finds a mode :math:`m_{ci}` and the negative Hessian there gives
    :math:`S_{ci} = (-\nabla^2 \ell_{ci}(m_{ci}))^{-1}`. Gradients come from autograd through
    the model (one pass for every chain and individual at once: the target factorizes over
    individuals); the Hessian from forward differences of gradients, one pass per local
    dimension (steps of half the last approximation's standard deviation, at most a quarter
    of the guide's spread), symmetrized. Eigenvalues of the negative
    Hessian are floored at the precision of two guide spreads: a saddle or a flat direction
    gives a wide Gaussian rather than none, and no wider (a far proposal can make a stiff ODE
    fail). A Newton step moves at most three guide spreads in every coordinate and is halved
    (up to four times) where :math:`\ell` would decrease by more than round-off. The
    covariance is that of the last iteration's Hessian (made one step before the mode).

    The proposal for individual :math:`i`, the same for every chain, is

    .. math::

        q_i(u) = \frac{1 - \epsilon}{C'} \sum_{c\ \mathrm{ok}} \mathcal N(u;\ m_{ci}, S_{ci})
               + \frac{\epsilon}{C''} \sum_{c\ \mathrm{finite}}
                 \mathcal N(u;\ m_{ci}, \kappa^2 S_{ci}),
        \qquad \epsilon = \mathtt{DEFENSIVE},\ \kappa = \mathtt{INFLATE},

    the first sum over the chains whose approximation is good: a finite :math:`\ell` at the
    mode and no eigenvalue floored (an individual without any good one takes those that are
    finite; one without those gets no proposal). A floored direction is a sign of a Hessian
    made far from the mode or lost to the differences, and its wide Gaussian would mostly
    propose where the posterior has no mass, or where a stiff ODE fails (slow to find out).

    The second sum is a defensive part: every finite approximation, its standard deviations
    ``INFLATE`` times wider. Without it, a chain whose locals sit where no good component
    reaches has :math:`q_i(z_i)` hundreds of nats below :math:`p(z_i \mid \theta_c, y_i)`,
    and an independence step from there is almost never accepted, although the other
    components propose states of far higher density: the chain stays put. Seen on the PK
    benchmark: a chain whose noise scale was twice the others' when the approximations were
    made, whose individuals of one group had settled at a compromise of clearance and
    volume, stayed 150 posterior SDs off in the noise scale for 40 sweeps.

    One chain's Newton start can sit in a minor mode (the flip-flop of an absorption and an
    elimination rate, say); the other chains' components then let it jump, and the
    Metropolis ratio weighs the modes as the posterior does. After warm-up the mixture is
    fixed (made from states of warm-up) and depends on no chain's current state, so an
    independence Metropolis step with it leaves each chain's conditional
    :math:`p(z_i \mid \theta_c, y_i)` invariant.
    """

    MAX_HALVINGS = 4
    ROUND_OFF = 1e-5  # a relative change of the log-density below this is round-off
    TRUST = 3.0  # a Newton step is at most this many guide spreads per coordinate
    FLOOR_SPREADS = 2.0  # precision floor: the curvature of this many guide spreads
    DEFENSIVE = 0.1  # the weight of the defensive part of the mixture
    INFLATE = 3.0  # and its components' standard deviations, in those of the others

    def __init__(self, names, transforms, spread) -> None:
        self.names, self.transforms = names, transforms
        self.spread = _flat_spread(spread, names)  # (N, D)
        self.mode: torch.Tensor | None = None  # (C, N, D)
        self.chol: torch.Tensor | None = None  # (C, N, D, D)
        self.ok: torch.Tensor | None = None  # (C, N): a finite approximation, curved everywhere
        self.member: torch.Tensor | None = None  # (C, N): a component of the mixture
        self.finite: torch.Tensor | None = None  # (C, N): a component of its defensive part
        self.inverse: torch.Tensor | None = None  # (C, N, D, D): the inverses of chol
        self.log_det: torch.Tensor | None = None  # (C, N): log |det chol|

    def flat(self, local: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(C, N, D)`` unconstrained values of the local sites ``(C, 1, N, *event)``."""
        return _flatten(local, self.names, self.transforms)

    def values(self, u: torch.Tensor, like: dict[str, torch.Tensor]):
        """The local sites' values at ``u`` ``(C, N, D)`` and ``(C, N)`` log |det J| there."""
        return _unflatten(u, like, self.names, self.transforms)

    def fit(self, passes, outer, local, local_keys, iterations: int) -> None:
        """Newton's method from the chains' ``local`` values at their ``outer`` values, then
        the approximations at the modes (see the class docstring)."""

        def value_and_grad(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # eagerly: a compiled solver would compile its training kernel for these passes
            with torch.enable_grad(), eager_solves():
                u = u.detach().requires_grad_()
                z, log_jac = self.values(u, local)
                weights = passes.run(1, outer, z, model_only=True)
                lp = _local_total(_site_terms(weights), local_keys) + log_jac
                lp = torch.nan_to_num(lp, nan=-math.inf)
                (grad,) = torch.autograd.grad(torch.where(torch.isfinite(lp), lp, 0.0).sum(), u)
            passes.release()
            return lp.detach(), torch.nan_to_num(grad.detach())

        u = self.flat(local)
        d = u.shape[-1]
        spread = self.spread.to(u).expand_as(u)
        if self.chol is not None:
            sd = self.chol.pow(2).sum(-1).sqrt()  # the last approximation's
        else:
            sd = 0.5 * spread
        h = 0.5 * torch.minimum(sd, 0.5 * spread)  # at most a quarter of the guide's spread
        eye = torch.eye(d, dtype=u.dtype, device=u.device)
        floor = (self.FLOOR_SPREADS * spread).pow(-2).min(-1).values[..., None]  # (C, N, 1)

        def precision(u: torch.Tensor, grad: torch.Tensor):
            columns = []
            for j in range(d):
                _, grad_j = value_and_grad(u + h[..., j : j + 1] * eye[j])
                columns.append((grad_j - grad) / h[..., j : j + 1])
            hess = torch.stack(columns, -1)
            evals, evecs = torch.linalg.eigh(-(hess + hess.transpose(-1, -2)) / 2)
            evals = torch.nan_to_num(evals, nan=0.0)
            flat = (evals <= floor).any(-1)  # (C, N): a direction of (almost) no curvature
            return evals.maximum(floor), torch.nan_to_num(evecs), flat

        lp, grad = value_and_grad(u)
        evals = evecs = flat = None
        for _ in range(iterations):
            evals, evecs, flat = precision(u, grad)
            step = evecs @ ((evecs.transpose(-1, -2) @ grad[..., None]) / evals[..., None])
            step = step[..., 0]
            over = (step.abs() / (self.TRUST * spread)).amax(-1, keepdim=True).clamp(min=1.0)
            step = step / over
            for _ in range(self.MAX_HALVINGS + 1):
                lp_new, grad_new = value_and_grad(u + step)
                # "not lower" up to the round-off of a float32 model's sums near a mode
                better = torch.isfinite(lp_new) & (
                    (lp_new >= lp - self.ROUND_OFF * (1 + lp.abs())) | ~torch.isfinite(lp)
                )
                u = torch.where(better[..., None], u + step, u)
                grad = torch.where(better[..., None], grad_new, grad)
                lp = torch.where(better, lp_new, lp)
                if bool(better.all()):
                    break
                step = torch.where(better[..., None], 0.0, step / 2)
        if evals is None or evecs is None or flat is None:
            evals, evecs, flat = precision(u, grad)
        # else the last iteration's curvature (its start lies within a step of the mode)
        cov = evecs @ torch.diag_embed(evals.reciprocal()) @ evecs.transpose(-1, -2)
        chol, info = torch.linalg.cholesky_ex(cov)
        finite = torch.isfinite(lp) & (info == 0) & torch.isfinite(chol).all(-1).all(-1)
        # a flat direction (a saddle, a start far from the mode, a curvature lost to the
        # differences) gives a floored, wide Gaussian: kept in the mixture only for an
        # individual without a better one
        self.ok = finite & ~flat
        self.member = torch.where(self.ok.any(0), self.ok, finite)
        self.finite = finite
        self.mode = u
        fallback = torch.diag_embed(sd)
        self.chol = torch.where(finite[..., None, None], torch.nan_to_num(chol), fallback)
        self.inverse = torch.linalg.solve_triangular(
            self.chol, torch.eye(d, dtype=u.dtype, device=u.device), upper=False
        )
        self.log_det = self.chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    def draw(self, chains: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``chains`` draws ``(C, N, D)`` of every individual's mixture and which component
        each came from ``(C, N)``."""
        assert self.mode is not None and self.chol is not None and self.member is not None
        assert self.finite is not None
        n = self.mode.shape[1]
        # the defensive part with probability DEFENSIVE (see the class docstring)
        wide = torch.rand(chains, n, device=self.mode.device) < self.DEFENSIVE
        weights = torch.where(wide[..., None], self.finite.T[None], self.member.T[None]).double()
        weights = torch.where(weights.sum(-1, keepdim=True) > 0, weights, 1.0)  # (C, N, C')
        component = torch.multinomial(weights.reshape(chains * n, -1), 1).reshape(chains, n)
        index = torch.arange(n, device=component.device)
        mode, chol = self.mode[component, index], self.chol[component, index]
        eps = torch.randn_like(mode) * torch.where(wide, self.INFLATE, 1.0)[..., None].to(mode)
        return mode + (chol @ eps[..., None])[..., 0], component

    def log_density(self, u: torch.Tensor) -> torch.Tensor:
        """``(C, N)`` log-density of the mixture at ``u`` ``(C, N, D)``, up to a constant;
        ``-inf`` for an individual none of whose approximations succeeded."""
        assert self.mode is not None and self.inverse is not None and self.member is not None
        assert self.log_det is not None and self.finite is not None
        diff = u[:, None] - self.mode[None]  # (C, C', N, D)
        # a product (batched solves of many tiny systems cost far more)
        white = torch.einsum("knij,cknj->ckni", self.inverse, diff)  # (C, C', N, D)
        square = white.pow(2).sum(-1)  # (C, C', N)
        d = u.shape[-1]
        terms = -0.5 * square - self.log_det[None]
        wide = -0.5 * square / self.INFLATE**2 - self.log_det[None] - d * math.log(self.INFLATE)

        def mean_over(included: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            count = included.sum(0).clamp(min=1).to(t.dtype)  # (N,)
            return torch.logsumexp(torch.where(included[None], t, -math.inf), 1) - count.log()

        return torch.logaddexp(
            mean_over(self.member, terms) + math.log1p(-self.DEFENSIVE),
            mean_over(self.finite, wide) + math.log(self.DEFENSIVE),
        )


def split_rhat(draws: torch.Tensor, num_chains: int) -> torch.Tensor:
    r"""The split potential scale reduction :math:`\hat R` of every element of ``draws``
    ``(D, *shape)``, whose ``D`` draws are ``num_chains`` chains of equal length one after
    another; returns ``shape``, float64.

    Each chain is cut into halves (its middle draw dropped when its length is odd), giving
    :math:`M = 2C` sequences of :math:`n` draws with means :math:`\bar x_m` and variances
    :math:`s_m^2`; with :math:`W = \frac1M \sum_m s_m^2` and :math:`B/n` the variance of the
    :math:`\bar x_m`,

    .. math::

        \hat R = \sqrt{\Big(\frac{n-1}{n} W + \frac{B}{n}\Big) / W}

    (Gelman et al., *Bayesian Data Analysis*, 3rd ed., section 11.4; ArviZ's
    ``rhat(method="split")``). Near 1 when the chains agree with each other and with
    themselves; well above 1 (say 1.1) when they have not forgotten their start. ArviZ's
    rank-normalized version (what :func:`pyro_hds.to_datatree` hands it) is more robust for
    heavy tails; this one costs nothing and needs no import. Where :math:`W = 0` (every
    half-chain constant: a stuck sampler) it is ``inf``, where ArviZ gives NaN.
    """
    d = draws.shape[0]
    if num_chains < 1 or d % num_chains:
        raise ValueError(f"split_rhat(): {d} draws are not {num_chains} chains of equal length")
    per = d // num_chains
    half = per // 2
    if half < 2:
        raise ValueError(f"split_rhat(): needs at least 4 draws per chain, got {per}")
    x = draws.double().reshape(num_chains, per, -1)
    parts = torch.cat([x[:, :half], x[:, per - half :]], 0)  # (2C, n, E)
    within = parts.var(1).mean(0)
    between = parts.mean(1).var(0)  # B / n
    rhat = (((half - 1) / half * within + between) / within).sqrt()
    # a half in which no draw differs from another gives W = 0: a sampler stuck there
    rhat = torch.where(within > 0, rhat, math.inf)
    return rhat.reshape(draws.shape[1:])


def _flatten(local: dict[str, torch.Tensor], names, transforms) -> torch.Tensor:
    """``(C, N, D)``: the local sites' values ``(C, 1, N, *event)`` in unconstrained space,
    all sites of an individual side by side."""
    parts = []
    for name in names:
        u = transforms[name].inv(local[name].double())
        parts.append(u.reshape(u.shape[0], u.shape[2], -1))
    return torch.cat(parts, -1)


def _unflatten(u: torch.Tensor, like: dict[str, torch.Tensor], names, transforms):
    """The inverse of :func:`_flatten`: the sites' values at ``u`` ``(C, N, D)`` (shapes and
    dtypes of ``like``) and ``(C, N)`` log |det J| of the transforms there."""
    values: dict[str, torch.Tensor] = {}
    log_jac: torch.Tensor | float = 0.0
    at = 0
    for name in names:
        like_site = like[name]
        d = max(1, math.prod(like_site.shape[3:]))
        u_site = u[..., at : at + d].reshape(u.shape[0], 1, *like_site.shape[2:])
        at += d
        value = transforms[name](u_site).to(like_site.dtype)
        values[name] = value
        log_jac = log_jac + _ladj(transforms[name], u_site, value)
    assert isinstance(log_jac, torch.Tensor)
    return values, log_jac


def _log_jac(local: dict[str, torch.Tensor], names, transforms) -> torch.Tensor:
    """``(C, N)``: log |det J| of the transforms at the local sites' values."""
    total = sum(_ladj(transforms[n], transforms[n].inv(local[n].double()), local[n]) for n in names)
    assert isinstance(total, torch.Tensor)
    return total


def _flat_spread(spread: dict[str, torch.Tensor], names) -> torch.Tensor:
    """``(N, D)``: the guide's spread of each local site ``(1, 1, N, *event)``, flattened
    like :func:`_flatten`."""
    return torch.cat([spread[n].reshape(spread[n].shape[2], -1) for n in names], -1)


def _block_name(block: tuple[str, torch.Tensor | None]) -> str:
    """``site`` or ``site[g]`` for a block that moves group ``g`` alone."""
    name, mask = block
    return name if mask is None else f"{name}[{int(mask.reshape(-1).nonzero()[0])}]"


def _pick(value: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The chosen particle ``(C, 1, N, *event)`` of a local site's value ``(C, K, N, *event)``."""
    c, n = chosen.shape
    event = value.shape[3:]
    index = chosen.reshape(c, 1, n, *([1] * len(event))).expand(c, 1, n, *event)
    return value.gather(1, index)


def _propose(transform, value: torch.Tensor, step: torch.Tensor | float):
    """A Gaussian random-walk proposal in unconstrained space: ``(u, proposal, u_new)``."""
    u = transform.inv(value.double())
    u_new = u + step * torch.randn_like(u)
    return u, transform(u_new).to(value.dtype), u_new


def _accept(log_alpha: torch.Tensor) -> torch.Tensor:
    """Metropolis acceptance, elementwise (NaN rejects)."""
    log_alpha = torch.nan_to_num(log_alpha, nan=-math.inf)
    return torch.rand_like(log_alpha).log() < log_alpha


def _where(accept: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` where ``accept`` (``(C,)`` per chain or ``(C, N)`` per individual), else
    ``old``; values are ``(C, 1, G or N, *event)``."""
    if accept.dim() == 2:
        accept = accept[:, None]
    return torch.where(accept.reshape(*accept.shape, *([1] * (new.dim() - accept.dim()))), new, old)


def _ladj(transform, u: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``(C, G or N)``: log |det J| of ``transform`` at ``u`` for a site's values ``(C, 1, G or
    N, *event)``, summed over the event dims."""
    ladj = transform.log_abs_det_jacobian(u, value.double())
    ladj = ladj.expand(u.shape) if ladj.shape != u.shape else ladj
    return ladj.reshape(ladj.shape[0], ladj.shape[2], -1).sum(-1)
