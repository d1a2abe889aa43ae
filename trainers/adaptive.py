"""Algorithm 1: the truncation-length controller, fed by biaskit.

At each update it draws ``windows`` windows of length W from the training
stream (each starting from the state a W-step burn-in leaves), measures the
last-step gradient over each with biaskit, and sets the truncation:

- ``controller="exact"`` (default): the target is the smallest K whose *exact*
  relative bias is below δ at confidence ``level`` (``biaskit.exact_kappa``,
  "certified"); K_max when the windows' mean gradient is resolved and the bias
  stays above δ for every K in range ("none below delta"). When the mean
  gradient is not resolved from the windows' noise (early, before the model has
  found any direction, and near a minimum, where the gradient fades) nothing
  can be certified: the target is twice the K in use if its lower limit is
  above δ ("raised"), else the paper's κ̂ where that is longer than the K in use
  ("estimated"), else the K in use ("held").
- ``controller="paper"``: Algorithm 1 as printed: τ̂ = 0.9W, β̂ by Eq. 22 (OLS
  regression), Eq. 21 (``beta_method="max"``, all pairs) or the quantile, Ê by
  Eq. 23, Δ̂ by Eq. 24 (denominator over k ≤ K), κ̂ by Eq. 25 ("estimated"),
  K_max when none reaches δ ("none below delta"). It needs only φ, one forward
  and one backward sweep (``biaskit.state_gradient_norms``); the exact bias of
  the K in use, for the log, is measured every ``audit_every``-th update.

Then, for either controller, the K actually set moves toward the target by at
most a factor ``max_change`` per update, and the exact controller shortens K
only when two updates in a row certified a shorter one. Why: a truncation
shorter than the task's dependency never builds the long-lag gradient that
would show it is too short (the copy task at K = 2 < m = 10: the bias is tiny
until the model has learned to remember), so a one-off certification at a
plateau must not collapse K; and a jump to K_max multiplies the step lr·√K by
√(K_max/K) at once (a language model's perplexity went 103 → 171). With
``max_change`` = 2 the step grows by at most √2 per update.

Each update logs the target and the K set, the rule, whether δ was reached,
the exact upper limit and the paper's estimate, and the exact relative bias of
the K in use since the last update measured on these new windows: out of
sample, what tells whether δ held. Updates come every ``update_every`` epochs
and, while K is settled (the target is the K in use), at twice the last
interval, up to ``update_every_max`` (``next_interval``). After the exact
controller certifies the K it sets with room to spare, the next update draws
only as many windows as keep its limit inside δ, down to ``windows_min``
(``windows_needed``); anything else brings back ``windows``. Off by default:
on the language model it kept K long and learned slower (window-count.md).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

import biaskit
from biaskit.decay import UnreliableFitWarning
from biaskit.errors import InputError
from biaskit.norms import NORMS, options
from biaskit.probe import probing

from .ddp import ONE, Ranks, share

CONTROLLERS = ("exact", "paper")
BETA_METHODS = ("regression", "max", "quantile")
#: Rules after which the run goes on as planned; any other is shown as a warning line.
QUIET_RULES = ("certified", "held", "estimated", "point estimate", "measured only")


def _logged(section: str, default=None):
    """A field of the update record, with its TensorBoard section (``board.RECORD_SECTIONS``)."""
    return field(default=default, metadata={"section": section})


@dataclass
class UpdateRecord:
    """One update of the controller, as the run logs it: each field is a key of the epoch's line in
    ``metrics.jsonl`` (those left None are left out), of ``K_history`` in the checkpoint and a
    TensorBoard scalar in its section; the loop, the schedule and the board read it by attribute."""

    K: int = _logged("K")  # the K set for what follows
    K_target: int = _logged("K")  # the rule's target, before the rate limit
    K_rule: str = _logged("K")  # certified, held, estimated, raised, none below delta, ...
    K_in_use: int = _logged("K")  # the K the update found in use
    kappa_reached: int = _logged("K", 0)  # whether the target reached δ
    kappa_hat: int | None = _logged("K")  # the paper's κ̂ (Eq. 25); None where no decay was fitted
    kappa_hat_reached: int = _logged("K", 0)
    beta: float | None = _logged("decay")  # the fitted decay rate and its confidence interval
    beta_low: float | None = _logged("decay")
    beta_high: float | None = _logged("decay")
    beta_reliable: int = _logged("decay", 0)
    tau: int | None = _logged("decay")
    rel_bias_exact: float | None = _logged("bias")  # the exact relative bias of the K in use, out of sample
    rel_bias_exact_upper: float | None = _logged("bias")
    rel_bias_exact_lower: float | None = _logged("bias")
    gradient_resolved: int | None = _logged("bias")  # whether the windows' mean gradient stood out of its noise
    rel_bias_upper: float | None = _logged("bias")  # the upper limit at the K set
    extrapolated: int | None = _logged("bias")  # whether that limit leaned on the tail past the window
    rel_bias_bound: float | None = _logged("bias")  # the paper's bound Δ̂ at the K set
    rel_bias_trained: float | None = _logged("bias")  # the trainer's own BPTT(K1, K2) at the K in use
    rel_bias_truncated: float | None = _logged("bias")  # a DNI run: BPTT(K, K) without and with the DNI
    rel_bias_synthetic: float | None = _logged("bias")
    synthetic_error: float | None = _logged("bias")  # the DNI's median relative error
    update_seconds: float | None = _logged("time")
    windows: int | None = _logged("time")  # the windows this update measured
    windows_next: int | None = _logged("time")  # the windows the next one will (``windows_needed``)
    progress: float | None = _logged("K")  # epochs trained when it ran
    interval: float | None = _logged("K")  # epochs to the next update

    def line(self) -> dict:
        """The fields measured, for the log (``runs.clean`` turns a NaN into None after)."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    @classmethod
    def from_line(cls, line: dict | None) -> UpdateRecord | None:
        """The record a logged line holds, None for none: a record's own line, or an epoch's line of
        ``metrics.jsonl`` (whose ``K`` is the K it trained with and ``next_K`` the K set; keys of
        other kinds ignored, fields it lacks None)."""
        if not line:
            return None
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in line.items() if k in names}
        return cls(**{**kept, "K": line["next_K"]} if "next_K" in line else kept)


