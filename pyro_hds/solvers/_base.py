"""Shared pieces of the solvers: status codes, the solution record and the schedule.

Every solver integrates a *flat* batch of ``B`` independent systems (the caller flattens the
batch shape) over a per-element sorted grid of ``P`` points that merges observation times,
dose times and input breakpoints (see :func:`build_schedule`). States are recorded at every
grid point; observation outputs are gathered from them at the end, so no ``(B, T, S)`` tensor is
copied inside the loop.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Schedule", "Solution", "Status", "build_schedule"]

OBSERVATION, DOSE, BREAKPOINT = 0, 1, 2


class Status(enum.IntEnum):
    """Per-element outcome of a solve."""

    SUCCESS = 0
    NONFINITE = 1
    MAX_STEPS = 2
    STEP_TOO_SMALL = 3

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.SUCCESS: "the solution reached every requested time",
    Status.NONFINITE: "the state became NaN, infinite or larger than the square root of the "
    "dtype's largest number (the ODE diverged for these parameters)",
    Status.MAX_STEPS: "the adaptive solver took max_steps steps before the last time",
    Status.STEP_TOO_SMALL: "the adaptive step size underflowed (a stiff or singular system)",
}


@dataclass
class Solution:
    """The result of :func:`pyro_hds.solve`.

    :ivar ys: ``(..., T, S)`` states at the requested times. An element that failed holds its
        last finite state from the failure on (so that distributions built on it validate);
        ``status`` says which elements failed, and :attr:`ys_or_nan` marks them with NaN.
    :ivar status: ``(...)`` long :class:`Status` codes.
    :ivar num_steps: ``(...)`` steps taken per element (accepted and rejected).
    :ivar num_rejected: ``(...)`` rejected steps per element (adaptive solvers).
    :ivar ts: the requested times, as given.
    """

    ys: torch.Tensor
    status: torch.Tensor
    num_steps: torch.Tensor
    num_rejected: torch.Tensor
    ts: torch.Tensor
    reached: torch.Tensor | None = None

    @property
    def ok(self) -> torch.Tensor:
        """``(...)`` bool, True where the solve succeeded."""
        return self.status == Status.SUCCESS

    @property
    def ys_or_nan(self) -> torch.Tensor:
        """``ys`` with NaN at every time a failed element did not reach."""
        if self.reached is None:
            return self.ys
        return torch.where(self.reached.unsqueeze(-1), self.ys, self.ys.new_full((), float("nan")))

    def messages(self) -> list[str]:
        """One line per distinct non-success status, with how many elements have it."""
        out = []
        for code in Status:
            if code == Status.SUCCESS:
                continue
            count = int((self.status == code).sum())
            if count:
                out.append(f"{count} element(s): {code.name}: {code.message}")
        return out


@dataclass
class Schedule:
    """A flat batch's merged grid.

    :ivar t0: ``(B,)`` start times.
    :ivar points: ``(B, P)`` sorted grid times (all >= t0).
    :ivar kind: ``(B, P)`` OBSERVATION / DOSE / BREAKPOINT codes.
    :ivar amount: ``(B, P)`` dose amounts (0 elsewhere); ``target`` ``(B, P)`` state index.
    :ivar obs_index: ``(B, T)`` position of each observation time in ``points``.
    :ivar has_jumps: whether any dose has a non-zero amount.
    :ivar obs_only: the grid holds the observation times only (no doses or breakpoints), so
        ``obs_index`` is ``arange(T)`` for every element.

    A schedule is never modified after it is built: :func:`pyro_hds.solve` reuses the one of
    an earlier solve with the same grid, and what is derived from it (:meth:`column_jumps`,
    :meth:`zero_length`) is computed once.
    """

    t0: torch.Tensor
    points: torch.Tensor
    kind: torch.Tensor
    amount: torch.Tensor
    target: torch.Tensor
    obs_index: torch.Tensor
    has_jumps: bool
    obs_only: bool = False
    _derived: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def apply_jumps(
        self,
        y: torch.Tensor,
        arrived: torch.Tensor,
        p: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add the doses at grid position ``p`` of the elements that ``arrived`` (for the
        elements ``rows`` of the batch, or all)."""
        kind, amount, target = self.kind, self.amount, self.target
        if rows is not None:
            kind, amount, target = (x.index_select(0, rows) for x in (kind, amount, target))
        kind = kind.gather(1, p[:, None]).squeeze(1)
        amount = amount.gather(1, p[:, None]).squeeze(1)
        target = target.gather(1, p[:, None]).squeeze(1)
        add = torch.where(arrived & (kind == DOSE), amount, amount.new_zeros(()))
        onehot = torch.nn.functional.one_hot(target, y.shape[-1]).to(y.dtype)
        return y + add[:, None] * onehot

    def expand(self, grid_batch: torch.Size, batch: torch.Size) -> Schedule:
        """This schedule of a flat ``grid_batch`` (every field ``(prod(grid_batch), ...)``)
        broadcast to the flat ``batch``: the grid depends on the observation times, doses
        and breakpoints only, so it is merged once per distinct grid, not once per particle
        and individual."""
        if grid_batch == batch:
            return self

        def grow(x: torch.Tensor) -> torch.Tensor:
            tail = x.shape[1:]
            return x.reshape(*grid_batch, *tail).expand(*batch, *tail).reshape(-1, *tail)

        return Schedule(
            grow(self.t0),
            grow(self.points),
            grow(self.kind),
            grow(self.amount),
            grow(self.target),
            grow(self.obs_index),
            self.has_jumps,
            obs_only=self.obs_only,
        )

    def column_jumps(self, num_states: int, dtype: torch.dtype) -> dict[int, torch.Tensor]:
        """``{p: (B, S) increment}`` for every grid position ``p`` at which some element has a
        non-zero dose (one host read): what a solver whose elements all reach position ``p``
        together (the fixed-step loop) adds there, without gathering at the other positions."""
        if not self.has_jumps:
            return {}
        key = ("column_jumps", num_states, dtype)
        if key in self._derived:
            return self._derived[key]
        dosed = (self.kind == DOSE) & (self.amount != 0)
        columns = dosed.any(0).nonzero().flatten().tolist()
        out = {}
        for p in columns:
            amount = torch.where(dosed[:, p], self.amount[:, p], self.amount.new_zeros(()))
            onehot = torch.nn.functional.one_hot(self.target[:, p], num_states).to(dtype)
            out[p] = amount.to(dtype)[:, None] * onehot
        self._derived[key] = out
        return out

    def zero_length(self) -> list[bool]:
        """Per grid position ``p``, whether every element reaches it with no time to go: its
        previous point (``t0`` for the first) is at the same time, as for a dose at ``t0`` or
        one at an observation time. A fixed-step solver skips such an interval (its steps of
        size 0 would return the state unchanged wherever the derivative is finite)."""
        if "zero_length" not in self._derived:
            previous = torch.cat([self.t0[:, None], self.points[:, :-1]], 1)
            self._derived["zero_length"] = (self.points == previous).all(0).tolist()
        return self._derived["zero_length"]


