import itertools

import numpy as np
import pytest

from moebits.allocate import (InfeasibleBudgetError, allocate, combine_groups, expert_level, layer_uniform,
                              tie_gate_up, to_plan)
from moebits.allocate import lagrangian
from moebits.units import Choice, Unit


def brute_force(loss, cost, budget):
    U, C = loss.shape
    best = np.inf
    for comb in itertools.product(range(C), repeat=U):
        r = np.arange(U), np.array(comb)
        if cost[r].sum() <= budget:
            best = min(best, loss[r].sum())
    return best


def random_instance(rng, U, C, integer_cost=True):
    cost = rng.integers(0, 12, (U, C)).astype(float) if integer_cost else rng.random((U, C)) * 10
    loss = rng.random((U, C)) * 10
    budget = rng.uniform(cost.min(1).sum(), cost.max(1).sum() + 2)
    return loss, cost, budget


def quant_like(rng, U, C=4):
    """Loss decreasing geometrically in bits, cost increasing, skewed frequencies, mixed shapes."""
    bits = np.array([2, 3, 4, 8])[:C]
    size = rng.choice([1.0, 2.0, 0.5], U)
    cost = size[:, None] * (bits + 0.25)[None, :]
    f = rng.lognormal(0, 1.5, U)
    loss = f[:, None] * rng.lognormal(0, 1, U)[:, None] * 4.0 ** -bits[None, :] * rng.lognormal(0, 0.1, (U, C))
    return np.minimum.accumulate(loss, axis=1), cost, f


def fits(res, budget):
    return res.total_cost <= budget + 1e-9 * max(1, abs(budget))


@pytest.mark.parametrize("seed", range(6))
def test_ilp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    for _ in range(15):
        loss, cost, budget = random_instance(rng, int(rng.integers(1, 6)), int(rng.integers(1, 5)), seed % 2 == 0)
        best = brute_force(loss, cost, budget)
        for reduce in (True, False):
            res = allocate(loss, cost, budget, "ilp", reduce=reduce, mip_rel_gap=0)
            assert res.total_loss == pytest.approx(best, abs=1e-9)
            assert fits(res, budget)
            assert res.optimal and res.lower_bound <= best + 1e-9
            r = np.arange(len(loss))
            assert res.total_loss == pytest.approx(loss[r, res.choice_index].sum())


def packed_zero_like(U=240, seed=0):
    """Near-equal sensitivities and costs that are not multiples of one quantum (zero points at the code
    width: a bit more costs 128*(in+1), not 128*in): the budget never fills exactly, the LP bound sits
    one upgrade below the best plan, and proving 1e-4 takes HiGHS minutes (more than 120 s for 240 units)."""
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 8])
    loss = np.exp(rng.normal(0, 0.05, U))[:, None] * 4.0 ** -bits[None, :] * np.exp(rng.normal(0, 0.02, (U, 4)))
    in_features = np.where(np.arange(U) % 3 == 2, 64, 128)
    cost = np.stack([b * 128 * in_features + 128 * (16 + b) for b in bits], 1).astype(float)
    return loss, cost, 2.5 * 128 * in_features.sum()


