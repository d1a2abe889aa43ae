"""A training run: epochs, evaluation, the K controller, checkpoints, resume and device.

``Run(config, out).fit()`` trains to ``config["train"]["epochs"]``. At every
epoch end it appends a line to ``metrics.jsonl`` and writes
``checkpoint-last.pt`` (and ``checkpoint-best.pt`` on a better validation
loss) in biaskit's checkpoint layout, so ``--resume`` continues bit for bit
and ``biaskit analyze`` audits the model by its task's registered name.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils import _pytree as pytree
from tqdm import tqdm

from biaskit import checkpoint, limits
from biaskit.decompose import GRAPH_ELEMENTS_PER_STATE, memory_estimate
from biaskit.errors import InputError, first_line
from biaskit.probe import check_model, check_windows, evaluating

from . import config as configs
from . import ddp, schedule
from .adaptive import QUIET_RULES, Controller, UpdateRecord, UpdateSchedule
from .board import Board
from .dni import SyntheticGradients
from .runs import BEST, LAST, RunDirectory, clean
from .tbptt import TRAINED_WINDOWS, Stream, Truncation, batchify

EVAL_CHUNK = 200
#: An epoch diverges when a loss exceeds the first training step's (the model as initialised, before
#: any step could blow it up) by this many times max(|that loss|, 1) ...
DIVERGED_FACTOR = 10.0
#: ... and the run stops after this many such epochs in a row.
DIVERGED_EPOCHS = 2
#: Copies of the model's outputs a step keeps: the outputs, their gradient and the loss's own (log-softmax).
OUTPUT_COPIES = 3


def make_optimizer(model, cfg: dict) -> torch.optim.Optimizer:
    """The configured optimizer (its name and options were tried by ``config.check``)."""
    return getattr(torch.optim, cfg["optimizer"])(model.parameters(), lr=cfg["lr"], **cfg["optimizer_options"])


@torch.no_grad()
def evaluate(model, inputs, targets, streams: int, extra=None) -> tuple[float, dict]:
    """Mean per-position loss over a whole split (the state carried across chunks),
    and the task's extra metrics of the split."""
    device = next(model.parameters()).device
    x, y = batchify(inputs, streams).to(device), batchify(targets, streams).to(device)
    outputs, state = [], None
    with evaluating(model):
        for start in range(0, x.shape[1], EVAL_CHUNK):
            out, state = model(x[:, start:start + EVAL_CHUNK], state)
            outputs.append(out)
        out = torch.cat(outputs, dim=1)
        return model.loss(out, y).mean().item(), extra(model, out, y) if extra is not None else {}


def check_data(task, cfg: dict, ranks: ddp.Ranks = ddp.ONE, device: torch.device | str = "cpu"):
    """Every split feeds the parallel streams, the training split offers the controller's windows,
    streams and windows divide among the processes, and a step and an update fit in memory."""
    if ranks.world > 1:
        ddp.share(cfg["batch_size"], ranks, "--batch-size")
        ddp.share(cfg["windows"], ranks, "--windows")
        if cfg["windows_min"] is not None:
            ddp.share(min(cfg["windows_min"], cfg["windows"]), ranks, "--windows-min")
        ddp.share(cfg["groups"], ranks, "--groups")  # each rank its share: the limits one process would give
    for name, (inputs, _) in task.splits.items():
        if len(inputs) < 2 * cfg["batch_size"]:
            raise InputError(f"the {name} split has {len(inputs)} positions, too few for {cfg['batch_size']} "
                             "parallel streams of at least two: use a smaller --batch-size or more data")
    lookahead = cfg["window"] if cfg["estimator"] == "dni" else 0
    check_windows(len(task.splits["train"][0]), cfg["window"], cfg["windows"], lookahead)
    check_memory(task, cfg, ranks, device)


