"""biaskit analyze, biaskit plot and biaskit.audit: numbers against independent computations,
files written, and every bad input as one line with exit status 2 and nothing written."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import flat_norm, naive_every, naive_gradient
from torch import nn

import biaskit
from biaskit import checkpoint, report
from biaskit.audit import audit
from biaskit.probe import sample_windows
from trainers import config as configs
from trainers import loop

WINDOW, WINDOWS = 12, 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = configs.full_config("copy", {"train_tokens": 3000, "valid_tokens": 600, "test_tokens": 600, "hidden": 6},
                              {"epochs": 1, "batch_size": 8, "K": 4, "window": 20, "windows": 8})
    loop.Run(cfg, out, quiet=True).fit()
    return out


def exact_rel_bias(model, windows, last, burn, K):
    """Naive detach-based relative bias of TBPTT(K) from the burn-in state, module by module."""
    with torch.no_grad():
        _, h0 = model(burn)
    args = (model.lstm, model.head, nn.CrossEntropyLoss(reduction="none"), windows, last)
    full = naive_gradient(*args, encoder=model.embedding, h0=h0)
    trunc = naive_gradient(*args, K, encoder=model.embedding, h0=h0)
    return flat_norm([trunc[n] - full[n] for n in full]) / flat_norm(full.values())


def test_analyze_reports_the_exact_bias_at_the_checkpoints_K(run_cli, run_dir, tmp_path):
    res = run_cli("analyze", run_dir / "checkpoint-last.pt", "--windows", WINDOWS, "--window-length", WINDOW,
                  "--seed", 3, "--out", tmp_path / "audit", "--format", "json")
    assert res.code == 0, res.err
    summary = json.loads(res.out)
    rebuilt = checkpoint.rebuild(run_dir / "checkpoint-last.pt")
    model, (inputs, targets), K = rebuilt.model, rebuilt.streams, rebuilt.K
    assert summary["K"] == K == checkpoint.load(run_dir / "checkpoint-last.pt")["K"]
    drawn = sample_windows(inputs, targets, WINDOW, WINDOWS, torch.Generator().manual_seed(3))
    windows, last, burn = drawn.inputs, drawn.targets[:, -1], drawn.burn
    model.eval()
    assert summary["rel_bias_at_K"] == pytest.approx(exact_rel_bias(model, windows, last, burn, K), rel=1e-4)
    exact = [exact_rel_bias(model, windows, last, burn, k) for k in range(WINDOW)]
    for delta, kappa in summary["kappa_exact"].items():
        assert kappa == {"K": next(k for k, v in enumerate(exact) if v < float(delta)), "reached": True}
    for delta, rec in summary["recommended"]["per_delta"].items():  # the limit is above the batch's value
        if rec["reached"]:
            assert rec["rel_bias_upper"] < float(delta) and rec["rel_bias"] == pytest.approx(exact[rec["K"]], rel=1e-4)
        else:
            assert rec["K"] is None
    for name in ("audit.nc", "summary.txt", "summary.json", "decay.png", "bias.png", "state.png"):
        assert (tmp_path / "audit" / name).is_file()
    saved = report.load(tmp_path / "audit" / "audit.nc")
    refit = biaskit.fit_decay(saved, norm="psi")
    assert summary["norms"]["psi"]["beta"] == pytest.approx(refit.beta)


def test_analyze_with_losses_at_every_step(run_cli, run_dir, tmp_path):
    res = run_cli("analyze", run_dir / "checkpoint-last.pt", "--windows", WINDOWS, "--window-length", WINDOW,
                  "--seed", 3, "--loss-at", "every", "--out", tmp_path / "audit", "--format", "json")
    assert res.code == 0, res.err
    summary = json.loads(res.out)
    assert summary["loss_at"] == "every"
    rebuilt = checkpoint.rebuild(run_dir / "checkpoint-last.pt")
    model, (inputs, targets), K = rebuilt.model, rebuilt.streams, rebuilt.K
    drawn = sample_windows(inputs, targets, WINDOW, WINDOWS, torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        _, h0 = model(drawn.burn)
    args = (model.lstm, model.head, nn.CrossEntropyLoss(reduction="none"), drawn.inputs, drawn.targets)
    full = naive_every(*args, encoder=model.embedding, h0=h0)
    trunc = naive_every(*args, K, encoder=model.embedding, h0=h0)
    want = flat_norm([trunc[n] - full[n] for n in full]) / flat_norm(full.values())
    # float32: every-step tails are the full gradient less the kept bands, good to ~1e-6 of ||g||
    assert summary["rel_bias_at_K"] == pytest.approx(want, abs=3e-6)
    text = run_cli("analyze", run_dir / "checkpoint-last.pt", "--windows", WINDOWS, "--window-length", WINDOW,
                   "--loss-at", "every", "--out", tmp_path / "text")
    assert "losses at every step" in text.out


def test_analyze_prints_a_summary_table(run_cli, run_dir, tmp_path):
    res = run_cli("analyze", run_dir / "checkpoint-best.pt", "--windows", WINDOWS, "--window-length", WINDOW,
                  "--out", tmp_path)
    assert res.code == 0, res.err
    for text in ("recommended K", "Euclidean", "Mahalanobis", "exact psi", "kappa(0.5)",
                 "exact relative bias at the model's own K"):
        assert text in res.out


def test_analyze_plain_state_dict_with_factory_and_data(run_cli, tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "from trainers.tasks.token_model import TokenLSTM\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return TokenLSTM(5, 3, 4, 1)\n"
        "def windows():\n"
        "    g = torch.Generator().manual_seed(1)\n"
        "    x = torch.randint(0, 5, (200,), generator=g)\n"
        "    return x[:-1], x[1:]\n"
        "def linear():\n"
        "    class NotRecurrent(torch.nn.Module):\n"
        "        def __init__(self):\n"
        "            super().__init__()\n"
        "            self.lin = torch.nn.Linear(3, 3)\n"
        "        def system(self):\n"
        "            import biaskit\n"
        "            return biaskit.wrap(self.lin)\n"
        "    return NotRecurrent()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mymodels

    torch.save(mymodels.build().state_dict(), tmp_path / "weights.pt")
    res = run_cli("analyze", tmp_path / "weights.pt", "--factory", "mymodels:build", "--data", "mymodels:windows",
                  "--windows", 4, "--window-length", 10, "--out", tmp_path / "a", "--format", "json")
    assert res.code == 0, res.err
    assert "K" not in json.loads(res.out)  # a plain state dict has no training K

    torch.save(mymodels.linear().state_dict(), tmp_path / "linear.pt")
    res = run_cli("analyze", tmp_path / "linear.pt", "--factory", "mymodels:linear", "--data", "mymodels:windows",
                  "--window-length", 10, "--out", tmp_path / "b")
    assert res.code == 2 and "not a recurrent module" in res.err and not (tmp_path / "b").exists()
    res = run_cli("analyze", tmp_path / "weights.pt", "--factory", "mymodels:build", "--out", tmp_path / "c")
    assert res.code == 2 and "pass --data" in res.err and not (tmp_path / "c").exists()


def test_a_factory_module_in_the_current_folder_imports(run_cli, tmp_path, monkeypatch):
    """As with python -m: --factory names a module beside the user, not only an installed one."""
    (tmp_path / "beside.py").write_text(
        "import torch\n"
        "from trainers.tasks.token_model import TokenLSTM\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return TokenLSTM(5, 3, 4, 1)\n"
        "def data():\n"
        "    x = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(1))\n"
        "    return x[:-1], x[1:]\n")
    monkeypatch.chdir(tmp_path)
    import sys
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    from trainers.tasks.token_model import TokenLSTM
    torch.save(TokenLSTM(5, 3, 4, 1).state_dict(), tmp_path / "w.pt")
    res = run_cli("analyze", "w.pt", "--factory", "beside:build", "--data", "beside:data", "--windows", 4,
                  "--window-length", 10, "--out", "a")
    assert res.code == 0, res.err
    assert (tmp_path / "a" / "audit.nc").is_file()


def _nan_checkpoint(run_dir, path):
    ckpt = checkpoint.load(run_dir / "checkpoint-last.pt")
    ckpt["model"] = {k: torch.full_like(v, float("nan")) for k, v in ckpt["model"].items()}
    fields = {k: v for k, v in ckpt.items() if k not in ("format", "version")}
    checkpoint.save(path, **fields)
    return path


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d, t: [t / "missing.pt"], "no checkpoint at"),
        (lambda d, t: [d / "metrics.jsonl"], "is not a torch checkpoint"),
        (lambda d, t: [_state_dict(t)], "not a biaskit checkpoint; for a plain state dict pass --factory"),
        (lambda d, t: [d / "checkpoint-last.pt", "--factory", "no_such_pkg.models:build"], "does not import"),
        (lambda d, t: [d / "checkpoint-last.pt", "--factory", "trainers.tasks.copy:nothing"], "has no 'nothing'"),
        (lambda d, t: [d / "checkpoint-last.pt", "--window-length", 5000], "distinct windows"),
        (lambda d, t: [d / "checkpoint-last.pt", "--windows", 10**10], "distinct windows"),
        (lambda d, t: [d / "checkpoint-last.pt", "--device", "meta"], "runs on cpu or cuda"),
        (lambda d, t: [d / "checkpoint-last.pt", "--out", t / "file"], "is a file"),
        (lambda d, t: [d / "checkpoint-last.pt", "--out", t / "foreign"], "already holds other files"),
        (lambda d, t: [_nan_checkpoint(d, t / "nan.pt"), "--window-length", WINDOW], "NaN or infinite"),
        (lambda d, t: [d / "checkpoint-last.pt", "--deltas", "0.5,2"], "each delta must be in (0, 1)"),
        (lambda d, t: [t / "foreign"], "is a folder without checkpoint-best.pt: name a checkpoint file"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(run_cli, run_dir, tmp_path, make_args, message):
    (tmp_path / "file").write_text("")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    args = make_args(run_dir, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run_cli("analyze", "--out", tmp_path / "out", *args)
    assert res.code == 2, res.err
    assert len(res.err.strip().splitlines()) == 1 and message in res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_analyze_writes_beside_the_checkpoint_and_keeps_an_audit_of_another(run_cli, run_dir, tmp_path):
    """A run folder means its best checkpoint, said in one line; the audit goes beside it, named after
    it, and the path is printed; a rerun replaces it, an audit of another checkpoint is refused."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint-best.pt", "checkpoint-last.pt"):
        (run / name).write_bytes((run_dir / name).read_bytes())
    small = ["--windows", 4, "--window-length", 8]
    res = run_cli("analyze", run, *small)
    assert res.code == 0, res.err
    audit_dir = run / "checkpoint-best.audit"
    assert res.err.strip() == f"auditing {run / 'checkpoint-best.pt'}, the run's best checkpoint"
    assert res.out.rstrip().endswith(f"audit written to {audit_dir}")
    recorded = json.loads((audit_dir / "summary.json").read_text())["checkpoint"]
    assert recorded == str(run.resolve() / "checkpoint-best.pt")
    assert run_cli("analyze", run / "checkpoint-best.pt", *small, "--seed", 1).code == 0  # the same one: replaced
    kept = {p.name: p.read_bytes() for p in audit_dir.iterdir()}
    res = run_cli("analyze", run / "checkpoint-last.pt", *small, "--out", audit_dir, "--format", "json")
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1 and res.out == ""
    assert f"holds an audit of {run.resolve() / 'checkpoint-best.pt'}, not of" in res.err
    assert {p.name: p.read_bytes() for p in audit_dir.iterdir()} == kept
    res = run_cli("analyze", run / "checkpoint-last.pt", *small, "--format", "json")
    assert res.code == 0 and json.loads(res.out)["checkpoint"].endswith("checkpoint-last.pt")
    assert res.err.strip() == f"audit written to {run / 'checkpoint-last.audit'}"  # stdout stays JSON


