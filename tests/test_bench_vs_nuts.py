"""The NUTS benchmark (benchmarks/vs_nuts.py): the NumPyro model is pk_oral's, and a smoke run.

NumPyro and jax are an optional peer (the ``[peers]`` extra): the tests that need them skip
without them. No wall-clock threshold is tested. The jax computations run in subprocesses, so
that float64 mode (``JAX_ENABLE_X64``) and the XLA thread flags never leak into this process.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vs_nuts.py"

# Computes, in float64, the log joint density of pk_oral.model (Pyro, with a tight adaptive ODE
# solve) and of the benchmark's NumPyro model (closed form), centred and non-centred, at two
# sets of parameter values; prints them as JSON.
LOG_DENSITY_SCRIPT = textwrap.dedent(
    r"""
    import importlib.util, json, sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    import pyro
    import torch
    from numpyro.infer.util import log_density
    from pyro import poutine

    import pyro_hds
    from pyro_hds.models import pk_oral

    assert jax.config.jax_enable_x64
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    spec = importlib.util.spec_from_file_location("_bench_vs_nuts", sys.argv[1])
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while it executes
    spec.loader.exec_module(bench)

    data, truth = bench.make_data(12, 3)
    kwargs = bench.numpyro_inputs(data)
    latent = ("ka_pop", "cl_pop", "v_pop", "group_sd", "omega", "sigma", "cl_group", *bench.LOCALS)
    other = dict(truth)
    other.update(
        ka_pop=torch.tensor(1.4), cl_pop=torch.tensor(2.2), v_pop=torch.tensor(26.0),
        group_sd=torch.tensor(0.35), omega=torch.tensor(0.31), sigma=torch.tensor(0.17),
        cl_group=truth["cl_group"] * torch.tensor([1.2, 0.9, 1.1]),
        ka=truth["ka"] * 1.3, cl=truth["cl"] * 0.8, v=truth["v"] * 1.1,
    )
    solver = pyro_hds.Dopri5(rtol=1e-11, atol=1e-11, max_steps=100_000)
    out = []
    for values in (truth, other):
        values = {k: values[k].double() for k in latent}
        model = poutine.condition(pk_oral.model, data=values)
        trace = poutine.trace(model).get_trace(data, solver=solver)
        status = trace.nodes["x"]["infer"]["ode_status"]
        assert bool((status == 0).all()), status
        pyro_lp = float(trace.log_prob_sum())
        params = {k: jnp.asarray(v.numpy()) for k, v in values.items()}
        centred, _ = log_density(bench.numpyro_model, (), dict(kwargs, centered=True), params)
        z = {
            "cl_group_z": (jnp.log(params["cl_group"]) - jnp.log(params["cl_pop"]))
            / params["group_sd"],
            "ka_z": (jnp.log(params["ka"]) - jnp.log(params["ka_pop"])) / params["omega"],
            "cl_z": (
                jnp.log(params["cl"]) - jnp.log(params["cl_group"])[kwargs["groups"]]
            ) / params["omega"],
            "v_z": (jnp.log(params["v"]) - jnp.log(params["v_pop"])) / params["omega"],
        }
        nc_params = {k: params[k] for k in latent[:6]} | z
        noncentred, _ = log_density(
            bench.numpyro_model, (), dict(kwargs, centered=False), nc_params
        )
        log_jacobian = float(
            jnp.sum(jnp.log(params["group_sd"] * params["cl_group"]))
            + sum(jnp.sum(jnp.log(params["omega"] * params[k])) for k in bench.LOCALS)
        )
        conc = bench.closed_form(
            jnp.asarray(kwargs["times"]), params["ka"], params["cl"], params["v"],
            jnp.asarray(kwargs["dose_times"]), jnp.asarray(kwargs["dose_amounts"]),
        )
        exact = pk_oral.concentration(
            data.times, values["ka"][:, None], values["cl"][:, None], values["v"][:, None],
            pk_oral.DOSE_TIMES, [pk_oral.DOSE_AMOUNT] * len(pk_oral.DOSE_TIMES),
        )
        # the RK4 variant: the same arithmetic as pyro_hds's RK4(substeps=4)
        rk4 = bench.rk4_concentration(
            jnp.asarray(kwargs["times"]), params["ka"], params["cl"], params["v"],
            jnp.asarray(kwargs["dose_times"]), jnp.asarray(kwargs["dose_amounts"]),
        )
        rk4_trace = poutine.trace(model).get_trace(data, solver=pyro_hds.RK4(substeps=4))
        torch_rk4 = (rk4_trace.nodes["x"]["value"][..., 1] / values["v"][:, None]).numpy()
        ode_lp, _ = log_density(
            bench.numpyro_model, (), dict(kwargs, centered=True, ode=True), params
        )
        out.append({
            "rk4_dev": float(np.max(np.abs(np.asarray(rk4) - torch_rk4))),
            "rk4_vs_exact": float(np.max(np.abs(np.asarray(rk4) - exact.numpy()))),
            "rk4_pyro": float(rk4_trace.log_prob_sum()),
            "ode_centred": float(ode_lp),
            "pyro": pyro_lp,
            "centred": float(centred),
            "noncentred": float(noncentred),
            "log_jacobian": log_jacobian,
            "closed_form_dev": float(np.max(np.abs(np.asarray(conc) - exact.numpy()))),
            "closed_form_max": float(exact.abs().max()),
            "dtype": str(conc.dtype),
        })
    print(json.dumps(out))
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


