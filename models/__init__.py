"""The pyro_hds model zoo: one short file per model (ODE right-hand side, priors, defaults)."""
