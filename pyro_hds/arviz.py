"""Export of posterior draws to an ArviZ ``xarray.DataTree``.

The tree follows ArviZ's conventions (``arviz-base`` ``from_dict``): sample dims ``chain`` and
``draw`` (one chain of independent resampled draws, or the ``num_chains`` Markov chains of
:meth:`FitResult.gibbs <pyro_hds.FitResult.gibbs>`), named dims and coordinates from the data
set's labels, and the groups

* ``posterior``: global sites ``(chain, draw, *event)``, group sites ``(chain, draw, group,
  ...)``, local sites ``(chain, draw, individual, ...)`` and ODE trajectories ``(chain, draw,
  individual, time, state)``; a last event dim that the model names with
  ``infer={"event_coords": (dim, labels)}`` gets that dim and coordinate;
* ``posterior_predictive``: observation sites ``(chain, draw, individual, time, channel)``;
* ``log_likelihood``: float64 ``(chain, draw, individual)``, the log-likelihood of each
  individual's observed series: pointwise for leave-one-individual-out (``loo``);
* ``observed_data``: observations (NaN where not observed) and the mask;
* ``constant_data``: times, inputs, group codes and group features;
* ``sample_stats``: the inner importance-weighted bound per draw and individual, and per
  individual the Pareto k-hat and effective sample size of the importance weights.

It round-trips through netCDF (``tree.to_netcdf(path)``, ``xarray.open_datatree(path)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import xarray as xr

__all__ = ["to_datatree"]


def _np(x: torch.Tensor, dtype=None) -> np.ndarray:
    arr = x.detach().cpu().numpy()
    return arr.astype(dtype) if dtype is not None else arr


def to_datatree(posterior: Any, data: Any) -> xr.DataTree:
    """Build the ArviZ ``DataTree`` of a :class:`~pyro_hds.results.Posterior` for ``data``."""
    from arviz_base import from_dict

    chains = int(getattr(posterior, "num_chains", 1))

    def chained(x: torch.Tensor, dtype=None) -> np.ndarray:
        # (D, ...) -> (chain, draw, ...): the draws are the chains one after another
        arr = _np(x, dtype)
        return arr.reshape(chains, arr.shape[0] // chains, *arr.shape[1:])

    n = len(data)
    times = data.times
    shared = times.dim() == 1
    time_coord = _np(times) if shared else np.arange(times.shape[-1])
    coords: dict[str, Any] = {
        "individual": [str(i) for i in data.individual_ids],
        "group": [str(g) for g in data.group_names],
        "time": time_coord,
        "channel": [str(c) for c in data.channel_names],
    }
    if data.inputs.shape[-1]:
        coords["input"] = [str(i) for i in data.input_names]
    dims: dict[str, list[str]] = {}
    post: dict[str, np.ndarray] = {}
    for name, value in posterior.samples.items():
        level = posterior.site_levels.get(name, "global")
        arr = chained(value)
        extra = arr.ndim - 2
        if level in ("local", "deterministic") and extra >= 1 and arr.shape[2] == n:
            site_dims = ["individual"]
            if level == "deterministic" and extra == 3 and arr.shape[3] == len(time_coord):
                site_dims += ["time", f"{name}_state"]
        elif level == "group":
            site_dims = ["group"]
        else:
            site_dims = []
        level_dims = len(site_dims)
        site_dims += [f"{name}_dim_{j}" for j in range(level_dims, extra)]
        named = getattr(posterior, "event_coords", {}).get(name)
        if named is not None and extra > level_dims:  # the site has an event dim to name
            dim, labels = named
            if arr.shape[-1] != len(labels):
                raise ValueError(
                    f"to_datatree: site {name!r} has {arr.shape[-1]} entries in its last dim "
                    f"but its event_coords name {len(labels)} ({dim!r}); make the model's "
                    "infer={'event_coords': (dim, labels)} list one label per entry"
                )
            if dim in coords and list(coords[dim]) != list(labels):
                raise ValueError(
                    f"to_datatree: dim {dim!r} of site {name!r} has labels {list(labels)}, "
                    f"another site or the data gave it {list(coords[dim])}; use a dim name of "
                    "its own"
                )
            coords[dim] = list(labels)
            site_dims[-1] = dim
        dims[name] = site_dims
        post[name] = arr
    pred = {}
    for name, value in posterior.predictive.items():
        pred[name] = chained(value)
        dims[name] = ["individual", "time", "channel"][: pred[name].ndim - 2]
    loglik = {name: chained(v, np.float64) for name, v in posterior.log_likelihood.items()}
    obs_name = next(iter(posterior.predictive), "y")
    observed = np.where(_np(data.mask), _np(data.observations), np.nan)
    constant: dict[str, np.ndarray] = {
        "times": _np(times),
        "groups": _np(data.groups),
    }
    const_dims: dict[str, list[str]] = {
        "times": ["time"] if shared else ["individual", "time"],
        "groups": ["individual"],
    }
    if data.inputs.shape[-1]:
        constant["inputs"] = _np(data.inputs)
        const_dims["inputs"] = ["individual", "input"]
    if getattr(data, "group_features", None) is not None:
        constant["group_features"] = _np(data.group_features)
        const_dims["group_features"] = ["group", "feature"]
        coords["feature"] = [str(f) for f in data.feature_names]
    stats = {"inner_bound": chained(posterior.inner_bound, np.float64)}
    all_dims = {
        **dims,
        **{name: ["individual"] for name in loglik},
        **const_dims,
        "inner_bound": ["individual"],
        obs_name: ["individual", "time", "channel"],
        "mask": ["individual", "time", "channel"],
    }
    tree = from_dict(
        {
            "posterior": post,
            "posterior_predictive": pred,
            "log_likelihood": loglik,
            "sample_stats": stats,
            "observed_data": {obs_name: observed, "mask": _np(data.mask)},
            "constant_data": constant,
        },
        coords=coords,
        dims=all_dims,
    )
    ss = tree["sample_stats"].to_dataset()
    ss["pareto_k"] = xr.DataArray(_np(posterior.pareto_k, np.float64), dims=["individual"])
    ss["ess"] = xr.DataArray(_np(posterior.ess, np.float64), dims=["individual"])
    ss.attrs["num_particles"] = int(posterior.num_particles)
    tree["sample_stats"] = xr.DataTree(ss)
    tree.attrs["inference_library"] = "pyro_hds"
    return tree
