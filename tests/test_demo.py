"""The README's main job runs end to end (at a tiny size) and writes its files."""

from __future__ import annotations

import xarray as xr

from pyro_hds import demo


def test_demo_runs_and_writes_outputs(tmp_path, capsys):
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
    assert "posterior summary" in text and "cl_group[G2]" in text
    assert (tmp_path / "pk_fits.png").stat().st_size > 10_000
    assert (tmp_path / "pk_training.png").exists()
    tree = xr.open_datatree(tmp_path / "pk_posterior.nc")
    assert "posterior" in tree.children and "log_likelihood" in tree.children
    assert set(out["coverage"]) == {"ka", "cl", "v"}


def test_demo_with_particle_gibbs(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--steps", "10", "--particles", "4", "--per-group", "4"]
    demo.main([*args, "--batch-size", "6", "--samples", "8", "--gibbs", "2", "3", "--no-progress"])
    text = capsys.readouterr().out
    assert "particle Gibbs: 2 chains, acceptance rates ka_pop" in text
    tree = xr.open_datatree(tmp_path / "pk_posterior.nc")
    assert tree["posterior"].sizes["chain"] == 2 and tree["posterior"].sizes["draw"] == 4
