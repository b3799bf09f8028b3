"""Solver choices as small validated objects (diffrax style), and their short names."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RK4", "Dopri5", "Euler", "Heun", "Solver", "get_solver"]


def _positive_int(owner: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}({name}={value!r}): must be a positive int")


def _positive_float(owner: str, name: str, value: object) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}({name}={value!r}): must be a positive finite number")


def _boolean(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}({name}={value!r}): must be True or False")


class Solver:
    """Base class of the solvers; ``method`` names the integration rule."""

    method: str = ""


@dataclass(frozen=True)
class _Fixed(Solver):
    """A fixed-step rule with ``substeps`` equal steps between consecutive grid points.

    ``compile=True`` runs the ``substeps`` steps of each interval (the rhs included) as one
    kernel made by ``torch.compile`` (see :class:`Dopri5`'s ``compile``): compiled on the
    first solve, then reused for any batch size with the same rhs. Inputs must be
    :class:`~pyro_hds.PiecewiseConstant`. Its gradient with respect to the params and ``y0``
    is the discrete adjoint of the computed trajectory (the gradient that backpropagating
    through the steps gives, to round-off): the forward pass keeps only the states at the
    grid points, and the backward pass runs one compiled vector-Jacobian kernel per interval.
    Without doses, the whole solve is one kernel forward (a ``scan`` over the intervals) and
    one backward (its reverse loop), which saves each interval's call overhead; a solve in
    which some element fails goes back to one kernel call per interval to isolate it.
    It is differentiable once (a ``create_graph`` backward raises). Gradients for the times,
    doses or inputs, or for tensors the rhs closes over (a network's weights), backpropagate
    through the kernels instead."""

    substeps: int = 1
    compile: bool = False

    def __post_init__(self) -> None:
        _positive_int(type(self).__name__, "substeps", self.substeps)
        _boolean(type(self).__name__, "compile", self.compile)


@dataclass(frozen=True)
class Euler(_Fixed):
    """Forward Euler (order 1) with ``substeps`` equal steps between consecutive times."""

    method = "euler"


@dataclass(frozen=True)
class Heun(_Fixed):
    """Heun's method, the "modified Euler" of vi-hds (order 2): an Euler predictor and a
    trapezoidal corrector, :math:`y_{n+1} = y_n + \\frac h2 (f(t_n, y_n) + f(t_{n+1}, y_n + h
    f(t_n, y_n)))`."""

    method = "heun"


@dataclass(frozen=True)
class RK4(_Fixed):
    """The classical 4th-order Runge-Kutta method with ``substeps`` steps between times."""

    method = "rk4"


@dataclass(frozen=True)
class Dopri5(Solver):
    """Adaptive Dormand-Prince 5(4) with per-element step-size control.

    :param rtol, atol: relative and absolute tolerances of each element's local error.
    :param max_steps: steps (accepted and rejected) an element may take before it is stopped
        with status MAX_STEPS.
    :param safety, ifactor, dfactor: step-size controller: the next step is
        ``h * clamp(safety * err**-0.2, dfactor, ifactor)``.
    :param first_step: the initial step (default: a heuristic from the state and its slope).
    :param compile: fuse each step (the six stage evaluations of the rhs, the stage
        combinations, the error estimate and the step control) into one kernel with
        ``torch.compile`` (inductor; on CPU it needs a C++ compiler). The first solve
        compiles, forward and backward separately (seconds to tens of seconds; later solves
        reuse the kernels for any batch size), then each step costs one call instead of
        about a hundred small operations, which is what limits speed below about 1e4
        systems. Use it for long runs (training, repeated solves) with an rhs defined once
        (a module-level function: a new function object per solve compiles again). Inputs
        must be :class:`~pyro_hds.PiecewiseConstant` (a callable ``u(t)`` is refused).
        Results agree with ``compile=False`` to round-off.
    """

    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: int = 10_000
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    first_step: float | None = None
    compile: bool = False
    method = "dopri5"

    def __post_init__(self) -> None:
        for name in ("rtol", "atol", "safety", "ifactor", "dfactor"):
            _positive_float("Dopri5", name, getattr(self, name))
        _positive_int("Dopri5", "max_steps", self.max_steps)
        if not self.dfactor < 1 < self.ifactor:
            raise ValueError("Dopri5: need dfactor < 1 < ifactor")
        if self.safety >= 1:
            raise ValueError(f"Dopri5(safety={self.safety}): must be below 1")
        if self.first_step is not None:
            _positive_float("Dopri5", "first_step", self.first_step)
        _boolean("Dopri5", "compile", self.compile)


_NAMES: dict[str, type[Solver]] = {"euler": Euler, "heun": Heun, "rk4": RK4, "dopri5": Dopri5}


def get_solver(solver: str | Solver) -> Solver:
    """A solver object from itself or its short name ("euler", "heun", "rk4", "dopri5")."""
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str) and solver.lower() in _NAMES:
        return _NAMES[solver.lower()]()
    raise ValueError(
        f"unknown solver {solver!r}; use one of {sorted(_NAMES)} or a solver object such as "
        "pyro_hds.RK4(substeps=4) or pyro_hds.Dopri5(rtol=1e-5)"
    )
