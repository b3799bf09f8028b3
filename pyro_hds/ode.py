r"""The ODE sample-site primitive :func:`ode` and its Pyro-free core :func:`solve`.

Shapes. ``y0`` is ``(..., S)``; ``times`` is a shared grid ``(T,)`` or one grid per element
``(..., T)`` (ragged grids padded by repeating the last time, as :class:`~pyro_hds.Dataset`
gives them); each ``params[name]`` is ``batch + event`` with ``event_dims[name]`` trailing event
dims (default 0: one scalar per element). The batch shape is the broadcast of ``y0.shape[:-1]``,
``times.shape[:-1]``, the params' batch shapes and the doses' and inputs' leading shapes, so
particles ``(S, K, 1)``, individuals ``(N,)`` and shared constants ``()`` combine freely. The
result is ``(*batch, T, S)``.

The right-hand side is called ``rhs(t, y, params)`` (``rhs(t, y, params, u)`` with inputs) on a
flattened batch: ``y`` is ``(B, S)``, each param ``(B, *event)``, ``t`` is ``(B,)`` (or 0-d when
every element shares the current time) and ``u`` is ``(B, D)``. Write it with ``...`` indexing
and elementwise operations over the leading dim, e.g.
``torch.stack([-k * y[..., 0], k * y[..., 0]], -1)``; quantities with a batch dim must be passed
in ``params``, not closed over.

The ``y`` the rhs gets may be a non-contiguous view (the fixed-step solvers keep their
state state-major: a ``(B, S)`` view of a contiguous ``(S, B)`` tensor, so that the stages'
elementwise operations vectorize over the batch); use ``reshape``, not ``view``, on it.

Speed on large batches: read the states with ``y.movedim(-1, 0).unbind(0)`` and return
``torch.stack(terms, 0).movedim(0, -1)``. The solver's state then stays state-major (each
state's ``B`` values contiguous) and no evaluation interleaves or de-interleaves ``(B, S)``
memory, forward or backward; with ``y[..., i]`` and ``torch.stack(terms, -1)`` that
interleaving cost a third of each evaluation of the double-receiver model at ``B = 7200``.
With ``compile=True`` it matters more: the compiled step of a row-major rhs stores each
stage's derivative interleaved, in loops that do not vectorize, and a solve of the
pharmacokinetic model (``models/pk_oral.py``, 4000 systems, 16 grid intervals, no gradient)
took 12-16 ms against 6.5-7 ms state-major.

Doses (:class:`~pyro_hds.Doses`, ``(..., M)``) add ``amount`` to state ``target`` at their
times; an observation at a dose time is the pre-dose value. Piecewise-constant inputs
(:class:`~pyro_hds.PiecewiseConstant`) join the schedule so steps never straddle a change.

Failure is per element: see :class:`~pyro_hds.Solution` and the ``ode_status`` that
:func:`ode` records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch

from pyro_hds.solvers import Dopri5, PiecewiseConstant, Solution, Solver, Status, get_solver
from pyro_hds.solvers._base import Schedule, build_schedule
from pyro_hds.solvers._integrate import FusedRhs, integrate_dopri5, integrate_fixed

__all__ = ["ode", "solve"]

_TORCHDIFFEQ = {"euler": "euler", "rk4": "rk4", "dopri5": "dopri5", "heun": "heun2"}


def _as_float(name: str, what: str, x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=dtype) if not isinstance(x, torch.Tensor) else x
    if not t.is_floating_point():
        raise ValueError(
            f"ode({name!r}): {what} must be a floating-point tensor, got dtype {t.dtype}"
        )
    return t


def _unravel(i: int, shape: torch.Size) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(i % s)
        i //= s
    return tuple(reversed(out))


# the merged grids of recent solves (see _grid_key): key -> (its tensors, _merged_grid's result)
_GRIDS: OrderedDict[tuple, tuple[tuple[torch.Tensor, ...], Any]] = OrderedDict()
GRID_CACHE_SIZE = 16


def _grid_key(times, t0, doses, inputs, batch, dtype, device, s) -> tuple[tuple, tuple] | None:
    """What the merged grid of a solve depends on: the identity and version counter of the
    tensors that make it (times, doses, breakpoints, a tensor t0), a number t0, the batch
    shape, dtype, device and number of states; with the tensors themselves. A model that
    passes the same data tensors on every call (``data.times``, ``data.doses``) gets its
    grid merged and checked once; an in-place change of them bumps their version and makes
    a new key. None (no reuse) when any of them needs a gradient or is not a tensor."""
    tensors = [times]
    if doses is not None:
        tensors += [doses.times, doses.amounts, doses.targets]
    if isinstance(inputs, PiecewiseConstant):
        tensors.append(inputs.breakpoints)
    number = t0
    if isinstance(t0, torch.Tensor):
        tensors.append(t0)
        number = None
    elif t0 is not None and not isinstance(t0, (int, float)):
        return None
    if not all(isinstance(x, torch.Tensor) for x in tensors):
        return None
    if any(x.requires_grad or x.is_inference() for x in tensors):
        return None
    ids = tuple((id(x), x._version) for x in tensors)
    return (ids, number, tuple(batch), dtype, str(device), s), tuple(tensors)


def _merged_grid(
    times: torch.Tensor,
    t0: Any,
    doses: Any,
    inputs: Any,
    batch: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    s: int,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, Schedule, bool]:
    """The checked flat times ``tf`` ``(G, T)`` and start times ``t0f`` ``(G,)`` of the
    ``G`` distinct grids (1 for a shared grid), the merged schedule of the flat ``batch``
    and whether the grid is per element."""
    t_len = times.shape[-1]
    per_element_grid = times.dim() > 1 or doses is not None or isinstance(inputs, PiecewiseConstant)
    t0_tensor = None if t0 is None else torch.as_tensor(t0, dtype=dtype, device=device)
    if t0_tensor is not None and t0_tensor.dim() > 0:
        per_element_grid = True
    # the grid (observation times, doses, breakpoints, t0) is merged once per distinct grid
    # batch element, then broadcast over the particle and individual dims it lacks
    grid_batch = torch.Size()
    if per_element_grid:
        grid_shapes = [times.shape[:-1]]
        if doses is not None:
            grid_shapes.append(doses.times.shape[:-1])
        if isinstance(inputs, PiecewiseConstant):
            grid_shapes.append(inputs.batch_shape)
        if t0_tensor is not None and t0_tensor.dim() > 0:
            grid_shapes.append(t0_tensor.shape)
        grid_batch = torch.broadcast_shapes(*grid_shapes)
        tf = times.expand(*grid_batch, t_len).reshape(-1, t_len)
    else:
        tf = times.reshape(1, t_len)
    diffs = tf[:, 1:] - tf[:, :-1]
    if bool((diffs < 0).any()):
        i, j = (int(v) for v in (diffs < 0).nonzero()[0])
        where = f"element {_unravel(i, grid_batch)}" if tf.shape[0] > 1 else "the shared grid"
        raise ValueError(
            f"ode({name!r}): times are not sorted for {where}: {float(tf[i, j + 1])} after "
            f"{float(tf[i, j])} (index {j + 1}); sort them"
        )
    if not bool(torch.isfinite(tf).all()):
        raise ValueError(f"ode({name!r}): times must be finite")
    if t0_tensor is None:
        t0f = tf[:, 0]
    else:
        t0f = t0_tensor.expand(grid_batch).reshape(-1) if per_element_grid else t0_tensor.reshape(1)
        early = tf[:, 0] < t0f
        if bool(early.any()):
            i = int(early.nonzero()[0])
            raise ValueError(
                f"ode({name!r}): time {float(tf[i, 0])} is before t0 = {float(t0f[i])}; the "
                "solution starts at t0"
            )

    breakpoints = None
    if isinstance(inputs, PiecewiseConstant):
        breakpoints = inputs.flat(grid_batch).breakpoints.to(device=device, dtype=dtype)

    def per_grid(x: torch.Tensor) -> torch.Tensor:
        return x.expand(*grid_batch, x.shape[-1]).reshape(-1, x.shape[-1])

    sched = build_schedule(
        tf,
        t0f,
        None if doses is None else per_grid(doses.times.to(dtype)),
        None if doses is None else per_grid(doses.amounts.to(dtype)),
        None if doses is None else per_grid(doses.targets).long(),
        breakpoints,
        num_states=s,
        name=name,
    )
    if per_element_grid:
        sched = sched.expand(grid_batch, batch)
    return tf, t0f, sched, per_element_grid


def solve(
    rhs: Callable[..., torch.Tensor],
    y0: torch.Tensor,
    times: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
    *,
    solver: str | Solver = "dopri5",
    t0: float | torch.Tensor | None = None,
    inputs: PiecewiseConstant | Callable[[torch.Tensor], torch.Tensor] | None = None,
    doses: Any = None,
    adjoint: bool = False,
    event_dims: Mapping[str, int] | None = None,
    name: str = "ode",
) -> Solution:
    """Solve a batch of ODEs (see the module docstring for shapes); returns a Solution.

    :param solver: a solver object (:class:`~pyro_hds.Euler`, :class:`~pyro_hds.Heun`,
        :class:`~pyro_hds.RK4`, :class:`~pyro_hds.Dopri5`) or its short name.
    :param t0: the time of ``y0`` (float or tensor broadcastable to the batch); default: each
        element's first time.
    :param adjoint: gradients by the adjoint method (torchdiffeq's ``odeint_adjoint``), for a
        shared grid without doses or breakpoints; gradients then flow to ``y0`` and ``params``
        only (not to tensors the rhs closes over).
    """
    solver = get_solver(solver)
    times_arg = times  # the caller's object: what a reusable merged grid is keyed on
    if getattr(solver, "compile", False):
        if adjoint:
            raise ValueError(
                f"ode({name!r}): {type(solver).__name__}(compile=True) computes its own "
                "gradient (fused kernels); it has no effect with adjoint=True. Use one or the "
                "other."
            )
        if inputs is not None and not isinstance(inputs, PiecewiseConstant):
            raise ValueError(
                f"ode({name!r}): {type(solver).__name__}(compile=True) takes inputs as a "
                "PiecewiseConstant, not a callable u(t) (a new function per solve would compile "
                "again). Pass PiecewiseConstant(breakpoints, values) or use compile=False."
            )
    params = dict(params or {})
    event_dims = dict(event_dims or {})
    unknown = set(event_dims) - set(params)
    if unknown:
        raise ValueError(f"ode({name!r}): event_dims names unknown params {sorted(unknown)}")
    y0 = _as_float(name, "y0", y0)
    if y0.dim() == 0:
        raise ValueError(f"ode({name!r}): y0 must have a state dim (..., S); got a scalar")
    dtype = y0.dtype
    for key, value in params.items():
        value = (
            torch.as_tensor(value, dtype=dtype) if not isinstance(value, torch.Tensor) else value
        )
        params[key] = _as_float(name, f"params[{key!r}]", value)
        dtype = torch.promote_types(dtype, params[key].dtype)
    y0 = y0.to(dtype)
    times = _as_float(name, "times", times, dtype).to(device=y0.device, dtype=dtype)
    if times.dim() == 0 or times.shape[-1] == 0:
        raise ValueError(f"ode({name!r}): times must be (T,) or (..., T) with T >= 1")

    shapes = {"y0": y0.shape[:-1], "times": times.shape[:-1]}
    for key, value in params.items():
        ed = int(event_dims.get(key, 0))
        if ed < 0 or ed > value.dim():
            raise ValueError(
                f"ode({name!r}): event_dims[{key!r}] = {ed} for shape {tuple(value.shape)}"
            )
        shapes[f"params[{key!r}]"] = value.shape[: value.dim() - ed]
    if doses is not None:
        shapes["doses"] = doses.times.shape[:-1]
    if isinstance(inputs, PiecewiseConstant):
        shapes["inputs"] = inputs.batch_shape
    try:
        batch = torch.broadcast_shapes(*shapes.values())
    except RuntimeError as err:
        listing = ", ".join(f"{k}: {tuple(v)}" for k, v in shapes.items())
        raise ValueError(
            f"ode({name!r}): batch shapes do not broadcast ({listing}). Batch dims are all but "
            "the last dim of y0 and times and all but the event dims of each param; give "
            "particle and individual dims consistent positions (e.g. (K, 1) and (N,))."
        ) from err
    b = math.prod(batch)
    s = y0.shape[-1]
    t_len = times.shape[-1]

    y0f = y0.expand(*batch, s).reshape(b, s)
    pf = {}
    for key, value in params.items():
        ed = int(event_dims.get(key, 0))
        event = value.shape[value.dim() - ed :]
        pf[key] = value.to(dtype).expand(torch.Size([*batch, *event])).reshape(b, *event)

    cache_key = _grid_key(times_arg, t0, doses, inputs, batch, dtype, y0.device, s)
    cached = _GRIDS.get(cache_key[0]) if cache_key is not None else None
    if (
        cached is not None
        and cache_key is not None
        and all(x is y for x, y in zip(cached[0], cache_key[1], strict=True))
    ):
        _GRIDS.move_to_end(cache_key[0])
        tf, t0f, sched, per_element_grid = cached[1]
    else:
        tf, t0f, sched, per_element_grid = _merged_grid(
            times, t0, doses, inputs, batch, dtype, y0.device, s, name
        )
        if cache_key is not None:
            _GRIDS[cache_key[0]] = (cache_key[1], (tf, t0f, sched, per_element_grid))
            while len(_GRIDS) > GRID_CACHE_SIZE:
                _GRIDS.popitem(last=False)

    flat_inputs: Any = None
    if isinstance(inputs, PiecewiseConstant):
        flat_inputs = inputs.flat(batch)
        flat_inputs = PiecewiseConstant(
            flat_inputs.breakpoints.to(device=y0.device, dtype=dtype),
            flat_inputs.values.to(device=y0.device, dtype=dtype),
        )
    elif inputs is not None:
        if not callable(inputs):
            raise ValueError(
                f"ode({name!r}): inputs must be a PiecewiseConstant or a callable u(t)"
            )
        user_u = inputs

        def flat_inputs(t: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
            full_t = t if t.dim() == 0 else t.reshape(batch) if idx is None else None
            if full_t is None:  # a subset: evaluate for all, then select
                assert idx is not None
                tt = torch.zeros(b, dtype=t.dtype, device=t.device).index_copy(0, idx, t)
                u = user_u(tt.reshape(batch))
                return u.expand(*batch, u.shape[-1]).reshape(b, -1).index_select(0, idx)
            u = user_u(full_t)
            u = u.expand(*batch, u.shape[-1]).reshape(b, -1)
            return u if idx is None else u.index_select(0, idx)

    checked = [False]
    piecewise = isinstance(flat_inputs, PiecewiseConstant)

    cache: dict[str, Any] = {"idx": None, "pp": pf}

    def f(t: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        if idx is None:
            pp = pf
        elif cache["idx"] is idx:  # the same working set as the last call: reuse its params
            pp = cache["pp"]
        else:
            pp = {k: v.index_select(0, idx) for k, v in pf.items()}
            cache["idx"], cache["pp"] = idx, pp
        if flat_inputs is not None:
            # a piecewise-constant input is constant over a step (steps end at breakpoints):
            # evaluate it at the step's start, so a stage at the step's end sees the left limit
            start = f.segment_start  # type: ignore[attr-defined]
            tu = start if piecewise and start is not None else t
            if piecewise and idx is not None and tu.dim() > 0 and tu.shape[0] != y.shape[0]:
                tu = tu.index_select(0, idx)
            out = rhs(t, y, pp, flat_inputs(tu, idx))
        else:
            out = rhs(t, y, pp)
        if not checked[0]:
            if not isinstance(out, torch.Tensor) or out.shape[-1:] != y.shape[-1:]:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"ode({name!r}): rhs returned {got}, expected dy/dt of shape "
                    f"{tuple(y.shape)} (batch, states)"
                )
            checked[0] = True
        if out.shape != y.shape:
            out = out.expand(y.shape)
        return out

    f.segment_start = None  # type: ignore[attr-defined]
    f.piecewise = piecewise  # type: ignore[attr-defined]

    fused = None  # compile=True (refused with adjoint=True above), unless eager_solves()
    if getattr(solver, "compile", False) and not _EAGER:
        fused = FusedRhs(rhs, pf, flat_inputs if piecewise else None)
    if adjoint:
        ys, status, steps, rejected, reached = _adjoint(
            solver, f, y0f, tf, t0f, pf, per_element_grid, name
        )
    elif isinstance(solver, Dopri5):
        ys, status, steps, rejected, reached = integrate_dopri5(
            f,
            y0f,
            sched,
            rtol=solver.rtol,
            atol=solver.atol,
            max_steps=solver.max_steps,
            safety=solver.safety,
            ifactor=solver.ifactor,
            dfactor=solver.dfactor,
            first_step=solver.first_step,
            fused=fused,
        )
    else:
        ys, status, steps, rejected, reached = integrate_fixed(
            solver.method, f, y0f, sched, int(getattr(solver, "substeps", 1)), fused=fused
        )
    return Solution(
        ys=ys.reshape(*batch, t_len, s),
        status=status.reshape(batch),
        num_steps=steps.reshape(batch),
        num_rejected=rejected.reshape(batch),
        ts=times,
        reached=None if reached is None else reached.reshape(*batch, t_len),
    )


def _adjoint(solver, f, y0f, tf, t0f, pf, per_element_grid, name):
    from torchdiffeq import odeint_adjoint

    if per_element_grid:
        raise ValueError(
            f"ode({name!r}, adjoint=True): the adjoint method needs one shared time grid, no "
            "doses, no piecewise-constant inputs and a scalar t0; use backpropagation "
            "(adjoint=False) for this problem"
        )

    class _Func(torch.nn.Module):
        def forward(self, t, y):
            return f(t, y)

    grid = tf[0]
    start = t0f.reshape(())
    prepend = bool(grid[0] > start)
    ts = torch.cat([start.reshape(1), grid]) if prepend else grid
    options: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    if isinstance(solver, Dopri5):
        kwargs.update(rtol=solver.rtol, atol=solver.atol)
        options.update(max_num_steps=solver.max_steps)
    else:
        span = (ts[1:] - ts[:-1]).clamp(min=0)
        positive = span[span > 0]
        step = float(positive.min()) / solver.substeps if positive.numel() else 1.0
        options.update(step_size=step)
    adjoint_params = tuple(v for v in pf.values() if v.requires_grad)
    out = odeint_adjoint(
        _Func(),
        y0f,
        ts,
        method=_TORCHDIFFEQ[solver.method],
        options=options,
        adjoint_params=adjoint_params,
        **kwargs,
    )  # (T', B, S)
    if prepend:
        out = out[1:]
    ys = out.transpose(0, 1)
    b = y0f.shape[0]
    ok = torch.isfinite(ys).all(-1).all(-1)
    status = torch.where(ok, int(Status.SUCCESS), int(Status.NONFINITE)).long()
    zeros = torch.zeros(b, dtype=torch.long, device=y0f.device)
    return ys, status, zeros, zeros, None


# eager_solves() depth: while positive, compile=True solvers integrate eagerly
_EAGER: list[None] = []


@contextlib.contextmanager
def eager_solves() -> Iterator[None]:
    """Within this context solvers made with ``compile=True`` integrate eagerly (the same
    steps, equal to round-off), compiling nothing. For a few passes that need a kernel no
    other pass uses: :func:`pyro_hds.gibbs.particle_gibbs` differentiates the model a few
    dozen times (its Laplace approximations) but otherwise never, and compiling the
    training kernel for those passes would cost more than they do (tens of seconds on a
    fresh install)."""
    _EAGER.append(None)
    try:
        yield
    finally:
        _EAGER.pop()


# memo tables of reuse_solutions(), innermost last: site name -> its last MEMO_DEPTH calls'
# (inputs, Solution), most recent last
_MEMOS: list[dict[str, list[tuple[tuple, Solution]]]] = []
MEMO_DEPTH = 4


@contextlib.contextmanager
def reuse_solutions() -> Iterator[None]:
    """Within this context and without grad, :func:`ode` returns a site's previous solution
    when it is called again with equal inputs instead of solving again.

    "Equal" means the same ``rhs`` object (a function defined inside the model is a new
    object on every call, so it never matches) and equal values of ``y0``, ``times``,
    ``params`` and every keyword (compared elementwise, shapes included). The last
    ``MEMO_DEPTH`` calls of each site are kept, and a call whose params equal, element by
    element of the batch, those of one kept call or another (all else equal, shapes too)
    gets those elements' solutions put together: a Metropolis step that accepts some
    elements' proposals and rejects others' leaves a state whose solution was computed in
    pieces already. It serves samplers that change one latent at a time: in a centred
    hierarchy a move of a population parameter leaves every individual's ODE parameters as
    they were, and such passes of the model then cost no solve. The ``rhs`` must depend on
    nothing but its arguments (and fixed module weights), as :func:`solve` asks anyway, and
    an element's solution must not depend on the others in its batch (the solvers of this
    package give the same values whatever the batch).
    """
    _MEMOS.append({})
    try:
        yield
    finally:
        _MEMOS.pop()


def _recall(kept: list[tuple[tuple, Solution]], call: tuple) -> Solution | None:
    """The solution of ``call`` from the kept calls of its site: one with equal inputs, or
    one put together element by element of the batch from kept calls whose other inputs
    are equal and whose params equal the call's there (the most recent call first); None
    when some element matches none."""
    rhs, y0, times, params, kwargs = call
    for old, solution in reversed(kept):
        if old[0] is rhs and _same(old, call):
            return solution
    if not params or not all(isinstance(v, torch.Tensor) for v in params.values()):
        return None
    event_dims = kwargs.get("event_dims") or {}
    pieces: list[tuple[torch.Tensor, Solution]] = []
    for old, solution in kept:
        old_params = old[3]
        if (
            old[0] is not rhs
            or not old_params
            or old_params.keys() != params.keys()
            or any(
                not isinstance(old_params[k], torch.Tensor)
                or old_params[k].shape != v.shape
                or old_params[k].dtype != v.dtype
                or old_params[k].device != v.device
                for k, v in params.items()
            )
            or not _same((old[1], old[2], old[4]), (y0, times, kwargs))
        ):
            continue
        batch = solution.status.shape
        match = torch.ones(batch, dtype=torch.bool, device=solution.status.device)
        for k, v in params.items():
            equal = v == old_params[k]
            ed = int(event_dims.get(k, 0))
            if ed:
                equal = equal.reshape(*equal.shape[: equal.dim() - ed], -1).all(-1)
            match = match & equal
        pieces.append((match.expand(batch), solution))
    if not pieces or not bool(torch.stack([m for m, _ in pieces]).any(0).all()):
        return None

    def pick(m: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(m.reshape(*m.shape, *([1] * (new.dim() - m.dim()))), new, old)

    merged = pieces[0][1]
    for match, solution in pieces[1:]:  # later calls take precedence
        reached = None
        if merged.reached is not None or solution.reached is not None:
            every = torch.ones_like(solution.ys[..., 0], dtype=torch.bool)
            reached = pick(
                match,
                every if solution.reached is None else solution.reached,
                every if merged.reached is None else merged.reached,
            )
        merged = Solution(
            ys=pick(match, solution.ys, merged.ys),
            status=pick(match, solution.status, merged.status),
            num_steps=pick(match, solution.num_steps, merged.num_steps),
            num_rejected=pick(match, solution.num_rejected, merged.num_rejected),
            ts=solution.ts,
            reached=reached,
        )
    return merged


def _same(a: Any, b: Any) -> bool:
    """Equal values, for the inputs of a solve (tensors elementwise, with shapes and dtypes)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if dataclasses.is_dataclass(a) or isinstance(a, PiecewiseConstant):
        return _same(vars(a), vars(b))
    try:
        return bool(a == b)
    except (TypeError, RuntimeError, ValueError):
        return False


