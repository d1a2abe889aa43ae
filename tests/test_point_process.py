"""The point-process task: likelihood, expectation, Hawkes simulator, loaders, biaskit and a run,
each against an independent computation."""
from __future__ import annotations

import codecs
import math
import os
import pickle

import numpy as np
import pytest
import torch
from scipy import integrate, stats

import biaskit
from biaskit.probe import sample_windows
from trainers import config as configs
from trainers import loop
from trainers.tasks import hawkes
from trainers.tasks import point_process as pp
from trainers.tasks.rmtpp import W_FLOOR, expected_gap, metrics, nll

SMALL = {"events": 2000, "sequence_events": 40, "embedding": 4, "hidden": 8}
#: (c, w) from a quickly to a slowly decaying and a rising intensity, on both sides of w = 0.
INTENSITIES = [(-2.0, -3.0), (0.5, -0.5), (1.0, -W_FLOOR), (-1.0, W_FLOOR), (0.0, 0.5), (2.0, 4.0), (-3.0, 1.5)]


def outputs_for(logits, c, w):
    return torch.tensor([[*logits, c, w]], dtype=torch.float64)


@pytest.mark.parametrize("c, w", INTENSITIES)
@pytest.mark.parametrize("gap", [0.0, 0.3, 2.5])
def test_nll_is_cross_entropy_plus_minus_log_intensity_plus_its_quadrature(c, w, gap):
    logits, mark = [0.2, -1.0, 0.7], 2

    def lam(s):
        return math.exp(c + w * s)

    compensator = integrate.quad(lam, 0.0, gap, epsabs=1e-13, epsrel=1e-12)[0]
    cross_entropy = -logits[mark] + math.log(sum(math.exp(v) for v in logits))
    expected = cross_entropy - math.log(lam(gap)) + compensator
    got = nll(outputs_for(logits, c, w), torch.tensor([[mark, gap]], dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def quad_mean(c, w):
    """E[Δ | a next event] and the mass of the density, by scipy's quadrature."""
    def log_density(s):  # log λ(s) − Λ(s), finite or −inf, never NaN
        return c + w * s - math.exp(c) * math.expm1(w * s) / w if w * s < 700 else -math.inf

    mass = integrate.quad(lambda s: math.exp(log_density(s)), 0, math.inf, limit=400)[0]
    return integrate.quad(lambda s: s * math.exp(log_density(s)), 0, math.inf, limit=400)[0] / mass, mass


@pytest.mark.parametrize("c, w", INTENSITIES)
def test_expected_gap_is_the_mean_of_the_density_given_a_next_event(c, w):
    mean, mass = quad_mean(c, w)
    if w > 0:
        assert mass == pytest.approx(1.0, abs=1e-8)
    else:  # the intensity dies out: the density lacks the chance of no further event
        assert mass == pytest.approx(-math.expm1(-math.exp(c) / -w), rel=1e-8)
    got = expected_gap(torch.tensor([c], dtype=torch.float64), torch.tensor([w], dtype=torch.float64))
    assert got.item() == pytest.approx(mean, rel=1e-8)


def test_metrics_are_the_rmse_of_the_expected_gap_and_the_mark_error_rate():
    logits = [[2.0, 0.0], [0.0, 1.0], [3.0, -1.0], [0.5, 0.4]]
    outputs = torch.tensor([[*lg, c, w] for lg, (c, w) in zip(logits, INTENSITIES)], dtype=torch.float64)
    targets = torch.tensor([[0, 0.1], [0, 2.0], [1, 0.4], [0, 3.0]], dtype=torch.float64)
    means = np.array([quad_mean(c, w)[0] for c, w in INTENSITIES[:4]])
    got = metrics(None, outputs[None], targets[None])
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean((means - targets[:, 1].numpy()) ** 2)), rel=1e-8)
    assert got["error_rate"] == 0.5


