r"""The amortized guide for hierarchical models.

:class:`AmortizedGuide` traces the model once and sorts its latent sites by plate:

* global sites (no plate): :math:`q(\theta) = \mathcal N(\mu, \operatorname{diag}\sigma^2)` in
  the unconstrained space of each site, mapped to its support by ``biject_to``;
* group sites (``pyro.plate("groups", G)``): one mean-field Gaussian per group; when the data
  describe groups by features :math:`f_g` (e.g. the components a device is built from), the
  mean is :math:`\mu_g + W f_g` with a bias-free :math:`W`, so a group never seen in training
  but built from known components gets :math:`W f_g`;
* local sites (``pyro.plate("individuals", N)``): an encoder network reads each individual's
  series and the guide's heads map :math:`x_i = [\mathrm{enc}(y_i), \tilde u_i, g_i]` (encoder
  features, inputs :math:`\tilde u = \operatorname{sign}(u) \log(1 + |u|)`, and the group's
  one-hot code or features) to :math:`q(z_i \mid y_i) = \mathcal N(A x_i + a,
  \operatorname{diag} \operatorname{softplus}(B x_i + b)^2)` in unconstrained space.

The log-density of every sampled value is the exact density of the constrained value (the
Gaussian density plus the log-Jacobian of the bijection), as the importance weights of
:class:`~pyro_hds.IWAE` require.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from torch import nn
from torch.distributions import biject_to, constraints
from torch.distributions.utils import broadcast_all

from pyro_hds.encoders import ConvEncoder, Encoder, MaskedEncoder, make_encoder
from pyro_hds.plates import GROUPS, INDIVIDUALS, groups, individuals

__all__ = ["AmortizedGuide", "init_to_prior_median"]


_HALF_LOG_TWO_PI = math.log(math.sqrt(2 * math.pi))


def _normal_log_density(u: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r""":math:`\log N(u; \mu, \sigma^2)` elementwise, with the operations of torch's
    ``Normal.log_prob`` (so the same bits): the guide's log-normal and the objective's
    grouped global sites (``pyro_hds.objectives``) both use it."""
    return -((u - loc) ** 2) / (2 * scale**2) - scale.log() - _HALF_LOG_TWO_PI


class _ExpNormal(dist.TorchDistribution):
    r"""The log-normal: :math:`\exp(u)` with :math:`u \sim N(\mu, \sigma^2)`, density

    .. math:: \log q(x) = \log N(\log x;\, \mu, \sigma^2) - \log x,

    what ``TransformedDistribution(Normal(loc, scale), ExpTransform())`` computes, written out.
    The guide builds one per positive site and step; torch's transformed distribution
    recomputes its transforms' domains and codomains in every construction, ``expand`` and
    ``log_prob`` (several hundred Python calls per step of the double-receiver model), which
    took about a tenth of a training step there (measured by alternating the two from step to
    step in one fit). Same draws and, elementwise, the same bits as the transformed
    distribution for the same generator state: ``exp(loc + eps * scale)`` and
    ``log N(log x) - log x``."""

    arg_constraints: ClassVar = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.positive
    has_rsample = True

    def __init__(self, loc: Any, scale: Any, validate_args=None) -> None:
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(_ExpNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(_ExpNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.distributions.utils._standard_normal(
            shape, dtype=self.loc.dtype, device=self.loc.device
        )
        return torch.exp(self.loc + eps * self.scale)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        u = value.log()
        return _normal_log_density(u, self.loc, self.scale) - u

    @property
    def mean(self) -> torch.Tensor:
        return (self.loc + self.scale**2 / 2).exp()

    @property
    def variance(self) -> torch.Tensor:
        s2 = self.scale**2
        return s2.expm1() * (2 * self.loc + s2).exp()


def _is_exp(transform: Any) -> bool:
    """Whether ``transform`` is ``exp`` elementwise: ``biject_to`` of a positive support, which
    for ``constraints.positive`` (a ``greater_than(0)``) is ``exp`` followed by ``x * 1 + 0``
    (exactly ``exp``)."""
    T = torch.distributions.transforms
    if isinstance(transform, T.IndependentTransform):
        transform = transform.base_transform
    if isinstance(transform, T.ComposeTransform) and len(transform.parts) == 2:
        first, second = transform.parts
        if not (
            isinstance(second, T.AffineTransform)
            and _equals(second.loc, 0.0)
            and _equals(second.scale, 1.0)
        ):
            return False
        transform = first
    return type(transform) is T.ExpTransform


def _equals(value: Any, number: float) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and float(value) == number
    return float(value) == number


def _unwrap(fn: Any) -> Any:
    """The elementwise distribution inside ``Independent``, expanded and masked wrappers."""
    while isinstance(
        fn,
        dist.Independent
        | dist.ExpandedDistribution
        | dist.MaskedDistribution
        | torch.distributions.Independent,
    ):
        fn = fn.base_dist
    return fn


def init_to_prior_median(site: dict | None = None, num_samples: int = 15):
    r"""Initial value of a latent site: the exact median of its prior,
    :math:`F^{-1}(1/2)` elementwise, wherever the distribution has an inverse CDF (Normal,
    LogNormal, Cauchy, Laplace, Uniform, Exponential, HalfNormal, ... also inside
    ``Independent`` and ``expand``); else, as Pyro's ``init_to_median``, the median of
    ``num_samples`` prior draws.

    The sampled median is noisy for wide priors: the median of 15 draws of LogNormal(-12, 3)
    has a standard error of about one unit of the log (1.25 * 3 / sqrt(15)), so a rate started
    there sits anywhere from e times below to e times above the prior's centre, and which one
    depends on the seed. The exact median is what the vi-hds reference initialises its global
    parameters to; on its plate-reader model it gave a better held-out bound after 10 epochs
    than the sampled median for three of four seeds, -307 against -726 nats per well on
    average (``benchmarks/vihds_early.py``, docs/vihds.md).

    The default of :class:`~pyro_hds.AmortizedGuide`; works with any Pyro autoguide too
    (``init_loc_fn=init_to_prior_median``).
    """
    if site is None:
        return functools.partial(init_to_prior_median, num_samples=num_samples)
    fn = site["fn"]
    base = _unwrap(fn)
    shape = fn.batch_shape + fn.event_shape
    if not base.event_shape:
        try:
            try:  # only for the dtype and device: no random draw where the mean is known
                like = base.mean
            except NotImplementedError:
                like = fn.sample()
            half = torch.full(base.batch_shape, 0.5, dtype=like.dtype, device=like.device)
            value = base.icdf(half).expand(shape).clone()
        except (NotImplementedError, AttributeError, RuntimeError, ValueError):
            value = None
        if value is not None and bool(torch.isfinite(value).all()):
            if bool(fn.support.check(value).all()):
                return value
    return init_to_median(site, num_samples=num_samples)


_DEFAULT_INIT = init_to_prior_median


def _inv_softplus(x: float) -> float:
    return math.log(math.expm1(x))


def _fingerprints(data: Any) -> torch.Tensor:
    """``(N,)`` float64: a weighted sum of each individual's observed values and times, which
    tells apart two individuals with the same id but different data."""
    obs = torch.where(data.mask, data.observations, torch.zeros_like(data.observations))
    obs = obs.detach().to("cpu", torch.float64)
    t, c = obs.shape[-2], obs.shape[-1]
    w = torch.cos(1.0 + 0.7 * torch.arange(t * c, dtype=torch.float64)).reshape(t, c)
    times = data.times.detach().to("cpu", torch.float64)
    times = times.reshape(-1, times.shape[-1]).sum(-1)
    return (obs * w).sum((-2, -1)) + 1e-3 * times


def _transform_inputs(u: torch.Tensor) -> torch.Tensor:
    return torch.sign(u) * torch.log1p(u.abs())


class AmortizedGuide(AutoGuide):
    r"""An ``AutoGuide`` with mean-field globals and group latents and amortized locals.

    :param model: the Pyro model, ``model(data)``.
    :param encoder: an :class:`~pyro_hds.Encoder`; by default a :class:`ConvEncoder` for data
        on a shared grid without missing values, else a :class:`MaskedEncoder`.
    :param init_scale: initial posterior standard deviation (unconstrained space).
    :param use_group_features: feed ``data.group_features`` (when present) to the local heads
        and the group means instead of one-hot group codes.
    :param init_loc_fn: initial locations, as in Pyro's autoguides; by default
        :func:`init_to_prior_median`, each prior's exact median where it has one.
    :param local_covariance: ``"diagonal"`` (default): mean-field locals, as in vi-hds.
        ``"full"``: each individual's local latents, all sites together, get a full-covariance
        Gaussian in unconstrained space, written in
        regression form: with :math:`u_j` the unconstrained value of local dimension
        :math:`j` (sites in model order, dimensions flattened),

        .. math::

            u_j \mid u_{<j} \sim \mathcal N\big(\mu_j + \textstyle\sum_{i<j}
            B_{ji} (u_i - \mu_i),\; s_j^2\big),

        where the encoder's heads give :math:`\mu, s` and an extra head the strictly lower
        triangular :math:`B` per individual (any Gaussian has this form; :math:`B = 0` is the
        mean-field case, where the extra head starts). Posterior correlations between local
        parameters (clearance and volume, say) are common and a mean-field guide misses them.
        Not compatible with ``IWAE(dreg=True)``.
    :param semi_amortized: give every training individual :math:`i` its own free correction
        :math:`(\delta_i, \epsilon_i)` to the encoder's output,

        .. math::

            q(z_i \mid y_i) = \mathcal N\big(A x_i + a + \delta_i,\;
            \operatorname{diag} \operatorname{softplus}(B x_i + b + \epsilon_i)^2\big),

        one vector of twice the local dimension per individual, zero at the start. An encoder cannot
        fit every individual's posterior exactly (the *amortization gap*, Cremer, Li and Duvenaud,
        2018), and the gap shrinks as the noise grows, so the importance-weighted bound, maximised
        over the globals, prefers a too large noise scale (in the population-PK example of
        ``tests/test_recovery.py``: 0.122 for a true 0.1 with the encoder alone; 0.1085 with the
        corrections, so they remove most of that bias, not all of it, and in the demo's MLP-encoder
        setting they did not help). Training (:meth:`training_phase`, called by
        :func:`pyro_hds.fit`) runs in two phases: first everything but the corrections (the encoder
        learns as in a purely amortized fit), then, for the last ``refine_fraction`` of the steps,
        the corrections with the globals while the encoder and its heads stay fixed. (Training both
        at once lets the corrections absorb what the encoder should learn and leaves a worse encoder
        for new individuals.) Individuals the fit has not seen (``predict``, held-out bounds) get
        the encoder's output. An individual counts as seen when its id and its observations match a
        training individual's; ``fit`` tells the guide its training data
        (:meth:`attach_training_data`). This follows the idea of semi-amortized inference (Kim et
        al., 2018; Krishnan, Liang and Hoffman, 2018), with the per-individual refinement learned
        jointly with the population parameters.
    :param refine_fraction: the share of the fit's steps spent on the corrections.
    """

    def __init__(
        self,
        model,
        encoder: Encoder | None = None,
        *,
        init_scale: float = 0.1,
        use_group_features: bool = True,
        init_loc_fn=_DEFAULT_INIT,
        name: str = "AmortizedGuide",
        local_covariance: str = "diagonal",
        semi_amortized: bool = False,
        refine_fraction: float = 0.5,
    ) -> None:
        if not init_scale > 0:
            raise ValueError(f"AmortizedGuide(init_scale={init_scale}): must be positive")
        if local_covariance not in ("full", "diagonal"):
            raise ValueError(
                f"AmortizedGuide(local_covariance={local_covariance!r}): use 'full' or 'diagonal'"
            )
        if not 0.0 < refine_fraction < 1.0:
            raise ValueError(f"AmortizedGuide(refine_fraction={refine_fraction}): use 0 < f < 1")
        if semi_amortized and local_covariance == "full":
            raise ValueError(
                "AmortizedGuide: semi_amortized=True works with local_covariance='diagonal' only"
            )
        self.local_covariance = local_covariance
        self.semi_amortized = bool(semi_amortized)
        self._train_rows: dict[Any, int] | None = None
        self._train_prints: torch.Tensor | None = None
        self.refine_fraction = float(refine_fraction)
        # None: encoder and corrections learn together (training outside fit); False / True:
        # fit's first / second phase (see training_phase)
        self._refining: bool | None = None
        super().__init__(InitMessenger(init_loc_fn)(model), create_plates=None)
        self.init_loc_fn = init_loc_fn
        self.init_scale = float(init_scale)
        self.use_group_features = bool(use_group_features)
        self._given_encoder = [encoder]  # a list: not registered as a submodule
        self.coef_heads: nn.ModuleDict | None = None
        self._last_coefs: dict[str, torch.Tensor] = {}
        self._prefix = name
        self.levels: dict[str, str] = {}
        self._shapes: dict[str, torch.Size] = {}
        self._supports: dict[str, Any] = {}
        # per site, made once at set-up: the bijection to its support and whether it is exp
        self._transforms: dict[str, Any] = {}
        self._positive: set[str] = set()

    # -- setup --------------------------------------------------------------------------------

    def attach_training_data(self, data: Any) -> None:
        """Tell a ``semi_amortized`` guide which individuals it is trained on (all of them, not
        a minibatch); :func:`pyro_hds.fit` and :func:`pyro_hds.load` call it. Other guides
        ignore it."""
        if not self.semi_amortized:
            return
        if self._train_rows is not None and len(self._train_rows) != len(data):
            raise ValueError(
                f"AmortizedGuide(semi_amortized=True) was trained on {len(self._train_rows)} "
                f"individuals; it cannot be attached to a data set of {len(data)}"
            )
        self._train_rows = {ind: i for i, ind in enumerate(data.individual_ids)}
        self._train_prints = _fingerprints(data)

    def training_phase(self, step: int, num_steps: int) -> None:
        """Called by :func:`pyro_hds.fit` before every step. A ``semi_amortized`` guide first
        trains everything but its corrections (the encoder learns as in a purely amortized
        fit); for the last ``refine_fraction`` of the steps it keeps the encoder and its heads
        fixed and trains the corrections (with the globals and group latents). The parts that
        wait get no gradient (their outputs are detached), so the optimizer leaves them as they
        are. Outside :func:`pyro_hds.fit` (no calls), both learn together from the start."""
        if not self.semi_amortized or self.heads is None or self.encoder is None:
            return
        self._refining = step >= round(num_steps * (1.0 - self.refine_fraction))

    def _training_rows(self, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, seen)``: each individual's row among the training individuals and whether
        it is one of them (same id and the same observations)."""
        assert self._train_rows is not None and self._train_prints is not None
        rows = torch.tensor([self._train_rows.get(i, -1) for i in data.individual_ids])
        seen = rows >= 0
        rows = rows.clamp(min=0)
        prints = _fingerprints(data)
        stored = self._train_prints[rows]
        seen &= torch.isclose(prints, stored, rtol=1e-9, atol=1e-12)
        device = data.observations.device
        return rows.to(device), seen.to(device)

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        data = args[0] if args else None
        prefix = self._prefix
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if site["infer"].get("_deterministic"):
                continue
            plates = [f.name for f in site["cond_indep_stack"] if f.vectorized]
            unknown = [p for p in plates if p not in (INDIVIDUALS, GROUPS)]
            if unknown or len(plates) > 1:
                raise ValueError(
                    f"AmortizedGuide: latent site {name!r} is in plate(s) {plates}; sites must "
                    f"be global (no plate), in plate {GROUPS!r} or in plate {INDIVIDUALS!r}"
                )
            level = "global"
            if plates:
                level = "local" if plates[0] == INDIVIDUALS else "group"
            support = site["fn"].support
            transform = biject_to(support)
            value = site["value"].detach()
            u = transform.inv(value)
            batch_ndim = 1 if level != "global" else 0
            if level != "global" and (u.dim() < 1 or site["fn"].batch_shape[-1:] != u.shape[:1]):
                raise ValueError(
                    f"AmortizedGuide: site {name!r} in plate {plates[0]!r} must have its plate "
                    f"at dim -1; its batch shape is {tuple(site['fn'].batch_shape)}"
                )
            self.levels[name] = level
            self._supports[name] = support
            self._transforms[name] = transform
            if _is_exp(transform):
                self._positive.add(name)
            self._shapes[name] = u.shape[batch_ndim:]
            if level in ("global", "group"):  # group params carry a leading (G,) dim
                pyro.param(f"{prefix}.{name}.loc", u.clone())
                pyro.param(
                    f"{prefix}.{name}.scale",
                    torch.full_like(u, self.init_scale),
                    constraint=constraints.positive,
                )
            else:
                self._local_init = getattr(self, "_local_init", {})
                self._local_init[name] = u.mean(0)
        self._group_names = tuple(getattr(data, "group_names", ()))
        self._build_networks(data)

    def _build_networks(self, data: Any) -> None:
        locals_ = [n for n, lv in self.levels.items() if lv == "local"]
        groups_ = [n for n, lv in self.levels.items() if lv == "group"]
        self._has_features = bool(
            self.use_group_features and getattr(data, "group_features", None) is not None
        )
        if not locals_ and not (groups_ and self._has_features):
            self.encoder = None
            self.heads = None
            self.group_maps = None
            return
        dtype = data.observations.dtype
        device = data.observations.device
        if locals_:
            encoder = self._given_encoder[0]
            if encoder is None:
                regular = bool(data.shared_times) and bool(data.mask.all())
                if regular and data.num_times >= 3:
                    encoder = ConvEncoder(data.num_times, data.num_channels)
                else:
                    encoder = MaskedEncoder(data.num_channels)
            self.encoder = encoder.to(device=device, dtype=dtype)
            in_dim = self.encoder.out_features + data.num_inputs + self._group_dim(data)
            heads = {}
            for name in locals_:
                size = max(1, math.prod(self._shapes[name]))
                head = nn.Linear(in_dim, 2 * size).to(device=device, dtype=dtype)
                with torch.no_grad():
                    head.weight.mul_(0.1)
                    head.bias[:size] = self._local_init[name].reshape(-1).to(head.bias)
                    head.bias[size:] = _inv_softplus(self.init_scale)
                heads[name] = head
            self.heads = nn.ModuleDict(heads)
            if self.semi_amortized:
                if self._train_rows is None:
                    if len(data) != int(getattr(data, "total_size", len(data))):
                        raise ValueError(
                            "AmortizedGuide(semi_amortized=True) first ran on a minibatch; it "
                            "needs all training individuals: call "
                            "guide.attach_training_data(data) first, or train with "
                            "pyro_hds.fit, which does"
                        )
                    self.attach_training_data(data)
                assert self._train_rows is not None
                for name in locals_:
                    size = max(1, math.prod(self._shapes[name]))
                    pyro.param(
                        f"{self._prefix}.{name}.corrections",
                        torch.zeros(len(self._train_rows), 2 * size, dtype=dtype, device=device),
                    )
            self.coef_heads = None
            if self.local_covariance == "full":
                coefs, before = {}, 0
                for name in locals_:
                    size = max(1, math.prod(self._shapes[name]))
                    if before:
                        lin = nn.Linear(in_dim, size * before).to(device=device, dtype=dtype)
                        nn.init.zeros_(lin.weight)
                        nn.init.zeros_(lin.bias)
                        coefs[name] = lin
                    before += size
                self.coef_heads = nn.ModuleDict(coefs) if coefs else None
        else:
            self.encoder = None
            self.heads = None
            self.coef_heads = None
        if groups_ and self._has_features:
            f = data.group_features.shape[-1]
            maps = {}
            for name in groups_:
                size = max(1, math.prod(self._shapes[name]))
                lin = nn.Linear(f, size, bias=False).to(device=device, dtype=dtype)
                nn.init.zeros_(lin.weight)
                maps[name] = lin
            self.group_maps = nn.ModuleDict(maps)
        else:
            self.group_maps = None

    def _group_dim(self, data: Any) -> int:
        if self._has_features:
            return int(data.group_features.shape[-1])
        return len(self._group_names)

    def _group_codes(self, data: Any) -> torch.Tensor:
        """``(N, G_train or F)`` group description of each individual of ``data``."""
        if self._has_features:
            return data.group_features[data.groups]
        dtype = data.observations.dtype
        if tuple(data.group_names) == self._group_names:
            return nn.functional.one_hot(data.groups, len(self._group_names)).to(dtype)
        names = list(data.group_names)
        index = {g: i for i, g in enumerate(self._group_names)}
        missing = [g for g in names if g not in index]
        if missing and bool(
            torch.isin(data.groups, torch.tensor([names.index(m) for m in missing])).any()
        ):
            raise ValueError(
                f"AmortizedGuide: groups {missing} were not in the training data and the data "
                "have no group_features to describe them; predictions for unseen groups need "
                "group features"
            )
        mapping = torch.tensor([index.get(g, 0) for g in names], device=data.groups.device)
        codes = mapping[data.groups]
        return nn.functional.one_hot(codes, len(self._group_names)).to(dtype)

    # -- parameters ---------------------------------------------------------------------------

    def _register(self) -> None:
        if self.encoder is not None:
            pyro.module(f"{self._prefix}.encoder", self.encoder)
        if self.heads is not None:
            pyro.module(f"{self._prefix}.heads", self.heads)
        if self.coef_heads is not None:
            pyro.module(f"{self._prefix}.coefs", self.coef_heads)
        if self.group_maps is not None:
            pyro.module(f"{self._prefix}.group_maps", self.group_maps)

    def _global_params(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = self._prefix
        return pyro.param(f"{prefix}.{name}.loc"), pyro.param(f"{prefix}.{name}.scale")

    def _group_params(self, name: str, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        loc, scale = self._global_params(name)  # (G_train, *event)
        names = list(getattr(data, "group_names", self._group_names))
        if tuple(names) != self._group_names:
            index = {g: i for i, g in enumerate(self._group_names)}
            known = torch.tensor([g in index for g in names], device=loc.device)
            rows = torch.tensor([index.get(g, 0) for g in names], device=loc.device)
            shape = (-1,) + (1,) * (loc.dim() - 1)
            loc = torch.where(known.reshape(shape), loc[rows], torch.zeros_like(loc[rows]))
            mean_scale = scale.mean(0, keepdim=True).expand_as(scale[rows])
            scale = torch.where(known.reshape(shape), scale[rows], mean_scale)
        if self.group_maps is not None and name in self.group_maps:
            shift = self.group_maps[name](data.group_features)
            loc = loc + shift.reshape(loc.shape)
        return loc, scale

    def _features(self, data: Any) -> torch.Tensor:
        """``(N, F)``: encoder features, transformed inputs and group codes."""
        feats = [self.encoder(data)]  # type: ignore[misc]
        if data.num_inputs:
            feats.append(_transform_inputs(data.inputs))
        if self._group_dim(data):
            feats.append(self._group_codes(data))
        return torch.cat(feats, -1)

    def local_distributions(self, data: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{site: (loc, scale)}`` of the local sites in unconstrained space, ``(N, *event)``."""
        if self.heads is None:
            return {}
        x = self._features(data)
        n = x.shape[0]
        rows = seen = None
        if self.semi_amortized:
            rows, seen = self._training_rows(data)
            all_seen = bool(seen.all())
            if not bool(seen.any()):
                rows = seen = None
        out = {}
        for name, head in self.heads.items():
            size = max(1, math.prod(self._shapes[name]))
            h = head(x)
            if rows is not None and seen is not None:
                corrections = pyro.param(f"{self._prefix}.{name}.corrections")[rows]
                if self._refining:  # the encoder is fixed while the corrections learn
                    # (all seen: detach whole, so the encoder gets no gradient, not a zero one,
                    # and Adam's momentum does not move it)
                    h = h.detach() if all_seen else torch.where(seen.unsqueeze(-1), h.detach(), h)
                elif self._refining is not None:  # the corrections wait while the encoder learns
                    corrections = corrections.detach()
                h = h + corrections * seen.unsqueeze(-1).to(h.dtype)
            loc = h[:, :size].reshape(n, *self._shapes[name])
            scale = nn.functional.softplus(h[:, size:]).reshape(n, *self._shapes[name]) + 1e-6
            out[name] = (loc, scale)
        self._last_coefs = {}
        if self.coef_heads is not None:
            for name, lin in self.coef_heads.items():
                size = max(1, math.prod(self._shapes[name]))
                self._last_coefs[name] = lin(x).reshape(n, size, -1)  # (N, size, D_before)
        return out

    # -- the guide ----------------------------------------------------------------------------

    def _distribution(self, name: str, loc: torch.Tensor, scale: torch.Tensor):
        ndim = len(self._shapes[name])
        transform = self._transforms[name]
        if name in self._positive:  # the log-normal, without the transforms
            positive = _ExpNormal(loc, scale)
            return positive.to_event(ndim) if ndim else positive
        base = dist.Normal(loc, scale)
        if ndim:
            base = base.to_event(ndim)
        if transform is torch.distributions.transforms.identity_transform or (
            isinstance(transform, torch.distributions.transforms.IndependentTransform)
            and transform.base_transform is torch.distributions.transforms.identity_transform
        ):
            return base
        return dist.TransformedDistribution(base, transform)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        data = args[0] if args else None
        self._register()
        result: dict[str, torch.Tensor] = {}
        for name, level in self.levels.items():
            if level == "global":
                loc, scale = self._global_params(name)
                result[name] = pyro.sample(name, self._distribution(name, loc, scale))
        group_sites = [n for n, lv in self.levels.items() if lv == "group"]
        if group_sites:
            with groups(data):  # type: ignore[arg-type]
                for name in group_sites:
                    loc, scale = self._group_params(name, data)
                    result[name] = pyro.sample(name, self._distribution(name, loc, scale))
        local_sites = [n for n, lv in self.levels.items() if lv == "local"]
        if local_sites:
            params = self.local_distributions(data)
            coefs = self._last_coefs
            deviations: list[torch.Tensor] = []  # (..., N, size) of u - mu, sites so far
            infer: Any = {"conditional_guide": bool(coefs)}  # IWAE(dreg=True) checks it
            with individuals(data):  # type: ignore[arg-type]
                for name in local_sites:
                    loc, scale = params[name]
                    shape = self._shapes[name]
                    cond_loc = loc
                    if name in coefs:
                        dev = torch.cat(deviations, -1).unsqueeze(-2)  # (..., N, 1, D_before)
                        shift = (coefs[name] * dev).sum(-1)  # (..., N, size)
                        cond_loc = loc + shift.reshape(shift.shape[:-1] + shape)
                    value = pyro.sample(
                        name,
                        self._distribution(name, cond_loc, scale),
                        infer=infer,
                    )
                    result[name] = value
                    if coefs:
                        u = self._transforms[name].inv(value) - loc
                        deviations.append(u.reshape((*u.shape[: u.dim() - len(shape)], -1)))
        return result

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Posterior medians: globals, group latents ``(G, ...)`` and locals ``(N, ...)``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        data = args[0] if args else None
        out = {}
        local = self.local_distributions(data) if self.heads is not None else {}
        for name, level in self.levels.items():
            if level == "global":
                loc, _ = self._global_params(name)
            elif level == "group":
                loc, _ = self._group_params(name, data)
            else:
                loc, _ = local[name]
            out[name] = self._transforms[name](loc)
        return out

    # -- save / load --------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Constructor options as plain values (for :meth:`FitResult.save`)."""
        return {
            "init_scale": self.init_scale,
            "use_group_features": self.use_group_features,
            "local_covariance": self.local_covariance,
            "semi_amortized": self.semi_amortized,
            "refine_fraction": self.refine_fraction,
            "name": self._prefix,
            "encoder": None if self.encoder is None else self.encoder.config(),
        }

    @classmethod
    def from_config(cls, model, config: dict[str, Any]) -> AmortizedGuide:
        """Rebuild a guide from :meth:`config` (its parameters come from the saved store)."""
        config = dict(config)
        enc = config.pop("encoder", None)
        encoder = make_encoder(enc) if enc else None
        return cls(model, encoder, **config)