def check_memory(task, cfg: dict, ranks: ddp.Ranks, device: torch.device | str):
    """Refuse, with the figures and before training, a training step or a controller update that
    cannot fit in this process's memory (a large vocabulary times --batch-size times K1, say).

    A step of BPTT(K1, K2) (K1 of --K-max when adaptive, at most a stream's length) keeps, for each of
    this process's streams and positions, OUTPUT_COPIES of the model's outputs (sized by one position
    run through the model) and the unrolled graph, GRAPH_ELEMENTS_PER_STATE floats per state element
    (decompose's figure); an update decomposes this process's windows (``decompose.memory_estimate``),
    and with losses at every step keeps their outputs too; the bias of the trained BPTT(K1, K2) unrolls
    at most TRAINED_WINDOWS windows. These never coexist: each is checked alone.
    """
    model, x = task.model, task.splits["train"][0]
    streams, windows = cfg["batch_size"] // ranks.world, cfg["windows"] // ranks.world
    K1, K2 = configs.truncation(cfg, cfg["K_max"] if cfg["delta"] is not None else cfg["K"])
    steps = min(K1, len(x) // cfg["batch_size"])
    system = check_model(model).system()
    with torch.no_grad(), evaluating(model):
        out = model(x[:1].unsqueeze(0), None)[0]  # one stream, one position
    row = sum(t.numel() for t in pytree.tree_leaves(out) if torch.is_tensor(t)) * limits.FLOAT  # bytes a position
    K = "--K1" if cfg["K1"] is not None else "--K-max" if cfg["delta"] is not None else "--K"
    limits.require({"outputs": OUTPUT_COPIES * row * streams * steps,
                    "graph": GRAPH_ELEMENTS_PER_STATE * system.layout.size * limits.FLOAT * streams * steps},
                   f"a training step of BPTT({K1}, {K2}) over {streams} streams",
                   f"use a smaller --batch-size or {K}", device)
    every = OUTPUT_COPIES * row * windows * cfg["window"] if cfg["loss_at"] == "every" else 0
    limits.require({"decomposition": memory_estimate(system, windows, cfg["window"]), "outputs": every},
                   f"a controller update of {windows} windows of {cfg['window']} steps",
                   "use fewer --windows or a shorter --window", device)
    if cfg["estimator"] == "tbptt":  # each update's rel_bias_trained: one unrolled window set at a time
        trained = min(cfg["windows"], TRAINED_WINDOWS) * cfg["window"]
        limits.require({"outputs": OUTPUT_COPIES * row * trained,
                        "graph": GRAPH_ELEMENTS_PER_STATE * system.layout.size * limits.FLOAT * trained},
                       f"the bias of the trained BPTT(K1, K2) on {trained // cfg['window']} windows of "
                       f"{cfg['window']} steps", "use fewer --windows or a shorter --window", device)


class Run:
    """One training run in a directory; ``fit()`` trains to the configured number of epochs.

    Under torchrun (see ``trainers.ddp``) every rank builds the same Run: the model is
    wrapped in DistributedDataParallel, each rank trains its share of the streams and
    decomposes its share of the controller's windows, and rank 0 alone writes.
    """

    def __init__(self, config: dict, out, device="cpu", quiet: bool = False, resume: bool = False,
                 tensorboard: bool = False):
        self.config, cfg = config, config["train"]
        self.ranks, self.device = ddp.start(torch.device(device))
        self.quiet = quiet or not self.ranks.main
        self.task = checkpoint.call_factory(checkpoint.load_registered(checkpoint.TASKS, config["task"]),
                                            f"building the task {config['task']!r}", config["task_config"])
        ddp.agree(self.ranks, lambda: check_data(self.task, cfg, self.ranks, self.device))
        torch.manual_seed(cfg["seed"])
        self.model = self.task.model.to(self.device)
        self.trained = self.model if self.ranks.world == 1 else DistributedDataParallel(
            self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.optimizer = make_optimizer(self.model, cfg)
        dni = cfg["estimator"] == "dni"
        self.estimator = SyntheticGradients(self.model, cfg, self.device, self.ranks) if dni else Truncation()
        self.controller = Controller.from_config(cfg, self.ranks)
        self.generator = torch.Generator().manual_seed(cfg["seed"])
        self.epoch, self.K, self.best, self.lines = 0, cfg["K"], math.inf, []
        self.updates = UpdateSchedule(cfg["update_every"], cfg["update_every_max"], cfg["delta"] is not None)
        self.schedule = schedule.Schedule.parse(cfg["schedule"])
        self.history, self.record = [], None
        self.start_loss, self.diverging = None, 0  # the first step's loss; epochs in a row far above it
        self.out = Path(out)
        self.dir = ddp.on_main(self.ranks, lambda: RunDirectory(out, resume=resume, config=config))
        self.board = None
        try:
            if resume:
                ddp.agree(self.ranks, self._resume)
            if tensorboard:
                self.board = ddp.on_main(self.ranks, lambda: Board(self.out, self.epoch))
        except BaseException:
            self._close()
            raise

    @property
    def adaptive(self) -> bool:
        return self.config["train"]["delta"] is not None

    # --- checkpoints ------------------------------------------------------
    def _resume(self):
        ckpt = checkpoint.load(self.out / LAST)  # read again under the run's lock: the one to go on from
        state = ckpt["trainer"]
        saved = state["config"]
        saved = {**saved, "train": {**configs.TRAIN_DEFAULTS, **saved["train"],  # options added since
                                    "epochs": self.config["train"]["epochs"]}}
        if saved != self.config:
            raise InputError(f"{self.out} was trained with another config "
                             f"({configs.first_difference(saved, self.config)}); resume with the same options, "
                             "or train into another --out")
        rng = state["rng"]
        world = len(rng["torch"]) if isinstance(rng["torch"], list) else 1
        if world != self.ranks.world:
            raise InputError(f"{self.out} was trained by {world} process(es) and is resumed by {self.ranks.world}: "
                             f"resume it with the same number (torchrun --nproc_per_node {world})")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.estimator.load(ckpt["dni"], state["estimator"])
        mine = rng["torch"][self.ranks.rank] if isinstance(rng["torch"], list) else rng["torch"]
        torch.set_rng_state(mine)
        self.generator.set_state(rng["controller"])
        cuda = rng.get("cuda")
        if cuda is not None and self.device.type == "cuda":  # each rank's own device's state (cuda:N too)
            torch.cuda.set_rng_state(cuda[self.ranks.rank], self.device)
        self.epoch, self.K, self.best = state["epoch"], ckpt["K"], state["best_valid"]
        self.updates.next, self.history = state["next_update"], ckpt["K_history"]
        self.record = UpdateRecord.from_line(state["record"])
        self.lines = state["metrics"]
        self.start_loss, self.diverging = state.get("start_loss"), state.get("diverging", 0)
        if self.ranks.main:
            note = self.dir.restore(self.lines)
            if note:
                tqdm.write(note, file=sys.stderr)

    def _save(self, names: list[str]):
        """Write the checkpoints ``names`` (rank 0), with every rank's random state."""
        torch_rng = ddp.gather(torch.get_rng_state(), self.ranks)
        cuda_rng = ddp.gather(torch.cuda.get_rng_state(self.device), self.ranks) \
            if self.device.type == "cuda" else None
        if not self.ranks.main:
            return
        trainer = {"config": self.config, "optimizer": self.optimizer.state_dict(),
                   "estimator": self.estimator.state_dict(), "epoch": self.epoch, "best_valid": self.best,
                   "next_update": self.updates.next, "metrics": self.lines,
                   "record": self.record.line() if self.record else None,
                   "start_loss": self.start_loss, "diverging": self.diverging,
                   "rng": {"torch": torch_rng if self.ranks.world > 1 else torch_rng[0],
                           "controller": self.generator.get_state(), "cuda": cuda_rng}}
        for name in names:
            checkpoint.save(self.out / name, task=self.config["task"], task_config=self.config["task_config"],
                            model=self.model.state_dict(), K=self.K, K_history=self.history,
                            dni=self.estimator.checkpoint_entry(), trainer=trainer)

    def _close(self):
        if self.board is not None:
            self.board.close()
        if self.dir is not None:
            self.dir.close()

    # --- training ---------------------------------------------------------
    def _update(self, progress: float):
        """Measure the bias (and the trainer's own, or the DNI's, every ``audit_every``-th update of an
        adaptive run); when adaptive, set K = the controller's choice."""
        cfg = self.config["train"]
        x, y = self.task.splits["train"]
        previous, count = self.record, len(self.history)
        record = self.controller.measure(self.model, x, y, self.K, self.generator, previous, count)
        own = not self.adaptive or count % cfg["audit_every"] == 0  # the trainer's own bias, every n-th update
        record = replace(record, progress=progress, **self.estimator.measure(
            self.model, x, y, *configs.truncation(cfg, self.K), cfg["window"], cfg["windows"],
            self.generator) if own else {})
        if self.adaptive:
            self.K = record.K
            record.interval = self.updates.advance(record, previous)
            self.history.append(clean(record.line()))
        self.record = record

    def _train_epoch(self) -> dict:
        cfg = self.config["train"]
        S = cfg["batch_size"]
        x, y = self.task.splits["train"]
        mine = ddp.share(S, self.ranks, "--batch-size")  # this rank's streams
        stream: Stream = self.estimator.stream(batchify(x, S)[mine].to(self.device),
                                               batchify(y, S)[mine].to(self.device))
        total, positions, began = 0.0, 0, time.perf_counter()
        bar = tqdm(total=stream.length, disable=True if self.quiet else None,  # None: off when not a terminal
                   unit="pos", leave=False, mininterval=1.0, desc=f"epoch {self.epoch + 1}/{cfg['epochs']}")
        while not stream.done:
            progress = self.epoch + stream.pos / stream.length
            if stream.pos > 0 and self.updates.due(progress, epoch_end=False):
                self._measure(progress, total / positions)
            K1, K2 = configs.truncation(cfg, self.K)
            lr = cfg["lr"] * self.schedule.lr_factor(cfg["epochs"], progress)
            lr *= math.sqrt(K2) if cfg["scale_lr"] else 1.0
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            loss, n = self.estimator.backward(stream, self.trained, K1, K2, progress)
            loss = ddp.total(loss.item(), self.ranks) / self.ranks.world  # every rank's, so all stop together
            if not math.isfinite(loss):
                raise InputError(f"the training loss became {loss} in epoch {self.epoch + 1}: {self._advice()}")
            if cfg["clip"]:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["clip"] / (K2 if cfg["clip_per_K"] else 1))
            self.optimizer.step()
            self.start_loss = loss if self.start_loss is None else self.start_loss
            total, positions = total + loss * n, positions + n
            bar.update(n)  # positions per stream: the same on every rank
            bar.set_postfix(loss=f"{total / positions:.3f}", K=self.K, refresh=False,
                            tok_s=f"{positions * S / (time.perf_counter() - began):.0f}")
        bar.close()
        seconds = time.perf_counter() - began
        return {"train_loss": total / positions, "lr": lr, "seconds": seconds,
                "tokens_per_s": positions * S / seconds, **self.estimator.epoch_stats()}

    def _advice(self) -> str:
        """What to try when training fails, and what is kept."""
        cfg = self.config["train"]
        clip = f"a tighter --clip than {cfg['clip']:g}" if cfg["clip"] else "--clip 1.0"
        kept = f"; {self.out / BEST} holds the epoch of lowest valid loss" if (self.out / BEST).exists() else ""
        return f"try {clip}, or a smaller --lr than {cfg['lr']:g}{kept}"

    def _limit(self) -> float:
        """The loss above which an epoch counts as diverging."""
        return self.start_loss + DIVERGED_FACTOR * max(abs(self.start_loss), 1.0)

    def _measure(self, progress: float, train_loss: float):
        """``_update``; a measurement that fails on a model whose loss has blown up names that cause."""
        try:
            self._update(progress)
        except InputError as err:
            if not train_loss > self._limit():
                raise
            raise InputError(f"training diverged: train loss {train_loss:.4g} in epoch {self.epoch}, above "
                             f"{self._limit():.4g} (the first step's loss was {self.start_loss:.4g}), and the bias "
                             f"cannot be measured on it ({first_line(err)}): {self._advice()}") from None

    def _check_divergence(self, line: dict):
        """Stop a run whose valid loss is not finite, or whose losses stay far above (DIVERGED_FACTOR)
        its first step's for DIVERGED_EPOCHS epochs in a row, with the figures and what to try."""
        valid, train = line["valid_loss"], line["train_loss"]
        if not math.isfinite(valid):
            raise InputError(f"epoch {self.epoch}: the valid loss is {valid}: {self._advice()}")
        limit = self._limit()
        self.diverging = self.diverging + 1 if max(valid, train) > limit else 0
        if self.diverging >= DIVERGED_EPOCHS:
            raise InputError(f"training diverged: train loss {train:.4g} and valid loss {valid:.4g} in epoch "
                             f"{self.epoch}, above {limit:.4g} for {self.diverging} epochs (the first step's loss was "
                             f"{self.start_loss:.4g}): {self._advice()}")

    def _epoch_line(self, line: dict, K_used: int, updated: bool) -> dict:
        """The metrics line of an epoch: training, evaluation, truncation, and the record of the
        epoch's last update if it had one."""
        metric, cfg = self.task.metric.lower(), self.config["train"]
        evaluated = {name: evaluate(self.model, *self.task.splits[name], cfg["batch_size"], self.task.extra)
                     for name in ("valid", "test")}
        losses = {name: loss for name, (loss, _) in evaluated.items()}
        K1, K2 = configs.truncation(cfg, K_used)
        return {"epoch": self.epoch, **line, "K": K_used, "K1": K1, "K2": K2,
                f"train_{metric}": self.task.score(line["train_loss"]),
                **{f"{n}_loss": v for n, v in losses.items()},
                **{f"{n}_{metric}": self.task.score(v) for n, v in losses.items()},
                **{f"{n}_{k}": v for n, (_, more) in evaluated.items() for k, v in more.items()},
                **({k: v for k, v in self.record.line().items() if k != "K"} if updated and self.record else {}),
                "next_K": self.K}

    def fit(self) -> list[dict]:
        """Train to the configured epochs; returns every epoch's metrics line."""
        metric = self.task.metric.lower()
        if self.task.about and not self.quiet:
            tqdm.write(self.task.about)
        costly = every_step_cost(self.config["train"])
        if costly and self.ranks.main:
            tqdm.write(costly, file=sys.stderr)
        try:
            while self.epoch < self.config["train"]["epochs"]:
                K_used, updates = self.K, len(self.history)
                line = self._train_epoch()
                self.epoch += 1
                if self.updates.due(float(self.epoch), epoch_end=True):
                    self._measure(float(self.epoch), line["train_loss"])
                updated = len(self.history) > updates
                line = self._epoch_line(line, K_used, updated or not self.adaptive)
                self._check_divergence(line)
                line = clean(line)
                self.lines.append(line)
                better = line["valid_loss"] is not None and line["valid_loss"] < self.best
                self.best = line["valid_loss"] if better else self.best
                if self.ranks.main:
                    self.dir.append(line)
                    if self.board is not None:
                        self.board.write(line)
                self._save([BEST, LAST] if better else [LAST])
                if not self.quiet:
                    tqdm.write(f"epoch {self.epoch}: train {shown(line['train_loss'], '.4f')}  valid {metric} "
                               f"{shown(line[f'valid_{metric}'], '.4f')}  test {metric} "
                               f"{shown(line[f'test_{metric}'], '.4f')}  "
                               f"K {K_used}  rel.bias {shown(line.get('rel_bias_exact'))}  "
                               + (f"BPTT({line['K1']}, {line['K2']}) {shown(line['rel_bias_trained'])}  "
                                  if "rel_bias_trained" in line else "")
                               + (f"chunked {line['rel_bias_truncated']:.3g} → DNI {line['rel_bias_synthetic']:.3g}  "
                                  if "rel_bias_synthetic" in line else "") + f"{line['tokens_per_s']:.0f} tok/s"
                               + (f"  → K {self.K} ({line['K_rule']})" if self.adaptive and updated else ""))
                    if self.adaptive and updated and line["K_rule"] not in QUIET_RULES:
                        tqdm.write(warning(line, self.config["train"]))
        finally:
            self._close()
        return self.lines


def shown(value, spec: str = ".3g") -> str:
    """A logged number for people: "–" where it is missing (not finite, or not measured)."""
    return "–" if value is None else format(value, spec)


#: Last-step windows' worth of work above which an every-step update is announced as costly
#: (four times the default update's 256).
EVERY_STEP_WORK = 1024


def every_step_cost(cfg: dict) -> str | None:
    """The line that says a run's every-step measurements (each update's; a fixed K's every epoch) will be
    costly: a window of W steps with a loss at every step costs about W/4 last-step windows (R(R + 1)/2
    step products, docs/formulas.md)."""
    if cfg["loss_at"] != "every" or cfg["windows"] * cfg["window"] / 4 <= EVERY_STEP_WORK:
        return None
    return (f"warning: --loss-at every: each of the {cfg['windows']} windows of {cfg['window']} steps costs about "
            f"{cfg['window'] // 4} last-step windows, so an update costs about "
            f"{cfg['windows'] * cfg['window'] / 4 / 256:.0f}x the default's; on the copy task 16 every-step "
            "windows resolved the mean gradient at most updates (--windows 16)")


def warning(line: dict, cfg: dict) -> str:
    """The line that says an update set K by a rule other than a certificate or a plain hold."""
    target, K = line["K_target"], line["next_K"]
    moved = f"K {line['K_in_use']} → {K}" + (f" (toward {target}, at most x{cfg['max_change']:g} an update)"
                                               if target != K else "")
    why = {"none below delta": f"no K in [{cfg['K_min']}, {cfg['K_max']}] brings the bias below delta = "
                               f"{cfg['delta']:g}",
           "raised": f"the K in use evidently misses delta = {cfg['delta']:g} (its lower limit is above it)",
           "no fit": "no decay could be fitted to phi (K kept)"}.get(line["K_rule"], line["K_rule"])
    return f"warning: {why}: {moved}" + (f"; the step becomes lr·√{K}" if cfg["scale_lr"] else "")
