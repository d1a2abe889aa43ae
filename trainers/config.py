"""The run config: one dict, its defaults, and every check made before a run starts.

A config is ``{"task": registered name, "task_config": {...}, "train": {...}}``;
``config.json`` holds it and checkpoints carry it, so a run can be resumed and
audited without the command line that made it.
"""
from __future__ import annotations

import math
import numbers

import torch

from biaskit.bands import LOSS_AT
from biaskit.errors import InputError, first_line

from . import schedule
from .adaptive import BETA_METHODS, CONTROLLER_DEFAULTS, CONTROLLERS
from .dni import SHAPES

TRAIN_DEFAULTS = {
    "epochs": 20,
    "batch_size": 64,      # S parallel streams
    "lr": 1.0,
    "optimizer": "SGD",
    "optimizer_options": {},
    "clip": None,          # max gradient norm, or None
    "clip_per_K": False,   # clip at clip / K2 instead (the authors' scripts)
    "buffer": "2K",        # BPTT(2K, K) (the paper's), or "2K-1": BPTT(2K - 1, K) (the authors' scripts)
    "setup": "biaskit",    # whose settings the run started from: biaskit's task defaults, or "authors" (AUTHORS)
    "schedule": "constant",  # see schedule.SCHEDULES
    "scale_lr": True,      # step size times sqrt(K)
    "K": 15,               # fixed truncation: BPTT(2K, K); the initial K0 when adaptive
    "K1": None,            # explicit BPTT(K1, K2) instead of (2K, K)
    "K2": None,
    "update_every": 1.0,   # epochs between K updates (fractions allowed)
    "update_every_max": 4.0,  # while K is settled the interval doubles, up to this
    **CONTROLLER_DEFAULTS,  # delta (adaptive when set), window W, windows, K_min, K_max, ...: adaptive.Controller
    "estimator": "tbptt",  # tbptt, or dni: synthetic gradients at the ends of BPTT(K, K) chunks
    "dni": "linear",       # the DNI's shape: linear, layer or neuron (analyses/results/dni.md)
    "dni_hidden": None,    # its hidden size; None: the state size (layer), 8 (neuron)
    "dni_lr": 1e-3,        # its Adam step size
    "dni_discount": 0.5,   # weight of the bootstrapped term in its target (1: Jaderberg et al.'s, which diverged)
    "alternate": False,    # dni: real gradients in even warm restarts, synthetic in odd (schedule restarts:E)
    "seed": 0,
}
DNI_SHAPES = tuple(SHAPES)
BUFFERS = ("2K", "2K-1")
SETUPS = ("biaskit", "authors")

#: ``--setup authors``: what the authors' experiment scripts set beyond the paper, per task (read in
#: aicherc/adaptive_tbptt at 1bab866; docs/formulas.md, "Training loop"), over the task's defaults;
#: options given on the command line still win. Their K update every ~5000/K steps (copy) or
#: 200,000/K (language), cut at 20 s / 120 s, is approximated by ``update_every`` in epochs of the
#: task's default data; not reproduced: the time cut, 5 averaged κ̂ per update (language), φ
#: measured with dropout on, Δ̂ over the exact cumulative norm (copy, point process).
AUTHORS = {
    "copy": {"controller": "paper", "windows": 64, "K_min": 2, "K_max": 100, "clip": 1.0, "clip_per_K": True,
             "buffer": "2K-1", "optimizer_options": {"weight_decay": 1e-5}, "update_every": 1.25,
             "update_every_max": 1.25, "max_change": math.inf, "max_shrink": math.inf},
    "language": {"controller": "paper", "windows": 32, "K_min": 10, "K_max": 300, "clip": 1.0, "clip_per_K": True,
                 "buffer": "2K-1", "optimizer_options": {"weight_decay": 1e-7}, "max_change": math.inf,
                 "max_shrink": math.inf},
    "point-process": {"controller": "paper", "windows": 64, "K_min": 2, "K_max": 100, "clip": 1.0,
                      "clip_per_K": True, "buffer": "2K-1", "optimizer_options": {"weight_decay": 1e-3},
                      "update_every": 8.0, "update_every_max": 8.0, "max_change": math.inf, "max_shrink": math.inf},
}


def _positive(cfg: dict, key: str, option: str, integer: bool = False, allow_none: bool = False):
    value = cfg[key]
    if value is None and allow_none:
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        what = "a positive whole number" if integer else "a positive finite number"
        raise InputError(f"{option} must be {what}, got {value!r}")


