"""Adaptive rule sampling, rule budgets, the predictor option and Algorithm 1 (`--no-fill`): issue 15."""
import numpy as np
import pytest
from typer.testing import CliRunner

from moebits.methods.fri.adaptive import adaptive_fill, initial_pairs
from moebits.allocate import allocate
from moebits.allocate.problem import totals
from moebits.cli import app
from moebits.methods.fri.features import PAPER_GROUPS, FeatureSpec
from moebits.job import Pipeline, QuantizeConfig
from moebits.plan import Plan
from moebits.methods.fri.predictors import fit_table, make_estimator, predict_table
from moebits.methods.fri.samplers import sample_anchors
from moebits.table import SensitivityTable
from moebits.units import Choice

from test_features import make_stats
from test_pipeline import _cfg

CHOICES = [Choice(2), Choice(3), Choice(4), Choice(8)]
PROXY_SPEC = FeatureSpec(PAPER_GROUPS + ("proxy",))


def synthetic_problem(seed=0, n_layers=6, n_experts=12):
    """A noiseless table: error = proxy * exp(z_u), proxy = 4^-bits * act_var, z_u a per-unit factor no
    feature explains (one measurement of the unit reveals it); storage cost ~ bits; a 3.25-bit budget."""
    stats = make_stats(n_layers=n_layers, n_experts=n_experts, seed=seed)
    rng = np.random.default_rng(seed)
    bits = np.array([c.bits for c in CHOICES], float)
    proxy = stats.act_var[:, None] * 4.0 ** -bits[None, :]
    truth = proxy * np.exp(rng.normal(0, 1.0, len(stats)))[:, None]
    size = (stats.out_features * stats.in_features).astype(float)
    cost = size[:, None] * (bits[None, :] + 0.25)
    budget = 3.5 * size.sum()
    freq = stats.frequency + 1e-3
    return stats, proxy, truth, cost, budget, freq


def empty_table(stats, freq):
    return SensitivityTable([s.unit for s in stats], CHOICES, frequency=np.asarray(freq, float).copy())


def measuring(table, truth, log=None):
    def measure(pairs):
        for u, c in pairs:
            assert not table.measured[u, c], f"pair {(u, c)} measured twice"
            table.error[u, c], table.measured[u, c] = truth[u, c], True
            if log is not None:
                log.append((u, c))
    return measure


@pytest.mark.parametrize("rules", [1, 3, 5, 17, 60, 200])
def test_adaptive_never_exceeds_the_budget_nor_remeasures(rules):
    stats, proxy, truth, cost, budget, freq = synthetic_problem()
    table, log = empty_table(stats, freq), []
    res = adaptive_fill(table, stats, measuring(table, truth, log), rules, cost, budget, make_estimator("ridge"),
                        PROXY_SPEC, proxy, rounds=3)
    assert len(log) == len(set(log)) == int(table.measured.sum()) == res.rules <= rules
    assert res.rules == rules  # the synthetic table has far more pairs than any budget here: all of it is spent
    assert res.table.complete and np.all(res.table.error > 0)
    np.testing.assert_array_equal(res.table.error[table.measured], truth[table.measured])  # hybrid: measured kept


def _gap(filled_error, truth, cost, budget, freq):
    opt = allocate(freq[:, None] * truth, cost, budget, solver="ilp").total_loss
    idx = allocate(freq[:, None] * filled_error, cost, budget, solver="lagrangian").choice_index
    return totals(freq[:, None] * truth, cost, idx)[0] / opt - 1


