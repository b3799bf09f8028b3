"""Tests of the vi-hds plate-reader loader (pyro_hds.datasets.vihds).

Expected numbers come from the data README (/work/shared/data/README.md: wells per device, time
points per file), the reference configuration (microsoft/vi-hds, specs/dr_constant_icml.yaml:
devices, files, component groups aR = [0, 1, 1, 2, 2, 2], aS = [0, 1, 2, 1, 2, 3]) and literal
readings copied from the raw CSV text. Nothing here downloads: the downloader is monkeypatched.
"""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_hds.datasets import vihds
from pyro_hds.datasets.vihds import (
    VIHDS_COMMIT,
    VIHDS_FILES,
    ChannelScaler,
    fetch_vihds,
    folds,
    heldout_device_split,
    load_vihds,
    parse_condition,
    read_platereader_csv,
)

ALL_FILES = sorted(vihds.VIHDS_SHA256)


def _shared_dir() -> Path | None:
    try:
        return fetch_vihds(files=ALL_FILES, download=False)
    except FileNotFoundError:
        return None


SHARED = _shared_dir()
needs_data = pytest.mark.skipif(
    SHARED is None,
    reason="vi-hds CSVs not found (../shared/data/vi-hds or $PYRO_HDS_DATA); data tests skipped",
)


# ------------------------------------------------------------------------------------------
# Condition strings
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("C6=25000", {"C6": 25000.0}),
        ("C12=308.64", {"C12": 308.64}),
        ("C6=25000.000000;Ara=5.000000", {"C6": 25000.0, "Ara": 5.0}),
        ("Ara=25; C6=0.423377195210757", {"Ara": 25.0, "C6": 0.423377195210757}),
        ("EtOH=1.7e9", {"EtOH": 1.7e9}),
        ("", {}),
        ("   ", {}),
    ],
)
def test_parse_condition(text, expected):
    assert parse_condition(text) == expected


@pytest.mark.parametrize("text", ["C6", "C6=abc", "=5", "C6=1;C6=2", "C6=nan", "StdStdStd"])
def test_parse_condition_rejects(text):
    with pytest.raises(ValueError, match=r"proc_x\.csv, well B3"):
        parse_condition(text, where="proc_x.csv, well B3")


# ------------------------------------------------------------------------------------------
# The parser on synthetic files (format corner cases without the real data)
# ------------------------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_read_synthetic_ragged_signals_and_blank_devices(tmp_path):
    # Block order (OD700 first, 3 points; then EYFP, 2 points), bare and bracketed headers,
    # a blank device and a blank condition.
    p = _write(
        tmp_path,
        "mini.csv",
        [
            "Content, Colony, Well Col, Well Row, Content,OD700,OD700,OD700,"
            "Raw Data (EYFP) 1 - 0 h ,Raw Data (EYFP) 2 - 0 h 11 min",
            "  ,  ,  ,  ,  ,0.0, 0.5,1.0,0.1,0.6",
            "DevA,,1,A,C6=10;Ara=2,1,2,3,10,20",
            ",,2,A,,4,5,6,40,50",
            "DevB,,3,B,,7,8,9,70,",
        ],
    )
    df = read_platereader_csv(p)
    assert list(df.well.unique()) == ["A1", "B3"]
    assert set(df.columns) >= {"C6", "Ara", "signal", "time", "value", "time_index"}
    a1 = df[df.well == "A1"]
    assert list(a1.signal) == ["OD700"] * 3 + ["EYFP"] * 2
    np.testing.assert_array_equal(a1.time, [0.0, 0.5, 1.0, 0.1, 0.6])
    np.testing.assert_array_equal(a1.value, [1, 2, 3, 10, 20])
    assert (a1.C6 == 10).all() and (a1.Ara == 2).all()
    b3 = df[df.well == "B3"]
    assert (b3.C6 == 0).all() and (b3.Ara == 0).all()  # blank condition: 0 of everything
    assert np.isnan(b3.value.iloc[-1])  # empty cell
    assert (df.file == "mini").all()

    kept = read_platereader_csv(p, drop_blank_devices=False)
    assert list(kept.well.unique()) == ["A1", "A2", "B3"]
    flags = kept.groupby("well").blank_device.first()
    assert flags.to_dict() == {"A1": False, "A2": True, "B3": False}


