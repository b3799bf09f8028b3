"""Time-varying inputs u(t) of an ODE: piecewise-constant schedules and callables."""

from __future__ import annotations

import torch

__all__ = ["PiecewiseConstant"]


class PiecewiseConstant:
    """An input that holds ``values[..., j, :]`` on ``[b_{j-1}, b_j)`` (``b_{-1} = -inf``,
    ``b_M = +inf``).

    :param breakpoints: ``(..., M)`` sorted change times (one set per element, or shared).
    :param values: ``(..., M + 1, D)`` the input on each piece.

    The solvers integrate up to every breakpoint exactly, so adaptive steps never straddle a
    jump of the input.
    """

    def __init__(self, breakpoints: torch.Tensor, values: torch.Tensor) -> None:
        breakpoints = torch.as_tensor(breakpoints)
        values = torch.as_tensor(values)
        if values.dim() < 2 or values.shape[-2] != breakpoints.shape[-1] + 1:
            raise ValueError(
                f"PiecewiseConstant: values must have shape (..., M + 1, D) for M = "
                f"{breakpoints.shape[-1]} breakpoints, got {tuple(values.shape)}"
            )
        if breakpoints.shape[-1] > 1 and bool((breakpoints.diff(dim=-1) < 0).any()):
            raise ValueError("PiecewiseConstant: breakpoints must be sorted")
        self.breakpoints = breakpoints
        self.values = values

    @property
    def batch_shape(self) -> torch.Size:
        return torch.broadcast_shapes(self.breakpoints.shape[:-1], self.values.shape[:-2])

    def flat(self, batch_shape: torch.Size) -> PiecewiseConstant:
        """Expanded to ``batch_shape`` and flattened to ``(B, ...)``."""
        m, d = self.breakpoints.shape[-1], self.values.shape[-1]
        bp = self.breakpoints.expand(*batch_shape, m).reshape(-1, m)
        vals = self.values.expand(*batch_shape, m + 1, d).reshape(-1, m + 1, d)
        return PiecewiseConstant(bp, vals)

    def __call__(self, t: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, D)`` at per-element times ``t`` ``(B,)`` (or 0-d) of a flat input."""
        bp, vals = self.breakpoints, self.values
        if idx is not None:
            bp, vals = bp.index_select(0, idx), vals.index_select(0, idx)
        tt = t.expand(bp.shape[0]) if t.dim() == 0 else t
        j = torch.searchsorted(bp.contiguous(), tt.unsqueeze(-1).contiguous(), right=True)
        return vals.gather(1, j.unsqueeze(-1).expand(-1, 1, vals.shape[-1])).squeeze(1)
