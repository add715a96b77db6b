"""Adaptive rule sampling (`--sampler adaptive`, not in the paper): spend a rule budget in rounds on the
(unit, choice) pairs whose measurement can change the allocation most.

A *rule* is one profiled (unit, choice) measurement, the paper's unit of the rule base. The budget is
`rules` pairs, never exceeded, and no pair is measured twice.

Round 0: stratified anchor experts (samplers.py, the paper's sampler) at every quantized choice with a
share `initial` of the budget, so the predictor sees how error moves with bits and how units differ.
Rounds 1..R, each with an equal share of what is left:

1. fit the predictor on every measured pair and fill the table (hybrid, with per-unit offsets:
   predictors.py), giving the predicted loss L[u, c] = f_u * l_u(c);
2. uncertainty: s[u, c], the sd of the log prediction -- over a cluster bootstrap of the measured units
   (refits on resampled units) for a unit with no measurement, and the leave-one-out sd of a unit's
   residual over its own measured choices (how well one measured pair pins the rest of its row) for a
   partly measured one; 0 for a measured pair;
3. consequence: the Lagrangian of the allocation at the predicted losses gives lambda (bisection, as
   the paper's solver); with v = L + lambda * cost, a unit's choice is argmin_c v[u, c]. The margin of
   a pair is how far its v is from flipping the unit's decision: v[u, c] - min v[u] for an unchosen
   choice, the gap to the runner-up for the chosen one;
4. score = delta * exp(-margin / delta) with delta = L[u, c] * (e^s - 1), the loss change of a one-sd
   error: large only for pairs both uncertain *and* near the decision boundary, in units of the
   objective (so a rarely routed or insensitive unit, whose loss barely enters the sum, scores low);
5. measure the top-scoring pairs (as the acquisition below decides), at most one per unit per round (one
   measured pair already pins a unit's row through its offset, so the next pair of the same unit is worth
   less than another unit's).

Acquisition (`--acquisition`), how a round turns scores into pairs:
- `expert` (the default): whole-expert rounds. Each expert offers its units' best pairs (one per unit:
  gate, up, down) and the experts with the largest summed offer are measured whole, after a stratified
  start of half the budget (`INITIAL_SHARE`). Why: the cost of measuring is mostly per expert -- its
  reference forward and its two prepared Hessians cost about two pairs -- and one pair per unit already
  pins that unit's row, so an expert's three best pairs cost little more than its single best one. At
  the same rule budget it touches 35-45 % fewer experts than `score`, at a true-objective gap no worse
  (results/fri_acquisition.md).
- `score` ranks pairs by the score alone (step 5; the default before issue 25).
- `per-cost` (opt-in experiment) ranks by score per cost, picked greedily: a pair costs `pair_cost` [U] (relative to an
average routed pair: its expert's routed tokens), plus `expert_overhead` (its expert's reference forward
and Hessian preparation, `EXPERT_OVERHEAD` pairs) when no pair of the expert is measured yet nor picked
earlier in the round. Same rule budget, same one-per-unit rule, no pair twice.

The loop is a generator of rounds (`adaptive_rounds`: the caller measures each), or written against a
`measure` callable (`adaptive_fill`), so the executors, the benchmarks (which read pairs from a cached full
table) and the tests share it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from sklearn.base import clone

from ...allocate import allocate
from .features import FeatureMatrix, FeatureSpec, build_features
from .predictors import _prepare, fit_table, predict_table
from .samplers import sample_anchors
from ...stats import CalibrationStats
from ...table import SensitivityTable

ACQUISITIONS = ("score", "per-cost", "expert")
# the stratified start's share of the rule budget, per acquisition: whole-expert rounds start from more
# whole anchor experts (results/fri_acquisition.md: half the budget touched 16 % fewer experts than a third,
# at no worse a gap)
INITIAL_SHARE = {"score": 1 / 3, "per-cost": 1 / 3, "expert": 1 / 2}
# an expert's fixed cost (reference forward + two prepared GPTQ Hessians) in units of an average routed
# pair's own cost (GPTQ + partial forward): ~1.5 ms vs ~1.0 ms per pair on the 64-expert OLMoE-shaped model
# (benchmarks/results/stages.md: FRI's pairs 1.06 s = 688 pairs touching 260 experts x ~1.5 ms + 688 x ~1.0 ms)
EXPERT_OVERHEAD = 1.5
# the fixed (token-independent) share of an average pair: its GPTQ, 0.52 of 1.34 s of pair work there
# (stages.md's cProfile: partial forwards 0.57 s + error reduction 0.25 s scale with the routed tokens)
PAIR_FIXED = 0.4

Measure = Callable[[list[tuple[int, int]]], None]  # measure (unit index, choice index) pairs into the table


@dataclass
class AdaptiveResult:
    table: SensitivityTable  # hybrid: measured pairs kept, the rest predicted
    rounds: list[int] = field(default_factory=list)  # pairs measured per round (round 0 = stratified start)

    @property
    def rules(self) -> int:
        return int(sum(self.rounds))


def quantized_columns(table: SensitivityTable) -> np.ndarray:
    return np.array([j for j, c in enumerate(table.choices) if not c.is_fp], dtype=int)


def initial_pairs(table: SensitivityTable, n_rules: int, seed: int = 0, middle_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Stratified routed anchor experts (every quantized choice of their units) within `n_rules` pairs.

    Unlike the paper's sampler, shared experts are not forced in: they are few, several times larger
    than a routed expert (on the demo 18 shared units at 4 bits cost 13 % of the full profiling), and
    the adaptive rounds measure them first anyway when they matter (frequency 1, so a large loss)."""
    qc = quantized_columns(table)
    if n_rules < len(qc) or len(qc) == 0:
        return []
    anchors = sample_anchors(table.units, "stratified", rules=n_rules, bits_per_unit=len(qc), seed=seed,
                             include_shared=False, middle_ratio=middle_ratio)
    return [(table.unit_index(u), int(c)) for u in anchors for c in qc]


