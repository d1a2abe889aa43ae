"""The ``biaskit`` command line: the group and ``analyze``.

The trainers add ``train`` and ``plot`` to this group (``trainers.cli``, which
the ``biaskit`` console script runs); biaskit itself never imports them.
Every error a user can fix ends as one line on stderr and exit status 2.
"""
from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import click
import torch

from . import atomic, checkpoint
from .audit import FILES, audit
from .bands import LOSS_AT
from .decompose import check_memory
from .errors import InputError
from .probe import probing, sample_windows


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="biaskit")
def cli():
    """Measure and control the gradient bias of truncated BPTT."""


def device(name: str) -> torch.device:
    """The torch device named on the command line, checked: cpu, cuda or cuda:N, present here."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: biaskit runs on cpu or cuda (cuda:N)")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise InputError(f"--device {name}: there is one cpu device (cpu or cpu:0)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name} was asked for but no CUDA device is available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


class Seed(click.IntRange):
    """A seed torch takes: a whole number in [0, 2^63), its range shown short in help and errors."""

    def __init__(self):
        super().__init__(0, 2**63 - 1)

    def _describe_range(self) -> str:
        return "0<=x<2^63"


SEED = Seed()
#: The best checkpoint of a trainer's run folder, which ``analyze RUN_DIR`` audits.
RUN_BEST = "checkpoint-best.pt"
#: What ``analyze`` asks when neither the command line nor the checkpoint's controller says.
FALLBACK = {"windows": 64, "window_length": 200, "groups": 8, "level": 0.95, "loss_at": "last"}


def deltas_option(ctx, param, value):
    """click callback: a comma-separated list of tolerances in (0, 1)."""
    try:
        deltas = [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of numbers: {value}") from None
    if not all(0 < d < 1 for d in deltas):
        raise click.BadParameter(f"each delta must be in (0, 1), got {value}")
    return deltas


def audit_folder(checkpoint_path: Path) -> Path:
    """Where the audit of a checkpoint goes by default: beside it, named after it
    (``runs/x/checkpoint-best.pt`` → ``runs/x/checkpoint-best.audit``)."""
    return checkpoint_path.with_name(f"{checkpoint_path.stem}.audit")


def check_replaces(out: Path, source: Path):
    """Refuse to replace an earlier audit in ``out`` unless it audited ``source``, as its summary.json
    records: an audit of another checkpoint, or of one it does not name, is kept."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        audited = json.loads((out / "summary.json").read_text(encoding="utf-8")).get("checkpoint")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        audited = None
    if audited != str(source):
        of = f"of {audited}" if audited else "that does not name its checkpoint"
        raise InputError(f"--out {out} holds an audit {of}, not of {source}: choose another --out, or delete it")


@cli.command()
@click.argument("checkpoint_path", metavar="CHECKPOINT", type=click.Path(path_type=Path))
@click.option("--factory", help="package.module:function building the model: code you trust (plain state "
                                "dicts need it; for a biaskit checkpoint it replaces the registered task). "
                                "[default: the checkpoint's registered task]")
@click.option("--data", help="package.module:function returning (inputs, targets) streams: code you trust. "
                             "[default: the task's training split]")
@click.option("--windows", type=click.IntRange(2),
              help=f"Windows to decompose [default: the run's controller's, else {FALLBACK['windows']}].")
@click.option("--window-length", type=click.IntRange(2),
              help=f"Steps per window [default: the run's controller's, else {FALLBACK['window_length']}].")
@click.option("--groups", type=click.IntRange(3),
              help=f"Window groups of the confidence limit [default: the run's, else {FALLBACK['groups']}].")
@click.option("--level", type=click.FloatRange(0.5, 1, max_open=True),
              help=f"Confidence of the recommended K [default: the run's, else {FALLBACK['level']}].")
@click.option("--loss-at", type=click.Choice(list(LOSS_AT)),
              help="Where the windows' losses are: the last step (the paper's BPTT(R, 1)) or every step (the "
                   "gradient a trainer computes; about R/4 times the cost) [default: the run's, else last].")
@click.option("--K", "K", type=click.IntRange(0),
              help="The truncation whose exact bias is reported [default: the checkpoint's K].")
@click.option("--deltas", default="0.9,0.5,0.1", show_default=True, callback=deltas_option,
              help="Tolerated relative biases.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for drawing the windows.")
@click.option("--device", "device_name", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--out", type=click.Path(path_type=Path),
              help="The audit's folder: new, empty, or an earlier audit of the same checkpoint. "
                   "[default: beside the checkpoint, named after it: CHECKPOINT.audit]")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="What is printed: the summary as text, or its numbers as JSON.")
