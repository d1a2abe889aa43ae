"""``biaskit train ...`` and ``biaskit plot``: the trainers' commands, added to biaskit's group.

The ``biaskit`` console script runs ``main`` here, so the user types one
command while the library stays free of the trainers (biaskit never imports
this package; an import-linter contract checks it).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from biaskit import atomic
from biaskit.bands import LOSS_AT
from biaskit.cli import SEED, cli, device
from biaskit.cli import main as biaskit_main
from biaskit.errors import InputError
from biaskit.norms import NORMS

from . import config as configs
from .adaptive import BETA_METHODS, CONTROLLERS
from .loop import Run, shown
from .runs import check_epochs_left, plot_training, read_metrics, stored_run
from .tasks import copy, language, point_process
from .tasks.token_model import CELLS

#: Each task's registered name (the ``biaskit.tasks`` entry point) and its module: its training
#: defaults (``TRAIN``, over ``config.TRAIN_DEFAULTS``) and its data and model defaults (``DEFAULTS``).
TASKS = {"copy": copy, "language": language, "point-process": point_process}
CONTROL_NORMS = [name for name in NORMS if name != "psi"]  # the controller decomposes without psi


class Number(click.ParamType):
    """A finite number in a range (bounds open or closed), refused at parse time otherwise."""

    name = "number"

    def __init__(self, low=None, high=None, low_open=False, high_open=False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        below = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        above = self.high is not None and (number >= self.high if self.high_open else number > self.high)
        if not math.isfinite(number) or below or above:
            low = "" if self.low is None else f"{'(' if self.low_open else '['}{self.low}"
            high = "" if self.high is None else f"{self.high}{')' if self.high_open else ']'}"
            span = f"in {low}, {high}" if low and high else (f"> {self.low}" if self.low_open else f">= {self.low}")
            self.fail(f"{value!r} is not a finite number {span}", param, ctx)
        return number


POSITIVE = Number(0, low_open=True)


def _finite(text: str) -> float:
    """A JSON number, refused when not finite (NaN, Infinity, or 1e400, which overflows)."""
    number = float(text)
    if not math.isfinite(number):
        raise click.BadParameter(f"{text} is not a finite number")
    return number


def _json_dict(ctx, param, value):
    if value is None:
        return None
    try:
        parsed = json.loads(value, parse_float=_finite, parse_constant=_finite)
    except json.JSONDecodeError:
        raise click.BadParameter(f"not JSON: {value}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter('must be a JSON object, e.g. \'{"momentum": 0.9}\'')
    return parsed


TRAIN_OPTIONS = [
    click.option("--epochs", type=click.IntRange(1), help="Epochs to train (may grow on --resume)."),
    click.option("--delta", type=Number(0, 1, True, True),
                 help="Tolerated relative bias: adaptive TBPTT. [default: none: K stays fixed]"),
    click.option("--K", "K", type=click.IntRange(1), help="Fixed truncation, BPTT(2K, K); K0 when adaptive."),
    click.option("--K1", "K1", type=click.IntRange(1),
                 help="Explicit BPTT(K1, K2): steps back-propagated. [default: 2K]"),
    click.option("--K2", "K2", type=click.IntRange(1), help="Explicit BPTT(K1, K2): losses per update. [default: K]"),
    click.option("--K-min", "K_min", type=click.IntRange(1), help="The shortest K the controller may set."),
    click.option("--K-max", "K_max", type=click.IntRange(1), help="The longest K the controller may set."),
    click.option("--window", type=click.IntRange(2), help="Controller window length W."),
    click.option("--windows", type=click.IntRange(2), help="Windows per controller update."),
    click.option("--windows-min", type=click.IntRange(2),
                 help="The exact controller's fewest windows per update, after it certified the K it set "
                      "with room to spare. [default: always --windows]"),
    click.option("--update-every", type=POSITIVE, help="Epochs between K updates (fractions allowed)."),
    click.option("--update-every-max", type=POSITIVE,
                 help="While K is settled the interval doubles, up to this many epochs."),
    click.option("--max-change", type=Number(1, low_open=True),
                 help="K moves by at most this factor per update, the step lr·√K by its root."),
    click.option("--max-shrink", type=Number(1, low_open=True),
                 help="K shortens by at most this factor per update (at most --max-change). "
                      "[default: --max-change]"),
    click.option("--raise-on-estimate/--hold-on-estimate", default=None,
                 help="Exact controller, mean gradient unresolved: grow K while the bias's point estimate at "
                      "the K in use is above delta (else hold it)."),
    click.option("--audit-every", type=click.IntRange(1),
                 help="The paper controller measures the exact bias every n-th update."),
    click.option("--loss-at", type=click.Choice(list(LOSS_AT)),
                 help="The controller's windows' losses: last (the paper's BPTT(R, 1)) or every step "
                      "(the gradient the trainer computes, about R/4 times the cost)."),
    click.option("--controller", type=click.Choice(list(CONTROLLERS)),
                 help="exact: K from the exact bias's upper limit; paper: Algorithm 1 as printed."),
    click.option("--level", type=Number(0.5, 1, high_open=True), help="The exact controller's confidence."),
    click.option("--groups", type=click.IntRange(3), help="Window groups for its confidence limit."),
    click.option("--norm", type=click.Choice(CONTROL_NORMS),
                 help="The paper controller's norm: "
                      + "; ".join(f"{n}: {NORMS[n].description}" for n in CONTROL_NORMS) + "."),
    click.option("--beta-method", type=click.Choice(list(BETA_METHODS)),
                 help="The paper controller's beta: regression (Eq. 22, OLS), max (Eq. 21) or quantile."),
    click.option("--batch-size", type=click.IntRange(1), help="Parallel streams S."),
    click.option("--lr", type=POSITIVE, help="Base step size (times sqrt(K) unless --no-scale-lr)."),
    click.option("--scale-lr/--no-scale-lr", default=None, help="Scale the step size by sqrt(K)."),
    click.option("--optimizer", help="A torch.optim name (the paper's is SGD)."),
    click.option("--optimizer-options", callback=_json_dict,
                 help='The optimizer\'s options as JSON, e.g. \'{"momentum": 0.9}\'.'),
    click.option("--clip", type=POSITIVE, help="Clip the gradient norm to this."),
    click.option("--clip-per-K/--clip-whole", "clip_per_K", default=None,
                 help="Clip at --clip divided by K2 (the authors' scripts) or at --clip itself."),
    click.option("--buffer", type=click.Choice(list(configs.BUFFERS)),
                 help="The truncation K sets: BPTT(2K, K) (the paper's) or BPTT(2K-1, K) (the authors' scripts)."),
    click.option("--setup", type=click.Choice(list(configs.SETUPS)),
                 help="Start from biaskit's task defaults, or from the authors' scripts' training loop "
                      "(paper controller, clip/K, BPTT(2K-1, K), weight decay, K set at once; see the README); "
                      "options given override either."),
    click.option("--schedule", help="constant, cosine, step:EPOCHS:GAMMA or restarts:EPOCHS."),
    click.option("--seed", type=SEED, help="Seed of the data, the initial weights and the windows."),
    click.option("--out", type=click.Path(path_type=Path),
                 help="Run directory, a new or empty folder. [default: the --resume folder; one is needed]"),
    click.option("--resume", type=click.Path(path_type=Path),
                 help="Continue the run in this folder with its own options: give only those to change "
                      "(--epochs; the others must equal the run's). [default: none: a new run]"),
    click.option("--device", "device_name", default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
    click.option("--quiet", is_flag=True, help="No progress bar or epoch lines. [default: off]"),
    click.option("--tensorboard", is_flag=True,
                 help="Also write the epoch lines, each K update's rule and the training figure for "
                      "TensorBoard (RUN_DIR/tensorboard). [default: off]"),
]

DNI_OPTIONS = [
    click.option("--estimator", type=click.Choice(["tbptt", "dni"]),
                 help="tbptt, or dni: synthetic gradients at the ends of BPTT(K, K) chunks (train them with "
                      "--optimizer Adam: under SGD at the copy task's step every DNI diverged or learned nothing)."),
    click.option("--dni", "dni", type=click.Choice(list(configs.DNI_SHAPES)),
                 help="The DNI's shape: one shared cell per neuron, one MLP for the whole state (layer), or one "
                      "linear map of it (linear)."),
    click.option("--dni-hidden", type=click.IntRange(1),
                 help="The DNI's hidden size. [default: 8 for neuron, the state size for layer]"),
    click.option("--dni-lr", type=POSITIVE, help="The DNI's Adam step."),
    click.option("--dni-discount", type=Number(0, 1),
                 help="Weight of the DNI's own later prediction in its target (below 1 steadies it)."),
    click.option("--alternate", is_flag=True, default=None,
                 help="Real gradients, then synthetic, in turn after each warm restart."),
    click.option("--restart-base", type=POSITIVE,
                 help="Warm restarts every 2^i * E epochs, cosine within. [default: none; 1 with --alternate]"),
]


def _with(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def _shown(value) -> str:
    """An option's value as the help and the messages show it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return json.dumps(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _defaults(task: str):
    """Add to each option's help the default a new ``task`` run takes (the config's, overridden by the
    task's training and data defaults); options whose default is no single value say it in their help."""
    defaults = {**configs.TRAIN_DEFAULTS, **TASKS[task].TRAIN, **TASKS[task].DEFAULTS}

    def decorate(command: click.Command) -> click.Command:
        for param in command.params:
            if isinstance(param, click.Option) and defaults.get(param.name) is not None \
                    and "[default" not in (param.help or ""):
                param.help = f"{param.help} [default: {_shown(defaults[param.name])}]"
        return command
    return decorate


