import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def run_cli(capsys):
    """Run the command line in-process; return its exit code, stdout and stderr."""
    from biaskit.cli import main

    def invoke(*args):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        out = capsys.readouterr()
        return SimpleNamespace(code=code, out=out.out, err=out.err)

    return invoke
