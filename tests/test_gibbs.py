"""FitResult.gibbs: particle Gibbs with the guide as proposal targets the exact posterior.

The conjugate linear-Gaussian hierarchy of test_objectives has a Gaussian posterior over
(mu, g, z) that Gaussian conditioning gives exactly. A guide whose population mean is three
posterior SDs off biases the importance-resampled draws of FitResult.posterior by three SDs
(their globals are the guide's); the Gibbs chains must not inherit that bias.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
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


def assert_exact(post, suffix: str, mean: torch.Tensor, sd: torch.Tensor) -> None:
    """The chains' (mu, g, z) + ``suffix`` against the exact posterior ``mean`` and ``sd``.

    The Monte Carlo standard error of a mean is sd / sqrt(ESS): with ESS >= 400 (checked),
    0.25 posterior SD is at least 5 standard errors; the SD's relative standard error is
    1 / sqrt(2 ESS) <= 3.5%, so 12% is more than 3 of them."""
    import arviz_stats

    names = ("mu" + suffix, "g" + suffix, "z" + suffix)
    draws = torch.cat([post.samples[n].reshape(post.samples[n].shape[0], -1) for n in names], 1)
    draws = draws.double()
    chains = draws.numpy().reshape(post.num_chains, -1, draws.shape[1])
    ess = np.asarray(arviz_stats.ess(chains, method="bulk"))
    assert ess.min() >= 400, (suffix, ess)
    z_err = (draws.mean(0) - mean) / sd
    assert z_err.abs().max() < 0.25, (suffix, z_err)
    torch.testing.assert_close(draws.std(0), sd, rtol=0.12, atol=0)


@pytest.fixture(scope="module")
def biased():
    """Data, exact posterior, and a FitResult whose guide puts mu 3 posterior SDs too high."""
    data = make_data(1)
    mean, sd = exact_posterior(data)
    theta = torch.tensor([float(mean[0] + 3 * sd[0]), float(sd[0].log()) - 0.5, 0.3, 0.9, -1.0])
    return data, mean, sd, FitResult(model, make_rough_guide(theta), data)


@pytest.mark.parametrize(
    "num_particles, local_steps, outer_steps, laplace_steps",
    [(8, 1, 1, 0), (8, 0, 1, 0), (1, 3, 2, 0), (1, 0, 2, 1), (8, 0, 1, 1)],
    ids=["walk+importance", "importance", "walk, two outer steps", "laplace", "laplace+importance"],
)
def test_gibbs_recovers_the_exact_posterior_from_a_biased_guide(
    biased, num_particles, local_steps, outer_steps, laplace_steps, recwarn
):

    _, mean, sd, result = biased
    post = result.gibbs(
        num_samples=12000,
        num_chains=8,
        warmup=200,
        num_particles=num_particles,
        local_steps=local_steps,
        outer_steps=outer_steps,
        laplace_steps=laplace_steps,
        seed=0,
        progress=False,
    )
    assert post.num_chains == 8 and post.samples["mu"].shape == (12000,)
    assert post.diagnostics["outer_steps"] == outer_steps
    assert_exact(post, "", mean, sd)

    # the importance-resampled draws keep the guide's globals: mu is 3 SDs off (by
    # construction), which is what the chains corrected
    sir = result.posterior(num_samples=2000, num_particles=8, seed=0).samples["mu"]
    assert float((sir.mean() - mean[0]) / sd[0]) > 2.5

    diag = post.diagnostics
    assert set(diag["acceptance"]) == {"mu", "g"}
    # chains that recovered the posterior agree: no warning about them
    assert set(diag["split_rhat"]) == {"mu", "g"}
    assert max(diag["split_rhat"].values()) < 1.1, diag["split_rhat"]
    assert not [w for w in recwarn if "disagree" in str(w.message)]
    assert all(0.1 < a < 0.7 for a in diag["acceptance"].values()), diag
    if num_particles > 1:
        assert 0.3 < diag["local_move_rate"] <= 1.0, diag
    else:
        assert diag["local_move_rate"] is None
    if local_steps:
        assert 0.1 < diag["local_acceptance"] < 0.7, diag
    if laplace_steps:
        # each chain's approximation is the exact conditional at its own g (see the test
        # below); the mixture over the chains is wider than any one by their spread of g
        # (the conditional mean moves by (1/SZ^2) / prec = 1/3 of g's change, and g's
        # posterior SD, 0.30, is about one conditional SD of z, 0.29: the components' means
        # spread by a third of their SD), so most of their proposals are accepted (over 0.8);
        # those of the defensive part (a share DEFENSIVE = 0.1), three times wider in one
        # dimension, about a third of the time: 0.9 * 0.8 + 0.1 * 0.3 = 0.75
        assert diag["laplace_acceptance"] > 0.75, diag
        assert diag["laplace_poor"] == 0.0
    else:
        assert diag["laplace_acceptance"] is None and diag["laplace_poor"] is None


def test_laplace_approximation_of_the_conjugate_model_is_its_exact_conditional(biased):
    """Given mu and g, z_i of the linear-Gaussian hierarchy is Gaussian with precision
    1/SZ^2 + T/SY^2 and mean (g_i/SZ^2 + sum_t y_it/SY^2) / precision. Its log-density is
    quadratic, so Newton's first step lands on the mode and forward differences of the
    (linear) gradient give the Hessian exactly: every chain's approximation, at its own g,
    is the exact conditional to round-off. The mixture's log-density is that of the equal
    mixture of the chains' Gaussians, with weight DEFENSIVE on their INFLATE times wider
    versions (up to its constant)."""
    from torch.distributions import biject_to, constraints

    from pyro_hds.gibbs import _Laplace, _local_keys, _Passes

    data, _, _, result = biased
    chains = 3
    passes = _Passes(model, result.guide, data, chains)
    with torch.no_grad():
        nodes = passes.run(1, None, None).guide_trace.nodes
        outer = {name: nodes[name]["value"][:, :1] for name in ("mu", "g")}
        local = {"z": nodes["z"]["value"][:, :1] + 0.5}  # within a Newton step of the mode
        keys = _local_keys(passes.run(1, outer, local, model_only=True))
        spread = {"z": torch.full((1, 1, N), 0.3)}
        laplace = _Laplace(["z"], {"z": biject_to(constraints.real)}, spread)
        laplace.fit(passes, outer, local, keys, iterations=2)
    prec = 1 / SZ**2 + T / SY**2
    g = outer["g"][:, 0][:, data.groups]  # (C, N)
    mode = (g / SZ**2 + data.y.sum(-1) / SY**2) / prec
    assert laplace.mode is not None and laplace.chol is not None
    torch.testing.assert_close(laplace.mode[..., 0], mode, rtol=0, atol=1e-9)
    torch.testing.assert_close(
        laplace.chol[..., 0, 0], torch.full_like(mode, prec**-0.5), rtol=1e-7, atol=0
    )
    assert laplace.ok is not None and bool(laplace.ok.all())

    u = mode[:, :, None] + torch.randn(chains, N, 1)
    sd = prec**-0.5
    parts = dist.Normal(mode, sd).log_prob(u[:, None, :, 0])  # (C, C', N)
    wide = dist.Normal(mode, _Laplace.INFLATE * sd).log_prob(u[:, None, :, 0])
    eps = _Laplace.DEFENSIVE
    mixture = torch.logaddexp(
        torch.logsumexp(parts, 1) + math.log((1 - eps) / chains),
        torch.logsumexp(wide, 1) + math.log(eps / chains),
    )
    constant = 0.5 * math.log(2 * math.pi)  # log_density drops the Gaussians' constant
    torch.testing.assert_close(laplace.log_density(u), mixture + constant, rtol=0, atol=1e-9)
    draws, component = laplace.draw(chains)
    assert draws.shape == (chains, N, 1) and component.shape == (chains, N)


def test_laplace_defensive_part_lets_a_chain_leave_where_no_good_component_reaches():
    """A chain whose local z sits at 8 where the target p(z) = N(0, 1) and the only good
    component is N(0, 0.5^2): without the defensive part q(8) is 96 nats below p(8), so an
    independence step from there is accepted with probability about e^-96 whatever it
    proposes. The chain's own approximation N(8, 0.1^2), flat and so out of the good
    components, widened in the defensive part, puts q(8) within a few nats of p(8): then
    proposals near 0 are accepted (log alpha about +30, against the ratio p/q near 0)."""
    from torch.distributions import biject_to, constraints

    from pyro_hds.gibbs import _Laplace

    laplace = _Laplace(["z"], {"z": biject_to(constraints.real)}, {"z": torch.ones(1, 1, 1)})
    laplace.mode = torch.tensor([[[0.0]], [[8.0]]], dtype=torch.float64)  # (C, N, D)
    laplace.chol = torch.tensor([[[[0.5]]], [[[0.1]]]], dtype=torch.float64)
    laplace.inverse = laplace.chol.reciprocal()
    laplace.log_det = laplace.chol[..., 0, 0].log()
    laplace.ok = torch.tensor([[True], [False]])
    laplace.member = laplace.ok
    laplace.finite = torch.tensor([[True], [True]])
    torch.manual_seed(0)
    target = dist.Normal(0.0, 1.0)
    current = torch.full((2000, 1, 1), 8.0, dtype=torch.float64)
    draws, _ = laplace.draw(2000)
    log_alpha = (
        target.log_prob(draws[..., 0])
        - laplace.log_density(draws)
        - target.log_prob(current[..., 0])
        + laplace.log_density(current)
    )
    accepted = log_alpha.clamp(max=0).exp().mean()
    # every draw near 0 is accepted (log alpha about +30): those of the good component (0.9)
    # and the defensive part's around 0 (0.05); about half of those around 8: some 0.97
    assert float(accepted) > 0.85, float(accepted)
    # draws beyond 5 SDs of the good component: the defensive part's around 8 (0.05) and
    # the 9.6% of those of N(0, 1.5^2) beyond 2.5 (0.0048), 0.055 in all; the binomial SD
    # of 2000 draws is 0.005, so (0.03, 0.08) is five SDs either side
    far = draws[..., 0].abs() > 2.5
    assert 0.03 < float(far.double().mean()) < 0.08


def test_outer_newton_lands_on_the_conditional_mode_of_the_conjugate_model(biased):
    """Given g, mu of the linear-Gaussian hierarchy is Gaussian with precision
    1/TAU^2 + G/SG^2 and mean (sum_j g_j / SG^2) / precision; given mu and z, g_j is Gaussian
    with precision 1/SG^2 + n_j/SZ^2 and mean (mu/SG^2 + sum_{i in j} z_i/SZ^2) / precision.
    Their log-densities are quadratic, so central differences give the gradient and the
    curvature exactly and one Newton step lands on the mode (no halving), for every chain
    from its own start, and the step size becomes 2.38 conditional SDs."""
    from torch.distributions import biject_to, constraints

    from pyro_hds.gibbs import _outer_newton, _Passes, _site_terms

    data, _, _, result = biased
    chains = 4
    passes = _Passes(model, result.guide, data, chains)
    real = biject_to(constraints.real)
    with torch.no_grad():
        nodes = passes.run(1, None, None).guide_trace.nodes
        outer = {name: nodes[name]["value"][:, :1].clone() for name in ("mu", "g")}
        local = {"z": nodes["z"]["value"][:, :1].clone()}
        terms = _site_terms(passes.run(1, outer, local, model_only=True))
        log_step = _outer_newton(
            passes, outer, local, terms, "mu", None, real, torch.full((1, 1, 1), -1.0)
        )
        g = outer["g"].reshape(chains, G).double()
        prec = 1 / TAU**2 + G / SG**2
        mean = g.sum(-1) / SG**2 / prec
        torch.testing.assert_close(outer["mu"].reshape(-1).double(), mean, rtol=0, atol=1e-4)
        torch.testing.assert_close(log_step.exp().reshape(()), torch.tensor(2.38 / prec**0.5))
        # the terms it left are those of the state it left
        fresh = _site_terms(passes.run(1, outer, local, model_only=True))
        for k in fresh:
            torch.testing.assert_close(terms[k], fresh[k], rtol=1e-6, atol=1e-5)

        mask = torch.tensor([False, True, False]).reshape(1, 1, G)
        before = outer["g"].clone()
        log_step = _outer_newton(
            passes, outer, local, terms, "g", mask, real, torch.full((1, 1, G), -1.0)
        )
        z = local["z"].reshape(chains, N).double()
        members = data.groups == 1
        prec = 1 / SG**2 + int(members.sum()) / SZ**2
        mu = outer["mu"].reshape(chains).double()
        mean = (mu / SG**2 + z[:, members].sum(-1) / SZ**2) / prec
        after = outer["g"].reshape(chains, G).double()
        torch.testing.assert_close(after[:, 1], mean, rtol=0, atol=1e-4)
        # the other groups' values and step sizes stay
        torch.testing.assert_close(after[:, [0, 2]], before.reshape(chains, G)[:, [0, 2]].double())
        steps = log_step.exp().reshape(G)
        torch.testing.assert_close(steps[1], torch.tensor(2.38 / prec**0.5))
        assert float(steps[0]) == float(steps[2]) == math.exp(-1.0)


def bimodal_model(data):
    """y_it ~ N(z_i^2, 0.1): z_i = +1 and -1 fit y = 1 equally, and the prior N(0, 1) is
    symmetric, so every z_i's posterior has two mirror modes of equal mass (mu, a global
    with its prior alone, gives the chains an outer site)."""
    pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("individuals", data.total_size, subsample=data.indices, dim=-1):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(z.pow(2).unsqueeze(-1), 0.1).to_event(1), obs=data.y)


def bimodal_guide(data):
    pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("individuals", data.total_size, subsample=data.indices, dim=-1):
        pyro.sample("z", dist.Normal(0.0, 1.2))


def test_gibbs_laplace_mixture_jumps_between_modes_the_chains_found():
    """Each chain's Newton start lies in the mode of z_i its importance-resampled start was
    in; the mixture of all chains' approximations holds both modes (unless every chain
    started in the same one), and its independence steps carry each chain across the
    valley at 0 (150 nats deep): every chain spends about half its draws of every z_i on
    each side, as the symmetric posterior does."""
    from types import SimpleNamespace

    n = 6
    data = SimpleNamespace(
        y=torch.ones(n, 3),
        groups=torch.zeros(n, dtype=torch.long),
        total_size=n,
        indices=torch.arange(n),
    )
    result = FitResult(bimodal_model, bimodal_guide, data)
    options = {"num_samples": 8 * 250, "num_chains": 8, "warmup": 20, "num_particles": 1}
    post = result.gibbs(**options, local_steps=0, laplace_steps=1, seed=0, progress=False)
    positive = (post.samples["z"] > 0).double().reshape(8, 250, n).mean(1)  # (chain, z_i)
    # 250 draws of a chain: the share's binomial SD 0.032 times the square root of the
    # autocorrelation time (about 1 / acceptance: the mixture's weights on the modes are at
    # worst 1:7 where the posterior's are 1:1, so at most about 4): 0.2 is over 3 SDs
    assert post.diagnostics["laplace_acceptance"] > 0.25, post.diagnostics
    assert ((positive > 0.3) & (positive < 0.7)).all(), positive


def test_gibbs_validates_its_first_passes_and_not_the_sweeps(biased):
    """The sweeps skip the distributions' checks (their values are in the supports by
    construction); the passes that set up the chains are checked, and the setting is
    restored afterwards."""
    from pyro.infer.util import is_validation_enabled

    data, _, _, result = biased
    seen: list[bool] = []

    def recording(data):
        seen.append(is_validation_enabled())
        return model(data)

    assert is_validation_enabled()
    FitResult(recording, result.guide, data).gibbs(
        num_samples=8, num_chains=2, warmup=3, num_particles=1, local_steps=1, progress=False
    )
    assert is_validation_enabled()
    # the guess of the plate nesting, the first pass and the start state: checked
    first = seen.index(False)
    assert first >= 3 and all(seen[:first])
    # then every sweep's passes and the recording of the kept states: not
    assert not any(seen[first:]) and len(seen) - first >= 7 * 2


def test_gibbs_warns_when_the_chains_have_not_forgotten_their_start(biased):
    """Without warm-up the chains start from the guide, whose mu is 3 posterior SDs off, and
    80 draws over 8 chains are not enough to forget it: their split R-hat is far above the
    classic 1.1, and the user is told which site and what to do."""
    _, _, _, result = biased
    with pytest.warns(RuntimeWarning, match=r"disagree about '(mu|g)'.*Raise warmup"):
        post = result.gibbs(
            num_samples=80, num_chains=8, warmup=0, num_particles=1, seed=0, progress=False
        )
    assert max(post.diagnostics["split_rhat"].values()) > 1.1


def test_split_rhat_is_arviz_classic_split_rhat():
    """pyro_hds.gibbs.split_rhat against ArviZ's rhat(method="split") (BDA3's formula), for
    agreeing and disagreeing chains, odd and even lengths, and site shapes."""
    import arviz_stats

    from pyro_hds.gibbs import split_rhat

    gen = torch.Generator().manual_seed(0)
    for chains, per, shape, offset in [
        (8, 125, (), 0.0),
        (4, 11, (3,), 1.0),
        (2, 100, (2, 2), 0.3),
    ]:
        x = torch.randn(chains, per, *shape, generator=gen, dtype=torch.float64)
        x = x + offset * torch.randn(chains, 1, *shape, generator=gen, dtype=torch.float64)
        got = split_rhat(x.reshape(chains * per, *shape), chains)
        assert got.shape == shape
        expected = np.asarray(arviz_stats.rhat(x.numpy(), method="split"))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # chains that never move: infinite (ArviZ: NaN), so the warning fires
    stuck = torch.tensor([1.0] * 8 + [2.0] * 8)
    assert split_rhat(stuck, 2).item() == math.inf
    with pytest.raises(ValueError, match="chains of equal length"):
        split_rhat(torch.zeros(10), 3)
    with pytest.raises(ValueError, match="at least 4 draws per chain"):
        split_rhat(torch.zeros(6), 2)


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
    with pytest.raises(ValueError, match="num_particles >= 1"):
        result.gibbs(num_samples=4, num_particles=0)
    with pytest.raises(ValueError, match="nothing would move the locals"):
        result.gibbs(num_samples=4, num_particles=1, local_steps=0, laplace_steps=0)
    with pytest.raises(ValueError, match="laplace_steps >= 0"):
        result.gibbs(num_samples=4, laplace_steps=-1)
    with pytest.raises(ValueError, match="num_chains >= 1"):
        result.gibbs(num_samples=4, num_chains=0)
    with pytest.raises(ValueError, match="outer_steps >= 1"):
        result.gibbs(num_samples=4, outer_steps=0)
    # a subset of a larger data set would give the posterior of the wrong likelihood
    from test_objectives import subset

    part = subset(data, torch.arange(N // 2))
    with pytest.raises(ValueError, match="standalone"):
        result.gibbs(part, num_samples=4, warmup=0)


def short_pk_fit(per_group: int, seed: int, num_steps: int):
    """Simulated pk_oral data (3 groups) and a short fit of it, for shapes and plumbing."""
    data, _ = pk_oral.simulate(num_groups=3, per_group=per_group, seed=seed)
    objective = pyro_hds.IWAE(num_particles=4)
    result = pyro_hds.fit(
        pk_oral.model, data, num_steps=num_steps, objective=objective, progress=False, seed=0
    )
    return data, result


def test_gibbs_on_the_pk_model_exports_chains_to_arviz(tmp_path):
    import arviz_stats
    import xarray as xr

    data, result = short_pk_fit(per_group=4, seed=2, num_steps=20)
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


def test_gibbs_with_a_compiled_solver_compiles_only_the_no_grad_kernel():
    # every pass of the chains runs without gradients, the set-up's plate-nesting guess too:
    # a compiled solver must not compile its training kernel (forward and backward, tens of
    # seconds on a fresh install) for draws that never differentiate
    import functools

    from torch._dynamo.utils import counters

    _, result = short_pk_fit(per_group=2, seed=5, num_steps=2)
    result.model = functools.partial(pk_oral.model, solver=pyro_hds.RK4(substeps=2, compile=True))
    torch._dynamo.reset()
    counters.clear()
    post = result.gibbs(
        num_samples=4, num_chains=2, warmup=2, num_particles=2, seed=0, progress=False
    )
    assert post.samples["ka"].shape == (4, 6)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize(
    "num_particles, local_steps, laplace_steps", [(4, 1, 0), (1, 2, 0), (1, 0, 1), (4, 1, 1)]
)
def test_gibbs_reuses_solves_of_outer_moves_without_changing_the_chain(
    monkeypatch, solves, num_particles, local_steps, laplace_steps
):
    # pk_oral is centred: the outer moves keep every ODE parameter, so reuse_solutions spares
    # their solves; the chain must be the same draw for draw as with every pass solving
    import contextlib
    import importlib

    gibbs_module = importlib.import_module("pyro_hds.gibbs")
    _, result = short_pk_fit(per_group=3, seed=4, num_steps=10)
    calls = solves.calls
    calls.clear()  # the fit's solves
    options = {
        "num_samples": 12,
        "num_chains": 2,
        "warmup": 3,
        "num_particles": num_particles,
        "local_steps": local_steps,
        "laplace_steps": laplace_steps,
        "seed": 0,
    }
    reused = result.gibbs(**options)
    solved_reused = len(calls)
    monkeypatch.setattr(gibbs_module, "reuse_solutions", contextlib.nullcontext)
    calls.clear()
    plain = result.gibbs(**options)
    for name in ("sigma", "cl_group", "ka", "x"):
        torch.testing.assert_close(reused.samples[name], plain.samples[name], rtol=0, atol=0)
    if laplace_steps:  # the count below is that of the sweeps without Laplace steps
        assert solved_reused < len(calls)
        return
    # per sweep (never grouped: warm-up < 5): a pass at the state, 9 outer passes (6
    # globals, then cl_group's 3 groups one at a time), then the random-walk passes and the
    # importance pass. Of the first ten none solves in the first sweep (the start's pass had
    # the same locals). After an importance step the first in every later sweep solves (its
    # locals came from a pass of K particles); after the random walk alone it does not
    # either: each individual's locals are those of one of the walk's last passes, whose
    # solutions are put together
    sweeps = 3 + 6
    saved = 10 + 9 * (sweeps - 1) if num_particles > 1 else 10 * sweeps
    assert len(calls) - solved_reused == saved


def test_local_walk_learns_each_individuals_covariance():
    # two positive local sites whose logs are correlated 0.95 for every individual, with
    # different scales per individual: the walk's covariance after learning is the sample
    # covariance of the states it saw, shrunk toward the guide's variances by 10 draws
    from torch.distributions import biject_to, constraints

    from pyro_hds.gibbs import _LocalWalk

    torch.manual_seed(0)
    n, chains, sweeps = 5, 4, 400
    scale = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    corr = torch.tensor([[1.0, 0.95], [0.95, 1.0]], dtype=torch.float64)
    cov = corr * scale[:, None, None] ** 2  # (N, 2, 2)
    chol = torch.linalg.cholesky(cov)
    transforms = {k: biject_to(constraints.positive) for k in ("a", "b")}
    guide_sd = torch.full((1, 1, n), 0.1, dtype=torch.float64)
    walk = _LocalWalk(["a", "b"], transforms, {"a": guide_sd, "b": guide_sd}, warmup=4 * sweeps)
    assert walk.start == sweeps and walk.switch == 3 * sweeps
    seen = []
    for sweep in range(walk.switch):
        u = torch.einsum("nij,cnj->cni", chol, torch.randn(chains, n, 2, dtype=torch.float64))
        if walk.learning(sweep):
            walk.learn({"a": u[..., 0].exp()[:, None], "b": u[..., 1].exp()[:, None]})
            seen.append(u)
    assert walk.chol is None
    walk.freeze()
    states = torch.cat(seen)  # (draws, N, 2)
    m = states.shape[0]
    sample = torch.einsum("dni,dnj->nij", states, states) / m
    sample -= states.mean(0)[:, :, None] * states.mean(0)[:, None, :]
    expected = (m * sample + 10 * torch.diag_embed(torch.full((n, 2), 0.01))) / (m + 10)
    learned = walk.chol @ walk.chol.transpose(-1, -2)
    torch.testing.assert_close(learned, expected.to(learned.dtype), rtol=1e-9, atol=1e-12)
    # and the sample covariance is the true one to sampling error (800 draws: ~5%)
    torch.testing.assert_close(learned, cov, rtol=0.15, atol=0.02)
    # an individual with a state at the boundary (log 0 = -inf) keeps the guide's spread
    broken = _LocalWalk(["a", "b"], transforms, {"a": guide_sd, "b": guide_sd}, warmup=80)
    for _ in range(30):
        values = torch.rand(chains, 1, n, dtype=torch.float64) + 0.5
        values[0, 0, 2] = 0.0
        broken.learn({"a": values, "b": values.clone()})
    broken.freeze()
    assert torch.isfinite(broken.chol).all()
    torch.testing.assert_close(broken.chol[2], torch.eye(2, dtype=torch.float64) * 0.1)
    # proposals step along that covariance: u' - u has covariance factor^2 Sigma_i
    local = {"a": torch.ones(20000, 1, n), "b": torch.ones(20000, 1, n)}
    proposals, log_jac = walk.propose(local, 0.5)
    du = torch.stack([proposals["a"][:, 0].log(), proposals["b"][:, 0].log()], -1).double()
    step_cov = torch.einsum("cni,cnj->nij", du, du) / du.shape[0]
    torch.testing.assert_close(step_cov, 0.25 * learned, rtol=0.1, atol=0.01)
    # log |det J| of exp at u' minus at u = 0: the sum of the steps
    torch.testing.assert_close(log_jac, du.sum(-1), rtol=1e-5, atol=1e-4)


def test_group_blocks_joins_moves_with_disjoint_footprints():
    from pyro_hds.gibbs import _group_blocks

    def fp(**sites):
        return {k: torch.tensor(v, dtype=torch.bool) for k, v in sites.items()}

    footprints = [
        fp(a=[1], x=[1, 0, 0]),
        fp(b=[1], c=[1, 0]),
        fp(c=[0, 1], x=[0, 1, 0]),  # other elements of c and x than 0 and 1: joins them
        fp(x=[1, 1, 0]),  # shares x[0] with 0: a new group
        fp(c=[1, 1], y=[1]),  # shares c with the first group: joins 3's
        fp(x=[0, 0, 1], c=[0, 0]),  # an empty mask overlaps nothing
        fp(y=[1], a=[1]),  # shares a with 0 and y with 4: a third group
    ]
    assert _group_blocks(footprints) == [[0, 1, 2, 5], [3, 4], [6]]


def twin_model(data):
    """Two independent copies of the conjugate hierarchy (the second on ``data.y2``): the
    moves of one copy's outer sites never change the other's terms, so gibbs groups them."""
    groups = pyro.plate("groups", G, dim=-1)
    individuals = pyro.plate("individuals", data.total_size, subsample=data.indices, dim=-1)
    for suffix, y in (("", data.y), ("2", data.y2)):
        mu = pyro.sample("mu" + suffix, dist.Normal(0.0, TAU))
        with groups:
            g = pyro.sample("g" + suffix, dist.Normal(mu, SG))
        with individuals:
            z = pyro.sample("z" + suffix, dist.Normal(g[..., data.groups], SZ))
            pyro.sample("y" + suffix, dist.Normal(z.unsqueeze(-1), SY).to_event(1), obs=y)


def twin_guide(data):
    """make_rough_guide's default guide, for each copy."""
    theta = torch.tensor([0.3, -0.5, 0.2, 0.8, -0.6])
    groups = pyro.plate("groups", G, dim=-1)
    individuals = pyro.plate("individuals", data.total_size, subsample=data.indices, dim=-1)
    for suffix, y in (("", data.y), ("2", data.y2)):
        mu = pyro.sample("mu" + suffix, dist.Normal(theta[0], theta[1].exp()))
        with groups:
            pyro.sample("g" + suffix, dist.Normal(mu + theta[2], 0.4))
        with individuals:
            pyro.sample("z" + suffix, dist.Normal(theta[3] * y.mean(-1), theta[4].exp()))


