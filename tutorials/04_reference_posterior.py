"""Tutorial 4: one system, global parameters only, checked against a gold-standard posterior.

Not every problem is hierarchical. Here a single Lotka-Volterra system is fitted to the
Hudson's Bay Company lynx and hare pelts (1900-1920), the posteriordb model
``hudson_lynx_hare-lotka_volterra`` (``pyro_hds.models.hudson_lynx_hare``), and the result is
compared with posteriordb's Stan NUTS reference draws. Three things make this work well:

1. a start read off the data by gradient matching (``hudson_lynx_hare.initial_values``): the
   log-derivatives of the counts are linear in the four rates, so two least-squares fits give
   rates near the posterior, where the optimiser would otherwise risk an orbit of the wrong
   period;
2. a full-covariance Gaussian guide (Pyro's ``AutoMultivariateNormal``): the rates are
   strongly correlated a posteriori;
3. importance resampling of the global draws (``posterior(resample_globals=...)``), which
   corrects what the Gaussian misses.

Run: ``python tutorials/04_reference_posterior.py`` (``PYRO_HDS_QUICK=1`` for a smoke-sized
run). It needs the shared data folder (``../shared/data/posteriordb``, or ``PYRO_HDS_DATA``).
"""

# %%
import os

import torch
from pyro.infer.autoguide import AutoMultivariateNormal
from pyro.infer.autoguide.initialization import init_to_value

import pyro_hds
from pyro_hds.models import hudson_lynx_hare as hl
from pyro_hds.solvers import RK4

QUICK = os.environ.get("PYRO_HDS_QUICK") == "1"
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)

# %% Data: pelts (thousands) of hares and lynx, the 1900 counts and 20 later years
data = hl.load_data()
start = hl.initial_values(data)
print("gradient-matching start:", {k: v.tolist() for k, v in start.items()})


# %% The model: posteriordb's, solved with RK4 at four steps per year
def model(d):
    hl.model(d, solver=RK4(substeps=4))


guide = AutoMultivariateNormal(model, init_loc_fn=init_to_value(values=start), init_scale=0.01)

# %% Fit: with no individuals plate the objective's outer particles average the ELBO over 8
# draws of the globals per step
result = pyro_hds.fit(
    model,
    data,
    guide=guide,
    objective=pyro_hds.IWAE(num_particles=1, num_outer_particles=8),
    num_steps=50 if QUICK else 1200,
    lr=0.02,
    seed=0,
    progress=not QUICK,
)

# %% Posterior: 40,000 guide draws, 4,000 kept by importance resampling
draws = 400 if QUICK else 4000
post = result.posterior(num_samples=draws, resample_globals=10 * draws, seed=1)
print(f"importance-sampling ESS of the global draws: {post.global_ess:.0f} of {10 * draws}")

# %% Against the Stan reference: mean differences in reference SDs, and SD ratios
ref = hl.reference_draws()
print(f"{'parameter':<12}{'reference':>20}{'pyro_hds':>20}{'diff/sd':>9}{'sd ratio':>9}")
for name in ("theta", "z_init", "sigma"):
    ours = post.samples[name].reshape(draws, -1)
    for j in range(ours.shape[1]):
        m, s = float(ref[name][:, j].mean()), float(ref[name][:, j].std())
        om, os_ = float(ours[:, j].mean()), float(ours[:, j].std())
        print(
            f"{name}[{j}]".ljust(12)
            + f"{m:>12.4f} +- {s:<6.4f}{om:>12.4f} +- {os_:<6.4f}"
            + f"{(om - m) / s:>9.3f}{os_ / s:>9.3f}"
        )
