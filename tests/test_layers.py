"""The layer contracts: biaskit never imports the trainers, the scripts sit above both; inside biaskit
the statistics and the core never import each other or the I/O, and the statistics need no torch. And the lint."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: import-linter's own dependency
    import tomli as tomllib

ROOT = Path(__file__).parent.parent


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())"], cwd=root, capture_output=True, text=True)


def test_the_layer_contract_holds():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


def planted(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess:
    """The lint of a copy of the repository with ``line`` appended to ``biaskit/<module>.py``."""
    for name in ("biaskit", "trainers", "analyses", "benchmarks", "pyproject.toml"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    with open(tmp_path / "biaskit" / f"{module}.py", "a") as fh:
        fh.write(f"\n{line}\n")
    return lint(tmp_path)


def test_the_contract_would_catch_an_upward_import(tmp_path):
    result = planted(tmp_path, "probe", "from trainers import loop  # an arrow running up")
    # and through the trainers' ``import biaskit``, the core's arrow reaches the I/O too
    assert result.returncode != 0 and "2 kept, 2 broken" in result.stdout
    assert "biaskit.probe -> trainers.loop" in result.stdout


@pytest.mark.parametrize("module, line, arrow, broken", [
    ("decay", "from .decompose import decompose  # statistics importing the core",
     "biaskit.decay -> biaskit.decompose", 2),  # and with it torch
    ("bias", "from .report import plot_bias  # statistics importing the I/O", "biaskit.bias -> biaskit.report", 1),
    ("norms", "import torch  # the registry importing torch", "biaskit.norms -> torch", 1),
    ("tails", "from . import audit  # the core importing the I/O", "biaskit.tails -> biaskit.audit", 1),
    ("recurrent", "from .decay import fit_decay  # the core importing the statistics",
     "biaskit.recurrent -> biaskit.decay", 1),
], ids=["stats-core", "stats-io", "registry-torch", "core-io", "core-stats"])
def test_the_contracts_would_catch_an_import_across_biaskit_layers(tmp_path, module, line, arrow, broken):
    result = planted(tmp_path, module, line)
    assert result.returncode != 0 and f"{4 - broken} kept, {broken} broken" in result.stdout, result.stdout
    assert arrow in result.stdout


def test_every_biaskit_module_has_a_layer():
    """A new module must be placed in the contracts: the base (errors, the registry), the statistics,
    the core or the I/O, each named in pyproject.toml."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    statistics, core = contracts[1]["source_modules"], contracts[3]["source_modules"]
    io = sorted(set(contracts[1]["forbidden_modules"]) - set(core))
    named = {*statistics, *core, *io, "biaskit.errors"}
    assert "biaskit.norms" in statistics and set(io) < set(contracts[3]["forbidden_modules"])
    package = ROOT / "biaskit"
    found = {f"biaskit.{path.stem}" for path in package.glob("*.py") if path.stem != "__init__"}
    found |= {f"biaskit.{path.parent.name}" for path in package.glob("*/__init__.py")}  # subpackages
    assert found == named, f"not in a layer: {sorted(found - named)}; gone: {sorted(named - found)}"


def test_ruff_finds_nothing():
    """pycodestyle, pyflakes, isort, bugbear and the branch ceiling (pyproject.toml, [tool.ruff])."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_commands_tasks_are_the_registered_ones():
    """``biaskit train TASK`` reads a task's module (its options and defaults); a run builds it through
    the ``biaskit.tasks`` entry point a checkpoint names: both must be the same module's ``build``."""
    from biaskit import checkpoint
    from trainers.cli import TASKS

    registered = checkpoint.registered(checkpoint.TASKS)
    assert {name: registered[name].value for name in TASKS} == \
        {name: f"{module.__name__}:build" for name, module in TASKS.items()}
