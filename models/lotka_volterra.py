"""Lotka-Volterra predator-prey dynamics, batched over any leading dimensions.

The state is ``y = (x, z)``: prey ``x`` and predators ``z``. With per-element parameters
``alpha, beta, gamma, delta > 0``,

.. math::

    \\frac{dx}{dt} = \\alpha x - \\beta x z, \\qquad
    \\frac{dz}{dt} = \\delta x z - \\gamma z.

Positive solutions are periodic orbits around the coexistence point
``(x*, z*) = (gamma / delta, alpha / beta)``; the quantity
``V = delta x - gamma log x + beta z - alpha log z`` is conserved along them, which makes the
system a standard non-stiff test problem whose accuracy is easy to check (Hairer, Norsett and
Wanner, *Solving Ordinary Differential Equations I*, section I.16; Lotka 1925, Volterra 1926).

Shapes: ``y`` is ``(..., 2)``; each parameter is a tensor broadcastable to the batch shape
``(...)`` (scalars allowed); ``t`` is unused (the system is autonomous). The returned
derivative has the broadcast batch shape followed by ``2``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

STATE_NAMES: tuple[str, ...] = ("prey", "predator")
PARAM_NAMES: tuple[str, ...] = ("alpha", "beta", "gamma", "delta")

#: Textbook values: coexistence point (1, 1); small orbits around it have period
#: ``2 pi / sqrt(alpha gamma)``, about 6.3 time units.
DEFAULT_PARAMS: dict[str, float] = {"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "delta": 1.0}


def rhs(t: torch.Tensor, y: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Lotka-Volterra vector field ``dy/dt`` for a batch of systems.

    Args:
        t: current time, broadcastable to the batch shape (ignored: the system is autonomous).
        y: state ``(..., 2)`` holding (prey, predator).
        params: mapping with tensors ``alpha, beta, gamma, delta`` broadcastable to ``(...)``.

    Returns:
        ``(..., 2)`` tensor ``(alpha x - beta x z, delta x z - gamma z)``.
    """
    x, z = y.movedim(-1, 0).unbind(0)  # state-major reads and writes (see pyro_hds.ode)
    xz = x * z
    dx = params["alpha"] * x - params["beta"] * xz
    dz = params["delta"] * xz - params["gamma"] * z
    return torch.stack(torch.broadcast_tensors(dx, dz), 0).movedim(0, -1)


def conserved_quantity(y: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """First integral ``V = delta x - gamma log x + beta z - alpha log z`` of shape ``(...)``.

    Constant along exact positive solutions, so its drift measures a solver's error.
    """
    x = y[..., 0]
    z = y[..., 1]
    return (
        params["delta"] * x
        - params["gamma"] * torch.log(x)
        + params["beta"] * z
        - params["alpha"] * torch.log(z)
    )
