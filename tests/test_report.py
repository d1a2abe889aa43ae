"""The audit in a notebook (HTML tables, inline PNGs) and the bias figure that shows the decision,
on real tiny audits: one whose mean gradient is resolved over a long window, one where it is noise."""
from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
import xarray as xr
from matplotlib.figure import Figure
from torch import nn

from biaskit import report
from biaskit.audit import audit
from biaskit.decay import UnreliableFitWarning, fit_decay

PNG = b"\x89PNG\r\n\x1a\n"
R = 100


def squared_error(out, target):
    return (out.squeeze(-1) - target) ** 2


@pytest.fixture(scope="module")
def resolved():
    """Every window pulls the output the same way (target 3): the mean gradient is resolved and
    the recommended K are small, far below the window of R = 100 steps."""
    torch.manual_seed(0)
    lstm, head = nn.LSTM(2, 4, 1, batch_first=True), nn.Linear(4, 1)
    x = torch.randn(24, R, 2)
    return audit(lstm, x, torch.full((24,), 3.0), readout=head, loss_fn=squared_error, deltas=[0.5, 0.1, 0.01],
                 K=2)


@pytest.fixture(scope="module")
def noise():
    """Random targets on an untrained LSTM: the mean gradient is noise, the upper limit infinite."""
    torch.manual_seed(0)
    lstm, head = nn.LSTM(2, 4, 1, batch_first=True), nn.Linear(4, 1)
    return audit(lstm, torch.randn(24, 15, 2), torch.randn(24), readout=head, loss_fn=squared_error,
                 deltas=[0.5, 0.1])


