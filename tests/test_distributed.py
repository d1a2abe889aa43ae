"""torch.distributed: a sharded decomposition and a data-parallel run, each against one process
holding everything. Two gloo processes on the CPU, spawned by the tests; no GPU needed."""
from __future__ import annotations

import json
import socket

import distributed_workers as workers
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import biaskit
from biaskit import checkpoint, report
from trainers import config as configs
from trainers import loop, runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def problem(hooked: bool = False):
    """16 windows of a 2-layer LSTM in float64, and a given metric (its estimate is per rank); ``hooked``:
    a gradient hook on a weight, which sends the LSTM down the autograd path."""
    torch.manual_seed(0)
    lstm, head = nn.LSTM(3, 4, 2, batch_first=True).double(), nn.Linear(4, 3).double()
    if hooked:
        lstm.weight_hh_l0.register_hook(lambda g: g * torch.tril(torch.ones_like(g)))
    system = biaskit.wrap(lstm, head, nn.CrossEntropyLoss(reduction="none"))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 9, 3, dtype=torch.float64, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    return system, x, y, torch.eye(16, dtype=torch.float64) * 2


def token_problem():
    """16 windows of tokens through an nn.Embedding encoder and an LSTM, in float64."""
    torch.manual_seed(0)
    emb, lstm, head = nn.Embedding(6, 3).double(), nn.LSTM(3, 4, batch_first=True).double(), nn.Linear(4, 3).double()
    system = biaskit.wrap(lstm, head, nn.CrossEntropyLoss(reduction="none"), encoder=emb)
    gen = torch.Generator().manual_seed(2)
    return system, torch.randint(0, 6, (16, 9), generator=gen), torch.randint(0, 3, (16,), generator=gen)


def every_step_problem():
    """16 windows of a GRU with a loss at every step, in float64."""
    torch.manual_seed(0)
    gru, head = nn.GRU(3, 4, batch_first=True).double(), nn.Linear(4, 3).double()
    system = biaskit.wrap(gru, head, nn.CrossEntropyLoss(reduction="none"))
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 7, 3, dtype=torch.float64, generator=gen), torch.randint(0, 3, (16, 7), generator=gen)
    return system, x, y


TINY = {"train_tokens": 2000, "valid_tokens": 400, "test_tokens": 400, "hidden": 6}
TRAIN = {"batch_size": 8, "window": 12, "windows": 8, "groups": 4, "K": 3, "K_max": 12, "delta": 0.5,
         "update_every": 0.5, "epochs": 1, "level": 0.5}