def check(cfg: dict) -> dict:
    """The training options ``cfg``, checked: every error here is one a user can fix."""
    unknown = set(cfg) - set(TRAIN_DEFAULTS)
    if unknown:
        raise InputError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    _check_sizes(cfg)
    _check_truncation(cfg)
    _check_controller(cfg)
    _check_dni(cfg)
    _check_optimizer(cfg)
    return cfg


def _check_sizes(cfg: dict):
    """Counts and step sizes, and the named choices of the loop."""
    for key in ("epochs", "batch_size", "K", "K_min", "K_max", "window", "windows", "groups"):
        _positive(cfg, key, f"--{key.replace('_', '-')}", integer=True)
    for key in ("K1", "K2", "dni_hidden", "windows_min"):
        _positive(cfg, key, f"--{key.replace('_', '-')}", integer=True, allow_none=True)
    _positive(cfg, "audit_every", "--audit-every", integer=True)
    for key in ("lr", "update_every", "update_every_max", "dni_lr"):
        _positive(cfg, key, f"--{key.replace('_', '-')}")
    _positive(cfg, "clip", "--clip", allow_none=True)
    if cfg["buffer"] not in BUFFERS:
        raise InputError(f"--buffer must be one of {', '.join(BUFFERS)}, got {cfg['buffer']!r}")
    if cfg["setup"] not in SETUPS:
        raise InputError(f"--setup must be one of {', '.join(SETUPS)}, got {cfg['setup']!r}")
    if cfg["loss_at"] not in LOSS_AT:
        raise InputError(f"--loss-at must be one of {', '.join(LOSS_AT)}, got {cfg['loss_at']!r}")


def _check_truncation(cfg: dict):
    """K, BPTT(K1, K2), δ and the bounds on K, against the controller's window."""
    if (cfg["K1"] is None) != (cfg["K2"] is None):
        raise InputError("give both --K1 and --K2, or neither")
    if cfg["K1"] is not None and not 1 <= cfg["K2"] <= cfg["K1"]:
        raise InputError(f"BPTT(K1, K2) needs 1 <= K2 <= K1, got K1={cfg['K1']}, K2={cfg['K2']}")
    if cfg["delta"] is not None and not (isinstance(cfg["delta"], numbers.Real) and 0 < cfg["delta"] < 1):
        raise InputError(f"--delta must be in (0, 1), got {cfg['delta']}")
    if cfg["K_min"] > cfg["K_max"]:
        raise InputError(f"need K_min <= K_max, got [{cfg['K_min']}, {cfg['K_max']}]")
    if cfg["delta"] is not None and not cfg["K_min"] <= cfg["K"] <= cfg["K_max"]:
        raise InputError(f"the first --K {cfg['K']} is outside [--K-min, --K-max] = [{cfg['K_min']}, {cfg['K_max']}]")
    if cfg["window"] < 2:
        raise InputError("the controller needs a --window of at least 2 steps")
    if cfg["K"] >= cfg["window"]:  # the bias at K is measured over windows, at lags below their length
        raise InputError(f"--K {cfg['K']} is past the controller's --window of {cfg['window']} steps, where its "
                         "bias cannot be measured: lower --K or raise --window")


def _check_controller(cfg: dict):
    """The controller's choices, rate limits, schedule and confidence."""
    if not (isinstance(cfg["max_change"], numbers.Real) and cfg["max_change"] > 1):
        raise InputError(f"--max-change must be a factor above 1, got {cfg['max_change']!r}")
    if cfg["max_shrink"] is not None and not (isinstance(cfg["max_shrink"], numbers.Real)
                                              and 1 < cfg["max_shrink"] <= cfg["max_change"]):
        raise InputError(f"--max-shrink must be a factor above 1 and at most --max-change "
                         f"{cfg['max_change']:g}, got {cfg['max_shrink']!r}")
    if cfg["update_every_max"] < cfg["update_every"]:
        raise InputError(f"--update-every-max {cfg['update_every_max']} is below --update-every "
                         f"{cfg['update_every']}")
    if cfg["controller"] not in CONTROLLERS:
        raise InputError(f"unknown controller {cfg['controller']!r}: use {' or '.join(CONTROLLERS)}")
    if cfg["beta_method"] not in BETA_METHODS:
        raise InputError(f"unknown --beta-method {cfg['beta_method']!r}: use {', '.join(BETA_METHODS)}")
    if not (isinstance(cfg["level"], numbers.Real) and 0.5 <= cfg["level"] < 1):
        raise InputError(f"--level must be in [0.5, 1), e.g. 0.9; got {cfg['level']}")
    if cfg["groups"] < 3 or cfg["windows"] < 3:  # every update measures the exact bias's limits
        raise InputError(f"the exact bias's confidence limit needs at least 3 --groups of windows and 3 "
                         f"--windows (got {cfg['groups']} groups, {cfg['windows']} windows); the groups are "
                         "capped at the windows")


