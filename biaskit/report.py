"""Results as xarray Datasets: netCDF I/O and figures."""
from __future__ import annotations

import base64
import errno
import html
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from .errors import first_line

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not with biaskit
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ENGINE = "netcdf4"


def save(ds: xr.Dataset, path: str | Path) -> Path:
    """Write a results Dataset to netCDF (parent folders are made). The netCDF library reports a
    failed write (a full disk, say) as a RuntimeError ("NetCDF: HDF error"): it becomes an OSError,
    which ``atomic`` turns into one line naming the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.to_netcdf(path, engine=ENGINE)
    except RuntimeError as err:
        raise OSError(errno.EIO, f"{first_line(err)} (writing {path.name})") from None
    return path


def load(path: str | Path) -> xr.Dataset:
    """Read a results Dataset written by ``save`` fully into memory."""
    with xr.open_dataset(path, engine=ENGINE) as ds:
        return ds.load()


def _figure(figsize=(6.4, 4.2)) -> Figure:
    """A new Agg-backed Figure (no pyplot, no GUI state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _axes(ax):
    """``ax`` or the single axes of a new Figure."""
    return ax if ax is not None else _figure().add_subplot()


def figure_html(fig: Figure, caption: str, dpi: int = 100) -> str:
    """``fig`` as an HTML <figure>: the PNG inline as base64 data, with its caption (escaped)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    text = html.escape(caption)
    return (f'<figure style="margin: 0.5em 0"><img src="data:image/png;base64,{data}" alt="{text}">'
            f"<figcaption>{text}</figcaption></figure>")


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


def plot_bias(ds: xr.Dataset, bound: xr.Dataset, K: int | None = None, exact: xr.Dataset | None = None,
              ax: Axes | None = None) -> Figure:
    """The figure to choose K from: where the relative bias falls below each δ.

    The main panel is the decision region: K from 0 to a little past the largest
    recommended K (or the paper's κ̂, if larger), the bias (log) from a little
    below the smallest δ to the top of the curves there. It shows the batch's
    exact relative bias δ(K) (solid), its upper confidence limit from
    ``exact`` (an ``exact_kappa`` Dataset; shaded between the two), the paper's
    bound Δ̂(K) (dashed), each δ as a grey line labelled at the right edge, the
    recommended K per δ (▼ where the upper limit first falls below δ), the
    paper's κ̂(δ) (○) and the model's own ``K``. A small second panel shows
    every K over the full range, the region boxed, for context: the full range
    spans many orders of magnitude, in which the decision region is a few pixels.

    Without ``exact`` there is no upper limit and nothing recommended. Infinite
    values (an upper limit where the windows' mean gradient is not resolved, a
    bound whose denominator is not positive) are left out and the legend says
    so. With ``ax``, only the main panel is drawn, on ``ax``.
    """
    own = ax is None
    if own:
        from matplotlib.patches import Rectangle

        fig = _figure((9.6, 4.6))
        ax, context = fig.subplots(1, 2, width_ratios=[3, 1])
    deltas = bound.delta.values.astype(np.float64)
    recommended = _reached(exact) if exact is not None else []
    paper = _reached(bound)
    bound_text = "bound Δ̂(K)" + _left_out(bound.rel_bias_bound.values, "denominator ≤ 0")
    _bias_curves(ax, ds, bound, exact, bound_text)
    right = _focus_right(ds, deltas, [k for _, k in recommended + paper], K)
    for delta in deltas:
        ax.axhline(delta, color="0.55", lw=0.8, zorder=1)
        ax.text(0.995, delta, f"δ = {delta:g}", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                color="0.3", fontsize="small")
    if exact is not None:
        missed = [f"{d:g}" for d, r in zip(exact.delta.values, exact.kappa_reached.values) if not r]
        label = "recommended K (upper limit < δ)" + (f", none for δ = {', '.join(missed)}" if missed else "")
        ax.plot([k for _, k in recommended], [d for d, _ in recommended], "v", color="C0", ms=8, label=label)
        for delta, k in recommended:
            ax.annotate(f"K={k}", (k, delta), xytext=(0, 7), textcoords="offset points", ha="center",
                        color="C0", fontsize="small", weight="bold")
    ax.plot([k for _, k in paper], [d for d, _ in paper], "o", mfc="none", color="C1", ms=7,
            label=f"paper's κ̂(δ) ({bound.attrs.get('norm', 'phi')})")
    if K is not None:
        past = " (past the window)" if K > ds.K.max() else ""
        ax.axvline(K, color="C3", lw=1.2, label=f"model's K = {K}{past}")
    ax.set_yscale("log", nonpositive="mask")
    ax.set_xlim(-0.5, right + 0.5)
    ax.set_ylim(*_focus_y(ds, bound, exact, deltas, right))
    ax.set_xlabel("truncation K")
    ax.set_ylabel("relative bias ||E ĝ_K − E g|| / ||E g||")
    if not own:
        ax.legend(fontsize="small")
        return ax.figure
    _bias_curves(context, ds, bound, exact, bound_text)
    for delta in deltas:
        context.axhline(delta, color="0.55", lw=0.5, zorder=1)
    if K is not None:
        context.axvline(K, color="C3", lw=1)
    context.set_yscale("log", nonpositive="mask")
    bottom, top = ax.get_ylim()
    context.add_patch(Rectangle((-0.5, bottom), right + 1, top - bottom, fill=False, ec="k", lw=0.8, zorder=3))
    context.set_title("all K (box: left panel)", fontsize="small")
    context.set_xlabel("truncation K")
    handles, labels = ax.get_legend_handles_labels()
    ncols = 3 if max(map(len, labels)) < 40 else 2
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize="small")
    return fig


def _reached(ds: xr.Dataset) -> list[tuple[float, int]]:
    """(δ, κ) for each δ whose κ was reached, from an ``exact_kappa`` or ``bias_bound`` Dataset."""
    return [(float(d), int(k)) for d, k, r in zip(ds.delta.values, ds.kappa.values, ds.kappa_reached.values) if r]


def _left_out(values: np.ndarray, why: str) -> str:
    """Legend text for the infinite values a curve leaves out ("" when none)."""
    infinite = int(np.isinf(values).sum())
    if not infinite:
        return ""
    where = "every K" if infinite == values.size else f"{infinite} of {values.size} K"
    return f" (infinite at {where}, not drawn: {why})"


def _bias_curves(ax: Axes, ds: xr.Dataset, bound: xr.Dataset, exact: xr.Dataset | None, bound_text: str):
    """The exact relative bias, its upper limit (shaded) when ``exact`` is given, and the bound."""
    ax.plot(ds.K, ds.rel_bias, color="C0", lw=2, label="exact δ(K)")
    if exact is not None:
        upper = exact.rel_bias_upper.values.astype(np.float64)
        point = exact.rel_bias.values.astype(np.float64)
        finite = np.isfinite(upper)
        why = "tail past the window unbounded" if int(exact["gradient_resolved"]) else "mean gradient not resolved"
        ax.fill_between(exact.K.values, point, np.where(finite, upper, np.nan), where=finite & (point > 0),
                        color="C0", alpha=0.2, lw=0)
        ax.plot(exact.K, np.where(finite, upper, np.nan), color="C0", lw=0.8,
                label=f"{100 * exact.attrs['level']:g}% upper limit" + _left_out(upper, why))
    values = bound.rel_bias_bound.values.astype(np.float64)
    ax.plot(bound.K, np.where(np.isfinite(values), values, np.nan), "--", color="C1", lw=1.5, label=bound_text)


def _focus_right(ds: xr.Dataset, deltas: np.ndarray, marks: list[int], K: int | None) -> int:
    """The right end of the decision region: a little past the largest mark (a recommended K,
    κ̂, the model's K inside the window); without any, past where the exact bias first falls
    below the smallest δ; else the whole window."""
    last = int(ds.K.max())
    marks = marks + ([K] if K is not None and K <= last else [])
    if not marks:
        below = ds.rel_bias.values < deltas.min()
        marks = [int(ds.K.values[np.argmax(below)]) if below.any() else last]
    return min(last, math.ceil(1.2 * max(marks)) + 2)


def _focus_y(ds: xr.Dataset, bound: xr.Dataset, exact: xr.Dataset | None, deltas: np.ndarray,
             right: int) -> tuple[float, float]:
    """From a little below the smallest δ to above the highest finite curve (and δ) up to K = ``right``."""
    curves = [ds.rel_bias.sel(K=slice(None, right)), bound.rel_bias_bound.sel(K=slice(None, right))]
    if exact is not None:
        curves.append(exact.rel_bias_upper.sel(K=slice(None, right)))
    values = np.concatenate([np.asarray(c, dtype=np.float64) for c in curves])
    values = values[np.isfinite(values)]
    return deltas.min() / 3, 2 * max(deltas.max(), values.max(initial=0.0))


#: The state heatmap's colours span this many decades below its largest value; smaller values
#: (a vanished gradient spans 40) take the lowest colour.
STATE_DECADES = 6


def plot_state_heatmap(ds: xr.Dataset, ax=None):
    """Mean |∂L/∂h| per state dimension (rows, grouped by layer and component) versus lag,
    on a log colour scale over the STATE_DECADES decades below the largest value, ticked at
    whole powers of ten (lags at whole numbers): the rows that stay bright at long lags decay slowly."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, MaxNLocator

    ax = _axes(ax)
    values = ds["phi_state"].transpose("state", "lag").values
    positive = values[values > 0]
    top = positive.max() if positive.size else None
    norm = LogNorm(vmin=max(positive.min(), top / 10**STATE_DECADES), vmax=top, clip=True) if top else None
    mesh = ax.pcolormesh(ds.lag.values, np.arange(values.shape[0]), np.ma.masked_less_equal(values, 0),
                         norm=norm, shading="nearest", cmap="viridis")
    clipped = norm is not None and positive.min() < norm.vmin
    label = "mean |∂L_s/∂h_(s-k)|" + (f" (clipped below {norm.vmin:.0e})" if clipped else "")
    bar = ax.figure.colorbar(mesh, ax=ax, extend="min" if clipped else "neither", label=label)
    if norm is not None:
        bar.ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,)))
        bar.ax.yaxis.set_major_formatter(LogFormatterSciNotation())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # lags are whole
    blocks = [(layer, comp) for layer, comp in zip(ds["layer"].values.tolist(), ds["part"].values.tolist())]
    starts = [i for i in range(len(blocks)) if i == 0 or blocks[i] != blocks[i - 1]]
    ax.set_yticks([s + (e - s) / 2 for s, e in zip(starts, starts[1:] + [len(blocks)])],
                  [f"layer {blocks[s][0]} {blocks[s][1]}" for s in starts])
    for s in starts[1:]:
        ax.axhline(s - 0.5, color="w", lw=0.8)
    ax.set_xlabel("lag k")
    return ax.figure
