"""TensorBoard: the run's epoch lines as scalars, beside the user's other runs.

``biaskit train ... --tensorboard`` writes, under ``RUN_DIR/tensorboard``, every
number of each ``metrics.jsonl`` line with the epoch as the step, each in its
section (``tag``): loss, the task's metric (perplexity; nll, rmse, error_rate),
K, bias, decay, time, training. At each K update it adds the rule as text
(``K/rule``) and the run's training figure so far (metric, K, relative bias with
the paper's bound: ``biaskit plot``'s) as an image (``bias/figure``). Through
``torch.utils.tensorboard`` (``pip install 'biaskit[tensorboard]'``);
``biaskit plot`` stays the way with no extra dependency.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np

from biaskit.errors import InputError

from .adaptive import UpdateRecord
from .runs import plot_training

FOLDER = "tensorboard"
#: The section of each metrics.jsonl key that is not a split's metric: the update record's fields
#: declare theirs (``adaptive.UpdateRecord``): ``RECORD_SECTIONS``.
SECTIONS = {
    "loss": ("train_loss", "valid_loss", "test_loss"),
    "K": ("next_K", "K1", "K2"),
    "time": ("seconds", "tokens_per_s"),
    "training": ("lr", "synthetic_share", "dni_loss"),
}
RECORD_SECTIONS = {f.name: f.metadata["section"] for f in fields(UpdateRecord)}
#: A split's metric (``valid_ppl``, ``test_rmse``) goes under its metric's section, named here or as logged.
METRIC_SECTIONS = {"ppl": "perplexity"}
SPLITS = ("train", "valid", "test")


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics key, e.g. ``bias/rel_bias_exact``, ``perplexity/valid_ppl``;
    a key no section knows goes under ``other/``."""
    section = RECORD_SECTIONS.get(key) or next((name for name, keys in SECTIONS.items() if key in keys), None)
    split, _, metric = key.partition("_")
    if section is None and split in SPLITS and metric:
        section = METRIC_SECTIONS.get(metric, metric)
    return f"{section or 'other'}/{key}"


class Board:
    """A SummaryWriter in the run directory; ``write(line)`` logs one epoch's line."""

    def __init__(self, run_dir, first_epoch: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError("--tensorboard needs the tensorboard package: pip install 'biaskit[tensorboard]'") \
                from None
        # purge_step drops events a crash left after the checkpoint being resumed
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(str(self.run_dir / FOLDER), purge_step=first_epoch + 1)

    def write(self, line: dict):
        """Log one epoch's line, already appended to metrics.jsonl: its numbers; at a K update, the
        rule and the training figure drawn from the log."""
        step = line["epoch"]
        for key, value in line.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag(key), value, global_step=step)
        record = UpdateRecord.from_line(line)
        if record.K_rule is not None:
            self.writer.add_text("K/rule", f"K {record.K_in_use} → {record.K}: {record.K_rule}", global_step=step)
            fig = plot_training([self.run_dir])
            fig.canvas.draw()  # Agg: no pyplot, no window
            image = np.asarray(fig.canvas.buffer_rgba())[..., :3]
            self.writer.add_image("bias/figure", image, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()