def _measured_quantized(table: SensitivityTable) -> np.ndarray:
    q = np.zeros(len(table.choices), bool)
    q[quantized_columns(table)] = True
    return table.measured & np.isfinite(table.error) & (table.error > 0) & q[None, :]


def log_uncertainty(table: SensitivityTable, features: FeatureMatrix, estimator, fitted_log_pred: np.ndarray,
                    n_boot: int = 8, seed: int = 0) -> np.ndarray:
    """[U, C] sd of the log prediction (see the module docstring); 0 at measured and unquantized entries."""
    U, C = table.error.shape
    known = _measured_quantized(table)
    qmask = np.zeros(C, bool)
    qmask[quantized_columns(table)] = True
    units_m = np.flatnonzero(known.any(axis=1))
    rng = np.random.default_rng(seed)
    logs = []
    for _ in range(n_boot if len(units_m) > 1 else 0):
        pick = rng.choice(units_m, size=len(units_m), replace=True)
        rows = np.concatenate([u * C + np.flatnonzero(known[u]) for u in pick])
        est = _prepare(estimator, features)
        est.fit(features.X[rows], table.error.ravel()[rows])
        logs.append(np.log(np.maximum(est.predict(features.X), 1e-300)).reshape(U, C))
    sd = np.std(logs, axis=0) if logs else np.full((U, C), 1.0)
    # partly measured units: the leave-one-out spread of their own residuals, pooled over units
    resid = np.where(known, np.log(np.where(known, table.error, 1.0)) - fitted_log_pred, np.nan)
    n = known.sum(axis=1)
    multi = n >= 2
    if multi.any():
        tot = np.nansum(resid[multi], axis=1, keepdims=True)
        loo = (tot - np.nan_to_num(resid[multi])) / (n[multi, None] - 1)  # mean of the unit's other residuals
        dev = np.where(known[multi], resid[multi] - loo, np.nan)
        within = float(np.sqrt(np.nanmean(dev ** 2)))
        partly = known.any(axis=1)
        sd[partly] = within
    sd[known] = 0.0
    sd[:, ~qmask] = 0.0
    return sd


def pair_scores(loss: np.ndarray, log_sd: np.ndarray, cost: np.ndarray, budget: float, groups=None) -> np.ndarray:
    """[U, C] uncertainty x consequence of each pair at the Lagrangian's lambda (module docstring, 3-4)."""
    res = allocate(loss, cost, budget, solver="lagrangian", groups=groups, fill=False)
    lam = float(res.lambda_ or 0.0)
    v = loss + lam * cost
    rc = v - v.min(axis=1, keepdims=True)
    chosen = np.argmin(v, axis=1)
    runner_up = np.partition(rc, 1, axis=1)[:, 1] if rc.shape[1] > 1 else np.full(len(rc), np.inf)
    margin = rc.copy()
    margin[np.arange(len(rc)), chosen] = runner_up
    delta = loss * np.expm1(log_sd)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        score = np.where(delta > 0, delta * np.exp(-margin / np.where(delta > 0, delta, 1.0)), 0.0)
    return score