def _check_dni(cfg: dict):
    """The estimator, the DNI's shape and discount, and what goes with synthetic gradients."""
    if cfg["estimator"] not in ("tbptt", "dni"):
        raise InputError(f"unknown estimator {cfg['estimator']!r}: use tbptt or dni")
    if cfg["dni"] not in DNI_SHAPES:
        raise InputError(f"unknown DNI {cfg['dni']!r}: use {' or '.join(DNI_SHAPES)}")
    if cfg["delta"] is not None and cfg["K1"] is not None and cfg["estimator"] != "dni":
        raise InputError("--delta adapts the K of BPTT(2K, K): leave out --K1 and --K2, which fix the truncation")
    if cfg["estimator"] == "dni" and (cfg["delta"] is not None or cfg["K1"] is not None):
        raise InputError("--estimator dni trains BPTT(K, K) chunks with a fixed --K: "
                         "leave out --delta, --K1 and --K2")
    if not (isinstance(cfg["dni_discount"], numbers.Real) and 0 <= cfg["dni_discount"] <= 1):
        raise InputError(f"--dni-discount must be in [0, 1], got {cfg['dni_discount']}")
    kind = schedule.Schedule.parse(cfg["schedule"]).kind
    if cfg["alternate"] and (cfg["estimator"] != "dni" or kind != "restarts"):
        raise InputError("--alternate needs --estimator dni and the warm-restart schedule (--restart-base)")


def _check_optimizer(cfg: dict):
    """A torch.optim class whose options train here (two trial steps on a throwaway parameter)."""
    optimizer = getattr(torch.optim, str(cfg["optimizer"]), None)
    if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
        raise InputError(f"unknown optimizer {cfg['optimizer']!r}: use a torch.optim name such as SGD or Adam")
    if not isinstance(cfg["optimizer_options"], dict):
        raise InputError("--optimizer-options must be a JSON object, e.g. '{\"momentum\": 0.9}'")
    try:  # two steps on a throwaway parameter (the first may only fill buffers): options of the wrong
        probe = torch.zeros(1, requires_grad=True)  # type, or a step that needs a closure, fail here
        probe.grad = torch.zeros(1)
        trial = optimizer([probe], lr=cfg["lr"], **cfg["optimizer_options"])
        trial.step()
        trial.step()
    except Exception as err:
        raise InputError(f"--optimizer {cfg['optimizer']} with options {cfg['optimizer_options']} cannot train "
                         f"here: {type(err).__name__}: {first_line(err)}") from None


def full_config(task: str, task_config: dict, train: dict) -> dict:
    """The complete config of a run: the defaults overridden by ``train``, checked."""
    return {"task": task, "task_config": dict(task_config), "train": check({**TRAIN_DEFAULTS, **train})}


def truncation(cfg: dict, K: int) -> tuple[int, int]:
    """(K1, K2) for truncation K: explicit when given, BPTT(K, K) chunks for synthetic
    gradients, else the paper's BPTT(2K, K) (the authors' scripts' BPTT(2K - 1, K) with
    ``buffer="2K-1"``)."""
    if cfg["estimator"] == "dni":
        return K, K
    if cfg["K1"] is not None:
        return cfg["K1"], cfg["K2"]
    return (2 * K - 1 if cfg["buffer"] == "2K-1" else 2 * K), K


def first_difference(a: dict, b: dict, prefix: str = "") -> str:
    """The first key where two configs differ, as 'key: old then, new now'."""
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                return first_difference(a[key], b[key], f"{prefix}{key}.")
            return f"{prefix}{key}: {a.get(key)!r} then, {b.get(key)!r} now"
    return "none"
