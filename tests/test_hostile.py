"""Hostile files and sizes: each bad input below is refused with one line and exit 2, before any
work is done, writes nothing and leaves nothing behind (no lock, no staging folder, no temporary).
Sizes are refused from estimates, so no test allocates what it refuses."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch

from biaskit import InputError, checkpoint, limits
from trainers import config as configs
from trainers import runs
from trainers.tasks import copy

TASK = {"train_tokens": 3000, "valid_tokens": 600, "test_tokens": 600, "hidden": 6}
FAST = ["--windows", "4", "--window-length", "12"]
TINY = ["--train-tokens", "2000", "--valid-tokens", "400", "--test-tokens", "400", "--hidden", "8",
        "--batch-size", "8", "--window", "20", "--windows", "8", "--quiet"]


def refused(res, message: str):
    """Exit 2, one line on stderr, naming ``message``."""
    assert res.code == 2, res.err
    assert len(res.err.strip().splitlines()) == 1, res.err
    assert message in res.err, res.err


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def plant(path, **fields):
    torch.save({"format": checkpoint.FORMAT, "version": 2, "K": 3, **fields}, path)
    return path


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def small_memory(monkeypatch):
    """This process may use 32 MiB: sizes that take more are refused."""
    monkeypatch.setattr(limits, "available_memory", lambda device="cpu": 32 * 2**20)


# --- 1. no entry point from the current folder -------------------------------------------------

def dist_info(folder, name: str, entry_points: str):
    info = folder / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """The current folder holds a distribution registering a task and DNI shapes (``neuron`` too),
    whose module leaves a marker when imported."""
    marker = tmp_path / "marker"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef build(config):\n    pass\n")
    dist_info(tmp_path, "planted", "[biaskit.tasks]\nplanted = evilmod:build\n"
                                   "[biaskit.dni]\nneuron = evilmod:build\nplanted = evilmod:build\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # --factory appends the folder: undone after the test
    return marker


PLANTED_DNI = {"task": "copy", "task_config": TASK, "dni": {"shape": "planted", "config": {}, "state": {}}}


@pytest.mark.parametrize("fields, factory", [
    ({"task": "planted", "task_config": {}}, []),
    (PLANTED_DNI, []),
    (PLANTED_DNI, ["--factory", "trainers.tasks.copy:build"]),  # the folder joins sys.path for the factory
])
def test_a_planted_entry_point_in_the_current_folder_is_never_read(run_cli, tmp_path, planted, fields, factory):
    path = plant(tmp_path / "c.pt", model=copy.build(TASK).model.state_dict(), **fields)
    refused(run_cli("analyze", path, *factory, *FAST, "--out", "audit"), "not registered")
    assert not planted.exists() and not (tmp_path / "audit").exists()


def test_a_registered_name_resolves_to_the_installed_one_with_the_folder_on_the_path(planted, monkeypatch):
    monkeypatch.syspath_prepend(os.getcwd())
    from trainers.dni import neuron
    assert checkpoint.load_registered(checkpoint.DNI_SHAPES, "neuron") is neuron
    assert "planted" not in checkpoint.registered(checkpoint.TASKS)
    assert not planted.exists()


def test_a_name_two_distributions_register_is_refused(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    for name in ("one", "two"):
        dist_info(site, name, f"[biaskit.dni]\ntwin = {name}:build\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(InputError, match=r"'twin' is registered more than once \(.*one:build by one"):
        checkpoint.load_registered(checkpoint.DNI_SHAPES, "twin")
    assert "twin" not in checkpoint.registered(checkpoint.DNI_SHAPES)


# --- 2. sizes checked before anything is built -------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["copy", "--hidden", "100000"], "the copy task needs about"),
    (["copy", "--m", "1000000000"], "longer than the largest split"),
    (["copy", "--train-tokens", "10000000000"], "the copy task needs about"),
    (["point-process", "--events", "1000000000000"], "the point-process task needs about"),
    # 3. nonsense the trainer used to accept, or fail on with a raw error
    (["copy", "--variable", "--m-min", "10", "--m-max", "5"], "need 1 <= m_min <= m_max"),
    (["copy", "--K", "1000000"], "--K 1000000 is past the controller's --window of 100 steps"),
    (["copy", "--device", "cpu:5"], "there is one cpu device"),
    # 4. non-finite option values, refused as they are parsed
    (["copy", "--optimizer-options", '{"momentum": NaN}'], "NaN is not a finite number"),
    (["copy", "--optimizer-options", '{"momentum": 1e400}'], "1e400 is not a finite number"),
])
def test_train_refuses_before_building_and_writes_nothing(run_cli, tmp_path, args, message):
    refused(run_cli("train", *args, "--out", tmp_path / "run", "--quiet"), message)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("task, config", [("copy", {"layers": 10**6}), ("copy", {"train_tokens": 10**12}),
                                          ("point-process", {"events": 10**12})])
def test_a_checkpoint_with_huge_sizes_is_refused_before_building(run_cli, tmp_path, task, config):
    path = plant(tmp_path / "c.pt", task=task, task_config=config, model={})
    refused(run_cli("analyze", path, *FAST, "--out", tmp_path / "audit"), f"the {task} task needs about")
    assert listing(tmp_path) == ["c.pt"]


def test_a_checkpoint_with_a_compressed_entry_is_refused_unread(run_cli, tmp_path):
    """torch.save stores its entries; a deflated one (a small file unpacking to gigabytes) is a zip bomb."""
    honest = plant(tmp_path / "honest.pt", task="copy", task_config=TASK, model={})
    with zipfile.ZipFile(honest) as src, zipfile.ZipFile(tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry))
        dst.writestr("honest/data/99", bytes(2**20))  # 1 MiB of zeros packs to 1 kB
    honest.unlink()
    refused(run_cli("analyze", tmp_path / "bomb.pt", *FAST, "--out", tmp_path / "audit"), "compressed entry")
    assert listing(tmp_path) == ["bomb.pt"]


def test_a_checkpoint_larger_than_the_memory_is_refused_unread(run_cli, tmp_path, small_memory):
    path = plant(tmp_path / "big.pt", task="copy", task_config=TASK, model={}, trainer={"x": torch.zeros(2**24)})
    refused(run_cli("analyze", path, *FAST, "--out", tmp_path / "audit"), "loading")
    assert listing(tmp_path) == ["big.pt"]


def test_a_large_vocabulary_is_refused_before_the_model_is_built(run_cli, tmp_path, small_memory):
    text = tmp_path / "words.txt"
    text.write_text("".join(f"w{i} w{i + 1} w{i + 2}\n" for i in range(0, 30000, 3)))
    refused(run_cli("train", "language", "--text", text, "--out", tmp_path / "run", "--quiet"),
            "the vocabulary has 27,")
    assert listing(tmp_path) == ["words.txt"]


def test_a_pickle_repeating_one_sequence_is_counted_before_it_is_converted(run_cli, tmp_path, small_memory):
    folder = tmp_path / "data"
    folder.mkdir()
    sequence = [{"time_since_start": float(i), "type_event": 0} for i in range(10)]
    for key in ("train", "dev", "test"):
        (folder / f"{key}.pkl").write_bytes(pickle.dumps({key: [sequence] * 100_000, "dim_process": 1}))
    refused(run_cli("train", "point-process", "--data", folder, "--out", tmp_path / "run", "--quiet"),
            "hold 3,000,000 events in all")
    assert listing(tmp_path) == ["data"]


def test_a_data_pickle_larger_than_the_memory_is_refused_unread(run_cli, tmp_path, small_memory):
    folder = tmp_path / "data"
    folder.mkdir()
    for key in ("train", "dev", "test"):
        (folder / f"{key}.pkl").write_bytes(bytes(3 * 2**20))  # not even a pickle: its size alone refuses it
    refused(run_cli("train", "point-process", "--data", folder, "--out", tmp_path / "run", "--quiet"),
            f"reading {folder / 'train.pkl'} needs about")
    assert listing(tmp_path) == ["data"]


@pytest.mark.parametrize("args, message", [
    (["--hidden", "100", "--K1", "250", "--K2", "1"], "a training step of BPTT(250, 1) over 8 streams needs about"),
    ([], "a controller update of 8 windows of 20 steps needs about"),
])
def test_a_training_step_or_update_larger_than_the_memory_is_refused_before_training(run_cli, tmp_path, small_memory,
                                                                                     args, message):
    refused(run_cli("train", "copy", *TINY, *args, "--out", tmp_path / "run"), message)
    assert listing(tmp_path) == []


def test_the_memory_figure_honours_ulimit_v(monkeypatch):
    monkeypatch.setattr(limits.resource, "getrlimit", lambda what: (2**40 + 2**30, limits.resource.RLIM_INFINITY))
    monkeypatch.setattr(limits, "_meminfo", lambda: 2**50)
    monkeypatch.setattr(limits, "_cgroup_headroom", lambda: None)
    assert limits.available_memory() <= 2**40 + 2**30  # what is mapped already counts against it


# --- 3. resuming a finished run ---------------------------------------------------------------

def test_resuming_a_finished_run_says_so(run_cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = configs.full_config("copy", TASK, {})
    checkpoint.save(run / runs.LAST, task="copy", task_config=TASK, model={}, trainer={"epoch": 6, "config": config})
    before = listing(run)
    refused(run_cli("train", "copy", "--resume", run, "--epochs", "2", "--quiet"), "has trained 6 epoch(s)")
    assert listing(run) == before


def test_resume_reads_the_checkpoint_once_to_check_and_once_under_the_runs_lock(run_cli, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert run_cli("train", "copy", *TINY, "--epochs", "1", "--out", run).code == 0
    reads, load = [], checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda path, *args, **kwargs: reads.append(path) or load(path, *args,
                                                                                                      **kwargs))
    res = run_cli("train", "copy", "--resume", run, "--epochs", "2", "--quiet")
    assert res.code == 0, res.err
    assert reads == [run / runs.LAST] * 2


# --- 4. nothing left behind --------------------------------------------------------------------

@pytest.mark.parametrize("out", ["run", ""])
def test_a_refused_run_folder_gets_no_lock(run_cli, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine\n")
    refused(run_cli("train", "copy", *TINY, "--out", out), "not a run directory and not empty")
    assert listing(tmp_path) == ["run"] and listing(tmp_path / "run") == ["notes.txt"]


def test_a_run_removes_the_temporaries_of_killed_runs_only(tmp_path):
    dead, live = f".checkpoint-last.pt.{dead_pid()}.tmp", f".checkpoint-last.pt.{os.getpid()}.tmp"
    for name in (dead, live):
        (tmp_path / name).write_bytes(b"")
    runs.RunDirectory(tmp_path, resume=False, config={}).close()
    assert not (tmp_path / dead).exists() and (tmp_path / live).exists()


def test_analyze_removes_the_staging_of_a_killed_audit_only(run_cli, tmp_path):
    dead, live, other = (f".audit.{dead_pid()}-abc123de.tmp", f".audit.{os.getpid()}-abc123de.tmp",
                         f".figures.{dead_pid()}-abc123de.tmp")
    for name in (dead, live, other):
        (tmp_path / name).mkdir()
        (tmp_path / name / "audit.nc").write_bytes(b"CDF")
    refused(run_cli("analyze", tmp_path / "missing.pt", *FAST, "--out", tmp_path / "audit"), "no checkpoint at")
    assert listing(tmp_path) == sorted([live, other])


# --- 5. output folders that cannot be replaced ---------------------------------------------

@pytest.mark.parametrize("out, message", [(".", "the current folder"), ("", "the current folder"),
                                          ("..", "the current folder or one above it"), ("/", "a mount point")])
def test_analyze_refuses_an_out_it_cannot_replace_before_any_work(run_cli, tmp_path, monkeypatch, out, message):
    monkeypatch.chdir(tmp_path)
    refused(run_cli("analyze", tmp_path / "missing.pt", "--out", out), message)
    assert listing(tmp_path) == []


# --- 6. a full disk while the audit is written --------------------------------------------------

def test_a_netcdf_error_while_writing_the_audit_is_one_line(run_cli, tmp_path, monkeypatch):
    import xarray as xr

    def full(self, *args, **kwargs):
        raise RuntimeError("NetCDF: HDF error")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", full)
    path = plant(tmp_path / "c.pt", task="copy", task_config=TASK, model=copy.build(TASK).model.state_dict())
    refused(run_cli("analyze", path, *FAST, "--out", tmp_path / "audit"), "NetCDF: HDF error")
    assert listing(tmp_path) == ["c.pt"]


# --- 7. quiet loaders that echo nothing of a file ------------------------------------------------

def test_a_protocol_4_pickle_is_refused_without_torch_s_warning(tmp_path):
    path = tmp_path / "p4.pt"
    path.write_bytes(pickle.dumps({"format": checkpoint.FORMAT}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match="is not a torch checkpoint"):
            checkpoint.load(path)
    assert caught == []


def test_an_error_names_a_data_file_without_echoing_it(run_cli, tmp_path):
    secret = tmp_path / "passwd.csv"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    path = plant(tmp_path / "c.pt", task="point-process", task_config={"data": str(secret)}, model={})
    res = run_cli("analyze", path, *FAST, "--out", tmp_path / "audit")
    refused(res, f"{secret} needs a header with the columns sequence, time, mark")
    assert "root" not in res.err.replace(str(tmp_path), "")
