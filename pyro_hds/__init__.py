"""pyro_hds: amortized Bayesian inference for hierarchical dynamical-system models in Pyro."""

__version__ = "0.1.0.dev0"