@dataclass
class Controller:
    delta: float | None = None  # tolerated relative bias; None: measure only, keep K fixed
    window: int = 100  # W, the length of the windows it measures
    windows: int = 256  # windows per update (the paper's is the batch, 64)
    windows_min: int | None = None  # the exact controller's fewest, after a roomy certification (None: windows)
    K_min: int = 2  # the bounds on the K it sets
    K_max: int = 100
    norm: str = "phi"  # the paper controller's norm
    tau: int | str | None = None  # as fit_decay takes it: a lag, "auto" or None (0.9 W)
    controller: str = "exact"
    level: float = 0.9  # the exact controller's confidence
    groups: int = 16  # window groups for the exact controller's confidence limit
    beta_method: str = "regression"  # the paper controller's β: Eq. 22 (OLS), Eq. 21 (max) or the quantile
    ranks: Ranks = ONE  # under torch.distributed each rank decomposes its share of the windows
    max_change: float = 2.0  # K moves by at most this factor per update
    audit_every: int = 4  # the paper controller measures the exact bias every n-th update
    loss_at: str = "last"  # the windows' losses: the last step's (the paper's) or every step's
    max_shrink: float | None = None  # K shortens by at most this factor per update (None: max_change)
    raise_on_estimate: bool = False  # exact, unresolved: grow K while the bias's point estimate is above δ

    @classmethod
    def from_config(cls, cfg: dict, ranks: Ranks = ONE) -> Controller:
        """The controller a run's training options describe (each field under its own name)."""
        return cls(**{name: cfg[name] for name in CONTROLLER_OPTIONS}, ranks=ranks)

    def measure(self, model, inputs, targets, K: int, generator: torch.Generator,
                previous: UpdateRecord | None = None, count: int = 0) -> UpdateRecord:
        """Measure fresh windows; return the update's record with the next K (``K`` when only measuring).

        ``previous``: the last update's record (the exact controller shortens K only when it too
        certified a shorter one); ``count``: how many updates came before (the paper controller's
        exact audit runs when ``count % audit_every == 0``).

        Under torch.distributed every rank draws the same windows, measures its contiguous share
        with its share of the groups, and the sums are all-reduced: every rank gets the same
        Dataset, the same exact bias and so the same K, as one process holding them all would.
        """
        began = time.perf_counter()
        count_windows = self._windows(previous)
        part = share(count_windows, self.ranks, "--windows")
        exact_needed = self.controller == "exact" or count % self.audit_every == 0
        every = self.loss_at == "every"
        with probing(model, inputs, targets, length=self.window, count=count_windows, generator=generator,
                     part=part, every_step=every) as probe:
            measure = options([self.norm])  # the paper controller's norm, and no other
            if exact_needed:
                ds = biaskit.decompose(probe.system, probe.inputs, probe.targets, start=probe.start, **measure,
                                       groups=max(1, self.groups // self.ranks.world), process_group=self.ranks.group,
                                       loss_at=self.loss_at)
            elif not NORMS[self.norm].parameter_pass:  # φ alone: the state sweep
                ds = biaskit.state_gradient_norms(probe.system, probe.inputs, probe.targets, start=probe.start,
                                                  process_group=self.ranks.group, loss_at=self.loss_at)
            else:
                ds = biaskit.decompose(probe.system, probe.inputs, probe.targets, start=probe.start, **measure,
                                       groups=1, process_group=self.ranks.group, loss_at=self.loss_at)
        delta = self.delta if self.delta is not None else 0.5
        span = (min(self.K_min, K), max(self.K_max, K))
        fit, bound = self._estimate(ds, delta, span)
        record = UpdateRecord(K=K, K_target=K, K_rule="measured only", K_in_use=K, **_fit_fields(fit, bound))
        exact = biaskit.exact_kappa(ds, [delta], alpha=1 - self.level, K_range=span) if exact_needed else None
        if exact is not None:
            record.rel_bias_exact = float(exact["rel_bias"].sel(K=K))  # the K in use, on new windows
            record.rel_bias_exact_upper = float(exact["rel_bias_upper"].sel(K=K))
            record.rel_bias_exact_lower = float(exact["rel_bias_lower"].sel(K=K))
            record.gradient_resolved = int(exact["gradient_resolved"])
        if self.delta is None:
            target, reached, rule = K, False, "measured only"
        elif self.controller == "exact":
            curve = exact["rel_bias_upper"].sel(K=slice(self.K_min, self.K_max))
            points = exact["rel_bias"].sel(K=slice(self.K_min, self.K_max)).values \
                if self.raise_on_estimate else None
            target, reached, rule = choose_K(curve.K.values, curve.values, self.delta, K, self.K_max,
                                             bool(exact["gradient_resolved"]), record.rel_bias_exact_lower,
                                             record.kappa_hat, points)
        else:
            target, reached, rule = paper_rule(record.kappa_hat, bool(record.kappa_hat_reached), K, self.K_max)
        new_K = limit_change(K, target, self.max_change, self.K_min, self.K_max,
                             shorten=self.controller != "exact" or _certified_shorter(previous),
                             shrink=self.max_shrink)
        if exact is not None:
            record.rel_bias_upper = float(exact["rel_bias_upper"].sel(K=new_K))  # the K chosen
            record.extrapolated = int(exact["extrapolated"].sel(K=max(K, new_K)))
        if bound is not None:
            record.rel_bias_bound = float(bound["rel_bias_bound"].sel(K=new_K))
        record.windows, record.windows_next = count_windows, self.windows
        if self.controller == "exact" and self.delta is not None and not record.extrapolated:
            record.windows_next = windows_needed(float(exact["rel_bias"].sel(K=new_K)), record.rel_bias_upper,
                                                 self.delta, count_windows, self._fewest(), self.windows,
                                                 math.lcm(self.groups, self.ranks.world))
        return replace(record, K=new_K, K_target=target, K_rule=rule, kappa_reached=int(reached),
                       update_seconds=time.perf_counter() - began)

    def _windows(self, previous: UpdateRecord | None) -> int:
        """This update's windows: as many as the last one planned (``windows_next``), else ``windows``."""
        planned = previous.windows_next if previous is not None and previous.windows_next else self.windows
        return min(max(planned, self._fewest()), self.windows)

    def _fewest(self) -> int:
        """The fewest windows an update may draw: ``windows_min``, capped at ``windows``."""
        return self.windows if self.windows_min is None else min(self.windows_min, self.windows)

    def _estimate(self, ds, delta: float, span: tuple[int, int]):
        """The paper's decay fit and bound on ``ds``, or (None, None) where no fit exists (a fit must
        never stop a training run: the record says why instead)."""
        try:
            with warnings.catch_warnings():  # the log records the fit's reliability instead
                warnings.simplefilter("ignore", UnreliableFitWarning)
                fit = biaskit.fit_decay(ds, norm=self.norm, method=self.beta_method, tau=self.tau, weights="ols")
            return fit, biaskit.bias_bound(ds, fit, [delta], span)
        except InputError:
            return None, None


#: The training options that configure the controller, each a field of it, and their defaults
#: (the run config's: ``trainers.config.TRAIN_DEFAULTS`` takes them from here).
CONTROLLER_DEFAULTS = {f.name: f.default for f in fields(Controller) if f.name != "ranks"}
CONTROLLER_OPTIONS = tuple(CONTROLLER_DEFAULTS)


def _fit_fields(fit, bound) -> dict:
    if fit is None:
        return {}
    low, high = fit.conf_int()
    return {"kappa_hat": int(bound["kappa"].values[0]), "kappa_hat_reached": int(bound["kappa_reached"].values[0]),
            "beta": float(fit.beta), "beta_low": float(low), "beta_high": float(high),
            "beta_reliable": int(fit.reliable), "tau": int(fit.tau)}


#: How far inside δ the next update's upper limit is planned: at this share of the margin.
PLANNED_SHARE = 0.5


def windows_needed(point: float, upper: float, delta: float, windows: int, least: int, most: int,
                   step: int) -> int:
    """The next update's windows after one over ``windows`` whose upper limit at the K set was
    ``upper`` (point estimate ``point``): ``most`` unless that limit is below δ; else as many as put
    the limit, whose half-width falls as 1/√windows, at PLANNED_SHARE of the margin δ − point, in
    multiples of ``step`` (the groups, the processes), within [``least``, ``most``]. Why: an update
    measures about as many positions as an epoch trains, and while the bias sits far below δ a
    quarter of them certify it as well."""
    if not (math.isfinite(point) and upper < delta):
        return most
    needed = windows * ((upper - point) / (PLANNED_SHARE * (delta - point))) ** 2
    return int(min(max(math.ceil(needed / step) * step, least), most))


def _certified_shorter(previous: UpdateRecord | None) -> bool:
    """Whether the last update certified a K shorter than the one it found in use."""
    return previous is not None and previous.K_rule == "certified" and previous.K_target < previous.K_in_use


def choose_K(Ks, limits, delta: float, K: int, K_max: int, resolved: bool, lower_in_use: float,
             kappa_hat: int | None = None, points=None) -> tuple[int, bool, str]:
    """The exact controller's target from a curve of upper limits over ``Ks``: ``(K, reached, rule)``.

    - the smallest K whose limit is below δ ("certified");
    - none, with the windows' mean gradient resolved: K_max, as the paper does ("none below delta");
    - none, unresolved, while the K in use evidently misses δ (its lower limit is above δ): twice
      the K in use ("raised");
    - none, unresolved, with ``points`` (the point estimates over ``Ks``) given and the K in use's
      above δ: the smallest longer K whose point estimate is below δ, K_max if none ("point estimate");
    - none, unresolved, and the paper's κ̂ (``kappa_hat``, from φ's decay, which a noisy mean
      does not hide) longer than the K in use: κ̂ ("estimated");
    - otherwise keep the K in use ("held").
    """
    below = np.asarray(limits) < delta
    if below.any():
        return int(Ks[below.argmax()]), True, "certified"
    if resolved:
        return K_max, False, "none below delta"
    if lower_in_use > delta:
        return min(max(2 * K, K + 1), K_max), False, "raised"
    if points is not None:
        points, Ks = np.asarray(points), np.asarray(Ks)
        at_K = points[Ks == K]
        if at_K.size and at_K[0] > delta:
            longer = (Ks > K) & (points <= delta)
            return (int(Ks[longer.argmax()]) if longer.any() else K_max), False, "point estimate"
    if kappa_hat is not None and kappa_hat > K:
        return int(kappa_hat), False, "estimated"
    return K, False, "held"


def paper_rule(kappa_hat: int | None, reached: bool, K: int, K_max: int) -> tuple[int, bool, str]:
    """The paper controller's target: κ̂ where it reached δ ("estimated"), K_max where no K did
    ("none below delta"), the K in use where no decay could be fitted ("no fit")."""
    if kappa_hat is None:
        return K, False, "no fit"
    return (int(kappa_hat), True, "estimated") if reached else (K_max, False, "none below delta")


def limit_change(K: int, target: int, factor: float, K_min: int, K_max: int, shorten: bool = True,
                 shrink: float | None = None) -> int:
    """The next K: ``target``, approached from ``K`` by at most a factor ``factor`` (> 1; at least one
    step) up and ``shrink`` (default ``factor``) down, within [K_min, K_max]; kept at ``K`` rather
    than shortened unless ``shorten``."""
    if target < K and not shorten:
        target = K
    shrink = factor if shrink is None else shrink
    high = max(K + 1, math.floor(factor * K)) if math.isfinite(factor) else math.inf
    low = min(K - 1, math.ceil(K / shrink)) if math.isfinite(shrink) else 0
    return int(min(max(target, low, K_min), high, K_max))


@dataclass
class UpdateSchedule:
    """When the controller measures, asked in one place: an adaptive run every ``base`` epochs (inside
    an epoch too), at twice the last interval up to ``most`` while K is settled (``next_interval``);
    a fixed-K run at each epoch's end, for the log."""

    base: float
    most: float
    adaptive: bool
    next: float | None = None  # the progress, in epochs, of the next adaptive update

    def __post_init__(self):
        self.next = self.base if self.next is None else self.next

    def due(self, progress: float, epoch_end: bool) -> bool:
        """Whether an update is due at ``progress`` epochs (``epoch_end``: an epoch has just ended)."""
        return progress >= self.next - 1e-9 if self.adaptive else epoch_end

    def advance(self, record: UpdateRecord, previous: UpdateRecord | None) -> float:
        """Schedule the update after ``record`` (``previous``: the one before); returns the interval."""
        last = previous.interval if previous is not None and previous.interval is not None else self.base
        interval = next_interval(record, last, self.base, self.most)
        self.next += interval
        return interval


def next_interval(record: UpdateRecord, interval: float, base: float, most: float) -> float:
    """Epochs to the next update: twice ``interval`` (at most ``most``) while K is settled (the
    update's target is the K in use), else back to ``base``."""
    settled = record.K_target == record.K_in_use == record.K
    return min(2 * interval, most) if settled else base