DNI_CONFIG = configs.full_config("copy", dict(TINY), {**TRAIN, "delta": None, "estimator": "dni", "dni": "layer",
                                                     "dni_discount": 0.5})


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Two gloo processes, started once: their sharded Dataset, run directory and K records."""
    tmp = tmp_path_factory.mktemp("two")
    config = configs.full_config("copy", dict(TINY), TRAIN)
    mp.start_processes(workers.both, nprocs=2, start_method="fork",  # forked: no second import of torch
                       args=(2, free_port(), str(tmp / "sharded.nc"), config, str(tmp / "two"), str(tmp / "K"),
                             DNI_CONFIG))
    return tmp, config


@pytest.mark.parametrize("saved", ["sharded.nc", "sharded.rows.nc"], ids=["whole", "rows"])
def test_a_sharded_decomposition_is_one_process_holding_every_window(spawned, saved):
    tmp, _ = spawned
    sharded = report.load(tmp / saved)
    system, x, y, metric = problem()
    whole = biaskit.decompose(system, x, y, metric=metric, groups=4)  # the same four groups of four windows
    assert sharded.attrs["processes"] == 2 and whole.attrs["processes"] == 1
    for name in whole.data_vars:
        np.testing.assert_allclose(sharded[name].values, whole[name].values, rtol=1e-10, atol=1e-14, err_msg=name)
    assert sharded.attrs["grad_norm"] == pytest.approx(whole.attrs["grad_norm"], rel=1e-12)


def test_a_sharded_decomposition_by_the_autograd_path_is_one_process_holding_every_window(spawned):
    tmp, _ = spawned
    sharded = report.load(tmp / "sharded.autograd.nc")
    system, x, y, metric = problem(hooked=True)
    with pytest.warns(UserWarning, match="gradient hooks on weight_hh_l0"):
        whole = biaskit.decompose(system, x, y, metric=metric, groups=4)
    assert sharded.attrs["path"] == whole.attrs["path"] and "autograd" in whole.attrs["path"]
    for name in whole.data_vars:
        np.testing.assert_allclose(sharded[name].values, whole[name].values, rtol=1e-10, atol=1e-14, err_msg=name)


def test_a_sharded_decomposition_through_an_embedding_is_one_process_holding_every_window(spawned):
    tmp, _ = spawned
    sharded = report.load(tmp / "sharded.tokens.nc")
    system, tokens, y = token_problem()
    whole = biaskit.decompose(system, tokens, y, metric=False, groups=4)
    for name in whole.data_vars:
        np.testing.assert_allclose(sharded[name].values, whole[name].values, rtol=1e-10, atol=1e-14, err_msg=name)


def test_a_sharded_every_step_decomposition_is_one_process_holding_every_window(spawned):
    tmp, _ = spawned
    sharded = report.load(tmp / "sharded.every.nc")
    system, x, y = every_step_problem()
    whole = biaskit.decompose(system, x, y, metric=False, groups=4, psi=True, loss_at="every")
    assert sharded.attrs["loss_at"] == "every"
    for name in whole.data_vars:
        np.testing.assert_allclose(sharded[name].values, whole[name].values, rtol=1e-10, atol=1e-14, err_msg=name)


def test_a_data_parallel_run_ends_where_one_process_does(spawned, tmp_path):
    """Same seed, data and global batch: 2 gloo processes end with one process's weights (to float32
    rounding), every rank used the same K at every update, and rank 0 alone wrote."""
    tmp, config = spawned
    one = loop.Run(config, tmp_path / "one", quiet=True)
    one_lines = one.fit()
    ranks = [json.loads(open(f"{tmp / 'K'}.{r}").read()) for r in range(2)]
    assert ranks[0] == ranks[1]  # no rank drifts
    assert ranks[0]["K"] == [h["K"] for h in one.history] and len(ranks[0]["K"]) == 2
    two, single = checkpoint.load(tmp / "two" / "checkpoint-last.pt"), checkpoint.load(tmp_path / "one" /
                                                                                       "checkpoint-last.pt")
    for name, weight in single["model"].items():
        torch.testing.assert_close(two["model"][name], weight, rtol=1e-4, atol=1e-5)
    two_lines = runs.read_metrics(tmp / "two")
    assert len(two_lines) == 1  # one line per epoch: rank 1 wrote nothing
    for a, b in zip(two_lines, one_lines):
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert sorted(p.name for p in (tmp / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    with pytest.raises(biaskit.InputError, match="trained by 2 process"):
        loop.Run({**config, "train": {**config["train"], "epochs": 2}}, tmp / "two", quiet=True, resume=True)


def test_a_data_parallel_dni_run_ends_where_one_process_does(spawned, tmp_path):
    """Synthetic gradients under 2 gloo processes: the model's and the DNI's weights (averaged over the
    ranks like the model's) end where one process holding every stream ends."""
    tmp, _ = spawned
    loop.Run(DNI_CONFIG, tmp_path / "one", quiet=True).fit()
    two, single = checkpoint.load(tmp / "two-dni" / "checkpoint-last.pt"), checkpoint.load(tmp_path / "one" /
                                                                                           "checkpoint-last.pt")
    assert single["dni"]["shape"] == "layer" and single["dni"]["state"]["net.2.weight"].abs().max() > 0  # learned
    for part in ("model", "dni"):
        mine, theirs = (single[part], two[part]) if part == "model" else (single[part]["state"], two[part]["state"])
        for name, weight in mine.items():
            torch.testing.assert_close(theirs[name], weight, rtol=1e-4, atol=1e-5, msg=f"{part} {name}")
    one_line, two_line = runs.read_metrics(tmp_path / "one")[0], runs.read_metrics(tmp / "two-dni")[0]
    assert two_line["dni_loss"] == pytest.approx(one_line["dni_loss"], rel=1e-4)
