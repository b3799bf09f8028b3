"""FitResult.gibbs: particle Gibbs with the guide as proposal targets the exact posterior.

The conjugate linear-Gaussian hierarchy of test_objectives has a Gaussian posterior over
(mu, g, z) that Gaussian conditioning gives exactly. A guide whose population mean is three
posterior SDs off biases the importance-resampled draws of FitResult.posterior by three SDs
(their globals are the guide's); the Gibbs chains must not inherit that bias.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_objectives import SG, SY, SZ, TAU, G, N, T, make_data, make_rough_guide, model

import pyro_hds
from pyro_hds.models import pk_oral
from pyro_hds.results import FitResult


def exact_posterior(data) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and SDs of (mu, g_1..g_G, z_1..z_N) given Y, by Gaussian conditioning."""
    groups = data.groups
    nl = 1 + G + N  # latents
    ne = 1 + G + N + N * T  # independent standard normal noises
    lmat = torch.zeros(nl + N * T, ne, dtype=torch.float64)
    lmat[0, 0] = TAU
    for j in range(G):
        lmat[1 + j] = lmat[0]
        lmat[1 + j, 1 + j] = SG
    for i in range(N):
        lmat[1 + G + i] = lmat[1 + int(groups[i])]
        lmat[1 + G + i, 1 + G + i] = SZ
        for t in range(T):
            r = nl + i * T + t
            lmat[r] = lmat[1 + G + i]
            lmat[r, nl + i * T + t] = SY
    cov = lmat @ lmat.T
    y = data.y.reshape(-1).double()
    sxy, syy = cov[:nl, nl:], cov[nl:, nl:]
    mean = sxy @ torch.linalg.solve(syy, y)
    var = torch.diagonal(cov[:nl, :nl] - sxy @ torch.linalg.solve(syy, sxy.T))
    return mean, var.sqrt()


@pytest.fixture(scope="module")
def biased():
    """Data, exact posterior, and a FitResult whose guide puts mu 3 posterior SDs too high."""
    data = make_data(1)
    mean, sd = exact_posterior(data)
    theta = torch.tensor([float(mean[0] + 3 * sd[0]), float(sd[0].log()) - 0.5, 0.3, 0.9, -1.0])
    return data, mean, sd, FitResult(model, make_rough_guide(theta), data)


@pytest.mark.parametrize("local_steps", [1, 0])
def test_gibbs_recovers_the_exact_posterior_from_a_biased_guide(biased, local_steps):
    import arviz_stats

    _, mean, sd, result = biased
    post = result.gibbs(
        num_samples=12000,
        num_chains=8,
        warmup=200,
        num_particles=8,
        local_steps=local_steps,
        seed=0,
        progress=False,
    )
    assert post.num_chains == 8 and post.samples["mu"].shape == (12000,)
    draws = torch.cat(
        [post.samples["mu"][:, None], post.samples["g"], post.samples["z"]], dim=1
    ).double()
    # the Monte Carlo standard error of a mean is sd / sqrt(ESS): with ESS >= 400 (checked),
    # 0.25 posterior SD is at least 5 standard errors; the SD's relative standard error is
    # 1 / sqrt(2 ESS) <= 3.5%, so 12% is more than 3 of them
    chains = draws.numpy().reshape(8, 1500, -1)
    ess = np.asarray(arviz_stats.ess(chains, method="bulk"))
    assert ess.min() >= 400, ess
    z_err = (draws.mean(0) - mean) / sd
    assert z_err.abs().max() < 0.25, z_err
    torch.testing.assert_close(draws.std(0), sd, rtol=0.12, atol=0)

    # the importance-resampled draws keep the guide's globals: mu is 3 SDs off (by
    # construction), which is what the chains corrected
    sir = result.posterior(num_samples=2000, num_particles=8, seed=0).samples["mu"]
    assert float((sir.mean() - mean[0]) / sd[0]) > 2.5

    diag = post.diagnostics
    assert set(diag["acceptance"]) == {"mu", "g"}
    assert all(0.1 < a < 0.7 for a in diag["acceptance"].values()), diag
    assert 0.3 < diag["local_move_rate"] <= 1.0, diag
    if local_steps:
        assert 0.1 < diag["local_acceptance"] < 0.7, diag


