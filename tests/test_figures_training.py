"""Training curves: fixed-K and adaptive runs told apart at a glance, smoothing that is a centred
moving average inventing nothing at the ends, and logs with missing keys or configs drawn anyway.
The run directories are written by hand: no training is needed to draw them."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from biaskit.errors import InputError
from trainers import runs

NLL = [2.0, 1.5, 1.4, 1.1, 1.2, 0.9, 0.95, 0.8, 0.85, 0.7]


def make_run(folder, lines, config=None):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


def fixed(folder, K, nll=NLL):
    lines = [{"epoch": e, "K": K, "test_nll": v, "rel_bias_exact": 0.1 / K, "rel_bias_bound": 0.2 / K}
             for e, v in enumerate(nll, 1)]
    return make_run(folder, lines, {"train": {"K": K, "delta": None}})


def luminance(color):
    r, g, b = color[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_fixed_and_adaptive_runs_differ_in_style_and_colour_family(tmp_path):
    short, long = fixed(tmp_path / "K=5", 5), fixed(tmp_path / "K=20", 20)
    changing = make_run(tmp_path / "adaptive", [{"epoch": e, "K": K, "test_nll": v}
                                                for e, (K, v) in enumerate(zip([5, 8, 8, 12], NLL), 1)])
    by_config = fixed(tmp_path / "delta", 7)  # K never changed, but the config says adaptive
    (by_config / "config.json").write_text(json.dumps({"train": {"K": 7, "delta": 0.1}}))
    paper = fixed(tmp_path / "paper", 9)
    (paper / "config.json").write_text(json.dumps({"train": {"K": 9, "delta": 0.5, "controller": "paper"}}))
    fig = runs.plot_training([long, changing, short, by_config, paper], ["K=20", "adaptive", "K=5", "δ=0.1", "paper"])
    K_panel = {line.get_label(): line for line in fig.axes[1].get_lines()}
    for label in ("K=20", "K=5"):
        assert K_panel[label].get_linestyle() == "--"
        r, _, b, _ = K_panel[label].get_color()
        assert b > r  # blues
    for label in ("adaptive", "δ=0.1"):
        assert K_panel[label].get_linestyle() == "-"
        assert K_panel[label].get_linewidth() > K_panel["K=5"].get_linewidth()
        r, _, b, _ = K_panel[label].get_color()
        assert r > b  # oranges
    assert K_panel["paper"].get_linestyle() == "-."  # the paper's controller: its own style and greens
    r, g, b, _ = K_panel["paper"].get_color()
    assert g > r and g > b
    assert luminance(K_panel["K=20"].get_color()) < luminance(K_panel["K=5"].get_color())  # longer K darker
    for ax in (fig.axes[0], fig.axes[2]):  # every panel keeps the run's style
        styles = {line.get_linestyle() for line in ax.get_lines()}
        assert "--" in styles and "-" in styles
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["K=20", "adaptive", "K=5", "δ=0.1", "paper"]


def test_smoothing_is_a_centred_moving_average_that_invents_nothing(tmp_path):
    values = np.array(NLL)
    values_with_gap = [*NLL[:4], None, *NLL[5:]]
    plain = fixed(tmp_path / "plain", 5)
    gap = fixed(tmp_path / "gap", 10, nll=values_with_gap)
    fig = runs.plot_training([plain, gap], smooth=5)
    line, holed = fig.axes[0].get_lines()
    expected = np.empty(10)
    expected[2:-2] = np.convolve(values, np.ones(5) / 5, mode="valid")
    expected[[0, -1]] = values[[0, -1]]  # no neighbours on both sides: the value itself
    expected[1], expected[-2] = values[:3].mean(), values[-3:].mean()
    np.testing.assert_allclose(line.get_ydata(), expected)
    np.testing.assert_allclose(line.get_xdata(), np.arange(1, 11))

    got = holed.get_ydata()
    assert np.isnan(got[4])  # a missing epoch stays missing
    assert got[3] == pytest.approx(np.mean([NLL[1], NLL[2], NLL[3], NLL[5]]))  # and is skipped by its neighbours
    K_line = fig.axes[1].get_lines()[0]
    np.testing.assert_array_equal(K_line.get_ydata(), 5)  # K is drawn as logged
    unsmoothed = runs.plot_training([plain])
    np.testing.assert_allclose(unsmoothed.axes[0].get_lines()[0].get_ydata(), values)
    assert runs.plot_training([plain], smooth=1).axes[0].get_lines()[0].get_ydata().tolist() == NLL


@pytest.mark.parametrize("smooth", [0, -3, 2.5, True])
def test_a_bad_smoothing_window_is_refused(tmp_path, smooth):
    with pytest.raises(InputError, match="smooth must be a whole number"):
        runs.plot_training([fixed(tmp_path / "run", 5)], smooth=smooth)


def test_logs_with_missing_keys_or_configs_draw(tmp_path):
    bare = make_run(tmp_path / "bare", [{"epoch": 1}, {"epoch": 2, "K": None}, {"epoch": 3, "K": 4}])
    empty = make_run(tmp_path / "empty", [])
    damaged = make_run(tmp_path / "damaged", [{"epoch": 1, "K": 3, "test_loss": 0.5}, {"epoch": 2, "K": 3}],
                       config="{not json")
    listed = make_run(tmp_path / "listed", [{"epoch": 1, "K": 3, "rel_bias_exact": None}], config="[1, 2]")
    dni = make_run(tmp_path / "dni", [{"epoch": e, "K": 4, "rel_bias_synthetic": 0.1, "rel_bias_truncated": 0.3}
                                      for e in (1, 2)])
    fig = runs.plot_training([bare, empty, damaged, listed, dni], smooth=3)
    assert len(fig.axes) == 4  # the DNI's panel
    assert fig.axes[0].get_ylabel() == "test loss"
    K_panel = {line.get_label(): line for line in fig.axes[1].get_lines()}
    assert set(K_panel) == {"bare", "damaged", "listed", "dni"}  # the empty log draws nothing
    assert all(K_panel[label].get_linestyle() == "--" for label in K_panel)  # none is adaptive
    fig.savefig(io.BytesIO(), format="png")
    fig = runs.plot_training([bare])
    assert len(fig.axes) == 3 and fig.axes[0].get_ylabel() == "test metric"
    fig.savefig(io.BytesIO(), format="png")


def test_a_negative_nll_keeps_its_run_on_a_linear_axis_and_epochs_are_whole(tmp_path):
    """A point process's NLL can be below 0: a log axis would drop the run while the legend kept it."""
    positive, negative = fixed(tmp_path / "positive", 5), fixed(tmp_path / "negative", 10, nll=[-v for v in NLL])
    fig = runs.plot_training([positive, negative])
    metric, _, bias = fig.axes[:3]
    assert metric.get_yscale() == "linear" and bias.get_yscale() == "log"  # the biases stay positive
    fig.canvas.draw()
    bottom, top = metric.get_ylim()
    assert bottom < -max(NLL) and top > max(NLL)  # both runs in view
    assert runs.plot_training([positive]).axes[0].get_yscale() == "log"
    for ax in fig.axes:
        assert all(float(t).is_integer() for t in ax.get_xticks())
