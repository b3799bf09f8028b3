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

import contextlib
import math
from collections.abc import Callable
from typing import Any

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


# -- compiled steps ---------------------------------------------------------------------------


class FusedRhs:
    """What a compiled Dopri5 step needs besides the states: the user's ``rhs``, its flattened
    params ``(B, *event)`` and, for piecewise-constant inputs, ``inputs(t, idx)`` giving
    ``u (B', D)`` for the working set (constant over a step, so it is evaluated once per step
    at the step's start, outside the kernel)."""

    def __init__(
        self,
        rhs: Callable[..., torch.Tensor],
        params: dict[str, torch.Tensor],
        inputs: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None,
    ) -> None:
        self.rhs = rhs
        self.params = params
        self.inputs = inputs


_COMPILED: dict[str, Callable[..., tuple]] = {}
#: whether a fixed-step solve without doses runs as one scan (off: the interval loop; for
#: timing the two side by side)
_SCAN = True


def _compiled(fn: Callable[..., tuple], scan: bool = False) -> Callable[..., tuple]:
    """``torch.compile(fn, dynamic=True)``, made once per process and wrapped so that a
    failure to build it says what to do.

    For a ``scan`` kernel two settings hold while it runs (they decide how a graph is traced,
    so they must hold at every call that may compile): dynamo captures scalar outputs inside
    the graph (inductor otherwise stops on the loop counter of a :func:`_pure_intervals` scan with
    ``DataDependentOutputException: aten._local_scalar_dense``), and sizes that happen to be
    equal (the number of intervals and of states, say) get separate symbols, so that a kernel
    traced where they coincide is not specialized on their equality."""
    call = _COMPILED.get(fn.__name__)
    if call is None:
        compiled = torch.compile(fn, dynamic=True)
        from torch.fx.experimental import _config as fx_config

        def settings():
            if not scan:
                return contextlib.nullcontext()
            both = contextlib.ExitStack()
            both.enter_context(torch._dynamo.config.patch(capture_scalar_outputs=True))
            both.enter_context(fx_config.patch(use_duck_shape=False))
            return both

        def call(*args):
            try:
                with settings():
                    return compiled(*args)
            except torch._dynamo.exc.BackendCompilerFailed as err:  # e.g. no C++ compiler
                raise RuntimeError(
                    "compile=True: torch.compile could not build the fused step "
                    f"({type(err).__name__}: {str(err).splitlines()[0]}); it needs the "
                    "inductor backend (on CPU, a working C++ compiler). Use compile=False."
                ) from err

        _COMPILED[fn.__name__] = call
    return call


def _needs_grad(*tensors: torch.Tensor | None, params: dict[str, torch.Tensor] | None = None):
    """Whether grad mode is on and any of ``tensors`` or ``params`` needs a gradient (what
    the solve decides once, not per kernel call)."""
    return torch.is_grad_enabled() and (
        any(x is not None and x.requires_grad for x in tensors)
        or any(v.requires_grad for v in (params or {}).values())
    )


def _grad_mode(needs_grad: bool):
    """The grad mode to call a compiled kernel in: ``torch.no_grad()`` when no input needs a
    gradient. ``torch.compile`` guards on the grad mode, so a kernel called under grad mode
    with inputs that need none (a model run before training, outside ``no_grad``) would
    compile a third variant of the same forward computation beside the no-grad and the
    training ones (several seconds to tens of seconds on a fresh install)."""
    return contextlib.nullcontext() if needs_grad else torch.no_grad()


def _fused_params(fused: FusedRhs) -> dict[str, torch.Tensor]:
    """The params as non-view tensors: kernels compiled for views are not reused for the
    non-view tensors of later steps, so views (columns of one tensor, expanded values) are
    copied once per solve (the state gets the same treatment where each loop passes it)."""
    return {k: v.clone() for k, v in fused.params.items()}


def _state_major_copy(y: torch.Tensor) -> torch.Tensor:
    """The contiguous ``(S, B)`` tensor that the compiled interval takes, for the ``(B, S)``
    state ``y``: when ``y`` is the transpose of such a tensor (the previous kernel's output),
    that tensor itself; else a copy (never a view, see :func:`_fused_params`)."""
    base = y._base
    if (
        base is not None
        and base._base is None
        and base.shape == y.shape[::-1]
        and base.data_ptr() == y.data_ptr()
        and y.t().is_contiguous()
        and base.stride() == (base.shape[1], 1)  # the strides a kernel is specialized on
    ):
        return base
    return y.t().clone(memory_format=torch.contiguous_format)


