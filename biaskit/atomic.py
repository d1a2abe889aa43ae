"""Atomic writes: a crash or a full disk never leaves half a file or half a folder.

Every file biaskit and its trainers write (checkpoints, logs, audits) goes to a
temporary name beside its destination and is renamed over it only once it is
complete; a rename within one folder is atomic on POSIX file systems. Errors
from the operating system (no space, no permission) become an ``InputError``
that names the path.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InputError


def _refuse(err: OSError, path: Path, what: str):
    reason = err.strerror or str(err)
    raise InputError(f"cannot write {what} {path}: {reason}; free some space or choose another folder") from None


@contextmanager
def writing(path: str | Path, what: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write; it replaces ``path`` when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        _refuse(err, path, what or "the file")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str, what: str = "") -> None:
    """Write ``text`` to ``path`` atomically."""
    with writing(path, what) as tmp:
        tmp.write_text(text)


def check_folder(out: str | Path, owned: set[str]) -> Path:
    """``out`` if it can become an output folder: absent, empty, or holding only files of ``owned``
    (an earlier output of the same kind, which it replaces). Checked before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: choose a folder")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in owned)
        if others:
            raise InputError(f"--out {out} already holds other files ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}): choose a new or empty folder")
    parent = next((p for p in out.absolute().parents if p.exists()), Path("/"))
    try:  # can a folder be made beside it?
        Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)).rmdir()
    except OSError as err:
        _refuse(err, out, "the output folder")
    return out


@contextmanager
def staged_folder(out: str | Path, owned: set[str], what: str = "the output folder") -> Iterator[Path]:
    """A temporary folder beside ``out`` to fill; it becomes ``out`` when the block succeeds.

    ``out`` is checked first (``check_folder``) and the temporary folder made at
    once, so an unwritable place fails before the work. On any error the
    temporary folder is removed and ``out`` is left as it was.
    """
    out = check_folder(out, owned)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        _refuse(err, out, what)
    try:
        yield stage
        if out.exists():  # an earlier output of the same kind: swap it out, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            try:
                os.replace(stage, out)
            except OSError:
                os.replace(old / out.name, out)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    except OSError as err:
        shutil.rmtree(stage, ignore_errors=True)
        _refuse(err, out, what)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
