"""A training run: epochs, evaluation, logging, checkpoints, resume and device, in one place.

The config is one dict, ``{"factory": ..., "task": {...}, "train": {...}}``;
``config.json`` holds it, ``metrics.jsonl`` gets a line per epoch and
``checkpoint-last.pt`` / ``checkpoint-best.pt`` are written at epoch ends in
biaskit's self-describing format, so ``--resume`` continues exactly.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from biaskit import checkpoint
from biaskit.errors import InputError

from . import dni
from .adaptive import Controller
from .tbptt import Stream, batchify

TRAIN_DEFAULTS = {
    "epochs": 20,
    "batch_size": 64,      # S parallel streams
    "lr": 1.0,
    "optimizer": "SGD",
    "optimizer_options": {},
    "clip": None,          # max gradient norm, or None
    "schedule": "constant",  # constant | cosine | step:EPOCHS:GAMMA
    "scale_lr": True,      # step size times sqrt(K)
    "K": 15,               # fixed truncation: BPTT(2K, K); the initial K0 when adaptive
    "K1": None,            # explicit BPTT(K1, K2) instead of (2K, K)
    "K2": None,
    "delta": None,         # tolerated relative bias: adaptive when set
    "K_min": 2,
    "K_max": 100,
    "window": 100,         # W, the controller's window length
    "windows": 64,         # windows per controller update
    "update_every": 1.0,   # epochs between K updates (fractions allowed)
    "norm": "phi",
    "tau": None,
    "estimator": "tbptt",  # tbptt, or dni: synthetic gradients at the ends of BPTT(K, K) chunks
    "dni": "neuron",       # the DNI's shape: neuron or layer
    "dni_hidden": None,    # its hidden size; None: the state size (layer), 8 (neuron)
    "dni_lr": 1e-3,        # its Adam step size
    "dni_discount": 1.0,   # weight of the bootstrapped term in its target (1: Jaderberg et al.'s)
    "alternate": False,    # dni: real gradients in even warm restarts, synthetic in odd (schedule restarts:E)
    "seed": 0,
}
EVAL_CHUNK = 200


def full_config(factory: str, task: dict, train: dict) -> dict:
    """The complete config of a run; unknown training keys are refused."""
    unknown = set(train) - set(TRAIN_DEFAULTS)
    if unknown:
        raise InputError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    cfg = {**TRAIN_DEFAULTS, **train}
    if (cfg["K1"] is None) != (cfg["K2"] is None):
        raise InputError("give both --K1 and --K2, or neither")
    if cfg["K1"] is not None and not 1 <= cfg["K2"] <= cfg["K1"]:
        raise InputError(f"BPTT(K1, K2) needs 1 <= K2 <= K1, got K1={cfg['K1']}, K2={cfg['K2']}")
    if cfg["delta"] is not None and not 0 < cfg["delta"] < 1:
        raise InputError(f"--delta must be in (0, 1), got {cfg['delta']}")
    if not 1 <= cfg["K_min"] <= cfg["K_max"]:
        raise InputError(f"need 1 <= K_min <= K_max, got [{cfg['K_min']}, {cfg['K_max']}]")
    if cfg["update_every"] <= 0:
        raise InputError("--update-every must be positive")
    if cfg["estimator"] not in ("tbptt", "dni"):
        raise InputError(f"unknown estimator {cfg['estimator']!r}: use tbptt or dni")
    if cfg["dni"] not in dni.KINDS:
        raise InputError(f"unknown DNI {cfg['dni']!r}: use {' or '.join(dni.KINDS)}")
    if cfg["estimator"] == "dni" and (cfg["delta"] is not None or cfg["K1"] is not None):
        raise InputError("--estimator dni trains BPTT(K, K) chunks with a fixed --K: "
                         "leave out --delta, --K1 and --K2")
    if not 0 <= cfg["dni_discount"] <= 1:
        raise InputError(f"--dni-discount must be in [0, 1], got {cfg['dni_discount']}")
    if cfg["alternate"] and (cfg["estimator"] != "dni" or not cfg["schedule"].startswith("restarts:")):
        raise InputError("--alternate needs --estimator dni and the warm-restart schedule (--restart-base)")
    lr_factor(cfg, 0.0)  # an unknown schedule fails here, not after the first epoch
    return {"factory": factory, "task": task, "train": cfg}


def truncation(cfg: dict, K: int) -> tuple[int, int]:
    """(K1, K2) for truncation K: explicit when given, BPTT(K, K) chunks for synthetic
    gradients, else the paper's BPTT(2K, K)."""
    if cfg["estimator"] == "dni":
        return K, K
    return (cfg["K1"], cfg["K2"]) if cfg["K1"] is not None else (2 * K, K)


