r"""The black-box neural ODE of the vi-hds case study (DR_Blackbox).

No biology is prescribed: each well's dynamics come from a neural network of its state, its
local latent code, its inputs and its device, as in Roeder et al. (ICML 2019, the
``dr_blackbox`` model; see ``../shared/VIHDS_REFERENCE.md``). States per well: six species
:math:`s` (four proxies of the observed signals and two latent species) and four variance
states :math:`v`, with

.. math::

    h &= \tanh\big(W_1 [s, z, \log(1 + c), d] + b_1\big), \qquad
    \dot s = \sigma(W_2 h + b_2) - \sigma(W_3 h + b_3) \odot s, \\
    g &= \tanh\big(W_4 [s, v, z, \log(1 + c), d] + b_4\big), \qquad
    \dot v = \sigma(W_5 g + b_5) - \sigma(W_6 g + b_6) \odot v,

where :math:`z \sim \mathcal N(0, I_5)` is the well's latent code (the individual level),
:math:`c = (C_6, C_{12})` its inducer concentrations and :math:`d` its device's part features
(LuxR part, LasR part), so a device never trained on but built from known parts can be
predicted. Production and degradation are positive (sigmoids), so species stay positive.
Observations: OD :math:`= s_0`, fluorescence :math:`s_0 s_1, s_0 s_2, s_0 s_3`, each with
Gaussian noise whose variance is the matching variance state :math:`v_k(t)` (noise that changes
in time, learned). Initial values: :math:`s_0 = 0.002` (the prescribed model's biomass), the
other species 0.001, variances 1e-5 (the reference's choices where it states them).

The network weights are model parameters (point estimates, registered with ``pyro.module``),
trained with the guide by maximising the bound; the only latent variables are the codes
:math:`z`. Hidden widths: 50 (species) and 25 (variances).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import pyro_hds
from pyro_hds.data import Dataset
from pyro_hds.solvers import Heun

__all__ = ["BlackboxDynamics", "BlackboxModel", "make_model"]

NUM_SPECIES, NUM_VARIANCES, LATENT_DIM = 6, 4, 5
GLOBAL_DIM, DEVICE_DIM = 5, 2  # DR_HierarchicalBlackbox's population and device codes


class BlackboxDynamics(nn.Module):
    """The two networks of the module docstring; ``forward(t, y, p) -> dy/dt``.

    ``y`` is ``(B, 10)`` (six species, four variances); ``p["z"]`` ``(B, num_codes)`` (the
    latent codes) and ``p["u"]`` ``(B, F)`` (log inputs and device features) are per system.
    """

    def __init__(
        self, num_features: int, hidden: int = 50, hidden_var: int = 25, num_codes: int = LATENT_DIM
    ) -> None:
        super().__init__()
        self.species = nn.Sequential(
            nn.Linear(NUM_SPECIES + num_codes + num_features, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 2 * NUM_SPECIES),
        )
        self.variances = nn.Sequential(
            nn.Linear(NUM_SPECIES + NUM_VARIANCES + num_codes + num_features, hidden_var),
            nn.Tanh(),
            nn.Linear(hidden_var, 2 * NUM_VARIANCES),
        )

    def forward(self, t: torch.Tensor, y: torch.Tensor, p) -> torch.Tensor:
        s, v = y[..., :NUM_SPECIES], y[..., NUM_SPECIES:]
        context = torch.cat([p["z"], p["u"]], -1)
        prod, loss = torch.sigmoid(self.species(torch.cat([s, context], -1))).chunk(2, -1)
        vprod, vloss = torch.sigmoid(self.variances(torch.cat([y, context], -1))).chunk(2, -1)
        return torch.cat([prod - loss * s, vprod - vloss * v], -1)


def _features(data: Dataset) -> torch.Tensor:
    """``(N, 2 + F)``: log(1 + C6), log(1 + C12) and the device's part features."""
    if data.group_features is None:
        raise ValueError(
            "double_receiver_blackbox.model: data.group_features (device parts) are required, "
            "as pyro_hds.datasets.load_vihds builds them"
        )
    dev = data.group_features[data.groups].to(data.observations.dtype)
    return torch.cat([torch.log1p(data.inputs.to(dev.dtype)), dev], -1)


