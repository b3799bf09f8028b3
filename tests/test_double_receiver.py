"""The prescribed double-receiver model (DR_Constant) on the vi-hds plate-reader data."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

import pyro_hds
from pyro_hds.datasets import ChannelScaler, folds, heldout_device_split, load_vihds, train_test
from pyro_hds.models import double_receiver as dr

try:
    DATA = load_vihds(download=False)
except FileNotFoundError:  # pragma: no cover - the shared data folder is part of the setup
    DATA = None

needs_data = pytest.mark.skipif(DATA is None, reason="vi-hds data not found (../shared/data)")


def _validated_fit(model, train, test, *, lr, particles):
    """30 steps (K = 10, batch 36) with the held-out bound logged every 10: (result, bounds)."""
    pyro.clear_param_store()
    result = pyro_hds.fit(
        model,
        train,
        objective=pyro_hds.IWAE(num_particles=10),
        num_steps=30,
        batch_size=36,
        lr=lr,
        seed=0,
        progress=False,
        validation=test,
        validate_every=10,
        validation_particles=particles,
    )
    return result, [float(b) for b in result.history["val_bound"]]


def test_rhs_matches_the_equations_at_a_point():
    p = {name: torch.tensor(math.exp(mu)) for name, (mu, _) in dr.POPULATION_PRIORS.items()}
    p.update(r=torch.tensor(1.2), K=torch.tensor(2.5), tlag=torch.tensor(1.5))
    p.update(rc=torch.tensor(0.8), aR=torch.tensor(3.0), aS=torch.tensor(0.5))
    p.update(c6=torch.tensor(100.0), c12=torch.tensor(0.0))
    y = torch.tensor([0.3, 0.2, 0.1, 0.05, 0.01, 0.02, 0.7, 0.4])
    t = torch.tensor(2.0)
    f = {k: float(v) for k, v in p.items()}
    x, rfp, yfp, cfp, f510, f430, lux, las = y.tolist()
    gamma = f["r"] / (1 + math.exp(-4 * (2.0 - f["tlag"]))) * (1 - x / f["K"])
    a, b = f["KR6"] * 100.0, 0.0
    b_r = lux**2 * (a ** f["nR"] + b ** f["nR"]) / (1 + a + b) ** f["nR"]
    a, b = f["KS6"] * 100.0, 0.0
    b_s = las**2 * (a ** f["nS"] + b ** f["nS"]) / (1 + a + b) ** f["nS"]
    den76 = 1 + f["KGR_76"] * b_r + f["KGS_76"] * b_s
    den81 = 1 + f["KGR_81"] * b_r + f["KGS_81"] * b_s
    p76 = (f["e76"] + f["KGR_76"] * b_r + f["KGS_76"] * b_s) / den76
    p81 = (f["e81"] + f["KGR_81"] * b_r + f["KGS_81"] * b_s) / den81
    rc = f["rc"]
    want = [
        gamma * x,
        rc - (gamma + f["drfp"]) * rfp,
        rc * f["aYFP"] * p81 - (gamma + f["dyfp"]) * yfp,
        rc * f["aCFP"] * p76 - (gamma + f["dcfp"]) * cfp,
        rc * f["autoY"] - gamma * f510,
        rc * f["autoC"] - gamma * f430,
        rc * f["aR"] - (gamma + f["dR"]) * lux,
        rc * f["aS"] - (gamma + f["dS"]) * las,
    ]
    torch.testing.assert_close(dr.rhs(t, y, p), torch.tensor(want), rtol=1e-12, atol=1e-15)
    obs = dr.observables(y[None])
    torch.testing.assert_close(
        obs[0], torch.tensor([x, x * rfp, x * (yfp + f510), x * (cfp + f430)])
    )


@needs_data
def test_sites_shapes_and_receptor_rates_come_from_parts():
    assert DATA is not None
    data = ChannelScaler().fit_transform(DATA)
    wells = torch.tensor([0, 60, 100, 150, 200, 300])  # wells of several devices
    sub = data[wells]
    values = {"aR": torch.tensor([1.0, 2.0, 3.0]), "aS": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    tr = pyro.poutine.trace(pyro.poutine.condition(dr.model, values)).get_trace(sub)
    assert tr.nodes["states"]["value"].shape == (6, 86, 8)
    assert tr.nodes["y"]["fn"].batch_shape == (6,)
    assert math.isfinite(float(tr.log_prob_sum()))
    # the luxR state grows at rc aR at first: its ratio to the lasR state's reveals the parts
    states = tr.nodes["states"]["value"]
    feats = sub.group_features[sub.groups]
    lux_part, las_part = feats[:, :3].argmax(-1), feats[:, 3:].argmax(-1)
    ratio = states[:, 1, 6] / states[:, 1, 7]
    population = dr.population_values(tr.nodes["population"]["value"])
    d_r, d_s = float(population["dR"]), float(population["dS"])
    expected = values["aR"][lux_part] / values["aS"][las_part]
    # over the first interval (0.19 h) the degradations change the ratio by under |dR - dS| t
    assert torch.allclose(ratio, expected, rtol=abs(d_r - d_s) * 0.2 + 0.02)


@needs_data
@pytest.mark.parametrize("model", [dr.model, dr.model_well_noise], ids=["constant", "well_noise"])
def test_short_training_improves_the_held_out_bound(model):
    assert DATA is not None
    train, test = train_test(DATA, *folds(DATA, k=4, seed=0)[0], dtype=torch.float32)
    _, bounds = _validated_fit(model, train, test, lr=0.01, particles=50)
    assert len(bounds) == 3 and all(math.isfinite(b) for b in bounds)
    assert bounds[-1] > bounds[0] + 100, bounds  # nats per well, from about -5000
    pyro.clear_param_store()


@needs_data
def test_zero_shot_prediction_for_a_device_never_seen():
    # train without any R33S32 well; its parts (LuxR R33, LasR S32) appear in other devices, so
    # its receptor rates and the encoder's device description are known: the held-out bound of
    # its wells must rise with training although none of them was seen
    assert DATA is not None
    train, test = train_test(DATA, *heldout_device_split(DATA, "R33S32"), dtype=torch.float32)
    assert set(test.groups.tolist()) == {DATA.group_names.index("R33S32")}
    assert DATA.group_names.index("R33S32") not in set(train.groups.tolist())
    result, bounds = _validated_fit(dr.model, train, test, lr=0.01, particles=50)
    assert all(math.isfinite(b) for b in bounds) and bounds[-1] > bounds[0] + 100, bounds
    post = result.predict(test, num_samples=20, num_particles=5, seed=0)
    assert post.samples["r"].shape == (20, len(test))
    assert torch.isfinite(post.predictive["y"]).all()
    pyro.clear_param_store()


def test_growth_variant_scales_every_production_term():
    p = {name: torch.tensor(math.exp(mu)) for name, (mu, _) in dr.POPULATION_PRIORS.items()}
    p.update(r=torch.tensor(1.2), K=torch.tensor(2.5), tlag=torch.tensor(1.5))
    p.update(rc=torch.tensor(0.8), aR=torch.tensor(3.0), aS=torch.tensor(0.5))
    p.update(c6=torch.tensor(100.0), c12=torch.tensor(0.0))
    y = torch.tensor([0.3, 0.2, 0.1, 0.05, 0.01, 0.02, 0.7, 0.4])
    t = torch.tensor(2.0)
    base = dr.rhs(t, y, p)
    es = 0.2
    m = (1 - es) * 1.2 / (1 + math.exp(-4 * (2.0 - 1.5))) + es
    grown = dr.rhs(t, y, dict(p, es=torch.tensor(es)))
    # production = d/dt + loss; the loss terms are the same in both
    zero = dict(p, rc=torch.tensor(0.0))
    loss = dr.rhs(t, y, zero)
    torch.testing.assert_close(grown - loss, m * (base - loss), rtol=1e-12, atol=1e-15)


@needs_data
def test_growth_model_has_its_coupling_site():
    assert DATA is not None
    data = ChannelScaler().fit_transform(DATA)[torch.arange(4)]
    tr = pyro.poutine.trace(dr.model_growth).get_trace(data)
    names = dr.population_names(growth=True)
    assert names == (*dr.POPULATION_PRIORS, "es")
    assert tr.nodes["population"]["value"].shape == (26,)
    assert tr.nodes["states"]["value"].shape == (4, 86, 8)
    # es's prior is its own entry of the population site's log-normal
    base = tr.nodes["population"]["fn"].base_dist.base_dist
    assert (float(base.loc[-1]), float(base.scale[-1])) == dr.GROWTH_PRIOR
    assert math.isfinite(float(tr.log_prob_sum()))


@needs_data
def test_blackbox_model_trains_its_network_and_improves_the_held_out_bound():
    from pyro_hds.models import double_receiver_blackbox as bb

    assert DATA is not None
    train, test = train_test(DATA, *folds(DATA, k=4, seed=0)[0], dtype=torch.float32)
    model = bb.make_model()
    tr = pyro.poutine.trace(model).get_trace(train[torch.arange(3)])
    assert tr.nodes["z"]["value"].shape == (3, 5)
    assert tr.nodes["states"]["value"].shape == (3, 86, 10)
    assert (tr.nodes["states"]["value"][..., 6:] > 0).all()  # variances stay positive
    assert model.network is not None
    before = model.network.species[0].weight.detach().clone()
    _, bounds = _validated_fit(model, train, test, lr=0.005, particles=20)
    assert all(math.isfinite(b) for b in bounds) and bounds[-1] > bounds[0] + 50, bounds
    assert not torch.equal(model.network.species[0].weight.detach(), before)
    pyro.clear_param_store()


@needs_data
def test_hierarchical_blackbox_has_population_device_and_well_codes():
    from pyro_hds.models import double_receiver_blackbox as bb

    assert DATA is not None
    data = ChannelScaler().fit_transform(DATA).to(dtype=torch.float32)
    model = bb.make_model(hierarchical=True)
    tr = pyro.poutine.trace(model).get_trace(data[torch.arange(0, 312, 40)])
    assert tr.nodes["x"]["value"].shape == (5,)
    assert tr.nodes["w"]["value"].shape == (6, 2)
    assert tr.nodes["z"]["value"].shape == (8, 5)
    assert math.isfinite(float(tr.log_prob_sum().detach()))
    guide = pyro_hds.AmortizedGuide(model)
    guide(data[torch.arange(8)])
    assert guide.levels == {"x": "global", "w": "group", "z": "local"}
    # the IWAE loss is finite with particle plates on every level
    loss = pyro_hds.IWAE(num_particles=3, num_outer_particles=2).differentiable_loss(
        model, guide, data[torch.arange(8)]
    )
    assert torch.isfinite(loss)
    pyro.clear_param_store()


def test_hybrid_promoter_network_replaces_the_promoter_functions():
    net = dr.PromoterNetwork()
    p = {name: torch.tensor(math.exp(mu)) for name, (mu, _) in dr.POPULATION_PRIORS.items()}
    p.update(r=torch.tensor(1.2), K=torch.tensor(2.5), tlag=torch.tensor(1.5))
    p.update(rc=torch.tensor(0.8), aR=torch.tensor(3.0), aS=torch.tensor(0.5))
    p.update(c6=torch.tensor(100.0), c12=torch.tensor(0.0))
    y = torch.tensor([0.3, 0.2, 0.1, 0.05, 0.01, 0.02, 0.7, 0.4])
    t = torch.tensor(2.0)
    q = dr.constant_terms(p)
    out = dr.rhs_constant_terms(t, y, q, promoter=net)
    b_r = y[6] ** 2 * q["hill_R"]
    b_s = y[7] ** 2 * q["hill_S"]
    with torch.no_grad():
        out = out.detach()
        p76, p81 = net(b_r, b_s)
    assert 0 < float(p76) < 1 and 0 < float(p81) < 1
    gamma = 1.2 / (1 + math.exp(-2.0)) * (1 - 0.3 / 2.5)
    want_yfp = float(q["prod_yfp"]) * float(p81) - (gamma + p["dyfp"]) * 0.1
    want_cfp = float(q["prod_cfp"]) * float(p76) - (gamma + p["dcfp"]) * 0.05
    torch.testing.assert_close(out[2], torch.tensor(want_yfp), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out[3], torch.tensor(want_cfp), rtol=1e-9, atol=1e-12)
    # every other component is the prescribed model's
    base = dr.rhs(t, y, p)
    keep = [0, 1, 4, 5, 6, 7]
    torch.testing.assert_close(out[keep], base[keep], rtol=1e-12, atol=1e-15)


@needs_data
def test_hybrid_model_drops_the_promoter_sites_and_trains():
    assert DATA is not None
    data = ChannelScaler().fit_transform(DATA).to(dtype=torch.float32)
    model = dr.make_hybrid_model()
    tr = pyro.poutine.trace(model).get_trace(data[torch.arange(4)])
    names = dr.population_names(promoter=True)
    assert not set(dr.PROMOTER_SITES) & set(names) and "KR6" in names
    assert tr.nodes["population"]["value"].shape == (25 - len(dr.PROMOTER_SITES),)
    assert {"population", "aR", "r"} <= set(tr.nodes)
    assert math.isfinite(float(tr.log_prob_sum().detach()))
    pyro.clear_param_store()
    result = pyro_hds.fit(
        model,
        data[torch.arange(72)],
        objective=pyro_hds.IWAE(num_particles=5),
        num_steps=3,
        batch_size=36,
        progress=False,
    )
    assert any(k.startswith("dr_hybrid_promoter") for k in result._store_state["params"])
    pyro.clear_param_store()


@needs_data
def test_train_test_scales_on_training_wells_and_rebases_both():
    assert DATA is not None
    train_idx, test_idx = folds(DATA, k=4, seed=0)[1]
    train, test = train_test(DATA, train_idx, test_idx)
    assert (train.total_size, test.total_size) == (len(train_idx), len(test_idx))
    assert torch.equal(test.indices, torch.arange(len(test_idx)))
    scales = ChannelScaler().fit(DATA[torch.as_tensor(train_idx)]).scales
    assert scales is not None
    # the test wells' values are divided by the TRAINING maxima (then each series shifted)
    raw = DATA.observations[torch.as_tensor(test_idx)] / scales
    torch.testing.assert_close(test.observations, raw - raw.amin(1, keepdim=True))


def test_hill_gradient_is_finite_without_inducer():
    """A well without C6 (or C12) has a receptor term 0^n; for Hill coefficients below 1 its
    plain power gradient is NaN (n 0^(n-1) times 0), which stopped a fit."""
    from pyro_hds.models.double_receiver import _hill

    k6 = torch.tensor([1e-5, 1e-5, 2e-3], dtype=torch.float64, requires_grad=True)
    k12 = torch.tensor([1e-3, 1e-3, 3e-4], dtype=torch.float64, requires_grad=True)
    n = torch.tensor([0.8, 1.3, 0.6], dtype=torch.float64, requires_grad=True)
    c6 = torch.tensor([0.0, 100.0, 50.0], dtype=torch.float64)
    c12 = torch.tensor([100.0, 0.0, 20.0], dtype=torch.float64)
    h = _hill(k6, k12, c6, c12, n)
    a, b = k6 * c6, k12 * c12
    s = 1 + a + b
    torch.testing.assert_close(h, (a**n + b**n) / s**n)
    h.sum().backward()
    for g in (k6.grad, k12.grad, n.grad):
        assert bool(torch.isfinite(g).all()), g
    # the third element (both inducers present) against finite differences
    assert torch.autograd.gradcheck(
        lambda x, y, m: _hill(x, y, c6[2:], c12[2:], m),
        (
            k6.detach()[2:].requires_grad_(),
            k12.detach()[2:].requires_grad_(),
            n.detach()[2:].requires_grad_(),
        ),
    )


def _conditioned_trace(model, values, data):
    return pyro.poutine.trace(pyro.poutine.condition(model, values)).get_trace(data)


@needs_data
def test_well_noise_model_is_dr_constant_when_every_well_has_the_same_precisions():
    # model_well_noise replaces the four population precisions by a local site prec (N, 4);
    # with every well given the same precisions, its likelihood is DR_Constant's
    assert DATA is not None
    wells = torch.tensor([0, 60, 100, 150, 200, 300])
    # standalone: six wells as the whole data set (a subset's plate scales its terms by 312/6);
    # float64, so that the comparisons below hold to rounding
    data = ChannelScaler().fit_transform(DATA)[wells].standalone().to(dtype=torch.float64)
    f64 = torch.float64
    shared = {
        k: torch.tensor(v, dtype=f64) for k, v in zip(dr.PRECISION_SITES, [800.0, 350.0, 1e4, 2e4])
    }
    common = {k: torch.full((6,), v, dtype=f64) for k, v in (("r", 1.1), ("K", 0.7), ("rc", 0.3))}
    # the population at its prior medians, the precisions set to the shared values
    medians = {
        k: torch.tensor(math.exp(mu), dtype=f64) for k, (mu, _) in dr.POPULATION_PRIORS.items()
    }
    population = torch.stack(list({**medians, **shared}.values()))
    base = _conditioned_trace(dr.model, {**common, "population": population}, data)
    values = {name: base.nodes[name]["value"] for name in ("aR", "aS", "tlag")}
    names = dr.population_names(noise="well")
    assert set(names) == set(dr.POPULATION_PRIORS) - set(dr.PRECISION_SITES)
    values["population"] = torch.stack([medians[k] for k in names])
    prec = torch.stack([shared[k] for k in dr.PRECISION_SITES]).expand(6, 4).clone()
    values.update(common, prec=prec)
    well = _conditioned_trace(dr.model_well_noise, values, data)
    assert well.nodes["prec"]["fn"].batch_shape == (6,)
    assert well.nodes["prec"]["fn"].event_shape == (4,)
    assert well.nodes["prec_loc"]["value"].shape == (4,)
    assert well.nodes["population"]["value"].shape == (21,)
    torch.testing.assert_close(
        well.nodes["states"]["value"], base.nodes["states"]["value"], rtol=0, atol=0
    )
    base.compute_log_prob()
    well.compute_log_prob()
    torch.testing.assert_close(well.nodes["y"]["log_prob"], base.nodes["y"]["log_prob"])
    # and a well's own precisions are its own: doubling well 2's RFP precision changes only
    # its RFP terms, by the Gaussian's 0.5 log 2 - (tau / 2) e^2 per time
    doubled = prec.clone()
    doubled[2, 1] *= 2
    other = _conditioned_trace(dr.model_well_noise, dict(values, prec=doubled), data)
    other.compute_log_prob()
    diff = other.nodes["y"]["log_prob"] - well.nodes["y"]["log_prob"]
    assert torch.count_nonzero(diff) == 1 and diff[2] != 0
    err = data.observations[2, :, 1] - dr.observables(well.nodes["states"]["value"])[2, :, 1]
    want = 86 * 0.5 * math.log(2.0) - 0.5 * float(shared["prec_rfp"]) * float((err**2).sum())
    # float64 sums of 344 terms on each side: rounding far below 1e-9 of the difference
    assert abs(float(diff[2]) - want) < 1e-9 * abs(want)


def test_population_site_names_and_values():
    # the population site holds POPULATION_PRIORS in order; population_values splits it by name
    assert dr.population_names() == tuple(dr.POPULATION_PRIORS)
    values = torch.arange(25.0).reshape(1, 25).expand(3, 25)
    by_name = dr.population_values(values)
    assert list(by_name) == list(dr.POPULATION_PRIORS)
    torch.testing.assert_close(by_name["KGR_76"], torch.full((3,), 6.0))
    with pytest.raises(ValueError, match="growth=True"):
        dr.population_values(values, growth=True)


@needs_data
def test_population_site_priors_and_arviz_coordinates():
    assert DATA is not None
    data = ChannelScaler().fit_transform(DATA)[torch.arange(4)].to(dtype=torch.float32)
    tr = pyro.poutine.trace(dr.model).get_trace(data)
    site = tr.nodes["population"]
    base = site["fn"].base_dist.base_dist  # Independent(LogNormal(Normal))
    want = torch.tensor(list(dr.POPULATION_PRIORS.values()), dtype=torch.float32)
    torch.testing.assert_close(base.loc, want[:, 0])
    torch.testing.assert_close(base.scale, want[:, 1])
    assert site["infer"]["event_coords"] == ("parameter", dr.population_names())
    pyro.clear_param_store()
    result = pyro_hds.fit(
        dr.model, data, objective=pyro_hds.IWAE(num_particles=3), num_steps=2, progress=False
    )
    tree = result.to_arviz(data, num_samples=5, num_particles=3)
    pop = tree["posterior"]["population"]
    assert pop.dims == ("chain", "draw", "parameter")
    assert list(pop.coords["parameter"].values) == list(dr.POPULATION_PRIORS)
    assert float(pop.sel(parameter="KR6").min()) > 0
    # labels that do not fit are an error naming the site, not a mislabelled export
    from pyro_hds.arviz import to_datatree

    post = result.posterior(data, num_samples=5, num_particles=3)
    names = dr.population_names()
    post.event_coords = {"population": ("parameter", names[:-1])}
    with pytest.raises(ValueError, match=r"'population' has 25 entries .* name 24"):
        to_datatree(post, data)
    post.event_coords = {"population": ("parameter", names), "aR": ("parameter", ("a", "b", "c"))}
    with pytest.raises(ValueError, match="dim 'parameter' of site 'aR'"):
        to_datatree(post, data)
    pyro.clear_param_store()