def test_intensity_slope_stays_away_from_zero_with_either_sign():
    model = pp.build({**SMALL, "events": 500}).model
    unit = model.encoder.scales[0].item()
    for raw, sign in [(0.0, 1), (1e-6, 1), (-1e-6, -1), (-0.5, -1)]:
        with torch.no_grad():
            model.head.w.fill_(raw)
        w = model.head(torch.zeros(1, 8))[0, -1].item()
        assert w * unit == pytest.approx(raw + sign * W_FLOOR, rel=1e-6)


def test_nll_in_rescaled_time_shifts_by_the_log_of_the_scale():
    """The density of s·Δ is f(Δ) / s: the time units are the data's, whatever they are."""
    task = pp.build({**SMALL, "events": 500})
    scaled = pp.build({**SMALL, "events": 500})  # same seed: same data, same initial weights
    x, y = task.splits["valid"]
    s = 60.0
    xs, ys = scaled.splits["valid"]
    xs[:, 1:] *= s
    ys[:, 1] *= s
    scaled.model.encoder.scales *= s
    scaled.model.head.log_unit += math.log(s)
    with torch.no_grad():
        loss = task.model.loss(task.model(x[None])[0], y[None])
        loss_scaled = scaled.model.loss(scaled.model(xs[None])[0], ys[None])
    torch.testing.assert_close(loss_scaled, loss + math.log(s), rtol=1e-5, atol=1e-4)


# --- the Hawkes simulator ------------------------------------------------------------------


def test_hawkes_rate_matches_the_stationary_rate():
    """Per-mark counts over the simulated span against Λ = (I − α/β)⁻¹ μ, within four standard
    deviations of the Hawkes central limit theorem: T·Cov(N(T)/T) → (I − K)⁻¹ diag(Λ) (I − K)⁻ᵀ
    with K = α/β (Bacry et al. 2013); the start from an empty history costs O(1) events."""
    events = 40_000
    times, marks = hawkes.simulate(pp.MU, pp.ALPHA, pp.BETA, events, np.random.default_rng(1))
    mu, alpha = np.array(pp.MU), np.array(pp.ALPHA)
    rate = np.linalg.solve(np.eye(2) - alpha / pp.BETA, mu)
    np.testing.assert_allclose(hawkes.stationary_rate(pp.MU, pp.ALPHA, pp.BETA), [41 / 60, 0.55], rtol=1e-12)
    assert np.all(np.diff(times) > 0)
    span = times[-1]
    measured = np.bincount(marks, minlength=2) / span
    spread = np.linalg.inv(np.eye(2) - alpha / pp.BETA)
    sd = np.sqrt(np.diag(spread @ np.diag(rate) @ spread.T) / span)
    assert np.all(np.abs(measured - rate) < 4 * sd), (measured, rate, sd)


def test_hawkes_compensator_increments_are_unit_exponential():
    """Time rescaling: each mark's compensator between its own events is Exp(1) iff the process
    has the stated intensity; the compensator is computed in closed form, not by thinning."""
    times, marks = hawkes.simulate(pp.MU, pp.ALPHA, pp.BETA, 20_000, np.random.default_rng(2))
    mu, alpha, beta = np.array(pp.MU), np.array(pp.ALPHA), pp.BETA
    excess, last, total = np.zeros(2), 0.0, np.zeros(2)
    since = [[], []]  # per mark: compensator values at its events
    for t, k in zip(times, marks):
        dt = t - last
        total += mu * dt + excess * -np.expm1(-beta * dt) / beta
        excess = excess * np.exp(-beta * dt) + alpha[:, k]
        since[k].append(total[k])
        last = t
    for values in since:
        increments = np.diff(values, prepend=0.0)
        assert stats.kstest(increments, "expon").pvalue > 1e-3


def test_hawkes_simulation_is_determined_by_the_generator():
    def draw(seed):
        return hawkes.simulate(pp.MU, pp.ALPHA, pp.BETA, 200, np.random.default_rng(seed))

    (t1, k1), (t2, k2), (t3, _) = draw(5), draw(5), draw(6)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(k1, k2)
    assert not np.array_equal(t1, t3)