def ode(
    name: str,
    rhs: Callable[..., torch.Tensor],
    y0: torch.Tensor,
    times: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Solve the ODE for every particle and individual and record the trajectory as a site.

    Takes the arguments of :func:`solve`. The trajectory ``(*batch, T, S)`` is recorded like
    ``pyro.deterministic(name, ys, event_dim=2)``, so ``poutine.trace``, ``Predictive``, the
    guides and the ArviZ export see it; ``infer["ode_status"]`` holds the per-element
    :class:`~pyro_hds.Status` codes (batch shape) and ``infer["ode_solution"]`` the
    :class:`~pyro_hds.Solution`. Objectives give particles whose status is not SUCCESS zero
    weight. An element that failed holds its last finite state in the returned trajectory.
    """
    memo = _MEMOS[-1] if _MEMOS and not torch.is_grad_enabled() else None
    call = (rhs, y0, times, params, kwargs)
    kept = None if memo is None else memo.setdefault(name, [])
    solution = None if not kept else _recall(kept, call)
    if solution is None:
        solution = solve(rhs, y0, times, params, name=name, **kwargs)
    if kept is not None and not (kept and kept[-1][1] is solution):
        kept.append((call, solution))
        del kept[:-MEMO_DEPTH]
    ys = solution.ys
    return pyro.sample(
        name,
        dist.Delta(ys, event_dim=2).mask(False),
        obs=ys,
        infer={  # type: ignore[arg-type]
            "_deterministic": True,
            "ode_status": solution.status,
            "ode_solution": solution,
        },
    )
