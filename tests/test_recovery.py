"""Recovery, calibration and amortization on simulated population-PK data with known truth.

Two fits of ``pyro_hds.models.pk_oral`` (3 groups; 24 patients each, of which 4 per group are
held out of the first fit): one on the 60 training patients, one on all 72. Criteria:

* calibration: with the importance-resampled posterior (K = 256 guide draws per patient), the
  90% intervals of each patient's ka, CL and V cover the truth for a number of the 72 patients
  inside the central 99.8% of Binomial(72, 0.9), i.e. 56 to 71;
* recovery: the true population and group parameters lie inside their 99.8% posterior
  intervals (3.1 posterior SD for a normal posterior);
* the same recovery, including the noise SD, for a third fit on all 72 patients with
  ``AmortizedGuide(semi_amortized=True)`` followed by ``FitResult.gibbs`` (exact draws). The
  purely amortized guide overestimates the noise SD (a strict xfail records that); the
  semi-amortized guide removes most of that bias but not all: its importance-resampled sigma
  came out at 0.109-0.1115 +- 0.004 for a true 0.1 in runs of this fixture, 2.3-3 posterior
  SD high, at the edge of the 99.8% interval, so the criterion is applied to the chains;
* amortization: for the 12 held-out patients, ``predict()`` from the first fit and the
  posterior from the fit that saw them agree: every posterior mean within 0.5 posterior SD
  where both importance samplers reach an effective sample size of at least 30 of their
  K = 2048 draws (then the draws are close to the exact conditional posterior: the Monte
  Carlo error of a difference of two 300-draw means is about 0.1 SD, and the 12 extra
  patients move the population posterior by well under 0.5 SD); at least 4 of the 12 must
  qualify, and every patient must agree within 2 SD (where the ESS is a few, the resampled
  draws stay near each fit's own proposal).
"""

from __future__ import annotations

import pyro
import pytest
import torch

import pyro_hds
from pyro_hds.models import pk_oral

# three fits of 1000 steps and a Gibbs run (several minutes): outside the default run,
# .ci/run runs them
pytestmark = pytest.mark.slow

PER_GROUP, HELD = 24, 4
MIN_ESS = 30  # importance-sampling ESS (of K_NEW) above which a draw is close to exact
DRAWS, K_POST, K_NEW = 300, 256, 2048


def _fit(data, semi=False):
    pyro.clear_param_store()
    return pyro_hds.fit(
        pk_oral.model,
        data,
        guide=pyro_hds.AmortizedGuide(pk_oral.model, semi_amortized=semi),
        objective=pyro_hds.IWAE(num_particles=16),
        num_steps=1000,
        batch_size=24,
        lr=0.02,
        seed=0,
        progress=False,
    )


@pytest.fixture(scope="module")
def setting():
    data, truth = pk_oral.simulate(per_group=PER_GROUP, seed=11)
    position = torch.arange(len(data)) % PER_GROUP
    held = (position >= PER_GROUP - HELD).nonzero().flatten()
    train = (position < PER_GROUP - HELD).nonzero().flatten()
    new = data[held].standalone()
    partial = _fit(data[train])
    predicted = partial.predict(new, num_samples=DRAWS, num_particles=K_NEW, seed=1)
    full = _fit(data)
    posterior = full.posterior(num_samples=DRAWS, num_particles=K_POST, seed=1)
    seen = full.posterior(new, num_samples=DRAWS, num_particles=K_NEW, seed=2)
    semi = _fit(data, semi=True).gibbs(
        num_samples=DRAWS,
        num_chains=4,
        warmup=150,
        num_particles=1,
        local_steps=2,
        outer_steps=2,  # with one, v_pop's chains disagreed (split R-hat 1.13)
        seed=1,
        progress=False,
    )
    pyro.clear_param_store()
    return dict(truth=truth, predicted=predicted, posterior=posterior, seen=seen, semi=semi)


@pytest.mark.parametrize("name", ["ka", "cl", "v"])
def test_individual_intervals_are_calibrated(setting, name):
    d = setting["posterior"].samples[name].double()
    true = setting["truth"][name]
    lo, hi = torch.quantile(d, 0.05, dim=0), torch.quantile(d, 0.95, dim=0)
    covered = int(((lo <= true) & (true <= hi)).sum())
    assert 56 <= covered <= 71, f"{name}: {covered} of 72 intervals cover the truth"


def _inside(name, setting, q=0.001, fit="posterior"):
    d = setting[fit].samples[name].double().reshape(DRAWS, -1)
    true = setting["truth"][name].double().reshape(-1)
    lo, hi = torch.quantile(d, q, dim=0), torch.quantile(d, 1 - q, dim=0)
    return bool(((lo <= true) & (true <= hi)).all()), (d.mean(0), d.std(0), true)


@pytest.mark.parametrize("name", ["ka_pop", "cl_pop", "v_pop", "group_sd", "cl_group", "omega"])
def test_population_parameters_are_recovered(setting, name):
    ok, detail = _inside(name, setting)
    assert ok, f"{name}: mean, sd, truth = {detail}"


@pytest.mark.xfail(
    strict=True,
    reason="known bias: with the purely amortized guide the noise SD comes out high (about "
    "0.12 for a true 0.1: the encoder's approximation gap shrinks as the noise grows); "
    "AmortizedGuide(semi_amortized=True) removes most of it (next test)",
)
@pytest.mark.parametrize("name", ["sigma"])
def test_variance_parameters_are_recovered(setting, name):
    ok, detail = _inside(name, setting)
    assert ok, f"{name}: mean, sd, truth = {detail}"


@pytest.mark.parametrize(
    "name", ["sigma", "omega", "ka_pop", "cl_pop", "v_pop", "group_sd", "cl_group"]
)
def test_semi_amortized_fit_and_gibbs_recover_every_population_parameter(setting, name):
    ok, detail = _inside(name, setting, fit="semi")
    assert ok, f"{name}: mean, sd, truth = {detail}"


def test_predict_agrees_with_fitting_the_new_individuals(setting):
    predicted, seen = setting["predicted"], setting["seen"]
    # importance resampling is close to the exact conditional posterior only where its
    # effective sample size is large; with an ESS of a few (a patient whose posterior the
    # encoder's proposal misses) the draws stay near each fit's own proposal, so the two
    # fits may differ there by up to about 1 SD without anything being wrong
    converged = (predicted.ess >= MIN_ESS) & (seen.ess >= MIN_ESS)
    assert int(converged.sum()) >= len(converged) // 3, (predicted.ess, seen.ess)
    for name in ("ka", "cl", "v"):
        a = predicted.samples[name].double().log()
        b = seen.samples[name].double().log()
        sd = torch.sqrt(0.5 * (a.var(0) + b.var(0)))
        z = (a.mean(0) - b.mean(0)) / sd
        assert z[converged].abs().max() < 0.5, f"{name}: standardized differences {z}"
        # every patient, converged or not: the same posterior up to the proposals' pull
        assert z.abs().max() < 2.0, f"{name}: standardized differences {z}"