def _state_dict(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    return tmp_path / "plain.pt"


def test_plot_draws_training_curves_and_refuses_non_runs(run_cli, run_dir, tmp_path):
    res = run_cli("plot", run_dir, "--out", tmp_path / "figs")
    assert res.code == 0, res.err
    assert (tmp_path / "figs" / "training.png").stat().st_size > 1000
    res = run_cli("plot", tmp_path, "--out", tmp_path / "figs2")
    assert res.code == 2 and "not a run directory" in res.err and not (tmp_path / "figs2").exists()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "trunc')
    res = run_cli("plot", damaged, "--out", tmp_path / "figs3")
    assert res.code == 2 and "line 2, is not JSON" in res.err and len(res.err.strip().splitlines()) == 1


def test_audit_api_matches_decompose_and_round_trips(tmp_path):
    torch.manual_seed(0)
    lstm, head = nn.LSTM(3, 5, 2, batch_first=True), nn.Linear(5, 2)
    x, y = torch.randn(8, 15, 3), torch.randint(0, 2, (8,))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    result = audit(lstm, x, y, readout=head, loss_fn=loss_fn, deltas=[0.5, 0.1], K=4)
    ds = biaskit.decompose(biaskit.wrap(lstm, head, loss_fn), x, y)
    torch.testing.assert_close(torch.tensor(result.dataset["rel_bias"].values), torch.tensor(ds["rel_bias"].values))
    assert result.as_dict()["rel_bias_at_K"] == pytest.approx(ds["rel_bias"].sel(K=4).item())
    assert result.as_dict()["norms"]["phi"]["beta"] == pytest.approx(biaskit.fit_decay(ds).beta)
    assert set(result.dataset["norm"].values) == {"phi", "phi_mahalanobis", "psi"}
    assert "beta [95% interval]" in result.summary()
    result.save(tmp_path)
    back = report.load(tmp_path / "audit.nc")
    reported = result.as_dict()["norms"]["phi"]["kappa"]["0.5"]
    assert float(back["kappa"].sel(norm="phi", delta=0.5)) == (reported["K"] if reported["reached"] else 14)


def test_summary_says_when_the_norm_vanishes():
    """A nilpotent shift W (W^4 = 0): φ is exactly 0 past lag 3, so β is exactly 0, said in words."""
    from helpers import LinearCell

    W = torch.diag(torch.ones(3, dtype=torch.float64), -1)  # 4x4 shift, W^4 = 0
    cell = LinearCell(W, torch.randn(4, 2, dtype=torch.float64))
    x, y = torch.randn(8, 12, 2, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    result = audit(cell, x, y, readout=nn.Linear(4, 1).double(), loss_fn=lambda o, t: (o.squeeze(-1) - t) ** 2)
    assert (result.dataset["phi"].sel(lag=slice(4, None)) == 0).all()
    assert result.as_dict()["norms"]["phi"]["method"] == "vanished"
    assert "0: exactly 0 past tau" in result.summary()


def test_not_reached_is_said_in_words_and_null_in_json():
    """Random labels on an untrained LSTM: the windows' mean gradient is mostly noise, so no K is
    certified, and the summary says so rather than printing K_max as if it were an answer."""
    torch.manual_seed(0)
    lstm, head = nn.LSTM(3, 5, 1, batch_first=True), nn.Linear(5, 2)
    x, y = torch.randn(16, 15, 3), torch.randint(0, 2, (16,))
    result = audit(lstm, x, y, readout=head, loss_fn=nn.CrossEntropyLoss(reduction="none"), deltas=[0.5, 1e-9])
    d = result.as_dict()
    assert not d["recommended"]["gradient_resolved"]
    assert all(r["K"] is None and not r["reached"] for r in d["recommended"]["per_delta"].values())
    text = result.summary()
    assert text.count("not reached") >= 2 and "mostly noise" in text
    paper = d["norms"]["phi"]["kappa"]["1e-09"]
    assert paper == {"K": None, "reached": False}  # a bound that never gets below 1e-9 in 15 lags
    assert json.loads(json.dumps(d)) == d


def test_analyze_asks_what_the_runs_controller_asked(run_cli, run_dir, tmp_path):
    """With no --windows, --window-length, --groups or --level, the audit uses the checkpoint's
    controller settings (here 8 windows of 20 steps, 8 groups, level 0.9); given ones win, and --K
    names the truncation reported."""
    res = run_cli("analyze", run_dir / "checkpoint-last.pt", "--out", tmp_path / "a", "--format", "json")
    assert res.code == 0, res.err
    summary = json.loads(res.out)
    assert (summary["windows"], summary["window_length"]) == (8, 20)
    assert (summary["recommended"]["groups"], summary["recommended"]["level"]) == (8, 0.9)
    res = run_cli("analyze", run_dir / "checkpoint-last.pt", "--out", tmp_path / "b", "--format", "json",
                  "--windows", 6, "--window-length", 12, "--groups", 3, "--level", 0.8, "--K", 2)
    assert res.code == 0, res.err
    summary = json.loads(res.out)
    assert (summary["windows"], summary["window_length"], summary["K"]) == (6, 12, 2)
    assert (summary["recommended"]["groups"], summary["recommended"]["level"]) == (3, 0.8)
    res = run_cli("analyze", run_dir / "checkpoint-last.pt", "--out", tmp_path / "c", "--K", 20)
    assert res.code == 2 and "past the window of 20 steps" in res.err and not (tmp_path / "c").exists()


def test_a_delta_not_reached_says_why_in_text_and_json(run_cli, run_dir, tmp_path):
    res = run_cli("analyze", run_dir / "checkpoint-last.pt", "--out", tmp_path / "a", "--format", "json",
                  "--deltas", "0.0001")
    assert res.code == 0, res.err
    rec = json.loads(res.out)["recommended"]["per_delta"]["0.0001"]
    assert not rec["reached"] and rec["not_reached"]["cause"] in ("unresolved", "beyond window", "above delta")
    text = (tmp_path / "a" / "summary.txt").read_text()
    assert rec["not_reached"]["why"] in text and rec["not_reached"]["advice"] in text
