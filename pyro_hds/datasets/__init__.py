"""Loaders of public data sets.

:mod:`pyro_hds.datasets.vihds` reads the plate-reader time series of the vi-hds paper (Roeder et
al., ICML 2019): :func:`read_platereader_csv` parses any of its CSV files, :func:`load_vihds`
builds the reference double-receiver experiment as a :class:`pyro_hds.Dataset`,
:func:`folds` and :func:`heldout_device_split` give its cross-validation and zero-shot splits and
:class:`ChannelScaler` its per-channel scaling (fitted on training wells).
"""

from pyro_hds.datasets.vihds import (
    DEFAULT_DEVICES,
    DEVICE_COMPONENTS,
    LASR_COMPONENTS,
    LUXR_COMPONENTS,
    VIHDS_COMMIT,
    VIHDS_FILES,
    ChannelScaler,
    fetch_vihds,
    folds,
    heldout_device_split,
    load_vihds,
    parse_condition,
    read_platereader_csv,
    train_test,
)

__all__ = [
    "DEFAULT_DEVICES",
    "DEVICE_COMPONENTS",
    "LASR_COMPONENTS",
    "LUXR_COMPONENTS",
    "VIHDS_COMMIT",
    "VIHDS_FILES",
    "ChannelScaler",
    "fetch_vihds",
    "folds",
    "heldout_device_split",
    "load_vihds",
    "parse_condition",
    "read_platereader_csv",
    "train_test",
]
