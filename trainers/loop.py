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

import torch
from tqdm import tqdm

from biaskit import checkpoint
from biaskit.errors import InputError
from biaskit.probe import check_windows, evaluating

from . import config as configs
from . import schedule
from .adaptive import Controller
from .dni import SyntheticGradients
from .runs import BEST, LAST, RunDirectory, clean
from .tbptt import Stream, Truncation, batchify

EVAL_CHUNK = 200


def make_optimizer(model, cfg: dict) -> torch.optim.Optimizer:
    try:
        return getattr(torch.optim, cfg["optimizer"])(model.parameters(), lr=cfg["lr"], **cfg["optimizer_options"])
    except (TypeError, ValueError) as err:
        raise InputError(f"bad options for {cfg['optimizer']}: {err}") from None


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


def check_data(task, cfg: dict):
    """Every split feeds the parallel streams, and the training split offers the controller's windows."""
    for name, (inputs, _) in task.splits.items():
        if len(inputs) < 2 * cfg["batch_size"]:
            raise InputError(f"the {name} split has {len(inputs)} positions, too few for {cfg['batch_size']} "
                             "parallel streams of at least two: use a smaller --batch-size or more data")
    lookahead = cfg["window"] if cfg["estimator"] == "dni" else 0
    check_windows(len(task.splits["train"][0]), cfg["window"], cfg["windows"], lookahead)


