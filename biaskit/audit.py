"""The audit: decomposition, decay fits for every norm, bounds and calibration, in one report."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import xarray as xr

from . import atomic, report
from .bias import bias_bound, calibration
from .decay import fit_decay
from .decompose import decompose
from .recurrent import wrap

from .norms import NORMS

#: What ``Audit.save`` writes: a folder holding only these is an earlier audit, which it replaces.
FILES = {"audit.nc", "synthetic.nc", "summary.txt", "summary.json", "decay.png", "bias.png", "state.png"}


class Audit:
    """An audit's results: ``dataset`` holds everything; ``summary()`` says it in words.

    ``synthetic``, when set, is a ``synthetic_bias`` Dataset: the bias of the
    model's synthetic-gradient training, reported beside the rest.
    """

    def __init__(self, dataset: xr.Dataset, fits: dict, bounds: dict, K: int | None,
                 synthetic: xr.Dataset | None = None):
        self.dataset, self.fits, self.bounds, self.K, self.synthetic = dataset, fits, bounds, K, synthetic

    def as_dict(self) -> dict:
        """The summary's numbers, for ``--format json`` and scripts."""
        ds = self.dataset
        deltas = ds["delta"].values.tolist()
        out = {
            "module": ds.attrs["module"], "window_length": int(ds.attrs["window_length"]),
            "windows": int(ds.attrs["batch"]), "grad_norm": float(ds.attrs["grad_norm"]),
            "kappa_exact": dict(zip(map(str, deltas), ds["kappa_exact"].values.tolist())),
            "norms": {},
        }
        for norm, fit in self.fits.items():
            low, high = fit.conf_int()
            out["norms"][norm] = {
                "beta": fit.beta, "beta_low": float(low), "beta_high": float(high), "tau": int(fit.tau),
                "method": fit.method,
                "decays": fit.decays,
                "kappa": dict(zip(map(str, deltas), ds["kappa"].sel(norm=norm).values.tolist())),
                "bound_holds_fraction": float(ds["fraction_holds"].sel(norm=norm)),
                "median_bound_over_exact": _finite(ds["median_ratio"].sel(norm=norm)),
            }
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

    def summary(self) -> str:
        """The audit as a text table: β, τ, A-1, κ̂(δ) against the exact κ(δ), bias at K."""
        d = self.as_dict()
        deltas = list(d["kappa_exact"])
        lines = [f"{d['module']}: {d['windows']} windows of {d['window_length']} steps, "
                 f"||E g|| = {d['grad_norm']:.4g}", ""]
        head = f"{'norm':<22}{'beta [95% interval]':<28}{'tau':>5}  {'A-1':<4}" + "".join(
            f"{'kappa(' + k + ')':>12}" for k in deltas) + f"{'bound holds':>13}"
        lines += [head, "-" * len(head)]
        for norm, r in d["norms"].items():
            beta = (f"{r['beta']:.4f} [{r['beta_low']:.4f}, {r['beta_high']:.4f}]" if r["method"] != "vanished"
                    else "0: exactly 0 past tau")
            lines.append(f"{NORMS[norm].label:<22}{beta:<28}{r['tau']:>5}  {'yes' if r['decays'] else 'no':<4}"
                         + "".join(f"{r['kappa'][k]:>12}" for k in deltas)
                         + f"{100 * r['bound_holds_fraction']:>12.0f}%")
        lines.append(f"{'exact':<22}{'':<28}{'':>5}  {'':<4}" + "".join(
            f"{d['kappa_exact'][k]:>12}" for k in deltas))
        if self.K is not None:
            at = d["rel_bias_at_K"]
            lines += ["", f"exact relative bias at the model's own K = {self.K}: "
                          + ("beyond the window" if at is None else f"{at:.4g}")]
        if "synthetic" in d:
            syn = d["synthetic"]
            lines += ["", f"synthetic gradients, BPTT(K, K) chunks at K = {syn['K']} over {d['windows']} windows of "
                          f"{syn['window_length']} steps (+{syn['lookahead']} later):",
                      f"  relative bias against full BPTT: {syn['rel_bias_truncated']:.4g} truncated, "
                      f"{syn['rel_bias_synthetic']:.4g} with the DNI",
                      f"  the DNI's relative error on the future gradient (median over boundaries): "
                      f"{syn['synthetic_error_median']:.3g}"]
        return "\n".join(lines)

    def save(self, out) -> Path:
        """Write audit.nc, summary.txt, summary.json and the figures into the folder ``out``, all
        at once: they are written beside it and renamed into place, so a failure leaves nothing
        half-written. An earlier audit in ``out`` is replaced; a folder with other files refused."""
        with atomic.staged_folder(out, FILES, "the audit folder") as stage:
            report.save(self.dataset, stage / "audit.nc")
            if self.synthetic is not None:
                report.save(self.synthetic, stage / "synthetic.nc")
            (stage / "summary.txt").write_text(self.summary() + "\n")
            (stage / "summary.json").write_text(json.dumps(self.as_dict(), indent=1) + "\n")
            fit = self.fits["phi"]
            report.plot_decay(self.dataset, fit).savefig(stage / "decay.png", dpi=120)
            report.plot_bias(self.dataset, self.bounds["phi"], K=self.K).savefig(stage / "bias.png", dpi=120)
            report.plot_state_heatmap(self.dataset).savefig(stage / "state.png", dpi=120)
        return Path(out)


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def audit(module, inputs, targets, readout=None, loss_fn=None, encoder=None, *, start=None,
          deltas=(0.9, 0.5, 0.1), K: int | None = None, method: str = "regression", tau=None,
          seed: int = 0) -> Audit:
    """Decompose, fit the decay of every norm, bound the bias for every δ and calibrate
    the bounds against the exact bias, for one batch of windows (loss at the last step).

    ``module`` is anything ``biaskit.wrap`` accepts (or a system); ``K`` is the
    truncation the model trains with, whose exact bias the summary reports.
    """
    system = wrap(module, readout, loss_fn, encoder)
    ds = decompose(system, inputs, targets, start=start, seed=seed)
    R = ds.attrs["window_length"]
    fits = {norm: fit_decay(ds, norm=norm, method=method, tau=tau) for norm in NORMS}
    bounds = {norm: bias_bound(ds, fit, deltas, (0, R - 1)) for norm, fit in fits.items()}
    cals = {norm: calibration(ds, bound) for norm, bound in bounds.items()}
    per_norm = xr.concat(
        [xr.Dataset({
            "beta": fit.beta, "beta_low": fit.conf_int()[0], "beta_high": fit.conf_int()[1],
            "tau": fit.tau, "decays": int(fit.decays),
            "abs_bias_bound": bounds[norm]["abs_bias_bound"], "rel_bias_bound": bounds[norm]["rel_bias_bound"],
            "kappa": bounds[norm]["kappa"], "kappa_reached": bounds[norm]["kappa_reached"],
            "fraction_holds": cals[norm]["fraction_holds"], "median_ratio": cals[norm]["median_ratio"],
        }) for norm, fit in fits.items()],
        dim=xr.DataArray(list(fits), dims="norm", name="norm"),
    )
    cal = cals["phi"]
    dataset = xr.merge([ds, per_norm, cal[["kappa_exact", "kappa_exact_reached"]]], combine_attrs="override")
    dataset.attrs.update({"fit_method": method, "tau_rule": fits["phi"].tau_rule,
                          "deltas": np.asarray(deltas, dtype=float), "model_K": -1 if K is None else K})
    return Audit(dataset, fits, bounds, K)
