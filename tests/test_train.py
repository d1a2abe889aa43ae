"""Training runs: smoke, exact resume, the run directory, and command-line errors."""
from __future__ import annotations

import json

import pytest
import torch

from biaskit import checkpoint
from trainers import config as configs
from trainers import loop, runs
from trainers.tasks import copy as copy_task

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
    for key in ("beta", "rel_bias_exact", "rel_bias_bound", "K_rule", "K_target", "K_in_use", "rel_bias_trained"):
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


def test_cli_trains_and_resume_alone_continues_with_the_runs_options(run_cli, tmp_path):
    res = run_cli("train", "copy", "--K", "4", "--epochs", "1", "--out", str(tmp_path / "r"), *TINY_ARGS)
    assert res.code == 0, res.err
    assert "best valid ppl" in res.out
    config = checkpoint.load(tmp_path / "r" / "checkpoint-last.pt")["trainer"]["config"]
    # only --epochs; --m 10 and --lr 1 are the values it ran with (the task's and the training default)
    res = run_cli("train", "copy", "--resume", str(tmp_path / "r"), "--epochs", "2", "--m", "10", "--lr", "1")
    assert res.code == 0, res.err
    assert len(runs.read_metrics(tmp_path / "r")) == 2
    resumed = checkpoint.load(tmp_path / "r" / "checkpoint-last.pt")["trainer"]["config"]
    assert resumed == {**config, "train": {**config["train"], "epochs": 2}}


def test_the_epoch_line_shows_the_trained_bptt_bias_and_the_next_K(run_cli, tmp_path):
    res = run_cli("train", "copy", "--K", "4", "--delta", "0.5", "--K-min", "2", "--epochs", "1",
                  "--out", str(tmp_path / "r"), *TINY_ARGS[:-1])
    assert res.code == 0, res.err
    line = runs.read_metrics(tmp_path / "r")[0]
    shown = f"BPTT(8, 4) {line['rel_bias_trained']:.3g}  "
    assert shown in res.out and f"→ K {line['next_K']} ({line['K_rule']})" in res.out


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


def test_resume_with_other_options_is_refused_with_all_of_them_in_one_line(run_cli, tmp_path):
    run_dir = tmp_path / "r"
    assert run_cli("train", "copy", "--K", "4", "--epochs", "1", "--out", run_dir, *TINY_ARGS).code == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
    res = run_cli("train", "copy", "--K", "6", "--epochs", "2", "--resume", run_dir, *TINY_ARGS[:-1],
                  "--hidden", "9", "--delta", "0.5")
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1, res.err
    for change in ("--hidden 8 then, 9 now", "--K 4 then, 6 now", "--delta none then, 0.5 now",
                   "only --epochs can change"):
        assert change in res.err
    res = run_cli("train", "language", "--epochs", "2", "--resume", run_dir)
    assert res.code == 2 and f"{run_dir} is a copy run: resume it with biaskit train copy" in res.err
    res = run_cli("train", "copy", "--K", "4", "--epochs", "1", "--out", run_dir, *TINY_ARGS)
    assert res.code == 2 and "already holds a run" in res.err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"} == before


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