def test_adaptive_reaches_the_optimum_with_fewer_rules_than_stratified():
    stats, proxy, truth, cost, budget, freq = synthetic_problem(seed=1)
    units = [s.unit for s in stats]
    n_pairs = len(units) * len(CHOICES)
    first = {}
    for rules in range(n_pairs // 20, n_pairs + 1, n_pairs // 20):
        # stratified: whole anchor experts at every bit-width (the paper), same predictor and features
        shared_fits = rules // len(CHOICES) >= sum(u.is_shared for u in units)
        anchors = set(sample_anchors(units, "stratified", rules=rules, bits_per_unit=len(CHOICES),
                                     include_shared=shared_fits))
        strat = empty_table(stats, freq)
        m = np.array([u in anchors for u in units])
        strat.error[m], strat.measured[m] = truth[m], True
        filled = predict_table(strat, fit_table(strat, stats, make_estimator("ridge"), PROXY_SPEC, proxy), True)
        if "stratified" not in first and _gap(filled.error, truth, cost, budget, freq) < 1e-9:
            first["stratified"] = rules
        ad = empty_table(stats, freq)
        res = adaptive_fill(ad, stats, measuring(ad, truth), rules, cost, budget, make_estimator("ridge"), PROXY_SPEC,
                            proxy)
        if "adaptive" not in first and _gap(res.table.error, truth, cost, budget, freq) < 1e-9:
            first["adaptive"] = rules
    assert "adaptive" in first, "adaptive sampling never reached the optimum plan"
    assert first["adaptive"] < first.get("stratified", n_pairs + 1), first
    assert first["adaptive"] <= n_pairs // 2


def test_initial_pairs_are_whole_routed_anchor_experts_within_budget():
    stats, *_ = synthetic_problem()
    table = empty_table(stats, stats.frequency)
    pairs = initial_pairs(table, 50)
    assert 0 < len(pairs) <= 50 and len(pairs) % len(CHOICES) == 0
    assert not any(table.units[u].is_shared for u, _ in pairs)
    assert initial_pairs(table, len(CHOICES) - 1) == []


def test_rules_and_anchors_are_mutually_exclusive(tmp_path, text_file):
    with pytest.raises(ValueError, match="--rules 100 and --anchors 0.2 both set the rule budget: give one"):
        QuantizeConfig(method="fri", bits=3.0, rules=100, anchors=0.2)  # each part checks itself when built
    r = CliRunner().invoke(app, ["quantize", "--model", "tiny:mixtral", "--method", "fri", "--bits", "3",
                                 "--rules", "100", "--anchors", "0.2", "--calib", str(text_file),
                                 "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "both set the rule budget" in r.output
    assert not (tmp_path / "x").exists()  # refused before any work
    assert QuantizeConfig(rules=100).rule_budget(500, 4) == 100  # constant whatever the model's size
    assert QuantizeConfig(anchors=0.2).rule_budget(500, 4) == 400  # a fraction of the units x bit-widths
    with pytest.raises(ValueError, match="--no-fill"):
        QuantizeConfig(method="fri", solver="ilp", fill=False)
    with pytest.raises(ValueError, match="--predictor"):
        QuantizeConfig(predictor="svm")


def algorithm1(loss, cost, budget, iters=300):
    """Algorithm 1 of the paper, written independently: lambda in [0, lambda_large], arithmetic midpoint,
    per-unit argmin of loss + lambda cost; keep the last lambda whose plan fits (lambda_max)."""
    lam_min, lam_max = 0.0, 1.0
    while cost[np.arange(len(cost)), np.argmin(loss + lam_max * cost, axis=1)].sum() > budget:
        lam_max *= 2  # lambda_large: large enough that the plan fits
    for _ in range(iters):
        lam = (lam_min + lam_max) / 2
        pick = np.argmin(loss + lam * cost, axis=1)
        if cost[np.arange(len(cost)), pick].sum() <= budget:
            lam_max = lam
        else:
            lam_min = lam
    return np.argmin(loss + lam_max * cost, axis=1)


@pytest.mark.parametrize("seed", range(5))
def test_no_fill_is_algorithm_1(seed):
    rng = np.random.default_rng(seed)
    U = 200
    cost = np.sort(rng.uniform(1, 10, (U, 4)), axis=1)
    loss = np.sort(rng.lognormal(0, 2, (U, 4)), axis=1)[:, ::-1] * rng.uniform(0.01, 1, (U, 1))
    budget = 0.4 * cost.sum(axis=1).mean() * U / 2
    pure = allocate(loss, cost, budget, solver="lagrangian", fill=False)
    np.testing.assert_array_equal(pure.choice_index, algorithm1(loss, cost, budget))
    filled = allocate(loss, cost, budget, solver="lagrangian")
    assert filled.total_loss <= pure.total_loss and filled.total_cost <= budget


def test_hand_computed_algorithm_1_leaves_budget_the_fill_spends():
    # two units, choices (cheap, dear): losses (4, 0) and (3, 0), costs (1, 3). Unit 0 takes dear while
    # lambda < 4/2 = 2, unit 1 while lambda < 3/2 = 1.5. Budget 6: lambda = 0 fits (cost 6): both dear.
    # Budget 5: the smallest lambda that fits is 1.5 (ties go to the cheaper choice): unit 0 only.
    loss = np.array([[4.0, 0.0], [3.0, 0.0]])
    cost = np.array([[1.0, 3.0], [1.0, 3.0]])
    assert allocate(loss, cost, 6.0, solver="lagrangian", fill=False).choice_index.tolist() == [1, 1]
    assert allocate(loss, cost, 5.0, solver="lagrangian", fill=False).choice_index.tolist() == [1, 0]
    # unit 0: (cost, loss) (1, 10), (1.5, 9), (4, 0) -- the middle one is off the convex hull, so no lambda
    # picks it; unit 1: (1, 10), (2, 2), (4, 0). Budget 5.5: lambda in (1, 10/3) costs 4 + 2 = 6 > 5.5, so
    # Algorithm 1 ends at lambda = 10/3: unit 0 cheap, unit 1 middle, cost 3, loss 12, 2.5 unused. The fill
    # takes unit 0's step to 1.5 (ratio 2) and unit 1's to 4 (ratio 1): cost 5.5, loss 9 = the ILP optimum.
    loss = np.array([[10.0, 9.0, 0.0], [10.0, 2.0, 0.0]])
    cost = np.array([[1.0, 1.5, 4.0], [1.0, 2.0, 4.0]])
    pure = allocate(loss, cost, 5.5, solver="lagrangian", fill=False)
    assert pure.choice_index.tolist() == [0, 1] and pure.total_cost == 3.0 and pure.total_loss == 12.0
    filled = allocate(loss, cost, 5.5, solver="lagrangian")
    assert filled.choice_index.tolist() == [1, 2] and filled.total_loss == 9.0
    assert allocate(loss, cost, 5.5, solver="ilp").total_loss == 9.0


def test_predictor_and_no_fill_end_to_end_through_the_pipeline(tmp_path, text_file):
    """--method fri --predictor knn --rules N --solver lagrangian --no-fill: at most N pairs measured
    (adaptive), the plan is Algorithm 1's on the run's own table and budget."""
    cfg = _cfg(text_file, method="fri", quantizer="rtn", bits=3.5, rules=40, predictor="knn", solver="lagrangian",
               fill=False, save_model=False)
    p = Pipeline(cfg, tmp_path / "run", progress=False)
    res = p.execute()
    table = SensitivityTable.from_csv(tmp_path / "run" / "table.csv")
    assert table.complete and 0 < res["rules"] == int(table.measured.sum()) <= 40 and res["rule_budget"] == 40
    assert res["proxy_seconds"] > 0 and res["profile_seconds"] >= res["proxy_seconds"]
    assert not np.array_equal(table.measured.all(axis=1), table.measured.any(axis=1))  # pairs, not whole units
    plan = Plan.load(tmp_path / "run" / "plan.json")
    assert plan.meta["solver"] == "lagrangian" and plan.meta["fill"] is False
    idx = np.array([table.choices.index(plan.choice(u)) for u in table.units])
    budget = p.allocation_budget
    np.testing.assert_array_equal(idx, algorithm1(table.loss, budget.cost, budget.total))
