import itertools

import numpy as np
import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("sb3_contrib")

from gymnasium.utils.env_checker import check_env  # noqa: E402

from moebits.allocate import allocate  # noqa: E402
from moebits.rl import BitAllocEnv, GroupProblem, repair  # noqa: E402

BITS = np.array([2, 4, 8, 16])


def instance(seed, G=6, fraction=0.4):
    """Quantization-like: cost grows with bits (two group sizes), loss falls ~4x per extra bit."""
    rng = np.random.default_rng(seed)
    size = rng.choice([1.0, 2.0], G)
    cost = size[:, None] * (BITS + 0.25)[None, :]
    loss = rng.lognormal(0, 1, G)[:, None] * 4.0 ** -BITS[None, :]
    budget = cost[:, 0].sum() + fraction * (cost[:, -1].sum() - cost[:, 0].sum())
    objectives = {"lat": cost * 1e-6, "mem": cost / 8, "eng": cost * 2e-9}
    return GroupProblem(loss, cost, budget, objectives, features=rng.random((G, 3))), loss, cost, budget


def brute_force(loss, cost, budget):
    G, C = loss.shape
    r = np.arange(G)
    return min(loss[r, c].sum() for c in itertools.product(range(C), repeat=G) if cost[r, c].sum() <= budget)


def test_environment_passes_the_gymnasium_checker():
    p = instance(0)[0]
    for start in ("random", "cheapest"):
        check_env(BitAllocEnv(p, weights=(1, 0.1, 0.1, 0.1), start=start), skip_render_check=True)


def test_no_action_leaves_the_bit_set_or_the_budget():
    p, loss, cost, budget = instance(1)
    env = BitAllocEnv(p, start="cheapest", horizon=10_000)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    # lowering the cheapest choice is a clamped no-op (not 1 bit, not an error)
    _, reward, _, _, _ = env.step(0)
    assert env.idx[0] == 0 and reward < 0
    for a in rng.integers(0, env.action_space.n, 3000):
        env.step(int(a))
        assert np.all((env.idx >= 0) & (env.idx <= 3))  # columns of {2, 4, 8, 16}: no other bit-width exists
        assert cost[np.arange(6), env.idx].sum() <= budget + 1e-9
        mask = env.action_masks()
        assert not mask[0::2][env.idx == 0].any() and not mask[1::2][env.idx == 3].any()
    with pytest.raises(ValueError):
        env.step(env.action_space.n)  # no such action


def test_repair_always_fits():
    p, loss, cost, budget = instance(2)
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = repair(rng.integers(0, 4, 6), cost, budget, loss)
        assert cost[np.arange(6), idx].sum() <= budget + 1e-9 and np.all(idx >= 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_rl_solver_plan_meets_the_budget_and_is_within_10_percent_of_brute_force(seed):
    """Additive proxy, 6 groups x {2,4,8,16}: the agent's plan (best within budget seen in 1000 seeded
    steps) has a proxy loss within 10 % of the brute-force optimum over all 4^6 plans."""
    p, loss, cost, budget = instance(seed)
    best = brute_force(loss, cost, budget)
    res = allocate(loss, cost, budget, solver="rl", steps=1000, seed=0, objectives=p.objectives,
                   features=p.features)
    assert res.total_cost <= budget + 1e-9
    assert res.total_loss <= 1.10 * best
    assert res.info["repaired"] is False and res.info["episodes"] > 1


def test_rl_solver_with_groups_and_cost_weights_meets_the_budget():
    p, loss, cost, budget = instance(3, G=8, fraction=0.2)
    groups = np.repeat(np.arange(4), 2)
    res = allocate(loss, cost, budget, solver="rl", groups=groups, steps=400, seed=1, objectives=p.objectives,
                   weights=(1.0, 0.5, 0.5, 0.5), features=p.features)
    assert res.total_cost <= budget + 1e-9
    assert np.all(res.choice_index[0::2] == res.choice_index[1::2])  # tied units share their choice


def test_quantize_method_rl_with_qat_end_to_end(tmp_path, text_file):
    """`moebits quantize --method rl`: bits from {2,4,8,16}, one width per expert, within the budget;
    `--qat-steps` fine-tunes under that plan and records it."""
    import json

    from typer.testing import CliRunner

    from moebits.cli import app
    from moebits.plan import Plan

    args = ["quantize", "--model", "tiny:qwen2_moe", "--method", "rl", "--bits", "5", "--group-size", "32",
            "--calib", str(text_file), "--eval", str(text_file), "--nsamples", "4", "--seqlen", "64",
            "--eval-windows", "2", "--rl-steps", "200", "--reward", "1,0.1,0.1,0.1", "--qat-steps", "2",
            "--dtype", "float32", "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    plan = Plan.load(tmp_path / "run" / "plan.json")
    assert res["avg_bits"] <= 5 + 1e-9 and res["qat"]["steps"] == 2
    assert (tmp_path / "run" / "model").is_dir()  # saved (packed by default) from the QAT codes
    assert {a.choice.bits for a in plan.assignments.values()} <= {2, 4, 8, 16}
    by_expert = {}
    for u, a in plan.assignments.items():
        by_expert.setdefault((u.layer, u.expert), set()).add(a.choice.bits)
    assert all(len(b) == 1 for b in by_expert.values())
    assert plan.meta["solver"] == "rl" and plan.meta["rl"]["repaired"] is False
    bad = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "r2"), "--reward", "1,2"])
    assert bad.exit_code == 2 and "--reward takes four numbers" in bad.output
