"""Batched ODE solvers: fixed-step Euler, Heun and RK4, and adaptive Dopri5 with per-element
step control, over per-element schedules of observation times, doses and input changes."""

from pyro_hds.solvers._base import Solution, Status
from pyro_hds.solvers._solvers import RK4, Dopri5, Euler, Heun, Solver, get_solver
from pyro_hds.solvers.inputs import PiecewiseConstant

__all__ = [
    "RK4",
    "Dopri5",
    "Euler",
    "Heun",
    "PiecewiseConstant",
    "Solution",
    "Solver",
    "Status",
    "get_solver",
]