@pytest.mark.parametrize(
    "lines, match",
    [
        (["Content,Colony,Well Col,Well Row,Content,OD", ",,,,,x", "D,,1,A,,1"], "row 2"),
        (["Content,Colony,Well Col,Well Row,Content,OD", ",,,,,0", "D,,1,A,,abc"], "well A1"),
        (["Content,Colony,Well Col,Well Row,Content,OD", ",,,,,0", "D,,1,A,C6=?,1"], "C6=?"),
        (["Content,Colony,Well Col,Well Row,Content,OD", ",,,,,0", "D,,1,A,,1,2"], "row 3"),
        (
            ["Content,Colony,Well Col,Well Row,Content,OD", ",,,,,0", "D,,1,A,,1", "D,,1,A,,2"],
            "well A1 appears",
        ),
        (["Time,OD", "0,1"], "5 metadata columns"),
    ],
)
def test_read_synthetic_errors(tmp_path, lines, match):
    p = _write(tmp_path, "bad.csv", lines)
    with pytest.raises(ValueError, match=match):
        read_platereader_csv(p)


# ------------------------------------------------------------------------------------------
# The parser on all twelve real files
# ------------------------------------------------------------------------------------------

_C4 = {"OD", "mRFP1", "EYFP", "ECFP"}
_C5 = _C4 | {"OD700"}
# file: (wells with a device name, block order, points per signal)
REAL = {
    "proc140916.csv": (96, ["EYFP", "ECFP", "mRFP1", "OD"], 100),
    "proc140930.csv": (96, ["OD", "EYFP", "ECFP", "mRFP1"], 100),
    "proc141006.csv": (96, ["OD", "ECFP", "EYFP", "mRFP1"], 100),
    "proc141021.csv": (87, ["EYFP", "ECFP", "mRFP1", "OD"], 100),
    "proc141023.csv": (96, ["EYFP", "ECFP", "mRFP1", "OD"], 100),
    "proc141028.csv": (72, ["OD", "EYFP", "ECFP", "mRFP1"], 86),
    "proc_EC10G_EtOH.csv": (48, ["ECFP", "EYFP", "mRFP1", "OD", "OD700"], 100),
    "proc_PBadAiia_Ara_C6C12.csv": (96, ["ECFP", "EYFP", "mRFP1", "OD", "OD700"], 136),
    "proc_PBadYFP.csv": (12, ["ECFP", "EYFP", "mRFP1", "OD", "OD700"], 100),
    "proc_PRPR_Chlor.csv": (12, ["ECFP", "EYFP", "mRFP1", "OD", "OD700"], 200),
    "proc_Relays_RemovedOutlier.csv": (96, ["ECFP", "EYFP", "mRFP1", "OD", "OD700"], 99),
    "proc_degrader_RemovedDuplicates.csv": (96, ["ECFP", "EYFP", "mRFP1", "OD", "OD700"], 135),
}


def test_real_table_covers_every_file():
    assert sorted(REAL) == ALL_FILES


@needs_data
@pytest.mark.parametrize("fname", sorted(REAL))
def test_read_every_real_file(fname):
    n_wells, order, n_t = REAL[fname]
    df = read_platereader_csv(SHARED / fname)
    assert df.well.nunique() == n_wells
    assert list(df.signal.unique()) == order
    lengths = df[df.well == df.well.iloc[0]].groupby("signal").size().to_dict()
    expected = {s: n_t for s in order}
    if fname.startswith("proc_degrader"):
        expected["OD700"] = n_t + 1  # the one signal with an extra time point
    assert lengths == expected
    assert len(df) == n_wells * sum(expected.values())
    assert (df.device != "").all()
    assert np.isfinite(df.value).all() and np.isfinite(df.time).all()
    # Every well has a reading at every (signal, time_index) exactly once.
    assert not df.duplicated(["well", "signal", "time_index"]).any()


