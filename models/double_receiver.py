r"""The prescribed double-receiver gene circuit of the vi-hds case study (DR_Constant).

Engineered *E. coli* wells (Roeder et al., ICML 2019; equations and priors as the paper's
``dr_constant`` model, summarised in ``../shared/VIHDS_REFERENCE.md``). Eight states per well,
``y = (x, rfp, yfp, cfp, f510, f430, luxR, lasR)``: biomass (OD), the concentrations of three
fluorescent proteins per cell, two autofluorescence terms and the two receptor proteins. With
inputs :math:`c_6, c_{12}` (the inducers C6 and C12, nM), the growth rate
:math:`\gamma = r\,\sigma(4 (t - t_{lag}))\,(1 - x / K)` and

.. math::

    B_R &= \mathrm{luxR}^2 \frac{(K_{R6} c_6)^{n_R} + (K_{R12} c_{12})^{n_R}}
          {(1 + K_{R6} c_6 + K_{R12} c_{12})^{n_R}}, \qquad
    B_S = \mathrm{lasR}^2 \frac{(K_{S6} c_6)^{n_S} + (K_{S12} c_{12})^{n_S}}
          {(1 + K_{S6} c_6 + K_{S12} c_{12})^{n_S}}, \\
    P_{76} &= \frac{e_{76} + K_{GR76} B_R + K_{GS76} B_S}{1 + K_{GR76} B_R + K_{GS76} B_S},
    \qquad
    P_{81} = \frac{e_{81} + K_{GR81} B_R + K_{GS81} B_S}{1 + K_{GR81} B_R + K_{GS81} B_S}, \\
    \dot x &= \gamma x, \quad
    \dot{\mathrm{rfp}} = r_c - (\gamma + d_{rfp})\,\mathrm{rfp}, \quad
    \dot{\mathrm{yfp}} = r_c a_{YFP} P_{81} - (\gamma + d_{yfp})\,\mathrm{yfp}, \quad
    \dot{\mathrm{cfp}} = r_c a_{CFP} P_{76} - (\gamma + d_{cfp})\,\mathrm{cfp}, \\
    \dot f_{510} &= r_c\, \mathrm{auto}_Y - \gamma f_{510}, \quad
    \dot f_{430} = r_c\, \mathrm{auto}_C - \gamma f_{430}, \quad
    \dot{\mathrm{luxR}} = r_c a_R - (\gamma + d_R)\,\mathrm{luxR}, \quad
    \dot{\mathrm{lasR}} = r_c a_S - (\gamma + d_S)\,\mathrm{lasR},

from :math:`x(0) = 0.002` and all other states 0. Observed channels (OD, mRFP1, EYFP, ECFP):
:math:`x`, :math:`x\,\mathrm{rfp}`, :math:`x (\mathrm{yfp} + f_{510})`,
:math:`x (\mathrm{cfp} + f_{430})`, with Gaussian noise of one precision per channel.

Hierarchy. Individual (well): :math:`r, K, t_{lag}, r_c`. Device: the receptor expression
rates :math:`a_R` and :math:`a_S` are properties of the device's parts, so they are drawn per
component (three LuxR parts, four LasR parts: population-level sites ``aR`` (3,) and ``aS``
(4,)) and each device takes those of its components (read off ``data.group_features``). A device
never seen in training but built from known parts thus has known receptor rates: the paper's
zero-shot prediction. Population: the 25 other parameters, drawn as one vector site
``population`` (25,) with independent log-normal priors, the paper's (:data:`POPULATION_PRIORS`,
in that order; :func:`population_names` gives the order of each variant, and
:func:`population_values` a dict by name). One site rather than 25: each Pyro sample site
costs its model and guide a fixed amount of Python (messages, distributions, log-densities
and their gradients) whatever its size, and at 25 sites that was about a sixth of a training
step (35 against 29 ms, measured in ``docs/vihds.md``). The export to ArviZ names the vector's
entries (coordinate ``parameter``).

Shapes: ``data`` is a :class:`~pyro_hds.Dataset` of the scaled plate-reader data (see
:class:`pyro_hds.datasets.ChannelScaler`) with inputs ``(C6, C12)`` and group features
``(G, 7)`` = one-hot LuxR part (3) then one-hot LasR part (4), as
:func:`pyro_hds.datasets.load_vihds` builds them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import pyro_hds
from pyro_hds.data import Dataset
from pyro_hds.solvers import Heun

__all__ = [
    "INDIVIDUAL_PRIORS",
    "POPULATION",
    "POPULATION_PRIORS",
    "STATE_NAMES",
    "HybridModel",
    "PromoterNetwork",
    "constant_terms",
    "make_hybrid_model",
    "model",
    "model_growth",
    "model_well_noise",
    "observables",
    "population_names",
    "population_values",
    "rhs",
    "rhs_constant_terms",
]

STATE_NAMES = ("x", "rfp", "yfp", "cfp", "f510", "f430", "luxR", "lasR")
NUM_LUXR_PARTS, NUM_LASR_PARTS = 3, 4

#: log-normal priors (mean and SD of the log) of the population parameters
POPULATION_PRIORS: dict[str, tuple[float, float]] = {
    "prec_x": (8.0, 2.0),
    "prec_rfp": (8.0, 2.0),
    "prec_yfp": (8.0, 2.0),
    "prec_cfp": (8.0, 2.0),
    "e76": (-3.0, 1.0),
    "e81": (-3.0, 1.0),
    "KGR_76": (2.0, 3.0),
    "KGR_81": (-2.0, 3.0),
    "KGS_76": (-2.0, 3.0),
    "KGS_81": (2.0, 3.0),
    "KR6": (-6.0, 3.0),
    "KR12": (-12.0, 3.0),
    "KS6": (-12.0, 3.0),
    "KS12": (-6.0, 3.0),
    "nR": (1.0, 0.25),
    "nS": (1.0, 0.25),
    "aYFP": (0.0, 2.0),
    "aCFP": (0.0, 2.0),
    "dR": (-2.0, 1.0),
    "dS": (-2.0, 1.0),
    "drfp": (-2.0, 1.5),
    "dyfp": (-2.0, 1.5),
    "dcfp": (-2.0, 1.5),
    "autoY": (-5.0, 2.0),
    "autoC": (-5.0, 2.0),
}
#: the population sites of the four channels' noise precisions
PRECISION_SITES = ("prec_x", "prec_rfp", "prec_yfp", "prec_cfp")
#: ``model_well_noise``: prior of the spread (SD) of the wells' log precisions per channel
PREC_SCALE_PRIOR = (-1.0, 1.0)
#: DR_Growth's coupling of production to growth, es (population), log-normal (-2, 1)
GROWTH_PRIOR = (-2.0, 1.0)
#: per-part receptor expression rates (the device level), log-normal (1, 3) as in the paper
PART_PRIOR = (1.0, 3.0)
#: log-normal priors of the individual (well) parameters
INDIVIDUAL_PRIORS: dict[str, tuple[float, float]] = {
    "r": (0.0, 0.25),
    "K": (1.0, 1 / math.sqrt(2.0)),
    "tlag": (0.0, 1 / math.sqrt(2.0)),
    "rc": (0.0, 2.0),
}
X0 = 0.002
#: the site of the population parameters, a vector in the order of :func:`population_names`
POPULATION = "population"


def _hill(k6, k12, c6, c12, n):
    r""":math:`(a^n + b^n) / (1 + a + b)^n` with :math:`a = K_6 c_6, b = K_{12} c_{12}`, computed
    as :math:`(a / s)^n + (b / s)^n`, :math:`s = 1 + a + b`: both ratios lie in [0, 1], so
    no power overflows however large the affinities get during training. A ratio of 0 (no
    inducer, or one that underflows) contributes 0 with zero gradient: the power's own
    gradient there, :math:`n\,0^{n-1}` times 0, would be NaN for :math:`n < 1`."""
    a, b = k6 * c6, k12 * c12
    s = 1 + a + b
    return _power(a / s, n) + _power(b / s, n)


def _power(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    r""":math:`x^n` for :math:`x \ge 0`, with finite gradients at :math:`x = 0`."""
    positive = x > 0
    safe = torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive, safe.pow(n), torch.zeros_like(x))


def rhs(t: torch.Tensor, y: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """dy/dt of the eight states ``y`` (..., 8); every entry of ``p`` broadcasts to (...)."""
    return rhs_constant_terms(t, y, constant_terms(p))


def constant_terms(p: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parts of the right-hand side that depend on neither time nor state: the receptor
    occupancy factors (Hill terms), the production rates ``rc * a`` and ``1 - e``. Computing
    them once per solve instead of at every evaluation removes about a third of the
    operations of each step (forward and backward)."""
    rc = p["rc"]
    return {
        "r": p["r"],
        "K": p["K"],
        "tlag": p["tlag"],
        "hill_R": _hill(p["KR6"], p["KR12"], p["c6"], p["c12"], p["nR"]),
        "hill_S": _hill(p["KS6"], p["KS12"], p["c6"], p["c12"], p["nS"]),
        **(
            {
                "KGR_76": p["KGR_76"],
                "KGS_76": p["KGS_76"],
                "KGR_81": p["KGR_81"],
                "KGS_81": p["KGS_81"],
                "off_76": 1 - p["e76"],
                "off_81": 1 - p["e81"],
            }
            if "e76" in p
            else {}
        ),
        "rc": rc,
        "prod_yfp": rc * p["aYFP"],
        "prod_cfp": rc * p["aCFP"],
        "prod_f510": rc * p["autoY"],
        "prod_f430": rc * p["autoC"],
        "prod_luxR": rc * p["aR"],
        "prod_lasR": rc * p["aS"],
        "drfp": p["drfp"],
        "dyfp": p["dyfp"],
        "dcfp": p["dcfp"],
        "dR": p["dR"],
        "dS": p["dS"],
        **({"es": p["es"]} if "es" in p else {}),
    }


