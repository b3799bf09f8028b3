"""Tutorial 3: a hierarchical ODE model, fitted with amortized inference.

One-compartment pharmacokinetics with oral doses (``pyro_hds.models.pk_oral``): every patient
has their own absorption rate, clearance and volume; clearance also differs between three
groups (say, genotypes). We simulate data with known parameters, write the model as a plain
Pyro function with the two plates of pyro_hds, fit it with the hierarchical IWAE bound and an
amortized guide, check the posterior against the truth, correct it to the exact posterior with
particle Gibbs, predict new patients without refitting, and export to ArviZ.

Run: ``python tutorials/03_population_pk.py`` (``PYRO_HDS_QUICK=1`` for a smoke-sized run).
"""

# %%
import inspect
import os

import torch
from arviz_stats import summary

import pyro_hds
from pyro_hds.guides import AmortizedGuide
from pyro_hds.models import pk_oral
from pyro_hds.plotting import plot_fits

QUICK = os.environ.get("PYRO_HDS_QUICK") == "1"
torch.set_num_threads(1)

# %% Data: 3 groups x 34 patients (fewer when QUICK), two doses of 100 at t = 0 and 12 h
data, truth = pk_oral.simulate(per_group=6 if QUICK else 34, seed=0)
print(data)

# %% The model is an ordinary Pyro function of the data set. Sites outside any plate are
# population-level, sites in `pyro_hds.groups(data)` group-level, and sites in
# `pyro_hds.individuals(data)` individual-level; `pyro_hds.ode` solves the ODE for every
# particle and patient at once and `pyro_hds.observe` adds the masked likelihood.
print(inspect.getsource(pk_oral.model))

# %% Fit: IWAE with K inner particles per patient, minibatches of patients, Adam.
# The guide: an encoder maps each patient's curve to the posterior of their ka, CL and V
# (amortization: new patients cost one network call). An encoder cannot fit every patient
# exactly, and that error would leak into the population posterior (the noise SD comes out
# too large, 0.12 for a true 0.1 in tests/test_recovery.py). `semi_amortized=True` adds a
# learned correction per training patient, which removes that bias: the fit trains the encoder
# first, then (last half of the steps) the corrections with the population parameters while
# the encoder, which serves patients it has not seen, stays as it was.
# `average_last=0.2` returns the mean of the parameters over the last fifth of the steps
# (Polyak-Ruppert averaging) instead of the last iterate, which still jitters with the
# minibatch noise at the final learning rate.
guide = AmortizedGuide(pk_oral.model, semi_amortized=True)
result = pyro_hds.fit(
    pk_oral.model,
    data,
    guide=guide,
    objective=pyro_hds.IWAE(num_particles=4 if QUICK else 16),
    num_steps=30 if QUICK else 1500,
    batch_size=9 if QUICK else 34,
    lr=0.02,
    average_last=0.2,
    seed=0,
    progress=not QUICK,
)

# %% Posterior: importance-resampled draws; population parameters beside the truth
post = result.posterior(num_samples=50 if QUICK else 500)
for name in ("ka_pop", "cl_pop", "v_pop", "sigma"):
    d = post.samples[name]
    print(
        f"{name:8s} true {float(truth[name]):7.3f}  posterior {float(d.mean()):7.3f} "
        f"+- {float(d.std()):.3f}"
    )
print("group clearances", post.samples["cl_group"].mean(0), "true", truth["cl_group"])
print("Pareto k-hat per patient (guide quality; > 0.7 is poor):", post.pareto_k[:6])

