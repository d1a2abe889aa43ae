"""Training runs: smoke, exact resume, the run directory, and command-line errors."""
from __future__ import annotations

import json
import pytest
import torch

from biaskit import checkpoint
from trainers import config as configs
from trainers import loop, runs

TINY = {"train_tokens": 2000, "valid_tokens": 400, "test_tokens": 400, "hidden": 8}
FAST = {"batch_size": 8, "window": 20, "windows": 8, "K_max": 30}
TIMING = {"seconds", "tokens_per_s", "update_seconds"}


def config(**train):
    return configs.full_config("copy", dict(TINY), {**FAST, "epochs": 2, **train})


def strip_timing(lines):
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


@pytest.mark.parametrize("train", [
    {"K": 5},
    {"delta": 0.5, "K": 4, "update_every": 0.5},
    {"K": 4, "estimator": "dni", "dni": "neuron", "alternate": True, "schedule": "restarts:0.5"},
])
def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path, train):
    straight = loop.Run(config(**train), tmp_path / "a", quiet=True).fit()
    loop.Run(config(**{**train, "epochs": 1}), tmp_path / "b", quiet=True).fit()
    resumed = loop.Run(config(**train), tmp_path / "b", quiet=True, resume=True).fit()
    assert len(straight) == 2
    assert strip_timing(resumed) == strip_timing(straight)


def test_run_directory_holds_config_metrics_and_self_describing_checkpoints(tmp_path):
    cfg = config(delta=0.5, K=4)
    lines = loop.Run(cfg, tmp_path, quiet=True).fit()
    assert json.loads((tmp_path / "config.json").read_text()) == cfg
    for key in ("train_loss", "valid_ppl", "test_ppl", "K", "next_K", "tokens_per_s", "seconds"):
        assert key in lines[-1]
    for key in ("beta", "rel_bias_exact", "rel_bias_bound", "K_rule", "K_target", "K_in_use"):
        assert key in lines[0]  # the epoch that ended with an update
    ckpt = checkpoint.load(tmp_path / "checkpoint-last.pt")
    assert ckpt["task"] == "copy" and ckpt["trainer"]["epoch"] == 2
    updated = [line for line in lines if "K_rule" in line]
    assert [h["K"] for h in ckpt["K_history"]] == [line["next_K"] for line in updated]
    task = checkpoint.load_registered(checkpoint.TASKS, ckpt["task"])(ckpt["task_config"])
    task.model.load_state_dict(ckpt["model"])
    valid, _ = loop.evaluate(task.model, *task.splits["valid"], cfg["train"]["batch_size"])
    assert valid == pytest.approx(lines[-1]["valid_loss"], rel=1e-6)
    best = min(lines, key=lambda line: line["valid_loss"])
    assert checkpoint.load(tmp_path / "checkpoint-best.pt")["trainer"]["epoch"] == best["epoch"]


def test_logged_perplexity_is_exp_of_the_mean_token_loss(tmp_path):
    lines = loop.Run(config(K=3, epochs=1), tmp_path, quiet=True).fit()
    assert lines[0]["valid_ppl"] == pytest.approx(torch.tensor(lines[0]["valid_loss"]).exp().item(), rel=1e-6)


TINY_ARGS = ["--train-tokens", "2000", "--valid-tokens", "400", "--test-tokens", "400", "--hidden", "8",
             "--batch-size", "8", "--window", "20", "--windows", "8", "--quiet"]


