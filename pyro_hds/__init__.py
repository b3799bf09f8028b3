"""pyro_hds: amortized Bayesian inference for hierarchical dynamical-system models in Pyro.

The public API is listed in ``__all__``; every other module is private.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "Dataset": "pyro_hds.data",
    "DataValidationError": "pyro_hds.data",
    "Doses": "pyro_hds.data",
    "ode": "pyro_hds.ode",
    "solve": "pyro_hds.ode",
    "Euler": "pyro_hds.solvers",
    "Heun": "pyro_hds.solvers",
    "RK4": "pyro_hds.solvers",
    "Dopri5": "pyro_hds.solvers",
    "PiecewiseConstant": "pyro_hds.solvers",
    "Status": "pyro_hds.solvers",
    "Solution": "pyro_hds.solvers",
    "individuals": "pyro_hds.plates",
    "groups": "pyro_hds.plates",
    "observe": "pyro_hds.likelihoods",
    "MaskedObservation": "pyro_hds.likelihoods",
    "IWAE": "pyro_hds.objectives",
    "LogWeights": "pyro_hds.objectives",
    "NonFiniteLossError": "pyro_hds.objectives",
    "Encoder": "pyro_hds.encoders",
    "ConvEncoder": "pyro_hds.encoders",
    "MaskedEncoder": "pyro_hds.encoders",
    "AmortizedGuide": "pyro_hds.guides",
    "init_to_prior_median": "pyro_hds.guides",
    "fit": "pyro_hds.fit",
    "FitResult": "pyro_hds.results",
    "Posterior": "pyro_hds.results",
    "load": "pyro_hds.results",
    "to_datatree": "pyro_hds.arviz",
}

__all__ = sorted(_EXPORTS)

# the functions `ode` and `fit` share their names with their modules: bind them eagerly, so that
# importing the submodule never shadows the function on the package
from pyro_hds.fit import fit as fit  # noqa: E402
from pyro_hds.ode import ode as ode  # noqa: E402
from pyro_hds.ode import solve as solve  # noqa: E402


def __getattr__(name: str) -> Any:
    # public names load on first use, so `import pyro_hds` stays light
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pyro_hds' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
