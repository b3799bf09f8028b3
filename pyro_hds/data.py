"""The data container: N individuals x T times x C channels, with masks, inputs, groups, doses.

A :class:`Dataset` holds

* ``times``: ``(T,)`` when every individual shares the grid, else ``(N, T)``, nondecreasing per
  individual; ragged grids are padded by repeating the individual's last time;
* ``observations``: ``(N, T, C)`` float, 0.0 where nothing was observed (never NaN);
* ``mask``: ``(N, T, C)`` bool, True where observed;
* ``inputs``: ``(N, D)`` float covariates or treatments, constant per individual, with
  ``input_names``;
* ``groups``: ``(N,)`` integer codes into ``group_names``; optional ``group_features`` ``(G, F)``
  describing each group (e.g. which components a device is built from) with ``feature_names``;
* ``doses``: optional :class:`Doses` (NONMEM-style dosing events);
* labels ``individual_ids`` and ``channel_names``;
* ``total_size`` and ``indices``: a minibatch ``data[idx]`` remembers the size of the data set it
  came from and the positions of its individuals there, so that
  :func:`pyro_hds.individuals` scales its log-likelihood by ``N / B``.

Every constructor validates its input and raises :class:`DataValidationError` (a
``ValueError``) naming the column, individual and time at fault and saying how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["DataValidationError", "Dataset", "Doses"]


class DataValidationError(ValueError):
    """Invalid data given to :class:`Dataset`; the message says what, where and how to fix it."""


def _float_dtype(dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None else torch.get_default_dtype()


def _as_numeric(name: str, value: Any, dtype: torch.dtype) -> torch.Tensor:
    """Convert to a float tensor, refusing object, string, bool-as-number confusions, complex."""
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise DataValidationError(f"{name}: complex values are not supported")
        return value.to(dtype)
    arr = np.asarray(value)
    if arr.dtype.kind in "OUSV":
        flat = arr.reshape(-1)
        bad = None
        for v in flat:
            try:
                float(v)
            except (TypeError, ValueError):
                bad = v
                break
        if bad is not None:
            raise DataValidationError(
                f"{name}: non-numeric value {str(bad)!r}; convert the column to numbers "
                "(e.g. pandas.to_numeric) or drop the offending rows"
            )
        arr = arr.astype(np.float64)
    if arr.dtype.kind == "c":
        raise DataValidationError(f"{name}: complex values are not supported")
    if arr.dtype.kind not in "biuf":
        raise DataValidationError(f"{name}: unsupported dtype {arr.dtype}")
    return torch.as_tensor(arr.astype(np.float64)).to(dtype)


@dataclasses.dataclass(frozen=True)
class Doses:
    """Dosing events per individual: at ``times[i, m]`` add ``amounts[i, m]`` to state
    ``targets[i, m]``.

    Shapes ``(N, M)``; individuals with fewer than ``M`` doses are padded with time ``+inf``,
    amount 0 and target 0. An observation at a dose's time is the pre-dose value.
    """

    times: torch.Tensor
    amounts: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        t, a, g = self.times, self.amounts, self.targets
        if t.dim() != 2 or a.shape != t.shape or g.shape != t.shape:
            raise DataValidationError(
                f"Doses: times, amounts and targets must share one (N, M) shape; got "
                f"{tuple(t.shape)}, {tuple(a.shape)}, {tuple(g.shape)}"
            )
        if g.dtype not in (torch.int64, torch.int32):
            raise DataValidationError(
                f"Doses: targets must be integer state indices, got {g.dtype}"
            )
        real = torch.isfinite(t)
        if bool((t[real] < 0).any()) or bool(torch.isnan(t).any()) or bool((t == -math.inf).any()):
            i = int(((t < 0) | torch.isnan(t)).any(-1).nonzero()[0])
            raise DataValidationError(
                f"Doses: individual {i} has a negative or NaN dose time; dose times must be "
                ">= 0 (pad missing doses with +inf)"
            )
        if not bool(torch.isfinite(a[real]).all()):
            i = int((real & ~torch.isfinite(a)).any(-1).nonzero()[0])
            raise DataValidationError(f"Doses: individual {i} has a non-finite dose amount")
        if bool((g < 0).any()):
            raise DataValidationError("Doses: targets must be >= 0 (state indices)")

    def __getitem__(self, idx: Any) -> Doses:
        return Doses(self.times[idx], self.amounts[idx], self.targets[idx])

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Doses:
        return Doses(
            self.times.to(device=device, dtype=dtype or self.times.dtype),
            self.amounts.to(device=device, dtype=dtype or self.amounts.dtype),
            self.targets.to(device=device),
        )


def _names(kind: str, given: Sequence[Any] | None, count: int, prefix: str) -> tuple[str, ...]:
    if given is None:
        return tuple(f"{prefix}{i}" for i in range(count))
    names = tuple(str(x) for x in given)
    if len(names) != count:
        raise DataValidationError(f"{kind}: expected {count} names, got {len(names)}: {names}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataValidationError(f"{kind}: duplicate name {dup!r}; names must be unique")
    return names


class Dataset:
    """N individuals x T times x C channels (see the module docstring for every attribute).

    Build one with :meth:`from_arrays`, :meth:`from_dataframe` or :meth:`from_xarray`.
    ``len(data)`` is N; ``data[idx]`` (int, slice, sequence, bool mask, tensor or array) is a
    :class:`Dataset` of those individuals that keeps ``total_size``, the group tables and maps
    ``indices`` to the full data set.
    """

    def __init__(
        self,
        *,
        times: torch.Tensor,
        observations: torch.Tensor,
        mask: torch.Tensor,
        inputs: torch.Tensor,
        input_names: tuple[str, ...],
        groups: torch.Tensor,
        group_names: tuple[str, ...],
        group_features: torch.Tensor | None,
        feature_names: tuple[str, ...],
        individual_ids: tuple[str, ...],
        channel_names: tuple[str, ...],
        doses: Doses | None,
        total_size: int,
        indices: torch.Tensor,
    ) -> None:
        self.times = times
        self.observations = observations
        self.mask = mask
        self.inputs = inputs
        self.input_names = input_names
        self.groups = groups
        self.group_names = group_names
        self.group_features = group_features
        self.feature_names = feature_names
        self.individual_ids = individual_ids
        self.channel_names = channel_names
        self.doses = doses
        self.total_size = int(total_size)
        self.indices = indices

    # -- shape facts --------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.observations.shape[0])

    @property
    def num_individuals(self) -> int:
        return len(self)

    @property
    def num_times(self) -> int:
        return int(self.observations.shape[1])

    @property
    def num_channels(self) -> int:
        return int(self.observations.shape[2])

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def num_inputs(self) -> int:
        return int(self.inputs.shape[-1])

    @property
    def shared_times(self) -> bool:
        """True when all individuals share one time grid (``times`` has shape ``(T,)``)."""
        return self.times.dim() == 1

    def __repr__(self) -> str:
        grid = "shared" if self.shared_times else "per-individual"
        missing = int((~self.mask).sum())
        extra = f", {self.doses.times.shape[1]} dose slots" if self.doses is not None else ""
        sub = f" of {self.total_size}" if self.total_size != len(self) else ""
        return (
            f"Dataset({len(self)}{sub} individuals x {self.num_times} times ({grid} grid) x "
            f"{self.num_channels} channels {list(self.channel_names)}, {self.num_groups} groups, "
            f"{self.num_inputs} inputs, {missing} missing entries{extra})"
        )

    # -- indexing and copies ------------------------------------------------------------------

    def _index(self, idx: Any) -> torch.Tensor:
        n = len(self)
        if isinstance(idx, int | np.integer):
            i = int(idx)
            if not -n <= i < n:
                raise IndexError(f"individual index {i} out of range for {n} individuals")
            return torch.tensor([i % n])
        if isinstance(idx, slice):
            return torch.arange(n)[idx]
        t = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
        if t.dtype == torch.bool:
            if t.shape != (n,):
                raise IndexError(f"boolean index of shape {tuple(t.shape)} for {n} individuals")
            return t.nonzero().flatten().cpu()
        t = t.long().flatten().cpu()
        if bool(((t < -n) | (t >= n)).any()):
            raise IndexError(f"individual index out of range for {n} individuals")
        return t % n

    def __getitem__(self, idx: Any) -> Dataset:
        i = self._index(idx)
        dev = self.observations.device
        j = i.to(dev)
        return self.replace(
            times=self.times if self.shared_times else self.times[j],
            observations=self.observations[j],
            mask=self.mask[j],
            inputs=self.inputs[j],
            groups=self.groups[j],
            individual_ids=tuple(self.individual_ids[k] for k in i.tolist()),
            doses=None if self.doses is None else self.doses[j],
            indices=self.indices[j],
        )

    def standalone(self) -> Dataset:
        """This set of individuals as a data set of its own: ``total_size = len(self)`` and
        ``indices = 0..N-1`` (a subset ``data[idx]`` otherwise remembers the set it was cut
        from, and the individuals plate would scale it as a minibatch of that set)."""
        if self.total_size == len(self):
            return self
        n = len(self)
        return self.replace(total_size=n, indices=torch.arange(n, device=self.indices.device))

    def replace(self, **changes: Any) -> Dataset:
        """A copy with some attributes replaced (no re-validation beyond shapes)."""
        state = {k: getattr(self, k) for k in _FIELDS}
        unknown = set(changes) - set(state)
        if unknown:
            raise TypeError(f"Dataset.replace(): unknown fields {sorted(unknown)}")
        state.update(changes)
        if "observations" in changes and tuple(changes["observations"].shape) != tuple(
            state["mask"].shape
        ):
            raise DataValidationError(
                f"replace(observations=...): shape {tuple(changes['observations'].shape)} != "
                f"mask shape {tuple(state['mask'].shape)}"
            )
        return Dataset(**state)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Dataset:
        """Move tensors to ``device``; cast floating tensors to ``dtype``."""

        def f(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            if x.is_floating_point():
                return x.to(device=device, dtype=dtype or x.dtype)
            return x.to(device=device)

        return self.replace(
            times=f(self.times),
            observations=f(self.observations),
            mask=f(self.mask),
            inputs=f(self.inputs),
            groups=f(self.groups),
            group_features=f(self.group_features),
            doses=None if self.doses is None else self.doses.to(device, dtype),
            indices=f(self.indices),
        )

    # -- serialisation ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors, ints, strings and lists only (safe for ``torch.load(weights_only=True)``)."""
        state: dict[str, Any] = {}
        for k in _FIELDS:
            v = getattr(self, k)
            if isinstance(v, Doses):
                state["dose_times"], state["dose_amounts"], state["dose_targets"] = (
                    v.times,
                    v.amounts,
                    v.targets,
                )
            elif isinstance(v, tuple):
                state[k] = list(v)
            else:
                state[k] = v
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Dataset:
        """Inverse of :meth:`state_dict`."""
        s = dict(state)
        doses = None
        if "dose_times" in s:
            doses = Doses(s.pop("dose_times"), s.pop("dose_amounts"), s.pop("dose_targets"))
        s["doses"] = doses
        for k in ("input_names", "group_names", "feature_names", "individual_ids", "channel_names"):
            s[k] = tuple(s[k])
        return cls(**{k: s[k] for k in _FIELDS})

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        observations: Any,
        times: Any,
        *,
        mask: Any = None,
        inputs: Any = None,
        input_names: Sequence[str] | None = None,
        groups: Any = None,
        group_names: Sequence[str] | None = None,
        group_features: Any = None,
        feature_names: Sequence[str] | None = None,
        individual_ids: Sequence[Any] | None = None,
        channel_names: Sequence[str] | None = None,
        doses: Doses | None = None,
        allow_missing: bool = False,
        dtype: torch.dtype | None = None,
    ) -> Dataset:
        """Build from arrays or tensors.

        :param observations: ``(N, T, C)`` (or ``(N, T)`` for one channel); NaN marks a missing
            value, allowed only with ``allow_missing=True``.
        :param times: ``(T,)`` shared or ``(N, T)`` per individual, nondecreasing and without
            repeats, except that a ragged grid may be padded by repeating its last time where
            the mask is False.
        :param mask: ``(N, T, C)`` bool, True where observed (default: where not NaN).
        :param inputs: ``(N, D)`` covariates; ``groups`` ``(N,)`` integer codes or labels.
        :param group_features: ``(G, F)`` description of each group.
        """
        dt = _float_dtype(dtype)
        y = _as_numeric("observations", observations, dt)
        if y.dim() == 2:
            y = y.unsqueeze(-1)
        if y.dim() != 3:
            raise DataValidationError(
                f"observations: expected shape (N, T, C), got {tuple(y.shape)}"
            )
        n, t_len, c = y.shape
        if n == 0 or t_len == 0 or c == 0:
            raise DataValidationError(
                f"observations: empty data (shape {tuple(y.shape)}); need at least one "
                "individual, time and channel"
            )
        ids = _names("individual_ids", individual_ids, n, "")
        chans = _names("channel_names", channel_names, c, "y")
        if mask is None:
            m = torch.ones_like(y, dtype=torch.bool)
        else:
            m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
            if m.dtype != torch.bool:
                raise DataValidationError(f"mask: expected a bool array, got dtype {m.dtype}")
            if m.dim() == 2:
                m = m.unsqueeze(-1)
            if tuple(m.shape) != (n, t_len, c):
                raise DataValidationError(
                    f"mask: expected shape {(n, t_len, c)} like observations, got {tuple(m.shape)}"
                )
            m = m.to(y.device)
        nan = torch.isnan(y) & m
        if bool(nan.any()) and not allow_missing:
            i, j, k = (int(v) for v in nan.nonzero()[0])
            raise DataValidationError(
                f"observations: NaN for individual {ids[i]!r}, time index {j}, channel "
                f"{chans[k]!r}; pass allow_missing=True to treat NaN as missing, or remove it"
            )
        m = m & ~torch.isnan(y)
        inf = torch.isinf(y) & m
        if bool(inf.any()):
            i, j, k = (int(v) for v in inf.nonzero()[0])
            raise DataValidationError(
                f"observations: infinite value for individual {ids[i]!r}, time index {j}, "
                f"channel {chans[k]!r}; remove it or mark it missing"
            )
        y = torch.where(m, y, torch.zeros((), dtype=dt))

        tt = _as_numeric("times", times, dt).to(y.device)
        if tt.dim() == 1:
            if tt.shape[0] != t_len:
                raise DataValidationError(
                    f"times: {tt.shape[0]} times for observations with {t_len} time points"
                )
        elif tt.dim() == 2:
            if tuple(tt.shape) != (n, t_len):
                raise DataValidationError(
                    f"times: expected shape {(n, t_len)} (one grid per individual), got "
                    f"{tuple(tt.shape)}"
                )
        else:
            raise DataValidationError(f"times: expected (T,) or (N, T), got {tuple(tt.shape)}")
        if not bool(torch.isfinite(tt).all()):
            raise DataValidationError("times: NaN or infinite time; every time must be finite")
        grid = tt if tt.dim() == 2 else tt.unsqueeze(0)
        diffs = grid[:, 1:] - grid[:, :-1]
        if bool((diffs < 0).any()):
            i, j = (int(v) for v in (diffs < 0).nonzero()[0])
            who = ids[i] if tt.dim() == 2 else "all individuals"
            raise DataValidationError(
                f"times: not sorted for {who!r} at time index {j + 1} "
                f"({float(grid[i, j + 1])} after {float(grid[i, j])}); sort each individual's "
                "rows by time"
            )
        # repeated times are allowed only as padding: no observation at the repeat
        rep = diffs == 0
        if bool(rep.any()):
            obs_at_rep = rep & (
                m[:, 1:, :].any(-1) if tt.dim() == 2 else m[:, 1:, :].any(-1).any(0, keepdim=True)
            )
            if bool(obs_at_rep.any()):
                i, j = (int(v) for v in obs_at_rep.nonzero()[0])
                who = ids[i] if tt.dim() == 2 else "all individuals"
                raise DataValidationError(
                    f"times: duplicate time {float(grid[i, j + 1])} for {who!r} (time index "
                    f"{j + 1}); merge the duplicate rows or give them distinct times"
                )

        if inputs is None:
            u = torch.zeros(n, 0, dtype=dt, device=y.device)
        else:
            u = _as_numeric("inputs", inputs, dt).to(y.device)
            if u.dim() == 1:
                u = u.unsqueeze(-1)
            if u.dim() != 2 or u.shape[0] != n:
                raise DataValidationError(
                    f"inputs: expected shape (N={n}, D), got {tuple(u.shape)}"
                )
            if not bool(torch.isfinite(u).all()):
                i, k = (int(v) for v in (~torch.isfinite(u)).nonzero()[0])
                raise DataValidationError(
                    f"inputs: non-finite value for individual {ids[i]!r}, input {k}"
                )
        in_names = _names("input_names", input_names, u.shape[1], "u")

        codes, gnames = cls._group_codes(groups, group_names, n, ids)
        feats = None
        fnames: tuple[str, ...] = ()
        if group_features is not None:
            feats = _as_numeric("group_features", group_features, dt).to(y.device)
            if feats.dim() != 2 or feats.shape[0] != len(gnames):
                raise DataValidationError(
                    f"group_features: expected shape (G={len(gnames)}, F), one row per group, "
                    f"got {tuple(feats.shape)}"
                )
            fnames = _names("feature_names", feature_names, feats.shape[1], "f")
        if doses is not None:
            if not isinstance(doses, Doses):
                raise DataValidationError("doses: expected a pyro_hds.Doses")
            if doses.times.shape[0] != n:
                raise DataValidationError(f"doses: {doses.times.shape[0]} rows for {n} individuals")
            doses = doses.to(y.device, dt)
        return cls(
            times=tt,
            observations=y,
            mask=m,
            inputs=u,
            input_names=in_names,
            groups=codes.to(y.device),
            group_names=gnames,
            group_features=feats,
            feature_names=fnames,
            individual_ids=ids,
            channel_names=chans,
            doses=doses,
            total_size=n,
            indices=torch.arange(n, device=y.device),
        )

    @staticmethod
    def _group_codes(
        groups: Any, group_names: Sequence[str] | None, n: int, ids: tuple[str, ...]
    ) -> tuple[torch.Tensor, tuple[str, ...]]:
        if groups is None:
            names = ("all",) if group_names is None else tuple(str(g) for g in group_names)
            return torch.zeros(n, dtype=torch.long), names
        arr = groups.cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
        if arr.shape != (n,):
            raise DataValidationError(f"groups: expected shape ({n},), got {arr.shape}")
        if arr.dtype.kind in "iu":
            names = (
                tuple(str(g) for g in group_names)
                if group_names is not None
                else tuple(str(i) for i in range(int(arr.max()) + 1))
            )
            bad = (arr < 0) | (arr >= len(names))
            if bad.any():
                i = int(np.nonzero(bad)[0][0])
                raise DataValidationError(
                    f"groups: code {int(arr[i])} of individual {ids[i]!r} is out of range for "
                    f"{len(names)} group names {names}"
                )
            return torch.as_tensor(arr.astype(np.int64)), names
        if arr.dtype.kind == "f":
            raise DataValidationError(
                "groups: float codes are ambiguous; pass integer codes or string labels"
            )
        labels = [str(g) for g in arr]
        if group_names is None:
            names = tuple(dict.fromkeys(labels))
        else:
            names = tuple(str(g) for g in group_names)
            unknown = [lab for lab in labels if lab not in names]
            if unknown:
                i = labels.index(unknown[0])
                raise DataValidationError(
                    f"groups: label {unknown[0]!r} of individual {ids[i]!r} is not among "
                    f"group_names {names}"
                )
        lookup = {g: k for k, g in enumerate(names)}
        return torch.tensor([lookup[lab] for lab in labels], dtype=torch.long), names

    @classmethod
    def from_dataframe(
        cls,
        df: Any,
        *,
        individual: str,
        time: str,
        observations: Sequence[str],
        group: str | None = None,
        inputs: Sequence[str] = (),
        allow_missing: bool = False,
        event: str | None = None,
        amount: str | None = None,
        target: str | None = None,
        targets: Mapping[Any, int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> Dataset:
        """Build from a long table: one row per observation time of an individual.

        :param individual, time: the id and time columns.
        :param observations: the observed channels' columns (NaN cells are missing values,
            allowed with ``allow_missing=True``).
        :param group: a column of group labels (constant per individual).
        :param inputs: covariate columns (constant per individual).
        :param event, amount, target: NONMEM-style dosing: rows whose ``event`` column equals 1
            are doses of ``amount`` into the state given by ``target`` (an integer state index,
            or a label mapped through ``targets``); other rows are observations. Without
            ``event``, no row is a dose.

        Individuals may have different numbers of observation times; shorter grids are padded
        (see the module docstring).
        """
        import pandas as pd

        if not isinstance(df, pd.DataFrame):
            raise DataValidationError("from_dataframe: expected a pandas.DataFrame")
        if len(df) == 0:
            raise DataValidationError("from_dataframe: the table has no rows")
        needed = [individual, time, *observations, *inputs]
        needed += [c for c in (group, event, amount, target) if c is not None]
        missing = [c for c in needed if c not in df.columns]
        if missing:
            raise DataValidationError(
                f"from_dataframe: unknown column(s) {missing}; available columns: "
                f"{list(df.columns)}"
            )
        if not observations:
            raise DataValidationError("from_dataframe: name at least one observations column")
        if event is not None and (amount is None or target is None):
            raise DataValidationError(
                "from_dataframe: with event=..., also name the amount= and target= columns"
            )
        numeric = [time, *observations, *inputs] + ([amount] if amount else [])
        for col in numeric:
            values = pd.to_numeric(df[col], errors="coerce")
            bad = values.isna() & df[col].notna()
            if bad.any():
                row = df.index[bad.to_numpy()][0]
                raise DataValidationError(
                    f"from_dataframe: column {col!r} has non-numeric value {df[col][row]!r} "
                    f"(row {row}, individual {df[individual][row]!r}); convert or drop it"
                )
        if df[time].isna().any():
            row = df.index[df[time].isna().to_numpy()][0]
            raise DataValidationError(
                f"from_dataframe: missing time in row {row} (individual "
                f"{df[individual][row]!r}); every row needs a time"
            )
        is_dose = np.zeros(len(df), dtype=bool)
        if event is not None:
            is_dose = pd.to_numeric(df[event], errors="coerce").fillna(0).to_numpy() == 1
        obs_df = df[~is_dose]
        ids = list(dict.fromkeys(df[individual].tolist()))
        order = {k: i for i, k in enumerate(ids)}
        n, c = len(ids), len(observations)
        rows_by = {k: g for k, g in obs_df.groupby(individual, sort=False)}
        counts = [len(rows_by[k]) if k in rows_by else 0 for k in ids]
        if max(counts) == 0:
            raise DataValidationError("from_dataframe: no observation rows")
        t_len = max(counts)
        dt = _float_dtype(dtype)
        y = np.zeros((n, t_len, c))
        mask = np.zeros((n, t_len, c), dtype=bool)
        times = np.zeros((n, t_len))
        inp = np.zeros((n, len(inputs)))
        glab: list[Any] = [None] * n
        for k in ids:
            i = order[k]
            g = rows_by.get(k)
            if g is None:
                raise DataValidationError(
                    f"from_dataframe: individual {k!r} has doses but no observation rows"
                )
            g = g.sort_values(time, kind="stable")
            tv = g[time].to_numpy(dtype=float)
            dup = np.nonzero(np.diff(tv) == 0)[0]
            if dup.size:
                raise DataValidationError(
                    f"from_dataframe: individual {k!r} has two rows at time {tv[dup[0] + 1]}; "
                    "merge them (one row per time, one column per channel)"
                )
            m = len(tv)
            times[i, :m] = tv
            times[i, m:] = tv[-1]
            vals = g[list(observations)].apply(pd.to_numeric).to_numpy(dtype=float)
            nanv = np.isnan(vals)
            if nanv.any() and not allow_missing:
                r, ci = (int(v) for v in np.argwhere(nanv)[0])
                raise DataValidationError(
                    f"from_dataframe: missing value in column {observations[ci]!r} for "
                    f"individual {k!r} at time {tv[r]}; pass allow_missing=True or drop the row"
                )
            y[i, :m] = np.where(nanv, 0.0, vals)
            mask[i, :m] = ~nanv
            for j, col in enumerate(inputs):
                v = pd.to_numeric(df.loc[df[individual] == k, col]).to_numpy(dtype=float)
                if np.isnan(v).any() or not np.all(v == v[0]):
                    raise DataValidationError(
                        f"from_dataframe: input column {col!r} is not constant (or is missing) "
                        f"for individual {k!r}: values {sorted(set(v.tolist()))}; inputs are "
                        "per individual (use doses or time-varying inputs for changes in time)"
                    )
                inp[i, j] = v[0]
            if group is not None:
                labs = df.loc[df[individual] == k, group].unique()
                if len(labs) != 1:
                    raise DataValidationError(
                        f"from_dataframe: group column {group!r} has values {list(labs)} for "
                        f"individual {k!r}; an individual belongs to one group"
                    )
                glab[i] = labs[0]
        doses = None
        if event is not None and is_dose.any():
            dose_df = df[is_dose]
            per = {
                k: g.sort_values(time, kind="stable")
                for k, g in dose_df.groupby(individual, sort=False)
            }
            mm = max(len(g) for g in per.values())
            dtm = np.full((n, mm), np.inf)
            dam = np.zeros((n, mm))
            dtg = np.zeros((n, mm), dtype=np.int64)
            for k, g in per.items():
                i = order[k]
                ln = len(g)
                dtm[i, :ln] = g[time].to_numpy(dtype=float)
                dam[i, :ln] = pd.to_numeric(g[amount]).to_numpy(dtype=float)
                raw_t = g[target].tolist()  # type: ignore[index]
                for r, lab in enumerate(raw_t):
                    if targets is not None:
                        if lab not in targets:
                            raise DataValidationError(
                                f"from_dataframe: target {lab!r} of individual {k!r} is not in "
                                f"targets {dict(targets)}"
                            )
                        dtg[i, r] = int(targets[lab])
                    else:
                        try:
                            dtg[i, r] = int(lab)
                        except (TypeError, ValueError) as err:
                            raise DataValidationError(
                                f"from_dataframe: target {lab!r} of individual {k!r} is not an "
                                "integer state index; pass targets={label: index}"
                            ) from err
            doses = Doses(
                torch.as_tensor(dtm, dtype=dt),
                torch.as_tensor(dam, dtype=dt),
                torch.as_tensor(dtg),
            )
        shared = all(counts[i] == t_len for i in range(n)) and np.all(times == times[:1])
        return cls.from_arrays(
            y,
            times[0] if shared else times,
            mask=mask,
            inputs=inp if inputs else None,
            input_names=list(inputs) if inputs else None,
            groups=np.asarray([str(g) for g in glab]) if group is not None else None,
            individual_ids=[str(k) for k in ids],
            channel_names=list(observations),
            doses=doses,
            allow_missing=allow_missing,
            dtype=dt,
        )

    # -- xarray -------------------------------------------------------------------------------

    def to_xarray(self):
        """An ``xarray.Dataset`` with dims (individual, time, channel, input, group, ...)."""
        import xarray as xr

        def np_(x: torch.Tensor) -> np.ndarray:
            return x.detach().cpu().numpy()

        tdims = ("time",) if self.shared_times else ("individual", "time")
        data_vars: dict[str, Any] = {
            "observations": (("individual", "time", "channel"), np_(self.observations)),
            "mask": (("individual", "time", "channel"), np_(self.mask)),
            "times": (tdims, np_(self.times)),
            "inputs": (("individual", "input"), np_(self.inputs)),
            "groups": (("individual",), np_(self.groups)),
            "indices": (("individual",), np_(self.indices)),
        }
        if self.group_features is not None:
            data_vars["group_features"] = (("group", "feature"), np_(self.group_features))
        if self.doses is not None:
            data_vars["dose_times"] = (("individual", "dose"), np_(self.doses.times))
            data_vars["dose_amounts"] = (("individual", "dose"), np_(self.doses.amounts))
            data_vars["dose_targets"] = (("individual", "dose"), np_(self.doses.targets))
        coords = {
            "individual": list(self.individual_ids),
            "channel": list(self.channel_names),
            "input": list(self.input_names),
            "group": list(self.group_names),
        }
        if self.group_features is not None:
            coords["feature"] = list(self.feature_names)
        return xr.Dataset(data_vars, coords=coords, attrs={"total_size": self.total_size})

    @classmethod
    def from_xarray(cls, ds: Any) -> Dataset:
        """Inverse of :meth:`to_xarray` (needs at least ``observations`` and ``times``)."""
        for var in ("observations", "times"):
            if var not in ds:
                raise DataValidationError(
                    f"from_xarray: variable {var!r} missing; have {list(ds.data_vars)}"
                )
        dt = torch.get_default_dtype()

        def t_(name: str, dtype=None):
            return torch.as_tensor(np.asarray(ds[name].values), dtype=dtype)

        doses = None
        if "dose_times" in ds:
            doses = Doses(
                t_("dose_times", dt), t_("dose_amounts", dt), t_("dose_targets", torch.long)
            )
        out = cls.from_arrays(
            t_("observations", dt),
            t_("times", dt),
            mask=t_("mask", torch.bool) if "mask" in ds else None,
            inputs=t_("inputs", dt) if "inputs" in ds else None,
            input_names=[str(x) for x in ds.coords["input"].values]
            if "input" in ds.coords
            else None,
            groups=t_("groups", torch.long) if "groups" in ds else None,
            group_names=[str(x) for x in ds.coords["group"].values]
            if "group" in ds.coords
            else None,
            group_features=t_("group_features", dt) if "group_features" in ds else None,
            feature_names=[str(x) for x in ds.coords["feature"].values]
            if "feature" in ds.coords
            else None,
            individual_ids=[str(x) for x in ds.coords["individual"].values]
            if "individual" in ds.coords
            else None,
            channel_names=[str(x) for x in ds.coords["channel"].values]
            if "channel" in ds.coords
            else None,
            doses=doses,
            allow_missing=True,
        )
        if "indices" in ds:
            out = out.replace(
                indices=t_("indices", torch.long),
                total_size=int(ds.attrs.get("total_size", len(out))),
            )
        return out


_FIELDS = (
    "times",
    "observations",
    "mask",
    "inputs",
    "input_names",
    "groups",
    "group_names",
    "group_features",
    "feature_names",
    "individual_ids",
    "channel_names",
    "doses",
    "total_size",
    "indices",
)
