"""Code the distributed tests run in their two processes, as torchrun would start them."""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist


def both(rank: int, world: int, port: int, decomposed: str, config: dict, out: str, record: str, dni_config: dict):
    """As torchrun starts a process: a sharded decomposition (rank 0 saves its Dataset), then a
    data-parallel training run (each rank records the K it used after every update), and one with
    synthetic gradients (``dni_config``, into ``out`` + "-dni")."""
    import warnings

    from test_distributed import every_step_problem, problem, token_problem

    import biaskit
    from biaskit import report
    from biaskit.fastpath import FastPath
    from trainers.loop import Run

    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    warnings.simplefilter("ignore")  # the hooked problem's note that it goes by torch.autograd
    system, x, y, metric = problem()
    mine = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
    for rows in (False, True):  # the fast path's two ways: products whole per group, or kept as rows
        ds = biaskit.decompose(system, x[mine], y[mine], metric=metric, groups=2, process_group=dist.group.WORLD,
                               _path=FastPath(rows=rows))
        if rank == 0:
            report.save(ds, decomposed.replace(".nc", ".rows.nc" if rows else ".nc"))
    system, tokens, y = token_problem()  # an embedding encoder: its products gathered by token
    ds = biaskit.decompose(system, tokens[mine], y[mine], metric=False, groups=2, process_group=dist.group.WORLD)
    if rank == 0:
        report.save(ds, decomposed.replace(".nc", ".tokens.nc"))
    system, x, y, metric = problem(hooked=True)  # the autograd path
    ds = biaskit.decompose(system, x[mine], y[mine], metric=metric, groups=2, process_group=dist.group.WORLD)
    if rank == 0:
        report.save(ds, decomposed.replace(".nc", ".autograd.nc"))
    system, x, y = every_step_problem()
    ds = biaskit.decompose(system, x[mine], y[mine], metric=False, groups=2, process_group=dist.group.WORLD,
                           loss_at="every")
    if rank == 0:
        report.save(ds, decomposed.replace(".nc", ".every.nc"))
    run = Run(config, out, quiet=True)  # finds the process group started, as under torchrun
    lines = run.fit()
    with open(f"{record}.{rank}", "w") as fh:
        json.dump({"K": [h["K"] for h in run.history], "next_K": [line["next_K"] for line in lines]}, fh)
    Run(dni_config, out + "-dni", quiet=True).fit()
    dist.destroy_process_group()
