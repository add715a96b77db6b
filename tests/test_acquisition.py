"""FRI's acquisitions of the adaptive rounds (issue 25): `expert` (whole-expert rounds) and the opt-in
`per-cost` touch fewer experts than `score` at the same rule budget, keep the budget, measure no pair
twice, and a bad value gets a clear error."""
import numpy as np
import pytest

from moebits.job import QuantizeConfig
from moebits.job.config import upgrade_spec
from moebits.methods.fri.adaptive import (adaptive_fill, expert_ids, pick_expert_pairs, pick_pairs,
                                         pick_pairs_per_cost)
from moebits.methods.fri.predictors import make_estimator

from test_adaptive import PROXY_SPEC, empty_table, measuring, synthetic_problem


def _fill(acquisition, rules, seed, rounds_log=None):
    stats, proxy, truth, cost, budget, freq = synthetic_problem(seed=seed)
    table, log = empty_table(stats, freq), []
    measure = measuring(table, truth, log)
    if rounds_log is not None:  # also keep each round's pairs
        inner = measure
        measure = lambda pairs: (rounds_log.append(list(pairs)), inner(pairs))  # noqa: E731
    res = adaptive_fill(table, stats, measure, rules, cost, budget, make_estimator("ridge"),
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


@pytest.mark.parametrize("seed", [0, 1])
def test_expert_rounds_touch_fewer_experts_one_pair_per_unit_per_round(seed):
    rules = 60
    res_s, log_s, touched_s = _fill("score", rules, seed)
    rounds = []
    res_e, log_e, touched_e = _fill("expert", rules, seed, rounds)
    assert len(log_e) == len(set(log_e)) == res_e.rules == rules  # budget kept and spent, no pair twice
    assert touched_e < touched_s, (touched_e, touched_s)
    stats = synthetic_problem(seed=seed)[0]
    expert = expert_ids(empty_table(stats, stats.frequency))
    for pairs in rounds[1:]:  # the adaptive rounds: one pair per unit, whole experts (all but the last cut)
        units = [u for u, _ in pairs]
        assert len(units) == len(set(units))
        per_expert = np.bincount(expert[units])
        assert (np.sort(per_expert[per_expert > 0])[1:] == 3).all(), per_expert


def test_pick_expert_pairs_against_hand_computation():
    # units 0-2: expert 0, units 3-5: expert 1, unit 6: expert 2 (a one-unit expert)
    expert = np.array([0, 0, 0, 1, 1, 1, 2])
    score = np.array([[1.0, 0.2], [0.1, 0.3], [0.2, 0.0], [2.0, 0.1], [0.0, 0.0], [0.0, 0.05], [1.8, 1.7]])
    available = np.ones_like(score, bool)
    # each unit's best pair; offers: expert 0: 1.0 + 0.3 + 0.2 = 1.5, expert 1: 2.0 + 0.05 + 0.0 = 2.05,
    # expert 2: 1.8 -> expert 1 whole (best pair first), then expert 2, cut at n = 4
    assert pick_expert_pairs(score, available, 4, expert, per_expert=3) == [(3, 0), (5, 1), (4, 0), (6, 0)]
    assert pick_expert_pairs(score, available, 7, expert, per_expert=3) == \
        [(3, 0), (5, 1), (4, 0), (6, 0), (0, 0), (1, 1), (2, 0)]
    # two pairs per unit, two per expert: offers 1.0 + 0.3, 2.0 + 0.1, 1.8 + 1.7 -> expert 2 first
    assert pick_expert_pairs(score, available, 3, expert, per_expert=2, per_unit=2) == [(6, 0), (6, 1), (3, 0)]
    # a measured pair is not offered: without (3, 0), expert 1 offers 0.1 + 0.05 + 0.0 and comes last
    available[3, 0] = False
    assert pick_expert_pairs(score, available, 7, expert, per_expert=3)[:4] == [(6, 0), (0, 0), (1, 1), (2, 0)]
    assert pick_expert_pairs(score, np.zeros_like(available), 3, expert, per_expert=3) == []


def test_acquisition_option_is_validated_and_old_runs_keep_theirs():
    assert QuantizeConfig(model="demo", method="fri").acquisition == "expert"
    assert QuantizeConfig(model="demo", method="fri", acquisition="score").acquisition == "score"
    # a run.json written before the default changed sampled with "score": it resumes as such
    assert upgrade_spec({"version": 3, "method": "fri"})["acquisition"] == "score"
    assert upgrade_spec({"version": 3, "acquisition": "per-cost"})["acquisition"] == "per-cost"
    assert "acquisition" not in upgrade_spec({"version": 3, "method": "mxmoe"})  # never read it
    assert "acquisition" not in upgrade_spec(QuantizeConfig(method="fri").spec())
    assert QuantizeConfig(model="demo", method="fri", acquisition="per-cost").acquisition == "per-cost"
    with pytest.raises(ValueError, match="--acquisition 'cheapest'"):
        QuantizeConfig(model="demo", method="fri", acquisition="cheapest")
    stats, proxy, truth, cost, budget, freq = synthetic_problem()
    with pytest.raises(ValueError, match="--acquisition"):
        adaptive_fill(empty_table(stats, freq), stats, lambda pairs: None, 10, cost, budget, acquisition="x")
