"""The README's main job runs end to end (at a tiny size) and writes its files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from pyro_hds import demo


def test_demo_runs_and_writes_outputs(tmp_path, capsys, monkeypatch):
    # without a C++ compiler the demo integrates eagerly and says why (the compiled solver
    # has its own tests; compiling here would add tens of seconds)
    monkeypatch.setattr(demo, "compiler_available", lambda: False)
    out = demo.main(
        [
            "--out",
            str(tmp_path),
            "--steps",
            "20",
            "--particles",
            "4",
            "--per-group",
            "5",
            "--batch-size",
            "8",
            "--samples",
            "40",
            "--gibbs",
            "4",
            "5",
            "--no-progress",
        ]
    )
    text = capsys.readouterr().out
    assert "solver: RK4(substeps=4), eager (no C++ compiler on the path" in text
    assert "posterior summary" in text and "cl_group[G2]" in text
    # the default draws are particle Gibbs chains, summarized with ArviZ's ESS and R-hat
    assert "40 posterior draws (particle Gibbs, 4 chains after 5 warm-up sweeps)" in text
    assert "covered    ess  r_hat" in text and "importance-sampling diagnostics" not in text
    assert (tmp_path / "pk_fits.png").stat().st_size > 10_000
    assert (tmp_path / "pk_training.png").exists()
    tree = xr.open_datatree(tmp_path / "pk_posterior.nc")
    # the printed ESS and R-hat are ArviZ's for the chains written to the file
    import arviz_stats

    sigma = tree["posterior"]["sigma"].values.reshape(4, 10)  # (chain, draw)
    sigma_row = next(line for line in text.splitlines() if line.startswith("sigma "))
    assert sigma_row.split()[-2:] == [
        f"{float(arviz_stats.ess(sigma, method='bulk')):.0f}",
        f"{float(arviz_stats.rhat(sigma)):.3f}",
    ]
    assert "posterior" in tree.children and "log_likelihood" in tree.children
    assert set(out["coverage"]) == {"ka", "cl", "v"}


def test_demo_chains_in_the_arviz_file(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--steps", "10", "--particles", "4", "--per-group", "4"]
    args += ["--batch-size", "6", "--samples", "8", "--gibbs", "2", "3", "--no-compile"]
    demo.main([*args, "--no-progress"])
    text = capsys.readouterr().out
    assert "solver: RK4(substeps=4), eager\n" in text
    assert "particle Gibbs: 2 chains, acceptance rates ka_pop" in text
    tree = xr.open_datatree(tmp_path / "pk_posterior.nc")
    assert tree["posterior"].sizes["chain"] == 2 and tree["posterior"].sizes["draw"] == 4


def test_demo_with_importance_resampling(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--steps", "10", "--particles", "4", "--per-group", "4"]
    args += ["--batch-size", "6", "--samples", "8", "--importance", "--no-compile"]
    demo.main([*args, "--no-progress"])
    text = capsys.readouterr().out
    assert "8 posterior draws (importance resampling, K = 4)" in text
    assert "importance-sampling diagnostics: Pareto k-hat median" in text
    assert "r_hat" not in text and "particle Gibbs" not in text
    tree = xr.open_datatree(tmp_path / "pk_posterior.nc")
    assert tree["posterior"].sizes["chain"] == 1 and tree["posterior"].sizes["draw"] == 8


def test_compiler_lookup_follows_cxx_and_path(monkeypatch, tmp_path):
    compiler = tmp_path / "my-c++"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CXX", "my-c++")
    assert demo.compiler_available()
    monkeypatch.setenv("CXX", "missing-c++")
    assert not demo.compiler_available()
    monkeypatch.delenv("CXX")
    assert not demo.compiler_available()  # no c++, g++ or clang++ in this PATH


def test_chain_diagnostics_against_arviz_and_theory():
    import arviz_stats

    rng = np.random.default_rng(0)
    values = rng.normal(size=(4000, 3))  # 4 chains of 1000 draws one after another, 3 columns
    # column 1: AR(1) with rho = 0.9 in each chain, whose ESS is n (1 - rho) / (1 + rho) = n / 19
    rho = 0.9
    for c in range(4):
        chain = values[c * 1000 : (c + 1) * 1000, 1]
        for i in range(1, 1000):
            chain[i] = rho * chain[i - 1] + math.sqrt(1 - rho**2) * chain[i]
    values[:, 2] += np.repeat(np.arange(4.0), 1000)  # column 2: chains at different means
    ess, rhat = demo.chain_diagnostics(values, 4)
    per_chain = values.reshape(4, 1000, 3)
    for j in range(3):
        np.testing.assert_allclose(ess[j], arviz_stats.ess(per_chain[..., j], method="bulk"))
        np.testing.assert_allclose(rhat[j], arviz_stats.rhat(per_chain[..., j]))
    assert 4000 / 19 / 2 < ess[1] < 4000 / 19 * 2
    # chains that agree: R-hat within 0.01 of 1; chains apart (means 0-3, SD 1 within): about
    # sqrt(1 + 1.67 / 1) = 1.6 by the variance decomposition, far above the usual 1.1 alarm
    assert abs(rhat[0] - 1) < 0.01 and rhat[2] > 1.1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gibbs", "4", "10", "--importance"], "--gibbs and --importance exclude each other"),
        (["--gibbs", "0", "10"], "--gibbs needs CHAINS >= 1 and WARMUP >= 0"),
    ],
)
def test_demo_rejects_conflicting_or_bad_draw_options(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        demo.main(["--out", str(tmp_path), *args])
    assert err.value.code == 2 and message in capsys.readouterr().err
