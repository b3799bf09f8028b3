"""observe() / MaskedObservation: masking, shapes, and isolation of non-finite predictions."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_hds
from pyro_hds.data import Dataset
from pyro_hds.likelihoods import MaskedObservation


def small_data():
    y = torch.tensor([[[1.0, 2.0], [3.0, math.nan]], [[0.5, 0.1], [0.2, 0.3]]])
    return Dataset.from_arrays(y, [0.0, 1.0], allow_missing=True)


def test_masked_log_prob_matches_manual_sum():
    data = small_data()
    loc = torch.randn(3, 2, 2, 2)
    scale = torch.tensor([0.5, 2.0])
    d = MaskedObservation(dist.Normal(loc, scale), data.mask)
    assert d.batch_shape == (3, 2) and d.event_shape == (2, 2)
    lp = d.log_prob(data.observations)
    manual = (dist.Normal(loc, scale).log_prob(data.observations) * data.mask).sum((-2, -1))
    torch.testing.assert_close(lp, manual)
    # non-Gaussian path
    d2 = MaskedObservation(dist.StudentT(4.0, loc, scale), data.mask)
    manual2 = (dist.StudentT(4.0, loc, scale).log_prob(data.observations) * data.mask).sum((-2, -1))
    torch.testing.assert_close(d2.log_prob(data.observations), manual2)


@pytest.mark.parametrize(
    "scale_shape",
    [(), (3,), (4, 1), (4, 3), (5, 1, 1, 3), (5, 2, 4, 3)],
    ids=["scalar", "per-channel", "per-time", "per-time-channel", "per-particle", "full"],
)
@pytest.mark.parametrize("masked", [False, True])
def test_gaussian_log_prob_and_gradients_match_torch_for_every_scale_shape(scale_shape, masked):
    # the Gaussian fast paths (scale compacted, squares summed over time first when the scale
    # is constant over time) against torch's Normal, values and gradients, in float64
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 4, 3, generator=g) > 0.3 if masked else None
    loc = torch.randn(5, 2, 4, 3, generator=g, dtype=torch.float64).requires_grad_()
    log_scale = (0.3 * torch.randn(scale_shape, generator=g, dtype=torch.float64)).requires_grad_()
    lp = MaskedObservation(dist.Normal(loc, log_scale.exp()), mask).log_prob(y)
    elementwise = torch.distributions.Normal(loc, log_scale.exp()).log_prob(y)
    want = (elementwise if mask is None else elementwise * mask).sum((-2, -1))
    assert lp.shape == (5, 2)
    torch.testing.assert_close(lp, want, rtol=1e-12, atol=1e-12)
    weights = torch.randn(5, 2, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((lp * weights).sum(), [loc, log_scale])
    expected = torch.autograd.grad((want * weights).sum(), [loc, log_scale])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gaussian_gradients_of_observations_and_second_derivatives_match_torch():
    # the time-summed squares have a hand-written backward: the gradient of the observed
    # values too, a location broadcast over individuals, and second derivatives (a
    # Hessian-vector product) against torch's Normal, in float64
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 4, 3, generator=g, dtype=torch.float64).requires_grad_()
    loc = torch.randn(5, 1, 4, 3, generator=g, dtype=torch.float64).requires_grad_()
    log_scale = (0.3 * torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_()
    weights = torch.randn(5, 2, generator=g, dtype=torch.float64)
    inputs = [loc, log_scale, y]
    directions = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in inputs]

    def first_and_second(lp):
        grads = torch.autograd.grad((lp * weights).sum(), inputs, create_graph=True)
        along = sum((gr * d).sum() for gr, d in zip(grads, directions, strict=True))
        return grads, torch.autograd.grad(along, inputs)

    lp = MaskedObservation(dist.Normal(loc, log_scale.exp())).log_prob(y)
    want = torch.distributions.Normal(loc, log_scale.exp()).log_prob(y).sum((-2, -1))
    torch.testing.assert_close(lp, want, rtol=1e-12, atol=1e-12)
    got, expected = first_and_second(lp), first_and_second(want)
    for a, b in zip([*got[0], *got[1]], [*expected[0], *expected[1]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_nonfinite_prediction_gives_nan_row_and_clean_gradients():
    data = small_data()
    sigma = torch.tensor(0.7, requires_grad=True)
    loc = torch.zeros(3, 2, 2, 2)
    loc[1, 0, 1, 0] = math.nan  # particle 1, individual 0 failed
    base = dist.Normal(loc, sigma, validate_args=False)  # validation would reject NaN
    lp = MaskedObservation(base, data.mask).log_prob(data.observations)
    assert torch.isnan(lp[1, 0]) and torch.isfinite(lp[[0, 2]]).all() and torch.isfinite(lp[1, 1])
    ok = torch.isfinite(lp)
    total = torch.where(ok, lp, torch.zeros(())).sum()
    (g,) = torch.autograd.grad(total, sigma)
    # equals the gradient from the finite entries alone
    sigma2 = torch.tensor(0.7, requires_grad=True)
    lp2 = MaskedObservation(dist.Normal(torch.zeros(3, 2, 2, 2), sigma2), data.mask).log_prob(
        data.observations
    )
    (g2,) = torch.autograd.grad(lp2[ok].sum(), sigma2)
    assert torch.isfinite(g)
    torch.testing.assert_close(g, g2)


def test_overflowing_prediction_gets_zero_weight_and_clean_gradients():
    # a finite but enormous prediction (a diverging fixed-step solve in float32) makes the
    # squared residual overflow: that row's log-density is -inf, and the gradients of a
    # weighted sum (logsumexp, as the objective takes) stay finite and equal those without it
    data = small_data().to(dtype=torch.float32)
    f32 = torch.float32
    sigma = torch.tensor(0.5, dtype=f32, requires_grad=True)
    theta = torch.ones(3, 2, dtype=f32, requires_grad=True)  # per particle and individual
    scale = torch.ones(3, 2, 2, 2, dtype=f32)
    scale[2, 1] = 3e38  # particle 2, individual 1 blows up (finite; 3e38 / 0.5 is not)
    loc = theta[..., None, None] * scale
    lp = MaskedObservation(dist.Normal(loc, sigma), data.mask).log_prob(data.observations)
    assert lp[2, 1] == -math.inf and torch.isfinite(lp[[0, 1]]).all() and torch.isfinite(lp[2, 0])
    total = torch.logsumexp(lp, 0).sum()
    g_sigma, g_theta = torch.autograd.grad(total, (sigma, theta))
    assert torch.isfinite(g_sigma) and torch.isfinite(g_theta).all() and g_theta[2, 1] == 0
    keep = torch.ones(3, 2, dtype=torch.bool)
    keep[2, 1] = False
    sigma2 = sigma.detach().clone().requires_grad_(True)
    lp2 = MaskedObservation(dist.Normal(theta.detach()[..., None, None], sigma2), data.mask)
    lp2 = lp2.log_prob(data.observations)
    lp2 = torch.where(keep, lp2, torch.full_like(lp2, -math.inf))
    (g2,) = torch.autograd.grad(torch.logsumexp(lp2, 0).sum(), sigma2)
    torch.testing.assert_close(g_sigma, g2)


def test_observe_checks_shapes_and_records_site():
    data = small_data()

    def model(data):
        with pyro_hds.individuals(data):
            pyro_hds.observe("y", dist.Normal(torch.zeros(2, 2, 2), 1.0), data)

    tr = pyro.poutine.trace(model).get_trace(data)
    site = tr.nodes["y"]
    assert site["fn"].batch_shape == (2,) and site["fn"].event_shape == (2, 2)
    assert torch.equal(site["value"], data.observations)

    def wrong(data):
        with pyro_hds.individuals(data):
            pyro_hds.observe("y", dist.Normal(torch.zeros(2, 3, 2), 1.0), data)

    with pytest.raises(ValueError, match=r"observe\('y'\).*\(2, 2, 2\)"):
        wrong(data)


def test_a_finite_but_huge_negative_log_density_has_zero_weight_and_clean_gradients():
    # float32: the far-off particle's log-density (about -2.4e37) is finite, its derivative
    # with respect to the noise scale (about 4e40) is not; its weight is 0, so 0 * inf used
    # to make the noise scale's gradient NaN
    f32 = torch.float32
    y = torch.zeros(1, 3, 1, dtype=f32)
    loc = torch.tensor([0.1, 1e16], dtype=f32).reshape(2, 1, 1, 1).expand(2, 1, 3, 1)
    log_prec = torch.tensor(12.0, dtype=f32, requires_grad=True)
    lp = MaskedObservation(dist.Normal(loc, (-0.5 * log_prec).exp())).log_prob(y)
    assert lp.shape == (2, 1) and bool(torch.isfinite(lp[0]).all())
    assert float(lp[1, 0]) == -math.inf
    (grad,) = torch.autograd.grad(torch.logsumexp(lp, 0).sum(), log_prec)
    assert bool(torch.isfinite(grad))
    # the good particle's gradient alone: 1/2 (3 - r^2 prec) summed over the 3 times
    want = 0.5 * (3 - 3 * 0.01 * math.exp(12.0))
    torch.testing.assert_close(grad, torch.tensor(want, dtype=f32), rtol=1e-4, atol=0)