def test_a_non_stationary_hawkes_process_is_refused():
    with pytest.raises(biaskit.InputError, match="spectral radius"):
        hawkes.stationary_rate([0.1, 0.1], [[1.5, 0.0], [0.0, 0.5]], 1.0)


# --- loaders and streams --------------------------------------------------------------------


def events(*pairs):
    """Neural-Hawkes events from (time since start, mark) pairs."""
    out, last = [], 0.0
    for t, k in pairs:
        out.append({"time_since_start": t, "time_since_last_event": t - last, "type_event": k})
        last = t
    return out


def write_pickles(folder, **splits):
    folder.mkdir(exist_ok=True)
    for key, data in splits.items():
        with open(folder / f"{key}.pkl", "wb") as fh:
            pickle.dump(data, fh)
    return folder


PICKLED = {
    "train": [events((0.5, 1), (1.0, 0), (2.5, 2)), events((0.0, 0), (0.25, 1)), events((3.0, 1))],
    "dev": [events((1.0, 2), (1.5, 2))],
    "test": [events((0.0, 0), (4.0, 1), (4.0, 0))],
}


@pytest.fixture
def pickle_folder(tmp_path):
    return write_pickles(tmp_path / "hawkes", **{k: {k: v, "dim_process": 3} for k, v in PICKLED.items()})


def test_pickle_layout_becomes_streams_with_no_event_in_its_own_input(pickle_folder):
    task = pp.build({"data": str(pickle_folder), **SMALL})
    x, y = task.splits["train"]
    # position i reads event i = [mark, gap, time since the first event]; its target is event i + 1
    torch.testing.assert_close(x, torch.tensor([[1, 0, 0], [0, 0.5, 0.5], [0, 0, 0]]))
    torch.testing.assert_close(y, torch.tensor([[0, 0.5], [2, 1.5], [1, 0.25]]))
    torch.testing.assert_close(task.splits["valid"][1], torch.tensor([[2.0, 0.5]]))
    torch.testing.assert_close(task.splits["test"][0], torch.tensor([[0, 0, 0], [1, 4.0, 4.0]]))
    torch.testing.assert_close(task.splits["test"][1], torch.tensor([[1, 4.0], [0, 0.0]]))
    assert task.model.head.marks.out_features == 3
    torch.testing.assert_close(task.model.encoder.scales, torch.tensor([2.25 / 3, 0.5 / 3]))


def test_a_missing_pickle_split_is_named(tmp_path):
    folder = write_pickles(tmp_path / "d", train={"train": PICKLED["train"], "dim_process": 3},
                           test={"test": PICKLED["test"], "dim_process": 3})
    with pytest.raises(biaskit.InputError, match="lacks dev.pkl"):
        pp.build({"data": str(folder), **SMALL})


