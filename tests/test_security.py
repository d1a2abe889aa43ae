"""A checkpoint is data: nothing in a file makes biaskit import or run code; what the user names
on the command line is trusted. Each planted file below is refused with one line and exit 2,
and the marker file its code would create never appears."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from biaskit import checkpoint
from trainers import cli as train_cli
from trainers import config as configs
from trainers.ddp import Ranks
from trainers.tasks import copy

TASK = {"train_tokens": 3000, "valid_tokens": 600, "test_tokens": 600, "hidden": 6}
FAST = ["--windows", "4", "--window-length", "12"]


@pytest.fixture
def honest(tmp_path):
    """A copy-task model's weights and task config, as an honest checkpoint holds them."""
    return copy.build(TASK).model.state_dict()


def plant(path, **fields):
    torch.save({"format": checkpoint.FORMAT, **fields}, path)
    return path


def payloads(tmp_path, honest):
    marker = tmp_path / "marker"
    touch = f"touch {marker}"
    evil_module = tmp_path / "evilmod.py"
    evil_module.write_text(f"open({str(marker)!r}, 'w').close()\ndef build(config):\n    raise SystemExit\n")
    v2 = {"version": 2, "model": honest, "K": 3, "K_history": [], "trainer": {}}
    return marker, {
        "os.system, first layout": {"version": 1, "factory": "os:system", "config": {"task": touch}, "model": honest},
        "os.system, current layout": {**v2, "task": "os:system", "task_config": {"cmd": touch}},
        "eval around a real factory": {
            "version": 1, "factory": "builtins:eval", "model": honest,
            "config": {"task": f"(__import__('pathlib').Path({str(marker)!r}).touch(), "
                               f"__import__('trainers.tasks.copy', fromlist=['x']).build({TASK!r}))[1]"}},
        "a module whose import has a side effect": {**v2, "task": "evilmod:build", "task_config": {}},
        "a planted DNI entry": {**v2, "task": "copy", "task_config": TASK,
                                "dni": {"shape": "os:system", "config": {"cmd": touch}, "state": {}}},
        "a planted DNI entry, first layout": {
            "version": 1, "factory": "trainers.tasks.copy:build", "config": {"task": TASK}, "model": honest,
            "dni": {"factory": "os:system", "config": {"kind": "builtins:exec"}, "state": {}}},
    }


@pytest.mark.parametrize("case", ["os.system, first layout", "os.system, current layout",
                                  "eval around a real factory", "a module whose import has a side effect",
                                  "a planted DNI entry", "a planted DNI entry, first layout"])
@pytest.mark.parametrize("with_factory", [False, True])
def test_planted_checkpoints_are_refused_and_run_nothing(run_cli, tmp_path, honest, monkeypatch, case,
                                                         with_factory):
    monkeypatch.chdir(tmp_path)  # evilmod.py is importable from here, as a user's own module would be
    marker, cases = payloads(tmp_path, honest)
    path = plant(tmp_path / "planted.pt", **cases[case])
    factory = ["--factory", "trainers.tasks.copy:build"] if with_factory else []
    res = run_cli("analyze", path, *factory, *FAST, "--out", tmp_path / "audit")
    if with_factory and "DNI" not in case:  # the user's word replaces what the file names ...
        assert res.code == 0 or len(res.err.strip().splitlines()) == 1, res.err  # ... whether its config fits or not
    else:
        assert res.code == 2, res.err
        assert len(res.err.strip().splitlines()) == 1
        assert "not registered" in res.err and "runs no code a file names" in res.err
        assert not (tmp_path / "audit").exists()
    assert not marker.exists()


