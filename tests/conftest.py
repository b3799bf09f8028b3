"""Shared test set-up: float64 by default, fixed seeds, a clean Pyro parameter store."""

import os

import pyro
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)  # module-scoped fixtures run before the autouse one


@pytest.fixture(autouse=True)
def _clean_state():
    """Every test starts in float64 with seed 0, validation on and an empty param store."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    torch.set_default_dtype(old)
    pyro.clear_param_store()


@pytest.fixture
def solves(monkeypatch):
    """Counts the solves of pyro_hds.ode.solve: ``solves.calls`` holds each call's site name,
    ``solves.real`` is the unpatched function."""
    import importlib
    from types import SimpleNamespace

    ode_module = importlib.import_module("pyro_hds.ode")
    out = SimpleNamespace(calls=[], real=ode_module.solve)

    def counting_solve(*args, **kwargs):
        out.calls.append(kwargs.get("name"))
        return out.real(*args, **kwargs)

    monkeypatch.setattr(ode_module, "solve", counting_solve)
    return out
