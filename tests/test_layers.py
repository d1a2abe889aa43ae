"""The layer contract: biaskit never imports the trainers; the scripts sit above both. And the lint."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())"], cwd=root, capture_output=True, text=True)


def test_the_layer_contract_holds():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_contract_would_catch_an_upward_import(tmp_path):
    for name in ("biaskit", "trainers", "analyses", "benchmarks", "pyproject.toml"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    with open(tmp_path / "biaskit" / "probe.py", "a") as fh:
        fh.write("\nfrom trainers import loop  # an arrow running up\n")
    result = lint(tmp_path)
    assert result.returncode != 0 and "0 kept, 1 broken" in result.stdout
    assert "biaskit.probe -> trainers.loop" in result.stdout


def test_ruff_finds_nothing():
    """pycodestyle, pyflakes, isort, bugbear and the branch ceiling (pyproject.toml, [tool.ruff])."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