def test_ilp_node_limit_stops_deterministically_with_the_best_plan_and_an_honest_gap():
    loss, cost, budget = packed_zero_like()
    incumbent = lagrangian.solve(loss, cost, budget)
    dual_bound, _ = lagrangian.dual(loss, cost, incumbent.info["lambda_bound"], budget)
    runs = [allocate(loss, cost, budget, "ilp", node_limit=50) for _ in range(2)]
    res = runs[0]
    assert np.array_equal(runs[0].choice_index, runs[1].choice_index)  # a node limit, unlike a time limit
    assert not res.optimal and "node limit (50 nodes)" in res.info["message"]
    assert fits(res, budget) and res.total_loss <= incumbent.total_loss
    r = np.arange(len(loss))
    assert res.total_loss == pytest.approx(loss[r, res.choice_index].sum())
    # the proven bound is a bound: at least the Lagrangian dual's, at most the plan's own loss
    assert dual_bound - 1e-12 <= res.lower_bound <= res.total_loss
    assert res.gap == pytest.approx((res.total_loss - res.lower_bound) / res.total_loss)
    assert 0 < res.gap < 5e-3
    more = allocate(loss, cost, budget, "ilp", node_limit=400)  # more nodes never prove less
    assert more.lower_bound >= res.lower_bound - 1e-12 and more.total_loss <= res.total_loss + 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_lagrangian_bounds_and_budget_on_arbitrary_instances(seed):
    """Unsorted, non-convex rows: never over budget, never below the optimum, and its bound is valid."""
    rng = np.random.default_rng(100 + seed)
    for _ in range(20):
        loss, cost, budget = random_instance(rng, int(rng.integers(1, 6)), int(rng.integers(1, 5)), seed % 2 == 0)
        best = brute_force(loss, cost, budget)
        for fill in (True, False):
            res = allocate(loss, cost, budget, "lagrangian", fill=fill)
            assert fits(res, budget)
            assert res.total_loss >= best - 1e-9
            assert res.lower_bound <= best + 1e-9
            assert res.gap == pytest.approx((res.total_loss - res.lower_bound) / res.total_loss, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_lagrangian_close_to_ilp_on_quantization_like_instances(seed):
    rng = np.random.default_rng(seed)
    loss, cost, _ = quant_like(rng, 400)
    for avg in (2.5, 3.0, 3.25, 4.0, 6.0):
        budget = avg * cost[:, 0].sum() / 2.25
        opt = allocate(loss, cost, budget, "ilp", mip_rel_gap=0)
        assert opt.optimal and fits(opt, budget) and opt.gap <= 1e-6
        pure = allocate(loss, cost, budget, "lagrangian", fill=False)
        full = allocate(loss, cost, budget, "lagrangian")
        assert fits(pure, budget) and fits(full, budget)
        assert full.total_loss <= pure.total_loss + 1e-15  # the fill only ever improves
        assert full.total_cost >= pure.total_cost
        assert full.total_loss <= opt.total_loss * (1 + 5e-3)
        assert opt.total_loss >= full.lower_bound - 1e-12  # the Lagrangian bound is a valid bound
        assert full.lambda_ > 0


def test_lagrangian_lambda_monotone_cost():
    rng = np.random.default_rng(3)
    loss, cost, _ = quant_like(rng, 200)
    costs = [cost[np.arange(200), lagrangian._pick(loss, cost, lam)].sum() for lam in np.logspace(-8, 2, 60)]
    assert np.all(np.diff(costs) <= 0)


def test_loose_budget_takes_the_best_choice_everywhere():
    rng = np.random.default_rng(0)
    loss, cost, _ = quant_like(rng, 50)
    for solver in ("lagrangian", "ilp"):
        res = allocate(loss, cost, cost.max(1).sum() * 2, solver)
        assert res.total_loss == pytest.approx(loss.min(1).sum())
    res = allocate(loss, cost, cost.max(1).sum() * 2, "lagrangian")
    assert res.lambda_ == 0.0


def model_units(layers=2, experts=4, shared=True):
    units = []
    for layer in range(layers):
        for e in list(range(experts)) + (["shared"] if shared else []):
            units += [Unit(layer, e, k) for k in ("gate", "up", "down")]
    return units


def test_group_builders():
    units = model_units()
    g = tie_gate_up(units)
    assert len(np.unique(g)) == 2 * 5 * 2
    assert g[0] == g[1] != g[2]  # L0.E0: gate == up != down
    e = expert_level(units)
    assert len(np.unique(e)) == 2 * 5 and e[0] == e[1] == e[2] != e[3]
    lay = layer_uniform(units)
    # per layer: 3 routed kinds + 3 shared units
    assert len(np.unique(lay)) == 2 * 6
    routed_gate_l0 = [i for i, u in enumerate(units) if u.layer == 0 and u.kind == "gate" and not u.is_shared]
    assert len(set(lay[routed_gate_l0])) == 1
    both = combine_groups(lay, tie_gate_up(units))
    # per layer: routed gate+up, routed down, shared gate+up, shared down
    assert len(np.unique(both)) == 2 * 4
    with pytest.raises(ValueError, match="shape"):
        combine_groups(lay, lay[:-1])


@pytest.mark.parametrize("solver", ["ilp", "lagrangian", "freq", "uniform"])
def test_groups_respected_and_optimal_over_groups(solver):
    rng = np.random.default_rng(1)
    units = model_units(layers=3, experts=6)
    loss, cost, f = quant_like(rng, len(units))
    budget = 3.1 * cost[:, 0].sum() / 2.25
    for groups in (tie_gate_up(units), expert_level(units), layer_uniform(units),
                   combine_groups(layer_uniform(units), tie_gate_up(units))):
        res = allocate(loss, cost, budget, solver, groups=groups, frequency=f)
        assert fits(res, budget)
        for g in np.unique(groups):
            assert len(set(res.choice_index[groups == g])) == 1
        r = np.arange(len(units))
        assert res.total_loss == pytest.approx(loss[r, res.choice_index].sum())
    if solver == "ilp":  # the grouped optimum is never better than the free one
        free = allocate(loss, cost, budget, "ilp", mip_rel_gap=0)
        assert free.total_loss <= res.total_loss + 1e-12


def test_grouped_ilp_matches_brute_force_over_groups():
    rng = np.random.default_rng(7)
    units = model_units(layers=1, experts=2, shared=False)  # 6 units
    loss, cost, _ = quant_like(rng, len(units))
    groups = tie_gate_up(units)  # 4 groups
    budget = 3.5 * cost[:, 0].sum() / 2.25
    best = np.inf
    for comb in itertools.product(range(4), repeat=4):
        idx = np.array(comb)[groups]
        r = np.arange(len(units))
        if cost[r, idx].sum() <= budget:
            best = min(best, loss[r, idx].sum())
    assert allocate(loss, cost, budget, "ilp", groups=groups, mip_rel_gap=0).total_loss == pytest.approx(best)


def test_freq_gives_more_bits_to_more_frequent_units():
    rng = np.random.default_rng(2)
    U = 60
    cost = np.tile([2.25, 3.25, 4.25, 8.25], (U, 1))
    loss = rng.random((U, 4))  # freq ignores loss except for ties
    f = rng.permutation(np.linspace(0.01, 1, U))
    for avg in (2.5, 3.25, 5.0):
        res = allocate(loss, cost, avg * U, "freq", frequency=f)
        assert fits(res, avg * U)
        bits = cost[np.arange(U), res.choice_index]
        order = np.argsort(-f)
        assert np.all(np.diff(bits[order]) <= 0)  # non-increasing as frequency decreases
        assert avg * U - res.total_cost < 1.0  # the spare budget is smaller than the smallest step
    with pytest.raises(ValueError, match="frequency"):
        allocate(loss, cost, 3 * U, "freq")


def test_uniform_picks_largest_fitting_column():
    U = 10
    cost = np.tile([2.25, 3.25, 4.25, 8.25], (U, 1))
    loss = np.tile([4.0, 3.0, 2.0, 1.0], (U, 1))
    res = allocate(loss, cost, 4.3 * U, "uniform")
    assert set(res.choice_index) == {2} and res.total_cost == pytest.approx(42.5)
    with pytest.raises(InfeasibleBudgetError, match=r"uniform plan.*22\.5 – 82\.5"):
        allocate(loss, cost, 2.0 * U, "uniform")
    # mixed-feasible but no uniform column fits: still an error for uniform
    cost2 = cost.copy()
    cost2[0] = [9.0, 9.0, 9.0, 9.0]
    with pytest.raises(InfeasibleBudgetError):
        allocate(loss, cost2, cost2[:, 0].sum() - 1, "uniform")


@pytest.mark.parametrize("solver", ["ilp", "lagrangian", "freq"])
def test_infeasible_budget_message_states_range(solver):
    cost = np.array([[2.0, 3.0], [4.0, 8.0]])
    loss = np.array([[1.0, 0.5], [1.0, 0.1]])
    fmt = lambda c: f"{c / 2:.3f} bits per weight"  # noqa: E731
    with pytest.raises(InfeasibleBudgetError) as e:
        allocate(loss, cost, 5.0, solver, frequency=np.ones(2), budget_format=fmt)
    msg = str(e.value)
    assert "6 – 11" in msg and "feasible: 3.000 bits per weight – 5.500 bits per weight" in msg
    assert isinstance(e.value, ValueError) and (e.value.min_cost, e.value.max_cost) == (6.0, 11.0)


@pytest.mark.parametrize("loss,cost,budget,match", [
    (np.array([[np.nan, 1.0]]), np.array([[1.0, 2.0]]), 3, "finite"),
    (np.array([[np.inf, 1.0]]), np.array([[1.0, 2.0]]), 3, "finite"),
    (np.array([[1.0, 1.0]]), np.array([[1.0, 2.0, 3.0]]), 3, "shape"),
    (np.array([[1.0, 1.0]]), np.array([[-1.0, 2.0]]), 3, ">= 0"),
    (np.array([1.0, 1.0]), np.array([1.0, 2.0]), 3, "2-D"),
    (np.array([[1.0, 1.0]]), np.array([[1.0, 2.0]]), float("nan"), "budget"),
])
def test_bad_input(loss, cost, budget, match):
    with pytest.raises(ValueError, match=match):
        allocate(loss, cost, budget)


def test_bad_solver_groups_frequency():
    loss, cost = np.ones((3, 2)), np.ones((3, 2))
    with pytest.raises(ValueError, match="unknown solver"):
        allocate(loss, cost, 5, "cp-sat")
    with pytest.raises(ValueError, match="groups"):
        allocate(loss, cost, 5, groups=np.zeros(2))
    with pytest.raises(ValueError, match="frequency"):
        allocate(loss, cost, 5, "freq", frequency=np.ones(2))


def test_to_plan():
    units = model_units(layers=1, experts=2)
    choices = [Choice(b, 128) for b in (2, 3, 4, 8)]
    rng = np.random.default_rng(0)
    loss, cost, _ = quant_like(rng, len(units))
    res = allocate(loss, cost, 3.25 * cost[:, 0].sum() / 2.25, "ilp")
    assert res.optimal and res.gap <= 1e-4  # HiGHS's default tolerance
    plan = to_plan(units, choices, res, loss, cost, {"method": "mxmoe"})
    plan.check_covers(units)
    for i, u in enumerate(units):
        a = plan.assignments[u]
        assert a.choice == choices[res.choice_index[i]]
        assert a.loss == loss[i, res.choice_index[i]] and a.cost == cost[i, res.choice_index[i]]
    assert plan.meta["solver"] == "ilp" and plan.meta["method"] == "mxmoe"
    assert plan.meta["total_loss"] == pytest.approx(res.total_loss)
    with pytest.raises(ValueError, match="units"):
        to_plan(units[:-1], choices, res, loss, cost)