@cli.group()
def train():
    """Train an RNN with fixed or adaptive truncated BPTT."""


def _train(task: str, task_config: dict, opts: dict):
    """Shared by every task: merge defaults (on --resume, take the run's own), check everything, set up
    the run directory, train."""
    dev = device(opts.pop("device_name"))
    quiet, out, resume, board = opts.pop("quiet"), opts.pop("out"), opts.pop("resume"), opts.pop("tensorboard")
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
    if resume is not None:
        stored, done = stored_run(resume)
        config = _resumed(resume, stored, task, task_config, given)
        check_epochs_left(resume, done, config["train"]["epochs"])
    else:
        if "seed" in given:
            task_config["seed"] = given["seed"]
        authors = configs.AUTHORS[task] if given.get("setup") == "authors" else {}
        config = configs.full_config(task, task_config, {**TASKS[task].TRAIN, **authors, **given})
    run = Run(config, resume or out, device=dev, quiet=quiet, resume=resume is not None, tensorboard=board)
    metrics = run.fit()
    if not run.ranks.main:
        return
    best = min(metrics, key=lambda m: m["valid_loss"] if m["valid_loss"] is not None else math.inf)
    metric = run.task.metric.lower()
    click.echo(f"best valid {metric} {shown(best[f'valid_{metric}'], '.4f')} (epoch {best['epoch']}), "
               f"test {metric} {shown(best[f'test_{metric}'], '.4f')}; run in {resume or out}")


