"""fri (FRI-MxMoE, seed 000): profile a rule budget of (unit, choice) pairs, fit a predictor on them,
predict the rest of the table; the `lagrangian` solver allocates.

    samplers.py       which pairs to profile: depth-adaptive stratified anchor experts, random
    adaptive.py       moebits' sampler: a stratified start, then rounds of the most uncertain pairs
                      nearest the allocation's decision boundary
    features.py       Table 7's features (+ the RTN proxy) of a (unit, choice) pair
    interpolation.py  `FRIRegressor`: fuzzy rule interpolation as a scikit-learn estimator
    predictors.py     FRI and the learned regressors (ridge, knn, gbm, mlp): fit on measured, predict the rest
    proxy.py          the RTN weight-space error proxy feature
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...table import SensitivityTable
from ...units import Choice
from .. import Method, register_method

if TYPE_CHECKING:  # pragma: no cover
    from ...job.in_memory import Pipeline


def fill_fri(run: "Pipeline", choices: list[Choice]) -> SensitivityTable:
    """FRI-MxMoE: measure a rule budget of (unit, choice) pairs, fit the predictor on them, predict the rest.

    moebits' default (`--sampler adaptive --predictor ridge --proxy`): a stratified start, then rounds of
    the pairs most uncertain and nearest the allocation's decision boundary (adaptive.py), Ridge on log
    error with the RTN proxy feature (proxy.py, its seconds counted in `profile_seconds`), per-unit
    offsets. The paper: `--sampler stratified --predictor fri --no-proxy` (whole anchor experts, FRI
    on Table 7's features), plus `--solver lagrangian --no-fill` for Algorithm 1's allocation.
    """
    from .adaptive import adaptive_fill
    from .features import PAPER_GROUPS, FeatureSpec
    from .predictors import fit_table, make_estimator, predict_table
    from .samplers import sample_anchors

    cfg = run.cfg
    n_quantized = sum(not c.is_fp for c in choices)
    rules = cfg.rule_budget(len(run.units), n_quantized)
    estimator = make_estimator(cfg.predictor, cfg.seed)
    spec = FeatureSpec(PAPER_GROUPS + (("proxy",) if cfg.proxy else ()))
    proxy = None
    if cfg.proxy:
        from .proxy import rtn_proxy

        # the profiler keeps the reference forwards the proxy computes, for the pairs measured next
        profiler = run.expert_profiler() if cfg.metric == "expert" else None
        px = rtn_proxy(run.adapter, run.units, choices, run.calib.inputs, profiler=profiler)
        proxy, run.results["proxy_seconds"] = px.values, round(px.seconds, 4)
    if cfg.sampler == "adaptive":
        table = run.new_table(choices)

        def measure(pairs):  # one call per round: its GPTQ is batched over all the round's pairs
            run.measure([], choices, table=table,
                        pairs=[(run.units[u], choices[j]) for j in sorted({c for _, c in pairs})
                               for u, c in pairs if c == j])

        budget = run.budget(choices, table.frequency)
        res = run.timed("adaptive_seconds", lambda: adaptive_fill(
            table, run.calib.stats, measure, rules, budget.cost, budget.total, estimator, spec, proxy,
            seed=cfg.seed, groups=run.groups()))
        run.results["rounds"] = res.rounds
        # fitting, bootstraps and scoring between rounds (the rest of adaptive_seconds is profiling)
        run.results["fit_seconds"] = round(run.results["adaptive_seconds"] - run.results.get("profile_seconds", 0.0), 4)
        filled = res.table
    else:
        anchors = sample_anchors(run.units, cfg.sampler, rules=rules, seed=cfg.seed, bits_per_unit=n_quantized)
        table = run.measure(anchors, choices)
        fitted = run.timed("fit_seconds", lambda: fit_table(table, run.calib.stats, estimator, spec, proxy))
        filled = run.timed("predict_seconds", lambda: predict_table(table, fitted, unit_offset=True))
    run.results["anchors"] = len({(u.layer, u.expert) for u, m in zip(table.units, table.measured.any(axis=1)) if m})
    run.results["rules"] = int(table.measured.sum())
    run.results["rule_budget"] = rules
    run.results["profile_seconds"] = round(run.results.get("profile_seconds", 0.0)
                                           + run.results.get("proxy_seconds", 0.0), 4)
    return filled


register_method(Method("fri", fill_fri, "lagrangian", description="FRI-MxMoE: a rule budget + prediction"))
