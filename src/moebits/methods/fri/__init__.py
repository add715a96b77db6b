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

import time

from ...table import SensitivityTable
from .. import Context, Method, Request, register_method


class FRI(Method):
    """FRI-MxMoE: measure a rule budget of (unit, choice) pairs, fit the predictor on them, predict the rest.

    moebits' default (`--sampler adaptive --predictor ridge --proxy`): a stratified start, then rounds of
    the pairs most uncertain and nearest the allocation's decision boundary (adaptive.py; each round is
    one more request), Ridge on log error with the RTN proxy feature (proxy.py, its seconds counted in
    `profile_seconds`), per-unit offsets. The paper: `--sampler stratified --predictor fri --no-proxy`
    (whole anchor experts, FRI on Table 7's features: one request), plus `--solver lagrangian --no-fill`
    for Algorithm 1's allocation.
    """
    name, solver = "fri", "lagrangian"
    description = "FRI-MxMoE: a rule budget + prediction"

    def requests(self, ctx: Context, measured: SensitivityTable):
        from .samplers import sample_anchors

        cfg = ctx.cfg
        n_quantized = sum(not c.is_fp for c in ctx.choices)
        rules = cfg.rule_budget(len(ctx.units), n_quantized)
        if cfg.sampler != "adaptive":
            anchors = sample_anchors(ctx.units, cfg.sampler, rules=rules, seed=cfg.seed, bits_per_unit=n_quantized)
            yield Request(tuple(anchors), tuple(ctx.choices))
            return
        from .adaptive import adaptive_rounds

        t0 = time.perf_counter()
        rounds = adaptive_rounds(measured, ctx.stats, rules, ctx.budget.cost, ctx.budget.total,
                                 self._estimator(ctx), self._spec(ctx), self._proxy(ctx), seed=cfg.seed,
                                 groups=ctx.groups, acquisition=cfg.acquisition)
        while True:
            try:
                pairs = next(rounds)
            except StopIteration as done:
                ctx.memo["adaptive"] = done.value
                break
            # one request per round, so its GPTQ is batched over all the round's pairs
            yield Request.of_pairs([(ctx.units[u], measured.choices[j]) for j in sorted({c for _, c in pairs})
                                    for u, c in pairs if c == j])
        ctx.results["adaptive_seconds"] = round(time.perf_counter() - t0, 4)

    def complete(self, ctx: Context, measured: SensitivityTable) -> SensitivityTable:
        from .predictors import fit_table, predict_table

        r = ctx.results
        if "adaptive" in ctx.memo:  # the rounds' last fit
            res = ctx.memo["adaptive"]
            r["rounds"] = res.rounds
            # fitting, bootstraps and scoring between rounds (the rest of adaptive_seconds is profiling)
            r["fit_seconds"] = round(r["adaptive_seconds"] - r.get("profile_seconds", 0.0), 4)
            filled = res.table
        else:
            fitted = ctx.timed("fit_seconds", lambda: fit_table(measured, ctx.stats, self._estimator(ctx),
                                                                self._spec(ctx), self._proxy(ctx)))
            filled = ctx.timed("predict_seconds", lambda: predict_table(measured, fitted, unit_offset=True))
        r["anchors"] = len({(u.layer, u.expert) for u, m in zip(measured.units, measured.measured.any(axis=1)) if m})
        r["rules"] = int(measured.measured.sum())
        r["rule_budget"] = ctx.cfg.rule_budget(len(ctx.units), sum(not c.is_fp for c in ctx.choices))
        r["profile_seconds"] = round(r.get("profile_seconds", 0.0) + r.get("proxy_seconds", 0.0), 4)
        return filled

    @staticmethod
    def _estimator(ctx: Context):
        from .predictors import make_estimator

        return make_estimator(ctx.cfg.predictor, ctx.cfg.seed)

    @staticmethod
    def _spec(ctx: Context):
        from .features import PAPER_GROUPS, FeatureSpec

        return FeatureSpec(PAPER_GROUPS + (("proxy",) if ctx.cfg.proxy else ()))

    @staticmethod
    def _proxy(ctx: Context):
        """The RTN weight-space error proxy [U, C] (computed once per run; needs the model in memory)."""
        if not ctx.cfg.proxy:
            return None
        if "proxy" not in ctx.memo:
            from .proxy import rtn_proxy

            # the calibration's second moments need no forward; without them (an old calibration) the
            # profiler keeps the reference forwards the proxy computes, for the pairs measured next
            profiler = ctx.expert_profiler() if ctx.expert_profiler is not None and ctx.cfg.metric == "expert" else None
            px = rtn_proxy(ctx.adapter, ctx.units, ctx.choices, ctx.calib.inputs, profiler=profiler)
            ctx.memo["proxy"], ctx.results["proxy_seconds"] = px.values, round(px.seconds, 4)
        return ctx.memo["proxy"]


register_method(FRI())