def _resumed(run_dir: Path, stored: dict, task: str, task_given: dict, given: dict) -> dict:
    """The config to resume the run in ``run_dir`` with: its own (``stored``), with the --epochs given. Every other
    option given must equal the run's (its value, else the default it ran with), since the checkpoint's
    weights, optimizer and K history belong to those; all that differ are refused in one message."""
    if stored["task"] != task:
        raise InputError(f"{run_dir} is a {stored['task']} run: resume it with biaskit train {stored['task']} "
                         f"--resume {run_dir}")
    train = {**configs.TRAIN_DEFAULTS, **stored["train"]}
    data = {**TASKS[task].DEFAULTS, **stored["task_config"]}
    names = {param.name: param.opts[0] for param in click.get_current_context().command.params}
    differ = [f"{names[key]} {_shown(had.get(key))} then, {_shown(value)} now"
              for had, options in ((data, task_given), (train, given))
              for key, value in options.items() if key != "epochs" and had.get(key) != value]
    if differ:
        raise InputError(f"{run_dir} was trained with other options ({'; '.join(differ)}): only --epochs can "
                         "change on --resume; leave the others out to keep the run's own, or train into another --out")
    return configs.full_config(task, stored["task_config"], {**train, **given})


@_defaults("copy")
@train.command("copy")
@click.option("--m", "m", type=click.IntRange(1), help="Fixed sequence length m.")
@click.option("--variable", is_flag=True, default=None, help="Draw m uniformly from [m-min, m-max].")
@click.option("--m-min", "m_min", type=click.IntRange(1), help="The shortest m with --variable.")
@click.option("--m-max", "m_max", type=click.IntRange(1), help="The longest m with --variable.")
@click.option("--train-tokens", type=click.IntRange(1), help="Generated training positions.")
@click.option("--valid-tokens", type=click.IntRange(1), help="Generated validation positions.")
@click.option("--test-tokens", type=click.IntRange(1), help="Generated test positions.")
@click.option("--hidden", type=click.IntRange(1), help="LSTM hidden size.")
@_with(TRAIN_OPTIONS + DNI_OPTIONS)
def train_copy(m, variable, m_min, m_max, train_tokens, valid_tokens, test_tokens, hidden, **opts):
    """Copy task (paper section 5.1): remember m symbols, then recall them."""
    task = {k: v for k, v in dict(m=m, variable=variable, m_min=m_min, m_max=m_max, train_tokens=train_tokens,
                                  valid_tokens=valid_tokens, test_tokens=test_tokens, hidden=hidden).items()
            if v is not None}
    _train("copy", task, opts)