@pytest.fixture
def numpyro_installed():
    pytest.importorskip("numpyro")
    pytest.importorskip("jax")


def test_numpyro_model_has_pyro_log_density(numpyro_installed):
    proc = subprocess.run(
        [sys.executable, "-c", LOG_DENSITY_SCRIPT, str(SCRIPT)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env=_env(JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2
    for r in results:
        assert r["dtype"] == "float64"
        # closed forms agree to float64 round-off (terms of size ~ max concentration)
        assert r["closed_form_dev"] <= 1e-12 * r["closed_form_max"]
        # the jax RK4 solve is pyro_hds's RK4 (same steps; float64 round-off apart), and it
        # differs from the exact solution by RK4's truncation error (not zero)
        assert r["rk4_dev"] <= 1e-12 * r["closed_form_max"]
        assert 1e-9 * r["closed_form_max"] < r["rk4_vs_exact"] < 1e-2 * r["closed_form_max"]
        assert r["ode_centred"] == pytest.approx(r["rk4_pyro"], rel=1e-10)
        # same model: the log joints agree up to the ODE solve's error (tolerance 1e-11)
        assert math.isfinite(r["pyro"])
        assert r["centred"] == pytest.approx(r["pyro"], rel=1e-6)
        # non-centred: the same distribution, densities related by the change of variables
        assert r["noncentred"] == pytest.approx(r["centred"] + r["log_jacobian"], rel=1e-9)
    assert results[0]["pyro"] != pytest.approx(results[1]["pyro"], rel=1e-3)  # not constant


def test_without_numpyro_exits_2():
    # hide numpyro (a None entry in sys.modules makes find_spec report it missing)
    code = (
        "import runpy, sys; sys.modules['numpyro'] = None; "
        f"sys.argv = [{str(SCRIPT)!r}, '--quick']; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert "pip install -e '.[peers]'" in proc.stderr


def _seconds(cell: str) -> float:
    value, unit = cell.split()
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def _tables(out: str) -> list[list[list[str]]]:
    """Markdown tables in ``out``: a list of tables, each a list of rows of cells (header
    first, separator dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*out.splitlines(), ""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def _quick(*extra: str) -> str:
    """stdout of ``vs_nuts.py --quick *extra``, which must exit 0."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_quick_run(numpyro_installed):
    out = _quick()
    assert "torch threads 1" in out
    assert re.search(r"jax \S+ \(cpu\), numpyro \S+", out)
    deviation = re.search(r"max deviation (\S+) sigma", out)
    assert deviation is not None and float(deviation.group(1)) < 0.1

    pop, new = _tables(out)
    head, *rows = pop
    params = ["ka_pop", "cl_pop", "v_pop", "omega", "sigma", "group_sd"]
    params += [f"cl_group[{g}]" for g in range(3)]
    assert head[6:15] == params and head[15] == "max", head
    assert len(rows) == 1 and rows[0][0] == "12"
    row = dict(zip(head, rows[0]))
    assert len(row) == len(head) == len(rows[0])
    for key in ("NUTS", "(compile)", "pyro_hds"):
        assert _seconds(row[key]) > 0, row
    fit, draws = row["(fit + draws)"].split(" + ")
    assert _seconds(fit) > 0 and _seconds(draws) > 0
    assert _seconds(fit) + _seconds(draws) == pytest.approx(_seconds(row["pyro_hds"]), rel=0.02)
    assert float(row["NUTS / pyro_hds"].rstrip("x")) > 0
    errors = [float(row[p]) for p in params]
    assert all(math.isfinite(e) and e >= 0 for e in errors), row
    assert float(row["max"]) == pytest.approx(max(errors), abs=1e-3)
    assert float(row["NUTS min ESS"]) > 0 and math.isfinite(float(row["NUTS max R-hat"]))

    head, *rows = new
    assert head[:2] == ["N", "NUTS on N + new"]
    assert head[2] == "predict K=1" and head[7] == "predict K=4", head
    assert len(rows) == 1 and len(rows[0]) == len(head) == 12
    cells = dict(zip(head[:2], rows[0][:2]))
    assert _seconds(cells["NUTS on N + new"]) > 0
    for block in (rows[0][2:7], rows[0][7:12]):
        assert _seconds(block[0]) > 0 and float(block[1].rstrip("x")) > 0
        assert all(math.isfinite(float(c)) and float(c) >= 0 for c in block[2:]), block

    verdicts = re.findall(r"^- N = 12: .*: (met|MISSED) \(", out, flags=re.M)
    assert len(verdicts) == 4, out


def test_quick_run_with_ode_nuts_and_no_new_individuals(numpyro_installed):
    out = _quick(
        "--nuts-ode",
        "--new",
        "0",
        "--trace-every",
        "10",
        "--average-last",
        "0.5",
        "--final-lr-fraction",
        "0.01",
        "--gibbs",
        "2",
        "4",
        "--gibbs-particles",
        "1",
        "--gibbs-local-steps",
        "2",
        "--gibbs-outer-steps",
        "2",
        "--gibbs-laplace-steps",
        "1",
        "--compile-draws",
    )
    # an eager fit, then compiled draws (compiling from empty caches)
    assert "RK4(substeps=4), float32 (the draws compiled)" in out
    # the draws by particle Gibbs: 20 draws, 2 chains, 4 warm-up sweeps, no importance step
    assert (
        "20 draws by particle Gibbs (2 chains, 4 warm-up sweeps, K = 1 in the importance "
        "step, 2 random-walk and 1 Laplace independence steps on the locals and 2 on the "
        "global and group sites per sweep)" in out
    )
    assert re.search(r"Laplace independence steps \d\.\d\d, importance step none;", out), out
    chains = re.search(
        r"^  gibbs: acceptance ka_pop \S+, .*min bulk ESS (\d+) of 20, max split R-hat (\S+) "
        r"\(2 chains\)$",
        out,
        flags=re.M,
    )
    assert chains is not None, out
    assert int(chains.group(1)) > 0 and math.isfinite(float(chains.group(2)))
    assert "centred model (RK4(substeps=4) ODE solve in jax)" in out
    assert "lr 0.02 -> 0.0002," in out
    assert "parameters averaged over the last 0.5 of the steps" in out
    # the trace: a header naming the 9 population parameters, then steps 10 and 20 of 20
    header = re.findall(r"^  trace: step, loss, (.*)$", out, flags=re.M)
    assert header == [
        ", ".join(
            [
                "ka_pop",
                "cl_pop",
                "v_pop",
                "omega",
                "sigma",
                "group_sd",
                *(f"cl_group[{g}]" for g in range(3)),
            ]
        )
    ], out
    lines = re.findall(r"^  trace: +(\d+) (.*)$", out, flags=re.M)
    assert [int(step) for step, _ in lines] == [10, 20], out
    for _, rest in lines:
        values = [float(v) for v in rest.split()]
        assert len(values) == 10 and all(math.isfinite(v) for v in values), rest
    assert re.search(r"\(tracing took \S+ s, left out of the times\)", out)
    # only the population table; two verdicts (population means, speed)
    tables = _tables(out)
    assert len(tables) == 1 and tables[0][1][0] == "12"
    assert "NEW individuals" not in out
    assert len(re.findall(r"^- N = 12: .*: (met|MISSED) \(", out, flags=re.M)) == 2, out


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_vs_nuts_inproc", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while it executes
    spec.loader.exec_module(bench)
    return bench


def test_errors_in_nuts_standard_deviations():
    import numpy as np

    bench = _bench_module()
    rng = np.random.default_rng(0)
    names = ["ka_pop", "cl_pop", "v_pop", "omega", "sigma", "group_sd"]
    nuts = {k: rng.normal(1.0, 0.5, size=400) for k in names}
    nuts["cl_group"] = rng.normal([1.0, 2.0, 3.0], [0.1, 0.2, 0.4], size=(400, 3))
    point = {k: np.array(nuts[k].mean() - 2.0 * nuts[k].std()) for k in names}
    point["cl_group"] = nuts["cl_group"].mean(0) + np.array([1.0, -0.5, 3.0]) * nuts[
        "cl_group"
    ].std(0)
    signed = bench.signed_errors(point, nuts)
    expected = [-2.0] * 6 + [1.0, -0.5, 3.0]
    assert list(signed) == [*names, "cl_group[0]", "cl_group[1]", "cl_group[2]"]
    assert list(signed.values()) == pytest.approx(expected, rel=1e-12)
    # population_errors: the same in absolute value, from the means of posterior draws
    draws = {k: np.stack([v - 1.0, v + 1.0]) for k, v in point.items()}
    assert list(bench.population_errors(draws, nuts).values()) == pytest.approx(
        [abs(e) for e in expected], rel=1e-12
    )
