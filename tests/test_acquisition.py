"""FRI's opt-in cost-aware acquisition (`--acquisition per-cost`, issue 25): fewer experts touched at the
same rule budget, the budget kept, no pair twice, and a clear error for a bad value."""
import numpy as np
import pytest

from moebits.job import QuantizeConfig
from moebits.methods.fri.adaptive import adaptive_fill, expert_ids, pick_pairs, pick_pairs_per_cost
from moebits.methods.fri.predictors import make_estimator

from test_adaptive import PROXY_SPEC, empty_table, measuring, synthetic_problem


def _fill(acquisition, rules, seed):
    stats, proxy, truth, cost, budget, freq = synthetic_problem(seed=seed)
    table, log = empty_table(stats, freq), []
    res = adaptive_fill(table, stats, measuring(table, truth, log), rules, cost, budget, make_estimator("ridge"),
                        PROXY_SPEC, proxy, rounds=3, acquisition=acquisition, seed=seed)
    touched = len(np.unique(expert_ids(table)[table.measured.any(axis=1)]))
    return res, log, touched


@pytest.mark.parametrize("seed", [0, 1])
def test_per_cost_touches_fewer_experts_within_the_same_budget(seed):
    rules = 60
    got = {}
    for acq in ("score", "per-cost"):
        res, log, touched = _fill(acq, rules, seed)
        assert len(log) == len(set(log)) == res.rules <= rules  # budget kept, no pair measured twice
        assert res.rules == rules  # and spent: the comparison is at equal pairs
        got[acq] = touched
    assert got["per-cost"] < got["score"], got


def test_pick_pairs_per_cost_against_hand_computation():
    # units 0,1 belong to expert 0 (already touched), units 2,3 to expert 1, unit 4 to expert 2 (untouched)
    expert = np.array([0, 0, 1, 1, 2])
    score = np.array([[1.0, 0.5], [0.9, 0.1], [2.0, 0.2], [1.9, 0.3], [2.4, 0.0]])
    available = np.ones_like(score, bool)
    touched = np.array([True, False, False])
    pair_cost = np.ones(5)
    # by score alone: units 4, 2, 3 (one pair per unit), three experts' worth of new overhead
    assert pick_pairs(score, available, 3) == [(4, 0), (2, 0), (3, 0)]
    # per cost with overhead 1.5: score / cost = 1.0 (u0), 0.9 (u1), 2.0/2.5 = 0.8 (u2), 1.9/2.5 = 0.76 (u3),
    # 2.4/2.5 = 0.96 (u4) -> u0, then u4, then u1: one new expert instead of three
    assert pick_pairs_per_cost(score, available, 3, expert, touched, pair_cost, 1.5) == [(0, 0), (4, 0), (1, 0)]
    # overhead 3: u4's expert is touched, so 2.4 beats u0's 1.0 and u2's 2.0/4
    assert pick_pairs_per_cost(score, available, 2, expert, np.array([True, False, True]), pair_cost, 3.0) == \
        [(4, 0), (0, 0)]
    got = pick_pairs_per_cost(score, available, 3, expert, np.array([True, False, True]), pair_cost, 0.5)
    # overhead 0.5: u4 (2.4), u2 (2.0/1.5 = 1.33 beats u3's 1.27 and u0's 1.0), then u3 at 1.9: once u2
    # touched expert 1 within the round, its other unit is charged the pair cost alone
    assert got == [(4, 0), (2, 0), (3, 0)]
    assert touched.tolist() == [True, False, False]  # the caller's array is not modified


def test_acquisition_option_is_validated():
    assert QuantizeConfig(model="demo", method="fri").acquisition == "score"
    assert QuantizeConfig(model="demo", method="fri", acquisition="per-cost").acquisition == "per-cost"
    with pytest.raises(ValueError, match="--acquisition 'cheapest'"):
        QuantizeConfig(model="demo", method="fri", acquisition="cheapest")
    stats, proxy, truth, cost, budget, freq = synthetic_problem()
    with pytest.raises(ValueError, match="--acquisition"):
        adaptive_fill(empty_table(stats, freq), stats, lambda pairs: None, 10, cost, budget, acquisition="x")
