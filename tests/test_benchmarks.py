"""The solver benchmark: its accuracy bookkeeping, ladder search, and a --quick smoke run.

No wall-clock threshold is tested; the smoke run checks that every solver finds a setting that
meets the error target and that the table is complete.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "solvers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_bench_solvers", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_draws_are_nested(bench):
    # a smaller batch is a prefix of a larger one: the ladder search relies on it
    torch.testing.assert_close(bench.draws(10), bench.draws(1000)[:10], rtol=0, atol=0)


def test_heterogeneous_time_scales(bench):
    u = bench.draws(2000)
    pb = bench.lotka_volterra("heterogeneous", u, torch.float32)
    assert pb.theta.dtype == torch.float32 and pb.y0.shape == (2000, 2)
    assert float(pb.scale.min()) >= 1.0 and float(pb.scale.max()) <= 100.0
    # log-uniform: log10(scale) uniform on [0, 2], mean 1 (sd of the mean 0.58 / sqrt(2000))
    assert abs(float(pb.scale.log10().mean()) - 1.0) < 5 * 0.58 / math.sqrt(2000)
    # rates are the homogeneous ones times the scale
    homo = bench.lotka_volterra("homogeneous", u, torch.float64)
    torch.testing.assert_close(pb.theta.double(), homo.theta * pb.scale[:, None], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="unknown case"):
        bench.lotka_volterra("stiff", u, torch.float32)


def test_system_errors(bench):
    ref = torch.tensor([[[1.0, -2.0], [4.0, 0.5]], [[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    ys = ref.clone().float()
    ys[0, 1, 1] += 0.2  # error 0.2 relative to the system's largest |ref| = 4
    ok = torch.tensor([True, False])
    errors = bench.system_errors(ys, ref, ok)
    assert errors[0] == pytest.approx(0.05, rel=1e-6)
    assert errors[1] == math.inf  # a failed system counts as infinitely wrong
    nan = ref.clone()
    nan[0, 0, 0] = math.nan
    assert bench.system_errors(nan, ref, torch.tensor([True, True]))[0] == math.inf


@pytest.mark.parametrize("start", [None, 1e-3, 1e-5, 1e-7])
def test_choose_finds_loosest_accurate_setting(bench, start):
    # a fake solver whose relative error equals its rtol exactly: y = ref * (1 + rtol)
    pb = bench.lotka_volterra("homogeneous", bench.draws(4), torch.float64)
    ref = torch.rand(4, 3, 2, dtype=torch.float64) + 0.5

    def run(problem, theta, rtol, rhs):
        return ref * (1 + rtol), torch.ones(4, dtype=torch.bool)

    fake = bench.Solver("fake", "adaptive", run)
    best, tried = bench.choose(fake, pb, ref, 5e-5, start)
    assert best is not None and best.setting == 3e-5
    assert best.error == pytest.approx(3e-5, rel=1e-9)
    assert all(t.error >= 5e-5 for t in tried if t.setting > 3e-5)
    best, _ = bench.choose(fake, pb, ref, 1e-10, start)  # tighter than the whole ladder
    assert best is None


@pytest.mark.slow  # about two minutes: eight solvers timed on two batches, compiling included
def test_quick_run():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "torch threads 1" in out
    devs = re.findall(r"reference deviation from dopri8 (\S+)", out)
    assert len(devs) == 2 and all(float(d) < 1e-6 for d in devs)  # target 1e-4 over 100
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    rows = [[c.strip() for c in r] for r in rows if r[0].strip() != "case"]
    labels = {
        "pyro_hds RK4",
        "torchdiffeq rk4",
        "pyro_hds Dopri5",
        "pyro_hds Dopri5 compiled",
        "torchdiffeq dopri5",
        "torchdiffeq dopri5 comp.rhs",
    }
    if importlib.util.find_spec("torchode") is not None:  # an optional peer ([peers] extra)
        labels.add("torchode dopri5")
    else:
        assert "torchode dopri5: not installed" in out
    for case in ("homogeneous", "heterogeneous"):
        mine = [r for r in rows if r[0] == case]
        assert {r[2] for r in mine} == labels, out
        for r in mine:
            assert r[3] != "none in ladder", r
            assert float(r[4]) < 1e-4, r  # worst error below the target
            assert float(r[6]) > 0 and float(r[7]) > 0, r  # timed
            if r[2] in ("pyro_hds RK4", "pyro_hds Dopri5"):  # the ratios' baselines
                assert r[8] == r[9] == "1.00", r
            else:
                assert float(r[8]) > 0 and float(r[9]) > 0, r
    assert "target >= 3" in out
    assert len(re.findall(r"first calls \(compiling\)", out)) == 4  # 2 compiled x 2 dtypes


def _run_quick(script: str, *extra: str) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script> --quick *extra`` and check that it exits 0."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.skipif(
    not (ROOT.parent / "shared" / "data" / "vi-hds").exists(),
    reason="vi-hds data not found (../shared/data)",
)
def test_vihds_epoch_quick_run():
    proc = _run_quick("vihds_epoch.py", "--threads", "1", "--breakdown")
    assert "234 training wells" in proc.stdout and "7 steps per epoch" in proc.stdout
    assert re.search(r"pyro_hds: \S+ m?s per epoch \(median of 1\)", proc.stdout), proc.stdout
    # the breakdown: every phase was called in the timed steps (a positive median)
    rows = {
        r.split("|")[1].strip(): float(r.split("|")[2])
        for r in proc.stdout.splitlines()
        if r.startswith("| ") and not r.startswith("| phase")
    }
    phases = ["traces of guide and model", "of which the ODE solve, forward", "backward"]
    phases += ["of which the guide's forward", "log-weights and bound", "optimizer step"]
    assert all(rows[p] > 0 for p in phases), rows
    # each phase lies within its step, so its median cannot exceed the step's (a sum of
    # medians can: medians do not add)
    assert all(rows[p] <= rows["whole step"] for p in phases), rows


@pytest.mark.skipif(
    not (ROOT.parent / "shared" / "data" / "vi-hds").exists(),
    reason="vi-hds data not found (../shared/data)",
)
@pytest.mark.parametrize("model", ["constant", "well-noise"])
def test_vihds_cv_quick_run(model):
    proc = _run_quick("vihds_cv.py", "--model", model)
    assert f"# model {model}," in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "fold 0",
        "fold 1",
        "mean of 2 folds (sd)",
        "zero-shot R33S32",
    ]
    # every split has a finite bound; the two folds' test wells cover all 312
    assert sum(int(r.split("|")[2]) for r in rows[1:3]) == 312
    assert all(math.isfinite(float(r.split("|")[3].split()[0])) for r in rows[1:])


@pytest.mark.skipif(
    not (ROOT.parent / "shared" / "data" / "vi-hds").exists(),
    reason="vi-hds data not found (../shared/data)",
)
def test_vihds_early_quick_run():
    proc = _run_quick("vihds_early.py")
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[1:]] == ["base", "sampled", "noclip", "outer"]
    # one seed: its bound, the mean (equal to it) and a fit time
    for r in rows[1:]:
        assert math.isfinite(float(r[1])) and float(r[1]) == float(r[2])


FAKE_REFERENCE = """
import sys
args = dict(a.split("=", 1) for a in sys.argv[2:] if a.startswith("--"))
assert sys.argv[1].endswith("dr_constant_icml.yaml"), sys.argv
assert args["--split"] == "1" and args["--seed"] == "1" and args["--train_samples"] == "6"
epochs = int(args["--epochs"])
print("loading data ...")
print(f"epoch {epochs:4d} | train (iwae-elbo = -10.5, time = 2.00, total = {2.0 * epochs:.2f}) "
      "| val (iwae-elbo = 123.25, time = 1.0, total = 1.0)")