def rhs_constant_terms(
    t: torch.Tensor, y: torch.Tensor, q: Mapping[str, torch.Tensor], promoter=None
) -> torch.Tensor:
    """:func:`rhs` from :func:`constant_terms` ``q`` (what :func:`model` integrates).

    ``promoter``: for the hybrid model, a callable ``(B_R, B_S) -> (P76, P81)`` replacing the
    prescribed promoter functions."""
    # unbind along a leading dim: its backward stacks the gradients along that dim, a
    # contiguous copy (y.unbind(-1)'s backward interleaves them, several times slower)
    x, rfp, yfp, cfp, f510, f430, lux, las = y.movedim(-1, 0).unbind(0)
    growing = q["r"] * torch.sigmoid(4 * (t - q["tlag"]))
    gamma = growing * (1 - x / q["K"])
    # DR_Growth: production scales with (1 - es) r sigmoid(4 (t - tlag)) + es
    m = (1 - q["es"]) * growing + q["es"] if "es" in q else None
    b_r = lux * lux * q["hill_R"]
    b_s = las * las * q["hill_S"]
    if promoter is not None:
        p76, p81 = promoter(b_r, b_s)
    else:
        # promoter activity (e + X) / (1 + X) = 1 - (1 - e) / (1 + X), finite for any X >= 0
        p76 = 1 - q["off_76"] / (1 + q["KGR_76"] * b_r + q["KGS_76"] * b_s)
        p81 = 1 - q["off_81"] / (1 + q["KGR_81"] * b_r + q["KGS_81"] * b_s)
    production = [
        q["rc"],
        q["prod_yfp"] * p81,
        q["prod_cfp"] * p76,
        q["prod_f510"],
        q["prod_f430"],
        q["prod_luxR"],
        q["prod_lasR"],
    ]
    if m is not None:
        production = [m * term for term in production]
    out = [
        gamma * x,
        production[0] - (gamma + q["drfp"]) * rfp,
        production[1] - (gamma + q["dyfp"]) * yfp,
        production[2] - (gamma + q["dcfp"]) * cfp,
        production[3] - gamma * f510,
        production[4] - gamma * f430,
        production[5] - (gamma + q["dR"]) * lux,
        production[6] - (gamma + q["dS"]) * las,
    ]
    # state-major: stacking along a new first dim copies contiguous blocks (a stack along
    # the last dim interleaves them, which took a third of the evaluation); pyro_hds.ode then
    # keeps the whole solve in this layout
    return torch.stack(torch.broadcast_tensors(*out), 0).movedim(0, -1)


