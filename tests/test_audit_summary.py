"""The audit's summary, built once: its text is the one printed before (byte for byte), its HTML
holds the same numbers; ``alpha`` against the deprecated ``level``; the DNI part built by ``audit``."""
from __future__ import annotations

import html
import re
from collections import Counter

import pytest
import torch
import xarray as xr
from torch import nn

import biaskit
from biaskit import InputError, synthetic_bias
from biaskit.audit import audit
from biaskit.probe import Windows
from biaskit.synthetic import warm_up
from trainers import dni
from trainers.tasks.token_model import TokenLSTM

W, K = 12, 4

#: What ``summary()`` printed for this audit before its tables were built once (the code of 49b7901,
#: with ``result.synthetic`` set from ``warm_up`` and ``synthetic_bias`` as biaskit analyze set it).
BEFORE = """\
LSTM: 4 windows of 12 steps, losses at every step, ||E g|| = 0.6933

recommended K: the exact relative bias below delta at 90% confidence (4 groups of windows)
  delta        K   upper limit   exact at K
  0.5          0        0.2107        0.191
  0.1          2       0.06026      0.05269
  1e-06   not reached for K <= 11: the exact bias's upper limit stays above 1e-06 for every K <= 11 (at K = 11: \
0.00019); to resolve it: a window longer than 12 steps, so that longer K can be measured

the paper's estimate (kappa-hat from the decay of each norm) beside the batch's exact kappa:
norm                  beta [95% interval]           tau  A-1   kappa(0.5)  kappa(0.1)kappa(1e-06)  bound holds
--------------------------------------------------------------------------------------------------------------
Euclidean ||dL/dh||   0.6625 [0.2693, 1.6299]        10  no             1           3 not reached         100%  \
(unreliable)
Mahalanobis           0.6335 [0.2881, 1.3929]        10  no             2           4 not reached         100%  \
(unreliable)
exact psi             0.6580 [0.2366, 1.8296]        10  no             2           4 not reached         100%  \
(unreliable)
exact (this batch)                                                      0           1          11
(unreliable: from lag 11 on, the lags' means are dominated by a few windows, so beta's interval may miss: use more \
windows, or a window length of at most 11)

exact relative bias at the model's own K = 4: 0.01358

synthetic gradients, BPTT(K, K) chunks at K = 4 over 4 windows of 12 steps (+12 later):
  relative bias against full BPTT: 0.1308 truncated, 0.5211 with the DNI
  the DNI's relative error on the future gradient (median over boundaries): 4.33"""


@pytest.fixture(scope="module")
def setup():
    """A two-layer token LSTM in float64 (losses at every step, most targets 0, so some K are
    certified), a DNI with random weights, and 4 windows of 12 steps, each with its burn-in and
    12 steps after it."""
    torch.manual_seed(0)
    model = TokenLSTM(vocab=5, embedding=3, hidden=4, layers=2).double().eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, 5, (4, 2 * W), generator=gen)
    y = torch.randint(0, 5, (4, 2 * W), generator=gen) * (torch.rand(4, 2 * W, generator=gen) < 0.4)
    burn = torch.randint(0, 5, (4, W), generator=gen)
    torch.manual_seed(1)
    module = dni.SHAPES["layer"]({"size": 16, "hidden": 3}).double()
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    return model, module, Windows(burn, x, y, torch.arange(4))


def run(setup, **kwargs):
    model, module, windows = setup
    return audit(model.system(), windows.inputs[:, :W], windows.targets[:, :W], loss_at="every", K=K,
                 deltas=[0.5, 0.1, 1e-6], dni=module, dni_windows=windows, **kwargs)


@pytest.fixture(scope="module")
def result(setup):
    return run(setup, alpha=0.1)


def test_the_text_is_the_summary_printed_before(result):
    assert result.tables.as_text() == result.summary() == repr(result) == BEFORE


def test_the_html_holds_the_numbers_of_the_text(result):
    number = r"\d+(?:\.\d+)?(?:e-\d+)?"
    words = html.unescape(re.sub(r"<[^>]+>", " ", result.tables.as_html()))
    assert Counter(re.findall(number, words)) == Counter(re.findall(number, result.summary()))
    assert "δ" in words and "κ̂(0.5)" in words and "not reached for K ≤ 11" in words  # the Greek, in HTML
    assert result._repr_html_().startswith('<div class="biaskit-audit">' + result.tables.as_html())


@pytest.mark.filterwarnings("ignore::biaskit.decay.UnreliableFitWarning")
def test_level_still_works_with_a_warning_and_equals_alpha(setup, result):
    with pytest.warns(DeprecationWarning, match="alpha = 1 - level"):
        old = run(setup, level=0.9)
    assert old.summary() == result.summary()
    xr.testing.assert_identical(old.dataset, result.dataset)
    ds = result.dataset
    with pytest.warns(DeprecationWarning, match="alpha = 1 - level"):
        positional = biaskit.exact_kappa(ds, [0.1], 0.9)  # as trainers.adaptive passes it
    xr.testing.assert_identical(positional, biaskit.exact_kappa(ds, [0.1], alpha=0.1))
    with pytest.warns(DeprecationWarning, match="alpha = 1 - level"):
        fit = biaskit.fit_decay(ds, level=0.9)
    assert fit.to_attrs() == biaskit.fit_decay(ds, alpha=0.1).to_attrs()
    with pytest.raises(InputError, match="not both"):
        biaskit.exact_kappa(ds, [0.1], alpha=0.1, level=0.9)
    with pytest.raises(InputError, match="at most 0.5"):
        biaskit.exact_kappa(ds, [0.1], alpha=0.6)


def test_the_dni_part_is_synthetic_bias_measured_directly(setup, result):
    model, module, windows = setup
    system = model.system()
    start, memory = warm_up(system, module, windows.burn, K)
    direct = synthetic_bias(system, windows.inputs, windows.targets, K, module, start=start, memory=memory,
                            lookahead=W)
    xr.testing.assert_identical(result.synthetic, direct)
    with pytest.raises(InputError, match="dni_windows"):
        audit(model.system(), windows.inputs[:, :W], windows.targets[:, :W], dni=module, K=K)
