r"""The posteriordb Lotka-Volterra model of the Hudson's Bay Company lynx and hare pelts.

Data (posteriordb ``hudson_lynx_hare``): pelts in thousands, hare :math:`u` and lynx :math:`v`,
1900 (``y_init``) and 1901-1920 (``y``, times 1..20). Model (posteriordb
``lotka_volterra``, Carpenter 2018):

.. math::

    \frac{du}{dt} = (\alpha - \beta v) u, \qquad \frac{dv}{dt} = (-\gamma + \delta u) v,

    \alpha, \gamma \sim N^+(1, 0.5), \quad \beta, \delta \sim N^+(0.05, 0.05), \quad
    z^{init}_k \sim \log N(\log 10, 1), \quad \sigma_k \sim \log N(-1, 1),

    y^{init}_k \sim \log N(\log z^{init}_k, \sigma_k), \quad
    y_{tk} \sim \log N(\log z_k(t), \sigma_k),

with :math:`N^+` a normal truncated to positive values and the ODE solved from :math:`t = 0`.
Every latent is global (one individual): sites ``theta`` (4,), ``z_init`` (2,), ``sigma`` (2,).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints

import pyro_hds
from pyro_hds.models.lotka_volterra import rhs as lotka_volterra_rhs

__all__ = ["PositiveNormal", "initial_values", "load_data", "model", "reference_draws"]


class PositiveNormal(TorchDistribution):
    """``Normal(loc, scale)`` truncated to ``(0, inf)`` (normalised log-density, icdf sampling)."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}  # noqa: RUF012
    support = constraints.positive
    has_rsample = True

    def __init__(self, loc, scale, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(torch.as_tensor(loc), torch.as_tensor(scale))
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(PositiveNormal, _instance)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(PositiveNormal, new).__init__(torch.Size(batch_shape), validate_args=False)
        return new

    def _log_mass(self) -> torch.Tensor:
        # log P(X > 0) for X ~ N(loc, scale)
        return torch.special.log_ndtr(self.loc / self.scale)

    def log_prob(self, value):
        z = (value - self.loc) / self.scale
        return -0.5 * z * z - torch.log(self.scale) - 0.5 * math.log(2 * math.pi) - self._log_mass()

    def rsample(self, sample_shape=torch.Size()):  # noqa: B008
        shape = self._extended_shape(sample_shape)
        lo = torch.special.ndtr(-self.loc / self.scale)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
        p = (lo + u * (1 - lo)).clamp(max=1 - 1e-12)
        return self.loc + self.scale * torch.special.ndtri(p)


def _data_dir() -> Path:
    env = os.environ.get("PYRO_HDS_DATA")
    candidates = [Path(env) / "posteriordb", Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [Path.cwd() / "../shared/data/posteriordb"]
    candidates += [p / "shared/data/posteriordb" for p in here.parents]
    for c in candidates:
        if (c / "hudson_lynx_hare.json").exists():
            return c.resolve()
    raise FileNotFoundError(
        "hudson_lynx_hare.json not found: set PYRO_HDS_DATA to the folder holding posteriordb/ "
        "(the shared data folder of this project)."
    )


def load_data(dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``{"ts": (20,), "y_init": (2,), "y": (20, 2)}`` from the posteriordb JSON file."""
    dtype = dtype or torch.get_default_dtype()
    raw = json.loads((_data_dir() / "hudson_lynx_hare.json").read_text())
    return {k: torch.tensor(raw[k], dtype=dtype) for k in ("ts", "y_init", "y")}


def reference_draws() -> dict[str, torch.Tensor]:
    """Stan NUTS reference draws (10 chains x 1000), as ``theta`` (D, 4), ``z_init``, ``sigma``."""
    raw = json.loads((_data_dir() / "hudson_lynx_hare-lotka_volterra.json").read_text())

    def col(name: str) -> torch.Tensor:
        return torch.tensor([x for chain in raw for x in chain[name]], dtype=torch.float64)

    return {
        "theta": torch.stack([col(f"theta[{i}]") for i in range(1, 5)], -1),
        "z_init": torch.stack([col(f"z_init[{i}]") for i in range(1, 3)], -1),
        "sigma": torch.stack([col(f"sigma[{i}]") for i in range(1, 3)], -1),
    }


def initial_values(data: dict[str, torch.Tensor], sigma: float = 0.3) -> dict[str, torch.Tensor]:
    r"""A starting point for optimisation read off the data by gradient matching.

    Along a solution, :math:`\frac{d}{dt}\log u = \alpha - \beta v` and
    :math:`\frac{d}{dt}\log v = -\gamma + \delta u`: both are linear in the rates. With
    central differences of the log counts at the interior years as the left-hand sides and
    the observed counts as regressors, two least-squares fits give
    :math:`(\alpha, \beta)` and :math:`(\gamma, \delta)` (clamped to at least 1e-3, inside
    the prior's support). ``z_init`` starts at the 1900 counts and ``sigma`` at ``sigma``.

    Starting from the prior's median instead, the fitted trajectory can lock onto an orbit
    of the wrong period (a local optimum of the ELBO); this start is already close.

    :returns: ``{"theta": (4,), "z_init": (2,), "sigma": (2,)}`` for
        :func:`pyro.infer.autoguide.initialization.init_to_value`.
    """
    y = torch.cat([data["y_init"].unsqueeze(0), data["y"]], 0)  # (21, 2), years 0..20
    ts = torch.cat([data["ts"].new_zeros(1), data["ts"]])
    log_y = y.log()
    slope = (log_y[2:] - log_y[:-2]) / (ts[2:] - ts[:-2]).unsqueeze(-1)  # (19, 2)
    mid = y[1:-1]
    ones = torch.ones_like(mid[:, 0])
    ab = torch.linalg.lstsq(torch.stack([ones, -mid[:, 1]], -1), slope[:, :1]).solution
    gd = torch.linalg.lstsq(torch.stack([-ones, mid[:, 0]], -1), slope[:, 1:]).solution
    theta = torch.cat([ab.flatten(), gd.flatten()]).clamp(min=1e-3)
    return {
        "theta": theta,
        "z_init": data["y_init"].clone(),
        "sigma": torch.full_like(data["y_init"], sigma),
    }


def model(data: dict[str, torch.Tensor], solver: object = "dopri5") -> None:
    """The posteriordb model; ``data`` as returned by :func:`load_data`."""
    y = data["y"]
    loc = y.new_tensor([1.0, 0.05, 1.0, 0.05])
    scale = y.new_tensor([0.5, 0.05, 0.5, 0.05])
    theta = pyro.sample("theta", PositiveNormal(loc, scale).to_event(1))
    z_init = pyro.sample(
        "z_init", dist.LogNormal(y.new_tensor(math.log(10.0)), 1.0).expand([2]).to_event(1)
    )
    sigma = pyro.sample("sigma", dist.LogNormal(y.new_tensor(-1.0), 1.0).expand([2]).to_event(1))
    params = {
        "alpha": theta[..., 0],
        "beta": theta[..., 1],
        "gamma": theta[..., 2],
        "delta": theta[..., 3],
    }
    z = pyro_hds.ode("z", lotka_volterra_rhs, z_init, data["ts"], params, solver=solver, t0=0.0)
    pyro.sample("y_init", dist.LogNormal(z_init.log(), sigma).to_event(1), obs=data["y_init"])
    pyro.sample(
        "y", dist.LogNormal(z.clamp(min=1e-30).log(), sigma[..., None, :]).to_event(2), obs=y
    )
