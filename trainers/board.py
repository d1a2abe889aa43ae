"""TensorBoard: the run's epoch lines as scalars, beside the user's other runs.

``biaskit train ... --tensorboard`` writes, under ``RUN_DIR/tensorboard``, every
number of each ``metrics.jsonl`` line (losses, the task's metric, K, the exact
relative bias and its upper limit, the paper's estimate, β with its interval,
speed) with the epoch as the step, through ``torch.utils.tensorboard``
(``pip install 'biaskit[tensorboard]'``). ``biaskit plot`` stays the way with
no extra dependency.
"""
from __future__ import annotations

from pathlib import Path

from biaskit.errors import InputError

FOLDER = "tensorboard"
#: metrics.jsonl keys and the TensorBoard tag each goes under (the rest go under "other/").
GROUPS = {"loss": ("train_loss", "valid_loss", "test_loss"), "truncation": ("K", "next_K", "K1", "K2"),
          "bias": ("rel_bias_exact", "rel_bias_exact_upper", "rel_bias_upper", "rel_bias_bound"),
          "decay": ("beta", "beta_low", "beta_high", "tau")}


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics key, e.g. ``bias/rel_bias_exact``."""
    return next((f"{group}/{key}" for group, keys in GROUPS.items() if key in keys), f"other/{key}")


class Board:
    """A SummaryWriter in the run directory; ``write(line)`` logs one epoch's line."""

    def __init__(self, run_dir, first_epoch: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError("--tensorboard needs the tensorboard package: pip install 'biaskit[tensorboard]'") \
                from None
        # purge_step drops events a crash left after the checkpoint being resumed
        self.writer = SummaryWriter(str(Path(run_dir) / FOLDER), purge_step=first_epoch + 1)

    def write(self, line: dict):
        for key, value in line.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag(key), value, global_step=line["epoch"])
        self.writer.flush()

    def close(self):
        self.writer.close()