class BlackboxModel:
    """DR_Blackbox as a Pyro model: ``model(data)`` for a :class:`~pyro_hds.Dataset` minibatch.

    The object owns its dynamics network (created on the first call, for the data's feature
    width, dtype and device) and registers it with ``pyro.module("dr_blackbox", ...)``, so its
    weights are trained by :func:`pyro_hds.fit` with the guide. Sites: the local code ``z``
    (N, 5), the trajectory ``states`` (N, T, 10) and the observations ``y`` (N, T, 4).
    ``solver`` defaults to Heun with one step per observation interval. Make a new model
    (:func:`make_model`) for an independent fit: a fit continues from the weights the object
    holds.
    """

    def __init__(self, solver: object = None, hierarchical: bool = False) -> None:
        self.solver = Heun() if solver is None else solver
        self.hierarchical = bool(hierarchical)
        self.network: BlackboxDynamics | None = None

    def __call__(self, data: Dataset) -> None:
        obs = data.observations
        u = _features(data)
        codes = LATENT_DIM + (GLOBAL_DIM + DEVICE_DIM if self.hierarchical else 0)
        if self.network is None:
            widths = (25, 20) if self.hierarchical else (50, 25)
            self.network = BlackboxDynamics(u.shape[-1], *widths, num_codes=codes).to(
                dtype=obs.dtype, device=obs.device
            )
        net = pyro.module("dr_blackbox", self.network)

        def standard(dim: int):
            return dist.Normal(obs.new_zeros(dim), obs.new_ones(dim)).to_event(1)

        if self.hierarchical:
            x = pyro.sample("x", standard(GLOBAL_DIM))  # (..., 1, 5): population
            with pyro_hds.groups(data):
                w = pyro.sample("w", standard(DEVICE_DIM))  # (..., G, 2): device
        with pyro_hds.individuals(data):
            z = pyro.sample("z", standard(LATENT_DIM))
            if self.hierarchical:
                # the population code has a size-1 dim for the individuals plate already
                parts = (x, w[..., data.groups, :], z)
                batch = torch.broadcast_shapes(*(c.shape[:-1] for c in parts))
                z = torch.cat([c.expand(*batch, c.shape[-1]) for c in parts], -1)
            y0 = obs.new_full((NUM_SPECIES + NUM_VARIANCES,), 1e-3)
            y0[0] = 2e-3
            y0[NUM_SPECIES:] = 1e-5
            states = pyro_hds.ode(
                "states",
                net,
                y0,
                data.times,
                {"z": z, "u": u},
                event_dims={"z": 1, "u": 1},
                solver=self.solver,
                t0=0.0,
            )
            s0 = states[..., 0]
            mean = torch.stack(
                [s0, s0 * states[..., 1], s0 * states[..., 2], s0 * states[..., 3]], -1
            )
            scale = states[..., NUM_SPECIES:].clamp(min=1e-12).sqrt()
            pyro_hds.observe("y", dist.Normal(mean, scale), data)


def make_model(solver: object = None, hierarchical: bool = False) -> BlackboxModel:
    """A new DR_Blackbox model with its own (untrained) dynamics network.

    ``hierarchical=True`` gives DR_HierarchicalBlackbox: the network also reads a population
    code ``x`` ~ N(0, I_5) (one for all wells) and a device code ``w`` ~ N(0, I_2) (one per
    device, in the groups plate), beside each well's ``z``; hidden widths 25 and 20 as the
    paper's. With group features in the data the guide maps a device's parts to its code, so
    unseen part combinations get one.
    """
    return BlackboxModel(solver, hierarchical=hierarchical)
