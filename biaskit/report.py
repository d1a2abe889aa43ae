"""Results as xarray Datasets: netCDF I/O and figures."""
from __future__ import annotations

from pathlib import Path

import xarray as xr

ENGINE = "netcdf4"


def save(ds: xr.Dataset, path: str | Path) -> Path:
    """Write a results Dataset to netCDF (parent folders are made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path, engine=ENGINE)
    return path


def load(path: str | Path) -> xr.Dataset:
    """Read a results Dataset written by ``save`` fully into memory."""
    with xr.open_dataset(path, engine=ENGINE) as ds:
        return ds.load()


def _axes(ax):
    """``ax`` or the single axes of a new Agg-backed Figure (no pyplot, no GUI state)."""
    if ax is not None:
        return ax
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig.add_subplot()


def plot_decay(ds: xr.Dataset, fit, ax=None):
    """Mean norm versus lag (log axis) over faint per-sample lines, the fit with its band, τ marked."""
    ax = _axes(ax)
    norm = ds[fit.norm].transpose("sample", "lag")
    lags = norm.lag.values
    faint = min(0.3, 8.0 / norm.sizes["sample"])
    ax.plot(lags, norm.values.T, color="0.5", lw=0.5, alpha=faint)
    ax.plot(lags, norm.mean("sample").values, color="C0", lw=2, label=f"mean {fit.norm}")
    band = fit.band(lags[lags >= fit.tau])
    lower, upper = fit.conf_int()
    ax.fill_between(band.lag, band.lower, band.upper, color="C1", alpha=0.3, lw=0,
                    label=f"{100 * fit.level:g}% band")
    ax.plot(band.lag, band["mean"], color="C1", lw=1.5,
            label=f"{fit.method} fit: β = {fit.beta:.4g} [{lower:.4g}, {upper:.4g}]")
    ax.axvline(fit.tau, color="k", ls=":", lw=1, label=f"τ = {fit.tau}")
    ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("lag k")
    ax.set_ylabel(f"{fit.norm} = ||∂L_s/∂h_(s-k)||" if fit.norm == "phi" else fit.norm)
    ax.legend(fontsize="small")
    return ax.figure


def plot_bias(ds: xr.Dataset, bound: xr.Dataset, K: int | None = None, ax=None):
    """Exact relative bias δ(K) beside the bound Δ̂(K) (log axis), with each δ and its κ̂,
    and the model's own truncation K when given."""
    ax = _axes(ax)
    ax.plot(ds.K, ds.rel_bias, color="C0", lw=2, label="exact δ(K)")
    ax.plot(bound.K, bound.rel_bias_bound, color="C1", lw=1.5, ls="--", label="bound Δ̂(K)")
    for delta, kappa in zip(bound.delta.values, bound.kappa.values):
        ax.axhline(delta, color="0.6", lw=0.5)
        ax.plot([kappa], [delta], "o", color="C1", ms=4)
    if K is not None:
        ax.axvline(K, color="C3", lw=1, label=f"model's K = {K}")
    ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("truncation K")
    ax.set_ylabel("relative bias")
    ax.legend(fontsize="small", title="dots: κ̂(δ)")
    return ax.figure


def plot_state_heatmap(ds: xr.Dataset, ax=None):
    """Mean |∂L/∂h| per state dimension (rows, grouped by layer and component) versus lag,
    on a log colour scale: the rows that stay bright at long lags decay slowly."""
    import numpy as np
    from matplotlib.colors import LogNorm

    ax = _axes(ax)
    values = ds["phi_state"].transpose("state", "lag").values
    positive = values[values > 0]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    mesh = ax.pcolormesh(ds.lag.values, np.arange(values.shape[0]), np.ma.masked_less_equal(values, 0),
                         norm=norm, shading="nearest", cmap="viridis")
    ax.figure.colorbar(mesh, ax=ax, label="mean |∂L_s/∂h_(s-k)|")
    blocks = [(layer, comp) for layer, comp in zip(ds["layer"].values.tolist(), ds["part"].values.tolist())]
    starts = [i for i in range(len(blocks)) if i == 0 or blocks[i] != blocks[i - 1]]
    ax.set_yticks([s + (e - s) / 2 for s, e in zip(starts, starts[1:] + [len(blocks)])],
                  [f"layer {blocks[s][0]} {blocks[s][1]}" for s in starts])
    for s in starts[1:]:
        ax.axhline(s - 0.5, color="w", lw=0.8)
    ax.set_xlabel("lag k")
    return ax.figure
