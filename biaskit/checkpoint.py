"""The self-describing checkpoint: enough to rebuild model and data without task code.

A checkpoint is a ``torch.save``d dict holding the import path of the factory
that rebuilds its task (``"trainers.tasks.copy:build"``), the config it was
called with, the model's and optimizer's state, RNG states and the history of
the truncation length K.  ``biaskit analyze`` calls the factory by name, so it
needs no task-specific code.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

FORMAT = "biaskit-checkpoint"
VERSION = 1


def save(path, *, factory: str, config: dict, model: dict, **fields: Any) -> Path:
    """Write a checkpoint atomically (a crash never leaves half a file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": FORMAT, "version": VERSION, "factory": factory, "config": config,
                "model": model, **fields}, tmp)
    tmp.replace(path)
    return path


def load(path, map_location="cpu") -> dict:
    """Read a checkpoint, with a clear error for a missing file or another kind of file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many kinds for a file that is not its own
        raise InputError(f"{path} is not a torch checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(f"{path} is a torch file but not a biaskit checkpoint (no factory); pass --factory")
    return ckpt


def resolve(factory: str):
    """The callable named by ``"package.module:function"``."""
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise InputError(f"factory {factory!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"factory module {module_name!r} does not import: {err}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise InputError(f"module {module_name!r} has no {attr!r} (from factory {factory!r})") from None


def rebuild_dni(path, device="cpu"):
    """The DNI a synthetic-gradient run trained beside its model, or None (also for plain state dicts)."""
    try:
        entry = load(path).get("dni")
    except InputError:
        return None
    if not entry:
        return None
    module = resolve(entry["factory"])(entry["config"])
    module.load_state_dict(entry["state"])
    return module.to(device).eval()


def rebuild(path, factory: str | None = None, data: str | None = None, device="cpu"):
    """The model, its data streams and its own K, for ``biaskit analyze``.

    A biaskit checkpoint rebuilds its task through the factory it names (or
    ``factory``, which overrides it) and takes the training split as data. A
    plain ``torch.save``d state dict needs ``factory``: a callable with no
    arguments returning the model. The model must have ``system()`` (the
    recurrence as biaskit sees it) and ``model(x, state) -> (outputs, state)``
    for the burn-in. ``data`` names a callable returning (inputs, targets)
    streams, time first; it is required when the checkpoint has no task.
    Returns (model, (inputs, targets), K or None).
    """
    path = Path(path)
    try:
        ckpt = load(path)
    except InputError:
        if factory is None or not path.is_file():
            raise
        ckpt = None
    if ckpt is not None:
        task = resolve(factory or ckpt["factory"])(ckpt["config"]["task"])
        model, state, K = task.model, ckpt["model"], ckpt.get("K")
        streams = task.splits["train"]
    else:
        model, K, streams = resolve(factory)(), None, None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise InputError(f"{path} is not a torch state dict ({type(err).__name__})") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0]
        raise InputError(f"the weights in {path} do not fit the factory's model: {first}") from None
    if not callable(getattr(model, "system", None)):
        raise InputError(f"{type(model).__name__} has no system() method: see 'Auditing your own RNN' in the README")
    if data is not None:
        streams = resolve(data)()
    if streams is None:
        raise InputError("this file holds no data: pass --data package.module:function returning (inputs, targets)")
    return model.to(device), streams, K
