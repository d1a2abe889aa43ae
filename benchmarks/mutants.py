"""Mutation testing before a release: plant one deliberate bug at a time and check that the tests see it.

    python benchmarks/mutants.py [--only NAME ...] [--list] [--timeout S] [--no-baseline]

Each mutant names a file, an exact source snippet and its replacement, and the
test files (or test node ids) that should catch it. For each mutant the script
copies the repository's files (``git ls-files``: the tracked files as they
are in the working tree, plus untracked files git does not ignore, so a new
test counts before it is committed) into a temporary folder, applies the
replacement there, runs ``python -m pytest -x -q -p no:cacheprovider TESTS`` in
that folder with ``OMP_NUM_THREADS=1`` and a per-mutant timeout, and records

- killed:   the tests fail (pytest exit status 1),
- survived: the tests pass,
- timeout:  the tests ran past the timeout (their process group is killed),
- error:    anything else (a collection error, no tests collected, ...).

The developer's tree is never written to. A snippet that is not found exactly
once in its file is a stale mutant, a bug in this list: the script refuses to
run any mutant until it is fixed. Before the mutants, one baseline run of the
selected mutants' tests on the unmutated copy checks that they pass (a failing
baseline would make every mutant look killed) and that the copy's own
``biaskit`` and ``trainers`` are the ones imported, not an installed copy.

The result is a markdown table (mutant, file, what it breaks, result, seconds)
and the line "N tried, K killed, S survived". The exit status is 1 if any
mutant survived that is not marked ``equivalent=True`` with a reason (or one
so marked was killed, so the mark is wrong), or if any ended in an error; 2 if
the list is stale or the baseline fails.

Everything runs one pytest process at a time: the machine this was written on
has two shared cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT = 600


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    find: str
    replace: str
    breaks: str
    tests: tuple[str, ...]
    equivalent: bool = False
    reason: str = ""  # why an equivalent mutant computes the same numbers for every input


D, F, N, TA = "biaskit/decompose.py", "biaskit/fastpath.py", "biaskit/cotangents.py", "biaskit/tails.py"
B, Y, REC, CK = "biaskit/bias.py", "biaskit/decay.py", "biaskit/recurrent.py", "biaskit/cells.py"
SYN, TB, AD, BA = "biaskit/synthetic.py", "trainers/tbptt.py", "trainers/adaptive.py", "biaskit/bands.py"
T_DEC, T_BIAS, T_DECAY = "tests/test_decompose.py", "tests/test_bias.py", "tests/test_decay.py"
T_CELLS, T_AD, T_TB = "tests/test_cells.py", "tests/test_adaptive.py", "tests/test_tbptt.py"
T_DNI, T_DIST, T_INV = "tests/test_dni.py", "tests/test_distributed.py", "tests/test_invariants.py"
T_EVERY, T_KINDS = "tests/test_every_step.py", "tests/test_cell_kinds.py"

MUTANTS: list[Mutant] = [
    # --- tails.py: the running tails and their Gram expansions ---------------------------------------------
    Mutant("tail-carry-dropped", TA, "self.total_sq.append(s.carry_sq + 2 * _before(s.v) + _within(s.TT))",
           "self.total_sq.append(2 * _before(s.v) + _within(s.TT))",
           "the total tail's norm forgets the carry from earlier chunks", (T_DEC, T_INV)),
    Mutant("tail-carry-forgets-chunks", TA, "carry_t += self.T.sum(0)", "carry_t.copy_(self.T.sum(0))",
           "whole products: the total carry holds only the last chunk (carry = ..., not +=)", (T_DEC, T_INV)),
    Mutant("group-carry-forgets-chunks", TA, "carry_g += self.X.sum(1)", "carry_g.copy_(self.X.sum(1))",
           "whole products: each group's carry holds only the last chunk", (T_DEC, T_INV)),
    Mutant("group-dot-carry-dropped", TA, "_before(s.W + s.y)", "_before(s.y)",
           "<group tail, total tail> loses the group carry's dot with the chunk's totals", (T_DEC, T_INV)),
    Mutant("before-inclusive", TA, "return values.cumsum(-1) - values", "return values.cumsum(-1)",
           "_before sums i <= j instead of i < j", (T_DEC,)),
    Mutant("within-unshifted", TA,
           "return torch.cat([inclusive.new_zeros(*inclusive.shape[:-1], 1), inclusive[..., :-1]], dim=-1)",
           "return inclusive", "_within includes step j itself in the tail before j", (T_DEC,)),
    Mutant("lag-contribution-rowsum", TA, "self.lag_sq.append(s.TT.diagonal())", "self.lag_sq.append(s.TT.sum(1))",
           "lag_contribution: a row of the Gram matrix, not its diagonal", (T_DEC, T_INV)),
    Mutant("by-K-unflipped", D, "flip(torch.cat(tails.total_sq))", "torch.cat(tails.total_sq)",
           "tails indexed by step, not by K (the lag's sign)", (T_DEC,)),
    Mutant("detach-offset", D, "detach = None if K is None or K >= s else s - K\n",
           "detach = None if K is None or K >= s else s - K + 1\n",
           "truncated_gradient detaches one step late (K keeps K-1 lags)", (T_DEC,)),
    Mutant("direct-term-dropped", D,
           "direct = _direct(system, readout, sweep.outputs if every else sweep.output, targets, windows.masks, every)",
           "direct = {}",
           "the readout's direct gradient is left out of the full gradient", (T_DEC,)),
    Mutant("tied-readout-apart", D,
           'return {n: theta_ids.get(id(p), "readout." + n) for n, p in system.readout_params().items()}',
           'return {n: "readout." + n for n, p in system.readout_params().items()}',
           "a readout weight tied to θ counted as a separate coordinate", (T_DEC, T_INV)),
    Mutant("output-cotangent-first-chunk", D, "if sweep.out_cotangent is not None and sl.stop == R:",
           "if sweep.out_cotangent is not None and sl.start == 0:",
           "(output, state) steps: the output's cotangent enters the first chunk, not the last step's",
           (T_CELLS, T_DEC, T_INV)),
    # --- fastpath.py: outer products, rows, ψ, chunks ------------------------------------------------------------
    Mutant("fast-wih-hidden-delta", F, '("weight_ih" + suffix, di, fast.inputs[layer][sl])',
           '("weight_ih" + suffix, dh, fast.inputs[layer][sl])',
           "GRU: W_ih's product uses the hidden gates' cotangents", (T_DEC,)),
    Mutant("fast-whh-reads-c", F, "[layer.entering[0] for layer in layers]", "[layer.entering[-1] for layer in layers]",
           "LSTM: W_hh multiplies c instead of h", (T_DEC,)),
    Mutant("fused-from-zeros", F, "hx = tuple(part[None].contiguous() for part in hs)",
           "hx = tuple(torch.zeros_like(part[None]) for part in hs)",
           "the fused forward ignores the starting state", (T_DEC,)),
    Mutant("metric-push-forget-gate", CK, "dc = f * (1 - f) * df * hs[1] + ", "dc = ",
           "the fast metric's LSTM probes miss the forget gate's move", (T_KINDS, T_DEC)),
    Mutant("metric-push-reset-gate", CK, "(di_n + dr * h_n + r * dh_n)", "(di_n + r * dh_n)",
           "the fast metric's GRU probes miss the reset gate's move", (T_KINDS, T_DEC)),
    Mutant("metric-push-biases", F, "moved += v[:, None] if by is None else", "moved += 0 if by is None else",
           "the fast metric's probes leave the biases still", (T_DEC,)),
    Mutant("metric-push-embedding", F, 'dx = tangents["encoder.weight"][:, inputs] if', "dx = None if",
           "the fast metric's probes leave an embedding still", (T_DEC,)),
    Mutant("metric-push-layer-below", F, "        dx = moved[0]\n", "        dx = None\n",
           "the fast metric's probes do not carry a layer's move up to the next", (T_DEC,)),
    Mutant("metric-push-any-encoder", F,
           'return not any(n.startswith("encoder.") for n in params) or lookup(system, params)',
           "return True", "the fast metric's probes ignore a trained encoder that is not an embedding", (T_DEC,)),
    Mutant("metric-through-torch-func", F, "if metric_applies(system, params) else None", "if False else None",
           "the fast path's metric probes go through torch.func (imports torch._dynamo)", (T_DEC,)),
    Mutant("direct-one-group", D, "m.to(losses.dtype), retain_graph=True",
           "masks[0].to(losses.dtype), retain_graph=True", "every group gets the first group's readout gradient",
           (T_DEC,)),
    Mutant("cudnn-tf32-kept", CK, 'setattr(flags, name, off)', 'setattr(flags, name, before)',
           "cuDNN runs the fused float32 forward in TF32 on a GPU", (T_DEC,)),
    Mutant("cell-scan-from-start", CK, "f[t - 1], c_prev[t - 1], out=c_prev[t])", "f[t - 1], c_prev[0], out=c_prev[t])",
           "LSTM: each step's cell state is scanned from the window's first, not the step before", (T_KINDS, T_DEC)),
    Mutant("fast-psi-abs", F, "sq = sq + delta.pow(2).sum(-1) * by.pow(2).sum(-1)",
           "sq = sq + delta.pow(2).sum(-1) * by.abs().sum(-1)", "ψ: ||δ aᵀ||² taken as ||δ||²·||a||₁", (T_DEC,)),
    Mutant("fast-chunk-first-hidden", F, "fast.hidden[layer][sl]", "fast.hidden[layer][:sl.stop - sl.start]",
           "every chunk's W_hh product reads the first chunk's hidden states", (T_DEC,)),
    Mutant("fast-rows-total-carry-forgets-chunks", F, "carry_t += self.T.sum(0)", "carry_t.copy_(self.T.sum(0))",
           "rows: the total carry holds only the last chunk", (T_DEC, T_INV)),
    Mutant("fast-rows-group-carry-forgets-chunks", F,
           "carry_g.view(G, p, q).baddbmm_(self.dg.transpose(1, 2), self.ag)",
           "carry_g.view(G, p, q).copy_(torch.bmm(self.dg.transpose(1, 2), self.ag))",
           "rows: each group's carry holds only the last chunk", (T_DEC, T_INV)),
    Mutant("fast-rows-own-carry-dropped", F, "u=(self.dg * own).sum(-1).view(G, -1, m).sum(-1), ", "",
           "rows: a group's tail forgets its carry's dot with the chunk's rows", (T_DEC, T_INV)),
    Mutant("fast-rows-offset-zero", F, "own = self.K[..., self.offset:self.offset + B]", "own = self.K[..., :B]",
           "rows under a process group: every rank pairs its groups with rank 0's windows", (T_DIST,)),
    Mutant("fast-rows-cross-local", F, "self.masks, self.K.sum(-1))", "self.masks, own.sum(-1))",
           "rows under a process group: <group, total> within a chunk sees this rank's windows only", (T_DIST,)),
    Mutant("carries-split-transposed", TA, "carry_g.view(G, -1, sum(columns)).split(columns, dim=2)",
           "carry_g.view(G, sum(columns), -1).split(columns, dim=1)",
           "a layer's side-by-side block split back along the wrong axis: a tied readout lands on wrong entries",
           (T_INV,)),
    Mutant("lookup-padding-kept", F, "cot = cot * (tokens != system.encoder.padding_idx)[..., None]", "cot = cot",
           "an embedding's padding row is credited with gradient it never gets", (T_DEC,)),
    Mutant("lookup-groups-merged", F, "index_add_(0, (group * V + self.tokens).flatten()",
           "index_add_(0, (self.tokens).flatten()",
           "every window's embedding gradient lands in the first group's carry",
           (T_DEC,)),
    Mutant("lookup-cross-is-own", F, 'XT=torch.einsum("gb,jib->gij", self.masks, spread))', "XT=XX)",
           "<group tail, total tail> within a chunk: the embedding's group products paired with themselves",
           (T_DEC,)),
    Mutant("denormals-not-restored", "biaskit/denormals.py", "set_flush(before)", "set_flush(False)",
           "decompose leaves the caller's flush-denormal setting off", (T_DEC,)),
    Mutant("denormals-main-thread-only", "biaskit/denormals.py", "pause(OMP_PAUSE_SOFT)  #", "pause  #",
           "flushing reaches the calling thread, not the OpenMP workers already running", (T_DEC,)),
    # --- norms.py ---------------------------------------------------------------------------------------------
    Mutant("mahalanobis-diagonal", N, 'torch.einsum("...i,ij,...j->...", unit, metric, unit)',
           'torch.einsum("...i,ii,...i->...", unit, metric, unit)',
           "Mahalanobis norm uses only the metric's diagonal", (T_DEC,)),
    Mutant("metric-normaliser", N, "return u.T @ u / u.shape[0]", "return u.T @ u / probes",
           "estimated metric divided by the probes, not probes × rows", (T_DEC,)),
    # --- bias.py: exact_kappa ---------------------------------------------------------------------------------
    Mutant("ustat-is-vstat", B, "a = (tail_sq[:, 0] - group_tail_sq.sum(1)) / pairs", "a = tail_sq[:, 0]",
           "||E T_K||² estimated by the plug-in (noise-biased) V-statistic", (T_BIAS, T_INV)),
    Mutant("jackknife-scale", B, "scale = (G - 1) / G", "scale = 1 / G",
           "jackknife variance without its (G-1) inflation", (T_BIAS, T_INV)),
    Mutant("fieller-lower-root", B, "root = (half + np.sqrt(", "root = (half - np.sqrt(",
           "Fieller's lower root taken as the upper limit", (T_BIAS, T_INV)),
    Mutant("fieller-normal-quantile", B, "factor = stats.t.ppf(level, G - 1)", "factor = stats.norm.ppf(level)",
           "normal quantile instead of t with G-1 degrees of freedom", (T_BIAS, T_INV)),
    Mutant("beyond-exponent", B, "return last * rate ** (np.asarray(K) - R + 2) / (1 - rate)",
           "return last * rate ** (np.asarray(K) - R + 1) / (1 - rate)",
           "tail past the window starts one lag early (a factor 1/β too large)", (T_BIAS, T_INV)),
    Mutant("beyond-not-added", B, "upper[inside] = within[K[inside]] + past_window",
           "upper[inside] = within[K[inside]]", "the tail beyond the window is left out of the limit", (T_BIAS, T_INV)),
    # --- bias.py: Eq. 23-25 and calibration ---------------------------------------------------------------------
    Mutant("eq23-tails-swapped", B, 'shift = 0 if tail == "printed" else 1', 'shift = 1 if tail == "printed" else 0',
           "Eq. 23's printed and proof tails swapped", (T_BIAS,)),
    Mutant("eq24-no-running-max", B, "grad_lower = np.maximum.accumulate(lower)[np.minimum(K, R - 1)]",
           "grad_lower = lower[np.minimum(K, R - 1)]", "Eq. 24's denominator at k = K, not the max over k <= K",
           (T_BIAS,), equivalent=True,
           reason="for lag means >= 0 and beta >= 0 (every norm table and fit) the sequence sum_{j<=k} mean_j - "
                  "E_hat(k) never falls: the sum rises by mean_{k+1} while E_hat falls by mean_{k+1} (k+1 < tau), "
                  "stays (k = tau-1, printed) or falls by mean_tau beta^(k-tau) (k >= tau; beta^(k+1-tau) for the "
                  "proof's tail), or it is -inf throughout (beta >= 1); rounding is monotone, so the running max "
                  "over k <= K is the value at K, bit for bit (checked on 20,000 random tables at scales 1e-30 to "
                  "1e30). Only a negative mean or beta, which no norm table or fit gives, tells them apart"),
    Mutant("calibration-strict", B, "holds = estimate >= exact", "holds = estimate > exact",
           "calibration: a tie (bound = exact bias = 0) does not hold", (T_BIAS,)),
    # --- decay.py ---------------------------------------------------------------------------------------------
    Mutant("eq21-two-step-slopes", Y, "return np.arange(L - 1), np.arange(1, L)",
           "return np.arange(L - 2), np.arange(2, L)",
           "Eq. 21's max over two-step slopes, missing the last lag's step", (T_DECAY,)),
    Mutant("eq22-intercept-shift", Y, "pseudo = np.log(mean) + table / mean - 1.0",
           "pseudo = np.log(mean) + table / mean + 1.0",
           "regression's pseudo-values shifted: slope right, fitted mean and band e² too high", (T_DECAY, T_INV)),
    Mutant("regression-interval-alpha", Y, "return np.exp(self.results.conf_int(alpha=alpha)[1])",
           "return np.exp(self.results.conf_int(alpha=alpha / 2)[1])", "regression interval at the wrong level",
           (T_DECAY,)),
    Mutant("slope-se-root-n", Y, "self.slope_se = np.sqrt((spread**2).sum(axis=0)) / (n * span)",
           "self.slope_se = np.sqrt((spread**2).sum(axis=0)) / (np.sqrt(n) * span)",
           "max-type slopes' standard errors √n too large", (T_DECAY,)),
    # --- cells.py: each kind's step, backward and tangent -----------------------------------------------------------
    Mutant("gru-reset-outside", CK, "n = torch.tanh(i_n + r * h_n)\n        return ((1 - z) * n + z * h,)",
           "n = torch.tanh(r * (i_n + h_n))\n        return ((1 - z) * n + z * h,)",
           "GRU candidate: reset gate applied to the input gates too", (T_KINDS, T_DEC)),
    Mutant("lstm-gate-order", CK, "i, f, g, o = (gi + gh).chunk(4, dim=1)", "f, i, g, o = (gi + gh).chunk(4, dim=1)",
           "LSTM input and forget gates swapped", (T_KINDS, T_DEC)),
    Mutant("gru-backward-direct-path", CK, "torch.addcmul(delta_h[t] @ W_hh, dh, z[t], out=b_h[t - 1])",
           "torch.mm(delta_h[t], W_hh, out=b_h[t - 1])",
           "GRU backward: the state cotangent misses h's direct path through the update gate", (T_KINDS, T_DEC)),
    Mutant("lstm-backward-c-from-h", CK, "torch.mul(dc, f[t], out=b_c[t - 1])", "torch.mul(dh, f[t], out=b_c[t - 1])",
           "LSTM backward: the cell state's cotangent carried from dh, not dc", (T_KINDS, T_DEC)),
    # --- recurrent.py ---------------------------------------------------------------------------------------------
    Mutant("flatten-part-major", REC,
           "torch.cat([part[layer] for layer in range(self.num_layers) for part in parts], dim=1)",
           "torch.cat([part[layer] for part in parts for layer in range(self.num_layers)], dim=1)",
           "flatten: h of every layer then c, not layer by layer", (T_DEC,)),
    Mutant("unflatten-c-is-h", REC, "torch.stack([hs[i] for hs in layers])", "torch.stack([hs[0] for hs in layers])",
           "unflatten returns h in place of c", (T_DNI,)),
    Mutant("reachability-guard-off", REC,
           "if not torch.allclose(a, b, rtol=1e-3, atol=1e-5 * max(scale, 1e-30) + 1e-12):",
           "if False:", "a parameter functional_call cannot reach is measured as zero, not refused", (T_CELLS,)),
    Mutant("fused-chunk-detached", REC, "(inp.transpose(0, 1) if self.time_major else inp, self.unflatten(state))",
           "(inp.transpose(0, 1) if self.time_major else inp, self.unflatten(state.detach()))",
           "a module's fused chunk cuts the gradient to the state entering it", (T_KINDS, T_DNI)),
    # --- bands.py -----------------------------------------------------------------------------------------------
    Mutant("gate-norms-without-bias", BA, 'if f"bias_{kind}{suffix}" in params:\n                sq += size',
           'if f"bias_{kind}{suffix}" in params:\n                sq += 0 * size',
           "every-step ψ: a row's bias products left out of its norm", (T_EVERY,)),
    Mutant("gate-norms-padding-counted", BA, "sq += cots[-1].pow(2).sum(-1) * kept", "sq += cots[-1].pow(2).sum(-1)",
           "every-step ψ: an embedding's padding row counted as a product", (T_EVERY,)),
    Mutant("gate-norms-windows-reversed", BA,
           "return Band(grads, entering, sq.clamp_min(0).sqrt().reshape(n, -1).sum(0))",
           "return Band(grads, entering, sq.clamp_min(0).sqrt().reshape(n, -1).sum(0).flip(0))",
           "every-step ψ, all groups in one pull: each window given another's norms", (T_EVERY,)),
    # --- synthetic.py -------------------------------------------------------------------------------------------
    Mutant("warm-up-from-burn-start", SYN, "if (xb.shape[1] - t - 1) % K == 0:", "if (t + 1) % K == 0:",
           "warm_up counts DNI boundaries from the burn-in's start, not aligned to the window", (T_DNI, T_INV)),
    Mutant("dni-chunks-misaligned", SYN, "next_carry = h if stop == split else next_carry",
           "next_carry = h if begin == split else next_carry",
           "synthetic_bias carries each backward's state from the piece before its split", (T_DNI, T_EVERY)),
    Mutant("chunk-losses-before-pos", SYN, "if begin >= pos:", "if stop > carry_pos:",
           "BPTT(K1, K2): the K1 - K2 burn-in steps' losses counted too", (T_EVERY,)),
    # --- tbptt.py -----------------------------------------------------------------------------------------------
    Mutant("tbptt-split-from-start", TB, "split = min(max(self.carry_pos, end - (K1 - K2)), end)",
           "split = min(max(self.carry_pos, start - (K1 - K2)), end)",
           "BPTT(K1, K2) reaches K1 back from the first loss, not the last", (T_TB,)),
    Mutant("tbptt-normalise-by-K2", TB, ".loss(out, self.targets[:, start:end]).mean()",
           ".loss(out, self.targets[:, start:end]).sum() / (out.shape[0] * K2)",
           "a short last window normalised by K2, not by its own loss count", (T_TB,)),
    Mutant("trained-bias-of-K2-chunks", TB, "probe.targets, K2, start=probe.start, K1=K1)",
           "probe.targets, K2, start=probe.start, K1=K2)",
           "the logged rel_bias_trained is BPTT(K2, K2)'s, not the trained BPTT(K1, K2)'s", (T_EVERY,)),
    Mutant("trained-bias-from-zeros", TB, "probe.targets, K2, start=probe.start, K1=K1)",
           "probe.targets, K2, start=None, K1=K1)",
           "rel_bias_trained measured from a zero state, not the burn-in's", (T_EVERY,)),
    # --- adaptive.py: the controller ----------------------------------------------------------------------------
    Mutant("controller-logs-K-plus-1", AD, 'record.rel_bias_exact = float(exact["rel_bias"].sel(K=K))',
           'record.rel_bias_exact = float(exact["rel_bias"].sel(K=K + 1))',
           "the log holds the exact bias at K+1, not the K in use", (T_AD,)),
    Mutant("planned-windows-without-square", AD,
           "needed = windows * ((upper - point) / (PLANNED_SHARE * (delta - point))) ** 2",
           "needed = windows * ((upper - point) / (PLANNED_SHARE * (delta - point)))",
           "the next update's windows scale with the limit's half-width, not its square",
           ("tests/test_controller_rules.py",)),
    Mutant("planned-windows-not-drawn", AD,
           "count=count_windows, generator=generator",
           "count=self.windows, generator=generator",
           "the update plans fewer windows and draws all of them", ("tests/test_controller_rules.py",)),
    Mutant("controller-forgets-burn-in", AD,
           "start=probe.start, **measure,\n                                       groups=max",
           "start=None, **measure,\n                                       groups=max",
           "the controller decomposes from zeros, not the burn-in's state", (T_AD,)),
    Mutant("controller-K-off-by-one", AD, 'return int(Ks[below.argmax()]), True, "certified"',
           'return int(Ks[below.argmax()]) + 1, True, "certified"',
           "the controller picks one past the smallest K below δ", (T_AD,)),
    Mutant("controller-jumps-when-unresolved", AD, "    if resolved:\n        return K_max,",
           "    if True:\n        return K_max,", "an unresolved mean gradient sends K to K_max instead of keeping it",
           (T_AD, T_INV)),
    Mutant("controller-holds-when-missing", AD, "if lower_in_use > delta:", "if False:",
           "a K in use that evidently misses δ is kept instead of doubled", (T_AD,)),
    Mutant("lower-limit-no-bonferroni", B, "b_high = b + factor * np.sqrt(v_b)", "b_high = b",
           "the lower limit divides by the denominator's estimate, not its upper limit", (T_INV,)),
    # --- distributed: the sums that define the bias ----------------------------------------------------------------
    Mutant("dist-direct-not-reduced", D,
           "direct_total = distributed.all_reduce_sum({n: g.sum(0) for n, g in direct.items()}, process_group)",
           "direct_total = {n: g.sum(0) for n, g in direct.items()}",
           "the readout's gradient summed over this rank's windows only", (T_DIST,)),
]


# --- the machinery ------------------------------------------------------------------------------------------


class StaleMutant(Exception):
    pass


def check(mutant: Mutant, root: Path) -> None:
    """The snippet must be found exactly once in its file, and the replacement must differ."""
    path = root / mutant.file
    if not path.is_file():
        raise StaleMutant(f"{mutant.name}: {mutant.file} does not exist")
    count = path.read_text().count(mutant.find)
    if count != 1:
        raise StaleMutant(f"{mutant.name}: the snippet is found {count} times in {mutant.file}, not once:\n"
                          f"    {mutant.find!r}")
    if mutant.find == mutant.replace:
        raise StaleMutant(f"{mutant.name}: the replacement is the snippet itself")
    if mutant.equivalent and not mutant.reason.strip():
        raise StaleMutant(f"{mutant.name}: marked equivalent without a reason")
    for test in mutant.tests:
        if not (root / test.split("::")[0]).is_file():
            raise StaleMutant(f"{mutant.name}: no test file {test.split('::')[0]}")


def repo_files(root: Path) -> list[str]:
    """The tracked files (working-tree contents) and untracked files git does not ignore."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout
    return sorted({name for name in out.decode().split("\0") if name})


