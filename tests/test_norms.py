"""The norm registry: torch-free, and what it says each of decompose's options measures is what decompose does."""
from __future__ import annotations

import inspect
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xarray as xr
from torch import nn

import biaskit
from biaskit import norms
from biaskit.decay import fit_decay
from biaskit.errors import InputError
from biaskit.norms import NORMS

ROOT = Path(__file__).parent.parent


def test_the_statistics_and_the_registry_import_no_torch():
    """``import biaskit`` imports the core (its ``__init__`` exports ``decompose``), so the package
    is stood in for by a bare one over the same folder: only the modules' own imports run."""
    code = ("import sys, types; package = types.ModuleType('biaskit'); package.__path__ = [sys.argv[1]]; "
            "sys.modules['biaskit'] = package; import biaskit.decay, biaskit.bias, biaskit.norms; "
            "print(sorted(name for name in sys.modules if name.split('.')[0] == 'torch'))")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "biaskit")], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_on_is_decomposes_default():
    defaults = inspect.signature(biaskit.decompose).parameters
    for norm in NORMS.values():
        if norm.option:
            assert defaults[norm.option].default is norm.on


@pytest.fixture(scope="module")
def gru():
    torch.manual_seed(0)
    module, head = nn.GRU(2, 3, batch_first=True).double(), nn.Linear(3, 2).double()
    system = biaskit.wrap(module, head, nn.CrossEntropyLoss(reduction="none"))
    return system, torch.randn(6, 5, 2, dtype=torch.float64), torch.randint(0, 2, (6,))


@pytest.mark.parametrize("wanted", [set(c) for r in range(len(NORMS) + 1) for c in itertools.combinations(NORMS, r)],
                         ids=lambda w: "+".join(sorted(w)) or "none")
def test_the_options_measure_the_norms_wanted(gru, wanted):
    system, x, y = gru
    ds = biaskit.decompose(system, x, y, groups=3, metric_rows=10, probes=2, **norms.options(wanted))
    assert {name for name in NORMS if name in ds} == wanted | {"phi"}


def test_the_norms_without_the_parameter_pass_are_what_state_gradient_norms_measures(gru):
    system, x, y = gru
    ds = biaskit.state_gradient_norms(system, x, y)
    assert {name for name in NORMS if name in ds} == {name for name, n in NORMS.items() if not n.parameter_pass}


def test_a_missing_norm_names_the_option_that_left_it_out():
    table = xr.Dataset({"phi": (("sample", "lag"), [[1.0, 0.5, 0.25]] * 3)})
    with pytest.raises(InputError, match=r"no 'psi' variable \(decompose\(\.\.\., psi=False\) leaves it out; "
                                         r"psi=True, the default, measures it\)"):
        fit_decay(table, norm="psi")
    with pytest.raises(InputError, match=r"metric=False\) leaves it out; metric=None, the default"):
        fit_decay(table, norm="phi_mahalanobis")
    with pytest.raises(InputError, match="unknown norm 'chi'"):
        norms.options(["chi"])