def observables(states: torch.Tensor) -> torch.Tensor:
    """(OD, RFP, YFP, CFP) ``(..., T, 4)`` from the states ``(..., T, 8)``.

    Read in the order ``(state, time, ...)``, which is the order in memory of a trajectory
    that ``pyro_hds.ode`` returns state-major (each state's values at one time contiguous
    over the batch): every product then runs over contiguous memory, and the backward pass
    of the ``unbind`` stacks the states' gradients in that same layout, which the compiled
    solver's adjoint reads without moving values. All eight states are unbound (a slice
    ``[..., :6]`` would backpropagate as a zero fill and a copy)."""
    x, rfp, yfp, cfp, f510, f430, _, _ = states.movedim(-1, 0).movedim(-1, 1).unbind(0)
    out = torch.stack([x, x * rfp, x * (yfp + f510), x * (cfp + f430)], 0)  # (4, T, ...)
    return out.movedim(0, -1).movedim(0, -2)


def _parts(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    feats = data.group_features
    if feats is None or feats.shape[-1] != NUM_LUXR_PARTS + NUM_LASR_PARTS:
        raise ValueError(
            "double_receiver.model: data.group_features must be the (G, 7) one-hot LuxR and "
            "LasR parts of each device, as pyro_hds.datasets.load_vihds builds them"
        )
    lux = feats[:, :NUM_LUXR_PARTS].argmax(-1)
    las = feats[:, NUM_LUXR_PARTS:].argmax(-1)
    return lux[data.groups], las[data.groups]


def model_well_noise(data: Dataset, solver: object = None) -> None:
    r"""DR_Constant with a noise precision per well and channel, drawn from a population
    distribution: :func:`model` with ``noise="well"``.

    The four population precisions ``prec_x, prec_rfp, prec_yfp, prec_cfp`` are replaced by
    the local site ``prec`` (N, 4), :math:`\log \tau_{ic} \sim \mathcal N(m_c, s_c)` with
    population sites ``prec_loc`` (4,) :math:`m_c \sim \mathcal N(8, 2)` (the paper's prior
    of a log precision) and ``prec_scale`` (4,) :math:`s_c \sim` LogNormal(-1, 1). Wells of
    one plate differ in how closely the shared equations follow them (some have a bump in
    OD before growth, some a fluorescence that drifts); with one precision per channel the
    worst wells set the noise level of all wells and the well-fitting ones lose the
    information of their data."""
    model(data, solver, noise="well")


def model_growth(data: Dataset, solver: object = None) -> None:
    r"""DR_Growth: :func:`model` with every production rate :math:`r_c` multiplied by
    :math:`(1 - e_s)\, r\, \sigma(4 (t - t_{lag})) + e_s` (production coupled to the growth
    rate), with the population parameter ``es`` ~ LogNormal(-2, 1)."""
    model(data, solver, growth=True)


PROMOTER_SITES = ("e76", "e81", "KGR_76", "KGR_81", "KGS_76", "KGS_81")


class PromoterNetwork(nn.Module):
    r"""The hybrid model's promoter response: ``(B_R, B_S) -> (P76, P81)`` in (0, 1), a small
    network of :math:`\log(1 + B)` (16 tanh units, sigmoid outputs)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, b_r: torch.Tensor, b_s: torch.Tensor):
        b_r, b_s = torch.broadcast_tensors(b_r, b_s)
        x = torch.stack([torch.log1p(b_r), torch.log1p(b_s)], -1)
        out = torch.sigmoid(self.net(x))
        return out[..., 0], out[..., 1]


class HybridModel:
    """The hybrid double receiver: prescribed growth, receptor expression and inducer binding
    (as DR_Constant), with the two promoter responses learned by a :class:`PromoterNetwork`
    instead of the prescribed :math:`(e + K_{GR} B_R + K_{GS} B_S) / (1 + ...)`; the six
    promoter parameters are dropped. The object owns its network (registered with
    ``pyro.module("dr_hybrid_promoter", ...)`` and trained by :func:`pyro_hds.fit`); make a new
    one (:func:`make_hybrid_model`) for an independent fit."""

    def __init__(self, solver: object = None) -> None:
        self.solver = solver
        self.promoter: PromoterNetwork | None = None

    def __call__(self, data: Dataset) -> None:
        obs = data.observations
        if self.promoter is None:
            self.promoter = PromoterNetwork().to(dtype=obs.dtype, device=obs.device)
        net = pyro.module("dr_hybrid_promoter", self.promoter)
        model(data, self.solver, promoter=net)


def make_hybrid_model(solver: object = None) -> HybridModel:
    """A new hybrid double-receiver model with its own (untrained) promoter network."""
    return HybridModel(solver)


def _population_priors(
    growth: bool = False, promoter: bool = False, noise: str = "channel"
) -> dict[str, tuple[float, float]]:
    priors = dict(POPULATION_PRIORS, **({"es": GROWTH_PRIOR} if growth else {}))
    if promoter:  # the hybrid model learns the promoter response instead
        priors = {k: v for k, v in priors.items() if k not in PROMOTER_SITES}
    if noise == "well":  # the precisions are drawn per well
        priors = {k: v for k, v in priors.items() if k not in PRECISION_SITES}
    return priors


def population_names(
    growth: bool = False, promoter: bool = False, noise: str = "channel"
) -> tuple[str, ...]:
    """The names of the entries of the ``population`` site of :func:`model` with these
    options (``promoter``: whether a promoter network replaces the promoter functions, as in
    the hybrid model): :data:`POPULATION_PRIORS`'s order, less the promoter parameters
    (hybrid) or the precisions (``noise="well"``), then ``es`` (DR_Growth)."""
    return tuple(_population_priors(growth, promoter, noise))


def population_values(
    values: torch.Tensor, growth: bool = False, promoter: bool = False, noise: str = "channel"
) -> dict[str, torch.Tensor]:
    """The ``population`` site's values ``(..., P)`` (draws, say) as a dict by parameter name
    ``{name: (...)}``, for the model with these options (see :func:`population_names`)."""
    names = population_names(growth, promoter, noise)
    if values.shape[-1] != len(names):
        raise ValueError(
            f"population_values: the last dim has {values.shape[-1]} entries, the model with "
            f"growth={growth}, promoter={promoter}, noise={noise!r} has {len(names)} "
            f"({', '.join(names)}); pass the options the values were drawn with"
        )
    return dict(zip(names, values.unbind(-1)))


def model(
    data: Dataset,
    solver: object = None,
    growth: bool = False,
    promoter: Any = None,
    noise: str = "channel",
) -> None:
    """DR_Constant as a Pyro model of a :class:`~pyro_hds.Dataset` minibatch of wells.

    Sites: ``population`` (P,), the population parameters of :data:`POPULATION_PRIORS` in
    the order of :func:`population_names` (P = 25 here), ``aR`` (3,) and ``aS`` (4,) per
    receptor part, the individual ``r, K, tlag, rc`` (N,), the trajectory
    ``states`` (N, T, 8) and the observations ``y`` (N, T, 4). ``solver`` defaults to Heun's
    method with one step per observation interval, as the paper. ``growth=True`` gives
    DR_Growth (see :func:`model_growth`). ``noise="well"`` gives every well its own noise
    precision per channel (see :func:`model_well_noise`).
    """
    if noise not in ("channel", "well"):
        raise ValueError(f"double_receiver.model(noise={noise!r}): use 'channel' or 'well'")
    solver = Heun() if solver is None else solver
    obs = data.observations
    one = obs.new_ones(())
    priors = _population_priors(growth, promoter is not None, noise)
    if noise == "well":  # the precisions are drawn per well below
        # population mean and spread of the wells' log precisions, one per channel
        prec_loc = pyro.sample(
            "prec_loc",
            dist.Normal(POPULATION_PRIORS["prec_x"][0] * one, POPULATION_PRIORS["prec_x"][1])
            .expand([len(PRECISION_SITES)])
            .to_event(1),
        )
        prec_scale = pyro.sample(
            "prec_scale",
            dist.LogNormal(PREC_SCALE_PRIOR[0] * one, PREC_SCALE_PRIOR[1])
            .expand([len(PRECISION_SITES)])
            .to_event(1),
        )
    names = tuple(priors)
    # the names travel with the site to the ArviZ export (pyro_hds.to_datatree)
    named: Any = {"event_coords": ("parameter", names)}
    theta = pyro.sample(
        POPULATION,
        dist.LogNormal(
            obs.new_tensor([mu for mu, _ in priors.values()]),
            obs.new_tensor([sd for _, sd in priors.values()]),
        ).to_event(1),
        infer=named,
    )
    glob = dict(zip(names, theta.unbind(-1)))
    a_r = pyro.sample(
        "aR",
        dist.LogNormal(PART_PRIOR[0] * one, PART_PRIOR[1]).expand([NUM_LUXR_PARTS]).to_event(1),
    )
    a_s = pyro.sample(
        "aS",
        dist.LogNormal(PART_PRIOR[0] * one, PART_PRIOR[1]).expand([NUM_LASR_PARTS]).to_event(1),
    )
    lux, las = _parts(data)
    with pyro_hds.individuals(data):
        local = {
            name: pyro.sample(name, dist.LogNormal(mu * one, sd))
            for name, (mu, sd) in INDIVIDUAL_PRIORS.items()
        }
        # globals carry a size-1 dim for the individuals plate, so they broadcast as they are;
        # the per-part vectors (..., 1, P) drop it before picking each well's part
        params = dict(glob)
        params.update(local)
        params["aR"] = (a_r.squeeze(-2) if a_r.dim() > 1 else a_r)[..., lux]
        params["aS"] = (a_s.squeeze(-2) if a_s.dim() > 1 else a_s)[..., las]
        params["c6"] = data.inputs[:, 0]
        params["c12"] = data.inputs[:, 1]
        y0 = torch.zeros(len(STATE_NAMES), dtype=obs.dtype, device=obs.device)
        y0[0] = X0
        f: Any = rhs_constant_terms
        if promoter is not None:
            f = functools.partial(rhs_constant_terms, promoter=promoter)
        states = pyro_hds.ode(
            "states",
            f,
            y0,
            data.times,
            constant_terms(params),
            solver=solver,
            t0=0.0,
        )
        mean = observables(states)
        if noise == "well":
            # (..., N, 4): each well's precision per channel
            precision = pyro.sample("prec", dist.LogNormal(prec_loc, prec_scale).to_event(1))
        else:
            precision = torch.stack([glob[name] for name in PRECISION_SITES], -1)
        sd = precision.rsqrt().unsqueeze(-2)  # (..., N or 1, 1, 4): the time dim added
        pyro_hds.observe("y", dist.Normal(mean, sd), data)
