"""Tutorial 2: solving batches of ODEs with pyro_hds.

``pyro_hds.solve`` integrates one ODE per element of a batch (particles x individuals) at
once; ``pyro_hds.ode`` does the same inside a Pyro model and records the trajectory as a site.
This script compares the solvers on an exact solution, shows per-individual step control, doses
and inputs, and what happens when one element diverges.

Run: ``python tutorials/02_ode_solvers.py``
"""

# %%
import math
import time

import torch

import pyro_hds
from pyro_hds.data import Doses

torch.set_default_dtype(torch.float64)


def logistic(t, y, p):  # y: (B, 1); p["r"], p["K"]: (B,)
    return p["r"][..., None] * y * (1 - y / p["K"][..., None])


# %% Four solvers against the exact logistic curve, 3 individuals x 2 particles
r = torch.tensor([[0.5, 1.0, 2.0]]).expand(2, 3)  # (particles, individuals)
K = torch.tensor([1.0, 2.0, 3.0])  # (individuals,) broadcasts against (2, 3)
times = torch.linspace(0.0, 5.0, 11)
exact = K[:, None] / (1 + (K[:, None] / 0.1 - 1) * torch.exp(-r[..., None] * times))
for solver in [
    pyro_hds.Euler(substeps=20),
    pyro_hds.Heun(substeps=10),
    pyro_hds.RK4(),
    pyro_hds.Dopri5(rtol=1e-8),
]:
    sol = pyro_hds.solve(logistic, torch.tensor([0.1]), times, {"r": r, "K": K}, solver=solver)
    err = (sol.ys[..., 0] - exact).abs().max()
    print(f"{type(solver).__name__:7s} shape {tuple(sol.ys.shape)}  max error {float(err):.2e}")

# %% Per-individual step control: a fast individual does not slow the others down
sol = pyro_hds.solve(
    logistic, torch.tensor([0.1]), times, {"r": torch.tensor([0.5, 50.0]), "K": torch.tensor(1.0)}
)
print("Dopri5 steps per individual:", sol.num_steps.tolist())


# %% Doses: a one-compartment model given 100 units at t = 0 and t = 6
def elimination(t, y, p):
    return -p["k"][..., None] * y


doses = Doses(torch.tensor([[0.0, 6.0]]), torch.tensor([[100.0, 100.0]]), torch.tensor([[0, 0]]))
sol = pyro_hds.solve(
    elimination,
    torch.zeros(1),
    torch.arange(1.0, 13.0),
    {"k": torch.tensor([0.3])},
    t0=0.0,
    doses=doses,
    solver="rk4",
)
print("amount after two doses:", sol.ys[0, :, 0].round(decimals=1).tolist())

# %% Piecewise-constant inputs: an inducer switched on at t = 2 and off at t = 4
inducer = pyro_hds.PiecewiseConstant(torch.tensor([2.0, 4.0]), torch.tensor([[0.0], [1.0], [0.0]]))


def production(t, y, p, u):
    return u - 0.5 * y


sol = pyro_hds.solve(production, torch.zeros(1), times, t0=0.0, inputs=inducer)
print("expression:", sol.ys[:, 0].round(decimals=3).tolist())

# %% One diverging element is reported, and does not contaminate the others
sol = pyro_hds.solve(
    lambda t, y, p: p["a"][..., None] * y**2,
    torch.ones(1),
    torch.linspace(0, 1, 5),
    {"a": torch.tensor([0.2, 3.0])},
    solver="rk4",
)
print("status:", [pyro_hds.Status(int(s)).name for s in sol.status])
print("\n".join(sol.messages()))

# %% Compiled steps for long runs. Below about 1e4 systems a solve is many small operations;
# Dopri5(compile=True) fuses each step (the rhs included) into one kernel with torch.compile.
# The first solve compiles (seconds); later solves, of any batch size, reuse the kernel.
rates = torch.exp(torch.linspace(0.0, math.log(100.0), 200))  # time scales 100-fold apart
problem = (logistic, torch.tensor([0.1]), times, {"r": rates, "K": torch.tensor(2.0)})
results = {}
for label, compiled in [("eager", False), ("compiled, first call", True), ("compiled", True)]:
    start = time.perf_counter()
    with torch.no_grad():
        sol = pyro_hds.solve(*problem, solver=pyro_hds.Dopri5(rtol=1e-7, compile=compiled))
    results[label] = sol.ys
    print(f"{label:21s} {time.perf_counter() - start:6.2f} s")
diff = (results["compiled"] - results["eager"]).abs().max()
print(f"largest difference compiled vs eager: {float(diff):.1e}")
