"""The checkpoint layout and its safe loading: a file is data, never code.

A checkpoint is a ``torch.save``d dict of plain data:

========== =============================================================
format     ``"biaskit-checkpoint"``; ``version`` 2
task       the *registered name* of the task that rebuilds model and data
task_config its config (a dict of plain values)
model      the model's state dict
K          the truncation the model trained with (None if not known)
K_history  the truncation's updates, a list of dicts
dni        optional: ``{"shape": registered name, "config": {...}, "state": state dict}``
trainer    the trainer's own state (optimizer, RNG, epoch, metrics); biaskit never reads it
========== =============================================================

Tasks are found by name in the ``biaskit.tasks`` entry-point group, DNI shapes
in ``biaskit.dni`` (a package registers its own in its ``pyproject.toml``), so
``biaskit analyze`` needs no task code and never imports or calls code because
a file names it. Names are looked up among installed distributions only: a
``*.dist-info`` in the current folder is never read, and a name registered
twice is refused. Code the user names on the command line (``--factory``,
``--data``) is trusted: the same rule as ``trust_remote_code`` in the Hugging
Face libraries. Weights load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import errno
import importlib
import math
import os
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, distributions
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import atomic, limits
from .bands import LOSS_AT
from .errors import InputError, first_line
from .probe import check_model

FORMAT = "biaskit-checkpoint"
VERSION = 2
TASKS = "biaskit.tasks"
DNI_SHAPES = "biaskit.dni"


def _installed_path() -> list[str]:
    """``sys.path`` without the current folder: where installed distributions live. A planted
    ``*.dist-info/entry_points.txt`` in the user's folder is never read."""
    here = os.path.realpath(os.getcwd())
    return [p for p in sys.path if os.path.realpath(p or ".") != here]


def _registrations(group: str) -> dict[str, list[EntryPoint]]:
    """Every registration of each name in ``group`` by an installed distribution (one copy of
    each distribution: the first on the path, as ``importlib.metadata.entry_points`` takes)."""
    found: dict[str, list[EntryPoint]] = {}
    seen = set()
    for dist in distributions(path=_installed_path()):
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        if key in seen:
            continue
        seen.add(key)
        for ep in dist.entry_points.select(group=group):
            found.setdefault(ep.name, []).append(ep)
    return found


def registered(group: str) -> dict[str, EntryPoint]:
    """The names installed distributions register in an entry-point group, e.g.
    ``registered("biaskit.tasks")``; a name registered more than once is left out (it is ambiguous)."""
    return {name: eps[0] for name, eps in _registrations(group).items() if len(eps) == 1}


def _registered(group: str, named: str) -> EntryPoint:
    """The entry point ``named`` stands for: its own, or (checkpoints of version 1) the one whose
    value is exactly the import path it holds. Anything else is refused, and so is a name that
    two distributions register."""
    what = "task" if group == TASKS else "DNI shape"
    registrations = _registrations(group)
    for name, eps in registrations.items():
        if len(eps) > 1 and (name == named or any(ep.value == named for ep in eps)):
            raise InputError(f"the {what} {name!r} is registered more than once ("
                             + ", ".join(f"{ep.value} by {ep.dist.name if ep.dist else '?'}" for ep in eps)
                             + f"), so biaskit cannot tell which to run: uninstall all but one (entry-point "
                               f"group {group})")
    found = {name: eps[0] for name, eps in registrations.items()}
    by_path = {ep.value: ep for ep in found.values()}
    if named in found or named in by_path:
        return found.get(named) or by_path[named]
    advice = ("if you trust that code, pass --factory package.module:function" if group == TASKS else
              "install the package that registers it (entry-point group biaskit.dni)")
    raise InputError(f"the checkpoint names {what} {named!r}, which is not registered (known: "
                     f"{', '.join(sorted(found)) or 'none'}): biaskit runs no code a file names; {advice}")


def load_registered(group: str, name: str) -> Callable:
    """The factory registered under ``name`` in ``group`` by an installed distribution."""
    return _registered(group, name).load()