@pytest.mark.parametrize("bad, message", [
    ({"training": PICKLED["train"], "dim_process": 3}, "keys 'train' and 'dim_process'"),
    ({"train": PICKLED["train"]}, "keys 'train' and 'dim_process'"),
    ([1, 2], "must be a dict"),
    ({"train": [[{"time_since_start": 1.0}]], "dim_process": 3}, "sequence 0: every event"),
    ({"train": [events((2.0, 0), (1.0, 1))], "dim_process": 3}, "decreases"),
    ({"train": PICKLED["train"], "dim_process": 2}, "disagree on dim_process"),
    ({"train": [events((0.5, 0), (1.5, 3))], "dim_process": 3}, "marks outside 0..2"),
    ({"train": [events((0.5, 0), (math.inf, 1))], "dim_process": 3}, "not a finite number"),
    ({"train": [events((0.5, 0), (1.5, 1.5))], "dim_process": 3}, "sequence 0: marks outside 0..2; type_event must "
                                                                   "be a whole number below dim_process = 3"),
    ({"train": [events((0.5, 0), (1.5, 1e300))], "dim_process": 3}, "marks outside 0..2"),
    ({"train": [events((0.5, 0), (1.5, 10**400))], "dim_process": 3}, "every event must be a dict with numeric"),
    ({"train": 7, "dim_process": 3}, "'train' must be a list of sequences, found int"),
    ({"train": PICKLED["train"], "dim_process": "three"}, "dim_process must be a whole number of marks, 1 or more, "
                                                          "found 'three'"),
    ({"train": PICKLED["train"], "dim_process": 0}, "dim_process must be a whole number"),
    ({"train": PICKLED["train"], "dim_process": 2.5}, "dim_process must be a whole number"),
    ({"train": PICKLED["train"], "dim_process": 2_000_000}, r"declares dim_process = 2000000 marks, more than the "
                                                            r"limit of 10,000 \(point_process.MAX_MARKS\)"),
    ({"train": PICKLED["train"], "dim_process": 10**5000}, "declares dim_process = an int of 16610 bits"),
])
def test_a_malformed_pickle_is_refused_clearly(pickle_folder, bad, message):
    write_pickles(pickle_folder, train=bad)
    with pytest.raises(biaskit.InputError, match=message):
        pp.build({"data": str(pickle_folder), **SMALL})


def test_a_file_that_is_no_pickle_is_refused(pickle_folder):
    (pickle_folder / "test.pkl").write_text("sequence,time,mark\n")
    with pytest.raises(biaskit.InputError, match="cannot read .*test.pkl"):
        pp.build({"data": str(pickle_folder), **SMALL})