def test_an_honest_checkpoint_of_the_first_layout_still_audits(run_cli, tmp_path, honest):
    path = plant(tmp_path / "old.pt", version=1, factory="trainers.tasks.copy:build", config={"task": TASK},
                 model=honest, K=3)
    res = run_cli("analyze", path, *FAST, "--out", tmp_path / "audit", "--format", "json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["K"] == 3


@pytest.mark.parametrize("fields, message", [
    ({"version": 2, "task_config": {}, "model": {}}, "its 'task' field is missing"),
    ({"version": 2, "task": "copy", "model": {}}, "its 'task_config' field is missing"),
    ({"version": 2, "task": "copy", "task_config": TASK, "model": {"lstm.weight_ih_l0": torch.zeros(1)}},
     "do not fit the model"),
    ({"version": 2, "task": "copy", "task_config": TASK, "model": None}, "its 'model' field is missing"),
    ({"version": 2, "task": "copy", "task_config": {"hidden": -3}}, "the task 'copy' failed"),
])
def test_damaged_checkpoints_are_one_line(run_cli, tmp_path, fields, message):
    path = plant(tmp_path / "damaged.pt", **({"model": {}} | fields))
    res = run_cli("analyze", path, *FAST, "--out", tmp_path / "audit")
    assert res.code == 2 and message in res.err and len(res.err.strip().splitlines()) == 1, res.err


FACTORIES = '''
import torch
from trainers.tasks.token_model import TokenLSTM
NOT_CALLABLE = 3
def number():
    return 7
def broken():
    raise KeyError("vocab")
def model():
    torch.manual_seed(0)
    return TokenLSTM(5, 3, 4, 1)
def one_tensor():
    return torch.zeros(10)
def ragged():
    return torch.zeros(10), torch.zeros(9)
def unknown_tokens():
    return torch.full((300,), 9), torch.zeros(300, dtype=torch.long)
'''


@pytest.mark.parametrize("factory, data, message", [
    ("mine:NOT_CALLABLE", "mine:ragged", "is a int, not a function"),
    ("mine:number", "mine:ragged", "int has no system()"),
    ("mine:broken", "mine:ragged", "the factory mine:broken failed: KeyError"),
    ("mine:model", "mine:one_tensor", "must return (inputs, targets)"),
    ("mine:model", "mine:ragged", "both need the same number of steps"),
    (".mine:model", "mine:ragged", "name the module absolutely"),
    ("mine:model", "mine:unknown_tokens", "forward(inputs, state) failed on the burn-in: IndexError"),
])
def test_a_factory_or_data_function_that_misbehaves_is_one_line(run_cli, tmp_path, monkeypatch, factory, data,
                                                                 message):
    (tmp_path / "mine.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    from trainers.tasks.token_model import TokenLSTM
    torch.save(TokenLSTM(5, 3, 4, 1).state_dict(), tmp_path / "w.pt")
    res = run_cli("analyze", tmp_path / "w.pt", "--factory", factory, "--data", data, *FAST, "--out", tmp_path / "a")
    assert res.code == 2 and message in res.err and len(res.err.strip().splitlines()) == 1, res.err


def test_a_module_in_the_current_folder_imports_but_never_shadows_an_installed_one(tmp_path, monkeypatch):
    """--factory mine:build finds mine.py here, as python -m would; a json.py planted beside it is not
    what a later ``import json`` finds (the folder goes last on sys.path)."""
    import importlib.machinery
    import sys
    (tmp_path / "mine.py").write_text(FACTORIES)
    (tmp_path / "json.py").write_text("raise SystemExit('planted')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert callable(checkpoint.resolve("mine:model"))
    assert sys.path[-1] == str(tmp_path)
    assert not importlib.machinery.PathFinder.find_spec("json").origin.startswith(str(tmp_path))


@pytest.mark.parametrize("K, dni, message", [(-4, None, "its K is -4, not a whole number >= 0"),
                                             (True, None, "its K is True"),
                                             (0, "neuron", "its K is 0, not a whole number >= 1"),
                                             (None, "neuron", "holds a DNI but no K")])
def test_a_checkpoint_with_a_meaningless_K_is_refused_before_any_work(run_cli, tmp_path, honest, K, dni, message):
    from trainers.dni import SHAPES
    config = {"size": 24, "hidden": 3}
    entry = {"shape": dni, "config": config, "state": SHAPES[dni](config).state_dict()} if dni else None
    path = plant(tmp_path / "k.pt", version=2, task="copy", task_config=TASK, model=honest, K=K, dni=entry)
    res = run_cli("analyze", path, *FAST, "--out", tmp_path / "audit")
    assert res.code == 2 and message in res.err and len(res.err.strip().splitlines()) == 1, res.err


def test_analyze_refuses_a_seed_torch_cannot_take(run_cli, tmp_path, honest):
    path = plant(tmp_path / "ok.pt", version=2, task="copy", task_config=TASK, model=honest, K=3)
    for seed in ("-1", "100000000000000000000"):
        res = run_cli("analyze", path, *FAST, "--seed", seed, "--out", tmp_path / "audit")
        assert res.code == 2 and "Invalid value for '--seed'" in res.err, res.err
        assert len(res.err.strip().splitlines()) == 1


def test_analyze_on_a_full_disk_leaves_nothing_half_written(run_cli, tmp_path, honest, monkeypatch):
    import errno

    from biaskit import report

    path = plant(tmp_path / "ok.pt", version=2, task="copy", task_config=TASK, model=honest, K=3)
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "summary.txt").write_text("the previous audit\n")  # an earlier audit stays whole
    (tmp_path / "audit" / "summary.json").write_text(json.dumps({"checkpoint": str(path.resolve())}))  # of ok.pt

    def full_disk(ds, target):
        with open(target, "wb") as fh:
            fh.write(b"CDF\x01 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "save", full_disk)
    res = run_cli("analyze", path, *FAST, "--out", tmp_path / "audit")
    assert res.code == 2 and "No space left on device" in res.err and len(res.err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit", "ok.pt"]
    assert sorted(p.name for p in (tmp_path / "audit").iterdir()) == ["summary.json", "summary.txt"]
    assert (tmp_path / "audit" / "summary.txt").read_text() == "the previous audit\n"


# --- fuzzing the numeric options: success or one line with exit 2, never a traceback ------------------

NUMERIC = ["--delta", "--lr", "--clip", "--update-every", "--K", "--K-min", "--K-max", "--window", "--windows",
           "--batch-size", "--epochs", "--dni-lr", "--dni-discount", "--restart-base", "--seed", "--K1", "--K2"]
VALUES = st.one_of(
    st.sampled_from(["nan", "-nan", "inf", "-inf", "0", "-0", "-1", "1e400", "1e-400", "", " ", "0x10", "1_0",
                     "½", "१", "2.5", "10000000000", "-10000000000", "3", "0.5", "1"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-10**12, max_value=10**12).map(str),
    st.text(max_size=6))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.lists(st.tuples(st.sampled_from(NUMERIC), VALUES), min_size=1, max_size=3))
def test_numeric_options_are_accepted_whole_or_refused_in_one_line(run_cli, tmp_path, monkeypatch, options):
    """Whatever the values, the command either starts a run whose config passes every check or
    stops with one line and exit 2. (The run itself is stubbed: this is about the options.)"""
    started = []

    class Stub:
        def __init__(self, config, out, **kw):
            started.append(configs.check(dict(config["train"])))
            self.task, self.ranks = copy.build(TASK), Ranks()

        def fit(self):
            return [{"epoch": 1, "valid_loss": 1.0, "valid_ppl": math.e, "test_ppl": math.e}]

    monkeypatch.setattr(train_cli, "Run", Stub)
    args = [a for name, value in options for a in (name, value)]
    extra = ["--estimator", "dni"] if any(n.startswith(("--dni", "--restart")) for n, _ in options) else []
    res = run_cli("train", "copy", *args, *extra, "--out", tmp_path / "run")
    if res.code == 0:
        (cfg,) = started
        for key in ("lr", "update_every", "dni_lr"):
            assert math.isfinite(cfg[key]) and cfg[key] > 0
        assert cfg["clip"] is None or (math.isfinite(cfg["clip"]) and cfg["clip"] > 0)
        assert cfg["delta"] is None or 0 < cfg["delta"] < 1
    else:
        assert res.code == 2, res.err
        assert len(res.err.strip().splitlines()) == 1 and res.err.startswith("biaskit: error:"), res.err


def test_a_checkpoint_pointing_at_a_malicious_pickle_runs_nothing(run_cli, tmp_path):
    """A point-process checkpoint stores its data path: the pickles there are parsed, not unpickled."""
    import pickle

    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    folder = tmp_path / "data"
    folder.mkdir()
    for stem in ("train", "dev", "test"):
        with open(folder / f"{stem}.pkl", "wb") as fh:
            pickle.dump({stem: [[{"time_since_start": 1.0, "type_event": 0}], Payload()], "dim_process": 1}, fh)
    path = plant(tmp_path / "tpp.pt", version=2, task="point-process", task_config={"data": str(folder)},
                 model={}, K=3)
    for factory in ([], ["--factory", "trainers.tasks.point_process:build"]):
        res = run_cli("analyze", path, *factory, *FAST, "--out", tmp_path / "audit")
        assert res.code == 2 and "refuses to load posix.system" in res.err, res.err
        assert len(res.err.strip().splitlines()) == 1
    assert not marker.exists()
