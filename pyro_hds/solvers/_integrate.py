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


def _limit(y: torch.Tensor) -> float:
    """The largest magnitude a state may reach: the square root of the dtype's largest
    number. Beyond it a square (any Gaussian likelihood) overflows and the backward pass
    of a model's arithmetic on the state produces ``0 * inf``; such a state counts as failed,
    like a non-finite one."""
    return float(torch.finfo(y.dtype).max) ** 0.5


def _healthy(y: torch.Tensor, limit: float) -> torch.Tensor:
    """``(B,)``: every entry of the row finite and at most ``limit`` in magnitude."""
    return (y.abs() <= limit).all(-1)


def _col(h: torch.Tensor) -> torch.Tensor:
    return h.unsqueeze(-1) if h.dim() else h


def _take(x, idx: torch.Tensor):
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    return x.index_select(0, idx)


def _axpy(y: torch.Tensor, h, k: torch.Tensor) -> torch.Tensor:
    """``y + h k`` in one operation: ``h`` a Python float, a 0-d tensor or ``(B,)``."""
    if isinstance(h, float):
        return torch.add(y, k, alpha=h)
    return torch.addcmul(y, _col(h), k)


def _shift(t, h, c: float):
    """The stage time ``t + c h``."""
    if isinstance(h, float):
        return t + c * h
    return torch.add(t, h, alpha=c)


# -- fixed-step methods -----------------------------------------------------------------------
# ``h`` is a Python float when the whole batch shares the step (a shared grid), else a tensor.


def _euler(f: F, t, y, h, idx=None):
    return _axpy(y, h, f(t, y, idx))


def _heun(f: F, t, y, h, idx=None):
    k1 = f(t, y, idx)
    k2 = f(_shift(t, h, 1.0), _axpy(y, h, k1), idx)
    return _axpy(y, _scale(h, 0.5), k1 + k2)


def _rk4(f: F, t, y, h, idx=None):
    half = _scale(h, 0.5)
    t_half = _shift(t, h, 0.5)
    k1 = f(t, y, idx)
    k2 = f(t_half, _axpy(y, half, k1), idx)
    k3 = f(t_half, _axpy(y, half, k2), idx)
    k4 = f(_shift(t, h, 1.0), _axpy(y, h, k3), idx)
    acc = (k1 + k4).add_(k2 + k3, alpha=2.0)
    return _axpy(y, _scale(h, 1 / 6), acc)


def _scale(h, c: float):
    return c * h


FIXED_METHODS = {"euler": _euler, "heun": _heun, "rk4": _rk4}


def state_major(y: torch.Tensor) -> bool:
    """Whether the ``(B, S)`` tensor ``y`` is a transposed contiguous ``(S, B)`` one: each
    state's values lie contiguously. A right-hand side that returns its derivative so
    (``torch.stack(terms, 0).movedim(0, -1)``) puts the solver's state in this layout after
    the first step, since elementwise operations follow their operands' layout; its
    ``y.movedim(-1, 0).unbind(0)`` then reads contiguous memory, and neither the rhs nor
    the trajectory's assembly transposes anything (a stack along the last dim interleaves
    its inputs, several times slower than one along a leading dim)."""
    return y.dim() == 2 and y.shape[0] > 1 and y.stride(0) == 1 and y.stride(1) == y.shape[0]


def _gather_outputs(
    hist: list[torch.Tensor], index: torch.Tensor, identity: bool = False
) -> torch.Tensor:
    """``(B, T, S)``: the states of ``hist`` (H of ``(B, S)``) at the grid positions
    ``index`` ``(B, T)``; ``identity``: ``index`` is ``arange(H)`` (no gather needed).

    State-major states are stacked as ``(S, H, B)`` and returned as a permuted view: stacking
    them along a middle dim of ``(B, H, S)`` would transpose every value (three times slower
    than a row-major stack)."""
    if all(state_major(h) for h in hist):
        stacked = torch.stack([h.t() for h in hist], 1).permute(2, 1, 0)
    else:
        stacked = torch.stack(hist, 1)  # (B, H, S)
    if identity and stacked.shape[1] == index.shape[-1]:
        return stacked
    b, t_len = index.shape
    return stacked.gather(1, index.unsqueeze(-1).expand(b, t_len, stacked.shape[-1]))