@_defaults("language")
@train.command("language")
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="PTB, WikiText-2 or train/valid/test.txt folder. [default: the embedded corpus]")
@click.option("--embedding", type=click.IntRange(1), help="Embedding size (the paper's: 900 PTB, 512 WT2).")
@click.option("--text", "text_file", type=click.Path(path_type=Path),
              help="One UTF-8 text file, split by contiguous blocks of lines: 90% train, 5% valid, 5% test. "
                   "[default: none]")
@click.option("--tokens", type=click.Choice(list(language.TOKENS)), help="Word or character tokens.")
@click.option("--cell", type=click.Choice(list(CELLS)), help="The recurrent cell.")
@click.option("--hidden", type=click.IntRange(1), help="Hidden size.")
@click.option("--dropout", type=Number(0, 1, high_open=True),
              help="Dropout on the embeddings, between layers and on the outputs.")
@click.option("--tie-weights", is_flag=True, default=None, help="Share the embedding and output weights.")
@_with(TRAIN_OPTIONS + DNI_OPTIONS)
def train_language(data_dir, text_file, tokens, cell, embedding, hidden, dropout, tie_weights, **opts):
    """Language modelling by words or characters (paper section 5.2)."""
    task = {k: v for k, v in dict(data_dir=None if data_dir is None else str(Path(data_dir).resolve()),
                                  text_file=None if text_file is None else str(Path(text_file).resolve()),
                                  tokens=tokens, cell=cell, embedding=embedding, hidden=hidden, dropout=dropout,
                                  tie_weights=tie_weights).items() if v is not None}
    _train("language", task, opts)


@_defaults("point-process")
@train.command("point-process")
@click.option("--data", type=click.Path(path_type=Path),
              help="Folder of train/dev/test.pkl (neural-Hawkes, EasyTPP), or a CSV with a header naming "
                   "sequence,time,mark: absolute times in any unit, integer marks, split 80/10/10 by sequence "
                   "id. [default: a simulated two-mark Hawkes process]")
@click.option("--events", type=click.IntRange(20), help="Simulated events in all.")
@click.option("--hidden", type=click.IntRange(1), help="LSTM hidden size.")
@_with(TRAIN_OPTIONS)
def train_point_process(data, events, hidden, **opts):
    """Marked temporal point process with RMTPP (paper section 5.3)."""
    task = {k: v for k, v in dict(data=None if data is None else str(Path(data).resolve()),
                                  events=events, hidden=hidden).items() if v is not None}
    _train("point-process", task, opts)


@cli.command()
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("figures"), show_default=True,
              help="The folder training.png goes in.")
@click.option("--smooth", type=click.IntRange(1),
              help="A centred moving average over this many epochs. [default: none]")
def plot(run_dirs, out, smooth):
    """Training curves of runs side by side (test metric, K, relative bias)."""
    for run_dir in run_dirs:
        read_metrics(run_dir)  # a missing or damaged log is refused before anything is drawn
    fig = plot_training(run_dirs, [d.name for d in run_dirs], smooth=smooth)
    path = Path(out) / "training.png"
    if Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"--out {out} is a file: choose a folder")
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot write to {out}: {err.strerror}; choose another --out") from None
    with atomic.writing(path, "the figure") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    click.echo(f"wrote {path}")


def main(argv=None):
    """The ``biaskit`` console script: biaskit's group with the trainers' commands."""
    biaskit_main(argv)