"""


needs_vihds = pytest.mark.skipif(
    not (ROOT.parent / "shared" / "data" / "vi-hds").exists(),
    reason="vi-hds data not found (../shared/data)",
)


def _fake_checkout(root, run_xval: str) -> None:
    """A stand-in for a microsoft/vi-hds checkout whose ``vihds/run_xval.py`` is ``run_xval``."""
    (root / "vihds").mkdir()
    (root / "specs").mkdir()
    (root / "vihds" / "run_xval.py").write_text(run_xval)
    (root / "specs" / "dr_constant_icml.yaml").write_text("model: dr_constant\n")


def _run_vs_reference(checkout, *options: str) -> subprocess.CompletedProcess:
    """benchmarks/vihds_vs_reference.py on a fake checkout, 1 epoch, 1 thread; must succeed."""
    script = ROOT / "benchmarks" / "vihds_vs_reference.py"
    cmd = [sys.executable, str(script), "--reference", str(checkout), "--epochs", "1"]
    proc = subprocess.run(
        [*cmd, "--threads", "1", *options], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


@needs_vihds
def test_vihds_vs_reference_runs_a_checkout_and_compares(tmp_path):
    # the script runs the checkout as a subprocess with the fold's arguments and reads its
    # last evaluation line
    _fake_checkout(tmp_path, FAKE_REFERENCE)
    proc = _run_vs_reference(
        tmp_path, "--particles", "6", "--outer-particles", "1", "3", "--eval-particles", "10"
    )
    rows = {
        r.split("|")[1].strip(): r.split("|")[2:]
        for r in proc.stdout.splitlines()[1:]
        if r.startswith("| ") and "---" not in r
    }
    ref = rows["reference (vi-hds HEAD)"]
    assert float(ref[0]) == 2.0 and abs(float(ref[1]) - 123.25) < 0.1
    # the reference's scales are the per-channel maxima of all 312 wells: 86 sum(log s_c)
    assert abs(float(ref[2]) - 2828.7) < 0.1
    assert abs(float(ref[3]) - (123.25 - float(ref[2]))) < 0.1
    for label in ("pyro_hds, S = 1, K = 6", "pyro_hds, S = 3, K = 2"):
        ours = rows[label]
        assert math.isfinite(float(ours[1])) and float(ours[0]) > 0
        assert math.isfinite(float(rows[f"{label}, reference's estimator"][1]))
        assert re.search(rf"{label}: speed reference / pyro_hds = [\d.]+", proc.stdout)


@needs_vihds
def test_vihds_vs_reference_reports_a_reference_that_stops_on_nan(tmp_path):
    # the reference stops its training when a minibatch's bound is NaN, prints why and exits
    # with status 0 (fold 3 of seed 1 at 50 epochs): the script says so and still fits
    _fake_checkout(
        tmp_path,
        'print("Training: split 4 of 4")\nprint("Cannot proceed with ELBO = nan. Exiting.")\n',
    )
    proc = _run_vs_reference(
        tmp_path,
        "--particles",
        "4",
        "--outer-particles",
        "1",
        "--eval-particles",
        "8",
        "--fold",
        "3",
    )
    assert "no comparison on this fold: the reference stopped" in proc.stdout
    assert "reference (vi-hds HEAD)" not in proc.stdout
    row = [r for r in proc.stdout.splitlines() if r.startswith("| pyro_hds, S = 1, K = 4 |")]
    assert len(row) == 1 and math.isfinite(float(row[0].split("|")[3]))


@needs_vihds
def test_vihds_vs_reference_diagnostics_run(tmp_path):
    # --objective reference (the reference's objective in pyro_hds) and --model well-noise
    _fake_checkout(tmp_path, FAKE_REFERENCE)
    proc = _run_vs_reference(
        tmp_path,
        "--particles",
        "6",
        "--eval-particles",
        "10",
        "--objective",
        "reference",
        "--model",
        "well-noise",
        "--figure",
        str(tmp_path / "fits"),
    )
    assert (tmp_path / "fits_S6.png").stat().st_size > 10_000
    label = "pyro_hds, the reference's objective, S = 6, model well-noise"
    rows = [r.split("|") for r in proc.stdout.splitlines() if r.startswith(f"| {label}")]
    assert len(rows) == 2 and all(math.isfinite(float(r[3])) for r in rows)


def test_reference_objective_counts_the_globals_in_every_well():
    # the loss is -N/B sum_i log mean_s exp(g_s + l_is): with one draw (S = 1) it is the sum
    # of every well's single-sample bound, the globals' term once per well
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from vihds_vs_reference import ReferenceObjective
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import pyro
    import pyro.distributions as dist

    import pyro_hds

    y = torch.tensor([0.5, 1.5, -0.2], dtype=torch.float64)
    data = pyro_hds.Dataset.from_arrays(y.reshape(3, 1, 1), torch.tensor([0.0]))

    def model(d):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro_hds.individuals(d):
            mean = mu[..., None, None] * torch.ones_like(d.observations)
            pyro_hds.observe("y", dist.Normal(mean, 1.0), d)

    def guide(d):
        pyro.sample("mu", dist.Normal(0.3, 0.5))

    pyro.set_rng_seed(0)
    loss = ReferenceObjective(num_particles=1, num_outer_particles=1).differentiable_loss(
        model, guide, data
    )
    pyro.set_rng_seed(0)  # the same draw of mu
    w = pyro_hds.IWAE(num_particles=1, num_outer_particles=1).log_weights(model, guide, data)
    mu = w.guide_trace.nodes["mu"]["value"].reshape(())
    g = dist.Normal(0.0, 1.0).log_prob(mu) - dist.Normal(0.3, 0.5).log_prob(mu)
    want = -(3 * g + dist.Normal(mu, 1.0).log_prob(y).sum())
    assert abs(float(loss) - float(want)) < 1e-9
    # the hierarchical IWAE counts the globals once
    hier = g + dist.Normal(mu, 1.0).log_prob(y).sum()
    assert abs(float(w.bound) - float(hier)) < 1e-9


def test_cold_compile_empties_the_compile_caches(monkeypatch, tmp_path):
    """Timed runs with compile=True start from empty caches: a new inductor cache directory,
    no compiled solver functions kept from earlier in the process; the caller's settings come
    back afterwards."""
    import os

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _common import cold_compile

    from pyro_hds.solvers import _integrate

    kept = dict(_integrate._COMPILED)  # what other tests compiled, put back at the end
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    _integrate._COMPILED["_pure_interval"] = lambda *args: None
    try:
        with cold_compile():
            inside = os.environ["TORCHINDUCTOR_CACHE_DIR"]
            assert inside != str(tmp_path) and os.listdir(inside) == []
            assert "_pure_interval" not in _integrate._COMPILED
    finally:
        _integrate._COMPILED.clear()
        _integrate._COMPILED.update(kept)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)
    assert not os.path.exists(inside)
