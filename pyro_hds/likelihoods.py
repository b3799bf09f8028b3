"""Observation sites for time series with missing values: one line per likelihood in a model.

Inside ``with pyro_hds.individuals(data):`` a model predicts the observed channels as a tensor
``x`` of shape ``(..., N, T, C)`` (particles and other batch dims on the left) and writes::

    pyro_hds.observe("y", dist.Normal(x, sigma), data)

which conditions on ``data.observations`` (N, T, C), ignores entries whose ``data.mask`` is
False, and sums the log-density over time and channels, so that the site has batch shape
``(..., N)`` and event shape ``(T, C)``, one log-likelihood per individual:

.. math:: \\log p(y_i \\mid x_i) = \\sum_{t, c} m_{itc} \\log p(y_{itc} \\mid x_{itc}).

Failed ODE solutions: an individual (or particle) whose prediction holds a non-finite value gets
log-likelihood NaN, and the objective turns it into a zero importance weight when the ODE site
reports that element's failure (and raises otherwise). The non-finite entries are replaced by a
point of the support *before* any arithmetic, so neither their values nor their gradients reach
shared parameters (the "double where" rule): a model that writes its own likelihood from
``torch`` operations on a failed trajectory would give NaN gradients to global noise scales.

For a Gaussian the log-density is evaluated by one fused expression, which is markedly faster
than ``Normal(...).mask(...).to_event(2)`` on the ``(K, N, T, C)`` tensors of an
importance-weighted objective, where the likelihood, not the ODE, dominates the cost.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import biject_to, constraints

if TYPE_CHECKING:
    from pyro_hds.data import Dataset

__all__ = ["MaskedObservation", "observe"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
#: Normal classes whose log-density is the plain Gaussian one (subclasses may change it)
_PLAIN_NORMALS = (dist.Normal, torch.distributions.Normal)


def _compact(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every broadcast (stride-0) dim narrowed to size 1: a view holding each
    distinct value once. ``Normal(loc, scale)`` expands a per-channel ``scale`` to the full
    ``(..., N, T, C)`` shape; arithmetic on the compact view costs its few distinct values,
    not millions of repeats."""
    for d in range(x.dim()):
        if x.stride(d) == 0 and x.shape[d] > 1:
            x = x.narrow(d, 0, 1)
    return x


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite, by one reduction in the common case: a sum of
    finite values is finite unless it overflows, and any NaN or infinity makes it non-finite;
    only a non-finite sum is followed by the elementwise test."""
    x = _compact(x)
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def _arguments(base: torch.distributions.Distribution) -> dict[str, torch.Tensor] | None:
    """The constructor arguments of a plain parametric distribution, or None if unknown."""
    names = list(getattr(base, "arg_constraints", {}))
    if not names:
        return None
    args = {}
    for name in names:
        value = base.__dict__.get(name)
        if not isinstance(value, torch.Tensor):
            return None
        args[name] = value
    return args


class MaskedObservation(TorchDistribution):
    """An elementwise observation model over ``(T, C)`` events with a mask of observed entries.

    :param base: a distribution with elementwise events (``event_shape == ()``) and batch shape
        ending in ``(T, C)``, e.g. ``Normal(x, sigma)`` with ``x`` of shape ``(..., N, T, C)``.
    :param mask: bool, broadcastable to ``base.batch_shape``; True where observed.

    ``log_prob(y)`` has shape ``base.batch_shape[:-2]`` and equals
    :math:`\\sum_{t,c} m_{tc} \\log p(y_{tc})`, or NaN where the parameters of ``base`` hold a
    non-finite value anywhere in that element's ``(T, C)`` block (see the module docstring).
    """

    arg_constraints: ClassVar[dict] = {}
    has_rsample = False

    def __init__(
        self,
        base: torch.distributions.Distribution,
        mask: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if base.event_shape != torch.Size() or len(base.batch_shape) < 2:
            raise ValueError(
                "MaskedObservation needs an elementwise distribution with batch shape (..., T, C); "
                f"got batch {tuple(base.batch_shape)}, event {tuple(base.event_shape)}"
            )
        self.base = base
        shape = base.batch_shape
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool)
            shape = torch.broadcast_shapes(shape, mask.shape)
        self._mask = mask
        self._safe, self._bad = self._sanitize(base, shape)
        self.has_rsample = base.has_rsample
        super().__init__(shape[:-2], shape[-2:], validate_args=False)

    @staticmethod
    def _sanitize(
        base: torch.distributions.Distribution, shape: torch.Size
    ) -> tuple[torch.distributions.Distribution, torch.Tensor | None]:
        args = _arguments(base)
        if args is None:
            return base, None
        bad = None
        safe_args = {}
        for name, value in args.items():
            if not value.is_floating_point() or _all_finite(value):
                safe_args[name] = value
                continue
            nonfinite = ~torch.isfinite(value)
            constraint = base.arg_constraints[name]
            try:
                filler = biject_to(constraint)(value.new_zeros(()))
            except NotImplementedError:
                filler = value.new_ones(())
            safe_args[name] = torch.where(nonfinite, filler, value)
            bad = nonfinite if bad is None else bad | nonfinite
        if bad is None or not bool(bad.any()):
            return base, None
        try:
            safe = type(base)(**safe_args)  # type: ignore[arg-type]
        except TypeError:
            return base, None
        return safe, bad.expand(shape).any(-1).any(-1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(MaskedObservation, _instance)
        new.base = self.base.expand(batch_shape + self.event_shape)
        new._safe = self._safe.expand(batch_shape + self.event_shape)
        new._mask = self._mask
        new._bad = None if self._bad is None else self._bad.expand(batch_shape)
        new.has_rsample = self.has_rsample
        super(MaskedObservation, new).__init__(batch_shape, self.event_shape, validate_args=False)
        return new

    @property
    def support(self):  # type: ignore[override]
        return constraints.independent(self.base.support, 2)

    @property
    def mean(self) -> torch.Tensor:
        return self.base.mean.expand(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> torch.Tensor:
        return self.base.variance.expand(self.batch_shape + self.event_shape)

    def sample(self, sample_shape: Any = torch.Size()) -> torch.Tensor:  # noqa: B008
        return self.base.expand(self.batch_shape + self.event_shape).sample(sample_shape)

    def rsample(self, sample_shape: Any = torch.Size()) -> torch.Tensor:  # noqa: B008
        return self.base.expand(self.batch_shape + self.event_shape).rsample(sample_shape)

    def _log_prob(self, base: torch.distributions.Distribution, value: torch.Tensor):
        if isinstance(base, torch.distributions.Normal) and type(base) in _PLAIN_NORMALS:
            if self._mask is None:
                return _normal_log_prob_sum(value, base.loc, base.scale)
            scale = _compact(base.scale)
            z = (value - base.loc) / scale
            elementwise = -0.5 * z * z - (torch.log(scale) + _HALF_LOG_2PI)
        else:
            elementwise = base.log_prob(value)
        if self._mask is not None:
            elementwise = torch.where(self._mask, elementwise, elementwise.new_zeros(()))
        return elementwise.sum((-2, -1))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        lp = self._log_prob(self._safe, value)
        # beyond sqrt(largest float) in magnitude (or not finite): see _cut_overflow
        limit = float(torch.finfo(lp.dtype).max) ** 0.5
        overflow = ~(lp.abs() <= limit)
        if self._bad is not None:
            overflow = overflow & ~self._bad
        if bool(overflow.any()):
            lp = self._cut_overflow(value, lp, overflow)
        if self._bad is not None:
            lp = torch.where(self._bad, lp.new_full((), math.nan), lp)
        return lp

    def _cut_overflow(self, value: torch.Tensor, lp: torch.Tensor, overflow: torch.Tensor):
        """Rows whose finite parameters give a non-finite log-density (a prediction so far
        from the data that the square overflows, as a diverging fixed-step solve can give),
        or one beyond the square root of the dtype's largest number in magnitude, get
        log-density -inf (zero importance weight) with no gradient: their parameters are
        replaced by a harmless constant before the arithmetic (the double-where rule), so no
        ``0 * inf`` arises in the backward pass.

        Why the second case: a log-density of, say, -1e37 in float32 is finite, but its
        derivative with respect to a small noise scale (proportional to :math:`r^2 / s^3`) is not;
        such a particle's importance weight is exactly 0 beside any particle that fits at
        all, and 0 times that infinite derivative made NaN gradients for the noise scale
        (seen fitting DR_Constant with 4 global draws per step). Cutting it changes no value
        unless every particle of an individual is that far off, where the bound is -inf
        and :func:`pyro_hds.fit` stops with an error naming the site."""
        args = _arguments(self._safe)
        if args is None:
            return torch.where(overflow, lp.new_full((), -math.inf), lp)
        rows = overflow.reshape((*overflow.shape, 1, 1))
        cut = {}
        for k, v in args.items():
            if not v.is_floating_point():
                cut[k] = v
                continue
            try:  # a harmless point of the parameter's support, as for non-finite parameters
                filler = biject_to(self._safe.arg_constraints[k])(v.new_zeros(()))
            except NotImplementedError:
                filler = v.new_ones(())
            cut[k] = torch.where(rows, filler, v)
        try:
            base = type(self._safe)(**cut)  # type: ignore[arg-type]
        except TypeError:
            return torch.where(overflow, lp.new_full((), -math.inf), lp)
        lp = self._log_prob(base, value)
        return torch.where(overflow, lp.new_full((), -math.inf), lp)


class _SquaredResidualSum(torch.autograd.Function):
    r""":math:`\sum_t (\mu_{tc} - y_{tc})^2` over the time dim (-2, kept as size 1), with
    its gradient :math:`2 (\mu - y)\, g` written out: one pass over the ``(..., N, T, C)``
    tensors backward, where autograd's chain of the subtraction, square and sum takes three
    or four (the residual saved from the forward pass; recomputed from the inputs when the
    backward pass itself is differentiated, so second derivatives stay right)."""

    @staticmethod
    def forward(ctx, loc, value):  # type: ignore[override]
        r = loc - value
        ctx.save_for_backward(loc, value, r)
        return r.square().sum(-2, keepdim=True)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        loc, value, r = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a differentiable residual
            r = loc - value
        g = r * (2 * grad)
        g_loc = g.sum_to_size(loc.shape) if ctx.needs_input_grad[0] else None
        g_value = (-g).sum_to_size(value.shape) if ctx.needs_input_grad[1] else None
        return g_loc, g_value


def _normal_log_prob_sum(
    value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    r"""``Normal(loc, scale).log_prob(value)`` summed over the last two dims (T, C), all
    entries observed: :math:`-\frac12 \sum_{t,c} r_{tc}^2 / s_{tc}^2 - \sum_{t,c} (\log
    s_{tc} + \frac12 \log 2\pi)`, :math:`r = y - \mu`.

    The scale's distinct values only are used (:func:`_compact`): when it is constant over
    time (one noise level per channel, the common case) the squares are summed over time first,
    :math:`\sum_c \big(\sum_t r_{tc}^2\big) / s_c^2`, which saves a division and a
    multiplication over the full ``(..., N, T, C)`` tensor, forward and backward."""
    sc = _compact(scale)
    shape = torch.broadcast_shapes(value.shape, loc.shape, scale.shape)
    if sc.shape[-2] == 1:  # constant over time
        quad = (_SquaredResidualSum.apply(loc, value) / sc.square()).sum((-2, -1))
    else:
        quad = ((value - loc).square() / sc.square()).sum((-2, -1))
    repeats = (shape[-2] if sc.shape[-2] == 1 else 1) * (shape[-1] if sc.shape[-1] == 1 else 1)
    norm = (torch.log(sc) + _HALF_LOG_2PI).sum((-2, -1)) * repeats
    return (-0.5 * quad - norm).expand(shape[:-2])


def _check_observation_shape(
    name: str, fn: torch.distributions.Distribution, data: Dataset
) -> None:
    expected = tuple(data.observations.shape)
    full = tuple(fn.batch_shape + fn.event_shape)
    if len(full) < 3 or full[-3:] != expected:
        raise ValueError(
            f"observe({name!r}): the distribution has batch+event shape {full}, but the "
            f"observations of this (minibatch) data set have shape {expected} "
            "(individuals, times, channels). Build the distribution from a prediction of shape "
            "(..., N, T, C), e.g. the ODE trajectory of ode() called with data.times, indexed "
            "to the observed states."
        )
    if fn.event_shape != torch.Size():
        raise ValueError(
            f"observe({name!r}): expected an elementwise distribution (event shape ()), got "
            f"event shape {tuple(fn.event_shape)}. Pass e.g. dist.Normal(x, sigma); observe() "
            "adds the mask and the (T, C) event dims itself."
        )


def observe(name: str, fn: torch.distributions.Distribution, data: Dataset) -> torch.Tensor:
    """Condition on ``data.observations`` through ``fn``, masked by ``data.mask``.

    :param name: the site name.
    :param fn: an elementwise distribution whose ``batch_shape`` ends with ``(N, T, C)``, the
        shape of ``data.observations``: ``Normal(x, sigma)``, ``StudentT``, ``Laplace``, ...
    :param data: the (minibatch) data set the model was called with.
    :returns: the observed values (or, under ``poutine.uncondition``, a draw), ``(..., N, T, C)``.

    The site has batch shape ``(..., N)`` and event shape ``(T, C)``: call it inside
    ``pyro_hds.individuals(data)``. Missing entries (``data.mask`` False) contribute nothing to
    the log-likelihood.
    """
    _check_observation_shape(name, fn, data)
    # a fully observed data set needs no mask (it would cost a select over (K, N, T, C))
    mask = None if bool(data.mask.all()) else data.mask
    return pyro.sample(name, MaskedObservation(fn, mask), obs=data.observations)