def integrate_fixed(method: str, f: F, y0: torch.Tensor, sched: Schedule, substeps: int):
    """Fixed steps: ``substeps`` equal steps between consecutive grid points of each element.

    Each interval between grid points runs without per-step checks; when its end state holds a
    non-finite value, the interval is run again from its start with a check after every step,
    and the elements that fail are dropped from the computation (see the module docstring).
    """
    step = FIXED_METHODS[method]
    b = y0.shape[0]
    limit = _limit(y0)
    shared = sched.points.shape[0] == 1
    points = sched.points[0] if shared else sched.points
    # a shared grid without gradient: the step is a Python number (no tensor arithmetic)
    scalar_h = shared and not (sched.points.requires_grad or sched.t0.requires_grad)
    t = sched.t0[0] if shared else sched.t0
    y = y0
    dead = torch.zeros(b, dtype=torch.bool, device=y0.device)
    any_dead = False
    num_points = sched.points.shape[1]
    died_at = torch.full((b,), num_points, dtype=torch.long, device=y0.device)
    hist: list[torch.Tensor] = []

    def careful(y, t, h, dead):
        for _ in range(substeps):
            f.segment_start = t  # type: ignore[attr-defined]
            if bool(dead.any()):
                y_new = _subset_step(step, f, t, y, h, ~dead)
            else:
                y_new = step(f, t, y, h)
            bad = ~_healthy(y_new, limit) & ~dead
            while bool(bad.any()):
                dead = dead | bad
                y_new = _subset_step(step, f, t, y, h, ~dead)
                bad = ~_healthy(y_new, limit) & ~dead
            y = y_new
            t = t + h
        return y, dead

    for p in range(num_points):
        target = points[..., p]
        h = float(target - t) / substeps if scalar_h else (target - t) / substeps
        if any_dead:
            y, dead = careful(y, t, h, dead)
        else:
            y_start, t_cur = y, t
            for _ in range(substeps):
                f.segment_start = t_cur  # type: ignore[attr-defined]
                y = step(f, t_cur, y, h)
                t_cur = t_cur + h
            # one reduction detects any NaN, inf or diverging value (NaN fails the comparison)
            if not bool(y.abs().amax() <= limit):
                y, dead = careful(y_start, t, h, dead)
                any_dead = bool(dead.any())
        if any_dead:
            died_at = torch.where(dead & (died_at == num_points), p, died_at)
        t = target  # exact arrival
        hist.append(y)
        if sched.has_jumps:
            y = sched.apply_jumps(y, ~dead, torch.full((b,), p, device=y.device))
    obs_index = sched.obs_index.expand(b, -1)
    ys = _gather_outputs(hist, obs_index, identity=sched.obs_only)
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
    r"""One Dormand-Prince step of size ``h`` ``(B,)`` from ``(t, y)`` with first stage ``k1``.

    Returns the 5th-order solution, the error estimate *per unit step*
    :math:`\sum_j (b_j - \hat b_j) k_j` (no gradient: it only steers the step size) and the
    last stage (the next step's first, FSAL).
    """
    hc = h.unsqueeze(-1)
    ks = [k1]
    for i in range(1, 6):
        a = _A[i]
        acc = ks[0] * a[0]
        for j in range(1, i):
            if a[j] != 0.0:
                acc.add_(ks[j], alpha=a[j])
        ks.append(f(torch.add(t, h, alpha=_C[i]), torch.addcmul(y, hc, acc), idx))
    acc = ks[0] * _B5[0]
    for j in range(1, 6):
        if _B5[j] != 0.0:
            acc.add_(ks[j], alpha=_B5[j])
    y5 = torch.addcmul(y, hc, acc)
    k7 = f(t + h, y5, idx)
    ks.append(k7)
    with torch.no_grad():
        err = ks[0] * _E[0]
        for j in range(1, 7):
            if _E[j] != 0.0:
                err.add_(ks[j], alpha=_E[j])
    return y5, err, k7


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
    compact_below: float = 0.8,
):
    """Dopri5 with per-element control over a working set of unfinished elements.

    When fewer than ``compact_below`` of the working set is still integrating, the finished
    and failed elements are dropped from the working arrays, so a batch whose elements need
    very different numbers of steps costs about the sum of their steps, not the batch size
    times the largest.

    Outputs are not copied out as elements reach grid points: every state a grid point is
    reached in is kept (``hist``) with a record of which elements arrived at which point, and
    one gather at the end assembles the ``(B, T, S)`` outputs.
    """
    b = y0.shape[0]
    dev, dt = y0.device, y0.dtype
    limit = _limit(y0)
    num_points = sched.points.shape[1]
    last_point = num_points - 1
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
    hist: list[torch.Tensor] = []
    hist_rows = 0  # rows of hist so far (its states concatenated)
    # arrival records: flat (element, point) keys and the rows of cat(hist) they point to
    keys: list[torch.Tensor] = []
    places: list[torch.Tensor] = []
    # the same for the elements' final states: element ids and rows of cat(hist)
    final_keys: list[torch.Tensor] = []
    final_places: list[torch.Tensor] = []

    def call(t, y, local_idx=None):
        if local_idx is None:
            return f(t, y, None if full else rows)
        return f(t, y, rows.index_select(0, local_idx))

    def stages(t, y, h, k1, local_idx=None):
        return _dopri_stages(lambda tt, yy, _i=None: call(tt, yy, local_idx), t, y, h, k1)

    def keep_state(y):
        nonlocal hist_rows
        hist.append(y)
        hist_rows += y.shape[0]
        return hist_rows - y.shape[0]

    def next_point(p):
        return points.gather(1, p.clamp(max=last_point).unsqueeze(1)).squeeze(1)

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
        """Record the elements that sit on their next grid point, apply doses, move on."""
        moved = False
        while True:
            tt = next_point(p)
            arrived = active & (t >= tt)
            if not bool(arrived.any()):
                break
            offset = keep_state(y)
            which = arrived.nonzero().squeeze(1)
            g = which if full else rows.index_select(0, which)
            keys.append(g * num_points + p.index_select(0, which))
            places.append(which + offset)
            if sched.has_jumps:
                y = sched.apply_jumps(y, arrived, p.clamp(max=last_point), None if full else rows)
            moved = True
            p = p + arrived
            active = active & (p < num_points)
        if moved and (sched.has_jumps or getattr(f, "piecewise", False)):
            f.segment_start = t  # type: ignore[attr-defined]
            k1 = call(t, y)
        return y, p, active, k1, tt

    while True:
        y, p, active, k1, tt = arrivals(y, p, active, k1)
        n_active = int(active.sum())
        if n_active == 0:
            break
        width = rows.shape[0]
        if n_active < compact_below * width and width > 16:
            # record the leaving elements' last state, then shrink the working set
            offset = keep_state(y)
            leaving = (~active).nonzero().squeeze(1)
            g = rows.index_select(0, leaving)
            final_keys.append(g)
            final_places.append(leaving + offset)
            out_status[g], out_steps[g], out_rejected[g] = (
                status.index_select(0, leaving),
                steps.index_select(0, leaving),
                rejected.index_select(0, leaving),
            )
            keep = active.nonzero().squeeze(1)
            rows = rows.index_select(0, keep)
            full = False
            points = all_points.index_select(0, rows)
            t, y, h, p, k1, tt = (x.index_select(0, keep) for x in (t, y, h, p, k1, tt))
            status, steps, rejected = (x.index_select(0, keep) for x in (status, steps, rejected))
            active = torch.ones_like(keep, dtype=torch.bool)
        room = tt - t
        h_eff = torch.where(active, torch.minimum(h, room), torch.zeros_like(h))
        f.segment_start = t  # type: ignore[attr-defined]
        y5, err, k7 = stages(t, y, h_eff, k1)
        with torch.no_grad():
            scale = torch.maximum(y.abs(), y5.abs()).mul_(rtol).add_(atol)
            ratio = err.div_(scale).square_().mean(-1).sqrt_().mul_(h_eff)
            # a non-finite last stage makes the error estimate non-finite (its weight is not
            # 0), so the ratio and the new state cover every stage
            all_finite = bool(torch.isfinite(ratio.sum()) & (y5.abs().amax() <= limit))
            diverged = None
            if not all_finite:
                finite = torch.isfinite(ratio) & _healthy(y5, limit)
                all_finite = bool(finite.all())  # else a sum overflowed, no element did
                # finite but beyond the limit: a smaller step will not help, stop the element
                diverged = active & torch.isfinite(y5).all(-1) & ~_healthy(y5, limit)
        if not all_finite:
            # run the step again without the failing elements, so that their values leave
            # no trace in the autograd graph
            idx = finite.nonzero().squeeze(1)
            f.segment_start = _take(t, idx)  # type: ignore[attr-defined]
            y5_s, _, k7_s = stages(
                _take(t, idx),
                y.index_select(0, idx),
                h_eff.index_select(0, idx),
                k1.index_select(0, idx),
                idx,
            )
            y5 = torch.index_copy(y.detach(), 0, idx, y5_s)
            k7 = torch.index_copy(k1.detach(), 0, idx, k7_s)
            ratio = torch.where(finite, ratio, torch.full_like(ratio, float("inf")))
        with torch.no_grad():
            accept = active & (ratio <= 1.0)
            factor = ratio.clamp(min=1e-10).pow_(-0.2).mul_(safety).clamp_(dfactor, ifactor)
            factor = torch.where(accept, factor, factor.clamp(max=1.0))
            if not all_finite:
                factor = torch.where(finite, factor, torch.full_like(factor, dfactor))
            clipped = h_eff >= room
            h_next = h_eff * factor
            h_next = torch.where(accept & clipped, torch.maximum(h_next, h), h_next)
            h = torch.where(active, h_next, h)
            t = torch.where(accept, torch.where(clipped, tt, t + h_eff), t)
            steps += active
            refused = active & ~accept
            rejected += refused
            tiny = refused & (h <= 1e-13 * torch.clamp(t.abs(), min=1.0))
            if not all_finite:
                tiny_status = torch.where(finite, int(Status.STEP_TOO_SMALL), int(Status.NONFINITE))
            else:
                tiny_status = torch.full_like(status, int(Status.STEP_TOO_SMALL))
            status = torch.where(tiny, tiny_status, status)
            over = active & ~tiny & (steps >= max_steps) & ~(accept & clipped)
            status = torch.where(over, int(Status.MAX_STEPS), status)
            active = active & ~(tiny | over)
            if diverged is not None:
                status = torch.where(diverged, int(Status.NONFINITE), status)
                active = active & ~diverged
        acc = accept.unsqueeze(-1)
        y = torch.where(acc, y5, y)
        k1 = torch.where(acc, k7, k1)

    offset = keep_state(y)
    final_keys.append(rows)
    final_places.append(torch.arange(rows.shape[0], device=dev) + offset)
    out_status[rows], out_steps[rows], out_rejected[rows] = status, steps, rejected
    # resolve the records: where each element's grid points (or, for points it never reached,
    # its final state) sit in cat(hist)
    point_place = torch.full((b * num_points,), -1, dtype=torch.long, device=dev)
    if keys:
        point_place.index_copy_(0, torch.cat(keys), torch.cat(places))
    final_place = torch.empty(b, dtype=torch.long, device=dev)
    final_place.index_copy_(0, torch.cat(final_keys), torch.cat(final_places))
    point_place = point_place.view(b, num_points)
    reached = point_place >= 0
    flat_index = torch.where(reached, point_place, final_place.unsqueeze(1))
    obs_index = sched.obs_index.expand(b, -1)
    stacked = torch.cat(hist, 0)
    ys = stacked.index_select(0, flat_index.gather(1, obs_index).reshape(-1))
    return (
        ys.view(b, obs_index.shape[1], -1),
        out_status,
        out_steps,
        out_rejected,
        reached.gather(1, obs_index),
    )
