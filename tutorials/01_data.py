"""Tutorial 1: getting data into pyro_hds.

A :class:`pyro_hds.Dataset` holds N individuals x T times x C channels, with a mask for missing
values, per-individual times, inputs, group labels and doses. This script builds one from a
long table (one row per observation, the layout of NONMEM/nlmixr data sets), shows what
validation catches, and takes minibatches and cross-validation folds.

Run: ``python tutorials/01_data.py``
"""

# %% A long table: three patients, ragged sampling times, one missing value, two arms, doses
import math

import pandas as pd
import torch

import pyro_hds

table = pd.DataFrame(
    {
        "id": ["p1"] * 5 + ["p2"] * 4 + ["p3"] * 4,
        "time": [0, 0.5, 1, 2, 4, 0, 1, 3, 6, 0, 0.5, 2, 8],
        "conc": [None, 1.8, 2.9, 2.1, 1.0, None, 2.5, 1.7, 0.6, None, 1.1, math.nan, 0.9],
        "evid": [1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0],
        "amt": [100, 0, 0, 0, 0, 100, 0, 0, 0, 50, 0, 0, 0],
        "cmt": [0] * 13,
        "arm": ["A"] * 5 + ["B"] * 4 + ["A"] * 4,
        "weight": [70] * 5 + [82] * 4 + [64] * 4,
    }
)
data = pyro_hds.Dataset.from_dataframe(
    table,
    individual="id",
    time="time",
    observations=["conc"],
    group="arm",
    inputs=["weight"],
    event="evid",
    amount="amt",
    target="cmt",
    allow_missing=True,  # p3's NaN at t = 2 becomes mask False
)
print(data)
print("times (padded by repeating the last time):\n", data.times)
print("mask:\n", data.mask[..., 0])
print("doses (time, amount):\n", data.doses.times, data.doses.amounts)

# %% Validation: errors name the column, individual and time, and say how to fix them
bad = table.copy()
bad.loc[2, "time"] = 0.5  # two rows of p1 at t = 0.5
try:
    pyro_hds.Dataset.from_dataframe(
        bad,
        individual="id",
        time="time",
        observations=["conc"],
        event="evid",
        amount="amt",
        target="cmt",
        allow_missing=True,
    )
except pyro_hds.DataValidationError as err:
    print("caught:", err)

# %% Minibatches and folds: indexing keeps the full data set's size for the plate scale
batch = data[[0, 2]]
print(batch, "indices in the full data set:", batch.indices.tolist())
print("total_size:", batch.total_size)

# %% xarray round trip, for labelled inspection and storage
ds = data.to_xarray()
print(ds)
assert torch.equal(pyro_hds.Dataset.from_xarray(ds).observations, data.observations)
