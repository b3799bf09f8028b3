"""Tutorial 5: the vi-hds case study, the prescribed double-receiver model on plate-reader data.

312 wells of six engineered *E. coli* devices, each read every ~12 minutes for 16.5 hours in four
channels (OD, RFP, YFP, CFP), induced with C6 or C12 (``pyro_hds.datasets.load_vihds``). The
model (``pyro_hds.models.double_receiver``) is the paper's DR_Constant: eight states, growth
with lag and carrying capacity, two receptors binding the inducers, two promoters. Parameters
vary by well (growth, lag, capacity, expression rate), by the parts a device is built from
(receptor expression) and across the population.

Steps: one of 4 cross-validation folds (seeded, over wells), channel scales fitted on the
training wells only, an amortized fit with the hierarchical IWAE bound, the held-out bound per
well, and posterior predictive bands for a few held-out wells.

Run: ``python tutorials/05_vihds_double_receiver.py`` (``PYRO_HDS_QUICK=1`` for a smoke-sized
run). It needs the shared data folder (``../shared/data/vi-hds`` or ``PYRO_HDS_DATA``).
"""

# %%
import functools
import os

import torch

import pyro_hds
from pyro_hds.datasets import folds, load_vihds, train_test
from pyro_hds.models import double_receiver as dr
from pyro_hds.models import double_receiver_blackbox as bb
from pyro_hds.plotting import plot_fits

QUICK = os.environ.get("PYRO_HDS_QUICK") == "1"
torch.set_num_threads(1)

# %% Data: raw readings; devices are groups, their LuxR/LasR parts are group features
data = load_vihds(download=False)
print(data)
print("devices:", data.group_names)
print("parts:", data.feature_names)

# %% Fold 0 of 4: `train_test` scales each channel by its maximum over the TRAINING wells
# only (a ChannelScaler fitted on them) and makes each part a data set of its own
train, test = train_test(data, *folds(data, k=4, seed=0)[0], dtype=torch.float32)

# %% Fit: minibatches of 36 wells (as the paper), K importance particles per well, Heun's
# method with one step per observation interval; the held-out bound is logged as we go.
# A long run compiles the solve into one kernel each way (Heun(compile=True): about 20 s
# once, then epochs about 2.8x as fast on 2 cores, docs/vihds.md); the quick run does not
# need it.
steps = 20 if QUICK else 1400  # 1400 steps = 215 epochs of 234 wells
result = pyro_hds.fit(
    functools.partial(dr.model, solver=pyro_hds.Heun(compile=not QUICK)),
    train,
    objective=pyro_hds.IWAE(num_particles=10 if QUICK else 100),
    num_steps=steps,
    batch_size=36,
    lr=0.01,
    seed=0,
    validation=test,
    validate_every=10 if QUICK else 140,
    validation_particles=50 if QUICK else 200,
    progress=not QUICK,
)
for step, bound in zip(result.history["val_step"], result.history["val_bound"]):
    print(f"step {step:5d}: held-out bound {float(bound):9.1f} nats per well")

# %% The held-out bound per well with many particles (the paper's metric)
per_well = result.evaluate(test, num_particles=100 if QUICK else 1000)
print(f"held-out IWAE bound, mean over {len(test)} wells: {float(per_well.mean()):.1f}")

# %% The population parameters are one vector site, `population`, whose entries are named by
# `dr.population_names()` (one site instead of 25 makes a training step about a sixth
# faster); `dr.population_values` splits any draws of it by name, and the ArviZ export
# (`result.to_arviz`) names that dim `parameter`
medians = dr.population_values(result.guide.median(train)["population"])
for name in ("KR6", "KS12", "nR", "nS", "prec_rfp"):
    print(f"posterior median of {name}: {float(medians[name]):.4g}")

# %% Posterior predictive bands for a few held-out wells
post = result.predict(test, num_samples=30 if QUICK else 200, num_particles=10)
plot_fits(post, test, "y", individuals=[0, 20, 40, 60], path="vihds_fits.png")
print("wrote vihds_fits.png")

# %% The other four models of the case study, fitted and scored the same way:
# - DR_Growth: production follows the growth rate, rc ((1 - es) r sigmoid(4 (t - tlag)) + es);
# - DR_Blackbox: no biology, a network of the state, a 5-number latent code per well, the
#   inputs and the device's parts; noise variances are states too;
# - DR_HierarchicalBlackbox: the network also reads a population code and a per-device code
#   (group latents; the guide maps a device's parts to its code);
# - hybrid: prescribed growth, receptor expression and inducer binding, with the two promoter
#   responses learned by a small network instead of the prescribed functions.
# - DR_Constant with a noise precision per well and channel (a population distribution of
#   them): wells follow the shared equations more or less closely, and with one precision per
#   channel the worst wells set the noise level of all (docs/vihds.md: at 500 epochs this
#   model's held-out bound is 120-240 nats per well above DR_Constant's on folds 0-2).
# The neural models are objects owning their networks: make a new one for every fit.
variants = {
    "DR_Growth": (dr.model_growth, 0.01),
    "DR_Constant, noise per well": (dr.model_well_noise, 0.01),
    "DR_Blackbox": (bb.make_model(), 0.005),
    "DR_HierarchicalBlackbox": (bb.make_model(hierarchical=True), 0.005),
    "hybrid": (dr.make_hybrid_model(), 0.01),
}
for name, (variant, lr) in variants.items():
    fitted = pyro_hds.fit(
        variant,
        train,
        objective=pyro_hds.IWAE(num_particles=10 if QUICK else 100),
        num_steps=20 if QUICK else 1400,
        batch_size=36,
        lr=lr,
        seed=0,
        progress=not QUICK,
    )
    score = fitted.evaluate(test, num_particles=100 if QUICK else 1000)
    print(f"{name} held-out bound per well: {float(score.mean()):.1f}")