def test_gibbs_options_and_errors(biased):
    data, _, _, result = biased
    post = result.gibbs(
        num_samples=10, num_chains=4, warmup=2, num_particles=2, seed=1, progress=False
    )
    # rounded up to a multiple of the chains; every field has the same draws
    assert post.samples["z"].shape == (12, N)
    assert post.log_likelihood["y"].shape == (12, N)
    assert post.diagnostics["num_chains"] == 4
    # the importance step alone (no random walk on the locals) is a valid sampler too
    alone = result.gibbs(num_samples=4, num_chains=2, warmup=1, local_steps=0, progress=False)
    assert alone.diagnostics["local_acceptance"] is None and alone.samples["z"].shape == (4, N)
    with pytest.raises(ValueError, match="num_particles >= 2"):
        result.gibbs(num_samples=4, num_particles=1)
    with pytest.raises(ValueError, match="num_chains >= 1"):
        result.gibbs(num_samples=4, num_chains=0)
    # a subset of a larger data set would give the posterior of the wrong likelihood
    from test_objectives import subset

    part = subset(data, torch.arange(N // 2))
    with pytest.raises(ValueError, match="standalone"):
        result.gibbs(part, num_samples=4, warmup=0)


def test_gibbs_on_the_pk_model_exports_chains_to_arviz(tmp_path):
    import arviz_stats
    import xarray as xr

    data, _ = pk_oral.simulate(num_groups=3, per_group=4, seed=2)
    result = pyro_hds.fit(
        pk_oral.model,
        data,
        num_steps=20,
        objective=pyro_hds.IWAE(num_particles=4),
        progress=False,
        seed=0,
    )
    post = result.gibbs(
        num_samples=40, num_chains=4, warmup=10, num_particles=4, seed=0, progress=False
    )
    n = len(data)
    assert post.samples["sigma"].shape == (40,)
    assert post.samples["cl_group"].shape == (40, 3)
    assert post.samples["ka"].shape == (40, n)
    assert post.samples["x"].shape == (40, n, data.times.shape[-1], 2)
    assert post.predictive["y"].shape == (40, n, data.times.shape[-1], 1)
    assert set(post.diagnostics["acceptance"]) == {
        "ka_pop",
        "cl_pop",
        "v_pop",
        "group_sd",
        "omega",
        "sigma",
        "cl_group",
    }
    # every draw is a consistent state: its trajectory is the ODE solution of its own locals
    # (the model's solver again, so equal to float32 round-off)
    locals_ = {k: post.samples[k][:3] for k in ("ka", "cl", "v")}
    again = pyro_hds.solve(
        pk_oral.rhs,
        torch.zeros(2),
        data.times,
        {k: v.reshape(-1) for k, v in locals_.items()},
        solver=pyro_hds.RK4(substeps=4),
        t0=0.0,
        doses=data[torch.arange(n).repeat(3)].doses,
    ).ys.reshape(3, n, -1, 2)
    torch.testing.assert_close(post.samples["x"][:3], again, rtol=1e-4, atol=1e-4)

    tree = pyro_hds.to_datatree(post, data)
    assert tree["posterior"]["sigma"].dims == ("chain", "draw")
    assert tree["posterior"].sizes["chain"] == 4 and tree["posterior"].sizes["draw"] == 10
    # draw d of chain c is draw c * 10 + d of the Posterior
    np.testing.assert_array_equal(
        tree["posterior"]["sigma"].values[2, 3], post.samples["sigma"][23].numpy()
    )
    assert tree["log_likelihood"]["y"].dims == ("chain", "draw", "individual")
    rhat = arviz_stats.rhat(tree["posterior"].to_dataset()["sigma"].values)
    assert math.isfinite(float(rhat))
    path = tmp_path / "gibbs.nc"
    tree.to_netcdf(path)
    back = xr.open_datatree(path)
    np.testing.assert_array_equal(back["posterior"]["ka"].values, tree["posterior"]["ka"].values)
