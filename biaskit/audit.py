"""The audit: decomposition, the recommended K from the exact bias, the paper's estimates for every
norm with their calibration, in one report."""
from __future__ import annotations

import copy
import html
import json
import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import xarray as xr
from torch import nn

from . import atomic, norms, report
from .bias import bias_bound, calibration, exact_kappa, not_reached
from .decay import UnreliableFitWarning, confidence_alpha, fit_decay
from .decompose import DEFAULT_GROUPS, decompose
from .errors import InputError
from .norms import NORMS
from .probe import Windows
from .recurrent import wrap
from .synthetic import synthetic_bias, warm_up

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: What ``Audit.save`` writes: a folder holding only these is an earlier audit, which it replaces.
FILES = {"audit.nc", "synthetic.nc", "summary.txt", "summary.json", "decay.png", "bias.png", "state.png"}


#: How the text names the symbols that the tables write in Greek.
ASCII = {"κ̂": "kappa", "δ": "delta", "β": "beta", "τ": "tau", "≤": "<="}


@dataclass
class Table:
    """One table of a ``Summary``: ``title``, ``headers``, ``rows`` (a cell is its text, or (text,
    columns it spans)) and ``notes`` under it. ``formats`` lays it out as text, a ``str.format`` per
    column, with a rule under the headers where ``rule``; the text spells the Greek (``ASCII``)."""

    title: str
    headers: list[str]
    rows: list[list]
    formats: list[str]
    rule: bool = False
    notes: list[str] = field(default_factory=list)

    def as_text(self) -> str:
        head = self._text_row(self.headers)
        return "\n".join([_ascii(self.title), head, *(["-" * len(head)] if self.rule else []),
                          *map(self._text_row, self.rows), *map(_ascii, self.notes)])

    def as_html(self) -> str:
        def td(cell):
            text, span = _span(cell)
            return f"<td>{_esc(text)}</td>" if span == 1 else f'<td colspan="{span}">{_esc(text)}</td>'

        head = "".join(f"<th>{_esc(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(map(td, row)) + "</tr>" for row in self.rows)
        return (f'<table><caption style="text-align: left">{_esc(self.title)}</caption>'
                f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                + "".join(f"<p>{_esc(note)}</p>" for note in self.notes))

    def _text_row(self, cells: list) -> str:
        """A row as text: each cell in its column's format (a spanning cell in its first column's),
        trailing blanks dropped."""
        line, column = "", 0
        for cell in cells:
            text, span = _span(cell)
            line += self.formats[column].format(_ascii(text))
            column += span
        return line.rstrip()


@dataclass
class Summary:
    """An audit in words, built once and rendered as text or HTML, as statsmodels' ``Summary`` is:
    ``name: heading``, then ``parts``, each a ``Table`` or a paragraph (a list of lines)."""

    name: str
    heading: str
    parts: list

    def as_text(self) -> str:
        return "\n\n".join([f"{self.name}: {self.heading}", *(
            part.as_text() if isinstance(part, Table) else "\n".join(part) for part in self.parts)])

    def as_html(self) -> str:
        return "\n".join([f"<p><b>{_esc(self.name)}</b>: {_esc(self.heading)}</p>", *(
            part.as_html() if isinstance(part, Table) else "<p>" + "<br>".join(map(_esc, part)) + "</p>"
            for part in self.parts)])


class Audit:
    """An audit's results: ``dataset`` holds everything; ``summary()`` says it in words.

    ``exact`` is the ``exact_kappa`` Dataset the recommendation comes from;
    ``synthetic``, when set, a ``synthetic_bias`` Dataset: the bias of the
    model's synthetic-gradient training, reported beside the rest. The
    summary's numbers and tables are built on first use, once: set what they
    report (``synthetic``, ``dataset.attrs``) before.
    """

    def __init__(self, dataset: xr.Dataset, fits: dict, bounds: dict, exact: xr.Dataset, K: int | None,
                 synthetic: xr.Dataset | None = None):
        self.dataset, self.fits, self.bounds, self.exact, self.K = dataset, fits, bounds, exact, K
        self.synthetic = synthetic

    def as_dict(self) -> dict:
        """The summary's numbers, for ``--format json`` and scripts. A κ that no K in range
        reaches is null, with ``reached`` false."""
        return copy.deepcopy(self._numbers)

    @cached_property
    def _numbers(self) -> dict:
        ds, exact = self.dataset, self.exact
        deltas = [float(d) for d in ds["delta"].values]

        def kappa(values, reached):
            return {str(d): {"K": int(k) if r else None, "reached": bool(r)}
                    for d, k, r in zip(deltas, values, reached)}

        recommended = {}
        for d, k, r in zip(deltas, exact["kappa"].values, exact["kappa_reached"].values):
            recommended[str(d)] = {"K": int(k) if r else None, "reached": bool(r),
                                   "rel_bias_upper": _finite(exact["rel_bias_upper"].sel(K=k)) if r else None,
                                   "rel_bias": _finite(exact["rel_bias"].sel(K=k)) if r else None,
                                   "not_reached": None if r else not_reached(exact, d, int(ds.attrs["batch"]))}
        out = {
            "module": ds.attrs["module"], "window_length": int(ds.attrs["window_length"]),
            "windows": int(ds.attrs["batch"]), "grad_norm": float(ds.attrs["grad_norm"]),
            "loss_at": ds.attrs.get("loss_at", "last"),
            "recommended": {"level": float(exact.attrs["level"]), "groups": int(exact.attrs["groups"]),
                            "gradient_resolved": bool(exact["gradient_resolved"]),
                            "beyond_window": _finite(exact["beyond_window"]), "K_max": int(exact.K.max()),
                            "per_delta": recommended},
            "kappa_exact": kappa(ds["kappa_exact"].values, ds["kappa_exact_reached"].values),
            "norms": {},
        }
        for norm, fit in self.fits.items():
            low, high = fit.conf_int()
            out["norms"][norm] = {
                "beta": fit.beta, "beta_low": float(low), "beta_high": float(high), "tau": int(fit.tau),
                "method": fit.method, "decays": fit.decays, "reliable": bool(fit.reliable),
                "kappa": kappa(ds["kappa"].sel(norm=norm).values, ds["kappa_reached"].sel(norm=norm).values),
                "bound_holds_fraction": float(ds["fraction_holds"].sel(norm=norm)),
                "median_bound_over_exact": _finite(ds["median_ratio"].sel(norm=norm)),
            }
        if "checkpoint" in ds.attrs:  # set by ``biaskit analyze``: which file was audited
            out["checkpoint"] = ds.attrs["checkpoint"]
        if self.K is not None:
            out["K"] = self.K
            out["rel_bias_at_K"] = _finite(ds["rel_bias"].sel(K=self.K)) if self.K in ds.K else None
        if self.synthetic is not None:
            syn = self.synthetic
            out["synthetic"] = {
                "K": int(syn.attrs["K"]), "window_length": int(syn.attrs["window_length"]),
                "lookahead": int(syn.attrs["lookahead"]),
                "rel_bias_truncated": float(syn["rel_bias_truncated"]),
                "rel_bias_synthetic": float(syn["rel_bias_synthetic"]),
                "synthetic_error_median": float(syn["synthetic_error"].median()),
            }
        return out

    @cached_property
    def tables(self) -> Summary:
        """The summary's tables and paragraphs, which ``summary()`` and the notebook view render."""
        return _summary(self._numbers, self.fits)

    def summary(self) -> str:
        """The audit in words: the recommended K per δ, then the paper's estimate per norm."""
        return self.tables.as_text()

    def save(self, out: str | Path) -> Path:
        """Write audit.nc, summary.txt, summary.json and the figures into the folder ``out``, all
        at once: they are written beside it and renamed into place, so a failure leaves nothing
        half-written. An earlier audit in ``out`` is replaced; a folder with other files refused."""
        with atomic.staged_folder(out, FILES, "the audit folder") as stage:
            report.save(self.dataset, stage / "audit.nc")
            if self.synthetic is not None:
                report.save(self.synthetic, stage / "synthetic.nc")
            (stage / "summary.txt").write_text(self.summary() + "\n")
            (stage / "summary.json").write_text(json.dumps(self._numbers, indent=1) + "\n")
            for name, fig in self.figures().items():
                fig.savefig(stage / f"{name}.png", dpi=120)
        return Path(out)

    def figures(self) -> dict[str, Figure]:
        """The audit's figures, the ones ``save`` writes, for composing your own: ``decay`` (φ
        against lag with the fit), ``bias`` (the decision figure, ``report.plot_bias``) and
        ``state`` (the per-dimension heatmap)."""
        return {
            "decay": report.plot_decay(self.dataset, self.fits["phi"]),
            "bias": report.plot_bias(self.dataset, self.bounds["phi"], K=self.K, exact=self.exact),
            "state": report.plot_state_heatmap(self.dataset),
        }

    def as_html(self) -> str:
        """The audit in a notebook: the summary's tables as HTML, the decay and bias figures
        inline, each with a caption."""
        figures, fit, level = self.figures(), self.fits["phi"], float(self.exact.attrs["level"])
        decay = report.figure_html(figures["decay"], (
            f"Decay: φ_k = ||∂L_s/∂h_(s−k)|| against lag k (log axis), each window a faint grey line, their "
            f"mean a thick line, and the {fit.method} fit from τ = {fit.tau} (dotted vertical) as a line in its "
            f"shaded {100 * fit.level:g}% band (the paper's assumption A-1: geometric decay past τ)."))
        bias = report.figure_html(figures["bias"], (
            f"Bias: the exact relative bias of truncation K (thick line), its {100 * level:g}% upper limit "
            "(thin line; the gap between them shaded), the paper's bound Δ̂(K) (dashed) and each δ (grey); "
            "▼ marks the recommended K, where the upper limit first falls below δ, ○ the paper's κ̂(δ)"
            + (f", the vertical line the model's own K = {self.K}" if self.K is not None else "")
            + ". Right: every K in the window, the left panel boxed."))
        return '<div class="biaskit-audit">' + "\n".join([self.tables.as_html(), decay, bias]) + "</div>"

    def __repr__(self) -> str:
        """The summary, so ``print(result)`` and a notebook's plain-text view say what was found."""
        return self.summary()

    def _repr_html_(self) -> str:
        """The notebook's view: ``as_html()``."""
        return self.as_html()


def _summary(d: dict, fits: dict) -> Summary:
    """The summary of ``Audit.as_dict()`` ``d`` (``fits``: the decay fits, for their level and
    heavy lags): the recommended K per δ, the paper's estimate per norm beside the batch's exact
    κ, the exact bias at the model's own K and the synthetic gradients' bias, where known."""
    rec, deltas = d["recommended"], list(d["kappa_exact"])
    where = "every step" if d["loss_at"] == "every" else "the last step"
    recommended = Table(
        f"recommended K: the exact relative bias below δ at {100 * rec['level']:g}% confidence "
        f"({rec['groups']} groups of windows)",
        ["δ", "K", "upper limit", "exact at K"],
        [[delta, r["K"], f"{r['rel_bias_upper']:.4g}", f"{r['rel_bias']:.4g}"] if r["reached"]
         else [delta, (f"not reached for K ≤ {rec['K_max']}: {r['not_reached']['why']}; to resolve it: "
                       f"{r['not_reached']['advice']}", 3)]
         for delta, r in rec["per_delta"].items()],
        ["  {:<8}", "{:>6}", "{:>14}", "{:>13}"])

    def kappa(entry):
        return entry["K"] if entry["reached"] else "not reached"

    rows = [[NORMS[norm].label,
             f"{r['beta']:.4f} [{r['beta_low']:.4f}, {r['beta_high']:.4f}]" if r["method"] != "vanished"
             else "0: exactly 0 past τ",
             r["tau"], "yes" if r["decays"] else "no", *(kappa(r["kappa"][k]) for k in deltas),
             f"{100 * r['bound_holds_fraction']:.0f}%", "" if r["reliable"] else "(unreliable)"]
            for norm, r in d["norms"].items()]
    rows.append(["exact (this batch)", "", "", "", *(kappa(d["kappa_exact"][k]) for k in deltas), "", ""])
    heavy = [int(fit.heavy_lags[0]) for fit in fits.values() if not fit.reliable]
    paper = Table(
        "the paper's estimate (kappa-hat from the decay of each norm) beside the batch's exact kappa:",
        ["norm", f"β [{100 * fits['phi'].level:g}% interval]", "τ", "A-1", *(f"κ̂({k})" for k in deltas),
         "bound holds", ""],
        rows, ["{:<22}", "{:<28}", "{:>5}", "  {:<4}", *["{:>12}"] * len(deltas), "{:>13}", "  {}"], rule=True,
        notes=[f"(unreliable: from lag {min(heavy)} on, the lags' means are dominated by a few windows, so "
               "beta's interval may miss: use more windows, or a window length of at most "
               f"{min(heavy)})"] if heavy else [])
    parts = [recommended, paper]
    if "K" in d:
        at = d["rel_bias_at_K"]
        parts.append([f"exact relative bias at the model's own K = {d['K']}: "
                      + ("beyond the window" if at is None else f"{at:.4g}")])
    if "synthetic" in d:
        syn = d["synthetic"]
        parts.append([f"synthetic gradients, BPTT(K, K) chunks at K = {syn['K']} over {d['windows']} windows of "
                      f"{syn['window_length']} steps (+{syn['lookahead']} later):",
                      f"  relative bias against full BPTT: {syn['rel_bias_truncated']:.4g} truncated, "
                      f"{syn['rel_bias_synthetic']:.4g} with the DNI",
                      f"  the DNI's relative error on the future gradient (median over boundaries): "
                      f"{syn['synthetic_error_median']:.3g}"])
    return Summary(d["module"], f"{d['windows']} windows of {d['window_length']} steps, losses at {where}, "
                                f"||E g|| = {d['grad_norm']:.4g}", parts)


def _span(cell) -> tuple[str, int]:
    """A table cell's text and the number of columns it spans."""
    text, span = cell if isinstance(cell, tuple) else (cell, 1)
    return str(text), span


def _ascii(text: str) -> str:
    """``text`` with the tables' Greek spelled out (``ASCII``), for the terminal."""
    for symbol, word in ASCII.items():
        text = text.replace(symbol, word)
    return text


def _esc(text) -> str:
    """``text`` safe inside HTML."""
    return html.escape(str(text))


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def audit(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, readout: nn.Module | None = None,
          loss_fn: Callable | None = None, encoder: nn.Module | None = None, *, start: Any = None,
          deltas: Sequence[float] = (0.9, 0.5, 0.1), K: int | None = None, alpha: float | None = None,
          method: str = "regression", tau: int | str | None = None, seed: int = 0,
          groups: int = DEFAULT_GROUPS, loss_at: str = "last", step_output: bool | None = None,
          dni: Callable | None = None, dni_windows: Windows | None = None, dni_K: int | None = None,
          level: float | None = None, progress: Callable[[int, int], None] | None = None) -> Audit:
    """Decompose one batch of windows (loss at the last step, or with ``loss_at="every"`` at every
    step: targets (batch, time, ...), see ``decompose``); recommend, for every δ, the
    smallest K whose exact relative bias is below δ at confidence 1 − ``alpha`` (0.05 by
    default; ``exact_kappa``); fit the decay of every norm and give the paper's κ̂ beside it,
    calibrated against the exact bias.

    ``module`` is anything ``biaskit.wrap`` accepts (or a system); ``K`` is the
    truncation the model trains with, whose exact bias the summary reports;
    ``groups``: the window groups of the confidence limit (``decompose``'s);
    ``step_output``: as in ``wrap``, a custom cell whose forward returns ``(output, state)``;
    ``level`` = 1 − ``alpha`` is deprecated; ``progress``: ``decompose``'s.

    ``dni``: a synthetic-gradient module the model trains with (``synthetic_bias``'s protocol),
    whose bias at ``dni_K`` (default ``K``) the audit reports beside the rest, measured on
    ``dni_windows`` (``probe.sample_windows``): each window's burn-in, which sets the state and
    the DNI's memory entering it (``warm_up``), then the window of the audit's length and the
    steps after it whose losses its gradient includes, targets at every step.
    """
    alpha = confidence_alpha(alpha, level)
    if dni is not None and (dni_windows is None or (dni_K is None and K is None)):
        raise InputError("a dni is measured on dni_windows at dni_K (else K): pass both")
    system = wrap(module, readout, loss_fn, encoder, step_output)
    ds = decompose(system, inputs, targets, start=start, seed=seed, groups=groups, loss_at=loss_at,
                   progress=progress, **norms.options(NORMS))  # every norm, each fitted below
    R = ds.attrs["window_length"]
    exact = exact_kappa(ds, deltas, alpha=alpha, K_range=(0, R - 1))
    with warnings.catch_warnings():  # the summary marks an unreliable fit
        warnings.simplefilter("ignore", UnreliableFitWarning)
        fits = {norm: fit_decay(ds, norm=norm, method=method, tau=tau) for norm in NORMS}
    bounds = {norm: bias_bound(ds, fit, deltas, (0, R - 1)) for norm, fit in fits.items()}
    cals = {norm: calibration(ds, bound) for norm, bound in bounds.items()}
    per_norm = xr.concat(
        [xr.Dataset({
            "beta": fit.beta, "beta_low": fit.conf_int()[0], "beta_high": fit.conf_int()[1],
            "tau": fit.tau, "decays": int(fit.decays), "reliable": int(fit.reliable),
            "abs_bias_bound": bounds[norm]["abs_bias_bound"], "rel_bias_bound": bounds[norm]["rel_bias_bound"],
            "kappa": bounds[norm]["kappa"], "kappa_reached": bounds[norm]["kappa_reached"],
            "fraction_holds": cals[norm]["fraction_holds"], "median_ratio": cals[norm]["median_ratio"],
        }) for norm, fit in fits.items()],
        dim=xr.DataArray(list(fits), dims="norm", name="norm"),
    )
    cal = cals["phi"]
    recommended = exact[["rel_bias_upper", "kappa", "kappa_reached"]].rename(
        {"kappa": "kappa_recommended", "kappa_reached": "kappa_recommended_reached"})
    dataset = xr.merge([ds, per_norm, cal[["kappa_exact", "kappa_exact_reached"]], recommended],
                       combine_attrs="override")
    dataset.attrs.update({"fit_method": method, "tau_rule": fits["phi"].tau_rule,
                          "level": float(exact.attrs["level"]), "deltas": np.asarray(deltas, dtype=float),
                          "model_K": -1 if K is None else K})
    synthetic = None
    if dni is not None:
        dni_K = K if dni_K is None else dni_K
        dni_start, memory = warm_up(system, dni, dni_windows.burn, dni_K)
        synthetic = synthetic_bias(system, dni_windows.inputs, dni_windows.targets, dni_K, dni, start=dni_start,
                                   memory=memory, lookahead=dni_windows.inputs.shape[1] - R)
    return Audit(dataset, fits, bounds, exact, K, synthetic)