def test_tensorboard_holds_the_scalars_of_metrics_jsonl_in_sections_the_rule_and_the_figure(tmp_path, run_cli):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainers.board import tag

    res = run_cli("train", "copy", "--K", "4", "--delta", "0.5", "--epochs", "1", "--out", tmp_path, "--tensorboard",
                  *TINY_ARGS)
    assert res.code == 0, res.err
    res = run_cli("train", "copy", "--epochs", "2", "--resume", tmp_path, "--tensorboard", "--update-every-max", "1")
    assert res.code == 2 and "--update-every-max 4 then, 1 now" in res.err
    res = run_cli("train", "copy", "--epochs", "2", "--resume", tmp_path, "--tensorboard", "--quiet")
    assert res.code == 0, res.err
    lines = runs.read_metrics(tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    for key in ("train_loss", "valid_ppl", "K", "rel_bias_exact", "rel_bias_bound", "beta", "beta_high"):
        scalars = events.Scalars(tag(key))
        logged = [line for line in lines if key in line]  # the bias: the epochs that ended with an update
        assert logged and [s.step for s in scalars] == [line["epoch"] for line in logged]
        assert [s.value for s in scalars] == pytest.approx([line[key] for line in logged], rel=1e-6)
    sections = {name.split("/")[0] for name in events.Tags()["scalars"]}
    assert sections == {"loss", "perplexity", "K", "bias", "decay", "time", "training"}
    assert (tag("valid_ppl"), tag("test_rmse"), tag("update_seconds")) == ("perplexity/valid_ppl", "rmse/test_rmse",
                                                                           "time/update_seconds")
    updates = [line for line in lines if "K_rule" in line]
    rules = events.Tensors("K/rule/text_summary")
    assert [r.step for r in rules] == [line["epoch"] for line in updates]
    assert rules[0].tensor_proto.string_val[0].decode() == f"K 4 → {updates[0]['next_K']}: {updates[0]['K_rule']}"
    assert [image.step for image in events.Images("bias/figure")] == [line["epoch"] for line in updates]


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


def test_an_epoch_whose_valid_loss_is_not_finite_stops_the_run_in_one_line(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "evaluate", lambda *args: (float("nan"), {}))
    res = run_cli("train", "copy", "--K", "4", "--epochs", "2", "--out", str(tmp_path / "r"), *TINY_ARGS[:-1])
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1
    assert "epoch 1: the valid loss is nan: try a tighter --clip than 1, or a smaller --lr than" in res.err
    assert runs.read_metrics(tmp_path / "r") == []


def test_every_option_of_train_and_analyze_has_help_and_shows_its_default():
    import click

    from trainers.cli import cli

    commands = [*cli.commands["train"].commands.values(), cli.commands["analyze"]]
    for command in commands:
        ctx = click.Context(command, info_name=command.name)
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                _, text = param.get_help_record(ctx)
                assert text.split("[default")[0].strip(), (command.name, param.name)  # a line of help
                assert "[default: " in text, (command.name, param.name)
    copy = click.Context(cli.commands["train"].commands["copy"])
    texts = {p.name: p.get_help_record(copy)[1] for p in cli.commands["train"].commands["copy"].params}
    assert "[default: 100]" in texts["K_max"] and "[default: 256000]" in texts["train_tokens"]
    assert "0<=x<2^63" in texts["seed"] and "9223372036854775807" not in texts["seed"]


def test_bare_commands_print_their_help_and_exit_0(run_cli):
    for args in ([], ["train"]):
        res = run_cli(*args)
        assert res.code == 0 and res.err == "", res.err
        assert res.out.startswith(f"Usage: biaskit {' '.join(args)}".rstrip() + " [OPTIONS] COMMAND")
    res = run_cli("train", "copy", "--seed", "100000000000000000000", "--out", "x")
    assert res.code == 2 and "is not in the range 0<=x<2^63" in res.err


def test_a_task_that_fails_to_build_is_one_line_and_writes_nothing(run_cli, tmp_path, monkeypatch):
    from trainers.tasks import copy

    def broken(config):
        raise RuntimeError("split_with_sizes expects split_sizes to sum exactly to 20\nsecond line")

    monkeypatch.setattr(copy, "build", broken)
    res = run_cli("train", "copy", "--epochs", "1", "--out", str(tmp_path / "r"), *TINY_ARGS[:-1])
    assert res.code == 2 and res.err.strip().splitlines() == [
        "biaskit: error: building the task 'copy' failed: RuntimeError: split_with_sizes expects split_sizes to sum "
        "exactly to 20"]
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_the_authors_setup_trains_with_their_buffer_clip_and_weight_decay(tmp_path, monkeypatch):
    """``--setup authors`` (config.AUTHORS): BPTT(2K - 1, K) windows, the gradient clipped at clip / K,
    SGD with their weight decay, and K set at once to the paper's κ̂."""
    seen = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm):
        seen.append(max_norm)
        return real_clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    train = {**copy_task.TRAIN, **configs.AUTHORS["copy"], "setup": "authors", "epochs": 1, "K": 4,
             "batch_size": 8, "window": 20, "windows": 8, "K_max": 19, "delta": 0.5, "update_every": 1.0,
             "update_every_max": 1.0}
    cfg = configs.full_config("copy", dict(TINY), train)
    assert configs.truncation(cfg["train"], 4) == (7, 4) and configs.truncation(cfg["train"], 1) == (1, 1)
    run = loop.Run(cfg, tmp_path / "a", quiet=True)
    (line,) = run.fit()
    assert set(seen) == {1.0 / 4} and (line["K1"], line["K2"]) == (7, 4)
    assert run.optimizer.param_groups[0]["weight_decay"] == 1e-5
    assert line["K_rule"] in ("estimated", "none below delta", "no fit")  # the paper's controller
    if line["K_rule"] == "estimated":
        assert line["next_K"] == min(max(line["kappa_hat"], 2), 19)  # at once, no factor limit


