"""Synthetic gradients against truncation, with the bias each leaves measured, at a 2-CPU scale.

On the copy task (variable m in [5, 10], where K = 5 is too short for the
longest sequences), two seeds, each setting trained twice over: with the
task's SGD (step 1.0·√K, clipped at 1.0) and with Adam (step 1e-3, no √K
scaling, as Jaderberg et al. train their DNI models). Rows: BPTT(K, K), the
chunks a DNI corrects; BPTT(2K, K) as the paper trains; BPTT(3K, 3K), the
ceiling a perfect DNI would approach; adaptive TBPTT (SGD, δ = 0.1); and the
DNIs: linear (the closed-form test's shape), layer-wise (an MLP), neuron-wise
(a shared LSTM cell), with the bootstrap discounted or not, and the
neuron-wise one alternating with real gradients after each warm restart
(E_base = 1 epoch). On the embedded language corpus, one seed of a QRNN (the
neuron-wise DNI paper's cell) with Adam. Each epoch logs the relative bias of
BPTT(K, K) chunks against full BPTT, with and without the run's DNI (windows
of W steps, W more after each for the later losses), and the DNI's median
relative error on the future gradient.

Writes ``analyses/results/dni.md`` and ``dni-copy.png`` / ``dni-language.png``.

    python analyses/dni_experiment.py [--copy-epochs 15] [--language-epochs 4] [--jobs 2]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import grid

from trainers import config as configs
from trainers import runs
from trainers.tasks import copy, language

HERE = Path(__file__).parent
K = 5
ADAM = {"optimizer": "Adam", "lr": 1e-3, "scale_lr": False}
DNI = {"estimator": "dni"}
COPY = {
    "SGD, BPTT(K, K)": {"K1": K, "K2": K},
    "SGD, BPTT(2K, K)": {},
    "SGD, adaptive, delta=0.1": {"delta": 0.1},
    "SGD, linear DNI, discount 0.5": {**DNI, "dni": "linear", "dni_discount": 0.5},
    "SGD, layer DNI": {**DNI, "dni": "layer"},
    "SGD, neuron DNI": {**DNI, "dni": "neuron"},
    "Adam, BPTT(K, K)": {**ADAM, "K1": K, "K2": K},
    "Adam, BPTT(2K, K)": {**ADAM},
    "Adam, BPTT(3K, 3K)": {**ADAM, "K1": 3 * K, "K2": 3 * K},
    "Adam, linear DNI": {**ADAM, **DNI, "dni": "linear"},
    "Adam, linear DNI, discount 0.5": {**ADAM, **DNI, "dni": "linear", "dni_discount": 0.5},
    "Adam, layer DNI, discount 0.5": {**ADAM, **DNI, "dni": "layer", "dni_discount": 0.5},
    "Adam, neuron DNI": {**ADAM, **DNI, "dni": "neuron"},
    "Adam, neuron DNI, alternating": {**ADAM, **DNI, "dni": "neuron", "alternate": True, "schedule": "restarts:1"},
}
LANGUAGE = {name: setting for name, setting in COPY.items()
            if name.startswith("Adam") and "3K" not in name and "layer" not in name and name != "Adam, linear DNI"}
SEEDS = {"copy": (0, 1), "language": (0,)}
TASKS = {
    "copy": ("copy", {"variable": True}, {**copy.TRAIN, "K": K}, COPY,
             "copy task, variable m in [5, 10], 2-layer LSTM 50, K = 5"),
    "language": ("language", {"embedding": 128, "hidden": 128, "cell": "qrnn"},
                 {**language.TRAIN, "K": 2 * K, "window": 100, "windows": 32}, LANGUAGE,
                 "embedded language corpus, QRNN 128, K = 10"),
}
FINAL = ("rel_bias_truncated", "rel_bias_synthetic", "synthetic_error")


def seeds_table(task: str, dirs: dict, metric: str) -> str:
    """Per setting: the best valid metric of each seed, their mean and half their range."""
    seeds = SEEDS[task]
    out = ["| setting | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± half range |",
           "|" + "---|" * (len(seeds) + 2)]
    for name in TASKS[task][3]:
        best = [min(line[f"valid_{metric}"] for line in runs.read_metrics(dirs[task, name, s]))
                if (dirs[task, name, s] / "metrics.jsonl").exists() else None for s in seeds]
        done = [b for b in best if b is not None]
        spread = f"{statistics.mean(done):.3f} ± {(max(done) - min(done)) / 2:.3f}" if done else "–"
        out.append(f"| {name} | " + " | ".join("–" if b is None else f"{b:.3f}" for b in best) + f" | {spread} |")
    return "\n".join(out)


def error_table(task: str, dirs: dict) -> str:
    """The DNI's median relative error on the future gradient after each epoch (first seed)."""
    rows = []
    for name, setting in TASKS[task][3].items():
        path = dirs[task, name, SEEDS[task][0]]
        if setting.get("estimator") == "dni" and (path / "metrics.jsonl").exists():
            errors = [line.get("synthetic_error") for line in runs.read_metrics(path)]
            rows.append(f"| {name} | " + " ".join("–" if e is None else f"{e:.3g}" for e in errors) + " |")
    return "| setting | synthetic_error, epoch 1, 2, … |\n|---|---|\n" + "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copy-epochs", type=int, default=15)
    parser.add_argument("--language-epochs", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=HERE / "runs" / "dni")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--report-only", action="store_true", help="write the report without training")
    args = parser.parse_args()
    epochs = {"copy": args.copy_epochs, "language": args.language_epochs}
    dirs = {(t, s, seed): args.runs / t / f"{s.replace(' ', '_').replace(',', '')}_seed{seed}"
            for t in TASKS for s in TASKS[t][3] for seed in SEEDS[t]}
    jobs = [(dirs[t, s, seed], configs.full_config(TASKS[t][0], {**TASKS[t][1], "seed": seed},
                                                  {**TASKS[t][2], "epochs": epochs[t], "seed": seed,
                                                   **TASKS[t][3][s]}))
            for (t, s, seed) in dirs]
    if not args.report_only:
        grid.run(jobs, args.jobs)
    sections = [(f"{title}, {epochs[t]} epochs, seed {SEEDS[t][0]}", f"dni-{t}",
                 [(t, s, settings[s], dirs[t, s, SEEDS[t][0]]) for s in settings])
                for t, (_, _, _, settings, title) in TASKS.items()]
    grid.report(
        args.results, "dni", "# Synthetic gradients (DNI) against truncation\n\n"
        "Each task keeps its defaults (README) apart from K, W, the optimizer where named and the epochs. "
        "The last three columns are measured at the end of training on BPTT(K, K) chunks against full BPTT "
        "(W steps, W more after): the relative bias of plain truncation, of the same chunks with the run's DNI "
        "(DNI runs only), and the DNI's median relative error on the future gradient. The 'exact rel. bias at "
        "K' column is decompose's bias of the last-step loss (BPTT(W, 1) windows), as in the other tables. "
        "Seconds per epoch with two runs sharing two cores. Generated by `python analyses/dni_experiment.py "
        f"--copy-epochs {args.copy_epochs} --language-epochs {args.language_epochs}`.",
        sections, "ppl", final=FINAL)
    extra = "".join(f"\n## {TASKS[t][4]}: best valid perplexity by seed\n\n{seeds_table(t, dirs, 'ppl')}\n"
                    f"\n## {TASKS[t][4]}: the DNI's error by epoch\n\n{error_table(t, dirs)}\n" for t in TASKS)
    path = args.results / "dni.md"
    path.write_text(path.read_text() + extra)
    print(extra)


if __name__ == "__main__":
    main()
