"""AmortizedGuide and the encoders: site levels, shapes, exact densities, minibatches."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyro_hds
from pyro_hds.data import Dataset
from pyro_hds.encoders import ConvEncoder, MaskedEncoder, MLPEncoder, make_encoder
from pyro_hds.guides import AmortizedGuide


def make_data(n=12, t=20, seed=0, features=False):
    gen = torch.Generator().manual_seed(seed)
    groups = torch.arange(n) % 3
    level = torch.tensor([0.5, 1.0, 2.0])[groups]
    z = level + 0.3 * torch.randn(n, generator=gen)
    ts = torch.linspace(0, 1, t)
    y = z[:, None, None] * ts[None, :, None] + 0.05 * torch.randn(n, t, 1, generator=gen)
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]) if features else None
    return Dataset.from_arrays(
        y,
        ts,
        groups=groups,
        group_names=["a", "b", "c"],
        group_features=feats,
        inputs=torch.rand(n, 2, generator=gen),
    )


def model(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    noise = pyro.sample("noise", dist.LogNormal(-2.0, 0.5))
    with pyro_hds.groups(data):
        g = pyro.sample("g", dist.Normal(mu, 1.0))
    with pyro_hds.individuals(data):
        z = pyro.sample("z", dist.Normal(g[..., data.groups], 0.5))
        frac = pyro.sample("frac", dist.Beta(2.0, 2.0))
        x = (z * frac / frac)[..., None, None] * data.times[:, None]
        pyro_hds.observe("y", dist.Normal(x, noise[..., None, None]), data)


def test_site_levels_and_unknown_plate():
    data = make_data()
    guide = AmortizedGuide(model)
    guide(data)
    assert guide.levels == {
        "mu": "global",
        "noise": "global",
        "g": "group",
        "z": "local",
        "frac": "local",
    }
    assert isinstance(guide.encoder, ConvEncoder)

    def bad(data):
        with pyro.plate("channels", 3):
            pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"site 'w' is in plate\(s\) \['channels'\]"):
        AmortizedGuide(bad)(data)


def test_sample_shapes_under_particle_plates_and_supports():
    data = make_data()
    guide = AmortizedGuide(model)
    with pyro.plate("_particles", 7, dim=-2):
        tr = pyro.poutine.trace(guide).get_trace(data)
    assert tr.nodes["mu"]["value"].shape == (7, 1)
    assert tr.nodes["g"]["value"].shape == (7, 3)
    assert tr.nodes["z"]["value"].shape == (7, 12)
    frac = tr.nodes["frac"]["value"]
    assert torch.all((frac > 0) & (frac < 1))
    assert torch.all(tr.nodes["noise"]["value"] > 0)
    w = pyro_hds.IWAE(num_particles=5, num_outer_particles=2).log_weights(model, guide, data)
    assert w.local.shape == (2, 5, 12) and torch.isfinite(w.local).all()


def test_log_density_is_exact():
    data = make_data()
    guide = AmortizedGuide(model)
    tr = pyro.poutine.trace(guide).get_trace(data)
    locs = guide.local_distributions(data)
    loc, scale = locs["frac"]
    value = tr.nodes["frac"]["value"]
    u = torch.logit(value)  # biject_to(unit interval) is the sigmoid
    manual = dist.Normal(loc, scale).log_prob(u) - torch.log(value * (1 - value))
    torch.testing.assert_close(tr.nodes["frac"]["fn"].log_prob(value), manual)
    mloc, mscale = pyro.param("AmortizedGuide.noise.loc"), pyro.param("AmortizedGuide.noise.scale")
    v = tr.nodes["noise"]["value"]
    manual = dist.Normal(mloc, mscale).log_prob(v.log()) - v.log()
    torch.testing.assert_close(tr.nodes["noise"]["fn"].log_prob(v), manual)


def test_trains_with_trace_elbo_and_reaches_the_encoder():
    data = make_data()
    guide = AmortizedGuide(model)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, guide, data)
    loss.backward()
    assert guide.encoder.conv.weight.grad is not None
    assert torch.isfinite(guide.encoder.conv.weight.grad).all()
    pyro.clear_param_store()
    result = pyro_hds.fit(
        model,
        data,
        guide=AmortizedGuide(model),
        objective=elbo,
        num_steps=150,
        lr=0.03,
        progress=False,
    )
    losses = result.history["loss"]
    assert np.mean(losses[-15:]) < np.mean(losses[:15])


def test_minibatch_plate_scale():
    data = make_data()
    guide = AmortizedGuide(model)
    tr = pyro.poutine.trace(guide).get_trace(data[[1, 4, 7]])
    assert tr.nodes["z"]["value"].shape == (3,)
    assert tr.nodes["z"]["scale"] == pytest.approx(12 / 3)


def test_masked_encoder_ignores_unobserved_entries():
    data = make_data()
    y = data.observations.clone()
    mask = data.mask.clone()
    mask[:, 10:] = False
    enc = MaskedEncoder(1)
    a = enc(data.replace(observations=torch.where(mask, y, 0.0), mask=mask))
    b = enc(data.replace(observations=torch.where(mask, y, 123.0), mask=mask))
    torch.testing.assert_close(a, b)
    assert a.shape == (12, enc.out_features)
    # and a model with missing values gets the masked encoder by default
    guide = AmortizedGuide(model)
    guide(data.replace(mask=mask))
    assert isinstance(guide.encoder, MaskedEncoder)


def test_group_features_predict_unseen_groups():
    data = make_data(features=True)
    guide = AmortizedGuide(model)
    guide(data)
    assert guide.group_maps is not None
    new = Dataset.from_arrays(
        data.observations[:2],
        data.times,
        groups=[0, 0],
        group_names=["d"],
        group_features=torch.tensor([[0.0, 2.0]]),
        inputs=data.inputs[:2],
    )
    tr = pyro.poutine.trace(guide).get_trace(new)
    assert tr.nodes["g"]["value"].shape == (1,)
    assert math.isfinite(float(tr.nodes["z"]["value"].sum()))


def test_config_round_trip():
    data = make_data()
    guide = AmortizedGuide(model, init_scale=0.2)
    guide(data)
    cfg = guide.config()
    assert cfg["encoder"]["type"] == "ConvEncoder"
    again = AmortizedGuide.from_config(model, cfg)
    assert again.init_scale == 0.2
    enc = make_encoder(cfg["encoder"])
    assert isinstance(enc, ConvEncoder) and enc.out_features == guide.encoder.out_features
    with pytest.raises(ValueError, match="init_scale"):
        AmortizedGuide(model, init_scale=0.0)


def test_full_local_covariance_is_the_gaussian_it_claims():
    # with the correlation head's output fixed at B = 0.8, (u_z, u_frac) of each individual is
    # Gaussian with covariance [[s_z^2, B s_z^2], [B s_z^2, B^2 s_z^2 + s_f^2]], and the guide's
    # log-density is that Gaussian's, plus the logit's log-Jacobian for frac
    data = make_data()
    guide = AmortizedGuide(model, local_covariance="full")
    guide(data)
    assert guide.coef_heads is not None and set(guide.coef_heads) == {"frac"}
    with torch.no_grad():
        guide.coef_heads["frac"].bias.fill_(0.8)
    draws = 20_000
    with pyro.plate("_particles", draws, dim=-2):
        tr = pyro.poutine.trace(guide).get_trace(data)
    params = guide.local_distributions(data)
    (mu_z, s_z), (mu_f, s_f) = params["z"], params["frac"]
    u_z = tr.nodes["z"]["value"]
    frac = tr.nodes["frac"]["value"]
    u_f = torch.logit(frac)
    cov_zf = ((u_z - u_z.mean(0)) * (u_f - u_f.mean(0))).mean(0)
    var_f = u_f.var(0)
    want_zf = 0.8 * s_z**2
    want_f = 0.64 * s_z**2 + s_f**2
    # Monte Carlo standard errors of a covariance and a variance, about sd^2 * sqrt(2 / n)
    tol = 5 * math.sqrt(2 / draws)
    assert ((cov_zf - want_zf).abs() < tol * s_z * want_f.sqrt()).all()
    assert ((var_f - want_f).abs() < tol * want_f).all()
    loc = torch.stack([mu_z, mu_f], -1).detach()
    cov = torch.stack(
        [torch.stack([s_z**2, want_zf], -1), torch.stack([want_zf, want_f], -1)], -2
    ).detach()
    mvn = dist.MultivariateNormal(loc, covariance_matrix=cov)
    manual = mvn.log_prob(torch.stack([u_z, u_f], -1)[:5]) - torch.log(frac * (1 - frac))[:5]
    lq = tr.nodes["z"]["fn"].log_prob(u_z) + tr.nodes["frac"]["fn"].log_prob(frac)
    torch.testing.assert_close(lq[:5].detach(), manual.detach(), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="local_covariance='diagonal'"):
        pyro_hds.IWAE(num_particles=3, dreg=True).differentiable_loss(model, guide, data)
    assert AmortizedGuide.from_config(model, guide.config()).local_covariance == "full"
    with pytest.raises(ValueError, match="local_covariance"):
        AmortizedGuide(model, local_covariance="banded")


def test_mlp_encoder_masks_shapes_and_round_trip():
    data = make_data()
    enc = MLPEncoder(data.num_times, data.num_channels, hidden=32, depth=3)
    mask = data.mask.clone()
    mask[:, 5:] = False
    a = enc(data.replace(observations=torch.where(mask, data.observations, 0.0), mask=mask))
    b = enc(data.replace(observations=torch.where(mask, data.observations, 9.0), mask=mask))
    torch.testing.assert_close(a, b)  # unobserved values do not matter
    assert a.shape == (12, 32)
    # a missing value differs from an observed zero: the mask is an input
    c = enc(data.replace(observations=torch.where(mask, data.observations, 0.0)))
    assert not torch.allclose(a, c)
    again = make_encoder(enc.config())
    assert isinstance(again, MLPEncoder) and again.config() == enc.config()
    with pytest.raises(ValueError, match="built for"):
        enc(make_data(t=7))
    with pytest.raises(ValueError, match="depth"):
        MLPEncoder(5, 1, depth=0)
    guide = AmortizedGuide(model, encoder=MLPEncoder(data.num_times, data.num_channels))
    loss = pyro_hds.IWAE(num_particles=3).differentiable_loss(model, guide, data)
    loss.backward()
    assert guide.encoder.net[0].weight.grad is not None


def _fit_briefly(data, guide, **kwargs):
    return pyro_hds.fit(
        model,
        data,
        guide=guide,
        objective=pyro_hds.IWAE(num_particles=4),
        num_steps=20,
        progress=False,
        **kwargs,
    )


def test_semi_amortized_corrections_reach_seen_individuals_only():
    data = make_data(n=12)
    pyro.clear_param_store()
    plain = AmortizedGuide(model)
    pyro.set_rng_seed(0)
    plain(data)
    base = {
        k: (loc.detach(), s.detach()) for k, (loc, s) in plain.local_distributions(data).items()
    }
    pyro.clear_param_store()
    pyro.set_rng_seed(0)  # same initial networks as `plain`
    semi = AmortizedGuide(model, semi_amortized=True)
    semi(data)
    store = pyro.get_param_store()
    assert tuple(store["AmortizedGuide.z.corrections"].shape) == (12, 2)
    # zero corrections at the start: the same guide as the plain one
    for k, (loc, s) in semi.local_distributions(data).items():
        assert torch.equal(loc, base[k][0]) and torch.equal(s, base[k][1])
    with torch.no_grad():
        store["AmortizedGuide.z.corrections"][:, 0] = torch.arange(12.0)
    out = semi.local_distributions(data)["z"][0] - base["z"][0]
    assert torch.allclose(out, torch.arange(12.0), atol=1e-6)
    # a subset, also as a standalone data set, finds its own rows by id
    idx = torch.tensor([7, 2])
    for sub in (data[idx], data[idx].standalone()):
        out = semi.local_distributions(sub)["z"][0] - base["z"][0][idx]
        assert torch.allclose(out, torch.tensor([7.0, 2.0]), atol=1e-6)
    # new individuals with the same (default) ids but other data get the encoder alone
    other = make_data(n=12, seed=1)
    assert other.individual_ids == data.individual_ids
    plain_other = plain.local_distributions(other)["z"][0]
    assert torch.equal(semi.local_distributions(other)["z"][0], plain_other)


def test_semi_amortized_needs_all_training_individuals():
    data = make_data(n=12)
    pyro.clear_param_store()
    guide = AmortizedGuide(model, semi_amortized=True)
    with pytest.raises(ValueError, match="attach_training_data"):
        guide(data[torch.arange(4)])
    guide = AmortizedGuide(model, semi_amortized=True)
    guide.attach_training_data(data)
    guide(data[torch.arange(4)])  # a minibatch is fine once the guide knows the whole set
    with pytest.raises(ValueError, match="trained on 12"):
        guide.attach_training_data(data[torch.arange(5)])


@pytest.mark.parametrize("semi", [False, True])
def test_fit_save_load_keeps_the_local_guide(tmp_path, semi):
    # the encoder's data scales are buffers, not parameters: load must restore them too
    data = make_data(n=12)
    guide = AmortizedGuide(model, semi_amortized=semi)
    result = _fit_briefly(data, guide, batch_size=4)
    if semi:
        corrections = pyro.get_param_store()["AmortizedGuide.z.corrections"].detach()
        assert corrections.abs().sum() > 0  # trained
    before = result.guide.local_distributions(data)["z"][0].detach()
    result.save(tmp_path / "fit.pt")
    loaded = pyro_hds.load(tmp_path / "fit.pt", model)
    assert loaded.guide.semi_amortized == semi
    after = loaded.guide.local_distributions(data)["z"][0].detach()
    assert torch.allclose(before, after)


def test_semi_amortized_trains_encoder_then_corrections():
    data = make_data(n=12)
    guide = AmortizedGuide(model, semi_amortized=True, refine_fraction=0.25)
    snapshots = {}

    def snapshot(step, loss):
        if step in (14, 19):  # the last step of each phase (20 steps, the last 5 refine)
            store = pyro.get_param_store()
            snapshots[step] = {
                "encoder": [p.detach().clone() for p in guide.encoder.parameters()],
                "mu": store["AmortizedGuide.mu.loc"].detach().clone(),
                "corrections": store["AmortizedGuide.z.corrections"].detach().clone(),
            }

    _fit_briefly(data, guide, batch_size=6, callback=snapshot)
    first, last = snapshots[14], snapshots[19]
    assert float(first["corrections"].abs().max()) == 0.0  # not trained in the first phase
    assert float(last["corrections"].abs().max()) > 0.0
    assert all(torch.equal(a, b) for a, b in zip(first["encoder"], last["encoder"]))  # frozen
    assert not torch.equal(first["mu"], last["mu"])  # the globals keep learning
    with pytest.raises(ValueError, match="refine_fraction"):
        AmortizedGuide(model, semi_amortized=True, refine_fraction=1.0)


def test_default_init_is_the_exact_prior_median():
    """By default globals and group latents start at F^{-1}(1/2) of their priors exactly (a
    median of 15 draws, Pyro's init_to_median, misses LogNormal(-12, 3)'s log-median by about
    one unit)."""

    def wide(data):
        pyro.sample("k", dist.LogNormal(-12.0, 3.0))
        pyro.sample("v", dist.LogNormal(torch.tensor(1.0), 3.0).expand([3]).to_event(1))
        pyro.sample("h", dist.HalfNormal(2.0))
        with pyro_hds.groups(data):
            pyro.sample("g", dist.Normal(5.0, 4.0))
        with pyro_hds.individuals(data):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro_hds.observe("y", dist.Normal(z[..., None, None] * data.times[:, None], 1.0), data)

    data = make_data()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AmortizedGuide(wide)
    guide(data)
    store = pyro.get_param_store()
    torch.testing.assert_close(store["AmortizedGuide.k.loc"], torch.tensor(-12.0))
    torch.testing.assert_close(store["AmortizedGuide.v.loc"], torch.ones(3))
    # HalfNormal(2): median 2 * Phi^{-1}(3/4) = 1.34898
    torch.testing.assert_close(
        store["AmortizedGuide.h.loc"], torch.tensor(math.log(1.3489795)), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(store["AmortizedGuide.g.loc"], torch.full((3,), 5.0))


def test_prior_median_init_falls_back_to_sampled_median():
    # no inverse CDF (Gamma) or a multivariate prior (Dirichlet): Pyro's sampled median
    pyro.set_rng_seed(0)
    gamma = pyro_hds.init_to_prior_median({"fn": dist.Gamma(2.0, 1.0), "name": "a"})
    assert gamma.shape == () and 0.5 < float(gamma) < 3.0
    simplex = pyro_hds.init_to_prior_median({"fn": dist.Dirichlet(torch.ones(3)), "name": "p"})
    assert simplex.shape == (3,) and abs(float(simplex.sum()) - 1.0) < 1e-6
    # a masked, expanded float64 prior keeps its dtype and shape
    masked = dist.LogNormal(torch.zeros(2, dtype=torch.float64), 1.0).mask(torch.tensor([1, 0]) > 0)
    value = pyro_hds.init_to_prior_median({"fn": masked, "name": "m"})
    assert value.dtype == torch.float64 and value.shape == (2,)
    torch.testing.assert_close(value, torch.ones(2, dtype=torch.float64))


def test_positive_sites_draw_and_score_as_the_log_normal():
    # the guide's written-out log-normal (_ExpNormal) against torch's transformed Normal:
    # the same draws from the same generator state and the same log-densities, bit for bit
    from pyro_hds.guides import _ExpNormal
    from pyro_hds.objectives import _detach_distribution

    gen = torch.Generator().manual_seed(4)
    loc = torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    scale = 0.1 + torch.rand(4, 3, generator=gen, dtype=torch.float64)
    fast, ref = _ExpNormal(loc, scale), dist.LogNormal(loc, scale)
    torch.manual_seed(2)
    x = fast.rsample((5,))
    torch.manual_seed(2)
    assert torch.equal(x, ref.rsample((5,)))
    assert torch.equal(fast.log_prob(x), ref.log_prob(x))
    torch.testing.assert_close(fast.mean, ref.mean)
    torch.testing.assert_close(fast.variance, ref.variance)
    wide = fast.expand((2, 4, 3))
    assert wide.batch_shape == (2, 4, 3)
    assert torch.equal(wide.log_prob(x[:2]), ref.expand((2, 4, 3)).log_prob(x[:2]))
    torch.testing.assert_close(fast.to_event(1).log_prob(x), ref.to_event(1).log_prob(x))
    (g,) = torch.autograd.grad(fast.log_prob(x.detach()).sum(), loc)
    (g_ref,) = torch.autograd.grad(ref.log_prob(x.detach()).sum(), loc)
    assert torch.equal(g, g_ref)
    with pytest.raises(ValueError):
        _ExpNormal(loc, scale, validate_args=True).log_prob(-x.detach())
    # numbers broadcast as in torch's Normal
    torch.testing.assert_close(
        _ExpNormal(0.5, 2.0).log_prob(torch.tensor(1.5)),
        dist.LogNormal(0.5, 2.0).log_prob(torch.tensor(1.5)),
    )
    detached = _detach_distribution(fast.to_event(1))  # IWAE(dreg=True) rebuilds it
    assert not detached.base_dist.loc.requires_grad
    # the guide uses it for positive sites, global and local
    data = make_data()
    guide = AmortizedGuide(model)
    tr = pyro.poutine.trace(guide).get_trace(data)
    assert type(tr.nodes["noise"]["fn"]) is _ExpNormal
