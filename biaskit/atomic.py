"""Atomic writes: a crash or a full disk never leaves half a file or half a folder.

Every file biaskit and its trainers write (checkpoints, logs, audits) goes to a
temporary name beside its destination and is renamed over it only once it is
complete; a rename within one folder is atomic on POSIX file systems. Errors
from the operating system (no space, no permission) become an ``InputError``
that names the path.

Every temporary name holds the writer's process id (``.NAME.PID.tmp`` for a
file, ``.NAME.PID-XXXXXXXX.tmp``, ``.old`` or ``.probe`` for a folder), so the
leftovers of a process killed mid-write are recognised and removed by the next
writer (``remove_stale``), while a live process's are left alone.
"""
from __future__ import annotations

import os
import re
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


#: A temporary's name (see the module docstring): the destination's name, the writer's pid, the kind.
TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)(-[^.]*)?\.(tmp|old|probe)")


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (another user's, which cannot be signalled, does)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: str | Path, name: str | None = None) -> None:
    """Remove the temporaries in ``folder`` (of destination ``name`` only, if given) whose writer
    is gone, killed mid-write; a live process's temporaries are its own and stay."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return  # nothing to clean where nothing can be listed
    for entry in entries:
        match = TEMPORARY.fullmatch(entry.name)
        if not match or (name is not None and match["name"] != name) or _alive(int(match["pid"])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            pass  # another process cleaned it first, or it cannot be removed: it harms nothing


def _temporary_folder(out: Path, kind: str, parent: Path | None = None) -> Path:
    """A new folder beside ``out`` (or in ``parent``) named as a temporary of this process."""
    prefix = f".{out.name}.{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, suffix=f".{kind}", dir=parent or out.parent))


def write_text(path: str | Path, text: str, what: str = "") -> None:
    """Write ``text`` to ``path`` atomically."""
    with writing(path, what) as tmp:
        tmp.write_text(text)


def check_folder(out: str | Path, owned: set[str]) -> Path:
    """``out`` if it can become an output folder: absent, empty, or holding only files of ``owned``
    (an earlier output of the same kind, which it replaces), and neither a mount point nor the
    current folder or one above it (a folder that cannot be renamed). Checked before any work is
    done; stale temporaries of ``out`` left by killed processes are removed."""
    out = Path(out)
    mount = os.path.ismount(out)
    if mount or out.name in ("", ".", "..") or Path.cwd().resolve().is_relative_to(out.resolve()):
        where = "a mount point" if mount else "the current folder or one above it"
        raise InputError(f"--out {out} is {where}, which cannot be replaced as a whole: name a folder inside "
                         f"it, e.g. --out {out.resolve() / 'audit'}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: choose a folder")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in owned)
        if others:
            raise InputError(f"--out {out} already holds other files ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}): choose a new or empty folder")
    parent = next((p for p in out.absolute().parents if p.exists()), Path("/"))
    remove_stale(parent, out.name)
    try:  # can a folder be made beside it?
        _temporary_folder(out, "probe", parent).rmdir()
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
        stage = _temporary_folder(out, "tmp")
    except OSError as err:
        _refuse(err, out, what)
    try:
        yield stage
        if out.exists():  # an earlier output of the same kind: swap it out, then drop it
            old = _temporary_folder(out, "old")
            try:
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