def pick_pairs(score: np.ndarray, available: np.ndarray, n: int, tiebreak: np.ndarray | None = None) -> list[tuple[int, int]]:
    """The `n` highest-scoring available pairs, at most one per unit (ties: larger `tiebreak` first)."""
    U, C = score.shape
    flat = np.flatnonzero(available.ravel())
    if n <= 0 or len(flat) == 0:
        return []
    tb = np.zeros(U * C) if tiebreak is None else tiebreak.ravel()
    order = flat[np.lexsort((-tb[flat], -score.ravel()[flat]))]
    out, seen = [], set()
    for r in order:
        u = int(r // C)
        if u in seen:
            continue
        seen.add(u)
        out.append((u, int(r % C)))
        if len(out) == n:
            break
    return out


def expert_ids(table: SensitivityTable) -> np.ndarray:
    """[U] int: which expert ((layer, expert), shared experts per layer) each unit belongs to."""
    keys: dict[tuple, int] = {}
    return np.array([keys.setdefault((u.layer, str(u.expert)), len(keys)) for u in table.units], dtype=int)


def relative_pair_cost(table: SensitivityTable) -> np.ndarray:
    """[U] a unit's pair cost relative to the average routed pair: a fixed part (its GPTQ) plus a part
    proportional to its expert's routed tokens (`frequency`; shared experts see every token): the partial
    forward and the error reduction."""
    routed = np.array([not u.is_shared for u in table.units])
    ref = float(table.frequency[routed].mean()) if routed.any() else float(table.frequency.mean())
    return PAIR_FIXED + (1 - PAIR_FIXED) * np.maximum(table.frequency, 0.0) / max(ref, 1e-12)


def pick_pairs_per_cost(score: np.ndarray, available: np.ndarray, n: int, expert: np.ndarray, touched: np.ndarray,
                        pair_cost: np.ndarray, expert_overhead: float,
                        tiebreak: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Greedy: the available pair with the largest score / (pair_cost[u] + overhead if its expert is
    untouched), at most one per unit; an expert counts as touched once one of its pairs is picked.
    `expert` [U] expert ids, `touched` [n_experts] bool (measured before this round; not modified)."""
    U, C = score.shape
    if n <= 0 or not available.any():
        return []
    touched = touched.copy()
    avail = available.copy()
    tb = np.zeros((U, C)) if tiebreak is None else tiebreak
    out = []
    while len(out) < n and avail.any():
        cost = pair_cost + np.where(touched[expert], 0.0, expert_overhead)  # [U]
        value = np.where(avail, score / cost[:, None], -np.inf)
        flat = np.flatnonzero(value.ravel() == value.max())
        r = flat[np.argmax(tb.ravel()[flat])] if len(flat) > 1 else flat[0]  # ties: larger tiebreak first
        u, c = int(r // C), int(r % C)
        out.append((u, c))
        avail[u] = False
        touched[expert[u]] = True
    return out


def pick_expert_pairs(score: np.ndarray, available: np.ndarray, n: int, expert: np.ndarray, per_expert: int,
                      per_unit: int = 1, tiebreak: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Whole-expert picks: each expert offers its `per_expert` best available pairs (at most `per_unit` of
    one unit); experts are taken by the summed score of their offer (ties: larger summed `tiebreak`) until
    `n` pairs are picked (the last expert's offer cut to fit). Few experts, several pairs each: an expert's
    reference forward and Hessians are paid once for all its pairs."""
    U, C = score.shape
    if n <= 0 or not available.any():
        return []
    tb = np.zeros((U, C)) if tiebreak is None else tiebreak
    offers = []
    for e in np.unique(expert[available.any(axis=1)]):
        cand = []
        for u in np.flatnonzero(expert == e):
            cs = np.flatnonzero(available[u])
            cs = cs[np.lexsort((-tb[u, cs], -score[u, cs]))][:per_unit]
            cand += [(float(score[u, c]), float(tb[u, c]), int(u), int(c)) for c in cs]
        cand.sort(key=lambda t: (-t[0], -t[1], t[2], t[3]))
        cand = cand[:per_expert]
        offers.append((sum(t[0] for t in cand), sum(t[1] for t in cand), int(e), cand))
    offers.sort(key=lambda o: (-o[0], -o[1], o[2]))
    out = []
    for _, _, _, cand in offers:
        out += [(u, c) for _, _, u, c in cand[:n - len(out)]]
        if len(out) == n:
            break
    return out


def adaptive_fill(table: SensitivityTable, stats: CalibrationStats, measure: Measure, rules: int, cost: np.ndarray,
                  budget: float, estimator=None, spec: FeatureSpec = FeatureSpec(), proxy: np.ndarray | None = None,
                  **kw) -> AdaptiveResult:
    """Measure at most `rules` pairs of `table` (through `measure`, which writes them into `table`), in
    adaptive rounds after a stratified start (`adaptive_rounds`), and return the filled table."""
    rounds = adaptive_rounds(table, stats, rules, cost, budget, estimator, spec, proxy, **kw)
    while True:
        try:
            measure(next(rounds))
        except StopIteration as done:
            return done.value


def adaptive_rounds(table: SensitivityTable, stats: CalibrationStats, rules: int, cost: np.ndarray,
                    budget: float, estimator=None, spec: FeatureSpec = FeatureSpec(), proxy: np.ndarray | None = None,
                    rounds: int = 4, initial: float | None = None, seed: int = 0, groups=None, n_boot: int = 8,
                    middle_ratio: float = 2.0, acquisition: str = "expert",
                    expert_overhead: float = EXPERT_OVERHEAD, per_expert: int = 3,
                    per_unit: int = 1) -> Iterator[list[tuple[int, int]]]:
    """The rounds as a generator: yields the (unit index, choice index) pairs of each round, which the
    caller measures into `table` before resuming it (so an executor can measure a round in its own way);
    returns the `AdaptiveResult` with the filled table. At most `rules` pairs, in `rounds` adaptive rounds
    after a stratified start.

    `cost` [U, C] and `budget` are the allocation's (budget.py), `groups` its structure. `acquisition`:
    `expert` (default; `per_expert` pairs per expert, at most `per_unit` per unit), `score` or `per-cost`
    (with `expert_overhead` in average pairs): the module docstring. `initial`: the start's share of
    `rules` (None: `INITIAL_SHARE[acquisition]`)."""
    if rules < 1:
        raise ValueError(f"the adaptive sampler needs a rule budget >= 1, got {rules}")
    if acquisition not in ACQUISITIONS:
        raise ValueError(f"unknown --acquisition {acquisition!r}; choose one of {ACQUISITIONS}")
    initial = INITIAL_SHARE[acquisition] if initial is None else initial
    if rounds < 1 or not 0.0 <= initial <= 1.0:
        raise ValueError(f"need rounds >= 1 and 0 <= initial <= 1, got rounds={rounds}, initial={initial}")
    from .interpolation import FRIRegressor

    estimator = FRIRegressor() if estimator is None else estimator
    features = build_features(stats.aligned(table.units), table.choices, spec, proxy)
    qmask = np.zeros(len(table.choices), bool)
    qmask[quantized_columns(table)] = True
    result = AdaptiveResult(table)
    start = initial_pairs(table, int(rules * initial), seed, middle_ratio)
    if not start:  # the start must hold something to fit on: the most frequent units, one pair each
        mid = quantized_columns(table)[len(quantized_columns(table)) // 2]
        order = np.argsort(-table.frequency, kind="stable")[:max(1, min(rules, int(rules * initial) or 1))]
        start = [(int(u), int(mid)) for u in order]
    yield start
    result.rounds.append(len(start))
    per_round = math.ceil((rules - len(start)) / rounds)
    for _ in range(rounds):
        n = min(per_round, rules - result.rules)
        if n <= 0:
            break
        fitted = fit_table(table, stats, estimator, spec, proxy, features=features)
        pred = predict_table(table, fitted, unit_offset=True)
        log_pred = np.log(np.maximum(np.where(qmask[None, :], pred.error, 1.0), 1e-300))
        log_sd = log_uncertainty(table, features, clone(estimator), log_pred, n_boot, seed + len(result.rounds))
        loss = table.frequency[:, None] * pred.error
        score = pair_scores(loss, log_sd, cost, budget, groups)
        available = ~table.measured & qmask[None, :]
        if acquisition == "per-cost":
            expert = expert_ids(table)
            touched = np.zeros(expert.max() + 1, bool)
            touched[expert[(table.measured & qmask[None, :]).any(axis=1)]] = True
            picked = pick_pairs_per_cost(score, available, n, expert, touched, relative_pair_cost(table),
                                         expert_overhead, tiebreak=loss * np.expm1(log_sd))
        elif acquisition == "expert":
            picked = pick_expert_pairs(score, available, n, expert_ids(table), per_expert, per_unit,
                                       tiebreak=loss * np.expm1(log_sd))
        else:
            picked = pick_pairs(score, available, n, tiebreak=loss * np.expm1(log_sd))
        if not picked:
            break
        yield picked
        result.rounds.append(len(picked))
    fitted = fit_table(table, stats, estimator, spec, proxy, features=features)
    result.table = predict_table(table, fitted, unit_offset=True)
    return result
