r"""The hierarchical importance-weighted objective.

Model: globals :math:`\theta`, group latents :math:`\phi_g`, local latents :math:`z_i`, data
:math:`y_i` of individual :math:`i`. Guide:
:math:`q(\theta)\, q(\phi)\, \prod_i q(z_i \mid y_i, u_i, g_i)`. Because
:math:`\log p(Y \mid \theta, \phi) = \sum_i \log p(y_i \mid \theta, \phi)` and each term has an
importance-weighted (IWAE) lower bound,

.. math::

    \log p(Y) \;\ge\; \mathcal{L}_{S,K} = \frac{1}{S} \sum_{s=1}^{S} \Big[
        \frac{N}{B} \sum_{i \in \text{batch}} \log \frac{1}{K} \sum_{k=1}^{K} w_{sik}
        + \log p(\theta_s, \phi_s) - \log q(\theta_s, \phi_s) \Big],
    \qquad
    w_{sik} = \frac{p(y_i, z_{sik} \mid \theta_s, \phi_s)}{q(z_{sik} \mid y_i)},

with :math:`S` outer draws :math:`(\theta_s, \phi_s) \sim q(\theta, \phi)` and :math:`K` inner
draws :math:`z_{sik} \sim q(z_i \mid y_i)` for every outer draw and individual, and a minibatch of
:math:`B` of the :math:`N` individuals. In expectation it is a lower bound of the log evidence;
with :math:`K = 1` it is the ELBO; as :math:`K \to \infty` each inner term tends to
:math:`\log p(y_i \mid \theta_s, \phi_s)`.

Pyro's ``RenyiELBO(alpha=0)`` instead forms one weight over the whole joint, which degenerates
with many individuals; the reference vi-hds code resampled the globals for every individual and
counted their KL once per individual. Neither is this bound.

Implementation: the model and guide run under two particle plates, an outer plate of size
:math:`S` (every site) and an inner plate of size :math:`K` that only sites inside
``pyro.plate("individuals")`` enter. A local site thus has batch shape ``(S, K, B)`` and a
global one ``(S, 1, 1)``, and one vectorized pass computes every weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.plate_messenger import PlateMessenger
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import Independent, LogNormal, Normal

from pyro_hds.guides import _ExpNormal, _normal_log_density
from pyro_hds.plates import INDIVIDUALS

__all__ = ["IWAE", "LogWeights", "NonFiniteLossError"]

_OUTER = "_pyro_hds_outer_particles"
_INNER = "_pyro_hds_inner_particles"


class NonFiniteLossError(RuntimeError):
    """The objective is not finite; the message names the sites and individuals responsible."""


class _LocalParticles(PlateMessenger):
    """A vectorized particle plate that only sites inside the individuals plate enter."""

    def _process_message(self, msg: Any) -> None:
        if msg["type"] != "sample":
            return
        if not any(f.name == INDIVIDUALS for f in msg["cond_indep_stack"]):
            return
        super()._process_message(msg)

    def _postprocess_message(self, msg: Any) -> None:
        return None


@dataclass
class LogWeights:
    """Per-individual importance weights of one pass of :class:`IWAE`.

    :ivar local: ``(S, K, B)`` log weights :math:`\\log w_{sik}` of the minibatch's individuals
        (``-inf`` for particles whose ODE solution failed).
    :ivar global_terms: ``(S,)`` :math:`\\log p(\\theta_s, \\phi_s) - \\log q(\\theta_s, \\phi_s)`
        plus the log-likelihood of any observed site outside the individuals plate.
    :ivar scale: :math:`N / B`, the minibatch scale of the local terms.
    :ivar model_trace, guide_trace: the traces of the pass (for resampling and prediction).
    :ivar contributions: ``(kind, site, term)`` per sample site with a log-density, ``kind``
        ``"model"`` or ``"guide"``: ``(S, K, B)`` for a site in the individuals plate (the
        guide's with a minus sign), ``(S,)`` summed for one outside it.
    :ivar outer_elements: per model site outside the individuals plate, its terms before
        that sum, ``(S, E)`` with ``E`` the product of its plate sizes (the groups, or 1).
    """

    local: torch.Tensor
    global_terms: torch.Tensor
    scale: float
    model_trace: Any = None
    guide_trace: Any = None
    contributions: tuple = ()
    outer_elements: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nonfinite_global_sites(self) -> tuple[str, ...]:
        """Sites outside the individuals plate whose log-density term is not finite."""
        return tuple(
            f"{kind} site {name!r}"
            for kind, name, term in self.contributions
            if term.dim() == 1 and not bool(torch.isfinite(term).all())
        )

    @property
    def inner(self) -> torch.Tensor:
        """``(S, B)`` inner bounds :math:`\\log \\frac1K \\sum_k w_{sik}`."""
        k = self.local.shape[1]
        return torch.logsumexp(self.local, dim=1) - math.log(k)

    @property
    def bound(self) -> torch.Tensor:
        """The scalar estimate :math:`\\mathcal{L}_{S,K}` of the module docstring."""
        return (self.scale * self.inner.sum(-1) + self.global_terms).mean()


def _local_frame(site: dict) -> Any:
    for frame in site["cond_indep_stack"]:
        if frame.name == INDIVIDUALS:
            return frame
    return None


def _detach_distribution(d: Any) -> Any:
    """The same distribution with its parameters detached (for DReG's stop-gradient on q)."""
    import pyro.distributions as dist
    from torch.distributions import Independent, TransformedDistribution

    if isinstance(d, TransformedDistribution) and type(d) in (
        TransformedDistribution,
        dist.TransformedDistribution,
    ):
        return dist.TransformedDistribution(_detach_distribution(d.base_dist), d.transforms)
    if isinstance(d, Independent):
        return dist.Independent(_detach_distribution(d.base_dist), d.reinterpreted_batch_ndims)
    if isinstance(d, dist.MaskedDistribution):
        return dist.MaskedDistribution(_detach_distribution(d.base_dist), d._mask)
    if isinstance(d, dist.ExpandedDistribution):
        return _detach_distribution(d.base_dist).expand(d.batch_shape)
    names = list(getattr(d, "arg_constraints", {}))
    args = {n: d.__dict__.get(n) for n in names}
    if names and all(isinstance(v, torch.Tensor) for v in args.values()):
        return type(d)(**{n: v.detach() for n, v in args.items()})  # type: ignore[union-attr]
    raise ValueError(
        f"IWAE(dreg=True) cannot detach the parameters of a guide distribution of type "
        f"{type(d).__name__}; use a guide whose local sites are (transformed, independent) "
        "parametric distributions such as AmortizedGuide, or dreg=False."
    )


def _gaussian_parts(fn: Any) -> tuple[bool, torch.Tensor, torch.Tensor] | None:
    """``(log_space, loc, scale)`` when ``fn``, inside any ``Independent`` wrappers, is a
    normal (``log_space`` False) or a log-normal (torch's or pyro's ``LogNormal``, or the
    guide's written-out one; ``log_space`` True); else None."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    if type(fn) in (Normal, dist.Normal):
        return False, fn.loc, fn.scale
    if type(fn) in (LogNormal, dist.LogNormal) and type(fn.base_dist) in (Normal, dist.Normal):
        return True, fn.base_dist.loc, fn.base_dist.scale
    if type(fn) is _ExpNormal:
        return True, fn.loc, fn.scale
    return None


def _grouped_log_densities(
    members: list[tuple[str, bool, torch.Tensor, torch.Tensor, torch.Tensor, int]],
    s: int,
    log_space: bool,
) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    r"""The log-densities of several global sites of one trace, all normal
    (``log_space=False``) or all log-normal, in one pass, with the formula of torch's
    ``Normal.log_prob`` (:func:`~pyro_hds.guides._normal_log_density`; for a log-normal at
    :math:`u = \log x`, less the log-Jacobian :math:`u`).

    ``members``: ``(name, log_space, value, loc, scale, batch_numel)`` with ``value`` of
    shape ``(S, ...)``. Every site's value, loc and scale are flattened to ``(S, n_i)`` and
    joined, so the arithmetic and its gradient are a few operations for all sites, where
    ``fn.log_prob`` per site costs a dozen small operations (and as many backward nodes)
    each. Returns the ``(S,)`` sum over all sites and ``(name, (S, E_i))`` per site: its
    log-density summed over its event dims, ``E_i`` the product of its batch dims after the
    first."""
    values = [value.reshape(s, -1) for _, _, value, _, _, _ in members]
    x = torch.cat(values, -1)
    loc = torch.cat([m[3].expand(m[2].shape).reshape(s, -1) for m in members], -1)
    scale = torch.cat([m[4].expand(m[2].shape).reshape(s, -1) for m in members], -1)
    u = x.log() if log_space else x
    lp = _normal_log_density(u, loc, scale)
    if log_space:
        lp = lp - u
    out, start = [], 0
    for (name, _, _, _, _, batch), v in zip(members, values):
        width = v.shape[-1]
        piece = lp.narrow(-1, start, width).reshape(s, batch, width // batch).sum(-1)
        out.append((name, piece))
        start += width
    return lp.sum(-1), out


class IWAE(ELBO):
    r"""The hierarchical importance-weighted bound (see the module docstring for the math).

    :param num_particles: :math:`K`, inner importance samples of the local latents per
        individual and outer draw.
    :param num_outer_particles: :math:`S`, draws of the global and group latents.
    :param dreg: use the doubly reparameterized gradient estimator (Tucker et al., 2019) for
        the parameters of the local guide (the encoder): the score-function term of
        :math:`\log q` is dropped and the reparameterization path is weighted by the squared
        normalized weights :math:`\tilde w_k^2`. Model parameters and global guide parameters
        keep the ordinary IWAE gradient. Needs reparameterizable local guide sites whose
        parameters can be detached (the guides of pyro_hds qualify).
    :param max_plate_nesting: as in Pyro; guessed from a trace of the model and guide if None.

    Usage follows Pyro: ``SVI(model, guide, optim, loss=IWAE(num_particles=100))`` or
    :func:`pyro_hds.fit`. :meth:`log_weights` returns the per-individual weights of one pass,
    which :class:`~pyro_hds.FitResult` uses for resampling, held-out bounds and diagnostics.

    A particle whose ODE solution failed (``ode()`` reports a non-SUCCESS status) gets weight
    zero. The loss raises :class:`NonFiniteLossError`, naming the sites and individuals, when a
    log-density is NaN or :math:`+\infty` for any other reason, or when no particle of some
    individual survives.
    """

    def __init__(
        self,
        num_particles: int = 10,
        num_outer_particles: int = 1,
        *,
        dreg: bool = False,
        max_plate_nesting: float = float("inf"),
    ) -> None:
        if int(num_particles) != num_particles or num_particles < 1:
            raise ValueError(f"IWAE: num_particles must be a positive int, got {num_particles!r}")
        if int(num_outer_particles) != num_outer_particles or num_outer_particles < 1:
            raise ValueError(
                f"IWAE: num_outer_particles must be a positive int, got {num_outer_particles!r}"
            )
        super().__init__(
            num_particles=int(num_particles),
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=False,  # IWAE adds its own particle plates in _wrap
        )
        self.num_outer_particles = int(num_outer_particles)
        self.dreg = bool(dreg)

    # -- traces -------------------------------------------------------------------------------

    def _nesting(self, model, guide, args, kwargs) -> int:
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        nesting = int(self.max_plate_nesting)
        return max(nesting, 1)

    def _wrap(self, fn, nesting: int):
        s, k = self.num_outer_particles, self.num_particles

        def wrapped(*args, **kwargs):
            with pyro.plate(_OUTER, s, dim=-(nesting + 2)):
                with _LocalParticles(_INNER, k, dim=-(nesting + 1)):
                    return fn(*args, **kwargs)

        return wrapped

    def _traces(self, model, guide, args, kwargs):
        nesting = self._nesting(model, guide, args, kwargs)
        guide_trace = poutine.trace(self._wrap(guide, nesting)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(
            poutine.replay(self._wrap(model, nesting), trace=guide_trace)
        ).get_trace(*args, **kwargs)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        if is_validation_enabled():
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample" and not site["is_observed"]:
                    if not getattr(site["fn"], "has_rsample", False):
                        raise ValueError(
                            f"IWAE: guide site {name!r} is not reparameterizable "
                            f"({type(site['fn']).__name__}); the importance-weighted bound "
                            "needs reparameterized guide samples."
                        )
        return model_trace, guide_trace, nesting

    # -- weights ------------------------------------------------------------------------------

    def log_weights(self, model, guide, *args, **kwargs) -> LogWeights:
        """Run one vectorized pass and return its :class:`LogWeights`."""
        model_trace, guide_trace, nesting = self._traces(model, guide, args, kwargs)
        return self._weights(model_trace, guide_trace, nesting, args)

    def _weights(
        self, model_trace, guide_trace, nesting: int, args, include_guide: bool = True
    ) -> LogWeights:
        s, k = self.num_outer_particles, self.num_particles
        full_dims = nesting + 2
        local: torch.Tensor | None = None
        global_terms: torch.Tensor | None = None
        scale: float | None = None
        failed_local: torch.Tensor | None = None
        failed_global: torch.Tensor | None = None
        contributions: list[tuple[str, str, torch.Tensor]] = []
        outer_elements: dict[str, torch.Tensor] = {}

        def to_full(x: torch.Tensor) -> torch.Tensor:
            if x.dim() > full_dims:
                raise ValueError(
                    f"IWAE: a log-density has shape {tuple(x.shape)}, more batch dims than "
                    f"max_plate_nesting={nesting} allows; set max_plate_nesting."
                )
            return x.reshape((1,) * (full_dims - x.dim()) + tuple(x.shape))

        def reduce_local(x: torch.Tensor, frame) -> torch.Tensor:
            x = to_full(x)
            ind = frame.dim  # negative, within the plate dims
            other = [d for d in range(-nesting, 0) if d != ind]
            if other:
                x = x.sum(other, keepdim=True)
            x = x.movedim(ind, -1).reshape(x.shape[0], x.shape[1], x.shape[ind])
            return x.expand(s, k, frame.size)

        sides = [(model_trace, 1.0, "model"), (guide_trace, -1.0, "guide")]
        # without validation (fit's training loop, after its whole-data check) the normal and
        # log-normal global sites of each trace are evaluated together (_grouped_log_densities)
        grouping = not is_validation_enabled()
        # include_guide=False: the model's terms alone (what a Metropolis ratio needs)
        for trace, sign, kind in sides if include_guide else sides[:1]:
            grouped: list[tuple[str, bool, torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
            slots: dict[str, int] = {}
            for name, site in trace.nodes.items():
                if site["type"] != "sample":
                    continue
                frame = _local_frame(site)
                if site["infer"].get("_deterministic"):
                    status = site["infer"].get("ode_status")
                    if status is not None and kind == "model":
                        bad = torch.as_tensor(status) != 0
                        if frame is not None:
                            bad_full = reduce_local(bad.to(torch.int64), frame) > 0
                            failed_local = (
                                bad_full if failed_local is None else failed_local | bad_full
                            )
                        else:
                            full = to_full(bad)
                            g = full.reshape(full.shape[0], -1).any(-1).expand(s)
                            failed_global = g if failed_global is None else failed_global | g
                    continue
                if kind == "guide" and site["is_observed"]:
                    continue
                fn = site["fn"]
                if self.dreg and kind == "guide" and frame is not None:
                    if site["infer"].get("conditional_guide"):
                        raise ValueError(
                            f"IWAE(dreg=True): the guide's local site {name!r} is drawn "
                            "conditionally on other local sites (AmortizedGuide's "
                            "local_covariance='full'), whose stop-gradient form DReG does not "
                            "support; use AmortizedGuide(model, local_covariance='diagonal') "
                            "with dreg=True, or dreg=False."
                        )
                    fn = _detach_distribution(fn)
                if grouping and frame is None and site["mask"] is None:
                    member = self._group_member(name, site, fn, s, full_dims)
                    if member is not None:
                        grouped.append(member)
                        slots[name] = len(contributions)
                        contributions.append((kind, name, member[2]))  # filled in below
                        continue
                # the plate scale of local sites is applied after the inner logsumexp
                lp = scale_and_mask(
                    fn.log_prob(site["value"], *site["args"], **site["kwargs"]),
                    1.0 if frame is not None else site["scale"],
                    site["mask"],
                )
                if frame is not None:
                    site_scale = site["scale"]
                    if isinstance(site_scale, torch.Tensor) and site_scale.numel() > 1:
                        raise ValueError(
                            f"IWAE: site {name!r} has a per-element scale; only the minibatch "
                            "scale of the individuals plate is supported for local sites."
                        )
                    site_scale = float(site_scale)
                    if scale is None:
                        scale = site_scale
                    elif not math.isclose(scale, site_scale, rel_tol=1e-6):
                        raise ValueError(
                            f"IWAE: local site {name!r} has scale {site_scale}, another local "
                            f"site {scale}; all sites in the individuals plate must share the "
                            "minibatch scale."
                        )
                    term = sign * reduce_local(lp, frame)
                    local = term if local is None else local + term
                    contributions.append((kind, name, term))
                else:
                    x = to_full(lp)
                    x = x.reshape(x.shape[0], -1)
                    if kind == "model":
                        outer_elements[name] = x.expand(s, x.shape[1])
                    x = x.sum(-1).expand(s)
                    term = sign * x
                    global_terms = term if global_terms is None else global_terms + term
                    contributions.append((kind, name, term))
            for log_space in (False, True):  # the normal sites, then the log-normal ones
                family = [m for m in grouped if m[1] == log_space]
                if not family:
                    continue
                total, pieces = _grouped_log_densities(family, s, log_space)
                term = sign * total
                global_terms = term if global_terms is None else global_terms + term
                for name, piece in pieces:
                    if kind == "model":
                        outer_elements[name] = piece
                    contributions[slots[name]] = (kind, name, sign * piece.sum(-1))

        ref = next(iter(t for _, _, t in contributions), None)
        if ref is None:
            raise ValueError("IWAE: the model has no sample sites with a log-density.")
        if local is None:
            local = ref.new_zeros(s, k, 1)
            scale = 1.0
        if global_terms is None:
            global_terms = ref.new_zeros(s)
        assert scale is not None

        ok = torch.ones_like(local, dtype=torch.bool)
        if failed_local is not None:
            ok = ok & ~failed_local
        bad = ~torch.isfinite(local) & ~torch.isneginf(local) & ok
        if bool(bad.any()):
            raise NonFiniteLossError(self._explain(contributions, bad, args))
        local = torch.where(ok, local, local.new_full((), -math.inf))
        if failed_global is not None:
            global_terms = torch.where(
                failed_global, global_terms.new_full((), -math.inf), global_terms
            )
        return LogWeights(
            local,
            global_terms,
            scale,
            model_trace,
            guide_trace,
            tuple(contributions),
            outer_elements,
        )

    @staticmethod
    def _group_member(name: str, site: dict, fn: Any, s: int, full_dims: int):
        """The entry of :func:`_grouped_log_densities` for a global site, or None when the
        site needs its own ``fn.log_prob``: a distribution other than a (log-)normal, a plate
        scale other than 1, or a batch shape other than ``(S, ...)`` with ``full_dims``
        dims (a site outside the particle plates)."""
        scale = site["scale"]
        if isinstance(scale, torch.Tensor) or scale != 1.0:
            return None
        parts = _gaussian_parts(fn)
        if parts is None:
            return None
        batch = tuple(fn.batch_shape)
        value = site["value"]
        if len(batch) != full_dims or batch[0] != s or tuple(value.shape[: len(batch)]) != batch:
            return None
        log_space, loc, scale_ = parts
        return name, log_space, value, loc, scale_, math.prod(batch[1:])

    @staticmethod
    def _explain(contributions, bad: torch.Tensor, args) -> str:
        ids = _individual_ids(args)
        lines = ["IWAE: non-finite log-density (NaN or +inf) in these sites:"]
        for kind, name, term in contributions:
            if term.dim() == 3:
                nonfinite = (~torch.isfinite(term) & ~torch.isneginf(term)) & bad
                if bool(nonfinite.any()):
                    which = nonfinite.any(0).any(0).nonzero().flatten().tolist()
                    shown = [ids[i] if ids is not None else str(i) for i in which[:10]]
                    more = "" if len(which) <= 10 else f" and {len(which) - 10} more"
                    lines.append(f"  {kind} site {name!r}, individuals {', '.join(shown)}{more}")
        lines.append(
            "Check the priors' supports and parameter constraints of these sites; an ODE that "
            "diverges should be reported through ode()'s status, which gives zero weight."
        )
        return "\n".join(lines)

    def _get_trace(self, model, guide, args, kwargs):
        """One (model_trace, guide_trace) pair of the vectorized pass (Pyro's ELBO hook)."""
        model_trace, guide_trace, _ = self._traces(model, guide, args, kwargs)
        return model_trace, guide_trace

    # -- Pyro objective interface -------------------------------------------------------------

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative bound :math:`-\\mathcal{L}_{S,K}`, differentiable."""
        weights = self.log_weights(model, guide, *args, **kwargs)
        inner = weights.inner  # (S, B)
        dead = torch.isneginf(inner)
        if bool(dead.any()):
            ids = _individual_ids(args)
            which = dead.any(0).nonzero().flatten().tolist()
            shown = [ids[i] if ids is not None else str(i) for i in which[:10]]
            raise NonFiniteLossError(
                "IWAE: no particle survived for individuals "
                f"{', '.join(shown)}{'' if len(which) <= 10 else ' ...'}: every ODE solution "
                "failed or had zero likelihood. Check the priors and initial guide scale for "
                "these individuals, use a more robust solver (e.g. Dopri5), or more particles."
            )
        if self.dreg:
            self._register_dreg_hooks(weights)
        bound = weights.bound
        if not torch.isfinite(bound):
            where = ", ".join(weights.nonfinite_global_sites) or "no site (an ODE outside "
            where += "" if weights.nonfinite_global_sites else "the individuals plate failed)"
            raise NonFiniteLossError(
                f"IWAE: the bound is not finite; non-finite log-densities outside the "
                f"individuals plate at: {where}. Check these sites' priors, supports and "
                "observed values."
            )
        return -bound

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            weights = self.log_weights(model, guide, *args, **kwargs)
            return -float(weights.bound)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())

    def _register_dreg_hooks(self, weights: LogWeights) -> None:
        # normalized weights over the K inner particles, (S, K, B)
        w = torch.softmax(weights.local.detach(), dim=1)
        for site in weights.guide_trace.nodes.values():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            frame = _local_frame(site)
            if frame is None:
                continue
            value = site["value"]
            if not value.requires_grad:
                continue
            event_dim = site["fn"].event_dim
            batch = value.shape[: value.dim() - event_dim]
            factor = _broadcast_weights(w, batch, frame.dim).reshape(
                tuple(batch) + (1,) * event_dim
            )
            value.register_hook(lambda g, f=factor: g * f)


def _broadcast_weights(w: torch.Tensor, batch: torch.Size, ind_dim: int) -> torch.Tensor:
    """Arrange ``(S, K, B)`` weights to a local site's batch shape ``(S, K, <plates>)``."""
    s, k, b = w.shape
    n = len(batch)
    view = [s, k] + [1] * (n - 2)
    view[n + ind_dim] = b
    return w.reshape(view).expand(tuple(batch))


def _individual_ids(args) -> list[str] | None:
    data = args[0] if args else None
    ids = getattr(data, "individual_ids", None)
    if ids is None:
        return None
    return [str(i) for i in ids]
