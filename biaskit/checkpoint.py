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