def save(path: str | Path, *, task: str, task_config: dict, model: dict, K: int | None = None,
         K_history: list | None = None, dni: dict | None = None, trainer: dict | None = None) -> Path:
    """Write a checkpoint atomically: a crash or a full disk never leaves half a file."""
    path = Path(path)
    fields = {"format": FORMAT, "version": VERSION, "task": task, "task_config": task_config, "model": model,
              "K": K, "K_history": K_history or [], "dni": dni, "trainer": trainer or {}}
    with atomic.writing(path, "the checkpoint") as tmp:
        try:
            torch.save(fields, tmp)
        except RuntimeError as err:  # torch reports a failed write (a full disk, say) this way
            raise OSError(errno.EIO, first_line(err)) from None
    return path


def _unpacked_size(path: Path) -> int:
    """The bytes ``torch.load`` unpacks from ``path``. torch.save stores its entries uncompressed,
    so a compressed entry (a small file unpacking to gigabytes) is refused."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return path.stat().st_size  # the legacy format, or not torch's: the file is what unpickles
    packed = max((e for e in entries if e.compress_type != zipfile.ZIP_STORED), key=lambda e: e.file_size,
                 default=None)
    if packed is not None:
        raise InputError(f"{path} holds a compressed entry ({packed.filename}: {packed.compress_size:,} bytes "
                         f"unpacking to {packed.file_size:,}), which torch.save never writes: refused as a "
                         "possible zip bomb; save the checkpoint again with torch.save")
    return sum(e.file_size for e in entries)


def _read(path: Path, what: str, map_location: str | torch.device = "cpu"):
    """``torch.load`` of a file that must hold plain data only, its unpacked size checked first."""
    limits.require({"its contents": _unpacked_size(path)}, f"loading {path}",
                   "the file is larger than this machine can load", "cpu")
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols; the error says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many kinds for a file that is not its own
        raise InputError(f"{path} is not {what} ({type(err).__name__})") from None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint's dict (weights only: no pickled code can run)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no checkpoint at {path}")
    ckpt = _read(path, "a torch checkpoint, or holds more than plain data", map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(f"{path} is a torch file but not a biaskit checkpoint; for a plain state dict "
                         "pass --factory and --data")
    if ckpt.get("version") == 1:  # the first layout: "factory" held an import path, the config its task
        config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        ckpt = {**ckpt, "task": ckpt.get("factory"), "task_config": config.get("task")}
        if isinstance(ckpt.get("dni"), dict):  # its config's kind is the registered shape's name
            ckpt["dni"] = {**ckpt["dni"], "shape": (ckpt["dni"].get("config") or {}).get("kind")}
    for key, kind in (("task", str), ("model", dict)):
        _field(ckpt, key, kind, path)
    return ckpt


def _field(ckpt: dict, key: str, kind: type, path: Path):
    if not isinstance(ckpt.get(key), kind):
        raise InputError(f"{path} is damaged: its {key!r} field is missing or not a {kind.__name__}")
    return ckpt[key]


def resolve(spec: str) -> Callable:
    """The callable the user named as ``"package.module:function"`` (a module in the current
    folder imports too, as with ``python -m``). Only for code named on the command line."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"{spec!r} must look like 'package.module:function'")
    if module_name.startswith("."):
        raise InputError(f"{spec!r}: name the module absolutely, e.g. 'package.module:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # last: a file in this folder never shadows an installed module
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module: its own error, in one line
        raise InputError(f"module {module_name!r} does not import: {type(err).__name__}: {first_line(err)}") \
            from None
    target = getattr(module, attr, None)
    if target is None:
        raise InputError(f"module {module_name!r} has no {attr!r} (from {spec!r})")
    if not callable(target):
        raise InputError(f"{spec} is a {type(target).__name__}, not a function")
    return target


@dataclass
class Rebuilt:
    """A model rebuilt for an audit: the model, its data streams (time first), the K it trained
    with and the DNI it trained beside (None for each when the file does not say)."""

    model: nn.Module
    streams: tuple[torch.Tensor, torch.Tensor] | None
    K: int | None = None
    dni: nn.Module | None = None
    #: The run's controller settings found in the file (``windows``, ``window_length``, ``groups``,
    #: ``level``), so an audit asks what the run's updates asked; only those present and well typed.
    controller: dict = field(default_factory=dict)


#: Where a trainer's checkpoint keeps its controller's settings: {Rebuilt.controller key: (config key, type)}.
CONTROLLER_SETTINGS = {"windows": ("windows", int), "window_length": ("window", int), "groups": ("groups", int),
                       "level": ("level", float), "loss_at": ("loss_at", str)}


def _controller(ckpt: dict) -> dict:
    """The controller settings of a trainer's checkpoint (``trainer.config.train``), read as data."""
    trainer = ckpt.get("trainer")
    config = trainer.get("config") if isinstance(trainer, dict) else None
    train = config.get("train") if isinstance(config, dict) else None
    if not isinstance(train, dict):
        return {}
    found = {}
    for name, (key, kind) in CONTROLLER_SETTINGS.items():
        value = train.get(key)
        if kind is str:
            if value in LOSS_AT:
                found[name] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
                (kind is float or value == int(value)):
            found[name] = kind(value)
    return found


def call_factory(factory: Callable, what: str, *args) -> Any:
    """``factory(*args)``, any failure but an InputError turned into one: "<what> failed: <error>"."""
    try:
        return factory(*args)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{what} failed: {type(err).__name__}: {first_line(err)}") from None


def _streams(value, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(torch.is_tensor(v) for v in value)):
        raise InputError(f"{what} must return (inputs, targets), two tensors with time first; "
                         f"got {type(value).__name__}")
    inputs, targets = value
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise InputError(f"{what} returned inputs of shape {tuple(inputs.shape)} and targets of shape "
                         f"{tuple(targets.shape)}: both need the same number of steps first")
    return inputs, targets


def _load_weights(model: nn.Module, state, path: Path):
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as err:
        raise InputError(f"the weights in {path} do not fit the model: {first_line(err)}") from None


def _dni(entry, path: Path, device) -> nn.Module | None:
    if not entry:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("shape"), str):
        raise InputError(f"{path} is damaged: its 'dni' field names no DNI shape")
    module = call_factory(load_registered(DNI_SHAPES, entry["shape"]), f"the DNI shape {entry['shape']!r}",
                   entry.get("config") or {})
    if not isinstance(module, nn.Module):
        raise InputError(f"the DNI shape {entry['shape']!r} did not build a torch module")
    _load_weights(module, entry.get("state"), path)
    return module.to(device).eval()