def _direct_rhs(rhs: Callable[..., torch.Tensor], params, u) -> F:
    """The solver's ``f(t, y, idx=None)`` calling the user's ``rhs`` on explicit tensors (what
    the compiled kernels trace; ``idx`` is unused: a kernel gets its working set's params)."""

    def f(t, y, _idx=None):
        out = rhs(t, y, params) if u is None else rhs(t, y, params, u)
        return out.expand(y.shape)

    return f


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
    state's values lie contiguously. The fixed-step solvers keep their state so
    (:func:`_state_major_view`); Dopri5's state takes the layout of what the rhs returns
    (elementwise operations follow their operands' layout). A right-hand side that returns
    its derivative state-major (``torch.stack(terms, 0).movedim(0, -1)``) and reads
    ``y.movedim(-1, 0).unbind(0)`` then touches contiguous memory only, and neither the rhs
    nor the trajectory's assembly transposes anything (a stack along the last dim
    interleaves its inputs, several times slower than one along a leading dim)."""
    return y.dim() == 2 and y.shape[0] > 1 and y.stride(0) == 1 and y.stride(1) == y.shape[0]


def _state_major_view(y: torch.Tensor) -> torch.Tensor:
    """``y`` ``(B, S)`` as the transpose of a contiguous ``(S, B)`` tensor (see
    :func:`state_major`), copied once when it is not. Elementwise operations follow the
    layout of their first operand, so the state a solve starts from sets the layout of every
    later stage and dose (:func:`_subset_step` keeps it through the checked steps); from a
    row-major state the innermost dim of a few states defeats vectorization:
    ``torch.addcmul`` on 8000 x 2 states took 19-21 us row-major against 4 us state-major
    (scratch timing, one thread)."""
    if y.dim() != 2 or y.shape[0] <= 1 or y.shape[1] <= 1 or state_major(y):
        return y
    return y.t().contiguous().t()


def _stack_states(hist: list[torch.Tensor]) -> torch.Tensor:
    """``(B, H, S)``: the states ``hist`` (H of ``(B, S)``) stacked.

    State-major states are stacked as ``(S, H, B)`` and returned as a permuted view: stacking
    them along a middle dim of ``(B, H, S)`` would transpose every value (three times slower
    than a row-major stack). The last state decides: the first interval of a compiled
    fixed-step solve runs eagerly and may leave one row-major state among state-major ones."""
    if state_major(hist[-1]):
        return torch.stack([h.t() for h in hist], 1).permute(2, 1, 0)
    return torch.stack(hist, 1)


def _gather_states(stacked: torch.Tensor, index: torch.Tensor, identity: bool = False):
    """``(B, T, S)``: the states ``stacked`` ``(B, H, S)`` at the grid positions ``index``
    ``(B, T)``; ``identity``: ``index`` is ``arange(H)`` (no gather needed)."""
    if identity and stacked.shape[1] == index.shape[-1]:
        return stacked
    b, t_len = index.shape
    return stacked.gather(1, index.unsqueeze(-1).expand(b, t_len, stacked.shape[-1]))


Layout = tuple[tuple[str, int, tuple[int, ...]], ...]


def _pack(params: dict[str, torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, Layout]:
    """The fixed-step kernels' params as one contiguous ``(N, B)`` tensor (a row per scalar
    param, ``prod(event)`` rows per event-shaped one) and the layout that
    :func:`_unpack` reads it back with: ``(name, first row, event shape)`` per param.

    One tensor instead of one per param: a compiled kernel's call checks guards and wraps
    every tensor argument, and the backward pass accumulates one gradient instead of one per
    param for each interval. Over 85 intervals of the double-receiver model (23 params, 3600
    systems) the no-grad forward took about 10 ms packed against 14-21 ms with a dict of
    tensors (scratch timing, two threads)."""
    b = like.shape[0]
    layout = []
    blocks = []
    row = 0
    for key, value in params.items():
        event = tuple(value.shape[1:])
        layout.append((key, row, event))
        # a row block (n, B) each: the concatenation along dim 0 is then contiguous as
        # made, and its backward hands each param a slice
        blocks.append(value.reshape(1, b) if not event else value.reshape(b, -1).t())
        row += blocks[-1].shape[0]
    if not blocks:
        return like.new_zeros((0, b)), ()
    return torch.cat(blocks, 0), tuple(layout)


def _unpack(packed: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """The params dict (each ``(B, *event)``) from :func:`_pack`'s ``(N, B)`` tensor.

    By ``unbind``, whose backward stacks the rows' gradients into one tensor; indexing each
    row instead backpropagates as one zero-filled ``(N, B)`` scatter per row: the
    vector-Jacobian kernel of the double-receiver model (23 rows, 3600 systems) then took
    26 ms per 85 intervals against 14-15 ms (scratch timing, two threads)."""
    rows = packed.unbind(0)
    out = {}
    for key, row, event in layout:
        if not event:
            out[key] = rows[row]
        else:
            out[key] = torch.stack(rows[row : row + math.prod(event)], 1).reshape(-1, *event)
    return out


def _interval_state(layout, method, substeps, rhs, t, y_sm, h, packed, u):
    """The end state ``(S, B)`` of :func:`_pure_interval` (what it and the scans share)."""
    f = _direct_rhs(rhs, _unpack(packed, layout), u)
    step = FIXED_METHODS[method]
    y = y_sm.t()
    for _ in range(substeps):
        y = step(f, t, y, h)
        t = _shift(t, h, 1.0)
    return y.t().contiguous()


def _pure_interval(layout, method, substeps, rhs, t, y_sm, h, packed, u):
    """``substeps`` steps of ``method`` of size ``h`` (a tensor) from ``(t, y)`` with the rhs
    called directly on explicit tensors (what ``torch.compile`` fuses for the fixed-step
    solvers); returns the end state and its largest magnitude (no gradient). The params come
    packed (:func:`_pack`; ``layout`` says where each param's rows lie).

    The state goes in and comes out state-major, as a contiguous ``(S, B)`` tensor ``y_sm``
    (the rhs still sees ``(B, S)``, a transposed view). Every load and store of the fused
    kernels, forward and backward, is then contiguous along the batch and vectorizes; with
    ``(B, S)`` rows each state is read with stride ``S`` and the generated loops were scalar
    (forward and backward over 85 intervals of the double-receiver model at 3600 systems
    took a median of 75 ms that way, against 60 ms state-major)."""
    y = _interval_state(layout, method, substeps, rhs, t, y_sm, h, packed, u)
    return y, y.detach().abs().amax()


def _pure_interval_vjp(layout, method, substeps, rhs, t, y_sm, h, packed, u, a_sm, g_acc):
    r"""One interval of the discrete adjoint (:class:`_FixedAdjoint`): with
    :math:`y_{p+1} = \Phi(y_p, \theta)` the interval of :func:`_pure_interval` and
    :math:`a_{p+1} = \partial L / \partial y_{p+1}`, returns
    :math:`a_p^{\Phi} = (\partial\Phi/\partial y_p)^\top a_{p+1}` and
    ``g_acc`` :math:`+ (\partial\Phi/\partial\theta)^\top a_{p+1}` (packed ``(N, B)``).
    The interval is computed again from its start ``y_sm`` inside the kernel, so the forward
    pass keeps only the states at the grid points. Every system is independent, so the whole
    function is elementwise over the batch and compiles to a few fused loops."""

    def interval(y_start, theta):
        return _interval_state(layout, method, substeps, rhs, t, y_start, h, theta, u)

    _, pull = torch.func.vjp(interval, y_sm, packed)
    a_y, a_theta = pull(a_sm)
    return a_y, g_acc + a_theta


def _scan():
    from torch._higher_order_ops.scan import scan

    return scan


def _pure_intervals(layout, method, substeps, rhs, ts, y_sm, hs, packed, us):
    r"""Every interval of a solve in one kernel: a ``scan`` (PyTorch's loop operator, which
    the compiler keeps as a loop) over the ``L`` intervals of :func:`_interval_state`, from
    the ``(S, B)`` start state ``y_sm``. Interval :math:`p` starts at ``ts[p]`` with steps
    ``hs[p]`` (``(L,)`` on a shared grid, else ``(L, B)``) and inputs ``us[p]`` (``(L, B,
    D)``, or ``None``). Returns the states at the ends of the intervals as one contiguous
    ``(S, L, B)`` tensor (the trajectory's state-major layout, :func:`_stack_states`) and
    their largest magnitude.

    Against one kernel call per interval (:func:`_pure_interval`), this removes the calls'
    own cost (guards, argument wrapping, allocation: about 45 us each without gradients at
    any batch size, measured in ``docs/vihds.md``) and lets each interval write into the
    output in place."""

    def body(y, x):
        u = x[2] if len(x) > 2 else None
        y_new = _interval_state(layout, method, substeps, rhs, x[0], y, x[1], packed, u)
        return y_new, y_new.clone()

    xs = (ts, hs) if us is None else (ts, hs, us)
    _, outs = _scan()(body, y_sm, xs)
    return outs.transpose(0, 1).contiguous(), outs.abs().amax()


def _pure_intervals_vjp(layout, method, substeps, rhs, ts, y_first, states, hs, packed, us, grads):
    r"""The discrete adjoint (:class:`_FixedAdjoint`) of :func:`_pure_intervals` in one
    kernel: a reverse ``scan`` that, for :math:`p = L-1, \dots, 0`, adds the output's
    gradient ``grads[:, p]`` (``(S, L, B)``) to the adjoint and takes the vector-Jacobian
    product of interval :math:`p`, computed again from its start (``y_first`` ``(S, B)`` for
    the first, else ``states[:, p - 1]``, ``states`` as :func:`_pure_intervals` returned it).
    Returns the gradients of ``y_first`` ``(S, B)`` and of the packed params ``(N, B)``.

    The vector-Jacobian products are taken inside the loop's body (``torch.func.vjp``); the
    operator's own autograd is never used."""
    # the loop runs forward over the reversed intervals: each reversed copy is made in the
    # one pass that lays it out contiguously (reverse=True flips the inputs with copies of
    # its own)
    by_time = states.transpose(0, 1)
    starts = torch.cat([by_time.narrow(0, 0, by_time.shape[0] - 1).flip(0), y_first.unsqueeze(0)])

    def body(carry, x):
        a, g = carry
        t, h, y_start, g_p = x[0], x[1], x[2], x[3]
        u = x[4] if len(x) > 4 else None

        def interval(y_s, theta):
            return _interval_state(layout, method, substeps, rhs, t, y_s, h, theta, u)

        _, pull = torch.func.vjp(interval, y_start, packed)
        a_y, a_theta = pull(a + g_p)
        return (a_y, g + a_theta), a_y.new_zeros(())

    base = (ts.flip(0), hs.flip(0), starts, grads.transpose(0, 1).flip(0).contiguous())
    xs = base if us is None else (*base, us.flip(0))
    init = (torch.zeros_like(y_first), torch.zeros_like(packed))
    (a0, g), _ = _scan()(body, init, xs)
    return a0, g


def _pair(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else torch.stack([x, x])


def _after_zero_length(h: torch.Tensor) -> torch.Tensor:
    """The steps of a zero-length interval followed by one of step ``h``."""
    return torch.stack([torch.zeros_like(h), h])


def _interval_by_scan(layout, method, substeps, rhs, t, y_sm, h, packed, u):
    """:func:`_pure_interval` computed by the kernel of :func:`_pure_intervals`, as the second
    of two intervals whose first has length zero (the identity for finite values): a solve
    that fell back from one scan to the interval loop then compiles no other kernel. The
    same bits as the scan gives for the interval (each interval is the same code)."""
    hs = _after_zero_length(h)
    scan = _compiled(_pure_intervals, scan=True)
    states, top = scan(layout, method, substeps, rhs, _pair(t), y_sm, hs, packed, _pair(u))
    return states.select(1, 1).contiguous(), top


def _interval_vjp_by_scan(layout, method, substeps, rhs, t, y_sm, h, packed, u, a_sm, g_acc):
    """:func:`_pure_interval_vjp` by the kernel of :func:`_pure_intervals_vjp` (see
    :func:`_interval_by_scan`): the zero-length first interval starts and ends at ``y_sm``,
    which is where the second starts."""
    hs = _after_zero_length(h)
    grads = torch.stack([torch.zeros_like(a_sm), a_sm], 1)
    vjp = _compiled(_pure_intervals_vjp, scan=True)
    states = torch.stack([y_sm, y_sm], 1)
    a_y, g = vjp(layout, method, substeps, rhs, _pair(t), y_sm, states, hs, packed, _pair(u), grads)
    return a_y, g_acc + g


def _closes_over_grad(rhs, t, y0: torch.Tensor, packed: torch.Tensor, layout: Layout, u) -> bool:
    """Whether ``rhs`` reads a tensor that needs a gradient other than the state and the
    params (a network's weights it closes over, as a neural ODE does): one eager evaluation
    for one element, with the state, params and inputs as fresh leaves, and a walk of its
    autograd graph for any other leaf. Such a rhs cannot take the discrete adjoint, whose
    vector-Jacobian products are taken with respect to the state and the params only."""
    y_leaf = y0[:1].detach().requires_grad_(True)
    p_leaf = packed[:, :1].detach().requires_grad_(True)
    u1 = None if u is None else u[:1].detach()
    t1 = t if t.dim() == 0 else t[:1]
    args = (t1, y_leaf, _unpack(p_leaf, layout)) + (() if u1 is None else (u1,))
    try:
        with torch.enable_grad():
            out = rhs(*args)
    except Exception:  # a rhs that needs the whole batch: the backpropagated path decides
        return True
    if not isinstance(out, torch.Tensor) or out.grad_fn is None:
        return False
    ours = {id(y_leaf), id(p_leaf)}
    seen = set()
    stack: list[Any] = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in ours:
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


class _AdjointRecord:
    """What :class:`_FixedAdjoint`'s forward pass leaves for its backward pass: per grid
    position ``None`` (an interval of length zero, skipped) or the arguments of the kernel
    call that computed the interval, ``(t, y, h, params, u, rows)``: start time, state-major
    start state (the previous call's output, so no state is stored twice), step, packed
    params and inputs of the elements ``rows`` still solved (``None``: all). ``failed``: the
    forward pass could not finish without eager steps (the caller then solves again)."""

    def __init__(self, method: str, substeps: int, rhs: Callable, layout: Layout) -> None:
        self.method = method
        self.substeps = substeps
        self.rhs = rhs
        self.layout = layout
        self.intervals: list[tuple | None] = []
        # the arguments of the one-kernel solve (:func:`_pure_intervals`) and its output, when
        # it computed the whole solve: (ts, hs, us, y_first, states)
        self.scan: tuple | None = None
        # the solve could have been one scan: its kernels serve the intervals too
        self.whole = False
        self.failed = False
        self.dead: torch.Tensor | None = None
        self.died_at: torch.Tensor | None = None


class _FixedAdjoint(torch.autograd.Function):
    r"""A compiled fixed-step solve as one autograd node, differentiated by the discrete
    adjoint: the exact gradient of the computed trajectory (what backpropagating through the
    steps gives too, to round-off), not an approximation by a backward ODE.

    Forward: ``forward(y0, params)`` (the fixed-step loop of :func:`integrate_fixed` without
    gradients, each interval one call of the no-grad kernel of :func:`_pure_interval`)
    returns the states at the grid points ``(B, H, S)`` and fills ``record``. Backward:
    with :math:`g_p` the gradient of the output at position :math:`p`, :math:`a_H = 0` and,
    for :math:`p = H-1, \dots, 0`,

    .. math::

        a_p = g_p + \Big(\frac{\partial \Phi_{p+1}}{\partial y_p}\Big)^\top a_{p+1},
        \qquad
        \frac{\partial L}{\partial\theta} = \sum_p
        \Big(\frac{\partial \Phi_p}{\partial\theta}\Big)^\top a_p,

    one call of the compiled :func:`_pure_interval_vjp` per interval; the gradient of ``y0``
    is :math:`(\partial\Phi_0/\partial y_0)^\top a_0`. A dose adds a constant (the adjoint
    passes unchanged), a skipped interval is the identity, and an element that failed has a
    detached state from then on (its adjoint is zero there), as in the backpropagated loop.

    Against backpropagating through the compiled intervals (an autograd node per interval,
    saving the intermediates of every step, and a gradient per param accumulated per
    interval), the forward pass runs without gradients and the backward pass is one fused,
    elementwise kernel per interval. Not twice differentiable."""

    @staticmethod
    def forward(ctx, record, forward, y0, packed):  # type: ignore[override]
        # detached: the kernels guard on requires_grad, and the no-grad kernel of evaluation
        # (inputs that need no gradient) then serves here too
        packed = packed.detach()
        out = forward(y0.detach(), packed)
        ctx.record = record
        ctx.packed = packed
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: the kernels make no graph
            raise RuntimeError(
                "a solve with a compiled fixed-step solver (compile=True) is differentiable "
                "once: its backward pass (the discrete adjoint) builds no graph for a second "
                "derivative. Use compile=False for higher derivatives."
            )
        record, packed = ctx.record, ctx.packed
        if record.scan is not None:  # the whole solve was one scan: so is its adjoint
            ts, hs, us, y_first, states = record.scan
            grads = grad.permute(2, 1, 0).contiguous()  # (S, H, B); no copy when state-major
            with torch.no_grad():
                a0, g = _compiled(_pure_intervals_vjp, scan=True)(
                    record.layout,
                    record.method,
                    record.substeps,
                    record.rhs,
                    ts,
                    y_first,
                    states,
                    hs,
                    packed,
                    us,
                    grads,
                )
            return None, None, a0.t(), g
        kernel = _compiled(_pure_interval_vjp)
        # (S, H, B), a view: when the gradient is laid out state-major, as the trajectory is
        # (a model that reads its states as double_receiver.observables does), each
        # position's gradient is a contiguous (S, B) block. Added per position from a
        # row-major one, it took about 55 us per position (85 per solve) in a fit of the
        # double-receiver model, against 19 us; a transposing copy of the whole gradient took
        # 5.9 ms (profiler, two threads)
        grad = grad.permute(2, 1, 0)
        a = grad.new_zeros((grad.shape[0], grad.shape[2]))  # (S, B)
        g_acc = torch.zeros_like(packed)
        for p in range(len(record.intervals) - 1, -1, -1):
            a = a + grad[:, p]
            entry = record.intervals[p]
            if entry is None:
                continue
            t_in, y_start, h_t, params, u, rows = entry
            if rows is not None and rows.numel() == 0:
                a = torch.zeros_like(a)
                continue
            a_in = a if rows is None else a.index_select(1, rows)
            g_in = g_acc if rows is None else g_acc.index_select(1, rows)
            call = _interval_vjp_by_scan if record.whole and a_in.shape[1] > 1 else kernel
            with torch.no_grad():
                a_out, g_out = call(
                    record.layout,
                    record.method,
                    record.substeps,
                    record.rhs,
                    t_in,
                    y_start,
                    h_t,
                    params,
                    u,
                    _standard(a_in),
                    g_in,
                )
            if rows is None:
                a, g_acc = a_out, g_out
            else:  # the failed elements' states are detached: their adjoint stops here
                a = torch.zeros_like(a).index_copy(1, rows, a_out)
                g_acc = g_acc.index_copy(1, rows, g_out)
        # ctx keeps the record: a backward pass with retain_graph=True may come again
        return None, None, a.t(), g_acc


def _standard(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(S, B)`` with the strides ``(B, 1)`` that a kernel is specialized on (also in
    size-1 dims, whose strides ``contiguous()`` leaves as they are)."""
    if x.stride() == (x.shape[1], 1):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _adjoint_applies(fused, y0, sched, packed, layout, jumps) -> bool:
    """Whether a compiled fixed-step solve takes the discrete adjoint (:class:`_FixedAdjoint`):
    under grad mode, with a gradient wanted for the params or ``y0`` and for nothing else
    (not for the times, the doses or the inputs, nor for tensors the rhs closes over)."""
    if not torch.is_grad_enabled() or not (packed.requires_grad or y0.requires_grad):
        return False
    if sched.points.requires_grad or sched.t0.requires_grad:
        return False
    if any(j.requires_grad for j in jumps.values()):
        return False
    t = sched.t0[0] if sched.points.shape[0] == 1 else sched.t0
    u = None if fused.inputs is None else fused.inputs(t, None)
    if u is not None and u.requires_grad:
        return False
    return not _closes_over_grad(fused.rhs, t, y0, packed, layout, u)


def integrate_fixed(
    method: str,
    f: F,
    y0: torch.Tensor,
    sched: Schedule,
    substeps: int,
    fused: FusedRhs | None = None,
):
    """Fixed steps: ``substeps`` equal steps between consecutive grid points of each element.

    Each interval between grid points runs without per-step checks; when its end state holds a
    non-finite value, the interval is run again from its start with a check after every step,
    and the elements that fail are dropped from the computation (see the module docstring).
    With ``fused``, an interval is one compiled kernel (:func:`_pure_interval`) over the
    elements that have not failed, and checking runs eagerly. When an interval fails, the
    checking path finds the failing elements and the kernel computes the others again: the
    kernel gives an element the same bits in any batch, so an element's solution does not
    depend on whether others failed. A fused solve whose gradient is wanted for the params or
    ``y0`` only is differentiated by the discrete adjoint (:class:`_FixedAdjoint`: the same
    loop without gradients, then one vector-Jacobian kernel per interval backwards);
    otherwise (gradients for the times, doses or inputs, or for tensors the rhs closes over)
    the kernels are backpropagated through, the first interval running eagerly when the
    params (or times) need a gradient and ``y0`` does not (so that one kernel serves the
    rest). A solve that needs no gradient calls the no-grad kernel even under grad mode
    (:func:`_grad_mode`).
    An interval of length zero for every element (a dose at ``t0``, a dose at an observation
    time) is skipped: its state is the previous point's (:meth:`Schedule.zero_length`).
    """
    step = FIXED_METHODS[method]
    b = y0.shape[0]
    limit = _limit(y0)
    shared = sched.points.shape[0] == 1
    points = sched.points[0] if shared else sched.points
    # a shared grid without gradient: the step is a Python number (no tensor arithmetic)
    scalar_h = shared and not (sched.points.requires_grad or sched.t0.requires_grad)
    num_points = sched.points.shape[1]
    jumps = sched.column_jumps(y0.shape[-1], y0.dtype)
    still = sched.zero_length()

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

    params = kernel = None
    layout: Layout = ()
    # whether the params or times need a gradient; then the first interval runs eagerly
    # when y0 does not (the kernel would need a gradient that y0 lacks)
    params_grad = False
    if fused is not None:
        params, layout = _pack(fused.params, y0)
        kernel = _compiled(_pure_interval)
        params_grad = _needs_grad(sched.points, sched.t0, params)

    # the whole solve as one kernel (:func:`_pure_intervals`): without doses, for more than
    # one element and one state (a kernel traced on a size of 1 is specialized on it);
    # intervals of length zero are steps of size zero (exactly the identity for finite
    # values)
    whole = _SCAN and fused is not None and not jumps and b > 1 and y0.shape[-1] > 1
    whole = whole and num_points > 1

    def scanned(y0, params):
        """The states at the grid points ``(B, H, S)`` and the kernel's arguments and output
        (for the adjoint), or ``None`` when some interval fails (then the loop below solves
        it again, isolating the failed elements)."""
        assert fused is not None
        if shared:
            pts = points
            ts = torch.cat([sched.t0[:1], pts[:-1]])
            hs = ((pts - ts).double() / substeps).to(pts.dtype)
        else:
            pts = points.t()
            ts = torch.cat([sched.t0.unsqueeze(0), pts[:-1]])
            # contiguous: the kernel is specialized on strides (the grid is read transposed)
            hs = ((pts - ts) / substeps).contiguous()
        if fused.inputs is None:
            us = None
        else:
            us = torch.stack([fused.inputs(ts[p], None) for p in range(num_points)])
            if torch.is_grad_enabled() and us.requires_grad:
                return None
        y_first = _state_major_copy(y0.detach())
        with torch.no_grad():
            states, top = _compiled(_pure_intervals, scan=True)(
                layout, method, substeps, fused.rhs, ts, y_first, hs, params.detach(), us
            )
        if not bool(top <= limit):
            return None
        return states.permute(2, 1, 0), (ts, hs, us, y_first, states)

    def none_failed():
        """``dead`` and ``died_at`` of a solve in which no element failed."""
        dead = torch.zeros(b, dtype=torch.bool, device=y0.device)
        return dead, torch.full((b,), num_points, dtype=torch.long, device=y0.device)

    def loop(y0, params, params_grad, record=None):
        """The solve from ``y0`` with the packed ``params``: the states at the grid points,
        the failed elements and the position each failed at. With ``record`` (the adjoint's
        forward pass, without gradients), each kernel call that stands is recorded."""
        t = sched.t0[0] if shared else sched.t0
        y = _state_major_view(y0)
        dead = torch.zeros(b, dtype=torch.bool, device=y0.device)
        any_dead = False
        died_at = torch.full((b,), num_points, dtype=torch.long, device=y0.device)
        hist: list[torch.Tensor] = []
        first = True  # no interval has run yet
        alive: torch.Tensor | None = None  # the rows still solved, once some failed
        subset: dict[str, Any] = {"rows": None, "params": params}

        def dosed(y, p):
            jump = jumps.get(p)
            if jump is None:
                return y
            # a dead element gets no dose (its state stays frozen)
            return y + (torch.where(dead[:, None], jump.new_zeros(()), jump) if any_dead else jump)

        def fused_interval(y, t, h, rows, base=None):
            """The interval by the compiled kernel for every element, or for the ``rows``
            alone (the others keep their state in ``base``, default ``y``, detached); returns
            the new state, whether it is healthy and the kernel's arguments."""
            assert fused is not None and kernel is not None
            if rows is not None:
                if subset["rows"] is not rows:  # the working set's params, once per set
                    subset["rows"] = rows
                    subset["params"] = params.index_select(1, rows)
                if rows.numel() == 0:
                    empty = (None, None, None, None, None, rows)
                    return (y if base is None else base).detach(), True, empty
                t, h, y_in = _take(t, rows), _take(h, rows), y.index_select(0, rows)
            else:
                y_in = y
            u = None if fused.inputs is None else fused.inputs(t, rows)
            h_t = torch.as_tensor(h, dtype=y.dtype, device=y.device)
            # t: a grid column (strided), the expanded t0 (stride 0) or a 0-d element of a
            # shared grid, all views: a copy gives one layout and no base size to specialize
            # on, so one kernel serves them all. y enters as a contiguous (S, B) tensor and
            # leaves as its (B, S) transpose, which _stack_states stacks without moving
            # values
            t_in = t.clone(memory_format=torch.contiguous_format)
            args = (t_in, _state_major_copy(y_in), h_t, subset["params"], u, rows)
            needs = params_grad or _needs_grad(y_in, u)
            # a solve that fell back from the one-kernel scan uses the scan's kernel
            by_scan = whole and not needs and y_in.shape[0] > 1
            with _grad_mode(needs):
                call = _interval_by_scan if by_scan else kernel
                y_sm, top = call(layout, method, substeps, fused.rhs, *args[:4], u)
            out = y_sm.t()
            if rows is not None:
                out = torch.index_copy((y if base is None else base).detach(), 0, rows, out)
            return out, bool(top <= limit), args

        for p in range(num_points):
            target = points[..., p]
            if still[p]:  # no time passes: the state is that of the previous point
                t = target
                hist.append(y)
                if record is not None:
                    record.intervals.append(None)
                y = dosed(y, p)
                continue
            h = float(target - t) / substeps if scalar_h else (target - t) / substeps
            if kernel is not None and not (first and params_grad and not y.requires_grad):
                y_start = y
                y, healthy, args = fused_interval(y_start, t, h, alive)
                if not healthy:
                    # the checking path finds the elements that fail; the others are
                    # computed again by the kernel, so that no element's values depend on
                    # whether another element of the batch failed (the kernel gives any
                    # subset the same bits)
                    y_checked, dead = careful(y_start, t, h, dead)
                    any_dead = bool(dead.any())
                    alive = (~dead).nonzero().flatten() if any_dead else None
                    y, healthy, args = fused_interval(y_start, t, h, alive, base=y_checked)
                    if not healthy:  # the kernel fails where the checking path did not
                        if record is not None:  # no kernel to differentiate: give up
                            record.failed = True
                            return hist, dead, died_at
                        y = y_checked
                if record is not None:
                    record.intervals.append(args)
            elif any_dead and torch.is_grad_enabled():
                # with gradients the failed elements stay out of the computation: their
                # values, however unused, would put NaN into the gradients of what they share
                y, dead = careful(y, t, h, dead)
            elif any_dead:
                # without gradients every element steps, and the failed ones get their
                # frozen state back: a step costs the same for all elements as for a subset,
                # and no element's values depend on another's (transposed, the where keeps
                # the layout)
                y_start, t_cur = y, t
                for _ in range(substeps):
                    f.segment_start = t_cur  # type: ignore[attr-defined]
                    y = step(f, t_cur, y, h)
                    t_cur = t_cur + h
                y = torch.where(dead, y_start.t(), y.t()).t()
                if not bool(y.abs().amax() <= limit):  # a new failure: the checking path
                    y, dead = careful(y_start, t, h, dead)
            else:
                y_start, t_cur = y, t
                for _ in range(substeps):
                    f.segment_start = t_cur  # type: ignore[attr-defined]
                    y = step(f, t_cur, y, h)
                    t_cur = t_cur + h
                # one reduction detects any NaN, inf or diverging value (NaN fails the
                # comparison)
                if not bool(y.abs().amax() <= limit):
                    y, dead = careful(y_start, t, h, dead)
                    any_dead = bool(dead.any())
                    alive = (~dead).nonzero().flatten() if any_dead else None
            first = False
            if any_dead:
                died_at = torch.where(dead & (died_at == num_points), p, died_at)
            t = target  # exact arrival
            hist.append(y)
            y = dosed(y, p)
        return hist, dead, died_at

    states = None  # (B, H, S) at the grid points
    if fused is not None and _adjoint_applies(fused, y0, sched, params, layout, jumps):
        record = _AdjointRecord(method, substeps, fused.rhs, layout)
        record.whole = whole

        def forward(y0_d, params_d):
            done = scanned(y0_d, params_d) if whole else None
            if done is not None:
                record.scan = done[1]
                record.dead, record.died_at = none_failed()
                return done[0]
            hist, dead, died_at = loop(y0_d, params_d, False, record)
            record.dead, record.died_at = dead, died_at
            return _stack_states(hist)

        states = _FixedAdjoint.apply(record, forward, y0, params)
        if record.failed:
            states = None  # the solve again, backpropagated through (below)
        else:
            assert record.dead is not None and record.died_at is not None
            dead, died_at = record.dead, record.died_at
    if states is None and whole and not params_grad and not _needs_grad(y0):
        done = scanned(y0, params)
        if done is not None:
            states = done[0]
            dead, died_at = none_failed()
    if states is None:
        hist, dead, died_at = loop(y0, params, params_grad)
        states = _stack_states(hist)
    obs_index = sched.obs_index.expand(b, -1)
    ys = _gather_states(states, obs_index, sched.obs_only)
    status = torch.where(dead, int(Status.NONFINITE), int(Status.SUCCESS)).long()
    steps = torch.full((b,), num_points * substeps, dtype=torch.long, device=y0.device)
    # a dead element's outputs hold its frozen (detached) last finite state
    reached = obs_index < died_at[:, None]
    return ys, status, steps, torch.zeros_like(steps), reached


def _subset_step(step, f: F, t, y, h, keep: torch.Tensor) -> torch.Tensor:
    idx = keep.nonzero().flatten()
    # both state-major (see _state_major_view): index_select along the batch and an
    # out-of-place index_copy would return row-major states
    y_sub = step(f, _take(t, idx), y.t().index_select(1, idx).t(), _take(h, idx), idx)
    return y.detach().clone().index_copy_(0, idx, y_sub)


# -- adaptive Dopri5 --------------------------------------------------------------------------
#
# Cost model. At a few hundred systems every torch operation costs about the same few
# microseconds whatever its size (Python, dispatch, allocation), and the number of loop
# iterations is set by the stiffest system, so the loop is written to issue few operations
# (and few autograd nodes) per step: the step-size control runs without autograd, the control
# state is kept so that finished and failed elements need no masking, grid arrivals are
# recorded without per-arrival index arithmetic, and the host learns what it must (any
# arrival, any non-finite value, any possibly too small step) from two reads per step, a third
# when elements arrived (how many are still active).
# Forming the stage combinations with one matmul over stacked stages was measured and is not
# cheaper: stack + matmul cost as much as the four or five in-place adds they replace.


def _relative(row: tuple[float, ...]) -> tuple[float, tuple[tuple[int, float], ...]]:
    """``a_1`` and the nonzero ``(j, a_j / a_1)``, ``j >= 1``, of a tableau row: the combination
    :math:`\\sum_j a_j k_j` is formed as :math:`a_1 (k_1 + \\sum_{j>1} (a_j/a_1) k_j)`, with
    ``a_1`` folded into the per-element step scale. This saves one operation (and one autograd
    node) per stage: the leading term needs no multiplication."""
    return row[0], tuple((j, a / row[0]) for j, a in enumerate(row) if j > 0 and a != 0.0)


# stages 2..6 and the 5th-order solution: the leading coefficients and the relative rest
_LEAD, _REL = zip(*(_relative(_A[i]) for i in range(1, 7)), strict=True)
# the error weights relative to e_1 (> 0): the error estimate is e_1 times their combination
_E_LEAD, _E_REL = _relative(_E)
# c_2 .. c_6; the last stage (FSAL) is at c_7 = c_6 = 1
_C_STAGES = _C[1:6]
# recorded grid arrivals are resolved in batches of this many (bounds the pending masks)
_FLUSH_EVERY = 32


def _combine(ks: list[torch.Tensor], rel: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """:math:`k_1 + \\sum_j r_j k_j` over ``rel = ((j, r_j), ...)`` (``k_1`` itself if empty)."""
    if not rel:
        return ks[0]
    (j0, r0), *rest = rel
    acc = torch.add(ks[0], ks[j0], alpha=r0)
    for j, r in rest:
        acc.add_(ks[j], alpha=r)
    return acc


def _dopri_coef(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``c_2..c_6`` ``(5,)`` and the leading coefficients ``(6, 1)`` of :func:`_dopri_stages`."""
    return (
        torch.tensor(_C_STAGES, dtype=dtype, device=device),
        torch.tensor(_LEAD, dtype=dtype, device=device).unsqueeze(-1),
    )


def _dopri_stages(f: F, t, y, h, k1, coef, idx=None):
    r"""One Dormand-Prince step of size ``h`` ``(B,)`` from ``(t, y)`` with first stage ``k1``.

    ``coef`` holds ``c_2..c_6`` ``(5,)`` and the leading coefficients ``a_{i1}`` of the stage
    rows and of the 5th-order weights ``(6, 1)`` as tensors. The stage times
    :math:`t + c_i h` and the scales :math:`h a_{i1}` are formed in one operation each.

    Returns the 5th-order solution, the error estimate *per unit step* divided by
    :math:`e_1` (the first error weight), :math:`\sum_j (e_j / e_1) k_j` (no gradient: it only
    steers the step size), the last stage (the next step's first, FSAL) and the end time
    ``t + h``.
    """
    c, lead = coef
    times = torch.addcmul(t.unsqueeze(-1), h.unsqueeze(-1), c).unbind(-1)
    scales = (h.reshape(-1, 1, 1) * lead).unbind(1)  # six (B, 1) columns h a_i1
    ks = [k1]
    y_i = y
    for i in range(6):  # stages 2..6, then the 5th-order solution and its stage (FSAL)
        y_i = torch.addcmul(y, scales[i], _combine(ks, _REL[i]))
        ks.append(f(times[min(i, 4)], y_i, idx))
    with torch.no_grad():
        err = _combine(ks, _E_REL)
    return y_i, err, ks[6], times[4]


def _error_ratio(y, y5, err, h, active, rtol_e, atol_e):
    """Each element's error ratio ``(B,)`` (see the module docstring; ``err`` is the error per
    unit step over ``e_1``, the tolerances are scaled to match) and the three numbers the host
    reads after a step: the ratios' sum (non-finite if any stage was), the largest magnitude
    of the new state and the smallest active step. No gradient."""
    a5 = y5.abs()
    scale = torch.maximum(y.abs(), a5) * rtol_e + atol_e
    ratio = torch.linalg.vector_norm(err / scale, dim=-1) * h
    small = torch.where(active, h, float("inf")).amin()
    return ratio, torch.stack((ratio.sum(), a5.amax(), small))


def _control(ratio, active, h_eff, room, h, t, tt, t_end, steps, rejected, safety, dmin, imax):
    """Accept or reject each element's step and choose its next one. Returns ``(accept,
    refused, arrive, h, t, steps, rejected)``; ``arrive``: accepted and clipped to the grid
    point ``tt``. No gradient."""
    accept = (ratio <= 1.0) & active
    refused = ratio > 1.0  # inactive elements have ratio 0
    # safety < 1: a rejected step (ratio > 1) gets a factor below 1 without a cap
    factor = torch.clamp(ratio.clamp(min=1e-10).pow(-0.2) * safety, dmin, imax)
    arrive = accept & (h_eff >= room)
    h_next = h_eff * factor
    # a step clipped to a grid point does not shrink the next one
    h = torch.where(arrive, torch.maximum(h_next, h), h_next)
    t = torch.where(arrive, tt, torch.where(accept, t_end, t))
    return accept, refused, arrive, h, t, steps + active, rejected + refused


def _pure_step(rhs, t, y, h, k1, tt, active, steps, rejected, params, u, ctl):
    """One whole Dopri5 iteration (stages, error ratio, control, the accepted states) with the
    rhs called directly on explicit tensors: the function that ``torch.compile`` fuses. It has
    no closures over per-solve objects, so the compiled kernels serve every later solve with
    the same ``rhs``. ``ctl`` holds ``(rtol_e, atol_e, safety, dfactor, ifactor)`` as a tensor
    (Python floats would be compiled in as constants). Returns the new ``y, k1, h, t, steps,
    rejected``, the masks ``accept, refused, arrive`` and the host's three numbers."""

    room = tt - t
    h_eff = torch.minimum(h, room)
    coef = _dopri_coef(y.dtype, y.device)
    y5, err, k7, t_end = _dopri_stages(_direct_rhs(rhs, params, u), t, y, h_eff, k1, coef)
    with torch.no_grad():
        ratio, stats = _error_ratio(y.detach(), y5.detach(), err, h_eff, active, ctl[0], ctl[1])
        accept, refused, arrive, h, t, steps, rejected = _control(
            ratio, active, h_eff, room, h, t, tt, t_end, steps, rejected, ctl[2], ctl[3], ctl[4]
        )
    acc = accept.unsqueeze(-1)
    y = torch.where(acc, y5, y)
    k1 = torch.where(acc, k7, k1)
    return y, k1, h, t, steps, rejected, accept, refused, arrive, stats


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
    fused: FusedRhs | None = None,
):
    """Dopri5 with per-element control over a working set of unfinished elements.

    When fewer than ``compact_below`` of the working set is still integrating, the finished
    and failed elements are dropped from the working arrays, so a batch whose elements need
    very different numbers of steps costs about the sum of their steps, not the batch size
    times the largest.

    Outputs are not copied out as elements reach grid points: every state a grid point is
    reached in is kept (``hist``) with a record of which elements arrived (a mask) and at which
    points (their cursors); the records are resolved in batches (:data:`_FLUSH_EVERY`) into
    (element, point) keys and rows of ``cat(hist)``, and one gather at the end assembles the
    ``(B, T, S)`` outputs.

    Control state. Element ``g``'s next grid point is ``table[q]``, ``table`` the ``(B, P + 1)``
    grid with a last column of ``+inf``, flattened, and ``q = g (P + 1) + p`` its cursor (which
    is also the record key of point ``p``). A finished or failed element has its cursor at the
    ``+inf`` entry and a zero step size: its step is 0, it never arrives and it is not
    ``active``, so the per-step control needs no masks beyond ``active`` for acceptance and
    step counts.

    With ``fused``, each iteration runs as one compiled kernel (:func:`_pure_step`); the first
    stage after arrivals, the steps before the first accepted one (where ``y0`` may not
    require grad while ``k1`` does) and iterations with a failing element stay eager (``f``).
    Compiled kernels specialize on a batch of one, so the working set is never compacted to a
    single element (a finished element stays in it, stepping by 0).
    """
    assert safety < 1, "a rejected step's factor is below 1 only with safety < 1"
    b, s = y0.shape
    dev, dt = y0.device, y0.dtype
    limit = _limit(y0)
    points = sched.points
    num_points = points.shape[1]
    last_point = num_points - 1
    inf = float("inf")
    table = torch.cat([points, points.new_full((1, 1), inf).expand(points.shape[0], 1)], 1)
    table = table.expand(b, num_points + 1).reshape(-1)
    rows = torch.arange(b, device=dev)  # global ids of the working set
    full = True  # the working set is the whole batch (no indexing needed)
    q = rows * (num_points + 1)
    q_end = q + num_points  # the cursor past the last point (the +inf entry)
    tt = table.index_select(0, q)
    with torch.no_grad():
        pts = points.detach()
        # a strict grid: consecutive points far enough apart (beyond the round-off of
        # ``t + h``) that an element reaches at most one of them per step after the start
        gap = pts[:, 1:] - pts[:, :-1]
        room_ok = gap > 8 * torch.finfo(dt).eps * torch.maximum(pts[:, 1:].abs(), pts[:, :-1].abs())
        strict = bool(room_ok.all())
        # no step is "too small" (below 1e-13 max(|t|, 1)) while every active element's step
        # exceeds this bound (a rejection shrinks a step by at most dfactor), so the exact
        # test runs only when some step falls below it
        t_scale = max(1.0, float(pts.abs().max()), float(sched.t0.detach().abs().max()))
        tiny_screen = 2e-13 * t_scale / dfactor
    coef = _dopri_coef(dt, dev)
    # the error ratio sqrt(mean((err / scale)^2)) is ||err' / scale'|| with err' = err / e_1
    # (from the stages) and scale' = scale * sqrt(S) / e_1
    err_unit = s**0.5 / _E_LEAD
    rtol_e, atol_e = rtol * err_unit, atol * err_unit
    t = sched.t0.expand(b).clone()
    y = y0
    active = torch.ones(b, dtype=torch.bool, device=dev)
    status = torch.zeros(b, dtype=torch.long, device=dev)
    steps = torch.zeros(b, dtype=torch.long, device=dev)
    rejected = torch.zeros(b, dtype=torch.long, device=dev)
    out_status = torch.zeros(b, dtype=torch.long, device=dev)
    out_steps = torch.zeros(b, dtype=torch.long, device=dev)
    out_rejected = torch.zeros(b, dtype=torch.long, device=dev)
    hist: list[torch.Tensor] = []
    hist_rows = 0  # rows of hist so far (its states concatenated)
    # arrival records: flat (element, point) keys into a (B, P + 1) table and the rows of
    # cat(hist) they point to
    keys: list[torch.Tensor] = []
    places: list[torch.Tensor] = []
    # unresolved arrivals: (arrived mask, cursors) of the working set; their states are the
    # last len(pending) entries of hist, from row pending_row of cat(hist) on
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    pending_row = 0
    # the same for the elements' final states: element ids and rows of cat(hist)
    final_keys: list[torch.Tensor] = []
    final_places: list[torch.Tensor] = []

    def call(t, y, local_idx=None):
        if local_idx is None:
            return f(t, y, None if full else rows)
        return f(t, y, rows.index_select(0, local_idx))

    def stages(t, y, h, k1, local_idx=None):
        return _dopri_stages(lambda tt, yy, _i=None: call(tt, yy, local_idx), t, y, h, k1, coef)

    def keep_state(y):
        nonlocal hist_rows
        hist.append(y)
        hist_rows += y.shape[0]
        return hist_rows - y.shape[0]

    def flush():
        """Resolve the pending arrival records into keys and rows of cat(hist)."""
        if not pending:
            return
        masks, cursors = zip(*pending, strict=True)
        pending.clear()
        # the flat index record * width + element is the row after pending_row
        hit = torch.stack(masks).view(-1).nonzero().squeeze(1)
        keys.append(torch.stack(cursors).view(-1).index_select(0, hit))
        places.append(hit + pending_row)

    def advance(y, arrived):
        """Record the elements that ``arrived`` at their next grid point, apply their doses
        and move their cursors on."""
        nonlocal q, tt, active, pending_row
        if not pending:
            pending_row = hist_rows
        keep_state(y)
        pending.append((arrived, q))
        if sched.has_jumps:
            p = (q - (q_end - num_points)).clamp(max=last_point)
            y = sched.apply_jumps(y, arrived, p, None if full else rows)
        q = q + arrived
        tt = table.index_select(0, q)
        active = q < q_end
        if len(pending) >= _FLUSH_EVERY:
            flush()
        return y

    def arrivals(y, k1, arrived, once):
        """Process the arrivals (more than one pass where points coincide, unless ``once``);
        after doses or at an input breakpoint the first stage is evaluated again."""
        while True:
            y = advance(y, arrived)
            if once:
                break
            arrived = t >= tt
            if not bool(arrived.any()):
                break
        if sched.has_jumps or getattr(f, "piecewise", False):
            f.segment_start = t  # type: ignore[attr-defined]
            k1 = call(t, y)
        return y, k1

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
        q = torch.where(bad, q_end, q)
        tt = table.index_select(0, q)

    all_params = fused_params = step_kernel = None
    params_grad = False  # whether the params need a gradient (the working sets' do alike)
    if fused is not None:
        all_params = _fused_params(fused)
        y = y.clone() if y._base is not None else y
        fused_params = all_params
        step_kernel = _compiled(_pure_step)
        params_grad = _needs_grad(params=all_params)
    ctl = torch.tensor((rtol_e, atol_e, safety, dfactor, ifactor), dtype=dt, device=dev)
    n_active = b
    dirty = True  # active may have changed: count it, zero the step of inactive elements
    first = True
    it = 0  # loop iterations so far (no element has taken more steps)
    while True:
        arrived = t >= tt  # inactive elements wait for +inf
        if bool(arrived.any()):
            y, k1 = arrivals(y, k1, arrived, once=strict and not first)
            dirty = True
        first = False
        if dirty:
            count = int(active.sum())
            if count < n_active or it == 0:
                h = torch.where(active, h, torch.zeros((), dtype=dt, device=dev))
            n_active, dirty = count, False
        if n_active == 0:
            break
        width = rows.shape[0]
        if n_active < compact_below * width and width > 16:
            # record the leaving elements' last state, then shrink the working set
            flush()
            offset = keep_state(y)
            stay = active
            if fused is not None and n_active == 1:
                # keep one finished element too (see the docstring)
                stay = active.clone()
                stay[int((~active).nonzero()[0])] = True
            leaving = (~stay).nonzero().squeeze(1)
            g = rows.index_select(0, leaving)
            final_keys.append(g)
            final_places.append(leaving + offset)
            out_status[g], out_steps[g], out_rejected[g] = (
                status.index_select(0, leaving),
                steps.index_select(0, leaving),
                rejected.index_select(0, leaving),
            )
            keep = stay.nonzero().squeeze(1)
            rows = rows.index_select(0, keep)
            full = False
            t, y, h, q, q_end, k1, tt = (
                x.index_select(0, keep) for x in (t, y, h, q, q_end, k1, tt)
            )
            status, steps, rejected = (x.index_select(0, keep) for x in (status, steps, rejected))
            active = active.index_select(0, keep)
            if all_params is not None:
                fused_params = {k: v.index_select(0, rows) for k, v in all_params.items()}
        finite = diverged = None
        fused_ok = False
        # the kernel is compiled per pattern of requires_grad: before the first accepted step
        # y0 may not require grad where k1 (through the params) does; those steps run eagerly
        if step_kernel is not None and y.requires_grad == k1.requires_grad:
            assert fused is not None
            u = None if fused.inputs is None else fused.inputs(t, None if full else rows)
            with _grad_mode(params_grad or _needs_grad(t, y, h, k1, tt, u)):
                out = step_kernel(
                    fused.rhs, t, y, h, k1, tt, active, steps, rejected, fused_params, u, ctl
                )
            total, top, smallest = out[-1].tolist()
            # a failing step (see below) is done again by the eager path
            fused_ok = total - total == 0.0 and top <= limit
            if fused_ok:
                y, k1, h, t, steps, rejected, accept, refused, arrive, _ = out
        if not fused_ok:
            room = tt - t  # +inf for inactive elements, whose h is 0
            h_eff = torch.minimum(h, room)
            f.segment_start = t  # type: ignore[attr-defined]
            y5, err, k7, t_end = stages(t, y, h_eff, k1)
            with torch.no_grad():
                # one read: a non-finite ratio (a non-finite last stage makes the error
                # estimate non-finite, its weight is not 0, so the ratio and the new state
                # cover every stage), the largest magnitude of the new state, the smallest
                # active step
                ratio, stats = _error_ratio(y, y5, err, h_eff, active, rtol_e, atol_e)
                total, top, smallest = stats.tolist()
                all_finite = total - total == 0.0 and top <= limit
                if not all_finite:
                    finite = torch.isfinite(ratio) & _healthy(y5, limit)
                    all_finite = bool(finite.all())  # else a sum overflowed, no element did
                    # finite but beyond the limit: a smaller step will not help, stop it
                    diverged = active & torch.isfinite(y5).all(-1) & ~_healthy(y5, limit)
                    if all_finite:
                        finite = None
            if finite is not None:
                # run the step again without the failing elements, so that their values
                # leave no trace in the autograd graph
                idx = finite.nonzero().squeeze(1)
                f.segment_start = _take(t, idx)  # type: ignore[attr-defined]
                y5_s, _, k7_s, _ = stages(
                    _take(t, idx),
                    y.index_select(0, idx),
                    h_eff.index_select(0, idx),
                    k1.index_select(0, idx),
                    idx,
                )
                y5 = torch.index_copy(y.detach(), 0, idx, y5_s)
                k7 = torch.index_copy(k1.detach(), 0, idx, k7_s)
                # a failing active element is rejected (its factor becomes dfactor); an
                # inactive one keeps ratio 0 (it is never counted as rejected)
                fail = torch.where(active, inf, 0.0)
                ratio = torch.where(finite, ratio, fail)
            with torch.no_grad():
                accept, refused, arrive, h, t, steps, rejected = _control(
                    ratio,
                    active,
                    h_eff,
                    room,
                    h,
                    t,
                    tt,
                    t_end,
                    steps,
                    rejected,
                    safety,
                    dfactor,
                    ifactor,
                )
            acc = accept.unsqueeze(-1)
            y = torch.where(acc, y5, y)
            k1 = torch.where(acc, k7, k1)
        with torch.no_grad():
            stop = None
            if smallest <= tiny_screen or finite is not None:
                tiny = refused & (h <= 1e-13 * torch.clamp(t.abs(), min=1.0))
                if finite is not None:
                    code = torch.where(finite, int(Status.STEP_TOO_SMALL), int(Status.NONFINITE))
                    status = torch.where(tiny, code, status)
                else:
                    status = torch.where(tiny, int(Status.STEP_TOO_SMALL), status)
                stop = tiny
            if it + 1 >= max_steps:
                over = active & (steps >= max_steps) & ~arrive
                if stop is not None:
                    over = over & ~stop
                status = torch.where(over, int(Status.MAX_STEPS), status)
                stop = over if stop is None else stop | over
            if diverged is not None:
                status = torch.where(diverged, int(Status.NONFINITE), status)
                stop = diverged if stop is None else stop | diverged
            if stop is not None:
                # stopped elements: cursor at the +inf entry, step 0 (see the docstring)
                active = active & ~stop
                q = torch.where(stop, q_end, q)
                tt = table.index_select(0, q)
                h = torch.where(stop, torch.zeros((), dtype=dt, device=dev), h)
                dirty = True
        it += 1

    flush()
    offset = keep_state(y)
    final_keys.append(rows)
    final_places.append(torch.arange(rows.shape[0], device=dev) + offset)
    out_status[rows], out_steps[rows], out_rejected[rows] = status, steps, rejected
    # resolve the records: where each element's grid points (or, for points it never reached,
    # its final state) sit in cat(hist)
    point_place = torch.full((b * (num_points + 1),), -1, dtype=torch.long, device=dev)
    if keys:
        point_place.index_copy_(0, torch.cat(keys), torch.cat(places))
    final_place = torch.empty(b, dtype=torch.long, device=dev)
    final_place.index_copy_(0, torch.cat(final_keys), torch.cat(final_places))
    point_place = point_place.view(b, num_points + 1)[:, :num_points]
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
