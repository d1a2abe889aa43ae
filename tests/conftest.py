import os
from types import SimpleNamespace

# One thread for numpy's OpenBLAS too, set before it loads: its threads spin like OpenMP's.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: on a busy machine two spinning OpenMP threads per process made the suite
# 12x slower (13 min against 66 s); one thread costs little on a quiet one.
torch.set_num_threads(1)


@pytest.fixture
def run_cli(capsys):
    """Run the command line in-process; return its exit code, stdout and stderr."""
    from trainers.cli import main

    def invoke(*args):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        out = capsys.readouterr()
        return SimpleNamespace(code=code, out=out.out, err=out.err)

    return invoke
