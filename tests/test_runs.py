"""Run directories: one live run per folder, a log that always matches its checkpoint, and
failures (a second run, a crash mid-rewrite, a full disk) that lose nothing."""
from __future__ import annotations

import errno
import json
import multiprocessing
import shutil
import time
from pathlib import Path

import pytest
import torch

from biaskit import checkpoint
from biaskit.errors import InputError
from trainers import config as configs
from trainers import loop, runs

TINY = {"train_tokens": 2000, "valid_tokens": 400, "test_tokens": 400, "hidden": 6}
FAST = {"batch_size": 8, "window": 16, "windows": 6, "K": 3, "K_max": 20}
TIMING = {"seconds", "tokens_per_s", "update_seconds"}


def config(epochs=2, **train):
    return configs.full_config("copy", dict(TINY), {**FAST, "epochs": epochs, **train})


def strip_timing(lines):
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted two-epoch run: what every interrupted one must end up equal to."""
    return strip_timing(loop.Run(config(), tmp_path_factory.mktemp("straight"), quiet=True).fit())


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_lives(tmp_path):
    first = loop.Run(config(), tmp_path, quiet=True)
    with pytest.raises(InputError, match=r"another run is training in .* \(process \d+\)"):
        loop.Run(config(), tmp_path, quiet=True, resume=False)
    first.dir.close()


def hold(folder: str, locked) -> None:
    """Another process's live run: take the folder, say so, and wait to be killed."""
    held = runs.RunDirectory(folder, resume=False, config={})  # noqa: F841 (held until killed)
    locked.set()
    time.sleep(60)


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path):
    forked = multiprocessing.get_context("fork")  # no second import of torch
    locked = forked.Event()
    holder = forked.Process(target=hold, args=(str(tmp_path), locked), daemon=True)
    holder.start()
    try:
        assert locked.wait(60)
        with pytest.raises(InputError, match=f"process {holder.pid}"):
            runs.RunDirectory(tmp_path, resume=False, config={})
    finally:
        holder.kill()
        holder.join()
    runs.RunDirectory(tmp_path, resume=False, config={}).close()  # a killed holder leaves no lock


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished one-epoch run, for tests to copy and damage."""
    run_dir = tmp_path_factory.mktemp("one_epoch")
    loop.Run(config(epochs=1), run_dir, quiet=True).fit()
    return run_dir


def test_resume_rewrites_a_damaged_or_missing_log_from_the_checkpoint(tmp_path, one_epoch, straight, capsys):
    for damage in ("truncate", "extra", "delete", "garbage"):
        run_dir = tmp_path / damage
        shutil.copytree(one_epoch, run_dir)
        log = run_dir / "metrics.jsonl"
        if damage == "truncate":
            log.write_text("")
        elif damage == "extra":  # a crash after the log line and before the checkpoint
            log.write_text(log.read_text() + json.dumps({"epoch": 2, "train_loss": 9.9}) + "\n")
        elif damage == "delete":
            log.unlink()
        else:
            log.write_bytes(b"\xff\xfe{not json")
        resumed = loop.Run(config(), run_dir, quiet=False, resume=True).fit()
        assert f"repaired {log}" in capsys.readouterr().err
        assert strip_timing(resumed) == straight
        assert strip_timing(runs.read_metrics(run_dir)) == straight


def test_a_crash_between_the_steps_of_the_log_rewrite_loses_nothing(tmp_path, one_epoch, straight, monkeypatch):
    """The rewrite writes a temporary file and renames it: a crash before the rename leaves the
    old log whole, and the next resume completes the job."""
    shutil.copytree(one_epoch, tmp_path, dirs_exist_ok=True)
    log = tmp_path / "metrics.jsonl"
    before = log.read_text()
    log.write_text(before + '{"epoch": 2, "stale": true}\n')  # needs a rewrite on resume
    damaged = log.read_text()

    def crash(self, target):
        raise KeyboardInterrupt("killed between writing and renaming")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            loop.Run(config(), tmp_path, quiet=True, resume=True).fit()
    assert log.read_text() == damaged  # not truncated, not half-written
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    resumed = loop.Run(config(), tmp_path, quiet=True, resume=True).fit()
    assert strip_timing(resumed) == straight


def test_a_full_disk_during_a_checkpoint_write_is_one_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                          run_cli):
    args = ["train", "copy", "--train-tokens", "3000", "--valid-tokens", "600", "--test-tokens", "600",
            "--hidden", "6", "--batch-size", "8", "--window", "16", "--windows", "6", "--K", "3", "--quiet"]
    assert run_cli(*args, "--epochs", "1", "--out", tmp_path).code == 0
    saved = (tmp_path / "checkpoint-last.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if str(f).endswith(".tmp"):
            real_save(obj, f, *a, **k)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    res = run_cli(*args, "--epochs", "2", "--resume", tmp_path)
    assert res.code == 2 and "No space left on device" in res.err and len(res.err.strip().splitlines()) == 1
    assert (tmp_path / "checkpoint-last.pt").read_bytes() == saved
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert checkpoint.load(tmp_path / "checkpoint-last.pt")["trainer"]["epoch"] == 1


def test_an_infinite_limit_is_logged_as_inf_not_as_missing(tmp_path):
    """JSON has no infinity: an infinite upper limit (no K certified) is the string "inf", read back as
    a float; only NaN (not measured) is null. The log then matches its checkpoint's lines on resume."""
    line = {"epoch": 1, "rel_bias_exact": 0.1, "rel_bias_exact_upper": float("inf"), "low": float("-inf"),
            "valid_loss": float("nan")}
    folder = runs.RunDirectory(tmp_path, resume=False, config={})
    folder.append(line)
    logged = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert logged == {"epoch": 1, "rel_bias_exact": 0.1, "rel_bias_exact_upper": "inf", "low": "-inf",
                      "valid_loss": None}
    kept = runs.clean(line)
    assert runs.read_metrics(tmp_path) == [kept] and kept["rel_bias_exact_upper"] == float("inf")
    assert folder.restore([kept]) is None  # no "repaired" note: the log says what the checkpoint says
    folder.close()