def copy_repo(root: Path, files: list[str], dest: Path) -> None:
    for name in files:
        src = root / name
        if src.is_file() and not src.is_symlink():  # a tracked file deleted in the working tree is skipped
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def environment(copy: Path) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join([str(copy), str(copy / "tests")]))
    return env


def run(cmd: list[str], cwd: Path, timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group; on timeout kill that group. Returns (status or None, output)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=environment(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def pytest_cmd(tests) -> list[str]:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]


def check_imports(copy: Path) -> None:
    """The copy's own packages must be the ones imported (not an installed or editable copy)."""
    code = "import biaskit, trainers; print(biaskit.__file__); print(trainers.__file__)"
    status, out = run([sys.executable, "-c", code], copy, 300)
    paths = out.strip().splitlines()[-2:]
    if status != 0 or len(paths) != 2 or not all(Path(p).resolve().is_relative_to(copy.resolve()) for p in paths):
        sys.exit(f"the mutated copy's packages are not the ones imported ({out.strip()[-500:]}): "
                 "the mutants would test another tree")


@dataclass
class Result:
    mutant: Mutant
    status: str
    seconds: float
    tail: str

    @property
    def caught_by(self) -> str:
        """The first failing test, from pytest's short summary ("FAILED tests/x.py::name - ...")."""
        for line in self.tail.splitlines():
            if line.startswith(("FAILED ", "ERROR ")):
                return line.split(" ", 1)[1].split(" - ", 1)[0].strip().removeprefix("tests/")
        return ""


def outcome(code: int | None) -> str:
    return {None: "timeout", 0: "survived", 1: "killed"}.get(code, "error")


def run_mutant(mutant: Mutant, root: Path, files: list[str], timeout: float) -> Result:
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"biaskit-mutant-{mutant.name}-") as tmp:
        copy = Path(tmp)
        copy_repo(root, files, copy)
        path = copy / mutant.file
        source = path.read_text()
        assert source.count(mutant.find) == 1, mutant.name  # checked on the tree; the copy is the same
        path.write_text(source.replace(mutant.find, mutant.replace, 1))
        code, out = run(pytest_cmd(mutant.tests), copy, timeout)
    return Result(mutant, outcome(code), time.perf_counter() - began, out)


