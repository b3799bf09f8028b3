"""The README's main job runs end to end (at a tiny size) and writes its files."""

from __future__ import annotations

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
            "--no-progress",
        ]
    )
    text = capsys.readouterr().out
    assert "solver: RK4(substeps=4), eager (no C++ compiler on the path" in text
    assert "posterior summary" in text and "cl_group[G2]" in text
    assert (tmp_path / "pk_fits.png").stat().st_size > 10_000
    assert (tmp_path / "pk_training.png").exists()
    tree = xr.open_datatree(tmp_path / "pk_posterior.nc")
    assert "posterior" in tree.children and "log_likelihood" in tree.children
    assert set(out["coverage"]) == {"ka", "cl", "v"}


def test_demo_with_particle_gibbs(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--steps", "10", "--particles", "4", "--per-group", "4"]
    args += ["--batch-size", "6", "--samples", "8", "--gibbs", "2", "3", "--no-compile"]
    demo.main([*args, "--no-progress"])
    text = capsys.readouterr().out
    assert "solver: RK4(substeps=4), eager\n" in text
    assert "particle Gibbs: 2 chains, acceptance rates ka_pop" in text
    tree = xr.open_datatree(tmp_path / "pk_posterior.nc")
    assert tree["posterior"].sizes["chain"] == 2 and tree["posterior"].sizes["draw"] == 4


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