class RunsOnLoad:
    """A crafted pickle: loading it calls ``call(*args)``."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


#: Pickles that would run code, each given the marker file it would create.
CRAFTED = {
    "os.system": lambda marker: pickle.dumps(RunsOnLoad(os.system, f"touch {marker}")),
    "builtins.eval": lambda marker: pickle.dumps(RunsOnLoad(eval, f"open({str(marker)!r}, 'w').close()")),
    "builtins.exec": lambda marker: pickle.dumps(RunsOnLoad(exec, f"open({str(marker)!r}, 'w').close()")),
    "inside honest data": lambda marker: pickle.dumps(
        {"train": [[RunsOnLoad(os.system, f"touch {marker}")]], "dim_process": 3}),
    "protocol 0 GLOBAL": lambda marker: f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(),
    "protocol 0 INST": lambda marker: f"(S'touch {marker}'\nios\nsystem\n.".encode(),
}


@pytest.mark.parametrize("craft", CRAFTED.values(), ids=list(CRAFTED))
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(pickle_folder, craft):
    marker = pickle_folder.parent / "ran"
    (pickle_folder / "train.pkl").write_bytes(craft(marker))
    refused = r"train\.pkl refuses to load (os|posix|nt|builtins)\.(system|eval|exec): data pickles may hold only "
    with pytest.raises(biaskit.InputError, match=refused + "lists, dicts, numbers and strings"):
        pp.build({"data": str(pickle_folder), **SMALL})
    assert not marker.exists()


def test_a_pickled_numpy_value_is_refused_with_the_fix(pickle_folder):
    write_pickles(pickle_folder, train={"train": PICKLED["train"], "dim_process": np.int64(3)})
    with pytest.raises(biaskit.InputError, match="refuses to load numpy.*save the data again as plain Python values"):
        pp.build({"data": str(pickle_folder), **SMALL})


#: The first training sequence of PICKLED as Python 2 writes it: protocol 0, byte strings.
PYTHON2_TRAIN = (b"(dp0\nS'dim_process'\np1\nI3\nsS'train'\np2\n(lp3\n(lp4\n(dp5\nS'time_since_start'\np6\n"
                 b"F0.5\nsS'type_event'\np7\nI1\nsa(dp8\ng6\nF1.0\nsg7\nI0\nsaas.")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_honest_pickles_of_every_protocol_and_python_2_load(pickle_folder, protocol):
    for key, data in PICKLED.items():
        with open(pickle_folder / f"{key}.pkl", "wb") as fh:
            pickle.dump({key: data, "dim_process": 3}, fh, protocol=protocol)
    reference = pp.build({"data": str(pickle_folder), **SMALL}).splits
    assert reference["train"][0].shape == (3, 3)
    (pickle_folder / "train.pkl").write_bytes(PYTHON2_TRAIN)
    x, y = pp.build({"data": str(pickle_folder), **SMALL}).splits["train"]
    torch.testing.assert_close(x, reference["train"][0][:1])
    torch.testing.assert_close(y, reference["train"][1][:1])


def test_csv_is_sorted_in_time_and_cut_80_10_10_by_sequence_id(tmp_path):
    rows = []
    for seq in range(1, 11):  # ids 1..10: numeric order puts 10 last
        rows += [f"{seq},{seq + 0.5},1", f"{seq},{float(seq)},0"]  # out of time order
    rows += ["10,12.0,2"]
    path = tmp_path / "events.csv"
    path.write_text("sequence,time,mark\n" + "\n".join(reversed(rows)) + "\n")
    task = pp.build({"data": str(path), **SMALL})
    x, y = task.splits["train"]
    assert x.shape == (8, 3)
    torch.testing.assert_close(y, torch.tensor([[1, 0.5]] * 8))
    torch.testing.assert_close(task.splits["valid"][0], torch.tensor([[0, 0, 0.0]]))
    torch.testing.assert_close(task.splits["test"][0], torch.tensor([[0, 0, 0], [1, 0.5, 0.5]]))
    torch.testing.assert_close(task.splits["test"][1], torch.tensor([[1, 0.5], [2, 1.5]]))
    assert task.model.head.marks.out_features == 3


@pytest.mark.parametrize("text, message", [
    ("1,0.5,0\n1,1.0,1\n", "needs a header with the columns sequence, time, mark"),
    ("sequence,time\n1,0.5\n", "needs a header"),
    ("sequence,time,mark\n1,0.5,0\n1,soon,1\n", "line 3: need a sequence id, a number for time"),
    ("sequence,time,mark\n", "no events"),
    ("", "bad.csv is empty: write a header line sequence,time,mark"),
    ("\n \n\n", "is empty"),
    ("sequence,time,mark\n,,\n , , \n\n", "no events"),  # lines of blank cells are skipped
    ("sequence,time,mark,mark\n1,0.5,0,0\n", "the header names mark more than once"),
    ("sequence,time,mark\n1,0.5\n", "line 2: need a sequence id, a number for time and an integer mark, got "
                                      "sequence='1', time='0.5', mark=''"),
    ("sequence,time,mark\n ,0.5,0\n", "line 2: need a sequence id"),
    ("sequence,time,mark\n1,0.5,1.0\n", "line 2: need .* an integer mark"),
    ("sequence,time,mark\n1,0.5,0\n1,nan,1\n", "line 3: time 'nan' is not a finite number"),
    ("sequence,time,mark\n1,-inf,1\n", "line 2: time '-inf' is not a finite number"),
    ("sequence,time,mark\n1,1e400,1\n", "time '1e400' is not a finite number"),
    ("sequence,time,mark\n1,0.5,-1\n", "line 2: mark '-1' is not an id from 0 to 2\\^63 - 1"),
    ("sequence,time,mark\n1,0.5,9223372036854775808\n", "mark '9223372036854775808' is not an id"),
    ("sequence,time,mark\n1,0.5," + "9" * 5000 + "\n", r"need .* an integer mark, got .*mark='9+\.\.\.$"),
    ("sequence,time,mark\n1,0.5,\"" + "0" * 200_000 + "\"\n", "line 2: not readable as CSV: field larger"),
])
def test_a_malformed_csv_is_refused_clearly(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(biaskit.InputError, match=message):
        pp.build({"data": str(path), **SMALL})


def test_a_csv_that_is_not_utf8_is_refused_at_its_first_bad_byte(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("sequence,time,mark\n1,0.5,0\n1,1.0,café\n".encode("latin1"))
    with pytest.raises(biaskit.InputError, match=r"latin1.csv is not UTF-8 text: byte 36 \(line 3\) is b'\\xe9'"):
        pp.build({"data": str(path), **SMALL})
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())  # the byte count includes a byte-order mark
    with pytest.raises(biaskit.InputError, match=r"byte 39 \(line 3\)"):
        pp.build({"data": str(path), **SMALL})


def csv_of(sequences, marks):
    """A CSV of ``sequences`` sequences of len(marks) events, event j at time j with mark marks[j]."""
    rows = [f"{s},{t},{k}" for s in range(sequences) for t, k in enumerate(marks)]
    return "sequence,time,mark\n" + "\n".join(rows) + "\n"


def test_a_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "events.csv"
    path.write_bytes(codecs.BOM_UTF8 + csv_of(10, [0, 1]).encode())
    assert pp.build({"data": str(path), **SMALL}).model.head.marks.out_features == 2


def test_sparse_mark_ids_of_all_splits_become_dense_in_sorted_order(tmp_path):
    text = csv_of(9, [2_000_000, 7, 2_000_000]) + "9,0,42\n9,1,7\n"  # 42 only in the test split
    path = tmp_path / "sparse.csv"
    path.write_text(text)
    task = pp.build({"data": str(path), **SMALL})
    assert task.model.head.marks.out_features == 3  # not 2,000,001
    x, y = task.splits["train"]
    assert x[:, 0].tolist() == [2, 0] * 8 and y[:, 0].tolist() == [0, 2] * 8  # 7 → 0, 42 → 1, 2,000,000 → 2
    assert task.splits["test"][0][:, 0].tolist() == [1] and task.splits["test"][1][:, 0].tolist() == [0]
    again = pp.build({"data": str(path), **SMALL})
    assert all(torch.equal(a, b) for split in pp.SPLITS for a, b in zip(task.splits[split], again.splits[split]))


def test_more_distinct_marks_than_the_limit_are_refused(tmp_path):
    path = tmp_path / "many.csv"
    path.write_text(csv_of(10, range(pp.MAX_MARKS + 1)))
    with pytest.raises(biaskit.InputError, match="many.csv has 10,001 distinct marks, more than the limit of 10,000"):
        pp.build({"data": str(path), **SMALL})
    path.write_text(csv_of(10, range(pp.MAX_MARKS)))
    assert pp.load_csv(path)[1] == pp.MAX_MARKS


def test_times_beyond_float32_are_refused(tmp_path):
    path = tmp_path / "far.csv"
    path.write_text(csv_of(10, [0, 1]).replace(",1,", ",1e39,"))
    with pytest.raises(biaskit.InputError, match="the train split has gaps or times beyond float32"):
        pp.build({"data": str(path), **SMALL})


def test_a_missing_data_path_is_refused(tmp_path):
    with pytest.raises(biaskit.InputError, match="neither a folder"):
        pp.build({"data": str(tmp_path / "nowhere"), **SMALL})


def test_too_small_a_simulation_is_refused():
    with pytest.raises(biaskit.InputError, match="at least 10 sequences"):
        pp.build({**SMALL, "events": 350})


# --- the model as biaskit sees it, and a run --------------------------------------------------


def test_biaskit_loss_at_each_window_end_is_the_model_loss_there():
    task = pp.build(SMALL)
    model = task.model.eval()
    x, y = task.splits["train"]
    drawn = sample_windows(x, y, 12, 5, torch.Generator().manual_seed(0))
    windows, last, burn = drawn.inputs, drawn.targets[:, -1], drawn.burn
    with torch.no_grad():
        _, h0 = model(burn)
        outputs, _ = model(torch.cat([burn, windows], dim=1))
    ds = biaskit.decompose(model.system(), windows, last, start=h0, psi=False)
    expected = model.loss(outputs[:, -1], last)
    np.testing.assert_allclose(ds["loss"].values, expected.numpy(), rtol=1e-5, atol=1e-6)
    system = model.system()
    reached = [*system.params().values(), *system.readout_params().values()]
    assert {id(p) for p in reached} == {id(p) for p in model.parameters()}


def test_a_short_training_run_logs_finite_nll_rmse_and_error_rate(tmp_path):
    train = {"batch_size": 8, "window": 20, "windows": 8, "K": 5, "K_max": 30, "epochs": 1}
    cfg = configs.full_config("point-process", dict(SMALL), {**pp.TRAIN, **train})
    (line,) = loop.Run(cfg, tmp_path, quiet=True).fit()
    for key in ("train_nll", "valid_nll", "valid_rmse", "valid_error_rate", "test_rmse", "rel_bias_exact"):
        assert math.isfinite(line[key]), key
    assert line["valid_nll"] == line["valid_loss"]
    assert 0 <= line["valid_error_rate"] <= 1


def tied_csv(path, tied=0.9, seed=0):
    """An event log at a coarse clock: most events share their predecessor's time."""
    rng = np.random.default_rng(seed)
    rows, gaps = ["sequence,time,mark"], []
    for s in range(60):
        t = 0.0
        for i in range(40):
            gap = 0.0 if rng.random() < tied else float(rng.integers(1, 5))
            t += gap
            gaps += [gap] if i else []
            rows.append(f"{s},{t},{rng.integers(0, 3)}")
    path.write_text("\n".join(rows) + "\n")
    return np.array(gaps).reshape(60, 39)


