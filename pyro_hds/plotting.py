"""Plots people would rather look at than read: fits with credible bands, training curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["plot_fits", "plot_training"]


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def plot_fits(
    posterior: Any,
    data: Any,
    site: str = "y",
    individuals: Sequence[int] | None = None,
    *,
    prob: float = 0.9,
    channels: Sequence[int] | None = None,
    max_panels: int = 12,
    ncols: int = 4,
    path: str | None = None,
):
    """Observed series with posterior predictive median and central ``prob`` bands.

    :param posterior: a :class:`~pyro_hds.results.Posterior` of ``data``.
    :param site: the observation site whose posterior predictive draws are plotted.
    :param individuals: positions in ``data`` to plot (default: spread over the data set).
    :param path: save the figure there (PNG, PDF, ... by extension) as well as returning it.
    :returns: the matplotlib figure.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if site not in posterior.predictive:
        raise KeyError(
            f"plot_fits(): no predictive site {site!r}; have {list(posterior.predictive)}"
        )
    draws = _np(posterior.predictive[site])  # (D, N, T, C)
    n = len(data)
    if individuals is None:
        count = min(n, max_panels)
        individuals = sorted({round(float(i)) for i in np.linspace(0, n - 1, count)})
    individuals = list(individuals)
    chans = list(range(draws.shape[-1])) if channels is None else list(channels)
    nrows = math.ceil(len(individuals) / ncols)
    ncol = min(ncols, len(individuals))
    fig, axes = plt.subplots(nrows, ncol, figsize=(3.2 * ncol, 2.6 * nrows), squeeze=False)
    lo, hi = (1 - prob) / 2, 1 - (1 - prob) / 2
    times = data.times
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, i in zip(axes.flat, individuals):
        t = _np(times if times.dim() == 1 else times[i])
        for j, c in enumerate(chans):
            col = colors[j % len(colors)]
            q = np.quantile(draws[:, i, :, c], [lo, 0.5, hi], axis=0)
            ax.fill_between(t, q[0], q[2], color=col, alpha=0.25, linewidth=0)
            ax.plot(t, q[1], color=col, linewidth=1.2, label=str(data.channel_names[c]))
            m = _np(data.mask[i, :, c]).astype(bool)
            ax.plot(t[m], _np(data.observations[i, :, c])[m], "o", color=col, markersize=2.5)
        group = data.group_names[int(data.groups[i])]
        ax.set_title(f"{data.individual_ids[i]} ({group})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(individuals) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=6, loc="best")
    fig.suptitle(f"posterior predictive: median and {int(prob * 100)}% band; dots observed")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_training(history: dict, path: str | None = None):
    """The training loss per step and, if logged, the validation bound per individual."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    has_val = bool(history.get("val_bound"))
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(9 if has_val else 5, 3.2))
    axes = np.atleast_1d(axes)
    axes[0].plot(history["step"], history["loss"], linewidth=0.8)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss (negative bound)")
    axes[0].set_yscale("symlog")
    if has_val:
        axes[1].plot(history["val_step"], history["val_bound"], "o-", markersize=3)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("held-out bound per individual")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