class Tables(HTMLParser):
    """Each <table> as rows of cell texts (th and td alike), and every <img> src."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.images, self._cell = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_the_notebook_view_holds_the_summary_numbers_and_two_inline_pngs(resolved):
    d = resolved.as_dict()
    parsed = Tables(resolved._repr_html_())
    recommended, paper = parsed.tables
    assert recommended[0] == ["δ", "K", "upper limit", "exact at K"]
    rows = {row[0]: row for row in recommended[1:]}
    assert set(rows) == set(d["recommended"]["per_delta"])
    for delta, r in d["recommended"]["per_delta"].items():
        assert r["reached"]
        assert int(rows[delta][1]) == r["K"]
        assert float(rows[delta][2]) == pytest.approx(r["rel_bias_upper"], rel=1e-3)
        assert float(rows[delta][3]) == pytest.approx(r["rel_bias"], rel=1e-3)
    deltas = list(d["kappa_exact"])
    assert paper[0][4:4 + len(deltas)] == [f"κ̂({k})" for k in deltas]
    assert len(paper) == 1 + len(d["norms"]) + 1  # header, a row per norm, the batch's exact kappa
    for row, r in zip(paper[1:], d["norms"].values()):
        assert row[2] == str(r["tau"]) and r["method"] == "regression"
        assert [float(v) for v in re.findall(r"[\d.]+", row[1])] == pytest.approx(
            [r["beta"], r["beta_low"], r["beta_high"]], abs=1e-4)
        assert row[4:4 + len(deltas)] == [str(r["kappa"][k]["K"]) for k in deltas]
    assert paper[-1][4:4 + len(deltas)] == [str(d["kappa_exact"][k]["K"]) for k in deltas]
    assert len(parsed.images) == 2  # decay and bias
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        png_size(base64.b64decode(src.split(",", 1)[1], validate=True))
    assert resolved._repr_html_().count("<figcaption>") == 2


def test_not_reached_and_an_unresolved_gradient_are_said_in_the_notebook_view(noise):
    d = noise.as_dict()
    text = noise._repr_html_()
    recommended = Tables(text).tables[0]
    assert all(not r["reached"] for r in d["recommended"]["per_delta"].values())
    for row, r in zip(recommended[1:], d["recommended"]["per_delta"].values()):
        assert row[1].startswith(f"not reached for K ≤ {d['recommended']['K_max']}: ")
        assert r["not_reached"]["cause"] == "unresolved" and r["not_reached"]["advice"] in row[1]
    assert "mostly noise" in text


def test_figures_are_figures_and_save_writes_them(resolved, tmp_path):
    figures = resolved.figures()
    assert set(figures) == {"decay", "bias", "state"}
    assert all(isinstance(fig, Figure) for fig in figures.values())
    resolved.save(tmp_path)
    for name, fig in figures.items():  # save writes these figures (their size at its dpi of 120)
        width, height = fig.get_size_inches() * 120
        assert png_size((tmp_path / f"{name}.png").read_bytes()) == pytest.approx((width, height), abs=1)


def test_a_decay_fit_shows_its_summary_and_warns_when_unreliable():
    rng = np.random.default_rng(0)
    light = xr.Dataset({"phi": (("sample", "lag"), 0.8 ** np.arange(20) * rng.lognormal(0, 0.2, (64, 20)))})
    fit = fit_decay(light)
    assert fit.reliable
    assert fit._repr_html_() == fit.summary().as_html()
    heavy = xr.Dataset({"phi": (("sample", "lag"), 0.8 ** np.arange(20) * rng.lognormal(0, 3, (16, 20)))})
    with pytest.warns(UnreliableFitWarning):
        fit = fit_decay(heavy)
    text = fit._repr_html_()
    assert not fit.reliable
    assert text.startswith('<table class="simpletable">') and "interval reliable" in text
    assert text.count("unreliable: at lag(s)") == 1  # the note once, as its own paragraph, escaped
    assert "&gt; 0.02" in text and "> 0.02" not in text


# --- the bias figure -------------------------------------------------------------


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_the_bias_figure_zooms_on_the_decision(resolved):
    ds, exact, bound = resolved.dataset, resolved.exact, resolved.bounds["phi"]
    fig = report.plot_bias(ds, bound, K=2, exact=exact)
    main, context = fig.axes
    recommended = exact.kappa.values[exact.kappa_reached.values == 1]
    paper = bound.kappa.values[bound.kappa_reached.values == 1]
    left, right = main.get_xlim()
    assert left <= 0 and max(recommended.max(), paper.max()) < right < R / 4
    assert context.get_xlim()[1] >= R - 1  # all K for context

    bottom, top = main.get_ylim()
    assert main.get_yscale() == "log" and bottom < 0.01 / 2 and top > 0.5
    lines = lines_by_label(main)
    shown = lines["exact δ(K)"].get_xdata() <= right
    np.testing.assert_allclose(lines["exact δ(K)"].get_ydata()[shown], ds.rel_bias.sel(K=slice(None, right)))
    np.testing.assert_allclose(lines["95% upper limit"].get_ydata(), exact.rel_bias_upper)
    np.testing.assert_allclose(lines["bound Δ̂(K)"].get_ydata(), bound.rel_bias_bound)
    assert lines["model's K = 2"].get_xdata()[0] == 2
    assert main.collections, "the band between exact and upper limit"

    marks = lines["recommended K (upper limit < δ)"]
    np.testing.assert_array_equal(marks.get_xdata(), recommended)
    np.testing.assert_allclose(marks.get_ydata(), exact.delta)
    for k, delta in zip(recommended, exact.delta.values):  # where the upper limit first falls below δ
        upper = exact.rel_bias_upper.values
        assert upper[k] < delta and (k == 0 or upper[k - 1] >= delta)
    across = [line.get_ydata()[0] for line in main.get_lines() if list(line.get_xdata()) == [0, 1]]
    assert sorted(across) == sorted(bound.delta.values)  # a horizontal line per δ, labelled
    assert {f"δ = {delta:g}" for delta in bound.delta.values} <= {t.get_text() for t in main.texts}
    assert "paper's κ̂(δ) (phi)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_an_infinite_upper_limit_is_left_out_and_said(noise):
    ds, exact, bound = noise.dataset, noise.exact, noise.bounds["phi"]
    assert np.isinf(exact.rel_bias_upper.values).all()
    fig = report.plot_bias(ds, bound, exact=exact)
    main = fig.axes[0]
    assert np.isfinite(main.get_ylim()).all() and np.isfinite(main.get_xlim()).all()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("infinite at every K" in label and "not resolved" in label for label in labels)
    assert any("none for δ = 0.5, 0.1" in label for label in labels)
    fig.savefig(io.BytesIO(), format="png")  # draws


def test_the_bias_figure_without_exact_or_on_a_given_axes(resolved):
    ds, bound = resolved.dataset, resolved.bounds["phi"]
    fig = report.plot_bias(ds, bound)
    main = fig.axes[0]
    labels = set(lines_by_label(main))
    assert not any("upper limit" in label for label in labels) and "exact δ(K)" in labels
    assert bound.kappa.values.max() < main.get_xlim()[1] < R / 4  # zoomed on the paper's κ̂
    own = report._figure()
    ax = own.add_subplot()
    assert report.plot_bias(ds, bound, K=3, exact=resolved.exact, ax=ax) is own and own.axes == [ax]


# --- printing and the state figure ----------------------------------------------------


def test_print_shows_the_summary_and_captions_say_what_is_drawn(resolved, noise):
    assert repr(resolved) == str(resolved) == resolved.summary()  # print(audit), a notebook's text/plain
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", resolved._repr_html_())
    bias = next(c for c in captions if c.startswith("Bias"))
    assert "upper limit (thin line; the gap between them shaded)" in bias and "model&#x27;s own K = 2" in bias
    for result in (resolved, noise):
        unreliable = [fit for fit in result.fits.values() if not fit.reliable]
        text = result.summary()
        assert "reliability_note" not in text
        if unreliable:  # says what to do, with the lag the fits first go wrong at
            lag = min(int(fit.heavy_lags[0]) for fit in unreliable)
            assert f"use more windows, or a window length of at most {lag}" in text
    assert not resolved.fits["psi"].reliable  # so the advice above was checked


def test_the_state_heatmap_spans_six_decades_ticked_at_powers_of_ten():
    """A fast-contracting linear cell: the state gradient falls 100-fold a lag, 38 decades over the
    window, which would leave all but the first lags in the lowest colour of a full-range scale."""
    from helpers import LinearCell

    torch.manual_seed(0)
    cell = LinearCell(0.01 * torch.eye(4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    x, y = torch.randn(8, 20, 2, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    result = audit(cell, x, y, readout=nn.Linear(4, 1).double(), loss_fn=squared_error)
    phi = result.dataset["phi_state"].values
    assert phi[phi > 0].max() / phi[phi > 0].min() > 1e30
    fig = report.plot_state_heatmap(result.dataset)
    mesh = fig.axes[0].collections[0]
    assert mesh.norm.vmin == pytest.approx(mesh.norm.vmax / 10**report.STATE_DECADES)
    bar = fig.axes[1]
    fig.canvas.draw()
    ticks = [t for t in bar.get_yticks() if mesh.norm.vmin <= t <= mesh.norm.vmax]
    assert len(ticks) >= 5 and all(float(np.log10(t)).is_integer() for t in ticks)
    assert "clipped below" in bar.get_ylabel()
    assert all(float(t).is_integer() for t in fig.axes[0].get_xticks())  # whole lags
