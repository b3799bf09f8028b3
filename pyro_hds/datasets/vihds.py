"""Loader of the vi-hds plate-reader data (engineered *E. coli* double-receiver devices).

The data are the public CSV files of the repository ``microsoft/vi-hds`` (directory ``data/``,
MIT licence, commit ``007b40a``), used by Roeder, Grant, Phillips, Dalchau and Meeds, "Efficient
Amortised Bayesian Inference for Hierarchical and Nonlinear Dynamical Systems", ICML 2019.

File format (every CSV)
-----------------------
* Row 1 is a header: five metadata columns (``Content, Colony, Well Col, Well Row, Content``,
  sometimes with leading blanks), then one column per (signal, time index). The signal of a
  column is the text inside the first pair of parentheses (``Raw Data (EYFP) 3 - 0 h 23 min``)
  or, when there are none, the whole stripped cell (``EYFP``).
* Row 2 holds five empty fields, then the measurement time in hours of every column.
* Each later row is one well: device name (may be blank on unused wells), colony (blank),
  well column 1-12, well row A-H, a condition string (``C6=25000``, ``C12=308.64``,
  ``C6=25000.000000;Ara=5.000000``, ``Ara=25; C6=0``, or blank meaning no inducer), then the
  raw readings, grouped by signal in blocks whose order differs between files.
* Each signal keeps its own times: in ``proc_degrader_RemovedDuplicates.csv`` the OD700 block
  has 136 points and the other blocks 135 (one duplicated time was removed from the others
  only). Times need not be strictly increasing (``proc_PBadAiia_Ara_C6C12.csv`` repeats the
  time 17.54 h); the parser keeps the readings as they are.

The reference experiment
------------------------
:func:`load_vihds` builds the data set of the ICML paper: the six ``proc14*.csv`` files
restricted to six devices (all ``_Y81C76``), 312 wells, channels OD, mRFP1, EYFP, ECFP, on the
86-point grid of ``proc141028.csv`` (0 to 16.52 h). Each device combines a LuxR component
(Pcat, RS100, R33) and a LasR component (Pcat, S32, S34, S175). Values are raw; scale them with
:class:`ChannelScaler` fitted on training wells only (the reference scaled with all wells before
its cross-validation split, which leaks test wells into the scale).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = [
    "DEFAULT_DEVICES",
    "DEVICE_COMPONENTS",
    "LASR_COMPONENTS",
    "LUXR_COMPONENTS",
    "VIHDS_COMMIT",
    "VIHDS_FILES",
    "VIHDS_SHA256",
    "ChannelScaler",
    "fetch_vihds",
    "folds",
    "heldout_device_split",
    "load_vihds",
    "parse_condition",
    "read_platereader_csv",
    "train_test",
]

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

#: Commit of microsoft/vi-hds whose ``data/`` directory the loader downloads.
VIHDS_COMMIT = "007b40a13342ca5410126ea122585a12fba60137"
_BASE_URL = f"https://raw.githubusercontent.com/microsoft/vi-hds/{VIHDS_COMMIT}/data/"

#: SHA-256 of every CSV of the repository at :data:`VIHDS_COMMIT` (checked after download).
VIHDS_SHA256: dict[str, str] = {
    "proc140916.csv": "f0b5304db0fbcaddd32d54257964b5b3136687c272028a677a057e7db5d6d3b0",
    "proc140930.csv": "f38530f862f3b82f86a867b0185ba9881695e17b4fca352e66af614dffb9b698",
    "proc141006.csv": "d8a7694b9d3b6535fb9c3a5d510f1b9e57eb40cc700f801fa04e7b9572a87d78",
    "proc141021.csv": "ea89cfee94d7f3e9b0fb2571c912a28ea2375c697dfe3b0eab67af75100b80e5",
    "proc141023.csv": "a5bf53b54bc0d894fd94f4a251a558a7c0d5398f020508d9551dafffc0ad81a5",
    "proc141028.csv": "2888ca87df776851d0a98e92a56d78be621c88681e24d826017bab10491d13aa",
    "proc_EC10G_EtOH.csv": "5b81c8aae6bc2dfca463d1255e283612b815560803cd3963e57b930d27471de2",
    "proc_PBadAiia_Ara_C6C12.csv": (
        "c7eb174932bc04427fbf311f1d3371ddca45ae7ba6047cc7cb8fa93a87c7c2a6"
    ),
    "proc_PBadYFP.csv": "5734f35ff26060c01a1776a83fa0db94cec57eb0b59d4125a3f944505337b72b",
    "proc_PRPR_Chlor.csv": "14f591bfe4b958ee16154b65f7017219c45f93d85788848a50baceff20910bf4",
    "proc_Relays_RemovedOutlier.csv": (
        "b5cae493099eb7e09bbd4f519f2c3747aca7ec2e0531850a80ed247ba2d86200"
    ),
    "proc_degrader_RemovedDuplicates.csv": (
        "d13eef7f68c0a6a26b8f6af20ef7961cde10fc0676debc54c87ae9610e2088eb"
    ),
}

#: The six files of the reference experiment, in the reference's order (wells are stacked in
#: this order, then in row order within each file).
VIHDS_FILES: tuple[str, ...] = (
    "proc140916.csv",
    "proc140930.csv",
    "proc141006.csv",
    "proc141021.csv",
    "proc141023.csv",
    "proc141028.csv",
)

#: The six devices of the reference experiment (names as in the CSV files).
DEFAULT_DEVICES: tuple[str, ...] = (
    "Pcat_Y81C76",
    "RS100S32_Y81C76",
    "RS100S34_Y81C76",
    "R33S32_Y81C76",
    "R33S34_Y81C76",
    "R33S175_Y81C76",
)

#: Component vocabularies of the group features (one-hot LuxR, then one-hot LasR).
LUXR_COMPONENTS: tuple[str, ...] = ("Pcat", "RS100", "R33")
LASR_COMPONENTS: tuple[str, ...] = ("Pcat", "S32", "S34", "S175")

#: (LuxR component, LasR component) of each double-receiver device, by short name.
DEVICE_COMPONENTS: dict[str, tuple[str, str]] = {
    "Pcat": ("Pcat", "Pcat"),
    "RS100S32": ("RS100", "S32"),
    "RS100S34": ("RS100", "S34"),
    "R33S32": ("R33", "S32"),
    "R33S34": ("R33", "S34"),
    "R33S175": ("R33", "S175"),
}

_DEVICE_SUFFIX = "_Y81C76"
_META_COLUMNS = 5
_RESERVED = (
    "file",
    "well",
    "row",
    "column",
    "device",
    "condition",
    "signal",
    "time_index",
    "time",
    "value",
)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def parse_condition(text: str, *, where: str = "") -> dict[str, float]:
    """Parse a plate-reader condition string into ``{inducer: concentration}``.

    ``"C6=25000"`` -> ``{"C6": 25000.0}``; ``"C6=25000.000000;Ara=5.000000"`` ->
    ``{"C6": 25000.0, "Ara": 5.0}``; ``"Ara=25; C6=0"`` -> ``{"Ara": 25.0, "C6": 0.0}``; a blank
    string means no inducer (``{}``; every concentration is 0). Concentrations are in the
    units of the file (nM for the AHLs C6 and C12).

    Raises:
        ValueError: on a term that is not ``name=number`` or a repeated name; ``where`` (e.g.
            ``"proc140916.csv, well A1"``) is put in the message.
    """
    out: dict[str, float] = {}
    stripped = text.strip()
    if not stripped:
        return out
    loc = f" ({where})" if where else ""
    for term in stripped.split(";"):
        term = term.strip()
        if not term:
            continue
        name, sep, value = term.partition("=")
        name = name.strip()
        try:
            conc = float(value) if sep else math.nan
        except ValueError:
            conc = math.nan
        if not sep or not name or not math.isfinite(conc):
            raise ValueError(
                f"cannot parse condition {text!r}{loc}: term {term!r} is not of the form "
                "'name=number' (expected e.g. 'C6=25000' or 'C6=25000;Ara=5'); fix the "
                "condition column of the file"
            )
        if name in out:
            raise ValueError(f"condition {text!r}{loc} names {name!r} twice")
        out[name] = conc
    return out


def _signal_of(header: str) -> str:
    """Signal name of a data column header: text in the first parentheses, else the cell."""
    m = re.search(r"\(([^()]*)\)", header)
    return (m.group(1) if m else header).strip()


@dataclass
class _PlateFile:
    """One parsed CSV: per-well metadata and, per signal, its times and readings.

    ``wells`` has one row per well (file order) with columns well, row, column, device,
    condition and one float column per inducer (0 where absent). ``signals[s] = (times (T_s,),
    values (W, T_s))``; unparsable/empty readings are NaN.
    """

    name: str
    wells: pd.DataFrame
    inducers: tuple[str, ...]
    signals: dict[str, tuple[np.ndarray, np.ndarray]]


def _read_plate(path: Path, *, drop_blank_devices: bool = True) -> _PlateFile:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    fname = path.name
    if len(rows) < 2:
        raise ValueError(
            f"{fname}: expected a header row, a row of times and one row per well; found "
            f"{len(rows)} row(s)"
        )
    header, time_row = rows[0], rows[1]
    ncol = len(header)
    if ncol <= _META_COLUMNS:
        raise ValueError(
            f"{fname}: the header has {ncol} columns; expected 5 metadata columns "
            "(Content, Colony, Well Col, Well Row, Content) followed by data columns"
        )
    if header[0].strip().lower() != "content":
        raise ValueError(
            f"{fname}: first header cell is {header[0]!r}; expected 'Content' (is this a "
            "vi-hds plate-reader CSV?)"
        )
    if len(time_row) != ncol:
        raise ValueError(
            f"{fname}, row 2 (times): {len(time_row)} fields, expected {ncol} like the header"
        )
    col_signals = [_signal_of(h) for h in header[_META_COLUMNS:]]
    if any(not s for s in col_signals):
        j = next(i for i, s in enumerate(col_signals) if not s) + _META_COLUMNS + 1
        raise ValueError(f"{fname}: header column {j} has no signal name ({header[j - 1]!r})")
    times_all = np.empty(len(col_signals))
    for j, cell in enumerate(time_row[_META_COLUMNS:]):
        try:
            times_all[j] = float(cell)
        except ValueError:
            raise ValueError(
                f"{fname}, row 2 (times), column {j + _META_COLUMNS + 1} "
                f"({header[j + _META_COLUMNS].strip()!r}): {cell!r} is not a time in hours"
            ) from None
    if not np.all(np.isfinite(times_all)):
        raise ValueError(f"{fname}, row 2: times must be finite numbers")

    meta: list[dict[str, Any]] = []
    conds: list[dict[str, float]] = []
    values: list[np.ndarray] = []
    seen: dict[str, int] = {}
    for r, row in enumerate(rows[2:], start=3):
        if not any(c.strip() for c in row):
            continue  # trailing empty line
        if len(row) != ncol:
            raise ValueError(f"{fname}, row {r}: {len(row)} fields, expected {ncol}")
        device = row[0].strip()
        wrow, wcol = row[3].strip(), row[2].strip()
        try:
            col_int = int(float(wcol))
        except ValueError:
            raise ValueError(f"{fname}, row {r}: well column {wcol!r} is not an integer") from None
        well = f"{wrow}{col_int}"
        if not device and drop_blank_devices:
            continue
        if well in seen:
            raise ValueError(f"{fname}: well {well} appears in rows {seen[well]} and {r}")
        seen[well] = r
        cond = parse_condition(row[4], where=f"{fname}, row {r}, well {well}")
        vals = np.full(len(col_signals), np.nan)
        for j, cell in enumerate(row[_META_COLUMNS:]):
            cell = cell.strip()
            if cell:
                try:
                    vals[j] = float(cell)
                except ValueError:
                    raise ValueError(
                        f"{fname}, row {r}, well {well}, signal {col_signals[j]!r}, time "
                        f"{times_all[j]:g} h: reading {cell!r} is not a number"
                    ) from None
        meta.append(
            {
                "well": well,
                "row": wrow,
                "column": col_int,
                "device": device,
                "condition": row[4].strip(),
            }
        )
        conds.append(cond)
        values.append(vals)

    inducers = tuple(dict.fromkeys(k for c in conds for k in c))
    clash = [k for k in inducers if k in _RESERVED or k == "blank_device"]
    if clash:
        raise ValueError(f"{fname}: condition names {clash} clash with reserved column names")
    wells = pd.DataFrame(meta, columns=["well", "row", "column", "device", "condition"])
    for k in inducers:
        wells[k] = np.array([c.get(k, 0.0) for c in conds], dtype=float)
    if not drop_blank_devices:
        wells["blank_device"] = wells["device"] == ""
    mat = np.stack(values) if values else np.empty((0, len(col_signals)))
    sig_arr = np.asarray(col_signals)
    signals: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in dict.fromkeys(col_signals):
        sel = sig_arr == s
        signals[s] = (times_all[sel], mat[:, sel])
    return _PlateFile(fname, wells, inducers, signals)


def read_platereader_csv(
    path: str | os.PathLike[str], *, drop_blank_devices: bool = True
) -> pd.DataFrame:
    """Read one vi-hds plate-reader CSV into a long table (one row per reading).

    Columns, in this order:

    ``file`` (file stem, e.g. ``"proc140916"``), ``well`` (``"A1"``), ``row`` (``"A"``),
    ``column`` (int 1-12), ``device`` (str), ``condition`` (the raw string), one float column per
    inducer named in the file's conditions (``C6``, ``C12``, ``Ara``, ...; concentration in the
    file's units, nM for AHLs, 0.0 where a well's condition does not name it; a blank condition is
    0 of everything), ``blank_device`` (bool, only when ``drop_blank_devices=False``),
    ``signal`` (``"OD"``, ``"EYFP"``, ...), ``time_index`` (position within the signal's own
    block, from 0), ``time`` (hours, from row 2 of the file) and ``value`` (raw reading, float;
    NaN where the cell is empty).

    Rows are ordered by well (file order), then signal (block order of the file), then time.
    Each signal keeps its own times, so signals may have different lengths (the degrader file).
    To get a wide table: ``df.pivot_table(index=["file", "well"], columns=["signal",
    "time_index"], values="value")``.

    Args:
        path: the CSV file.
        drop_blank_devices: drop wells whose device name is blank (unused wells; default), or
            keep them with ``device == ""`` and ``blank_device == True``.

    Raises:
        ValueError: malformed file; the message names the file, row, well, signal and time.
    """
    p = Path(path)
    plate = _read_plate(p, drop_blank_devices=drop_blank_devices)
    pieces = []
    n_wells = len(plate.wells)
    for s, (times, vals) in plate.signals.items():
        T = len(times)
        block = plate.wells.loc[np.repeat(np.arange(n_wells), T)].reset_index(drop=True)
        block["signal"] = s
        block["time_index"] = np.tile(np.arange(T), n_wells)
        block["time"] = np.tile(times, n_wells)
        block["value"] = vals.reshape(-1)
        block["_w"] = np.repeat(np.arange(n_wells), T)
        pieces.append(block)
    out = pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame()
    if len(out):
        # Order by well, then signal block, then time (stable sort keeps block order).
        out = out.sort_values("_w", kind="stable").drop(columns="_w").reset_index(drop=True)
    out.insert(0, "file", p.stem)
    return out


# --------------------------------------------------------------------------------------------
# Locating / downloading the files
# --------------------------------------------------------------------------------------------


def _has_files(d: Path, files: Sequence[str]) -> bool:
    return d.is_dir() and all((d / f).is_file() for f in files)


def _candidate_dirs(d: Path) -> list[Path]:
    """A directory holding the CSVs, or a parent holding ``vi-hds/``."""
    return [d, d / "vi-hds"]


def _default_search_dirs() -> list[Path]:
    """``../shared/data/vi-hds`` relative to the current directory and to the repository root."""
    repo_root = Path(__file__).resolve().parents[2]
    out = [Path.cwd() / ".." / "shared" / "data" / "vi-hds"]
    if (repo_root / "pyproject.toml").is_file():
        out.append(repo_root / ".." / "shared" / "data" / "vi-hds")
    return out


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyro_hds" / "vi-hds"


def _download_file(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` atomically (temporary file in the same directory, then
    :func:`os.replace`). Tests replace this function; it is the only network access."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            while chunk := resp.read(1 << 16):
                out.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_vihds(
    path: str | os.PathLike[str] | None = None,
    *,
    files: Sequence[str] = VIHDS_FILES,
    download: bool = True,
) -> Path:
    """Return a directory that holds ``files`` of the vi-hds data, downloading them if needed.

    Resolution order:

    1. ``path`` if given: a directory holding the CSVs, or a parent holding ``vi-hds/``.
       Missing files raise ``FileNotFoundError`` (no download into a directory you named).
    2. ``$PYRO_HDS_DATA`` if set, with the same two forms and the same strictness.
    3. ``../shared/data/vi-hds`` relative to the current directory, then relative to the
       repository root (development checkouts).
    4. The user cache ``$XDG_CACHE_HOME/pyro_hds/vi-hds`` (default ``~/.cache/pyro_hds/vi-hds``);
       files missing there are downloaded from
       ``https://raw.githubusercontent.com/microsoft/vi-hds/<VIHDS_COMMIT>/data/<file>``,
       written atomically and checked against :data:`VIHDS_SHA256`.

    Raises:
        FileNotFoundError: files missing where ``path``/``$PYRO_HDS_DATA`` point, or missing
            from every location and ``download=False``.
        RuntimeError: the download failed or gave a file with the wrong checksum.
    """
    files = list(files)
    if not files:
        raise ValueError("fetch_vihds: `files` is empty; name at least one CSV file")
    for label, given in (("path", path), ("$PYRO_HDS_DATA", os.environ.get("PYRO_HDS_DATA"))):
        if given is None or (label != "path" and not str(given).strip()):
            continue
        for d in _candidate_dirs(Path(given).expanduser()):
            if _has_files(d, files):
                return d
        base = Path(given).expanduser()
        missing = [f for f in files if not (base / f).is_file()]
        raise FileNotFoundError(
            f"{label} = {str(given)!r} does not hold the vi-hds files {missing} (looked in "
            f"{base} and {base / 'vi-hds'}). Point it at the directory holding the CSVs (or a "
            "parent holding vi-hds/), or leave it unset to use the download cache."
        )
    for d in _default_search_dirs():
        if _has_files(d, files):
            return d.resolve()
    cache = _cache_dir()
    missing = [f for f in files if not (cache / f).is_file()]
    if not missing:
        return cache
    if not download:
        raise FileNotFoundError(
            f"vi-hds files {missing} were not found (searched the `path` argument, "
            f"$PYRO_HDS_DATA, ../shared/data/vi-hds and the cache {cache}) and download=False. "
            "Pass download=True, or set PYRO_HDS_DATA to a directory holding the CSVs."
        )
    for f in missing:
        url = _BASE_URL + f
        dest = cache / f
        try:
            _download_file(url, dest)
        except (OSError, urllib.error.URLError) as err:
            raise RuntimeError(
                f"downloading {url} to {dest} failed ({err}). Check the network, or download the "
                "file yourself and set PYRO_HDS_DATA to its directory."
            ) from err
        want = VIHDS_SHA256.get(f)
        if want is not None:
            got = _sha256(dest)
            if got != want:
                dest.unlink()
                raise RuntimeError(
                    f"downloaded {url} has SHA-256 {got}, expected {want}; the file was "
                    "removed. Retry, or download it yourself and set PYRO_HDS_DATA."
                )
    return cache


# --------------------------------------------------------------------------------------------
# The reference experiment
# --------------------------------------------------------------------------------------------


def _short_name(device: str) -> str:
    return device[: -len(_DEVICE_SUFFIX)] if device.endswith(_DEVICE_SUFFIX) else device


def _nearest_indices(source: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """For each grid time, the index of the nearest source time (the first one on ties)."""
    return np.abs(source[None, :] - grid[:, None]).argmin(axis=1)


def load_vihds(
    path: str | os.PathLike[str] | None = None,
    *,
    devices: Sequence[str] = DEFAULT_DEVICES,
    signals: Sequence[str] = ("OD", "mRFP1", "EYFP", "ECFP"),
    files: Sequence[str] = VIHDS_FILES,
    grid_file: str = "proc141028.csv",
    download: bool = True,
    max_time_gap: float | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    r"""The double-receiver data set of the vi-hds paper as a :class:`pyro_hds.Dataset`.

    Wells of ``devices`` in ``files`` (stacked in file order, then row order within a file,
    which is the reference's order) are put on one time grid: the times of the ``OD`` block of
    ``grid_file`` (86 points, 0-16.52 h, for ``proc141028.csv``, the file with the fewest
    points, as the reference chose). **Merging rule (the reference's):** for a grid time
    :math:`\tau_j` and a file whose signal ``s`` was read at times :math:`t_1..t_{T_s}`, the
    value used is the reading at :math:`\arg\min_k |t_k - \tau_j|` (the first on ties); each
    signal uses its own times. The largest :math:`|t_k - \tau_j|` of the default data is
    0.0075 h; ``max_time_gap`` (default: half the smallest grid spacing, 0.097 h) raises if a
    file's nearest reading is farther than that, e.g. a file that ends before the grid.

    Wells whose condition names a non-zero inducer other than C6 and C12 are excluded, as in the
    reference (none of the default devices has one).

    With the defaults: 312 wells (Pcat, RS100S32, RS100S34, R33S32, R33S34: 48 each; R33S175:
    72), observations ``(312, 86, 4)`` of raw readings, channels ``("OD", "mRFP1", "EYFP",
    "ECFP")``, inputs ``(312, 2)`` = C6, C12 concentrations in nM (one is 0 in every well),
    groups = devices with short names (``"Pcat"``, ``"RS100S32"``, ...), group features
    ``(6, 7)`` = one-hot LuxR component (Pcat, RS100, R33) concatenated with one-hot LasR
    component (Pcat, S32, S34, S175), feature names ``"LuxR:Pcat"``, ..., ``"LasR:S175"``,
    individual ids ``"<file stem>/<well>"`` such as ``"proc140916/A1"``.

    No scaling is applied. The reference divided each channel by its maximum over all wells and
    subtracted each series' minimum; use :class:`ChannelScaler` fitted on the training wells.
    The reference fed ``log(1 + c)`` of the inputs to its networks; that transform is left to the
    model.

    Args:
        path: data directory (see :func:`fetch_vihds` for the resolution order).
        devices: device names as in the files (``"R33S175_Y81C76"``) or short names
            (``"R33S175"``); must be keys of :data:`DEVICE_COMPONENTS` after removing
            ``_Y81C76``. Group order follows this argument.
        signals: channels, in this order.
        files: the CSV files to read.
        grid_file: the file whose OD times form the grid (read even if not in ``files``).
        download: allow downloading missing files into the user cache.
        max_time_gap: largest allowed distance in hours between a grid time and the reading
            used for it.
        dtype: floating dtype of the tensors (default ``torch.get_default_dtype()``).
    """
    from pyro_hds.data import Dataset  # local import: data.py imports nothing from here

    devices = list(devices)
    if not devices:
        raise ValueError("load_vihds: `devices` is empty; name at least one device")
    short = [_short_name(d) for d in devices]
    unknown = [d for d, s in zip(devices, short) if s not in DEVICE_COMPONENTS]
    if unknown:
        raise ValueError(
            f"load_vihds: unknown device(s) {unknown}; known double-receiver devices are "
            f"{[s + _DEVICE_SUFFIX for s in DEVICE_COMPONENTS]} (short names accepted)"
        )
    if len(set(short)) != len(short):
        raise ValueError(f"load_vihds: devices {devices} name a device twice")
    full = [s + _DEVICE_SUFFIX for s in short]
    signals = list(signals)
    if not signals or len(set(signals)) != len(signals):
        raise ValueError(f"load_vihds: `signals` must be distinct and non-empty, got {signals}")
    files = list(files)
    needed = list(dict.fromkeys([*files, grid_file]))
    root = fetch_vihds(path, files=needed, download=download)

    grid_plate = _read_plate(root / grid_file)
    if "OD" not in grid_plate.signals:
        raise ValueError(f"{grid_file}: has no OD block to take the time grid from")
    grid = grid_plate.signals["OD"][0]
    if grid.size > 1 and not np.all(np.diff(grid) > 0):
        raise ValueError(f"{grid_file}: the OD times are not strictly increasing")
    if max_time_gap is None:
        max_time_gap = 0.5 * float(np.diff(grid).min()) if grid.size > 1 else math.inf

    code_of = {name: g for g, name in enumerate(full)}
    obs_parts: list[np.ndarray] = []
    inp_parts: list[np.ndarray] = []
    grp_parts: list[np.ndarray] = []
    ids: list[str] = []
    for f in files:
        plate = grid_plate if f == grid_file else _read_plate(root / f)
        w = plate.wells
        keep = w["device"].isin(full).to_numpy().copy()
        other = [k for k in plate.inducers if k not in ("C6", "C12")]
        if other:
            keep &= (w[other].to_numpy() == 0).all(axis=1)
        if not keep.any():
            continue
        absent = [s for s in signals if s not in plate.signals]
        if absent:
            raise ValueError(
                f"{f}: signal(s) {absent} not found; the file has {list(plate.signals)}"
            )
        chans = []
        for s in signals:
            t_s, v_s = plate.signals[s]
            idx = _nearest_indices(t_s, grid)
            gap = np.abs(t_s[idx] - grid)
            if gap.max() > max_time_gap:
                j = int(gap.argmax())
                raise ValueError(
                    f"{f}, signal {s}: the reading nearest to grid time {grid[j]:g} h is at "
                    f"{t_s[idx[j]]:g} h, {gap[j]:.3g} h away (max_time_gap={max_time_gap:.3g}); "
                    "the file does not cover the grid. Choose another grid_file or raise "
                    "max_time_gap."
                )
            chans.append(v_s[keep][:, idx])
        obs_parts.append(np.stack(chans, axis=-1))
        sub = w[keep]
        inp_parts.append(
            np.stack(
                [
                    sub[k].to_numpy(dtype=float) if k in sub else np.zeros(len(sub))
                    for k in ("C6", "C12")
                ],
                axis=-1,
            )
        )
        grp_parts.append(sub["device"].map(code_of).to_numpy())
        stem = Path(f).stem
        ids.extend(f"{stem}/{well}" for well in sub["well"])
    if not ids:
        raise ValueError(f"load_vihds: no wells of devices {devices} in files {files}")

    observations = np.concatenate(obs_parts)
    inputs = np.concatenate(inp_parts)
    groups = np.concatenate(grp_parts).astype(np.int64)
    present = set(groups.tolist())
    missing_dev = [short[g] for g in range(len(short)) if g not in present]
    if missing_dev:
        raise ValueError(f"load_vihds: devices {missing_dev} have no wells in files {files}")
    feats = np.zeros((len(short), len(LUXR_COMPONENTS) + len(LASR_COMPONENTS)))
    for g, s in enumerate(short):
        lux, las = DEVICE_COMPONENTS[s]
        feats[g, LUXR_COMPONENTS.index(lux)] = 1.0
        feats[g, len(LUXR_COMPONENTS) + LASR_COMPONENTS.index(las)] = 1.0
    feature_names = tuple(
        [f"LuxR:{c}" for c in LUXR_COMPONENTS] + [f"LasR:{c}" for c in LASR_COMPONENTS]
    )

    dt = dtype if dtype is not None else torch.get_default_dtype()
    mask = np.isfinite(observations)
    observations = np.where(mask, observations, 0.0)
    return Dataset.from_arrays(
        torch.as_tensor(observations, dtype=dt),
        torch.as_tensor(grid, dtype=dt),
        mask=torch.as_tensor(mask),
        inputs=torch.as_tensor(inputs, dtype=dt),
        input_names=("C6", "C12"),
        groups=torch.as_tensor(groups),
        group_names=tuple(short),
        group_features=torch.as_tensor(feats, dtype=dt),
        feature_names=feature_names,
        individual_ids=tuple(ids),
        channel_names=tuple(signals),
        allow_missing=not bool(mask.all()),
    )


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def folds(data: Any, k: int = 4, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K-fold cross-validation splits of the individuals (wells).

    A permutation of ``range(N)`` drawn by ``numpy.random.RandomState(seed)`` is cut into ``k``
    near-equal chunks (``numpy.array_split``); fold ``i`` tests on chunk ``i`` (sorted) and
    trains on the rest. This is the reference's rule (``np.random.seed(seed)``, then
    ``np.random.permutation``), so with the wells in the reference's order fold ``i`` is its
    ``--split i+1``.

    Returns:
        list of ``k`` pairs ``(train_idx, test_idx)`` of sorted int64 arrays; the test sets
        partition ``range(N)``.
    """
    n = len(data)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= n:
        raise ValueError(f"folds: k must be an integer in [2, N={n}], got {k!r}")
    perm = np.random.RandomState(seed).permutation(n)
    all_idx = np.arange(n, dtype=np.int64)
    out = []
    for chunk in np.array_split(perm, int(k)):
        test = np.sort(chunk).astype(np.int64)
        out.append((np.setdiff1d(all_idx, test), test))
    return out


def train_test(
    data: Any, train_idx: Any, test_idx: Any, *, dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """Training and test data sets of a split (:func:`folds`, :func:`heldout_device_split`),
    each standalone, scaled by a :class:`ChannelScaler` fitted on the training wells only, and
    optionally cast to ``dtype``."""
    train = data[torch.as_tensor(np.asarray(train_idx))].standalone()
    test = data[torch.as_tensor(np.asarray(test_idx))].standalone()
    scaler = ChannelScaler().fit(train)
    train, test = scaler.transform(train), scaler.transform(test)
    if dtype is not None:
        train, test = train.to(dtype=dtype), test.to(dtype=dtype)
    return train, test


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def heldout_device_split(data: Any, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot split: test on every well of ``device``, train on all other wells.

    ``device`` is a group name (``"R33S175"``) or the file's name (``"R33S175_Y81C76"``).

    Returns:
        ``(train_idx, test_idx)``, sorted int64 arrays.
    """
    names = list(data.group_names)
    name = device if device in names else _short_name(device)
    if name not in names:
        raise ValueError(f"heldout_device_split: unknown device {device!r}; groups are {names}")
    groups = _as_numpy(data.groups)
    is_test = groups == names.index(name)
    if not is_test.any():
        raise ValueError(f"heldout_device_split: device {device!r} has no wells in this data set")
    idx = np.arange(len(groups), dtype=np.int64)
    return idx[~is_test], idx[is_test]


# --------------------------------------------------------------------------------------------
# Scaling
# --------------------------------------------------------------------------------------------


class ChannelScaler:
    r"""Per-channel scaling of plate-reader data, fitted on training wells only.

    :meth:`fit` stores :math:`s_c = \max_{i,t:\,m_{itc}} y_{itc}` over the wells it is given
    (observed entries only). :meth:`transform` returns

    .. math:: \tilde y_{itc} = y_{itc}/s_c - \min_{t':\,m_{it'c}} y_{it'c}/s_c

    (the second term only with ``subtract_background=True``): each channel divided by its
    training maximum, then each series shifted so that its own minimum over time is 0. This is
    the reference's preprocessing (``scale_data`` in vi-hds), except that the reference took the
    maximum over all wells before splitting; here the test wells never influence :math:`s_c`.
    Unobserved entries stay 0 and masked.

    Shapes: ``scales`` is ``(C,)``; data observations ``(N, T, C)``.
    """

    def __init__(self, *, subtract_background: bool = True) -> None:
        self.subtract_background = bool(subtract_background)
        self.scales: torch.Tensor | None = None
        self.channel_names: tuple[str, ...] | None = None

    def fit(self, data: Any) -> ChannelScaler:
        """Compute each channel's maximum over the observed entries of ``data``."""
        obs, mask = data.observations, data.mask
        if obs.shape[0] == 0:
            raise ValueError("ChannelScaler.fit: the data set has no individuals")
        neg_inf = torch.tensor(-math.inf, dtype=obs.dtype, device=obs.device)
        scales = torch.where(mask, obs, neg_inf).amax(dim=(0, 1))
        bad = [
            str(data.channel_names[c])
            for c in range(scales.shape[0])
            if not (torch.isfinite(scales[c]) and scales[c] > 0)
        ]
        if bad:
            raise ValueError(
                f"ChannelScaler.fit: channel(s) {bad} have no observed positive value; cannot "
                "divide by their maximum"
            )
        self.scales = scales
        self.channel_names = tuple(data.channel_names)
        return self

    def transform(self, data: Any) -> Any:
        """Return a copy of ``data`` with scaled observations (see the class docstring)."""
        if self.scales is None:
            raise RuntimeError("ChannelScaler.transform: call fit() on the training wells first")
        if tuple(data.channel_names) != self.channel_names:
            raise ValueError(
                f"ChannelScaler.transform: channels {tuple(data.channel_names)} differ from the "
                f"fitted ones {self.channel_names}"
            )
        obs, mask = data.observations, data.mask
        y = obs / self.scales.to(device=obs.device, dtype=obs.dtype)
        if self.subtract_background:
            pos_inf = torch.tensor(math.inf, dtype=y.dtype, device=y.device)
            mins = torch.where(mask, y, pos_inf).amin(dim=1, keepdim=True)  # (N, 1, C)
            mins = torch.where(torch.isfinite(mins), mins, torch.zeros_like(mins))
            y = y - mins
        y = torch.where(mask, y, torch.zeros_like(y))
        return _with_observations(data, y)

    def fit_transform(self, data: Any) -> Any:
        """``fit(data)`` then ``transform(data)``."""
        return self.fit(data).transform(data)


def _with_observations(data: Any, observations: torch.Tensor) -> Any:
    """A copy of ``data`` with new observations (everything else shared)."""
    replace = getattr(data, "replace", None)
    if callable(replace):
        return replace(observations=observations)
    import dataclasses

    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return dataclasses.replace(data, observations=observations)
    to_state = getattr(data, "state_dict", None)
    from_state = getattr(type(data), "from_state_dict", None)
    if callable(to_state) and callable(from_state):
        state = dict(to_state())
        if "observations" in state:
            state["observations"] = observations
            return from_state(state)
    raise TypeError(f"cannot copy a {type(data).__name__} with new observations")