def test_gibbs_grouped_moves_recover_the_exact_posterior():
    from types import SimpleNamespace

    first, second = make_data(1), make_data(2)
    data = SimpleNamespace(**vars(first), y2=second.y)
    result = FitResult(twin_model, twin_guide, data)
    post = result.gibbs(
        num_samples=12000,
        num_chains=8,
        warmup=200,
        num_particles=1,
        local_steps=3,
        seed=0,
        progress=False,
    )
    groups = post.diagnostics["outer_groups"]
    # model order: mu, g[0..2], mu2, g2[0..2]; each copy's mean pairs with the other copy's,
    # and the groups' moves, which change their own prior term and individuals only, join
    assert groups == [["mu", "mu2"], ["g[0]", "g[1]", "g[2]", "g2[0]", "g2[1]", "g2[2]"]]
    for suffix, part in (("", first), ("2", second)):
        assert_exact(post, suffix, *exact_posterior(part))


def test_gibbs_groups_the_pk_models_commuting_moves():
    _, result = short_pk_fit(per_group=3, seed=5, num_steps=10)
    post = result.gibbs(
        num_samples=8,
        num_chains=2,
        warmup=12,
        num_particles=1,
        local_steps=2,
        seed=0,
        progress=False,
    )
    # centred: a population mean's move changes only its own prior term and its children's;
    # a group's move changes its own prior term and its own individuals' terms
    assert post.diagnostics["outer_groups"] == [
        ["ka_pop", "cl_pop", "v_pop", "sigma"],
        ["group_sd", "omega"],
        ["cl_group[0]", "cl_group[1]", "cl_group[2]"],
    ]