def analyze(checkpoint_path, factory, data, windows, window_length, groups, level, loss_at, K, deltas, seed,
            device_name, out, fmt):
    """Audit a trained model: the exact bias for every K, and its estimates.

    CHECKPOINT is a checkpoint file, or a run folder, whose best checkpoint
    (checkpoint-best.pt) is audited. By default it asks what the run's own K
    updates asked: the windows, window length, groups and confidence of the
    checkpoint's controller. The checkpoint is data: it names its task by a
    registered name and no code it names is run. Code you name with --factory
    or --data is trusted.
    """
    interactive = fmt == "text" and sys.stderr.isatty()  # progress for people, not for pipes
    say = (lambda msg: click.echo(msg, err=True)) if interactive else (lambda msg: None)
    dev = device(device_name)
    if checkpoint_path.is_dir():
        if not (checkpoint_path / RUN_BEST).is_file():
            raise InputError(f"{checkpoint_path} is a folder without {RUN_BEST}: name a checkpoint file")
        checkpoint_path = checkpoint_path / RUN_BEST
        click.echo(f"auditing {checkpoint_path}, the run's best checkpoint", err=True)
    source = checkpoint_path.resolve()
    out = audit_folder(checkpoint_path) if out is None else out
    atomic.check_folder(out, FILES)
    check_replaces(out, source)
    say(f"loading {checkpoint_path}")
    rebuilt = checkpoint.rebuild(checkpoint_path, factory, data, dev)
    inputs, targets = rebuilt.streams
    given = {"windows": windows, "window_length": window_length, "groups": groups, "level": level,
             "loss_at": loss_at}
    settings = {name: value if value is not None else rebuilt.controller.get(name, FALLBACK[name])
                for name, value in given.items()}
    windows, window_length = settings["windows"], settings["window_length"]
    if K is not None and K >= window_length:
        raise InputError(f"--K {K} is past the window of {window_length} steps: use a --window-length above {K}")
    K = rebuilt.K if K is None else K
    from_run = sorted(name for name, value in given.items() if value is None and name in rebuilt.controller)
    say(f"{windows} windows of {window_length} steps, {settings['groups']} groups, level {settings['level']:g}, "
        f"{'losses at every step' if settings['loss_at'] == 'every' else 'the loss at the last step'}"
        + (f" ({', '.join(from_run)} from the run's controller)" if from_run else ""))
    gen = torch.Generator().manual_seed(seed)
    every = settings["loss_at"] == "every"
    dni_windows = None  # the DNI's: with as many steps again after each window for the later losses
    if rebuilt.dni is not None:
        dni_windows = sample_windows(inputs, targets, window_length, windows, torch.Generator().manual_seed(seed),
                                     lookahead=window_length).to(dev)
    with probing(rebuilt.model, inputs, targets, length=window_length, count=windows, generator=gen,
                 every_step=every) as probe:
        check_memory(probe.system, windows, window_length, dev)
        say(f"decomposing {windows} windows of {window_length} steps and fitting every norm" + (
            "" if rebuilt.dni is None else f", then the bias of the run's synthetic gradients at K = {rebuilt.K}"))
        label = "lag bands" if every else "steps"
        with click.progressbar(length=window_length, label=label, file=sys.stderr) if interactive \
                else nullcontext() as bar:
            result = audit(probe.system, probe.inputs, probe.targets, start=probe.start, deltas=deltas, K=K,
                           seed=seed, groups=settings["groups"], alpha=1 - settings["level"],
                           loss_at=settings["loss_at"], dni=rebuilt.dni, dni_windows=dni_windows, dni_K=rebuilt.K,
                           progress=None if bar is None else lambda done, total: bar.update(done - bar.pos))
    say(f"writing {out}")
    result.dataset.attrs["checkpoint"] = str(source)
    result.save(out)
    click.echo(result.summary() if fmt == "text" else json.dumps(result.as_dict(), indent=1))
    click.echo(f"audit written to {out}", err=fmt == "json")  # stdout stays JSON


#: What click raises for a group given no command (click >= 8.2; before, it printed the help itself).
NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def main(argv=None):
    """Entry point: click's own errors and InputError become one line and exit 2; a bare ``biaskit``
    or ``biaskit train`` prints its help and exits 0."""
    try:
        cli.main(args=argv, prog_name="biaskit", standalone_mode=False)
    except NO_ARGS as err:  # a bare group: its help, as asked for
        click.echo(err.ctx.get_help())
    except (click.ClickException, InputError) as err:
        message = err.format_message() if isinstance(err, click.ClickException) else str(err)
        click.echo(f"biaskit: error: {' '.join(message.split())}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("biaskit: aborted", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