@needs_data
def test_read_real_known_values():
    df = read_platereader_csv(SHARED / "proc141028.csv")
    a1 = df[(df.well == "A1")]
    assert (a1.device == "R33S175_Y81C76").all() and (a1.condition == "C6=25000").all()
    assert (a1.C6 == 25000.0).all() and (a1.C12 == 0.0).all()
    od = a1[a1.signal == "OD"]
    np.testing.assert_array_equal(od.value.iloc[:2], [0.102, 0.1028])
    np.testing.assert_array_equal(od.time.iloc[:2], [0.0, 0.194166667])
    assert od.time.iloc[-1] == 16.52277778
    rfp = a1[a1.signal == "mRFP1"]
    np.testing.assert_array_equal(rfp.value.iloc[-2:], [754.0, 787.0])

    # Bare "OD" headers (proc141021).
    df = read_platereader_csv(SHARED / "proc141021.csv")
    a1 = df[(df.well == "A1")]
    assert a1.device.iloc[0] == "R33S175_Y81C76"
    np.testing.assert_array_equal(a1[a1.signal == "EYFP"].value.iloc[:2], [303.0, 304.0])
    np.testing.assert_array_equal(a1[a1.signal == "OD"].value.iloc[:2], [0.1015, 0.101])
    ara = df[df.condition.str.startswith("Ara=25; C6=")]
    assert len(ara) and (ara.Ara == 25.0).all()
    std = df[df.device == "StdStdStd"]
    assert std.well.nunique() == 3 and (std.C6 == 0).all() and (std.C12 == 0).all()

    # The degrader file: OD700 keeps its 136th point.
    df = read_platereader_csv(SHARED / "proc_degrader_RemovedDuplicates.csv")
    a1 = df[(df.well == "A1")]
    od700 = a1[a1.signal == "OD700"]
    assert od700.time.iloc[-1] == 22.37833333 and od700.value.iloc[-1] == 0.564
    np.testing.assert_array_equal(a1[a1.signal == "ECFP"].value.iloc[:2], [2831.0, 2647.0])
    assert (a1.C6 == 25000.0).all() and (a1.Ara == 5.0).all() and (a1.C12 == 0.0).all()


@needs_data
def test_read_real_keep_blank_devices():
    df = read_platereader_csv(SHARED / "proc_EC10G_EtOH.csv", drop_blank_devices=False)
    flags = df.groupby("well").blank_device.first()
    assert len(flags) == 96 and int(flags.sum()) == 48