# %% Exact draws: particle Gibbs with the guide as the proposal. The draws above take the
# population parameters from the guide, and any bias of the fit (the noise SD comes out a
# little too large) stays in them. `result.gibbs` runs Markov chains that target the exact
# posterior: Metropolis steps on the population parameters (the group clearances one group
# at a time), and for every patient's ka, CL, V an independence Metropolis step proposed by
# a Laplace approximation of their conditional posterior (Newton's method through the ODE
# solves, made before the first sweep and again halfway through warm-up; the mixture of all
# chains' approximations, so that a chain can reach a mode that another found). Where that
# conditional is near Gaussian most proposals are accepted, and every patient's values are
# close to a fresh draw each sweep. Random-walk steps (local_steps) and a choice among the
# current values and K - 1 fresh draws of the guide (num_particles) can be added; in this
# centred model the population steps solve no ODE, and outer_steps=2 (two of them per sweep)
# often mixes the population parameters much faster for little more time. Its draws are
# chains one after another, so ArviZ gets chain and draw dims (R-hat, ESS).
exact = result.gibbs(
    num_samples=40 if QUICK else 1000,
    num_chains=4,
    warmup=10 if QUICK else 50,
    num_particles=1,
    local_steps=0,
    outer_steps=2,
    seed=0,
    progress=not QUICK,
)
print("acceptance rates:", exact.diagnostics["acceptance"])
print("share of Laplace proposals accepted:", exact.diagnostics["laplace_acceptance"])
for name in ("sigma", "omega"):
    print(
        f"{name:6s} true {float(truth[name]):.4f}  guide+resampling "
        f"{float(post.samples[name].mean()):.4f}  particle Gibbs {float(exact[name].mean()):.4f}"
    )
# The chains must forget their start before the kept draws begin. With many patients the
# noise SD's posterior is narrow (about 2% of its value at 100 patients), so the fit's value
# can lie many posterior SDs away, and the chains bring it in only as fast as every patient's
# ka, CL, V move. On the benchmark's 1000 patients after a 25-step fit it started hundreds
# of SDs away; with the Laplace steps and the Newton steps that open a warm-up of 10 sweeps
# or more, the chains' mean was within 2 SDs after 12 sweeps and within 1 after 15, where a
# random walk alone left it 70 SDs away after 30 (docs/benchmarks.md). ArviZ's
# rank-normalized R-hat near 1 (say below 1.05) and a bulk ESS of a few hundred say the
# chains agree; if not, raise `warmup`, or fit longer so that the chains start closer.
table = summary(pyro_hds.to_datatree(exact, data), var_names=["sigma", "omega", "ka_pop"])
print(table[["mean", "sd", "ess_bulk", "r_hat"]])

# %% New patients: the encoder gives their posterior at once, no refitting
new_data, new_truth = pk_oral.simulate(per_group=2, seed=99)
new_post = result.predict(new_data, num_samples=50 if QUICK else 500, num_particles=16)
print("new patients' clearance:", new_post.samples["cl"].mean(0), "true", new_truth["cl"])
# the encoder's answer alone, without solving a single ODE (milliseconds for thousands)
encoded = result.encode(new_data, num_samples=1000)
print("encoder alone, clearance:", encoded["cl"].mean(0))

# %% ArviZ: a DataTree with posterior, posterior_predictive, log_likelihood, ...
tree = pyro_hds.to_datatree(post, data)
print(tree)
tree.to_netcdf("pk_posterior.nc")
plot_fits(post, data, "y", path="pk_fits.png")

# %% A guide that knows local parameters are correlated. Clearance and volume are estimated
# from the same curve, so their posteriors are correlated within a patient; the default guide
# is mean-field (as in vi-hds). `local_covariance="full"` gives every patient a full-covariance
# Gaussian over all its local latents (a per-patient regression of each on the earlier ones).
full_guide = AmortizedGuide(pk_oral.model, local_covariance="full")
result_full = pyro_hds.fit(
    pk_oral.model,
    data,
    guide=full_guide,
    objective=pyro_hds.IWAE(num_particles=4 if QUICK else 16),
    num_steps=30 if QUICK else 1500,
    batch_size=9 if QUICK else 34,
    lr=0.02,
    seed=0,
    progress=not QUICK,
)
post_full = result_full.posterior(num_samples=50 if QUICK else 500, num_particles=1)
log_cl, log_v = post_full.samples["cl"][:, 0].log(), post_full.samples["v"][:, 0].log()
corr = torch.corrcoef(torch.stack([log_cl, log_v]))[0, 1]
print(f"guide's correlation of log CL and log V for the first patient: {float(corr):.2f}")