def baseline(mutants: list[Mutant], root: Path, files: list[str], timeout: float) -> None:
    tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="biaskit-mutant-baseline-") as tmp:
        copy = Path(tmp)
        copy_repo(root, files, copy)
        check_imports(copy)
        code, out = run(pytest_cmd(tests), copy, timeout * 2)
    if code != 0:
        print(out[-4000:], file=sys.stderr)
        print(f"the unmutated tree fails its own tests ({outcome(code)}, exit {code}): fix that first; "
              "every mutant would look killed", file=sys.stderr)
        sys.exit(2)
    print(f"baseline: {len(tests)} test files pass on the unmutated copy ({time.perf_counter() - began:.0f} s)",
          file=sys.stderr)


def label(result: Result) -> str:
    m = result.mutant
    if result.status == "survived" and m.equivalent:
        return "survived (equivalent)"
    if result.status == "killed" and m.equivalent:
        return "killed (marked equivalent: wrong mark)"
    if result.status == "killed" and result.caught_by:
        return f"killed by {result.caught_by}"
    return result.status


def table(results: list[Result]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| mutant | file | what it breaks | result | seconds |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.mutant.name} | {r.mutant.file} | {cell(r.mutant.breaks)} | {label(r)} | {r.seconds:.1f} |")
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    count = {s: sum(r.status == s for r in results) for s in ("killed", "survived", "timeout", "error")}
    line = f"{len(results)} tried, {count['killed']} killed, {count['survived']} survived"
    equivalent = sum(r.status == "survived" and r.mutant.equivalent for r in results)
    if equivalent:
        line += f" ({equivalent} marked equivalent)"
    for status in ("timeout", "error"):
        if count[status]:
            line += f", {count[status]} {status}"
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants (checking each snippet) and exit")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per mutant (default 600)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the unmutated copy")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTANTS]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        sys.exit(f"mutant names used twice: {', '.join(duplicates)}")
    selected = MUTANTS
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            print(f"no mutant named {', '.join(unknown)}; --list shows them", file=sys.stderr)
            return 2
        selected = [m for m in MUTANTS if m.name in args.only]
    stale = []
    for m in selected:
        try:
            check(m, ROOT)
        except StaleMutant as err:
            stale.append(str(err))
    if stale:
        print("stale mutants (fix the list before running):\n" + "\n".join(stale), file=sys.stderr)
        return 2
    if args.list:
        for m in selected:
            mark = f"  [equivalent: {m.reason}]" if m.equivalent else ""
            print(f"{m.name:34} {m.file:22} {m.breaks}{mark}\n{'':34} tests: {' '.join(m.tests)}")
        print(f"{len(selected)} mutants")
        return 0

    began = time.perf_counter()
    files = repo_files(ROOT)
    if not args.no_baseline:
        baseline(selected, ROOT, files, args.timeout)
    results = []
    for i, m in enumerate(selected, 1):
        result = run_mutant(m, ROOT, files, args.timeout)
        results.append(result)
        print(f"[{i}/{len(selected)}] {m.name}: {label(result)} ({result.seconds:.1f} s)", file=sys.stderr)
        if result.status == "error":
            print("    " + "\n    ".join(result.tail.strip().splitlines()[-15:]), file=sys.stderr)
    print(table(results))
    print()
    print(summary(results))
    print(f"total {time.perf_counter() - began:.0f} s")
    bad = [r for r in results if r.status == "error" or (r.status == "survived" and not r.mutant.equivalent)
           or (r.status == "killed" and r.mutant.equivalent)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