def test_gibbs_without_importance_step_records_states_in_batches(monkeypatch):
    # num_particles=1: the kept states are evaluated several sweeps at a time; here 3 sweeps
    # of 2 chains of 9 individuals per pass, 8 sweeps kept (3 + 3 + 2)
    import importlib

    gibbs_module = importlib.import_module("pyro_hds.gibbs")
    monkeypatch.setattr(gibbs_module, "RECORD_SYSTEMS", 2 * 9 * 3)
    sizes = []
    resample = FitResult._resample

    def counting(weights, chosen):
        sizes.append(tuple(chosen.shape))
        return resample(weights, chosen)

    monkeypatch.setattr(FitResult, "_resample", staticmethod(counting))
    data, result = short_pk_fit(per_group=3, seed=6, num_steps=10)
    post = result.gibbs(
        num_samples=16, num_chains=2, warmup=12, num_particles=1, local_steps=2, seed=0
    )
    n, kept = len(data), 8
    assert sizes == [(6, n), (6, n), (4, n)]
    assert post.samples["ka"].shape == (16, n) and post.samples["sigma"].shape == (16,)
    # every draw is a consistent state: its trajectory solves its own locals
    again = pyro_hds.solve(
        pk_oral.rhs,
        torch.zeros(2),
        data.times,
        {k: post.samples[k].reshape(-1) for k in ("ka", "cl", "v")},
        solver=pyro_hds.RK4(substeps=4),
        t0=0.0,
        doses=data[torch.arange(n).repeat(16)].doses,
    ).ys.reshape(16, n, -1, 2)
    torch.testing.assert_close(post.samples["x"], again, rtol=1e-4, atol=1e-4)
    # chain after chain, sweep after sweep: consecutive draws of a chain share the locals of
    # the individuals whose moves of a sweep were all rejected (two random-walk steps near
    # the target's 0.35 and a Laplace step: about 0.65^2 * 0.2, some 8%), draws of two
    # chains none; draws out of order would share none
    ka = post.samples["ka"].reshape(2, kept, n)
    same_next = (ka[:, 1:] == ka[:, :-1]).double().mean()
    assert 0.02 < float(same_next) < 0.9
    assert not bool((ka[0][:, None] == ka[1][None]).any())