class Run:
    """One training run in a directory; ``fit()`` trains to the configured number of epochs."""

    def __init__(self, config: dict, out, device="cpu", quiet: bool = False, resume: bool = False):
        self.config, cfg = config, config["train"]
        self.device, self.quiet = torch.device(device), quiet
        self.task = checkpoint.load_registered(checkpoint.TASKS, config["task"])(config["task_config"])
        check_data(self.task, cfg)
        torch.manual_seed(cfg["seed"])
        self.model = self.task.model.to(self.device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.estimator = SyntheticGradients(self.model, cfg, self.device) if cfg["estimator"] == "dni" else Truncation()
        self.controller = Controller(cfg["delta"], cfg["window"], cfg["windows"], cfg["K_min"], cfg["K_max"],
                                     cfg["norm"], cfg["tau"], cfg["controller"], cfg["level"], cfg["groups"],
                                     cfg["beta_method"])
        self.generator = torch.Generator().manual_seed(cfg["seed"])
        self.epoch, self.K, self.best, self.lines = 0, cfg["K"], math.inf, []
        self.next_update, self.history, self.record = cfg["update_every"], [], {}
        self.dir = RunDirectory(out, resume=resume, config=config)
        if resume:
            try:
                self._resume()
            except BaseException:
                self.dir.close()
                raise

    @property
    def adaptive(self) -> bool:
        return self.config["train"]["delta"] is not None

    # --- checkpoints ------------------------------------------------------
    def _resume(self):
        ckpt = checkpoint.load(self.dir.path / LAST)
        state = ckpt["trainer"]
        saved = state["config"]
        saved = {**saved, "train": {**configs.TRAIN_DEFAULTS, **saved["train"],  # options added since
                                    "epochs": self.config["train"]["epochs"]}}
        if saved != self.config:
            raise InputError(f"{self.dir.path} was trained with another config "
                             f"({configs.first_difference(saved, self.config)}); resume with the same options, "
                             "or train into another --out")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.estimator.load(ckpt["dni"], state["estimator"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["controller"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.epoch, self.K, self.best = state["epoch"], ckpt["K"], state["best_valid"]
        self.next_update, self.history, self.record = state["next_update"], ckpt["K_history"], state["record"]
        self.lines = state["metrics"]
        note = self.dir.restore(self.lines)
        if note:
            tqdm.write(note, file=sys.stderr)

    def _save(self, name: str):
        trainer = {"config": self.config, "optimizer": self.optimizer.state_dict(),
                   "estimator": self.estimator.state_dict(), "epoch": self.epoch, "best_valid": self.best,
                   "next_update": self.next_update, "record": self.record, "metrics": self.lines,
                   "rng": {"torch": torch.get_rng_state(), "controller": self.generator.get_state(),
                           "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}}
        checkpoint.save(self.dir.path / name, task=self.config["task"], task_config=self.config["task_config"],
                        model=self.model.state_dict(), K=self.K, K_history=self.history,
                        dni=self.estimator.checkpoint_entry(), trainer=trainer)

    # --- training ---------------------------------------------------------
    def _update(self, progress: float):
        """Measure the bias (and the DNI's); when adaptive, set K = the controller's choice."""
        cfg = self.config["train"]
        x, y = self.task.splits["train"]
        self.record = self.controller.measure(self.model, x, y, self.K, self.generator)
        self.record.update(self.estimator.measure(self.model, x, y, self.K, cfg["window"], cfg["windows"],
                                                  self.generator))
        self.record["progress"] = progress
        if self.adaptive:
            self.K = self.record["K"]
            self.history.append({"progress": progress, **clean(self.record)})
            self.next_update += cfg["update_every"]

    def _train_epoch(self) -> dict:
        cfg = self.config["train"]
        S = cfg["batch_size"]
        x, y = self.task.splits["train"]
        stream: Stream = self.estimator.stream(batchify(x, S).to(self.device), batchify(y, S).to(self.device))
        total, positions, began = 0.0, 0, time.perf_counter()
        bar = tqdm(total=stream.length, disable=True if self.quiet else None,  # None: off when not a terminal
                   unit="pos", leave=False, mininterval=1.0, desc=f"epoch {self.epoch + 1}/{cfg['epochs']}")
        while not stream.done:
            progress = self.epoch + stream.pos / stream.length
            if self.adaptive and stream.pos > 0 and progress >= self.next_update - 1e-9:  # mid-epoch updates
                self._update(progress)
            K1, K2 = configs.truncation(cfg, self.K)
            lr = cfg["lr"] * schedule.lr_factor(cfg["schedule"], cfg["epochs"], progress)
            lr *= math.sqrt(K2) if cfg["scale_lr"] else 1.0
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            loss, n = self.estimator.backward(stream, self.model, K1, K2, progress)
            loss = loss.item()
            if not math.isfinite(loss):
                raise InputError(f"the training loss became {loss} in epoch {self.epoch + 1}: lower --lr, or set "
                                 "--clip")
            if cfg["clip"]:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["clip"])
            self.optimizer.step()
            total, positions = total + loss * n, positions + n
            bar.update(n)
            bar.set_postfix(loss=f"{total / positions:.3f}", K=self.K, refresh=False,
                            tok_s=f"{positions * S / (time.perf_counter() - began):.0f}")
        bar.close()
        seconds = time.perf_counter() - began
        return {"train_loss": total / positions, "lr": lr, "seconds": seconds,
                "tokens_per_s": positions * S / seconds, **self.estimator.epoch_stats()}

    def _epoch_line(self, line: dict, K_used: int) -> dict:
        """The metrics line of an epoch: training, evaluation, truncation, the last update's record."""
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
                **{k: v for k, v in self.record.items() if k != "K"}, "next_K": self.K}

    def fit(self) -> list[dict]:
        """Train to the configured epochs; returns every epoch's metrics line."""
        metric = self.task.metric.lower()
        try:
            while self.epoch < self.config["train"]["epochs"]:
                K_used = self.K
                line = self._train_epoch()
                self.epoch += 1
                if not self.adaptive or self.epoch >= self.next_update - 1e-9:
                    self._update(float(self.epoch))  # fixed K: measure only, for the log
                line = clean(self._epoch_line(line, K_used))
                self.lines.append(line)
                self.dir.append(line)
                if line["valid_loss"] is not None and line["valid_loss"] < self.best:
                    self.best = line["valid_loss"]
                    self._save(BEST)
                self._save(LAST)
                if not self.quiet:
                    tqdm.write(f"epoch {self.epoch}: train {line['train_loss']:.4f}  valid {metric} "
                               f"{line[f'valid_{metric}']:.4f}  test {metric} {line[f'test_{metric}']:.4f}  "
                               f"K {K_used}  rel.bias {line.get('rel_bias_exact') or float('nan'):.3g}  "
                               + (f"chunked {line['rel_bias_truncated']:.3g} → DNI {line['rel_bias_synthetic']:.3g}  "
                                  if "rel_bias_synthetic" in line else "") + f"{line['tokens_per_s']:.0f} tok/s")
        finally:
            self.dir.close()
        return self.lines
