from collections import Counter

import numpy as np
import pytest

from moebits.methods.fri.samplers import anchor_unit_budget, layer_thirds, sample_anchors, stratified_quotas
from moebits.units import KINDS, Unit


def all_units(n_layers=24, n_experts=60, shared=True):
    experts = [*range(n_experts), "shared"] if shared else list(range(n_experts))
    return [Unit(l, e, k) for l in range(n_layers) for e in experts for k in KINDS]


def routed_per_layer(anchors):
    return Counter(u.layer for u in anchors if not u.is_shared and u.kind == "gate")


@pytest.mark.parametrize("method", ["stratified", "random"])
@pytest.mark.parametrize("rules", [1000, 2500, 5000, 10000])
def test_rule_budget_respected_and_whole_experts(method, rules):
    units = all_units()
    anchors = sample_anchors(units, method, rules=rules, seed=1)
    assert len(anchors) * 4 <= rules
    assert len(anchors) * 4 > rules - 3 * 4  # less than one expert's worth of rules left unused
    assert sum(u.is_shared for u in anchors) == 24 * 3  # shared experts always in
    experts = Counter((u.layer, u.expert) for u in anchors)
    assert set(experts.values()) == {3}  # every anchor expert with gate, up and down
    assert len(set(anchors)) == len(anchors) and set(anchors) <= set(units)


def test_paper_budget_gives_strides_two_and_four():
    units = all_units()  # 24 layers x 60 experts: thirds of 8 layers
    n_routed = 8 * 30 + 16 * 15
    anchors = sample_anchors(units, rules=(n_routed + 24) * 3 * 4, seed=3)
    per_layer = routed_per_layer(anchors)
    third = layer_thirds(range(24))
    for layer in range(24):
        experts = sorted(u.expert for u in anchors if u.layer == layer and not u.is_shared and u.kind == "gate")
        stride = 2 if third[layer] == "middle" else 4
        assert per_layer[layer] == 60 // stride
        assert set(np.diff(experts)) == {stride}  # every 2nd / 4th expert, offset random


@pytest.mark.parametrize("rules", [1200, 3000, 6000])
def test_middle_third_is_denser(rules):
    units = all_units(n_layers=27, n_experts=64)
    anchors = sample_anchors(units, rules=rules, seed=0)
    per_layer = routed_per_layer(anchors)
    third = layer_thirds(range(27))
    density = {t: np.mean([per_layer[l] for l in range(27) if third[l] == t]) for t in ("shallow", "middle", "deep")}
    assert density["middle"] >= 1.8 * density["shallow"] and density["middle"] >= 1.8 * density["deep"]


def test_middle_saturates_then_outer_layers_fill():
    quotas = stratified_quotas({l: 10 for l in range(9)}, n_experts=60)
    assert [quotas[l] for l in (3, 4, 5)] == [10, 10, 10]  # middle saturated
    assert sum(quotas.values()) == 60
    assert all(quotas[l] == 5 for l in (0, 1, 2, 6, 7, 8))
    assert sum(stratified_quotas({l: 10 for l in range(9)}, n_experts=1000).values()) == 90


def test_seeds_reproducible_and_different():
    units = all_units()
    for method in ("stratified", "random"):
        a = sample_anchors(units, method, rules=3000, seed=7)
        assert a == sample_anchors(units, method, rules=3000, seed=7)
        assert a != sample_anchors(units, method, rules=3000, seed=8)


def test_fraction_equals_rules_budget():
    units = all_units(n_layers=12, n_experts=16)
    n = len(units)
    by_fraction = sample_anchors(units, fraction=0.25, seed=2)
    by_rules = sample_anchors(units, rules=int(0.25 * n) * 4, seed=2)
    assert by_fraction == by_rules and len(by_fraction) <= 0.25 * n
    assert anchor_unit_budget(100, fraction=0.333) == 33
    assert anchor_unit_budget(100, rules=99) == 24
    with pytest.raises(ValueError, match="exactly one"):
        anchor_unit_budget(100, rules=10, fraction=0.1)
    assert sample_anchors(units, fraction=1.0) == sorted(units, key=Unit.sort_key)


def test_shared_experts_need_budget_or_opt_out():
    units = all_units(n_layers=4, n_experts=8)
    with pytest.raises(ValueError, match="shared"):
        sample_anchors(units, rules=4 * 3 * 4 - 1)
    anchors = sample_anchors(units, rules=4 * 3 * 4, include_shared=False)
    assert not any(u.is_shared for u in anchors) and len(anchors) == 12
    assert sample_anchors(all_units(4, 8, shared=False), "random", fraction=0.5, seed=0)


def test_random_sampler_is_not_depth_stratified_but_uniform():
    units = all_units(n_layers=30, n_experts=64)
    counts = np.zeros(30)
    for seed in range(20):
        per_layer = routed_per_layer(sample_anchors(units, "random", rules=3000, seed=seed))
        counts += [per_layer[l] for l in range(30)]
    third = layer_thirds(range(30))
    mid = np.mean([counts[l] for l in range(30) if third[l] == "middle"])
    out = np.mean([counts[l] for l in range(30) if third[l] != "middle"])
    assert abs(mid / out - 1) < 0.15
