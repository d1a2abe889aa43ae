"""The README's commands are the ones CI runs."""
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_ci_runs_the_readme_test_command():
    command = ROOT.joinpath(".ci/run").read_text().strip().splitlines()[-1]
    assert command in ROOT.joinpath("README.md").read_text()
    assert "pytest" in command and "torch==2.13.0" in command
