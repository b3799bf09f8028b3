"""Dopri5(compile=True): the fused, torch.compile'd step against the eager loop (float64).

Compiling takes tens of seconds on first use, so the comparison is one test that covers the
batch bookkeeping at once: per-element grids with a repeated time, doses, piecewise-constant
inputs, one element whose rhs turns NaN, one that runs out of steps, and a working set that
shrinks to a single unfinished element.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.utils import counters

from pyro_hds.data import Doses
from pyro_hds.ode import solve
from pyro_hds.solvers import RK4, Dopri5, Heun, PiecewiseConstant, Status


def forced_decay(t, y, p, u):
    # dy/dt = -k y sqrt(cut - t) + u: NaN after t = cut (sqrt of a negative number)
    rate = p["k"] * torch.sqrt(p["cut"] - t).clamp(max=1.0)
    return -rate.unsqueeze(-1) * y + u


def problem(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    # element 2 fails early; the slow elements finish together, leaving one unfinished
    # element in a working set of n (the compiled path keeps a finished one beside it)
    k = torch.full((n,), 50.0, dtype=dt)
    k[0] = 3e3
    cut = torch.full((n,), math.inf, dtype=dt)
    cut[2] = 0.05  # NaN after t = 0.05
    ts = torch.sort(torch.rand(n, 6, generator=gen, dtype=dt) * 2, 1).values
    ts[:, 3] = ts[:, 2]  # a repeated time
    ts[3:] = ts[3]  # the slow elements share one grid
    inputs = PiecewiseConstant(
        torch.tensor([0.7], dtype=dt), torch.tensor([[0.2], [-0.1]], dtype=dt)
    )
    return k, cut, ts, dosing(n), inputs


def dosing(n: int) -> Doses:
    dt = torch.float64
    return Doses(
        times=torch.tensor([[0.5, 1.0]], dtype=dt).expand(n, 2),
        amounts=torch.tensor([[1.0, 2.0]], dtype=dt).expand(n, 2),
        targets=torch.zeros(n, 2, dtype=torch.long),
    )


def run(compile: bool, k, cut, ts, doses, inputs, max_steps=400):
    solver = Dopri5(rtol=1e-7, atol=1e-9, max_steps=max_steps, compile=compile)
    y0 = torch.ones(1, dtype=torch.float64)
    return solve(
        forced_decay,
        y0,
        ts,
        {"k": k, "cut": cut},
        solver=solver,
        t0=0.0,
        doses=doses,
        inputs=inputs,
    )


def test_compiled_dopri5_matches_the_eager_loop_in_values_steps_and_gradients():
    torch._dynamo.reset()  # compile from scratch, so the kernels can be counted
    counters.clear()
    n = 20
    k, cut, ts, doses, inputs = problem(n)
    with torch.no_grad():
        eager = run(False, k, cut, ts, doses, inputs)
        fused = run(True, k, cut, ts, doses, inputs)
    assert eager.status[2] == Status.NONFINITE
    assert eager.status[0] == Status.MAX_STEPS  # the stiffest element runs out of steps
    assert torch.equal(fused.status, eager.status)
    # fused kernels may round differently: a step whose error ratio is within round-off of 1
    # may be accepted by one and rejected by the other
    assert (fused.num_steps - eager.num_steps).abs().max() <= 2
    torch.testing.assert_close(fused.ys, eager.ys, rtol=1e-9, atol=1e-12)
    assert torch.equal(fused.reached, eager.reached)

    grads = []
    for compile in (False, True):
        kk = k.clone().requires_grad_(True)
        sol = run(compile, kk, cut, ts, doses, inputs)
        (g,) = torch.autograd.grad(sol.ys.sum(), kk)
        grads.append(g)
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-12)

    # one kernel per grad mode, dynamic in the batch size: another batch compiles nothing new,
    # nor does a working set of one element, nor inputs that are views (k[:n] below)
    k2, cut2, ts2, doses2, inputs2 = problem(33, seed=1)
    kk = torch.cat([k2, k2[:1]]).requires_grad_(True)
    sol = run(True, kk[:33], cut2, ts2, doses2, inputs2)
    torch.autograd.grad(sol.ys.sum(), kk)
    with torch.no_grad():
        run(True, k2, cut2, ts2, doses2, inputs2)
    # nor grad mode with inputs that need no gradient (a model run before training): the
    # no-grad kernel serves it
    plain = run(True, k2, cut2, ts2, doses2, inputs2)
    assert not plain.ys.requires_grad
    assert counters["stats"]["unique_graphs"] == 2


def test_compile_refuses_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="True or False"):
        Dopri5(compile="yes")  # type: ignore[arg-type]
    ts = torch.linspace(0.0, 1.0, 3)
    with pytest.raises(ValueError, match="PiecewiseConstant"):
        solve(
            forced_decay,
            torch.ones(1),
            ts,
            {"k": torch.ones(2), "cut": torch.full((2,), math.inf)},
            solver=Dopri5(compile=True),
            inputs=lambda t: torch.zeros(2, 1),
        )
    with pytest.raises(ValueError, match="adjoint"):
        solve(
            lambda t, y, p: -y,
            torch.ones(1),
            ts,
            solver=Dopri5(compile=True),
            adjoint=True,
        )


def compare_with_element_2_failing(run_solve, k):
    """``run_solve(compile, k)`` compiled against eager, element 2 failing: the same status,
    values and gradient for ``k``."""
    results = []
    for compile in (False, True):
        kk = k.clone().requires_grad_(True)
        sol = run_solve(compile, kk)
        (g,) = torch.autograd.grad(sol.ys.sum(), kk)
        results.append((sol, g))
    (eager, g_eager), (fused, g_fused) = results
    assert eager.status[2] == Status.NONFINITE
    assert torch.equal(fused.status, eager.status)
    assert torch.equal(fused.reached, eager.reached)
    torch.testing.assert_close(fused.ys, eager.ys, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_fused, g_eager, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["heun", "rk4"])
def test_compiled_fixed_step_matches_the_eager_loop(method):
    # per-element grids, doses, piecewise-constant inputs and one element whose rhs turns NaN
    # at t = 1 (that interval is redone eagerly with a check after every step, then by the
    # kernel for the other elements, and the rest of the solve runs the kernel on them)
    torch._dynamo.reset()
    counters.clear()
    k, cut, ts, _, inputs = problem(12)
    k = torch.ones_like(k)  # rates at which the fixed steps are stable
    k[0] = 5.0
    cut[2] = 1.0
    kind = {"heun": Heun, "rk4": RK4}[method]

    def run_fixed(compile, kk, n=12):
        return solve(
            forced_decay,
            torch.ones(1, dtype=torch.float64),
            ts[:n],
            {"k": kk, "cut": cut[:n]},
            solver=kind(substeps=3, compile=compile),
            t0=0.0,
            doses=dosing(n),
            inputs=inputs,
        )

    compare_with_element_2_failing(run_fixed, k)
    # no new kernel for another batch size or under no_grad beyond one per grad mode
    with torch.no_grad():
        quiet = run_fixed(True, k[:7], n=7)
    # grad mode with inputs that need no gradient: the no-grad kernel, the same values
    plain = run_fixed(True, k[:7], n=7)
    assert not plain.ys.requires_grad
    torch.testing.assert_close(plain.ys, quiet.ys, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 2


def rotate_decay(t, y, p):
    # three coupled states, read batch-major (y[:, i]) as a user might write them
    a, b, c = y[:, 0], y[:, 1], y[:, 2]
    w, k = p["w"], p["k"]
    return torch.stack([-k * a + w * b, -w * a - k * b, k * (a - c) * torch.sin(t)], -1)


def rotate_decay_state_major(t, y, p):
    # the same system read and returned state-major (the layout pyro_hds.ode recommends)
    a, b, c = y.movedim(-1, 0).unbind(0)
    w, k = p["w"], p["k"]
    out = [-k * a + w * b, -w * a - k * b, k * (a - c) * torch.sin(t)]
    return torch.stack(out, 0).movedim(0, -1)


@pytest.mark.parametrize("rhs", [rotate_decay, rotate_decay_state_major])
def test_compiled_fixed_step_with_several_states(rhs):
    # the compiled interval keeps the state as a contiguous (S, B) tensor between kernels;
    # values and gradients must not depend on that, nor on how the rhs reads its states
    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(3)
    dt = torch.float64
    n = 9
    ts = torch.linspace(0.2, 3.0, 8, dtype=dt)
    y0 = torch.tensor([1.0, 0.0, 0.5], dtype=dt)
    results = []
    for compile in (False, True):
        w = (1 + torch.rand(n, generator=gen, dtype=dt)).requires_grad_(True)
        k = (0.1 + torch.rand(n, generator=gen, dtype=dt)).requires_grad_(True)
        sol = solve(rhs, y0, ts, {"w": w, "k": k}, solver=Heun(substeps=4, compile=compile))
        weights = torch.arange(sol.ys.numel(), dtype=dt).reshape(sol.ys.shape).cos()
        grads = torch.autograd.grad((sol.ys * weights).sum(), (w, k))
        results.append((sol, grads))
        gen.manual_seed(3)  # the same parameters for both runs
    (eager, g_eager), (fused, g_fused) = results
    assert fused.ys.shape == (n, 8, 3)
    torch.testing.assert_close(fused.ys, eager.ys, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_fused, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the trajectory is assembled state-major from the kernels' (S, B) outputs: each state's
    # values for the batch lie contiguously (no transposing copy per interval)
    assert fused.ys.stride(0) == 1
    with torch.no_grad():
        solve(rhs, y0, ts, {"w": w[:5], "k": k[:5]}, solver=Heun(substeps=4, compile=True))
    assert counters["stats"]["unique_graphs"] == 2


def test_compiled_fixed_step_solution_does_not_depend_on_another_element_failing():
    # the same elements solved with and without a diverging neighbour get the same bits (a
    # Metropolis ratio compares their log-densities across such passes); the batch is big
    # enough for the kernel's vectorized loops
    from pyro_hds.models import pk_oral

    gen = torch.Generator().manual_seed(0)
    n = 300
    params = {k: torch.exp(0.3 * torch.randn(n, generator=gen)) for k in ("ka", "cl", "v")}
    params["v"] = params["v"] * 10
    times = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0])
    doses = Doses(
        times=torch.tensor([[0.0, 6.0]]).expand(n, 2),
        amounts=torch.full((n, 2), 100.0),
        targets=torch.zeros(n, 2, dtype=torch.long),
    )

    def run(p, requires_grad=False):
        p = {k: v.clone().requires_grad_(requires_grad) for k, v in p.items()}
        sol = solve(
            pk_oral.rhs,
            torch.zeros(2),
            times,
            p,
            solver=RK4(substeps=4, compile=True),
            t0=0.0,
            doses=doses,
        )
        return sol, p

    with torch.no_grad():
        clean, _ = run(params)
        broken = dict(params, ka=params["ka"].clone())
        broken["ka"][7] = 1e30  # diverges in the first interval
        failed, _ = run(broken)
    assert bool(clean.ok.all()) and failed.status[7] == Status.NONFINITE
    others = torch.arange(n) != 7
    assert int(failed.ok.sum()) == n - 1
    assert torch.equal(failed.ys[others], clean.ys[others])
    # and with gradients: the others' values and gradients are those of the clean batch
    grads = []
    for p in (params, broken):
        sol, leaves = run(p, requires_grad=True)
        (g,) = torch.autograd.grad(sol.ys[others].sum(), leaves["cl"])
        grads.append((sol.ys[others].detach(), g[others]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-6, atol=1e-6)


def coupled(t, y, p):
    # two states mixed by a vector param (event dim 1): m[:, 0] feeds a from b, m[:, 1] b from a
    a, b = y.movedim(-1, 0).unbind(0)
    k, m = p["k"], p["m"]
    out = [-k * a + m[:, 0] * b, -m[:, 1] * a - k * b * torch.cos(t)]
    return torch.stack(out, 0).movedim(0, -1)


def solve_coupled(y0, ts, k, m, compile: bool, doses=None):
    return solve(
        coupled,
        y0,
        ts,
        {"k": k, "m": m},
        event_dims={"m": 1},
        solver=RK4(substeps=2, compile=compile),
        t0=0.0,
        doses=doses,
    )


def _node_names(tensor: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


def test_compiled_fixed_step_discrete_adjoint_gradients():
    # a compiled fixed-step solve is differentiated by the discrete adjoint (one autograd node,
    # a vector-Jacobian kernel per interval backwards): the gradients of scalar and
    # event-shaped params and of y0 are those of backpropagating through the eager steps, over
    # per-element grids with a repeated time and doses, one of them at t0 (a skipped interval)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    dt = torch.float64
    n = 7
    ts = torch.sort(0.1 + 2 * torch.rand(n, 5, generator=gen, dtype=dt), 1).values
    ts[:, 2] = ts[:, 1]
    doses = Doses(
        times=torch.tensor([[0.0, 1.0]], dtype=dt).expand(n, 2),
        amounts=torch.tensor([[0.5, 1.5]], dtype=dt).expand(n, 2),
        targets=torch.tensor([[0, 1]]).expand(n, 2),
    )
    k0 = 0.2 + torch.rand(n, generator=gen, dtype=dt)
    m0 = torch.rand(n, 2, generator=gen, dtype=dt)
    y00 = torch.rand(n, 2, generator=gen, dtype=dt)
    weights = torch.randn(n, 5, 2, generator=gen, dtype=dt)
    results = []
    for compile in (False, True):
        k, m, y0 = (x.clone().requires_grad_(True) for x in (k0, m0, y00))
        sol = solve_coupled(y0, ts, k, m, compile, doses)
        loss = (sol.ys * weights).sum()
        grads = torch.autograd.grad(loss, (k, m, y0), retain_graph=True)
        # a second backward pass through the retained graph gives the same gradients
        for a, b in zip(grads, torch.autograd.grad(loss, (k, m, y0)), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        results.append((sol, grads))
    (eager, g_eager), (fused, g_fused) = results
    assert "_FixedAdjointBackward" in _node_names(fused.ys)
    assert "_FixedAdjointBackward" not in _node_names(eager.ys)
    torch.testing.assert_close(fused.ys, eager.ys, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_fused, g_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # once differentiable: a second derivative says so instead of returning a wrong one
    k = k0.clone().requires_grad_(True)
    sol = solve_coupled(y00, ts, k, m0, True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(sol.ys.sum(), k, create_graph=True)


def test_compiled_fixed_step_rhs_closing_over_a_weight_is_backpropagated():
    # the discrete adjoint takes vector-Jacobian products for the state and the params only;
    # a rhs that closes over a tensor needing a gradient (a network's weights) is
    # backpropagated through instead, and that tensor gets its gradient
    torch._dynamo.reset()
    dt = torch.float64
    k0 = torch.linspace(0.5, 1.5, 6, dtype=dt)
    ts = torch.linspace(0.2, 2.0, 5, dtype=dt)
    results = []
    for compile in (False, True):
        w = torch.tensor(0.7, dtype=dt, requires_grad=True)

        def rhs(t, y, p, w=w):
            return -(p["k"] * w).unsqueeze(-1) * y * torch.cos(t)

        k = k0.clone().requires_grad_(True)
        sol = solve(rhs, torch.ones(1, dtype=dt), ts, {"k": k}, solver=Heun(compile=compile))
        results.append((sol, torch.autograd.grad(sol.ys.sum(), (k, w))))
    (eager, g_eager), (fused, g_fused) = results
    assert "_FixedAdjointBackward" not in _node_names(fused.ys)
    assert float(g_fused[1].abs()) > 0
    torch.testing.assert_close(fused.ys, eager.ys, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_fused, g_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def decay_pair(t, y, p, u):
    # two states, read and returned state-major; NaN after t = cut, as forced_decay
    rate = p["k"] * torch.sqrt(p["cut"] - t).clamp(max=1.0)
    a, b = y.movedim(-1, 0).unbind(0)
    out = [-rate * a + u[..., 0], rate * (a - b)]
    return torch.stack(out, 0).movedim(0, -1)


@pytest.fixture
def kernel_calls(monkeypatch):
    """How often each compiled kernel is called, by the name of the function it compiles."""
    from pyro_hds.solvers import _integrate

    calls: dict[str, int] = {}
    made = _integrate._compiled

    def counting(fn, scan=False):
        kernel = made(fn, scan)

        def call(*args):
            calls[fn.__name__] = calls.get(fn.__name__, 0) + 1
            return kernel(*args)

        return call

    monkeypatch.setattr(_integrate, "_compiled", counting)
    return calls


@pytest.mark.parametrize("method", ["heun", "rk4"])
def test_compiled_fixed_step_without_doses_is_one_scan_forward_and_one_backward(
    method, kernel_calls
):
    # a solve without doses is one kernel call forward (a scan over the intervals) and one
    # backward (the adjoint's reverse loop), with the values and gradients of the eager loop
    torch._dynamo.reset()
    kind = {"heun": Heun, "rk4": RK4}[method]
    dt = torch.float64
    gen = torch.Generator().manual_seed(5)
    ts = torch.linspace(0.2, 3.0, 8, dtype=dt)
    y0 = torch.tensor([1.0, 0.0, 0.5], dtype=dt)
    w0 = 1 + torch.rand(9, generator=gen, dtype=dt)
    k0 = 0.1 + torch.rand(9, generator=gen, dtype=dt)
    results = []
    for compile in (False, True):
        w, k = w0.clone().requires_grad_(True), k0.clone().requires_grad_(True)
        solver = kind(substeps=2, compile=compile)
        sol = solve(rotate_decay_state_major, y0, ts, {"w": w, "k": k}, solver=solver)
        weights = torch.arange(sol.ys.numel(), dtype=dt).reshape(sol.ys.shape).sin()
        results.append((sol, torch.autograd.grad((sol.ys * weights).sum(), (w, k))))
    (eager, g_eager), (fused, g_fused) = results
    assert kernel_calls == {"_pure_intervals": 1, "_pure_intervals_vjp": 1}
    assert "_FixedAdjointBackward" in _node_names(fused.ys)
    torch.testing.assert_close(fused.ys, eager.ys, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_fused, g_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        quiet = solve(rotate_decay_state_major, y0, ts, {"w": w0, "k": k0}, solver=solver)
    assert kernel_calls == {"_pure_intervals": 2, "_pure_intervals_vjp": 1}
    torch.testing.assert_close(quiet.ys, fused.ys.detach(), rtol=0, atol=0)


def test_compiled_scan_falls_back_to_the_interval_loop_with_the_same_kernels(kernel_calls):
    # one element's rhs turns NaN: the scan's result is dropped and the interval loop isolates
    # the failed element, calling the scan's kernels one interval at a time (no other kernel
    # is compiled); per-element grids with a repeated time and piecewise-constant inputs
    torch._dynamo.reset()
    counters.clear()
    k, cut, ts, _, inputs = problem(12)
    k = torch.ones_like(k)
    cut[2] = 1.0
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)

    def run_pair(compile, kk, rows=slice(None)):
        solver = Heun(substeps=3, compile=compile)
        params = {"k": kk, "cut": cut[rows]}
        return solve(decay_pair, y0, ts[rows], params, solver=solver, t0=0.0, inputs=inputs)

    compare_with_element_2_failing(run_pair, k)
    assert set(kernel_calls) == {"_pure_intervals", "_pure_intervals_vjp"}
    assert kernel_calls["_pure_intervals"] > 2  # one scan, then one call per interval
    # no failure (element 2 left out): one scan for another batch size, compiled before
    with torch.no_grad():
        quiet = run_pair(True, k[3:10], slice(3, 10))
    assert bool((quiet.status == Status.SUCCESS).all())
    assert counters["stats"]["unique_graphs"] == 2
