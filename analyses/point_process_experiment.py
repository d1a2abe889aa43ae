"""Fixed versus adaptive truncation for a marked temporal point process (RMTPP), at a 2-CPU scale.

Fixed K ∈ {2, 6, 20} against δ ∈ {0.5, 0.1} on the embedded simulated
two-mark Hawkes process (or ``--data``: a folder of train/dev/test.pkl, or a
CSV), with the paper's batch 64, step 0.1·√K, W = 200, K0 = 6 and
[K_min, K_max] = [1, 100] and RMTPP with a 2-layer LSTM of 128 units.
Scaled down: 50,000 simulated events and ``--epochs`` (default 8).

Writes ``analyses/results/point_process.md`` and ``point_process.png``.

To reproduce the paper's Table C.3 on a GPU, with a data set in the
neural-Hawkes / EasyTPP pickle layout in ~/data/tpp:

    for K in 2 6 20 50; do biaskit train point-process --data ~/data/tpp --K $K --epochs 50 \\
        --device cuda --out runs/tpp-K$K; done
    for d in 0.9 0.5 0.1; do biaskit train point-process --data ~/data/tpp --delta $d --epochs 50 \\
        --device cuda --out runs/tpp-d$d; done

    python analyses/point_process_experiment.py [--epochs 8] [--jobs 2] [--data PATH]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import grid

from trainers import config as configs
from trainers.tasks import point_process

HERE = Path(__file__).parent
SETTINGS = ([{"K": K} for K in (2, 6, 20)]
            + [{"controller": c, "delta": d} for c in ("exact", "paper") for d in (0.5, 0.1)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--data", help="folder of train/dev/test.pkl, or a sequence,time,mark CSV")
    parser.add_argument("--runs", type=Path, default=HERE / "runs" / "point_process")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    dirs = [args.runs / grid.label(s) for s in SETTINGS]
    jobs = [(d, configs.full_config("point-process", {"data": args.data},
                                 {**point_process.TRAIN, "epochs": args.epochs, **s}))
            for d, s in zip(dirs, SETTINGS)]
    grid.run(jobs, args.jobs)
    data = args.data or "the simulated two-mark Hawkes process (50,000 events)"
    grid.report(args.results, "point_process", "# Temporal point process: fixed versus adaptive truncation\n\n"
                f"{data}; RMTPP with a 2-layer LSTM 128, batch 64, SGD step 0.1·√K, W = 200, K0 = 6, "
                f"K in [1, 100], 256 windows per update, {args.epochs} epochs (more where an earlier call "
                "trained a run further: the epochs column). NLL is per event; RMSE of the "
                "expected time to the next event and the mark error rate are at the best valid epoch. Generated "
                f"by `python analyses/point_process_experiment.py --epochs {args.epochs}`. For the paper's "
                "Table C.3 see the commands in the script's docstring.",
                [(None, "point_process", [("RMTPP", grid.label(s), s, d) for s, d in zip(SETTINGS, dirs)])], "nll",
                extra=("test_rmse", "test_error_rate"))


if __name__ == "__main__":
    main()