def test_cli_trains_and_resumes(run_cli, tmp_path):
    res = run_cli("train", "copy", "--K", "4", "--epochs", "1", "--out", str(tmp_path / "r"), *TINY_ARGS)
    assert res.code == 0, res.err
    assert "best valid ppl" in res.out
    res = run_cli("train", "copy", "--K", "4", "--epochs", "2", "--resume", str(tmp_path / "r"), *TINY_ARGS)
    assert res.code == 0, res.err
    assert len(runs.read_metrics(tmp_path / "r")) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "sudoku"], "No such command"),
        (["train", "copy", "--K", "4"], "--out DIR"),
        (["train", "copy", "--K1", "5", "--out", "{tmp}/x"], "give both --K1 and --K2"),
        (["train", "copy", "--K1", "3", "--K2", "5", "--out", "{tmp}/x"], "1 <= K2 <= K1"),
        (["train", "copy", "--delta", "1.5", "--out", "{tmp}/x"], "'1.5' is not a finite number in (0, 1)"),
        (["train", "copy", "--clip", "-1", "--out", "{tmp}/x"], "Invalid value for '--clip'"),
        (["train", "copy", "--update-every", "nan", "--out", "{tmp}/x"], "Invalid value for '--update-every'"),
        (["train", "copy", "--lr", "nan", "--out", "{tmp}/x"], "Invalid value for '--lr'"),
        (["train", "copy", "--lr", "inf", "--out", "{tmp}/x"], "Invalid value for '--lr'"),
        (["train", "copy", "--device", "meta", "--out", "{tmp}/x"], "runs on cpu or cuda"),
        (["train", "copy", "--device", "mps", "--out", "{tmp}/x"], "runs on cpu or cuda"),
        (["train", "copy", "--device", "gpu7", "--out", "{tmp}/x"], "unknown device"),
        (["train", "copy", "--valid-tokens", "10", "--out", "{tmp}/x"], "the valid split has 10 positions"),
        (["train", "copy", "--windows", "5000", "--out", "{tmp}/x"], "distinct windows"),
        (["train", "copy", "--K-min", "9", "--K-max", "3", "--out", "{tmp}/x"], "K_min <= K_max"),
        (["train", "copy", "--out", "{tmp}/file"], "is a file"),
        (["train", "copy", "--optimizer", "Nope", "--out", "{tmp}/x"], "unknown optimizer"),
        (["train", "copy", "--optimizer-options", "{bad", "--out", "{tmp}/x"], "not JSON"),
        (["train", "copy", "--schedule", "wavy", "--out", "{tmp}/x"], "unknown schedule"),
        (["train", "copy", "--out", "{tmp}/file/sub"], "choose another --out"),
        (["train", "copy", "--resume", "{tmp}/nothing"], "no checkpoint"),
        (["train", "copy", "--resume", "{tmp}/started"], "start it again with --out"),
        (["train", "copy", "--out", "{tmp}/foreign"], "is not a run directory and not empty"),
        (["train", "copy", "--estimator", "dni", "--delta", "0.5", "--out", "{tmp}/x"], "fixed --K"),
        (["train", "copy", "--estimator", "dni", "--K1", "6", "--K2", "3", "--out", "{tmp}/x"], "fixed --K"),
        (["train", "copy", "--alternate", "--out", "{tmp}/x"], "--alternate needs --estimator dni"),
        (["train", "copy", "--estimator", "dni", "--restart-base", "2", "--schedule", "cosine", "--out", "{tmp}/x"],
         "leave out --schedule"),
        (["train", "copy", "--estimator", "dni", "--dni", "cell", "--out", "{tmp}/x"], "Invalid value for '--dni'"),
        (["train", "copy", "--estimator", "dni", "--dni-discount", "2", "--out", "{tmp}/x"], "--dni-discount"),
        (["train", "point-process", "--estimator", "dni", "--out", "{tmp}/x"], "No such option"),
        (["train", "copy", "--controller", "paper", "--windows", "2", "--out", "{tmp}/x"], "3 --windows"),
        (["train", "copy", "--delta", "0.5", "--K1", "6", "--K2", "3", "--out", "{tmp}/x"], "leave out --K1"),
        (["train", "copy", "--optimizer", "LBFGS", "--out", "{tmp}/x"], "cannot train here: TypeError"),
        (["train", "copy", "--optimizer-options", '{"momentum": 0.9, "dampening": "x"}', "--out", "{tmp}/x"],
         "cannot train here"),
        (["train", "copy", "--schedule", "step:1e-6:1e10", "--out", "{tmp}/x"], "GAMMA must be in (0, 1]"),
        (["train", "copy", "--seed", "-1", "--out", "{tmp}/x"], "Invalid value for '--seed'"),
        (["train", "copy", "--seed", "100000000000000000000", "--out", "{tmp}/x"], "Invalid value for '--seed'"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(run_cli, tmp_path, args, message):
    (tmp_path / "file").write_text("")
    (tmp_path / "started").mkdir()  # a run killed before its first checkpoint
    (tmp_path / "started" / "config.json").write_text("{}")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("precious")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = run_cli(*args[:2], *TINY_ARGS[:-1], *args[2:])  # the case's options win over the tiny defaults
    assert res.code == 2, res.err
    assert len(res.err.strip().splitlines()) == 1 and message in res.err
    assert not (tmp_path / "x").exists()  # checked before a run directory is made
    assert (tmp_path / "foreign" / "thesis.tex").read_text() == "precious"


def test_resume_with_another_config_is_refused(run_cli, tmp_path):
    run_dir = str(tmp_path / "r")
    assert run_cli("train", "copy", "--K", "4", "--epochs", "1", "--out", run_dir, *TINY_ARGS).code == 0
    res = run_cli("train", "copy", "--K", "6", "--epochs", "2", "--resume", run_dir, *TINY_ARGS)
    assert res.code == 2 and "another config" in res.err and "K: 4 then, 6 now" in res.err
    res = run_cli("train", "copy", "--K", "4", "--epochs", "1", "--out", run_dir, *TINY_ARGS)
    assert res.code == 2 and "already holds a run" in res.err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_runs_on_cuda(tmp_path):
    run = loop.Run(config(delta=0.5, K=4, epochs=1), tmp_path, device="cuda", quiet=True)
    assert next(run.model.parameters()).is_cuda
    lines = run.fit()
    assert lines[0]["valid_ppl"] > 1


def test_a_run_from_before_an_option_existed_resumes_with_its_default(tmp_path):
    loop.Run(config(K=4, epochs=1), tmp_path, quiet=True).fit()
    path = tmp_path / "checkpoint-last.pt"
    ckpt = checkpoint.load(path)
    for key in ("estimator", "dni", "alternate"):
        del ckpt["trainer"]["config"]["train"][key]
    torch.save(ckpt, path)
    assert len(loop.Run(config(K=4, epochs=2), tmp_path, quiet=True, resume=True).fit()) == 2


def test_tensorboard_holds_the_scalars_of_metrics_jsonl(tmp_path, run_cli):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainers.board import tag

    res = run_cli("train", "copy", "--K", "4", "--delta", "0.5", "--epochs", "1", "--out", tmp_path, "--tensorboard",
                  *TINY_ARGS)
    assert res.code == 0, res.err
    res = run_cli("train", "copy", "--K", "4", "--delta", "0.5", "--epochs", "2", "--resume", tmp_path,
                  "--tensorboard", *TINY_ARGS)
    assert res.code == 0, res.err
    lines = runs.read_metrics(tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    for key in ("train_loss", "valid_ppl", "K", "rel_bias_exact", "rel_bias_bound", "beta", "beta_high"):
        scalars = events.Scalars(tag(key))
        logged = [line for line in lines if key in line]  # the bias: the epochs that ended with an update
        assert logged and [s.step for s in scalars] == [line["epoch"] for line in logged]
        assert [s.value for s in scalars] == pytest.approx([line[key] for line in logged], rel=1e-6)


def test_work_that_does_not_divide_among_the_processes_is_refused():
    """Each rank takes its share of the streams, the windows and the window groups (so the
    confidence limits are those one process would give); a remainder is refused up front."""
    from trainers.ddp import Ranks
    from trainers.tasks import copy
    task = copy.build(TINY)
    base = {**configs.TRAIN_DEFAULTS, "batch_size": 8, "window": 20, "windows": 16, "groups": 16}
    loop.check_data(task, configs.check(dict(base)), Ranks(rank=0, world=2))
    for key, value in (("batch_size", 9), ("windows", 15), ("groups", 15)):
        option = "--" + key.replace("_", "-")
        with pytest.raises(checkpoint.InputError, match=f"{option} \\({value}\\) must divide evenly among the 2"):
            loop.check_data(task, configs.check({**base, key: value}), Ranks(rank=0, world=2))


def test_an_epoch_whose_valid_loss_is_not_finite_is_logged_and_printed_as_missing(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "evaluate", lambda *args: (float("nan"), {}))
    res = run_cli("train", "copy", "--K", "4", "--epochs", "1", "--out", str(tmp_path / "r"), *TINY_ARGS[:-1])
    assert res.code == 0, res.err
    assert "valid ppl –" in res.err + res.out and "best valid ppl –" in res.out
    assert runs.read_metrics(tmp_path / "r")[0]["valid_loss"] is None
