"""Encoders: networks that map each individual's data to a feature vector for the guide.

Every encoder implements :class:`Encoder`: ``forward(data) -> (N, H)`` with ``H =
out_features``, reading ``data.observations`` (N, T, C), ``data.mask`` and ``data.times``.
The amortized guide appends the individual's inputs and group description to these features
and maps them to the posterior of each local latent, so a new individual's posterior costs one
forward pass.

Scales are fixed from the data the encoder first sees (the training data): the per-channel
maximum absolute observation and the largest time. They are buffers, saved and restored with
the guide, never recomputed on test data.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

__all__ = ["ConvEncoder", "Encoder", "MLPEncoder", "MaskedEncoder", "make_encoder"]


class Encoder(nn.Module, abc.ABC):
    """Abstract encoder: ``forward(data) -> (N, out_features)``."""

    out_features: int
    _config: dict[str, Any]
    y_scale: torch.Tensor
    t_scale: torch.Tensor
    fitted: torch.Tensor

    @abc.abstractmethod
    def forward(self, data: Any) -> torch.Tensor:  # pragma: no cover - abstract
        ...

    def config(self) -> dict[str, Any]:
        """Constructor options (ints, floats, strings), for saving a guide."""
        return {"type": type(self).__name__, **self._config}

    def _register_scales(self, num_channels: int) -> None:
        """The scale buffers every encoder keeps (fixed from the first data seen)."""
        self.register_buffer("y_scale", torch.ones(num_channels))
        self.register_buffer("t_scale", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def _grid_observations(self, data: Any, num_times: int, num_channels: int) -> torch.Tensor:
        """``data.observations`` after checking the shared-grid shape ``(N, T, C)`` this
        encoder was built for, fixing the scales on first use."""
        y = data.observations
        if y.shape[1:] != (num_times, num_channels):
            raise ValueError(
                f"{type(self).__name__} was built for (T, C) = {(num_times, num_channels)}, got "
                f"{tuple(y.shape[1:])}; use MaskedEncoder for data of varying length"
            )
        if not bool(self.fitted):
            self._fit_scales(data)
        return y

    def _fit_scales(self, data: Any) -> None:
        y = data.observations.abs() * data.mask
        scale = y.amax(dim=(0, 1)).clamp(min=1e-12)
        self.y_scale.data = scale.to(self.y_scale)
        self.t_scale.data = data.times.abs().max().clamp(min=1e-12).to(self.t_scale)
        self.fitted.fill_(True)  # type: ignore[operator]


class ConvEncoder(Encoder):
    """The convolutional encoder of vi-hds for a shared, regular time grid.

    Input: first differences along time of the scaled, mask-multiplied observations
    ``(N, T - 1, C)``; ``Conv1d(C, filters, kernel)`` without activation; ``AvgPool1d(pool,
    stride=1)``; flatten; ``Linear(hidden)``; ``tanh``. The kernel and pool shrink to fit short
    series (``kernel + pool - 1 <= T - 1``).
    """

    def __init__(
        self,
        num_times: int,
        num_channels: int,
        *,
        filters: int = 10,
        kernel: int = 10,
        pool: int = 5,
        hidden: int = 50,
    ) -> None:
        super().__init__()
        if num_times < 3:
            raise ValueError(f"ConvEncoder: needs at least 3 times, got {num_times}")
        length = num_times - 1
        kernel = max(1, min(kernel, length // 2))
        pool = max(1, min(pool, length - kernel + 1))
        self.num_times, self.num_channels = num_times, num_channels
        self.conv = nn.Conv1d(num_channels, filters, kernel)
        self.pool = nn.AvgPool1d(pool, stride=1)
        width = filters * (length - kernel + 1 - pool + 1)
        self.dense = nn.Linear(width, hidden)
        self.out_features = hidden
        self._config = dict(
            num_times=num_times,
            num_channels=num_channels,
            filters=filters,
            kernel=kernel,
            pool=pool,
            hidden=hidden,
        )
        self._register_scales(num_channels)

    def forward(self, data: Any) -> torch.Tensor:
        y = self._grid_observations(data, self.num_times, self.num_channels)
        x = (y * data.mask) / self.y_scale
        x = (x[:, 1:] - x[:, :-1]).transpose(1, 2)  # (N, C, T - 1)
        h = self.pool(self.conv(x)).flatten(1)
        return torch.tanh(self.dense(h))


class MaskedEncoder(Encoder):
    """An encoder for irregular, ragged or partly missing series.

    Each time row becomes ``[t / t_scale, m * y / y_scale, m]`` (``m`` the mask), is embedded by
    an MLP, and the embeddings are pooled over the observed rows by a masked mean and a masked
    max, then mapped by a dense layer with ``tanh``. Unobserved entries (mask False, including
    padding) have no effect on the output.
    """

    def __init__(self, num_channels: int, *, hidden: int = 64) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.embed = nn.Sequential(
            nn.Linear(2 * num_channels + 1, hidden), nn.Tanh(), nn.Linear(hidden, hidden)
        )
        self.dense = nn.Linear(2 * hidden, hidden)
        self.out_features = hidden
        self._config = dict(num_channels=num_channels, hidden=hidden)
        self._register_scales(num_channels)

    def forward(self, data: Any) -> torch.Tensor:
        y, m = data.observations, data.mask
        if y.shape[-1] != self.num_channels:
            raise ValueError(
                f"MaskedEncoder was built for {self.num_channels} channels, got {y.shape[-1]}"
            )
        if not bool(self.fitted):
            self._fit_scales(data)
        n, t_len, _ = y.shape
        t = data.times
        t = (t.expand(n, t_len) if t.dim() == 1 else t) / self.t_scale
        mf = m.to(y.dtype)
        row = torch.cat([t.unsqueeze(-1), mf * y / self.y_scale, mf], -1)
        e = self.embed(row)  # (N, T, H)
        observed = m.any(-1, keepdim=True)  # (N, T, 1)
        w = observed.to(y.dtype)
        count = w.sum(1).clamp(min=1.0)
        mean = (e * w).sum(1) / count
        very_negative = torch.finfo(e.dtype).min
        mx = torch.where(observed, e, torch.full_like(e, very_negative)).amax(1)
        mx = torch.where(observed.any(1), mx, torch.zeros_like(mx))
        return torch.tanh(self.dense(torch.cat([mean, mx], -1)))


class MLPEncoder(Encoder):
    """A multilayer perceptron on the whole series, for a shared grid of ``T`` times.

    Input: the scaled, mask-multiplied observations and the mask, flattened to ``2 T C``
    numbers (a missing value is thus told apart from a zero); ``depth`` layers of ``hidden``
    units with ELU activations. Unlike :class:`ConvEncoder` it looks at levels as well as
    changes and has more than one nonlinear layer, which suits short series whose parameters
    are nonlinear functions of the whole curve (pharmacokinetics, say).
    """

    def __init__(
        self, num_times: int, num_channels: int, *, hidden: int = 64, depth: int = 2
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"MLPEncoder: depth must be >= 1, got {depth}")
        self.num_times, self.num_channels = num_times, num_channels
        layers: list[nn.Module] = []
        width = 2 * num_times * num_channels
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ELU()]
            width = hidden
        self.net = nn.Sequential(*layers)
        self.out_features = hidden
        self._config = dict(
            num_times=num_times, num_channels=num_channels, hidden=hidden, depth=depth
        )
        self._register_scales(num_channels)

    def forward(self, data: Any) -> torch.Tensor:
        y = self._grid_observations(data, self.num_times, self.num_channels)
        m = data.mask.to(y.dtype)
        x = torch.cat([(y * m / self.y_scale).flatten(1), m.flatten(1)], -1)
        return self.net(x)


def make_encoder(config: dict[str, Any]) -> Encoder:
    """Rebuild an encoder from :meth:`Encoder.config`."""
    config = dict(config)
    kind = config.pop("type")
    classes = {"ConvEncoder": ConvEncoder, "MLPEncoder": MLPEncoder, "MaskedEncoder": MaskedEncoder}
    if kind not in classes:
        raise ValueError(f"unknown encoder type {kind!r}; known: {sorted(classes)}")
    if kind in ("ConvEncoder", "MLPEncoder"):
        cls = ConvEncoder if kind == "ConvEncoder" else MLPEncoder
        return cls(config.pop("num_times"), config.pop("num_channels"), **config)
    return MaskedEncoder(config.pop("num_channels"), **config)
