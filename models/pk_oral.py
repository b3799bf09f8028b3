r"""Population pharmacokinetics: one compartment, first-order oral absorption, repeated doses.

States: drug amount in the gut :math:`A_g` and in the central compartment :math:`A_c`; a dose
of amount :math:`D` at time :math:`t_d` adds :math:`D` to :math:`A_g`.

.. math::

    \frac{dA_g}{dt} = -k_a A_g, \qquad
    \frac{dA_c}{dt} = k_a A_g - \frac{CL}{V} A_c, \qquad
    C(t) = A_c(t) / V,

with the closed form (superposition of Bateman functions over doses, :math:`k = CL/V`)

.. math::

    C(t) = \sum_{d: t_d < t} \frac{D_d\, k_a}{V (k_a - k)}
           \big(e^{-k (t - t_d)} - e^{-k_a (t - t_d)}\big).

Hierarchy: absorption rate :math:`k_a`, clearance :math:`CL` and volume :math:`V` vary by
individual (log-normal, spread :math:`\omega`); clearance also varies by group (e.g. a genotype
of a metabolising enzyme) around the population clearance (spread ``group_sd``); observations
are concentrations with Gaussian noise :math:`\sigma`.

Sites: population ``ka_pop``, ``cl_pop``, ``v_pop``, ``group_sd``, ``omega``, ``sigma``;
group ``cl_group`` (G,); individual ``ka``, ``cl``, ``v`` (N,); the trajectory ``x``
(N, T, 2) and the observations ``y`` (N, T, 1).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

import pyro_hds
from pyro_hds.data import Dataset, Doses
from pyro_hds.solvers import RK4

__all__ = ["TRUE_PARAMS", "concentration", "model", "rhs", "simulate"]

#: the parameters `simulate` draws data with (the demo prints the posterior beside them)
TRUE_PARAMS = {
    "ka_pop": 1.0,
    "cl_pop": 3.0,
    "v_pop": 20.0,
    "group_sd": 0.6,
    "omega": 0.2,
    "sigma": 0.1,
    "cl_group": (1.5, 3.0, 6.0),
}
SAMPLE_TIMES = (0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 13.0, 14.0, 16.0, 20.0, 24.0)
DOSE_TIMES = (0.0, 12.0)
DOSE_AMOUNT = 100.0


def rhs(t: torch.Tensor, y: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """dy/dt for y = (A_g, A_c) of shape (..., 2); params ka, cl, v of batch shape (...)."""
    ka, k = params["ka"], params["cl"] / params["v"]
    # state-major (see pyro_hds.ode): read each state as a leading slice and stack the
    # derivatives along a new first dim, so no evaluation interleaves (B, 2) memory
    gut, central = y.movedim(-1, 0).unbind(0)
    absorbed = ka * gut
    d_central = torch.addcmul(absorbed, k, central, value=-1.0)  # ka A_g - k A_c
    # d_central has the full batch shape; absorbed may broadcast to it (ka, A_g narrower)
    return torch.stack((-absorbed.expand_as(d_central), d_central), 0).movedim(0, -1)


def concentration(t, ka, cl, v, dose_times, dose_amounts) -> torch.Tensor:
    """Closed-form concentration at times ``t`` (..., T) for doses ``(M,)`` (see module)."""
    k = cl / v
    out = torch.zeros_like(t)
    for td, amount in zip(dose_times, dose_amounts):
        dt = t - td
        term = amount * ka / (v * (ka - k)) * (torch.exp(-k * dt) - torch.exp(-ka * dt))
        out = out + torch.where(dt > 0, term, torch.zeros_like(term))
    return out


def model(data: Dataset, solver: str | object = RK4(substeps=4)) -> None:
    """The hierarchical PK model of the module docstring, for a :class:`~pyro_hds.Dataset`."""
    ka_pop = pyro.sample("ka_pop", dist.LogNormal(0.0, 0.5))
    cl_pop = pyro.sample("cl_pop", dist.LogNormal(math.log(3.0), 0.5))
    v_pop = pyro.sample("v_pop", dist.LogNormal(math.log(20.0), 0.5))
    group_sd = pyro.sample("group_sd", dist.HalfNormal(1.0))
    omega = pyro.sample("omega", dist.HalfNormal(0.5))
    sigma = pyro.sample("sigma", dist.HalfNormal(0.5))
    with pyro_hds.groups(data):
        cl_group = pyro.sample("cl_group", dist.LogNormal(cl_pop.log(), group_sd))
    with pyro_hds.individuals(data):
        ka = pyro.sample("ka", dist.LogNormal(ka_pop.log(), omega))
        cl = pyro.sample("cl", dist.LogNormal(cl_group[..., data.groups].log(), omega))
        v = pyro.sample("v", dist.LogNormal(v_pop.log(), omega))
        y0 = torch.zeros(2, dtype=ka.dtype, device=ka.device)
        x = pyro_hds.ode(
            "x",
            rhs,
            y0,
            data.times,
            {"ka": ka, "cl": cl, "v": v},
            solver=solver,
            t0=0.0,
            doses=data.doses,
        )
        conc = x[..., 1:2] / v[..., None, None]  # (..., N, T, 1)
        # sigma has batch shape (..., 1, 1): add the (T, C) dims before broadcasting
        pyro_hds.observe("y", dist.Normal(conc, sigma[..., None, None]), data)


def simulate(
    num_groups: int = 3,
    per_group: int = 34,
    seed: int = 0,
    params: dict | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Dataset, dict[str, torch.Tensor]]:
    """Draw a data set from the model with known parameters (closed-form solution).

    :returns: ``(data, truth)``: a :class:`~pyro_hds.Dataset` of ``num_groups * per_group``
        individuals (groups "G1", "G2", ...; two doses of 100 at t = 0 and 12 into the gut) and
        the true values of every site, individual ones as ``(N,)`` tensors.
    """
    p = dict(TRUE_PARAMS if params is None else params)
    dtype = dtype or torch.get_default_dtype()
    gen = torch.Generator().manual_seed(seed)
    n = num_groups * per_group
    cl_group = torch.as_tensor(p["cl_group"], dtype=dtype)[:num_groups]
    if cl_group.numel() != num_groups:
        raise ValueError(f"simulate(): params['cl_group'] needs {num_groups} values")
    groups = torch.arange(num_groups).repeat_interleave(per_group)

    def lognormal(center: torch.Tensor | float, size: int) -> torch.Tensor:
        center = torch.as_tensor(center, dtype=dtype)
        noise = torch.randn(size, generator=gen, dtype=dtype)
        return center * torch.exp(p["omega"] * noise)

    ka = lognormal(p["ka_pop"], n)
    cl = lognormal(cl_group[groups], n)
    v = lognormal(p["v_pop"], n)
    t = torch.tensor(SAMPLE_TIMES, dtype=dtype)
    conc = concentration(
        t, ka[:, None], cl[:, None], v[:, None], DOSE_TIMES, [DOSE_AMOUNT] * len(DOSE_TIMES)
    )
    y = conc + p["sigma"] * torch.randn(conc.shape, generator=gen, dtype=dtype)
    m = len(DOSE_TIMES)
    doses = Doses(
        times=torch.tensor(DOSE_TIMES, dtype=dtype).expand(n, m).clone(),
        amounts=torch.full((n, m), DOSE_AMOUNT, dtype=dtype),
        targets=torch.zeros(n, m, dtype=torch.long),
    )
    data = Dataset.from_arrays(
        y[..., None],
        t,
        groups=groups,
        group_names=[f"G{j + 1}" for j in range(num_groups)],
        individual_ids=[f"subject{i:03d}" for i in range(n)],
        channel_names=["concentration"],
        doses=doses,
    )
    truth = {k: torch.as_tensor(v, dtype=dtype) for k, v in p.items() if k != "cl_group"}
    truth.update({"cl_group": cl_group, "ka": ka, "cl": cl, "v": v})
    return data, truth
