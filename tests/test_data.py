"""pyro_hds.Dataset: construction, validation table, indexing, round trips."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_hds.data import Dataset, DataValidationError, Doses


def long_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": ["a", "a", "a", "b", "b"],
            "t": [0.0, 1.0, 2.0, 0.5, 3.0],
            "y1": [1.0, 2.0, 3.0, 4.0, 5.0],
            "y2": [0.1, 0.2, 0.3, 0.4, 0.5],
            "arm": ["ctl", "ctl", "ctl", "trt", "trt"],
            "wt": [70.0, 70.0, 70.0, 80.0, 80.0],
        }
    )


def test_from_dataframe_ragged_times_are_padded_and_masked():
    d = Dataset.from_dataframe(
        long_table(),
        individual="id",
        time="t",
        observations=["y1", "y2"],
        group="arm",
        inputs=["wt"],
    )
    assert len(d) == 2 and d.num_times == 3 and d.num_channels == 2
    assert not d.shared_times
    torch.testing.assert_close(d.times, torch.tensor([[0.0, 1.0, 2.0], [0.5, 3.0, 3.0]]))
    assert d.mask[1, 2].tolist() == [False, False]
    assert d.observations[1, 2].tolist() == [0.0, 0.0]
    assert d.group_names == ("ctl", "trt") and d.groups.tolist() == [0, 1]
    assert d.inputs[:, 0].tolist() == [70.0, 80.0] and d.input_names == ("wt",)
    assert d.individual_ids == ("a", "b") and d.channel_names == ("y1", "y2")


def test_missing_values_need_allow_missing():
    df = long_table()
    df.loc[1, "y2"] = math.nan
    with pytest.raises(
        DataValidationError, match=r"'y2'.*individual 'a' at time 1.0.*allow_missing"
    ):
        Dataset.from_dataframe(df, individual="id", time="t", observations=["y1", "y2"])
    d = Dataset.from_dataframe(
        df, individual="id", time="t", observations=["y1", "y2"], allow_missing=True
    )
    assert d.mask[0, 1].tolist() == [True, False]
    assert d.observations[0, 1, 1] == 0.0


def test_doses_from_nonmem_layout():
    df = pd.DataFrame(
        {
            "id": [1, 1, 1, 1, 2, 2],
            "time": [0.0, 1.0, 12.0, 13.0, 0.0, 2.0],
            "dv": [np.nan, 3.0, np.nan, 2.5, np.nan, 1.0],
            "evid": [1, 0, 1, 0, 1, 0],
            "amt": [100.0, 0, 50.0, 0, 80.0, 0],
            "cmt": ["gut", 0, "gut", 0, "gut", 0],
        }
    )
    d = Dataset.from_dataframe(
        df,
        individual="id",
        time="time",
        observations=["dv"],
        event="evid",
        amount="amt",
        target="cmt",
        targets={"gut": 0},
    )
    assert d.num_times == 2
    assert d.doses is not None
    torch.testing.assert_close(d.doses.times, torch.tensor([[0.0, 12.0], [0.0, math.inf]]))
    torch.testing.assert_close(d.doses.amounts, torch.tensor([[100.0, 50.0], [80.0, 0.0]]))
    assert d.doses.targets.tolist() == [[0, 0], [0, 0]]
    assert d[1].doses.times.shape == (1, 2)


INVALID_ARRAYS = [
    (
        "nan",
        dict(observations=[[[1.0], [math.nan]]], times=[0.0, 1.0]),
        "NaN for individual '0', time index 1",
    ),
    ("inf", dict(observations=[[[1.0], [math.inf]]], times=[0.0, 1.0]), "infinite value"),
    ("unsorted", dict(observations=[[[1.0], [2.0]]], times=[1.0, 0.0]), "not sorted"),
    ("duplicate", dict(observations=[[[1.0], [2.0]]], times=[1.0, 1.0]), "duplicate time 1.0"),
    (
        "ragged",
        dict(observations=[[[1.0], [2.0]]], times=[0.0, 1.0, 2.0]),
        "3 times for observations with 2",
    ),
    ("empty", dict(observations=np.zeros((0, 2, 1)), times=[0.0, 1.0]), "empty data"),
    ("strings", dict(observations=[[["x"], ["2"]]], times=[0.0, 1.0]), "non-numeric value 'x'"),
    ("complex", dict(observations=np.ones((1, 2, 1), complex), times=[0.0, 1.0]), "complex"),
    (
        "mask dtype",
        dict(observations=[[[1.0], [2.0]]], times=[0.0, 1.0], mask=np.ones((1, 2, 1))),
        "bool",
    ),
    (
        "group range",
        dict(observations=[[[1.0]], [[2.0]]], times=[0.0], groups=[0, 3], group_names=["a", "b"]),
        "code 3",
    ),
    (
        "group label",
        dict(observations=[[[1.0]]], times=[0.0], groups=["z"], group_names=["a"]),
        "label 'z'",
    ),
    (
        "features",
        dict(observations=[[[1.0]]], times=[0.0], group_features=np.ones((2, 3))),
        "one row per group",
    ),
    (
        "dup ids",
        dict(observations=[[[1.0]], [[2.0]]], times=[0.0], individual_ids=["a", "a"]),
        "duplicate name 'a'",
    ),
    (
        "inputs shape",
        dict(observations=[[[1.0]], [[2.0]]], times=[0.0], inputs=np.ones((3, 1))),
        "inputs: expected shape",
    ),
    (
        "per-ind times",
        dict(observations=[[[1.0], [2.0]]], times=np.zeros((2, 2))),
        "one grid per individual",
    ),
]


@pytest.mark.parametrize(
    "case, kwargs, message", INVALID_ARRAYS, ids=[c[0] for c in INVALID_ARRAYS]
)
def test_invalid_arrays_raise(case, kwargs, message):
    kwargs = dict(kwargs)
    obs = kwargs.pop("observations")
    times = kwargs.pop("times")
    with pytest.raises(DataValidationError, match=message.replace("(", r"\(")):
        Dataset.from_arrays(obs, times, **kwargs)
    assert issubclass(DataValidationError, ValueError)


INVALID_TABLES = [
    ("unknown column", dict(observations=["nope"]), "unknown column.*'nope'.*available"),
    (
        "non-numeric",
        dict(observations=["y1"], edit=("y1", 2, "high")),
        "non-numeric value 'high'.*row 2.*'a'",
    ),
    (
        "varying input",
        dict(observations=["y1"], inputs=["wt"], edit=("wt", 1, 71.0)),
        "not constant.*'a'",
    ),
    ("varying group", dict(observations=["y1"], group="arm", edit=("arm", 1, "trt")), "one group"),
    ("duplicate time", dict(observations=["y1"], edit=("t", 1, 0.0)), "two rows at time 0.0"),
    ("missing time", dict(observations=["y1"], edit=("t", 1, math.nan)), "missing time in row 1"),
]


@pytest.mark.parametrize("case, spec, message", INVALID_TABLES, ids=[c[0] for c in INVALID_TABLES])
def test_invalid_tables_raise(case, spec, message):
    df = long_table().astype(object)
    spec = dict(spec)
    edit = spec.pop("edit", None)
    if edit is not None:
        df.loc[edit[1], edit[0]] = edit[2]
    with pytest.raises(DataValidationError, match=message):
        Dataset.from_dataframe(df, individual="id", time="t", **spec)


def test_empty_table():
    with pytest.raises(DataValidationError, match="no rows"):
        Dataset.from_dataframe(
            long_table().iloc[:0], individual="id", time="t", observations=["y1"]
        )


def test_indexing_keeps_total_size_and_indices():
    d = Dataset.from_arrays(np.arange(12.0).reshape(6, 2, 1), [0.0, 1.0], groups=[0, 1, 0, 1, 2, 2])
    sub = d[[4, 1]]
    assert len(sub) == 2 and sub.total_size == 6
    assert sub.indices.tolist() == [4, 1]
    assert sub.groups.tolist() == [2, 1] and sub.group_names == d.group_names
    assert sub.individual_ids == ("4", "1")
    assert d[torch.tensor([True, False] * 3)].indices.tolist() == [0, 2, 4]
    assert d[1:3].indices.tolist() == [1, 2]
    assert sub[1].indices.tolist() == [1]
    with pytest.raises(IndexError):
        d[6]


def test_xarray_round_trip_with_features_and_doses():
    doses = Doses(
        torch.tensor([[0.0, math.inf], [1.0, 2.0]]),
        torch.tensor([[5.0, 0.0], [1.0, 2.0]]),
        torch.tensor([[0, 0], [1, 0]]),
    )
    d = Dataset.from_arrays(
        np.array([[[1.0], [math.nan]], [[3.0], [4.0]]]),
        np.array([[0.0, 1.0], [0.5, 2.0]]),
        inputs=np.array([[1.0, 2.0], [3.0, 4.0]]),
        input_names=["c6", "c12"],
        groups=["x", "y"],
        group_features=np.eye(2),
        feature_names=["f0", "f1"],
        doses=doses,
        allow_missing=True,
    )
    back = Dataset.from_xarray(d.to_xarray())
    for name in ("times", "observations", "mask", "inputs", "groups", "group_features"):
        assert torch.equal(getattr(back, name), getattr(d, name)), name
    for name in ("input_names", "group_names", "feature_names", "individual_ids", "channel_names"):
        assert getattr(back, name) == getattr(d, name)
    assert torch.equal(back.doses.times, d.doses.times)
    state = Dataset.from_state_dict(d[[1]].state_dict())
    assert state.total_size == 2 and state.indices.tolist() == [1]


def test_dtype_and_device_follow():
    d = Dataset.from_arrays(np.ones((2, 3, 1)), [0.0, 1.0, 2.0], dtype=torch.float32)
    assert d.observations.dtype == torch.float32 and d.times.dtype == torch.float32
    d64 = d.to(dtype=torch.float64)
    assert d64.observations.dtype == torch.float64 and d64.mask.dtype == torch.bool
    assert d64.groups.dtype == torch.long


def test_bad_doses():
    with pytest.raises(DataValidationError, match="negative or NaN dose time"):
        Doses(torch.tensor([[-1.0]]), torch.tensor([[1.0]]), torch.tensor([[0]]))
    with pytest.raises(DataValidationError, match="integer state indices"):
        Doses(torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]))