def warm_restart(progress: float, base: float) -> tuple[int, float]:
    """(i, fraction done) of the warm-restart run at ``progress`` epochs, run i lasting
    base·2^i epochs (CosineAnnealingWarmRestarts with T_mult = 2)."""
    i = math.floor(math.log2(progress / base + 1))
    return i, (progress - base * (2**i - 1)) / (base * 2**i)


def synthetic_phase(cfg: dict, progress: float) -> bool:
    """Whether updates at ``progress`` use synthetic gradients: always for dni, or in odd
    warm restarts when alternating (real gradients first)."""
    if cfg["estimator"] != "dni":
        return False
    return not cfg["alternate"] or warm_restart(progress, _restart_base(cfg))[0] % 2 == 1


def _restart_base(cfg: dict) -> float:
    return float(cfg["schedule"].split(":")[1])


def lr_factor(cfg: dict, progress: float) -> float:
    """The learning-rate schedule at ``progress`` epochs (stateless, so resume needs nothing)."""
    name = cfg["schedule"]
    if name == "constant":
        return 1.0
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress / cfg["epochs"], 1.0)))
    try:
        if name.startswith("step:"):
            every, gamma = name.split(":")[1:]
            return float(gamma) ** math.floor(progress / float(every))
        if name.startswith("restarts:") and _restart_base(cfg) > 0:
            return 0.5 * (1 + math.cos(math.pi * warm_restart(progress, _restart_base(cfg))[1]))
    except ValueError:
        pass
    raise InputError(f"unknown schedule {name!r}: use constant, cosine, step:EPOCHS:GAMMA or restarts:EPOCHS")


def make_optimizer(model, cfg: dict) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, cfg["optimizer"], None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise InputError(f"unknown optimizer {cfg['optimizer']!r}: use a torch.optim name such as SGD or Adam")
    try:
        return cls(model.parameters(), lr=cfg["lr"], **cfg["optimizer_options"])
    except (TypeError, ValueError) as err:
        raise InputError(f"bad options for {cfg['optimizer']}: {err}") from None


@torch.no_grad()
def evaluate(model, inputs, targets, streams: int, extra=None) -> tuple[float, dict]:
    """Mean per-position loss over a whole split (the state carried across chunks),
    and the task's extra metrics of the split."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x, y = batchify(inputs, streams).to(device), batchify(targets, streams).to(device)
    outputs, state = [], None
    for start in range(0, x.shape[1], EVAL_CHUNK):
        out, state = model(x[:, start:start + EVAL_CHUNK], state)
        outputs.append(out)
    out = torch.cat(outputs, dim=1)
    loss = model.loss(out, y).mean().item()
    more = extra(model, out, y) if extra is not None else {}
    model.train(was_training)
    return loss, more


def _clean(record: dict) -> dict:
    """JSON-safe: NaN becomes null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}


