"""The ``biaskit`` command line.

Every error a user can fix ends as one line on stderr and exit status 2.
"""
from __future__ import annotations

import importlib
import json
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


def _json_dict(ctx, param, value):
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise click.BadParameter(f"not JSON: {value}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter('must be a JSON object, e.g. \'{"momentum": 0.9}\'')
    return parsed


TRAIN_OPTIONS = [
    click.option("--epochs", type=click.IntRange(1), help="Epochs to train (may grow on --resume)."),
    click.option("--delta", type=float, help="Tolerated relative bias: adaptive TBPTT (Algorithm 1)."),
    click.option("--K", "K", type=click.IntRange(1), help="Fixed truncation, BPTT(2K, K); K0 when adaptive."),
    click.option("--K1", "K1", type=click.IntRange(1), help="Explicit BPTT(K1, K2): steps back-propagated."),
    click.option("--K2", "K2", type=click.IntRange(1), help="Explicit BPTT(K1, K2): losses per update."),
    click.option("--K-min", "K_min", type=click.IntRange(1)),
    click.option("--K-max", "K_max", type=click.IntRange(1)),
    click.option("--window", type=click.IntRange(2), help="Controller window length W."),
    click.option("--windows", type=click.IntRange(2), help="Windows per controller update."),
    click.option("--update-every", type=float, help="Epochs between K updates (fractions allowed)."),
    click.option("--norm", type=click.Choice(["phi", "phi_mahalanobis"]), help="Norm whose decay sets K."),
    click.option("--batch-size", type=click.IntRange(1), help="Parallel streams S."),
    click.option("--lr", type=float, help="Base step size (times sqrt(K) unless --no-scale-lr)."),
    click.option("--scale-lr/--no-scale-lr", default=None, help="Scale the step size by sqrt(K)."),
    click.option("--optimizer", help="A torch.optim name (default SGD, as in the paper)."),
    click.option("--optimizer-options", callback=_json_dict, help='JSON, e.g. \'{"momentum": 0.9}\'.'),
    click.option("--clip", type=float, help="Clip the gradient norm to this."),
    click.option("--schedule", help="constant, cosine or step:EPOCHS:GAMMA."),
    click.option("--seed", type=int),
    click.option("--out", type=click.Path(path_type=Path), help="Run directory."),
    click.option("--resume", type=click.Path(path_type=Path), help="Continue the run in this directory."),
    click.option("--device", default="cpu", show_default=True),
    click.option("--quiet", is_flag=True, help="No progress bar or epoch lines."),
]


def _with(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


@cli.group()
def train():
    """Train an RNN with fixed or adaptive truncated BPTT."""


def _train(task_module: str, task_config: dict, opts: dict):
    """Shared by every task: merge defaults, set up the run directory, train."""
    from trainers import loop  # the trainers build on biaskit, not the reverse

    tasks = importlib.import_module(f"trainers.tasks.{task_module}")
    device, quiet, out, resume = opts.pop("device"), opts.pop("quiet"), opts.pop("out"), opts.pop("resume")
    if resume is not None and out is not None and Path(out) != Path(resume):
        raise InputError("--resume names the run directory; leave out --out or make them equal")
    if resume is None and out is None:
        raise InputError("say where the run goes: --out DIR (or --resume DIR to continue one)")
    given = {k: v for k, v in opts.items() if v is not None}
    if "seed" in given:
        task_config["seed"] = given["seed"]
    config = loop.full_config(f"trainers.tasks.{task_module}:build", task_config, {**tasks.TRAIN, **given})
    run = loop.Run(config, resume or out, device=_device(device), quiet=quiet, resume=resume is not None)
    metrics = run.fit()
    best = min(metrics, key=lambda m: m["valid_loss"])
    metric = run.task.metric.lower()
    click.echo(f"best valid {metric} {best[f'valid_{metric}']:.4f} (epoch {best['epoch']}), "
               f"test {metric} {best[f'test_{metric}']:.4f}; run in {resume or out}")


@train.command("copy")
@click.option("--m", "m", type=click.IntRange(1), help="Fixed sequence length m (default 10).")
@click.option("--variable", is_flag=True, default=None, help="Draw m uniformly from [m-min, m-max].")
@click.option("--m-min", "m_min", type=click.IntRange(1))
@click.option("--m-max", "m_max", type=click.IntRange(1))
@click.option("--train-tokens", type=click.IntRange(1))
@click.option("--valid-tokens", type=click.IntRange(1))
@click.option("--test-tokens", type=click.IntRange(1))
@click.option("--hidden", type=click.IntRange(1), help="LSTM hidden size (default 50).")
@_with(TRAIN_OPTIONS)
def train_copy(m, variable, m_min, m_max, train_tokens, valid_tokens, test_tokens, hidden, **opts):
    """The copy task (paper Sec. 5.1): remember m symbols, then recall them."""
    task = {k: v for k, v in dict(m=m, variable=variable, m_min=m_min, m_max=m_max, train_tokens=train_tokens,
                                  valid_tokens=valid_tokens, test_tokens=test_tokens, hidden=hidden).items()
            if v is not None}
    _train("copy", task, opts)


@train.command("language")
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="PTB, WikiText-2 or train/valid/test.txt folder (default: the embedded corpus).")
@click.option("--embedding", type=click.IntRange(1), help="Embedding size (default 200; paper 900 PTB, 512 WT2).")
@click.option("--hidden", type=click.IntRange(1), help="LSTM hidden size (default 200).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True))
@click.option("--tie-weights", is_flag=True, default=None, help="Share the embedding and output weights.")
@_with(TRAIN_OPTIONS)
def train_language(data_dir, embedding, hidden, dropout, tie_weights, **opts):
    """Word-level language modelling (paper Sec. 5.2)."""
    task = {k: v for k, v in dict(data_dir=None if data_dir is None else str(Path(data_dir).resolve()),
                                  embedding=embedding, hidden=hidden, dropout=dropout,
                                  tie_weights=tie_weights).items() if v is not None}
    _train("language", task, opts)


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