def rebuild(path: str | Path, factory: str | None = None, data: str | None = None,
            device: str | torch.device = "cpu") -> Rebuilt:
    """The model, its data, K and DNI of a checkpoint (loaded once), for ``biaskit analyze``.

    A biaskit checkpoint rebuilds its task by registered name (or with ``factory``,
    code the user trusts, called with the task config) and takes the training
    split as data. A plain ``torch.save``d state dict needs ``factory``, called
    with no arguments, and ``data``. ``data`` names a callable returning
    (inputs, targets) streams, time first; it replaces the task's data.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no checkpoint at {path}")
    try:
        ckpt = load(path)
    except InputError:
        if factory is None:
            raise
        ckpt = None
    if ckpt is not None:
        entry = None if factory is not None else _registered(TASKS, ckpt["task"])
        name = ckpt["task"] if entry is None else entry.name
        build = resolve(factory) if entry is None else entry.load()
        task = call_factory(build, f"the factory {factory}" if factory else f"the task {name!r}",
                     _field(ckpt, "task_config", dict, path))
        model, splits = getattr(task, "model", None), getattr(task, "splits", None)
        if not isinstance(splits, dict) or "train" not in splits:
            raise InputError(f"the task {name!r} built no training split (a task has .model and .splits['train'])")
        streams = _streams(splits["train"], f"the task {name!r}'s training split")
        state, K, dni_entry, controller = ckpt["model"], ckpt.get("K"), ckpt.get("dni"), _controller(ckpt)
    else:
        model, streams, K, dni_entry = call_factory(resolve(factory), f"the factory {factory}"), None, None, None
        controller = {}
        state = _read(path, "a torch state dict")
    check_model(model)
    _load_weights(model, state, path)
    if data is not None:
        streams = _streams(call_factory(resolve(data), f"the data function {data}"), f"the data function {data}")
    if streams is None:
        raise InputError("this file holds no data: pass --data package.module:function returning (inputs, targets)")
    dni = _dni(dni_entry, path, device)  # an unregistered DNI shape is refused first
    if K is not None and (isinstance(K, bool) or not isinstance(K, int) or K < (1 if dni else 0)):
        raise InputError(f"{path} is damaged: its K is {K!r}, not a whole number >= {1 if dni else 0}")
    if dni is not None and K is None:
        raise InputError(f"{path} is damaged: it holds a DNI but no K (the chunk length it trained with)")
    return Rebuilt(model.to(device), streams, K, dni, controller)
