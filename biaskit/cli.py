"""The ``biaskit`` command line.

Every error a user can fix ends as one line on stderr and exit status 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

from . import report
from .decompose import decompose
from .errors import InputError
from .recurrent import wrap

SHOWN_K = (0, 1, 2, 5, 10, 20, 50, 100, 200)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="biaskit")
def cli():
    """Measure and control the gradient bias of truncated BPTT."""


def _demo_data(windows, length, symbols, recall, seed, device):
    """Random symbol windows whose target is the symbol ``recall`` steps before the end."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, symbols, (windows, length), generator=gen)
    inputs = torch.nn.functional.one_hot(tokens, symbols).float()
    return inputs.to(device), tokens[:, -1 - recall].to(device)


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot write to {path}: {err.strerror}; choose another --out") from None
    return path


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available here")
    return device


@cli.command()
@click.option("--windows", default=32, show_default=True, help="Windows (samples) in the batch.")
@click.option("--window-length", default=100, show_default=True, help="Window length R.")
@click.option("--hidden", default=32, show_default=True, help="LSTM hidden size (2 layers).")
@click.option("--recall", default=10, show_default=True, help="The target is the symbol this many steps back.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-audit"), show_default=True)
def demo(windows, window_length, hidden, recall, seed, device, out):
    """Decompose the BPTT gradient of a small built-in LSTM on generated data."""
    if window_length <= recall:
        raise InputError(f"--window-length must exceed --recall ({recall}), got {window_length}")
    dev = _device(device)
    out = _writable_dir(out)
    torch.manual_seed(seed)
    symbols = 8
    lstm = torch.nn.LSTM(symbols, hidden, num_layers=2, batch_first=True).to(dev)
    head = torch.nn.Linear(hidden, symbols).to(dev)
    system = wrap(lstm, readout=head, loss_fn=torch.nn.CrossEntropyLoss(reduction="none"))
    inputs, targets = _demo_data(windows, window_length, symbols, recall, seed, dev)
    ds = decompose(system, inputs, targets, seed=seed)
    path = report.save(ds, out / "decomposition.nc")
    click.echo(f"2-layer LSTM (hidden {hidden}), {windows} windows of length {window_length}, "
               f"target {recall} steps back; ||E g|| = {ds.attrs['grad_norm']:.4g}")
    click.echo(f"{'K':>5} {'exact rel. bias':>16} {'mean phi_K':>12} {'mean psi_K':>12}")
    for K in (k for k in SHOWN_K if k < window_length):
        click.echo(f"{K:>5} {ds['rel_bias'].sel(K=K).item():>16.4g} "
                   f"{ds['phi'].sel(lag=K).mean().item():>12.4g} {ds['psi'].sel(lag=K).mean().item():>12.4g}")
    click.echo(f"wrote {path}")


def main(argv=None):
    """Entry point: click's own errors and InputError become one line and exit 2."""
    try:
        cli.main(args=argv, prog_name="biaskit", standalone_mode=False)
    except (click.ClickException, InputError) as err:
        message = err.format_message() if isinstance(err, click.ClickException) else str(err)
        click.echo(f"biaskit: error: {message}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("biaskit: aborted", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
