"""The mutation benchmark's mutants point at code that exists: each one's text occurs exactly once in
its file, so a refactoring cannot leave a mutant that silently mutates nothing."""
from pathlib import Path

import pytest

from benchmarks.mutants import MUTANTS

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_mutant_finds_its_code_once(mutant):
    assert (ROOT / mutant.file).read_text().count(mutant.find) == 1
