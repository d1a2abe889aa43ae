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

from . import checkpoint, report
from .audit import audit
from .errors import InputError
from .streams import sample_spans, sample_windows
from .synthetic import synthetic_bias


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="biaskit")
def cli():
    """Measure and control the gradient bias of truncated BPTT."""


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


def _deltas(ctx, param, value):
    try:
        deltas = [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of numbers: {value}") from None
    if not all(0 < d < 1 for d in deltas):
        raise click.BadParameter(f"each delta must be in (0, 1), got {value}")
    return deltas


@cli.command()
@click.argument("checkpoint_path", metavar="CHECKPOINT", type=click.Path(path_type=Path))
@click.option("--factory", help="package.module:function building the model (plain state dicts; overrides).")
@click.option("--data", help="package.module:function returning (inputs, targets) streams.")
@click.option("--windows", type=click.IntRange(2), default=64, show_default=True, help="Windows to decompose.")
@click.option("--window-length", type=click.IntRange(2), default=200, show_default=True)
@click.option("--deltas", default="0.9,0.5,0.1", show_default=True, callback=_deltas,
              help="Tolerated relative biases.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for drawing the windows.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("audit"), show_default=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def analyze(checkpoint_path, factory, data, windows, window_length, deltas, seed, device, out, fmt):
    """Audit a trained model: the exact bias for every K, and its estimates."""
    interactive = fmt == "text" and sys.stderr.isatty()  # progress for people, not for pipes
    say = (lambda msg: click.echo(msg, err=True)) if interactive else (lambda msg: None)
    dev = _device(device)
    say(f"loading {checkpoint_path}")
    model, (inputs, targets), K = checkpoint.rebuild(checkpoint_path, factory, data, dev)
    system = model.system()
    gen = torch.Generator().manual_seed(seed)
    windows_, last, burn = (t.to(dev) for t in sample_windows(inputs, targets, window_length, windows, gen))
    model.eval()
    with torch.no_grad():
        _, h0 = model(burn)
    say(f"decomposing {windows} windows of {window_length} steps and fitting every norm")
    result = audit(system, windows_, last, h0=h0, deltas=deltas, K=K, seed=seed)
    dni = checkpoint.rebuild_dni(checkpoint_path, dev)
    if dni is not None:
        say(f"measuring the bias of the run's synthetic gradients at K = {K}")
        burn, spans, span_targets = (t.to(dev) for t in sample_spans(
            inputs, targets, window_length, window_length, windows, torch.Generator().manual_seed(seed)))
        result.synthetic = synthetic_bias(system, spans, span_targets, K, dni, burn=burn, lookahead=window_length)
    say(f"writing {out}")
    result.save(_writable_dir(out))
    click.echo(result.summary() if fmt == "text" else json.dumps(result.as_dict(), indent=1))


@cli.command()
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("figures"), show_default=True)
def plot(run_dirs, out):
    """Training curves of runs side by side (test metric, K, relative bias)."""
    for run_dir in run_dirs:
        if not (run_dir / "metrics.jsonl").is_file():
            raise InputError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    fig = report.plot_training(run_dirs, [d.name for d in run_dirs])
    path = _writable_dir(out) / "training.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
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
    click.option("--schedule", help="constant, cosine, step:EPOCHS:GAMMA or restarts:EPOCHS."),
    click.option("--seed", type=int),
    click.option("--out", type=click.Path(path_type=Path), help="Run directory."),
    click.option("--resume", type=click.Path(path_type=Path), help="Continue the run in this directory."),
    click.option("--device", default="cpu", show_default=True),
    click.option("--quiet", is_flag=True, help="No progress bar or epoch lines."),
]


DNI_OPTIONS = [
    click.option("--estimator", type=click.Choice(["tbptt", "dni"]),
                 help="tbptt (default), or dni: synthetic gradients at the ends of BPTT(K, K) chunks."),
    click.option("--dni", "dni", type=click.Choice(["neuron", "layer"]),
                 help="The DNI's shape: one shared cell per neuron (default), or one MLP for the whole state."),
    click.option("--dni-hidden", type=click.IntRange(1), help="The DNI's hidden size (default 8, or D for layer)."),
    click.option("--dni-lr", type=click.FloatRange(0, min_open=True), help="The DNI's Adam step (default 1e-3)."),
    click.option("--dni-discount", type=click.FloatRange(0, 1),
                 help="Weight of the DNI's own later prediction in its target (default 1; below 1 steadies it)."),
    click.option("--alternate", is_flag=True, default=None,
                 help="Real gradients, then synthetic, in turn after each warm restart."),
    click.option("--restart-base", type=click.FloatRange(0, min_open=True),
                 help="Warm restarts every 2^i * E epochs, cosine within (default E = 1 with --alternate)."),
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
    restart_base = opts.pop("restart_base", None)
    if restart_base is not None or opts.get("alternate"):
        if opts.get("schedule") is not None:
            raise InputError("--restart-base and --alternate set the schedule: leave out --schedule")
        opts["schedule"] = f"restarts:{restart_base or 1}"
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
@_with(TRAIN_OPTIONS + DNI_OPTIONS)
def train_copy(m, variable, m_min, m_max, train_tokens, valid_tokens, test_tokens, hidden, **opts):
    """Copy task (paper section 5.1): remember m symbols, then recall them."""
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
@_with(TRAIN_OPTIONS + DNI_OPTIONS)
def train_language(data_dir, embedding, hidden, dropout, tie_weights, **opts):
    """Word-level language modelling (paper section 5.2)."""
    task = {k: v for k, v in dict(data_dir=None if data_dir is None else str(Path(data_dir).resolve()),
                                  embedding=embedding, hidden=hidden, dropout=dropout,
                                  tie_weights=tie_weights).items() if v is not None}
    _train("language", task, opts)


@train.command("point-process")
@click.option("--data", type=click.Path(path_type=Path),
              help="Folder of train/dev/test.pkl (neural-Hawkes, EasyTPP) or a sequence,time,mark CSV "
                   "(default: a simulated two-mark Hawkes process).")
@click.option("--events", type=click.IntRange(20), help="Simulated events in all (default 50,000).")
@click.option("--hidden", type=click.IntRange(1), help="LSTM hidden size (default 128).")
@_with(TRAIN_OPTIONS)
def train_point_process(data, events, hidden, **opts):
    """Marked temporal point process with RMTPP (paper section 5.3)."""
    task = {k: v for k, v in dict(data=None if data is None else str(Path(data).resolve()),
                                  events=events, hidden=hidden).items() if v is not None}
    _train("point_process", task, opts)


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