def build_schedule(
    times: torch.Tensor,
    t0: torch.Tensor,
    dose_times: torch.Tensor | None = None,
    dose_amounts: torch.Tensor | None = None,
    dose_targets: torch.Tensor | None = None,
    breakpoints: torch.Tensor | None = None,
    *,
    num_states: int,
    name: str = "ode",
) -> Schedule:
    """Merge flat ``(B, T)`` observation times with ``(B, M)`` doses and breakpoints.

    Observations come before a dose at the same time (the pre-dose value is observed). Doses
    and breakpoints after the last observation time, and padding doses (time +inf), are moved
    to the last observation time with amount 0: they cannot affect any output.
    """
    b, t_len = times.shape
    last = times[:, -1:]
    parts_t = [times]
    parts_k = [torch.full_like(times, OBSERVATION, dtype=torch.long)]
    parts_a = [torch.zeros_like(times)]
    parts_g = [torch.zeros_like(times, dtype=torch.long)]
    has_jumps = False
    if dose_times is not None:
        assert dose_amounts is not None and dose_targets is not None
        finite = torch.isfinite(dose_times)
        early = finite & (dose_times < t0[:, None])
        if bool(early.any()):
            i = int(early.any(1).nonzero()[0])
            raise ValueError(
                f"ode({name!r}): element {i} has a dose at t = "
                f"{float(dose_times[i][early[i]][0])} before t0 = {float(t0[i])}; include it in "
                "y0 or start the solve earlier (t0=...)"
            )
        if bool((dose_targets >= num_states).any()):
            raise ValueError(
                f"ode({name!r}): a dose targets state {int(dose_targets.max())}, but the state "
                f"has {num_states} components"
            )
        late = ~finite | (dose_times > last)
        parts_t.append(torch.where(late, last, dose_times))
        parts_k.append(torch.full_like(dose_targets, DOSE))
        parts_a.append(torch.where(late, torch.zeros_like(dose_amounts), dose_amounts))
        parts_g.append(dose_targets.long())
        has_jumps = True
    if breakpoints is not None:
        late = ~torch.isfinite(breakpoints) | (breakpoints > last)
        bp = torch.where(late, last, torch.maximum(breakpoints, t0[:, None]))
        parts_t.append(bp)
        parts_k.append(torch.full_like(bp, BREAKPOINT, dtype=torch.long))
        parts_a.append(torch.zeros_like(bp))
        parts_g.append(torch.zeros_like(bp, dtype=torch.long))
    points = torch.cat(parts_t, 1)
    kind = torch.cat(parts_k, 1)
    amount = torch.cat(parts_a, 1)
    target = torch.cat(parts_g, 1)
    if len(parts_t) > 1:
        order = torch.sort(points, dim=1, stable=True).indices
        points = points.gather(1, order)
        kind = kind.gather(1, order)
        amount = amount.gather(1, order)
        target = target.gather(1, order)
        inverse = torch.argsort(order, dim=1)
        obs_index = inverse[:, :t_len]
    else:
        obs_index = torch.arange(t_len, device=times.device).expand(b, t_len)
    return Schedule(
        t0, points, kind, amount, target, obs_index, has_jumps, obs_only=len(parts_t) == 1
    )


RHS = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