# ------------------------------------------------------------------------------------------
# Path resolution and download (no network: the downloader is replaced)
# ------------------------------------------------------------------------------------------


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No env var, no shared directory, an empty cache under tmp_path."""
    monkeypatch.delenv("PYRO_HDS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(vihds, "_default_search_dirs", lambda: [])

    def no_network(url, dest):
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(vihds, "_download_file", no_network)
    return tmp_path


def _touch(d: Path, files) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for f in files:
        (d / f).write_text("x")
    return d


def test_resolve_explicit_path(isolated):
    d = _touch(isolated / "a", ["f.csv"])
    assert fetch_vihds(d, files=["f.csv"]) == d
    parent = isolated / "b"
    _touch(parent / "vi-hds", ["f.csv"])
    assert fetch_vihds(parent, files=["f.csv"]) == parent / "vi-hds"
    with pytest.raises(FileNotFoundError, match=r"g\.csv"):
        fetch_vihds(d, files=["f.csv", "g.csv"])


def test_resolve_env_var(isolated, monkeypatch):
    parent = isolated / "data"
    _touch(parent / "vi-hds", ["f.csv"])
    monkeypatch.setenv("PYRO_HDS_DATA", str(parent))
    assert fetch_vihds(files=["f.csv"]) == parent / "vi-hds"
    monkeypatch.setenv("PYRO_HDS_DATA", str(isolated / "nowhere"))
    with pytest.raises(FileNotFoundError, match="PYRO_HDS_DATA"):
        fetch_vihds(files=["f.csv"])
    # The argument wins over the env var.
    d = _touch(isolated / "arg", ["f.csv"])
    assert fetch_vihds(d, files=["f.csv"]) == d


def test_resolve_search_dirs_before_cache(isolated, monkeypatch):
    shared = _touch(isolated / "shared" / "data" / "vi-hds", ["f.csv"])
    _touch(isolated / "cache" / "pyro_hds" / "vi-hds", ["f.csv"])
    monkeypatch.setattr(vihds, "_default_search_dirs", lambda: [isolated / "empty", shared])
    assert fetch_vihds(files=["f.csv"]) == shared.resolve()


def test_resolve_no_download(isolated):
    with pytest.raises(FileNotFoundError, match="download=False"):
        fetch_vihds(files=["f.csv"], download=False)


def test_download_into_cache(isolated, monkeypatch):
    content = b"Content,Colony,Well Col,Well Row,Content,OD\n"
    monkeypatch.setitem(vihds.VIHDS_SHA256, "f.csv", hashlib.sha256(content).hexdigest())
    calls = []

    def fake(url, dest):
        calls.append(url)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(content)

    monkeypatch.setattr(vihds, "_download_file", fake)
    got = fetch_vihds(files=["f.csv"])
    cache = isolated / "cache" / "pyro_hds" / "vi-hds"
    assert got == cache and (cache / "f.csv").read_bytes() == content
    assert calls == [
        f"https://raw.githubusercontent.com/microsoft/vi-hds/{VIHDS_COMMIT}/data/f.csv"
    ]
    assert len(VIHDS_COMMIT) == 40
    # A second call uses the cache.
    assert fetch_vihds(files=["f.csv"]) == cache and len(calls) == 1


def test_download_checksum_mismatch(isolated, monkeypatch):
    monkeypatch.setitem(vihds.VIHDS_SHA256, "f.csv", "0" * 64)
    monkeypatch.setattr(vihds, "_download_file", lambda url, dest: Path(dest).write_bytes(b"x"))
    (isolated / "cache" / "pyro_hds" / "vi-hds").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="SHA-256"):
        fetch_vihds(files=["f.csv"])
    assert not (isolated / "cache" / "pyro_hds" / "vi-hds" / "f.csv").exists()


def test_download_network_failure(isolated, monkeypatch):
    def fail(url, dest):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(vihds, "_download_file", fail)
    with pytest.raises(RuntimeError, match=r"no route to host.*PYRO_HDS_DATA"):
        fetch_vihds(files=["f.csv"])


def test_download_file_is_atomic(tmp_path):
    # The real downloader on file:// URLs (no network): success, then a failure that leaves
    # neither a partial destination nor temporary files.
    src = tmp_path / "src.csv"
    src.write_bytes(b"a,b\n1,2\n")
    dest = tmp_path / "out" / "f.csv"
    vihds._download_file(src.as_uri(), dest)
    assert dest.read_bytes() == b"a,b\n1,2\n"
    dest2 = tmp_path / "out" / "g.csv"
    with pytest.raises(OSError):
        vihds._download_file((tmp_path / "missing.csv").as_uri(), dest2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f.csv"]


@needs_data
def test_load_through_download(isolated, monkeypatch):
    def copy(url, dest):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes((SHARED / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(vihds, "_download_file", copy)
    data = load_vihds(dtype=torch.float64)
    assert tuple(data.observations.shape) == (312, 86, 4)
    assert sorted(p.name for p in (isolated / "cache" / "pyro_hds" / "vi-hds").iterdir()) == (
        sorted(VIHDS_FILES)
    )


# ------------------------------------------------------------------------------------------
# The reference experiment
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    if SHARED is None:
        pytest.skip("vi-hds CSVs not found (../shared/data/vi-hds or $PYRO_HDS_DATA)")
    return load_vihds(SHARED, dtype=torch.float64, download=False)


def _idx(data, ident):
    return list(data.individual_ids).index(ident)


def test_load_shapes_and_names(data):
    assert tuple(data.observations.shape) == (312, 86, 4)
    assert tuple(data.mask.shape) == (312, 86, 4) and bool(data.mask.all())
    assert data.observations.dtype == torch.float64
    assert tuple(data.channel_names) == ("OD", "mRFP1", "EYFP", "ECFP")
    assert tuple(data.input_names) == ("C6", "C12")
    assert tuple(data.inputs.shape) == (312, 2)
    assert tuple(data.group_names) == (
        "Pcat",
        "RS100S32",
        "RS100S34",
        "R33S32",
        "R33S34",
        "R33S175",
    )
    ids = list(data.individual_ids)
    assert len(set(ids)) == 312 and ids[0].startswith("proc140916/")
    assert {i.split("/")[0] for i in ids} == {Path(f).stem for f in VIHDS_FILES}


def test_load_device_counts(data):
    counts = np.bincount(np.asarray(data.groups), minlength=6)
    assert counts.tolist() == [48, 48, 48, 48, 48, 72]
    # Per file (README): 140916/140930 24 wells of each of four devices; 141006 48 Pcat;
    # 141021/141023/141028 24 wells of R33S175 each.
    per_file: dict[str, int] = {}
    for i in data.individual_ids:
        per_file[i.split("/")[0]] = per_file.get(i.split("/")[0], 0) + 1
    assert per_file == {
        "proc140916": 96,
        "proc140930": 96,
        "proc141006": 48,
        "proc141021": 24,
        "proc141023": 24,
        "proc141028": 24,
    }


def test_load_time_grid(data):
    t = np.asarray(data.times)
    assert t.shape == (86,)
    assert t[0] == 0.0 and t[1] == 0.194166667 and t[-1] == 16.52277778
    assert np.all(np.diff(t) > 0)


def test_load_known_wells(data):
    obs = np.asarray(data.observations)
    od, rfp = 0, 1
    # proc141028 is the grid file: its readings are taken as they are.
    i = _idx(data, "proc141028/A1")
    np.testing.assert_array_equal(obs[i, :2, od], [0.102, 0.1028])
    np.testing.assert_array_equal(obs[i, -2:, rfp], [754.0, 787.0])
    np.testing.assert_array_equal(np.asarray(data.inputs[i]), [25000.0, 0.0])
    assert data.group_names[int(data.groups[i])] == "R33S175"
    # proc141006 (E1): grid 0.194167 h -> file time 0.193611 h (nearest), raw text 0.1132, 0.11.
    i = _idx(data, "proc141006/E1")
    np.testing.assert_array_equal(obs[i, :2, od], [0.1132, 0.11])
    assert data.group_names[int(data.groups[i])] == "Pcat"
    # proc141021 (bare headers): grid 0.194167 h -> file 0.195278 h; raw 0.1015, 0.101.
    i = _idx(data, "proc141021/A1")
    np.testing.assert_array_equal(obs[i, :2, od], [0.1015, 0.101])


@needs_data
def test_load_nearest_time_rule(data):
    # Every value equals the raw reading at the nearest file time (rebuilt from the long table).
    df = read_platereader_csv(SHARED / "proc140930.csv")
    grid = np.asarray(data.times)
    for well, c, ch in [("A1", 0, "OD"), ("H12", 2, "EYFP"), ("D7", 3, "ECFP")]:
        s = df[(df.well == well) & (df.signal == ch)]
        t, v = s.time.to_numpy(), s.value.to_numpy()
        expected = np.array([v[np.argmin(np.abs(t - g))] for g in grid])
        got = np.asarray(data.observations[_idx(data, f"proc140930/{well}"), :, c])
        np.testing.assert_array_equal(got, expected)


def test_load_inputs(data):
    x = np.asarray(data.inputs)
    assert (x >= 0).all() and ((x[:, 0] == 0) | (x[:, 1] == 0)).all()
    levels = np.unique(x[x > 0])
    # Eleven non-zero 3-fold dilutions from 25000 nM (plus zero): 12 levels per inducer.
    np.testing.assert_allclose(levels, np.sort(25000.0 / 3.0 ** np.arange(11)), rtol=1e-9)


def test_load_group_features(data):
    assert tuple(data.feature_names) == (
        "LuxR:Pcat",
        "LuxR:RS100",
        "LuxR:R33",
        "LasR:Pcat",
        "LasR:S32",
        "LasR:S34",
        "LasR:S175",
    )
    # Reference groups: aR (LuxR) = [0, 1, 1, 2, 2, 2], aS (LasR) = [0, 1, 2, 1, 2, 3].
    expected = np.zeros((6, 7))
    for g, (r, s) in enumerate(zip([0, 1, 1, 2, 2, 2], [0, 1, 2, 1, 2, 3])):
        expected[g, r] = 1.0
        expected[g, 3 + s] = 1.0
    np.testing.assert_array_equal(np.asarray(data.group_features), expected)


@needs_data
def test_load_device_subset_and_errors():
    sub = load_vihds(SHARED, devices=("R33S175", "Pcat_Y81C76"), dtype=torch.float64)
    assert tuple(sub.group_names) == ("R33S175", "Pcat")
    assert np.bincount(np.asarray(sub.groups)).tolist() == [72, 48]
    assert tuple(sub.observations.shape) == (120, 86, 4)
    with pytest.raises(ValueError, match="unknown device"):
        load_vihds(SHARED, devices=("R33S250_Y81C76",))
    with pytest.raises(ValueError, match="not found"):
        load_vihds(SHARED, signals=("OD", "OD700"))
    with pytest.raises(ValueError, match="does not cover the grid"):
        load_vihds(SHARED, max_time_gap=1e-4)


# ------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------


def test_folds_partition(data):
    n = len(data)
    fs = folds(data, k=4, seed=0)
    assert len(fs) == 4
    tests = np.concatenate([te for _, te in fs])
    assert sorted(tests.tolist()) == list(range(n))
    for tr, te in fs:
        assert len(te) == n // 4
        assert np.intersect1d(tr, te).size == 0 and tr.size + te.size == n
    # Seeded: same seed same folds; another seed other folds.
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(fs, folds(data, k=4, seed=0)))
    assert not np.array_equal(fs[0][1], folds(data, k=4, seed=1)[0][1])
    # The reference's rule: np.random.seed(seed); permutation; array_split; sorted chunk.
    np.random.seed(3)  # noqa: NPY002
    ref = np.sort(np.array_split(np.random.permutation(n), 5)[1])  # noqa: NPY002
    np.testing.assert_array_equal(folds(data, k=5, seed=3)[1][1], ref)
    with pytest.raises(ValueError, match="k must be"):
        folds(data, k=1)


def test_heldout_device_split(data):
    tr, te = heldout_device_split(data, "R33S175")
    assert len(te) == 72 and len(tr) == 240
    g = np.asarray(data.groups)
    assert (g[te] == 5).all() and (g[tr] != 5).all()
    _tr2, te2 = heldout_device_split(data, "R33S175_Y81C76")
    np.testing.assert_array_equal(te, te2)
    with pytest.raises(ValueError, match="unknown device"):
        heldout_device_split(data, "R33S250")


# ------------------------------------------------------------------------------------------
# Scaling
# ------------------------------------------------------------------------------------------


def test_scaler_uses_training_wells_only(data):
    tr, te = folds(data, k=4, seed=0)[0]
    train = data[torch.as_tensor(tr)]
    scaler = ChannelScaler().fit(train)
    obs = np.asarray(data.observations)
    np.testing.assert_array_equal(np.asarray(scaler.scales), obs[tr].max(axis=(0, 1)))
    # Test wells do not change it: refitting on train wells after inflating the test wells.
    inflated = data[torch.as_tensor(np.arange(len(data)))]
    bumped = inflated.observations.clone()
    bumped[torch.as_tensor(te)] *= 100.0
    inflated = vihds._with_observations(inflated, bumped)
    scaler2 = ChannelScaler().fit(inflated[torch.as_tensor(tr)])
    assert torch.equal(scaler.scales, scaler2.scales)
    # Fitting on everything would give a different scale for at least one channel.
    assert not torch.equal(ChannelScaler().fit(inflated).scales, scaler.scales)


def test_scaler_transform_math(data):
    tr, te = heldout_device_split(data, "Pcat")
    scaler = ChannelScaler().fit(data[torch.as_tensor(tr)])
    test = data[torch.as_tensor(te)]
    out = scaler.transform(test)
    y = np.asarray(test.observations) / np.asarray(scaler.scales)
    expected = y - y.min(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out.observations), expected, rtol=0, atol=1e-15)
    assert np.asarray(out.observations).min(axis=1).max() == 0.0  # each series' min is 0
    plain = ChannelScaler(subtract_background=False).fit(data[torch.as_tensor(tr)])
    np.testing.assert_allclose(np.asarray(plain.transform(test).observations), y, atol=1e-15)
    with pytest.raises(RuntimeError, match="fit"):
        ChannelScaler().transform(test)
