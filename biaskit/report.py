"""Results as xarray Datasets: netCDF I/O and figures."""
from __future__ import annotations

from pathlib import Path

import xarray as xr

ENGINE = "netcdf4"


def save(ds: xr.Dataset, path) -> Path:
    """Write a results Dataset to netCDF (parent folders are made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path, engine=ENGINE)
    return path


def load(path) -> xr.Dataset:
    """Read a results Dataset written by ``save`` fully into memory."""
    with xr.open_dataset(path, engine=ENGINE) as ds:
        return ds.load()
