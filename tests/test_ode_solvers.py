"""Solvers and ode() against exact solutions, convergence orders and gradient checks (float64)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_hds
from pyro_hds.data import Doses
from pyro_hds.models import pk_oral
from pyro_hds.ode import solve
from pyro_hds.solvers import RK4, Dopri5, Euler, Heun, PiecewiseConstant, Status, get_solver


def decay(t, y, p):
    return -p["k"].unsqueeze(-1) * y


def logistic(t, y, p):
    return p["r"].unsqueeze(-1) * y * (1 - y / p["K"].unsqueeze(-1))


def oscillator(t, y, p):
    w = p["w"]
    return torch.stack([y[..., 1], -(w**2) * y[..., 0]], -1)


def logistic_exact(t, y0, r, K):
    return K / (1 + (K / y0 - 1) * torch.exp(-r * t))


TS = torch.linspace(0.0, 3.0, 7)


@pytest.mark.parametrize(
    "solver, tol",
    [
        (Euler(substeps=2000), 2e-3),
        (Heun(substeps=200), 1e-5),
        (RK4(substeps=50), 1e-8),
        (Dopri5(rtol=1e-9, atol=1e-12), 1e-8),
    ],
    ids=["euler", "heun", "rk4", "dopri5"],
)
def test_exact_solutions(solver, tol):
    # error bounds: Euler O(h) with h = 1.5e-3, Heun O(h^2) with h = 2.5e-3, RK4 O(h^4) with
    # h = 1e-2, Dopri5 a small multiple of its tolerance (all with O(1) constants here)
    k = torch.tensor([0.3, 1.0, 2.0])
    sol = solve(decay, torch.ones(1), TS, {"k": k}, solver=solver)
    torch.testing.assert_close(sol.ys[..., 0], torch.exp(-k[:, None] * TS), atol=tol, rtol=0)
    r, K = torch.tensor([1.0, 2.5]), torch.tensor([1.0, 3.0])
    sol = solve(logistic, torch.full((1,), 0.1), TS, {"r": r, "K": K}, solver=solver)
    exact = logistic_exact(TS, 0.1, r[:, None], K[:, None])
    torch.testing.assert_close(sol.ys[..., 0], exact, atol=tol * 3, rtol=0)
    w = torch.tensor([1.0, 2.0])
    sol = solve(oscillator, torch.tensor([1.0, 0.0]), TS, {"w": w}, solver=solver)
    torch.testing.assert_close(sol.ys[..., 0], torch.cos(w[:, None] * TS), atol=tol * 5, rtol=0)
    assert torch.all(sol.status == Status.SUCCESS)


@pytest.mark.parametrize(
    "solver", [RK4(substeps=200), Dopri5(rtol=1e-10, atol=1e-12)], ids=["rk4", "dopri5"]
)
def test_pk_with_repeated_doses_matches_closed_form(solver):
    data, truth = pk_oral.simulate(per_group=3, seed=1)
    params = {"ka": truth["ka"], "cl": truth["cl"], "v": truth["v"]}
    sol = solve(
        pk_oral.rhs, torch.zeros(2), data.times, params, solver=solver, t0=0.0, doses=data.doses
    )
    conc = sol.ys[..., 1] / truth["v"][:, None]
    exact = pk_oral.concentration(
        data.times,
        truth["ka"][:, None],
        truth["cl"][:, None],
        truth["v"][:, None],
        pk_oral.DOSE_TIMES,
        [pk_oral.DOSE_AMOUNT] * 2,
    )
    torch.testing.assert_close(conc, exact, atol=1e-6, rtol=0)
    # an observation at a dose time is the pre-dose value: gut amount just before t = 12
    t = torch.tensor([12.0, 12.5])
    sol = solve(pk_oral.rhs, torch.zeros(2), t, params, solver=solver, t0=0.0, doses=data.doses)
    gut_before = pk_oral.DOSE_AMOUNT * torch.exp(-truth["ka"] * 12.0)
    torch.testing.assert_close(sol.ys[:, 0, 0], gut_before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_convergence_order(method, order):
    # global error at t = 2 of the harmonic oscillator (Euclidean norm of the state error, so
    # that no single component's error crosses zero) under step halving
    w = torch.tensor([1.7])
    exact = torch.stack([torch.cos(2.0 * w), -w * torch.sin(2.0 * w)], -1)[0]
    errors, hs = [], []
    for n in (16, 32, 64, 128):
        s = type(get_solver(method))(substeps=n)
        sol = solve(
            oscillator, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), {"w": w}, solver=s
        )
        errors.append(float((sol.ys[0, -1] - exact).norm()))
        hs.append(2.0 / n)
    slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.2, (slope, errors)


@pytest.mark.parametrize("rtol", [1e-4, 1e-6, 1e-8])
def test_dopri5_meets_its_tolerance(rtol):
    # global error of an adaptive method is a modest multiple of its local tolerance
    w = torch.tensor([0.5, 1.0, 3.0])
    sol = solve(
        oscillator,
        torch.tensor([1.0, 0.0]),
        TS,
        {"w": w},
        solver=Dopri5(rtol=rtol, atol=rtol * 1e-2),
    )
    err = (sol.ys[..., 0] - torch.cos(w[:, None] * TS)).abs().max()
    assert err < 50 * rtol


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4", Dopri5(rtol=1e-7, atol=1e-9)])
def test_gradcheck(solver):
    ts = torch.tensor([0.0, 0.4, 1.0])

    def f(k, y0):
        return solve(logistic, y0, ts, {"r": k, "K": torch.tensor(2.0)}, solver=solver).ys

    k = torch.tensor([0.7, 1.4], requires_grad=True)
    y0 = torch.tensor([0.3], requires_grad=True)
    if isinstance(solver, Dopri5):
        # step-size selection is piecewise constant in the parameters; differentiate through
        # the accepted steps at fixed step sizes: check against finite differences of a solve
        # with tight tolerance instead of the discrete derivative
        y = f(k, y0)
        (g,) = torch.autograd.grad(y.sum(), k)
        eps = 1e-6
        fd = []
        for i in range(2):
            dk = torch.zeros(2)
            dk[i] = eps
            with torch.no_grad():
                fd.append(float((f(k + dk, y0).sum() - f(k - dk, y0).sum()) / (2 * eps)))
        torch.testing.assert_close(g, torch.tensor(fd), atol=1e-5, rtol=1e-4)
    else:
        assert torch.autograd.gradcheck(f, (k, y0))


@pytest.mark.parametrize("solver", [RK4(substeps=40), Dopri5(rtol=1e-8, atol=1e-10)])
def test_adjoint_agrees_with_backprop(solver):
    w = torch.tensor([0.8, 1.5], requires_grad=True)
    y0 = torch.tensor([1.0, 0.2], requires_grad=True)
    ts = torch.linspace(0.5, 3.0, 6)
    grads = []
    for adjoint in (False, True):
        ys = solve(oscillator, y0, ts, {"w": w}, solver=solver, t0=0.0, adjoint=adjoint).ys
        grads.append(torch.autograd.grad((ys**2).sum(), (w, y0)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="shared time grid"):
        solve(oscillator, y0, ts.expand(2, 6), {"w": w}, adjoint=True)


def test_per_individual_step_control():
    # one element 100x stiffer than the other: the slow one takes exactly the steps it takes
    # alone (torchdiffeq's shared norm would make it follow the fast one)
    solver = Dopri5(rtol=1e-6, atol=1e-9)
    ts = torch.linspace(0.0, 5.0, 4)
    both = solve(decay, torch.ones(1), ts, {"k": torch.tensor([0.5, 50.0])}, solver=solver)
    alone = solve(decay, torch.ones(1), ts, {"k": torch.tensor([0.5])}, solver=solver)
    assert int(both.num_steps[0]) == int(alone.num_steps[0])
    assert int(both.num_steps[1]) > 2 * int(both.num_steps[0])
    torch.testing.assert_close(both.ys[0], alone.ys[0], rtol=0, atol=0)


def test_shapes_particles_by_individuals_and_ragged_grids():
    k_particles = torch.rand(5, 1) + 0.5  # (K, 1) global per particle
    scale = torch.rand(3) + 0.5  # (N,) per individual
    times = torch.tensor([[0.0, 1.0, 2.0, 2.0], [0.0, 0.5, 1.0, 3.0], [0.0, 2.0, 2.0, 2.0]])
    for solver in (RK4(substeps=20), Dopri5()):
        sol = solve(decay, torch.ones(1), times, {"k": k_particles * scale}, solver=solver)
        assert sol.ys.shape == (5, 3, 4, 1)
        assert sol.status.shape == (5, 3)
        exact = torch.exp(-(k_particles * scale)[..., None] * times)
        tol = 1e-5
        torch.testing.assert_close(sol.ys[..., 0], exact, atol=tol, rtol=0)
    # vector-valued params with event dims
    z = torch.rand(5, 3, 2)

    def rhs(t, y, p):
        return -(p["z"].sum(-1, keepdim=True)) * y

    sol = solve(rhs, torch.ones(1), times, {"z": z}, event_dims={"z": 1}, solver="rk4")
    assert sol.ys.shape == (5, 3, 4, 1)


def test_piecewise_constant_input_and_callable_input():
    # dy/dt = u(t): u = 1 on [0, 1), 3 on [1, 2), 0 after -> y(t) exactly piecewise linear
    inputs = PiecewiseConstant(torch.tensor([1.0, 2.0]), torch.tensor([[1.0], [3.0], [0.0]]))
    ts = torch.tensor([0.5, 1.0, 1.5, 2.5])

    def rhs(t, y, p, u):
        return u.expand(y.shape)

    for solver in ("euler", "dopri5"):
        sol = solve(rhs, torch.zeros(1), ts, solver=solver, t0=0.0, inputs=inputs)
        torch.testing.assert_close(sol.ys[..., 0], torch.tensor([0.5, 1.0, 2.5, 4.0]))
    sol = solve(
        rhs,
        torch.zeros(1),
        ts,
        solver=Dopri5(rtol=1e-9, atol=1e-12),
        t0=0.0,
        inputs=lambda t: torch.cos(t).unsqueeze(-1),
    )
    torch.testing.assert_close(sol.ys[..., 0], torch.sin(ts), atol=1e-7, rtol=0)


@pytest.mark.parametrize("solver", [RK4(substeps=50), Dopri5()], ids=["rk4", "dopri5"])
def test_failure_is_isolated_in_values_and_gradients(solver):
    # dy/dt = a y^2 blows up at t = 1 / (a y0) for a > 0: element 1 (a = 2) fails before t = 1
    shared = torch.tensor(0.3, requires_grad=True)
    a = torch.tensor([0.2, 2.0, -0.5])

    def rhs(t, y, p):
        return p["a"].unsqueeze(-1) * y**2 + shared * 0.0 * y + shared * y * 0.1

    ts = torch.linspace(0.0, 1.0, 5)
    sol = solve(rhs, torch.ones(1), ts, {"a": a}, solver=solver)
    # RK4 overflows past the singularity; Dopri5's steps shrink toward it until they underflow
    assert sol.status.tolist()[1] in (Status.NONFINITE, Status.STEP_TOO_SMALL)
    assert sol.status.tolist()[0] == Status.SUCCESS and sol.status.tolist()[2] == Status.SUCCESS
    assert torch.isfinite(sol.ys).all()
    assert torch.isnan(sol.ys_or_nan[1, -1]).all() and torch.isfinite(sol.ys_or_nan[0]).all()
    loss = sol.ys[[0, 2]].sum()
    (g,) = torch.autograd.grad(loss, shared)
    ok = solve(rhs, torch.ones(1), ts, {"a": a[[0, 2]]}, solver=solver)
    (g_ref,) = torch.autograd.grad(ok.ys.sum(), shared)
    assert torch.isfinite(g)
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(sol.ys[[0, 2]], ok.ys)


def test_without_gradients_failed_elements_step_with_the_others(monkeypatch):
    # dy/dt = a y^2 blows up at t = 1 / a: element 1 within the first interval, element 2 at
    # t = 2, elements 0 and 3 never. Without gradients the intervals after a
    # failure step every element (the failed ones get their frozen state back) instead of
    # the checked steps on the others: the checked steps run only in the two intervals where
    # an element fails, and every value is that of the checked path (with gradients)
    from pyro_hds.solvers import _integrate

    calls = []
    subset_step = _integrate._subset_step

    def counting(*args):
        calls.append(1)
        return subset_step(*args)

    monkeypatch.setattr(_integrate, "_subset_step", counting)
    a = torch.tensor([0.2, 2.5, 0.5, -0.5], dtype=torch.float64)
    ts = torch.linspace(0.5, 3.0, 6, dtype=torch.float64)

    def rhs(t, y, p):
        return p["a"].unsqueeze(-1) * y**2

    substeps = 10
    y0 = torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        fast = solve(rhs, y0, ts, {"a": a}, solver=RK4(substeps=substeps), t0=0.0)
    # a failing interval: the failing step of every substep's checks, then a step of the
    # others; the substeps after it step the others alone
    assert 0 < len(calls) <= 2 * (substeps + 1)
    checked = solve(
        rhs, y0, ts, {"a": a.clone().requires_grad_()}, solver=RK4(substeps=substeps), t0=0.0
    )
    assert len(calls) > 4 * substeps  # with gradients, every interval after the first failure
    assert fast.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.NONFINITE, 0]
    assert fast.reached.tolist() == checked.reached.tolist()
    # RK4 trails the blow-up: element 2 overflows in the interval after t = 2
    assert fast.reached[2].tolist() == [True, True, True, True, False, False]
    torch.testing.assert_close(fast.ys, checked.ys.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "solver", [Euler(substeps=7), RK4(substeps=3), Dopri5()], ids=["euler", "rk4", "dopri5"]
)
def test_nan_from_the_rhs_is_isolated(solver):
    # element 1's rhs turns NaN after t = 0.4 (sqrt of a negative number), in the middle of a
    # grid interval: the solver must drop it there and leave the others bit-for-bit alone
    k = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    cut = torch.tensor([math.inf, 0.4, math.inf])

    def rhs(t, y, p):
        return -p["k"].unsqueeze(-1) * y * torch.sqrt(p["cut"] - t).clamp(max=1.0).unsqueeze(-1)

    ts = torch.linspace(0.0, 1.0, 3)
    sol = solve(rhs, torch.ones(1), ts, {"k": k, "cut": cut}, solver=solver)
    assert sol.status.tolist()[0] == Status.SUCCESS and sol.status.tolist()[2] == Status.SUCCESS
    assert sol.status.tolist()[1] != Status.SUCCESS
    assert sol.reached[1].tolist() == [True, False, False]
    assert torch.isfinite(sol.ys).all()
    ok = solve(rhs, torch.ones(1), ts, {"k": k[[0, 2]], "cut": cut[[0, 2]]}, solver=solver)
    torch.testing.assert_close(sol.ys[[0, 2]], ok.ys, rtol=0, atol=0)
    (g,) = torch.autograd.grad(sol.ys[[0, 2]].sum(), k)
    (g_ref,) = torch.autograd.grad(ok.ys.sum(), k)
    assert g[1] == 0 and torch.isfinite(g).all()
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-15)  # summation order only


def test_dopri5_max_steps_is_per_element():
    ts = torch.tensor([0.0, 10.0])
    sol = solve(
        decay, torch.ones(1), ts, {"k": torch.tensor([0.1, 1000.0])}, solver=Dopri5(max_steps=40)
    )
    assert sol.status.tolist() == [Status.SUCCESS, Status.MAX_STEPS]
    assert "max_steps" in " ".join(sol.messages())


def test_dopri5_batch_matches_elements_solved_alone():
    # the batch bookkeeping (working-set compaction as elements finish, grid cursors, arrival
    # records, stopped elements) must not change any element's result: 40 decays with
    # per-element grids (a repeated time in each) and rates spanning 1e4, one element NaN
    # after t = 0.3 and one out of steps, against the same elements solved one at a time
    n = 40
    gen = torch.Generator().manual_seed(0)
    k = torch.exp(torch.rand(n, generator=gen, dtype=torch.float64) * math.log(1e4))
    cut = torch.full((n,), math.inf, dtype=torch.float64)
    cut[7] = 0.3
    ts = torch.sort(torch.rand(n, 6, generator=gen, dtype=torch.float64) * 2, 1).values
    ts[:, 3] = ts[:, 2]

    def rhs(t, y, p):
        return -p["k"].unsqueeze(-1) * y * torch.sqrt(p["cut"] - t).clamp(max=1.0).unsqueeze(-1)

    solver = Dopri5(rtol=1e-7, atol=1e-9, max_steps=300)
    y0 = torch.ones(1, dtype=torch.float64)
    sol = solve(rhs, y0, ts, {"k": k, "cut": cut}, solver=solver, t0=0.0)
    assert sol.status[7] == Status.NONFINITE
    assert (sol.status == Status.MAX_STEPS).any()
    for i in range(n):
        one = solve(
            rhs,
            y0,
            ts[i : i + 1],
            {"k": k[i : i + 1], "cut": cut[i : i + 1]},
            solver=solver,
            t0=0.0,
        )
        assert one.status[0] == sol.status[i]
        # alone and in a batch the arithmetic may differ in rounding (vectorized kernels)
        assert abs(int(one.num_steps[0]) - int(sol.num_steps[i])) <= 2
        torch.testing.assert_close(one.ys[0], sol.ys[i], rtol=1e-8, atol=1e-15)
        assert torch.equal(one.reached[0], sol.reached[i])


def test_validation_messages():
    with pytest.raises(ValueError, match="unknown solver 'rk5'"):
        solve(decay, torch.ones(1), TS, {"k": torch.ones(2)}, solver="rk5")
    with pytest.raises(ValueError, match=r"RK4\(substeps=0\)"):
        RK4(substeps=0)
    with pytest.raises(ValueError, match="do not broadcast"):
        solve(decay, torch.ones(3, 1), TS, {"k": torch.ones(2)}, name="x")
    with pytest.raises(ValueError, match=r"not sorted for element \(1,\): 0.5 after 2.0"):
        solve(
            decay,
            torch.ones(1),
            torch.tensor([[0.0, 1.0, 2.0], [0.0, 2.0, 0.5]]),
            {"k": torch.ones(2)},
        )
    with pytest.raises(ValueError, match="floating-point"):
        solve(decay, torch.ones(1, dtype=torch.long), TS, {"k": torch.ones(2)})
    with pytest.raises(ValueError, match="rhs returned"):
        solve(lambda t, y, p: y[..., :0], torch.ones(2), TS)
    with pytest.raises(ValueError, match="before t0"):
        solve(decay, torch.ones(1), TS, {"k": torch.ones(1)}, t0=1.0)
    doses = Doses(torch.tensor([[0.5]]), torch.tensor([[1.0]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"dose at t = 0\.5 before t0 = 1\.0"):
        solve(decay, torch.ones(1), TS + 1, {"k": torch.ones(1)}, t0=1.0, doses=doses)


def test_site_is_visible_to_trace_and_predictive():
    ts = torch.linspace(0, 1, 4)

    def model():
        k = pyro.sample("k", dist.LogNormal(0.0, 0.3).expand([3]).to_event(1))
        x = pyro_hds.ode("x", decay, torch.ones(1), ts, {"k": k}, solver="rk4")
        pyro.sample("y", dist.Normal(x, 0.1).to_event(3))
        return x

    tr = pyro.poutine.trace(model).get_trace()
    site = tr.nodes["x"]
    assert site["infer"]["ode_status"].shape == (3,)
    assert site["value"].shape == (3, 4, 1)
    pred = pyro.infer.Predictive(model, num_samples=6, return_sites=["x", "k"])()
    assert pred["x"].shape == (6, 3, 4, 1)
    torch.testing.assert_close(
        pred["x"][..., 0], torch.exp(-pred["k"][..., None] * ts), atol=1e-3, rtol=0
    )
    assert not math.isnan(float(pred["x"].sum()))


@pytest.mark.parametrize("solver", [RK4(substeps=20), Dopri5()], ids=["rk4", "dopri5"])
def test_a_state_beyond_the_square_root_of_the_largest_float_counts_as_failed(solver):
    # in float32, e^50 = 5e21 is finite but its square is not: a Gaussian likelihood of it, or
    # the backward pass of a division by it, would give inf or 0 * inf
    k = torch.tensor([0.1, 1.0], dtype=torch.float32, requires_grad=True)
    ts = torch.linspace(0.0, 50.0, 6, dtype=torch.float32)
    sol = solve(
        lambda t, y, p: p["k"].unsqueeze(-1) * y,
        torch.ones(1, dtype=torch.float32),
        ts,
        {"k": k},
        solver=solver,
    )
    assert sol.status.tolist() == [Status.SUCCESS, Status.NONFINITE]
    assert float(sol.ys.detach().abs().max()) <= torch.finfo(torch.float32).max ** 0.5
    (g,) = torch.autograd.grad((sol.ys / sol.ys.square().sum()).sum(), k)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("solver", ["euler", "heun", RK4(substeps=3), Dopri5()])
def test_state_major_rhs_gets_a_state_major_state_and_the_same_solution(solver):
    # the fixed-step solvers keep their state state-major ((B, S) views of (S, B) tensors)
    # whatever the rhs returns, so the rhs reads contiguous states and the stages vectorize
    # over the batch; Dopri5 keeps the layout the rhs returns (elementwise ops follow their
    # operands' layout). The trajectory is stacked without transposing, and the numbers are
    # those of the same rhs returning a row-major stack
    seen: list[tuple[int, ...]] = []

    def osc(t, y, p, layout):
        seen.append(y.stride())
        pos, vel = y.movedim(-1, 0).unbind(0)
        terms = [vel, -(p["w"] ** 2) * pos]
        return torch.stack(terms, 0).movedim(0, -1) if layout == "state" else torch.stack(terms, -1)

    w = torch.linspace(0.5, 2.0, 6, dtype=torch.float64).requires_grad_()
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    out = {}
    for layout in ("row", "state"):
        seen.clear()
        sol = solve(functools.partial(osc, layout=layout), y0, TS, {"w": w}, solver=solver)
        (grad,) = torch.autograd.grad(sol.ys.square().sum(), w)
        out[layout] = (sol.ys.detach(), grad)
        if layout == "state" or not isinstance(solver, Dopri5):
            assert seen[-1] == (1, 6)  # each state's values contiguous
        else:
            assert seen[-1] == (2, 1)
    torch.testing.assert_close(out["state"][0], out["row"][0], rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(out["state"][1], out["row"][1], rtol=1e-12, atol=1e-13)
    if isinstance(solver, Dopri5):  # and it is the right solution (tolerance 1e-6 rtol)
        exact = torch.cos(w.detach()[:, None] * TS)
        torch.testing.assert_close(out["state"][0][..., 0], exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("fail", [False, True], ids=["healthy", "one_fails"])
def test_fixed_step_state_stays_state_major_through_doses(grad, fail):
    # a row-major y0 and row-major dose jumps: every stage the rhs sees is still state-major
    # (a row-major state would make each elementwise op several times slower), through the
    # checked steps that drop a failing element too, and the solution is that of the closed
    # form (two doses into the gut, at 0 and 12)
    seen: set[tuple[int, ...]] = set()

    def rhs(t, y, p):
        seen.add(y.stride())
        return pk_oral.rhs(t, y, p)

    doses = Doses(
        times=torch.tensor([[0.0, 12.0]]).expand(5, 2),
        amounts=torch.full((5, 2), 100.0),
        targets=torch.zeros(5, 2, dtype=torch.long),
    )
    times = torch.tensor([0.5, 1.0, 4.0, 12.0, 13.0, 20.0], dtype=torch.float64)
    ka = torch.linspace(0.6, 1.6, 5, dtype=torch.float64)
    if fail:  # the gut of element 0 grows as exp(400 t): past the overflow limit before t = 1
        ka[0] = -400.0
    ka.requires_grad_(grad)
    cl, v = torch.full_like(ka, 3.0), torch.full_like(ka, 20.0)
    y0 = torch.zeros(5, 2, dtype=torch.float64)
    assert y0.stride() == (2, 1)
    with torch.set_grad_enabled(grad):
        sol = solve(
            rhs,
            y0,
            times,
            {"ka": ka, "cl": cl, "v": v},
            solver=RK4(substeps=200),
            t0=0.0,
            doses=doses,
        )
    assert seen == ({(1, 5), (1, 4)} if fail else {(1, 5)})  # (1, 4): the 4 left after a failure
    ok = slice(1, None) if fail else slice(None)
    assert (sol.status[ok] == Status.SUCCESS).all() and (sol.status[0] != 0) == fail
    exact = pk_oral.concentration(
        times, ka.detach()[:, None], cl[:, None], v[:, None], (0.0, 12.0), (100.0, 100.0)
    )
    # each mode's RK4 factor per step differs from exp(-x) by about x^5 / 120 with x = h k
    # <= 0.04 * 1.6 = 0.064: under 1e-8 per step, about 1.2e-5 relative over the 1200 steps;
    # the concentration, a difference of two such modes, amplifies that by at most about 5
    # on this grid (e^-0.075 - e^-0.3 against e^-0.075 at t = 0.5): rtol 1e-4 covers it
    torch.testing.assert_close(sol.ys[ok, :, 1].detach() / 20.0, exact[ok], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("solver", [RK4(substeps=8), Dopri5()], ids=["rk4", "dopri5"])
def test_doses_per_individual_broadcast_over_particles(solver):
    # the merged grid is built once per individual and broadcast over the particle dim: each
    # (particle, individual) element must get its own individual's doses, as when solved alone
    doses = Doses(
        times=torch.tensor([[0.0, 12.0], [0.0, math.inf], [5.0, 7.5]]),
        amounts=torch.tensor([[100.0, 100.0], [80.0, 0.0], [50.0, 20.0]]),
        targets=torch.tensor([[0, 0], [0, 0], [0, 1]]),
    )
    times = torch.tensor([[1.0, 6.0, 12.0, 20.0], [2.0, 4.0, 8.0, 16.0], [5.0, 6.0, 7.5, 9.0]])
    ka = torch.tensor([[0.5], [0.8], [1.2], [2.0]])  # (K, 1) per particle
    cl = torch.tensor([2.0, 3.0, 4.0])  # (N,) per individual
    v = torch.tensor([[15.0], [20.0], [25.0], [30.0]]) * torch.tensor([1.0, 1.1, 0.9])
    sol = solve(
        pk_oral.rhs,
        torch.zeros(2),
        times,
        {"ka": ka, "cl": cl, "v": v},
        solver=solver,
        t0=0.0,
        doses=doses,
    )
    assert sol.ys.shape == (4, 3, 4, 2)
    for k in range(4):
        for i in range(3):
            alone = solve(
                pk_oral.rhs,
                torch.zeros(2),
                times[i],
                {"ka": ka[k, 0], "cl": cl[i], "v": v[k, i]},
                solver=solver,
                t0=0.0,
                doses=Doses(
                    doses.times[i : i + 1], doses.amounts[i : i + 1], doses.targets[i : i + 1]
                ),
            )
            torch.testing.assert_close(sol.ys[k, i], alone.ys[0], rtol=1e-5, atol=1e-5)


def pk_ys(solve_fn, data, params):
    """The PK model's trajectories for ``params`` by ``solve_fn`` (pyro_hds.solve or a
    stand-in), RK4 with 4 substeps."""
    return solve_fn(
        pk_oral.rhs,
        torch.zeros(2),
        data.times,
        params,
        solver=RK4(substeps=4),
        t0=0.0,
        doses=data.doses,
    ).ys


def test_reuse_solutions_returns_the_previous_solution_only_for_equal_inputs(solves):
    import importlib

    ode_module = importlib.import_module("pyro_hds.ode")
    calls, real_solve = solves.calls, solves.real
    data, truth = pk_oral.simulate(per_group=2, seed=3)
    params = {k: truth[k].clone() for k in ("ka", "cl", "v")}

    def run(p, rhs=pk_oral.rhs, doses=data.doses):
        kwargs = {"solver": RK4(substeps=4), "t0": 0.0, "doses": doses}
        return pyro_hds.ode("x", rhs, torch.zeros(2), data.times, p, **kwargs)

    with torch.no_grad(), ode_module.reuse_solutions():
        first = run(params)
        again = run({k: v.clone() for k, v in params.items()})  # equal values, new tensors
        assert len(calls) == 1 and torch.equal(again, first)
        moved = dict(params, cl=params["cl"] * torch.tensor([1.0] * 5 + [1.5]))
        other = run(moved)
        assert len(calls) == 2
        fresh = pk_ys(real_solve, data, moved)
        torch.testing.assert_close(other, fresh, rtol=0, atol=0)
        assert not torch.equal(other[-1], first[-1]) and torch.equal(other[0], first[0])
        # other doses (equal times, one amount changed), another rhs object: solved again
        doses = Doses(data.doses.times, data.doses.amounts * 1.0, data.doses.targets)
        run(moved, doses=doses)
        assert len(calls) == 2  # equal values: reused
        doses.amounts[0, 0] = 50.0
        run(moved, doses=doses)
        assert len(calls) == 3
        run(moved, rhs=lambda t, y, p: pk_oral.rhs(t, y, p), doses=doses)
        assert len(calls) == 4
        with torch.enable_grad():  # never under grad: the graph of a solve is not shared
            run(moved, doses=doses)
        assert len(calls) == 5
    with torch.no_grad():  # outside the context: every call solves
        run(params)
        run(params)
    assert len(calls) == 7


# tolerances: h^order with h = 0.25 / substeps, the order of the methods' global error
@pytest.mark.parametrize(
    "solver, tol", [(RK4(substeps=4), 0.0625**4), (Heun(substeps=8), 0.03125**2)]
)
def test_an_interval_of_length_zero_is_skipped(solver, tol):
    # dy/dt = -1 / (2 y) is singular at y0 = 0; a dose of 1 at t0 moves the state to 1 before
    # any time passes, and y(t) = sqrt(1 - t). A step of size 0 from y0 would compute
    # 0 * inf = NaN and fail the element; the zero-length interval to the dose is skipped
    def rhs(t, y, p):
        return -0.5 / y

    times = torch.tensor([0.0, 0.25, 0.5], dtype=torch.float64)
    doses = Doses(
        times=torch.tensor([[0.0]], dtype=torch.float64),
        amounts=torch.tensor([[1.0]], dtype=torch.float64),
        targets=torch.tensor([[0]]),
    )
    sol = solve(rhs, torch.zeros(1, dtype=torch.float64), times, solver=solver, t0=0.0, doses=doses)
    assert bool(sol.ok.all())
    # at t = 0 the pre-dose value is observed
    exact = torch.tensor([0.0, 0.75**0.5, 0.5**0.5], dtype=torch.float64)
    torch.testing.assert_close(sol.ys[0, :, 0], exact, rtol=0, atol=tol)


def test_the_merged_grid_is_reused_until_its_tensors_change():
    import importlib

    ode_module = importlib.import_module("pyro_hds.ode")
    data, truth = pk_oral.simulate(per_group=2, seed=3)
    params = {k: truth[k].clone() for k in ("ka", "cl", "v")}
    doses = Doses(data.doses.times.clone(), data.doses.amounts.clone(), data.doses.targets)
    ode_module._GRIDS.clear()

    def run(p, doses=doses):
        return solve(
            pk_oral.rhs, torch.zeros(2), data.times, p, solver=RK4(substeps=4), t0=0.0, doses=doses
        )

    first = run(params)
    assert len(ode_module._GRIDS) == 1
    again = run({k: v * 1.0 for k, v in params.items()})
    assert len(ode_module._GRIDS) == 1 and torch.equal(again.ys, first.ys)
    # an in-place change of a dose bumps its version: a new grid, and the new dose counts
    doses.amounts[0, 1] = 0.0
    changed = run(params)
    assert len(ode_module._GRIDS) == 2
    fresh = run(params, doses=Doses(doses.times.clone(), doses.amounts.clone(), doses.targets))
    torch.testing.assert_close(changed.ys, fresh.ys, rtol=0, atol=0)
    assert not torch.equal(changed.ys[0], first.ys[0]) and torch.equal(changed.ys[1], first.ys[1])
    # dose amounts that need a gradient are never cached, and the gradient reaches them
    amounts = doses.amounts.clone().requires_grad_()
    before = len(ode_module._GRIDS)
    for _ in range(2):
        ys = run(params, doses=Doses(doses.times, amounts, doses.targets)).ys
        (grad,) = torch.autograd.grad(ys[..., 1].sum(), amounts)
        assert len(ode_module._GRIDS) == before and bool((grad[0, 0] > 0).all())
    # the cache keeps at most GRID_CACHE_SIZE grids
    for i in range(ode_module.GRID_CACHE_SIZE + 3):
        run(params, doses=Doses(doses.times.clone(), doses.amounts + i, doses.targets))
    assert len(ode_module._GRIDS) == ode_module.GRID_CACHE_SIZE


def test_reuse_solutions_puts_together_the_rows_of_kept_solves(solves):
    import importlib

    ode_module = importlib.import_module("pyro_hds.ode")
    calls, real_solve = solves.calls, solves.real
    data, truth = pk_oral.simulate(per_group=3, seed=5)
    n = len(data)
    gen = torch.Generator().manual_seed(0)
    # three states of (2 chains, 1, N) params: a start and two Metropolis proposals
    states = [
        {
            k: truth[k] * torch.exp(0.1 * torch.randn(2, 1, n, generator=gen))
            for k in ("ka", "cl", "v")
        }
        for _ in range(3)
    ]

    def run(p):
        return pyro_hds.ode(
            "x",
            pk_oral.rhs,
            torch.zeros(2),
            data.times,
            p,
            solver=RK4(substeps=4),
            t0=0.0,
            doses=data.doses,
        )

    pick = torch.randint(0, 3, (2, 1, n), generator=gen)  # each element from one of them
    mixed = {
        k: torch.stack([s[k] for s in states]).gather(0, pick[None]).squeeze(0) for k in states[0]
    }
    with torch.no_grad(), ode_module.reuse_solutions():
        for s in states:
            run(s)
        assert len(calls) == 3
        merged = run(mixed)
        assert len(calls) == 3  # every element's solution was kept
        fresh = pk_ys(real_solve, data, mixed)
        torch.testing.assert_close(merged, fresh, rtol=0, atol=0)
        # one element equal to none of them: solved
        other = {k: v.clone() for k, v in mixed.items()}
        other["cl"][1, 0, 4] *= 1.5
        again = run(other)
        assert len(calls) == 4 and not torch.equal(again[1, 0, 4], merged[1, 0, 4])
        # params of another shape are never put together
        run({k: v[:1] for k, v in mixed.items()})
        assert len(calls) == 5