def test_the_data_are_described_with_their_sizes_time_scale_and_ties(tmp_path):
    gaps = tied_csv(tmp_path / "log.csv")[:48].ravel()  # the first 48 sequences train
    task = pp.build({"data": str(tmp_path / "log.csv"), "embedding": 4, "hidden": 8})
    lines = task.about.splitlines()
    assert "absolute times; 80/10/10 by sequence id" in lines[0]
    assert "train 48 sequences / 1,920 events, valid 6 sequences / 240 events" in lines[0] and "3 marks" in lines[0]
    assert lines[1] == (f"training gaps: median {np.median(gaps):.4g}, mean {gaps.mean():.4g} (the model's time unit), "
                        f"{(gaps == 0).mean():.1%} tied (0)")
    assert lines[2].startswith(f"warning: {(gaps == 0).mean():.1%} of the training gaps are 0")
    tied_csv(tmp_path / "fine.csv", tied=0.0)
    assert "warning" not in pp.build({"data": str(tmp_path / "fine.csv"), "hidden": 8}).about


def test_a_diverging_run_stops_with_the_figures_and_keeps_its_checkpoints(tmp_path):
    tied_csv(tmp_path / "log.csv")
    train = {"batch_size": 8, "window": 20, "windows": 8, "K": 5, "K_max": 30, "epochs": 4, "lr": 10.0, "clip": None}
    cfg = configs.full_config("point-process", {"data": str(tmp_path / "log.csv"), "embedding": 4, "hidden": 8},
                              {**pp.TRAIN, **train})
    run = loop.Run(cfg, tmp_path / "run", quiet=True)
    with pytest.raises(biaskit.InputError, match=r"training diverged: .* for 2 epochs .* try --clip 1\.0, or a smaller "
                                                 r"--lr than 10; .*checkpoint-best\.pt holds"):
        run.fit()
    first = run.start_loss
    assert math.isfinite(first) and len(run.lines) == 1  # the second diverging epoch is not logged
    assert run.lines[0]["valid_loss"] > first + loop.DIVERGED_FACTOR * max(abs(first), 1)
    assert (tmp_path / "run" / "checkpoint-last.pt").is_file()
    cfg["train"].update(lr=pp.TRAIN["lr"], clip=pp.TRAIN["clip"])  # the task's defaults train on it
    lines = loop.Run(cfg, tmp_path / "clipped", quiet=True).fit()
    assert len(lines) == 4 and all(line["valid_loss"] < 1 for line in lines)
