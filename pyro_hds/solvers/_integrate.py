r"""The integration loops: fixed-step (Euler, Heun, RK4) and adaptive Dopri5.

Both work on a flat batch of ``B`` systems with states ``(B, S)`` and a per-element schedule
(:class:`~pyro_hds.solvers._base.Schedule`). The right-hand side is a callable
``f(t, y, idx=None)``: ``t`` is ``(B,)`` (or 0-d when every element shares it), ``y`` is
``(B, S)``; with ``idx`` (a LongTensor) it evaluates only the elements ``idx`` (``t`` and ``y``
then hold those elements).

Failure isolation. When a step produces a non-finite value for some elements, the step is
recomputed for the other elements only, and the results are scattered into a *detached* copy
of the previous state. The failing elements therefore leave no trace in the autograd graph:
neither NaN values nor NaN gradients (``0 * inf``) can reach parameters shared with healthy
elements, whether those parameters are passed in ``params`` or closed over by the rhs (a
neural network's weights).

Dopri5 (Dormand and Prince, 1980; Hairer, Norsett and Wanner, *Solving ODEs I*, II.5) uses its
embedded 4th-order solution for the error estimate and controls every element's step on its
own: the error ratio of element :math:`b` is
:math:`\sqrt{\frac1S \sum_s \big(e_{bs} / (a + r \max(|y_{bs}|, |\hat y_{bs}|))\big)^2}`,
a step is accepted when it is at most 1, and the next step is
:math:`h \cdot \min(f_{\max}, \max(f_{\min}, 0.9\, \mathrm{err}^{-1/5}))`. Steps are clipped to
land exactly on each element's next grid point; finished elements stop counting steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyro_hds.solvers._base import Schedule, Status

F = Callable[..., torch.Tensor]

# Dormand-Prince 5(4) tableau
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A: tuple[tuple[float, ...], ...] = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = _A[6]
_E = (
    35 / 384 - 5179 / 57600,
    0.0,
    500 / 1113 - 7571 / 16695,
    125 / 192 - 393 / 640,
    -2187 / 6784 + 92097 / 339200,
    11 / 84 - 187 / 2100,
    -1 / 40,
)


def _col(h: torch.Tensor) -> torch.Tensor:
    return h.unsqueeze(-1) if h.dim() else h


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 0 else x.index_select(0, idx)


# -- fixed-step methods -----------------------------------------------------------------------


def _euler(f: F, t, y, h, idx=None):
    return y + _col(h) * f(t, y, idx)


def _heun(f: F, t, y, h, idx=None):
    hc = _col(h)
    k1 = f(t, y, idx)
    k2 = f(t + h, y + hc * k1, idx)
    return y + 0.5 * hc * (k1 + k2)


def _rk4(f: F, t, y, h, idx=None):
    hc = _col(h)
    half = 0.5 * h
    k1 = f(t, y, idx)
    k2 = f(t + half, y + 0.5 * hc * k1, idx)
    k3 = f(t + half, y + 0.5 * hc * k2, idx)
    k4 = f(t + h, y + hc * k3, idx)
    return y + hc * (k1 + 2 * k2 + 2 * k3 + k4) / 6


FIXED_METHODS = {"euler": _euler, "heun": _heun, "rk4": _rk4}


def _gather_outputs(hist: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(hist, 1)  # (B, H, S)
    b, t_len = index.shape
    return stacked.gather(1, index.unsqueeze(-1).expand(b, t_len, stacked.shape[-1]))


def integrate_fixed(method: str, f: F, y0: torch.Tensor, sched: Schedule, substeps: int):
    """Fixed steps: ``substeps`` equal steps between consecutive grid points of each element."""
    step = FIXED_METHODS[method]
    b = y0.shape[0]
    shared = sched.points.shape[0] == 1
    points = sched.points[0] if shared else sched.points
    t = sched.t0[0] if shared else sched.t0
    y = y0
    dead = torch.zeros(b, dtype=torch.bool, device=y0.device)
    any_dead = False
    num_points = sched.points.shape[1]
    died_at = torch.full((b,), num_points, dtype=torch.long, device=y0.device)
    hist: list[torch.Tensor] = []
    for p in range(num_points):
        target = points[..., p]
        h = (target - t) / substeps
        for _ in range(substeps):
            f.segment_start = t  # type: ignore[attr-defined]
            if not any_dead:
                y_new = step(f, t, y, h)
                # one reduction detects any NaN or inf (an overflowing sum of finite values
                # only costs the elementwise check below)
                if not bool(torch.isfinite(y_new.sum())):
                    bad = ~torch.isfinite(y_new).all(-1)
                    if bool(bad.any()):
                        dead = bad
                        any_dead = True
            if any_dead:
                y_new = _subset_step(step, f, t, y, h, ~dead)
                bad = ~torch.isfinite(y_new).all(-1) & ~dead
                while bool(bad.any()):
                    dead = dead | bad
                    y_new = _subset_step(step, f, t, y, h, ~dead)
                    bad = ~torch.isfinite(y_new).all(-1) & ~dead
            y = y_new
            t = t + h
        if any_dead:
            died_at = torch.where(dead & (died_at == num_points), p, died_at)
        t = target  # exact arrival
        hist.append(y)
        if sched.has_jumps:
            y = sched.apply_jumps(y, ~dead, torch.full((b,), p, device=y.device))
    obs_index = sched.obs_index.expand(b, -1)
    ys = _gather_outputs(hist, obs_index)
    status = torch.where(dead, int(Status.NONFINITE), int(Status.SUCCESS)).long()
    steps = torch.full((b,), num_points * substeps, dtype=torch.long, device=y0.device)
    # a dead element's outputs hold its frozen (detached) last finite state
    reached = obs_index < died_at[:, None]
    return ys, status, steps, torch.zeros_like(steps), reached


def _subset_step(step, f: F, t, y, h, keep: torch.Tensor) -> torch.Tensor:
    idx = keep.nonzero().flatten()
    y_sub = step(f, _take(t, idx), y.index_select(0, idx), _take(h, idx), idx)
    return torch.index_copy(y.detach(), 0, idx, y_sub)


# -- adaptive Dopri5 --------------------------------------------------------------------------


def _dopri_stages(f: F, t, y, h, k1, idx=None):
    hc = _col(h)
    ks = [k1]
    for i in range(1, 6):
        a = _A[i]
        acc = a[0] * ks[0]
        for j in range(1, i):
            if a[j] != 0.0:
                acc = acc + a[j] * ks[j]
        ks.append(f(t + _C[i] * h, y + hc * acc, idx))
    acc = _B5[0] * ks[0]
    for j in range(1, 6):
        if _B5[j] != 0.0:
            acc = acc + _B5[j] * ks[j]
    y5 = y + hc * acc
    k7 = f(t + h, y5, idx)
    ks.append(k7)
    err = _E[0] * ks[0]
    for j in range(1, 7):
        if _E[j] != 0.0:
            err = err + _E[j] * ks[j]
    return y5, hc * err, k7


def integrate_dopri5(
    f: F,
    y0: torch.Tensor,
    sched: Schedule,
    *,
    rtol: float,
    atol: float,
    max_steps: int,
    safety: float,
    ifactor: float,
    dfactor: float,
    first_step: float | None,
    compact_below: float = 0.5,
):
    """Dopri5 with per-element control over a working set of unfinished elements.

    When fewer than ``compact_below`` of the working set is still integrating, the finished
    and failed elements are dropped from the working arrays, so a batch whose elements need
    very different numbers of steps costs about the sum of their steps, not the batch size
    times the largest.
    """
    b = y0.shape[0]
    dev, dt = y0.device, y0.dtype
    num_points = sched.points.shape[1]
    all_points = sched.points.expand(b, num_points)
    rows = torch.arange(b, device=dev)  # global ids of the working set
    full = True  # the working set is the whole batch (no indexing needed)
    points = all_points
    t = sched.t0.expand(b).clone()
    y = y0
    p = torch.zeros(b, dtype=torch.long, device=dev)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    status = torch.zeros(b, dtype=torch.long, device=dev)
    steps = torch.zeros(b, dtype=torch.long, device=dev)
    rejected = torch.zeros(b, dtype=torch.long, device=dev)
    out_status = torch.zeros(b, dtype=torch.long, device=dev)
    out_steps = torch.zeros(b, dtype=torch.long, device=dev)
    out_rejected = torch.zeros(b, dtype=torch.long, device=dev)
    point_snap = torch.full((b, num_points), -1, dtype=torch.long, device=dev)
    point_row = torch.zeros((b, num_points), dtype=torch.long, device=dev)
    final_snap = torch.full((b,), -1, dtype=torch.long, device=dev)
    final_row = torch.zeros(b, dtype=torch.long, device=dev)
    hist: list[torch.Tensor] = []

    def call(t, y, local_idx=None):
        if local_idx is None:
            return f(t, y, None if full else rows)
        return f(t, y, rows.index_select(0, local_idx))

    def stages(t, y, h, k1, local_idx=None):
        return _dopri_stages(lambda tt, yy, _i=None: call(tt, yy, local_idx), t, y, h, k1)

    f.segment_start = t  # type: ignore[attr-defined]
    k1 = call(t, y)
    if first_step is None:
        scale = atol + rtol * y.detach().abs()
        d0 = (y.detach() / scale).pow(2).mean(-1).sqrt()
        d1 = (k1.detach() / scale).pow(2).mean(-1).sqrt()
        h = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    else:
        h = torch.full((b,), float(first_step), dtype=dt, device=dev)
    if not bool(torch.isfinite(k1).all()):
        bad = ~torch.isfinite(k1).all(-1)
        status = torch.where(bad, int(Status.NONFINITE), status)
        active = active & ~bad
        k1 = torch.where(bad[:, None], torch.zeros((), dtype=dt), k1)

    def arrivals(y, p, active, k1):
        jumped = False
        arrivals_seen = False
        while True:
            tt = points.gather(1, p.clamp(max=num_points - 1)[:, None]).squeeze(1)
            arrived = active & (t >= tt)
            if not bool(arrived.any()):
                break
            arrivals_seen = True
            hist.append(y)
            which = arrived.nonzero().flatten()
            g = rows.index_select(0, which)
            point_snap[g, p[which]] = len(hist) - 1
            point_row[g, p[which]] = which
            if sched.has_jumps:
                y = sched.apply_jumps(
                    y, arrived, p.clamp(max=num_points - 1), None if full else rows
                )
                jumped = True
            p = p + arrived.long()
            active = active & (p < num_points)
        if jumped or (arrivals_seen and getattr(f, "piecewise", False)):
            f.segment_start = t  # type: ignore[attr-defined]
            k1 = call(t, y)
        return y, p, active, k1

    while True:
        y, p, active, k1 = arrivals(y, p, active, k1)
        n_active = int(active.sum())
        if n_active == 0:
            break
        width = rows.shape[0]
        if n_active < compact_below * width and width > 16:
            # record the leaving elements' last state, then shrink the working set
            hist.append(y)
            leaving = (~active).nonzero().flatten()
            g = rows.index_select(0, leaving)
            final_snap[g] = len(hist) - 1
            final_row[g] = leaving
            out_status[g], out_steps[g], out_rejected[g] = (
                status[leaving],
                steps[leaving],
                rejected[leaving],
            )
            keep = active.nonzero().flatten()
            rows = rows.index_select(0, keep)
            full = False
            points = all_points.index_select(0, rows)
            t, y, h, p, k1 = (x.index_select(0, keep) for x in (t, y, h, p, k1))
            status, steps, rejected = (x.index_select(0, keep) for x in (status, steps, rejected))
            active = torch.ones_like(keep, dtype=torch.bool)
        tt = points.gather(1, p.clamp(max=num_points - 1)[:, None]).squeeze(1)
        room = tt - t
        h_eff = torch.where(active, torch.minimum(h, room), torch.zeros_like(h))
        f.segment_start = t  # type: ignore[attr-defined]
        y5, err, k7 = stages(t, y, h_eff, k1)
        if bool(torch.isfinite(y5.sum() + err.sum() + k7.sum())):
            finite = torch.ones_like(active)
        else:
            finite = (
                torch.isfinite(y5).all(-1)
                & torch.isfinite(err).all(-1)
                & torch.isfinite(k7).all(-1)
            )
        if not bool(finite.all()):
            idx = finite.nonzero().flatten()
            f.segment_start = _take(t, idx)  # type: ignore[attr-defined]
            y5_s, err_s, k7_s = stages(
                _take(t, idx),
                y.index_select(0, idx),
                h_eff.index_select(0, idx),
                k1.index_select(0, idx),
                idx,
            )
            y5 = torch.index_copy(y.detach(), 0, idx, y5_s)
            k7 = torch.index_copy(k1.detach(), 0, idx, k7_s)
            err = torch.index_copy(torch.zeros_like(err), 0, idx, err_s.detach())
        with torch.no_grad():
            scale = atol + rtol * torch.maximum(y.abs(), y5.abs())
            ratio = (err / scale).pow(2).mean(-1).sqrt()
            ratio = torch.where(finite, ratio, torch.full_like(ratio, float("inf")))
            accept = active & (ratio <= 1.0)
            factor = safety * ratio.clamp(min=1e-10).pow(-0.2)
            factor = factor.clamp(min=dfactor, max=ifactor)
            factor = torch.where(accept, factor, factor.clamp(max=1.0))
            factor = torch.where(finite, factor, torch.full_like(factor, dfactor))
            clipped = h_eff >= room
            h_next = h_eff * factor
            h_next = torch.where(accept & clipped, torch.maximum(h_next, h), h_next)
            h = torch.where(active, h_next, h)
            t = torch.where(accept, torch.where(clipped, tt, t + h_eff), t)
            steps = steps + active.long()
            rejected = rejected + (active & ~accept).long()
            tiny = active & ~accept & (h <= 1e-13 * torch.clamp(t.abs(), min=1.0))
            status = torch.where(
                tiny, torch.where(finite, int(Status.STEP_TOO_SMALL), int(Status.NONFINITE)), status
            )
            over = active & ~tiny & (steps >= max_steps) & ~(accept & clipped)
            status = torch.where(over, int(Status.MAX_STEPS), status)
            active = active & ~tiny & ~over
        acc = accept[:, None]
        y = torch.where(acc, y5, y)
        k1 = torch.where(acc, k7, k1)

    hist.append(y)
    final_snap[rows] = len(hist) - 1
    final_row[rows] = torch.arange(rows.shape[0], device=dev)
    out_status[rows], out_steps[rows], out_rejected[rows] = status, steps, rejected
    reached = point_snap >= 0
    snap = torch.where(reached, point_snap, final_snap[:, None])
    row = torch.where(reached, point_row, final_row[:, None])
    sizes = torch.tensor([x.shape[0] for x in hist], device=dev)
    offsets = torch.cumsum(sizes, 0) - sizes
    flat_index = offsets[snap] + row  # (B, P)
    obs_index = sched.obs_index.expand(b, -1)
    stacked = torch.cat(hist, 0)
    ys = stacked[flat_index.gather(1, obs_index)]
    return ys, out_status, out_steps, out_rejected, reached.gather(1, obs_index)