class Run:
    """One training run in a directory; ``fit()`` trains to the configured number of epochs."""

    def __init__(self, config: dict, out, device="cpu", quiet=False, resume=False):
        self.out, self.device, self.quiet = Path(out), torch.device(device), quiet
        self.config, cfg = config, config["train"]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / ".write-test").touch()
            (self.out / ".write-test").unlink()
        except OSError as err:
            raise InputError(f"cannot write to {self.out}: {err.strerror}; choose another --out") from None
        self.task = checkpoint.resolve(config["factory"])(config["task"])
        self.model = self.task.model.to(self.device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.dni = None
        if cfg["estimator"] == "dni":
            self.dni_config = {"kind": cfg["dni"], "size": dni.state_size(self.model), "hidden": cfg["dni_hidden"]}
            self.dni = dni.build(self.dni_config).to(self.device)
            self.dni_optimizer = torch.optim.Adam(self.dni.parameters(), lr=cfg["dni_lr"])
        self.controller = Controller(
            cfg["delta"], cfg["window"], cfg["windows"], cfg["K_min"], cfg["K_max"], cfg["norm"], cfg["tau"])
        self.generator = torch.Generator().manual_seed(cfg["seed"])
        torch.manual_seed(cfg["seed"])
        self.epoch, self.K, self.best = 0, cfg["K"], math.inf
        self.next_update, self.history, self.record = cfg["update_every"], [], {}
        if resume:
            self._resume()
        else:
            if (self.out / "checkpoint-last.pt").exists():
                raise InputError(f"{self.out} already holds a run: pass --resume to continue it, or another --out")
            (self.out / "config.json").write_text(json.dumps(config, indent=1))
            (self.out / "metrics.jsonl").write_text("")

    # --- resume -----------------------------------------------------------
    def _resume(self):
        ckpt = checkpoint.load(self.out / "checkpoint-last.pt")
        saved = {**ckpt["config"], "train": {**TRAIN_DEFAULTS, **ckpt["config"]["train"],  # options added since
                                             "epochs": self.config["train"]["epochs"]}}
        if saved != self.config:
            raise InputError(f"{self.out} was trained with another config ({_first_difference(saved, self.config)}); "
                             "resume with the same options, or train into another --out")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.dni is not None:
            self.dni.load_state_dict(ckpt["dni"]["state"])
            self.dni_optimizer.load_state_dict(ckpt["dni_optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.generator.set_state(ckpt["rng"]["controller"])
        if ckpt["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.epoch, self.K, self.best = ckpt["epoch"], ckpt["K"], ckpt["best_valid"]
        self.next_update, self.history, self.record = ckpt["next_update"], ckpt["K_history"], ckpt["record"]
        lines = (self.out / "metrics.jsonl").read_text().splitlines()[: self.epoch]
        (self.out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))

    def _save(self, name: str):
        synthetic = {} if self.dni is None else {
            "dni": {"factory": dni.FACTORY, "config": self.dni_config, "state": self.dni.state_dict()},
            "dni_optimizer": self.dni_optimizer.state_dict()}
        checkpoint.save(
            self.out / name, factory=self.config["factory"], config=self.config, model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(), epoch=self.epoch, K=self.K, best_valid=self.best,
            next_update=self.next_update, K_history=self.history, record=self.record, **synthetic,
            rng={"torch": torch.get_rng_state(), "controller": self.generator.get_state(),
                 "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None})

    # --- training ---------------------------------------------------------
    def _update(self, progress: float):
        """Measure the bias; when adaptive, set K = κ̂(δ)."""
        x, y = self.task.splits["train"]
        self.record = self.controller.measure(self.model, x, y, self.K, self.generator)
        if self.dni is not None:
            cfg = self.config["train"]
            self.record.update(dni.measure(self.model, self.dni, x, y, self.K, cfg["window"], cfg["windows"],
                                           self.generator))
        self.record["progress"] = progress
        if self.controller.delta is not None:
            self.K = self.record["K"]
            self.history.append({"progress": progress, **_clean(self.record)})

    def _train_epoch(self) -> dict:
        cfg = self.config["train"]
        x, y = self.task.splits["train"]
        S = cfg["batch_size"]
        xb, yb = batchify(x, S).to(self.device), batchify(y, S).to(self.device)
        stream = Stream(xb, yb) if self.dni is None else dni.SyntheticStream(xb, yb, self.dni, cfg["dni_discount"])
        synthetic_updates, updates, dni_loss = 0, 0, 0.0
        adaptive = cfg["delta"] is not None
        total_loss, positions, began = 0.0, 0, time.perf_counter()
        bar = tqdm(total=stream.length, disable=True if self.quiet else None,  # None: off when not a terminal
                   unit="pos", leave=False, mininterval=1.0,
                   desc=f"epoch {self.epoch + 1}/{cfg['epochs']}")
        while not stream.done:
            progress = self.epoch + stream.pos / stream.length
            if adaptive and stream.pos > 0 and progress >= self.next_update - 1e-9:  # mid-epoch updates
                self._update(progress)
                self.next_update += cfg["update_every"]
            K1, K2 = truncation(cfg, self.K)
            lr = cfg["lr"] * lr_factor(cfg, progress) * (math.sqrt(K2) if cfg["scale_lr"] else 1.0)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            if self.dni is None:
                loss, n = stream.window_loss(self.model, K1, K2)
                loss.backward()
            else:
                synthetic = synthetic_phase(cfg, progress)
                loss, n, dni_step_loss = stream.chunk_backward(self.model, K2, synthetic)
                if dni_step_loss is not None:
                    self.dni_optimizer.zero_grad(set_to_none=True)
                    dni_step_loss.backward()
                    self.dni_optimizer.step()
                    dni_loss += dni_step_loss.item()
                synthetic_updates += synthetic
            updates += 1
            if cfg["clip"]:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["clip"])
            self.optimizer.step()
            total_loss += loss.item() * n
            positions += n
            bar.update(n)
            bar.set_postfix(loss=f"{total_loss / positions:.3f}", K=self.K, refresh=False,
                            tok_s=f"{positions * S / (time.perf_counter() - began):.0f}")
        bar.close()
        seconds = time.perf_counter() - began
        line = {"train_loss": total_loss / positions, "lr": lr, "seconds": seconds, "tokens_per_s": positions * S / seconds}
        if self.dni is not None:
            line.update(synthetic_share=synthetic_updates / updates, dni_loss=dni_loss / max(1, updates - 1))
        return line

    def fit(self) -> list[dict]:
        cfg = self.config["train"]
        metric = self.task.metric.lower()
        while self.epoch < cfg["epochs"]:
            K_used = self.K
            line = self._train_epoch()
            self.epoch += 1
            if cfg["delta"] is None or self.epoch >= self.next_update - 1e-9:
                self._update(float(self.epoch))  # fixed K: measure only, for the log
                if cfg["delta"] is not None:
                    self.next_update += cfg["update_every"]
            evaluated = {name: evaluate(self.model, *self.task.splits[name], cfg["batch_size"], self.task.extra)
                         for name in ("valid", "test")}
            losses = {name: loss for name, (loss, _) in evaluated.items()}
            K1, K2 = truncation(cfg, K_used)
            line = {"epoch": self.epoch, **line, "K": K_used, "K1": K1, "K2": K2,
                    f"train_{metric}": self.task.score(line["train_loss"]),
                    **{f"{n}_loss": v for n, v in losses.items()},
                    **{f"{n}_{metric}": self.task.score(v) for n, v in losses.items()},
                    **{f"{n}_{k}": v for n, (_, more) in evaluated.items() for k, v in more.items()},
                    **{k: v for k, v in self.record.items() if k != "K"}, "next_K": self.K}
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(_clean(line)) + "\n")
            if losses["valid"] < self.best:
                self.best = losses["valid"]
                self._save("checkpoint-best.pt")
            self._save("checkpoint-last.pt")
            if not self.quiet:
                tqdm.write(f"epoch {self.epoch}: train {line['train_loss']:.4f}  valid {metric} "
                           f"{line[f'valid_{metric}']:.4f}  test {metric} {line[f'test_{metric}']:.4f}  "
                           f"K {K_used}  rel.bias {line.get('rel_bias_exact', float('nan')):.3g}  "
                           + (f"chunked {line['rel_bias_truncated']:.3g} → DNI {line['rel_bias_synthetic']:.3g}  "
                              if self.dni is not None else "") +
                           f"{line['tokens_per_s']:.0f} tok/s")
        return read_metrics(self.out)


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _first_difference(a: dict, b: dict, prefix="") -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                return _first_difference(a[key], b[key], f"{prefix}{key}.")
            return f"{prefix}{key}: {a.get(key)!r} then, {b.get(key)!r} now"
    return "none"
