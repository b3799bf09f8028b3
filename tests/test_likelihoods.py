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