def test_cli_setup_authors_starts_from_their_settings_and_given_options_override(run_cli, tmp_path):
    res = run_cli("train", "copy", "--setup", "authors", "--clip-whole", "--K", "4", "--epochs", "1",
                  "--out", str(tmp_path / "a"), *TINY_ARGS)
    assert res.code == 0, res.err
    train = runs.stored_run(tmp_path / "a")[0]["train"]
    preset = configs.AUTHORS["copy"]
    assert train["setup"] == "authors" and train["buffer"] == preset["buffer"] == "2K-1"
    assert train["optimizer_options"] == preset["optimizer_options"] and train["controller"] == "paper"
    assert train["clip_per_K"] is False and train["windows"] == 8  # given options win over the preset
    assert runs.read_metrics(tmp_path / "a")[0]["K1"] == 7
    res = run_cli("train", "copy", "--buffer", "2K-1", "--clip-per-K", "--K", "4", "--epochs", "1",
                  "--out", str(tmp_path / "b"), *TINY_ARGS)
    assert res.code == 0, res.err
    train = runs.stored_run(tmp_path / "b")[0]["train"]
    assert (train["setup"], train["buffer"], train["clip_per_K"], train["optimizer_options"]) == \
        ("biaskit", "2K-1", True, {})


def test_an_adaptive_run_measures_its_own_bias_every_audit_every_th_update(tmp_path):
    """rel_bias_trained costs most of an epoch on the point process: an adaptive run measures it at
    updates 0, n, 2n, ... (``--audit-every`` n), a fixed-K run at every update."""
    lines = loop.Run(config(delta=0.5, K=4, epochs=3, update_every_max=1.0, audit_every=2), tmp_path / "a",
                     quiet=True).fit()
    assert ["rel_bias_trained" in line for line in lines] == [True, False, True]
    fixed = loop.Run(config(K=4, epochs=2), tmp_path / "b", quiet=True).fit()
    assert all("rel_bias_trained" in line for line in fixed)


def test_a_costly_every_step_update_is_announced_and_a_cheap_one_is_not():
    """W/4 last-step windows per every-step window (the bands' R(R+1)/2 step products against R, about half
    of that in time: benchmarks/bench_every_step.py); announced above four default updates' worth."""
    base = {**configs.TRAIN_DEFAULTS, "delta": 0.5, "window": 100, "windows": 64, "loss_at": "every"}
    line = loop.every_step_cost(base)
    assert "each of the 64 windows of 100 steps costs about 25 last-step windows" in line
    assert "about 6x the default's" in line  # 64 · 25 / 256
    assert loop.every_step_cost({**base, "windows": 16}) is None  # 400 windows' worth
    assert loop.every_step_cost({**base, "loss_at": "last"}) is None
    assert loop.every_step_cost({**base, "delta": None}) == line  # fixed K: measured every epoch
