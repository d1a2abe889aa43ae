"""The command line: printed numbers against independent computations, and clean errors."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from biaskit import report
from biaskit.cli import _demo_data, main
from helpers import flat_norm, naive_gradient


@pytest.fixture
def run(capsys):
    """Run the command line in-process; return its exit code, stdout and stderr."""

    def invoke(*args):
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return invoke


def test_demo_prints_the_exact_bias_of_naive_truncation(run, tmp_path):
    res = run("demo", "--windows", "6", "--window-length", "24", "--hidden", "6", "--recall", "3",
              "--seed", "3", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    printed = {int(r[0]): float(r[1]) for r in rows}
    assert sorted(printed) == [0, 1, 2, 5, 10, 20]

    torch.manual_seed(3)  # the demo's model, rebuilt the same way
    lstm = nn.LSTM(8, 6, num_layers=2, batch_first=True)
    head = nn.Linear(6, 8)
    x, y = _demo_data(6, 24, 8, 3, 3, "cpu")
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    full = naive_gradient(lstm, head, loss_fn, x, y)
    for K, value in printed.items():
        trunc = naive_gradient(lstm, head, loss_fn, x, y, K)
        exact = flat_norm([trunc[n] - full[n] for n in full]) / flat_norm(full.values())
        assert value == pytest.approx(exact, rel=1e-3, abs=1e-9)  # 4 significant digits printed
    saved = report.load(tmp_path / "decomposition.nc")
    assert saved["rel_bias"].sel(K=5).item() == pytest.approx(printed[5], rel=1e-3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--windows", "x"], "not a valid integer"),
        (["demo", "--window-length", "5", "--recall", "10"], "must exceed --recall"),
        (["demo", "--device", "tpu"], "unknown device"),
        (["nonsense"], "No such command"),
    ],
)
def test_errors_are_one_line_and_exit_2(run, args, message, tmp_path):
    res = run(*args, "--out", str(tmp_path)) if args[0] == "demo" else run(*args)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr
    assert "Traceback" not in res.stderr


def test_unwritable_out_is_refused(run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = run("demo", "--out", str(blocker / "sub"))
    assert res.returncode == 2 and "choose another --out" in res.stderr
