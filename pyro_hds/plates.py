"""The two named plates of a hierarchical model: individuals and groups.

A pyro_hds model is an ordinary Pyro model function ``model(data)`` whose latent sites live at
three levels, told apart by the plates they sit in:

* population (global) sites sit in no plate;
* group sites sit in ``pyro.plate("groups", G)``;
* individual (local) sites sit in ``pyro.plate("individuals", N)``.

:func:`individuals` and :func:`groups` open those plates with the right sizes for a
:class:`~pyro_hds.Dataset` (which may be a minibatch of a larger data set). Plain
``pyro.plate("individuals", ...)`` and ``pyro.plate("groups", ...)`` work as well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro
import torch

if TYPE_CHECKING:
    from pyro_hds.data import Dataset

__all__ = ["GROUPS", "INDIVIDUALS", "groups", "individuals"]

INDIVIDUALS = "individuals"
GROUPS = "groups"


def individuals(data: Dataset, dim: int = -1) -> pyro.plate:
    """Open ``pyro.plate("individuals", ...)`` for the individuals in ``data``.

    When ``data`` is a minibatch of ``B`` of the ``N = data.total_size`` individuals of a data
    set, the plate is subsampled, so every log-density inside it is scaled by ``N / B``; the
    subsample indices are ``data.indices`` (positions in the full data set).

    :param data: the (minibatch) data set the model was called with.
    :param dim: the batch dimension of the plate (``-1``, the default, puts individuals last,
        which the guides and objectives of pyro_hds expect).
    """
    indices = torch.as_tensor(data.indices)
    return pyro.plate(INDIVIDUALS, size=int(data.total_size), subsample=indices, dim=dim)


def groups(data: Dataset, dim: int = -1) -> pyro.plate:
    """Open ``pyro.plate("groups", G)`` over all ``G = data.num_groups`` groups of ``data``.

    Group latents are never subsampled: every group's latent is drawn whatever minibatch of
    individuals is in ``data``. Index a group latent of batch shape ``(..., G)`` by
    ``data.groups`` to get one value per individual, ``(..., N)``.
    """
    return pyro.plate(GROUPS, int(data.num_groups), dim=dim)
