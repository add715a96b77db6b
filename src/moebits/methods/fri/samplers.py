"""Anchor samplers: which experts get profiled (FRI-MxMoE Sec. 3.2.2, Appendix E).

An anchor is an *expert*: all of its units (gate, up, down) are profiled, each at every profiled
bit-width (`PROFILED_BITS`), so one anchor unit yields `len(PROFILED_BITS)` rules and the paper's
rule-base size is N_s = N_a * 3 * |B_p|.

Budget: either `rules` (rule-base size: anchor units <= rules // bits_per_unit) or `fraction` (anchor
units <= floor(fraction * number of units)). The result never exceeds it.

Shared experts are always anchors (when `include_shared`): there is at most one or two per layer,
they see every token (so their error weighs most in the objective), and their shapes and inputs
differ from the routed experts', so no routed anchor is a good neighbour for them. They count
against the budget; the routed experts get what is left.

`stratified` (depth-adaptive). MoE layers (those with routed experts), in depth order, are split into
shallow / middle / deep thirds (`np.array_split`, so with L = 3q + 1 the extra layer goes to the
shallow third). Each layer gets a quota of routed experts proportional to a weight -- `middle_ratio`
(2 by default) for middle layers, 1 for the others -- capped at the layer's expert count, the excess
of a capped layer being redistributed over the uncapped ones in the same proportions (water-filling);
quotas are rounded down and the leftover experts go to the largest remainders (ties: middle layers
first, then deeper). Within a layer with E experts and quota q the stride is s = E / q and the picks
are floor(o + k s), k = 0..q-1, with a seeded random offset o in [0, s). With the paper's budget
(E/2 experts per middle layer, E/4 elsewhere) this is exactly "every 2nd expert in the middle, every
4th elsewhere, random offset per layer"; other budgets scale all strides together, the middle
staying `middle_ratio` times denser until it is saturated (every expert profiled).

`random`: routed experts drawn uniformly without replacement over all (layer, expert) pairs.

`adaptive` (moebits, not the paper; `adaptive.py`) starts from `stratified` and spends the rest of the
rule budget on single (unit, choice) pairs in rounds, so its budget is counted in pairs directly.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from ...units import Unit

PROFILED_BITS = (2, 3, 4, 8)
METHODS = ("stratified", "random")  # expert samplers of `sample_anchors`
SAMPLERS = METHODS + ("adaptive",)  # --sampler: adaptive spends the rules on (unit, choice) pairs (adaptive.py)


def anchor_unit_budget(n_units: int, rules: int | None = None, fraction: float | None = None,
                       bits_per_unit: int = len(PROFILED_BITS)) -> int:
    """Maximum number of anchor units under a rule budget or a fraction-of-units budget."""
    if (rules is None) == (fraction is None):
        raise ValueError("give exactly one budget: rules=<rule-base size> or fraction=<share of units>")
    if rules is not None:
        if rules < 0 or bits_per_unit < 1:
            raise ValueError(f"need rules >= 0 and bits_per_unit >= 1, got {rules}, {bits_per_unit}")
        return int(rules) // int(bits_per_unit)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return int(np.floor(fraction * n_units + 1e-9))


def _experts(units: list[Unit]) -> tuple[dict, dict]:
    """-> routed {(layer, expert): [units]} and shared {(layer, 'shared'): [units]}."""
    routed, shared = defaultdict(list), defaultdict(list)
    for u in units:
        (shared if u.is_shared else routed)[(u.layer, u.expert)].append(u)
    return routed, shared


def layer_thirds(layers: list[int]) -> dict[int, str]:
    """layer -> 'shallow' | 'middle' | 'deep' for the given (MoE) layers."""
    parts = np.array_split(np.array(sorted(set(layers))), 3)
    return {int(l): name for name, part in zip(("shallow", "middle", "deep"), parts) for l in part}


def _water_fill(weights: np.ndarray, caps: np.ndarray, total: float) -> np.ndarray:
    """Real quotas proportional to `weights`, each <= its cap, summing to min(total, caps.sum())."""
    quota = np.zeros(len(weights))
    free = caps > 0
    left = min(float(total), float(caps.sum()))
    while left > 1e-9 and free.any():
        share = left * weights * free / (weights * free).sum()
        over = free & (quota + share >= caps)
        if not over.any():
            return quota + share
        left -= (caps[over] - quota[over]).sum()
        quota[over] = caps[over]
        free &= ~over
    return quota


def stratified_quotas(experts_per_layer: dict[int, int], n_experts: int, middle_ratio: float = 2.0) -> dict[int, int]:
    """Integer routed-expert quota per layer, summing to min(n_experts, all experts)."""
    layers = sorted(experts_per_layer)
    third = layer_thirds(layers)
    weights = np.array([middle_ratio if third[l] == "middle" else 1.0 for l in layers])
    caps = np.array([experts_per_layer[l] for l in layers], float)
    real = _water_fill(weights, caps, n_experts)
    quota = np.floor(real + 1e-9).astype(int)
    left = int(min(n_experts, caps.sum())) - int(quota.sum())
    # largest remainder first; ties to middle layers, then to deeper layers
    order = sorted(range(len(layers)), key=lambda i: (-(real[i] - quota[i]), -weights[i], -layers[i]))
    for i in [i for i in order if quota[i] < caps[i]][:left]:
        quota[i] += 1
    return {l: int(q) for l, q in zip(layers, quota)}


def _pick_strided(n: int, q: int, rng: np.random.Generator) -> np.ndarray:
    """q of range(n), evenly spaced with stride n / q and a random offset in [0, stride)."""
    if q <= 0:
        return np.zeros(0, dtype=int)
    stride = n / q
    offset = rng.uniform(0.0, stride)
    return np.minimum(np.floor(offset + stride * np.arange(q)).astype(int), n - 1)


def stratified_experts(routed: dict, n_experts: int, seed: int = 0, middle_ratio: float = 2.0) -> list[tuple]:
    by_layer: dict[int, list] = defaultdict(list)
    for layer, expert in routed:
        by_layer[layer].append(expert)
    quotas = stratified_quotas({l: len(e) for l, e in by_layer.items()}, n_experts, middle_ratio)
    rng = np.random.default_rng(seed)
    picked = []
    for layer in sorted(by_layer):  # one offset per layer, drawn in depth order: reproducible
        experts = sorted(by_layer[layer])
        picked += [(layer, experts[i]) for i in _pick_strided(len(experts), quotas[layer], rng)]
    return picked


def random_experts(routed: dict, n_experts: int, seed: int = 0) -> list[tuple]:
    keys = sorted(routed)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(keys), size=min(n_experts, len(keys)), replace=False)
    return [keys[i] for i in idx]


def sample_anchors(units: list[Unit], method: str = "stratified", *, rules: int | None = None,
                   fraction: float | None = None, bits_per_unit: int = len(PROFILED_BITS), seed: int = 0,
                   include_shared: bool = True, middle_ratio: float = 2.0) -> list[Unit]:
    """Anchor units (all units of each selected expert), sorted, within the budget."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if middle_ratio < 1.0:
        raise ValueError(f"middle_ratio must be >= 1 (the middle is the denser third), got {middle_ratio}")
    budget = anchor_unit_budget(len(units), rules, fraction, bits_per_unit)
    routed, shared = _experts(units)
    anchors = [u for us in shared.values() for u in us] if include_shared else []
    if len(anchors) > budget:
        raise ValueError(f"the budget allows {budget} anchor units but the shared experts alone have "
                         f"{len(anchors)}; raise the budget or pass include_shared=False")
    if routed:
        units_per_expert = max(len(us) for us in routed.values())
        n_experts = (budget - len(anchors)) // units_per_expert
        if method == "stratified":
            picked = stratified_experts(routed, n_experts, seed, middle_ratio)
        else:
            picked = random_experts(routed, n_experts, seed)
        anchors += [u for key in picked for u in routed[key]]
    return sorted(anchors, key=Unit.sort_key)
