"""`moebits quantize --target vllm`: plans vLLM's fused-MoE kernels can serve, by construction."""
import pytest

from moebits.allocate.groups import vllm_servable
from moebits.export.vllm_rules import tied_sets, vllm_problems
from moebits.job import Pipeline, QuantizeConfig, candidate_choices
from moebits.units import Unit


def _cfg(text, **kw):
    base = dict(model="tiny:qwen2_moe", method="mxmoe", quantizer="rtn", bits=6.0, group_size=32, calib=str(text),
                eval=str(text), nsamples=4, seqlen=64, eval_windows=2, save_model=False, target="vllm")
    base.update(kw)
    return QuantizeConfig(**base)


def test_vllm_groups_tie_a_layers_routed_units_and_shared_gate_up():
    units = [Unit(0, e, k) for e in range(3) for k in ("gate", "up", "down")]
    units += [Unit(0, "shared", k) for k in ("gate", "up", "down")] + [Unit(1, 0, "gate"), Unit(1, 1, "down")]
    g = vllm_servable(units)
    assert len(set(g[:9])) == 1  # every routed unit of layer 0
    assert g[9] == g[10] != g[11] and g[9] != g[0]  # shared gate = up, down alone
    assert g[12] == g[13] != g[0]  # layer 1 is its own set


def test_target_vllm_plan_is_servable_and_meets_the_budget(tmp_path, text_file):
    res = Pipeline(_cfg(text_file), tmp_path / "r", progress=False).execute()
    from moebits.plan import Plan

    plan = Plan.load(tmp_path / "r" / "plan.json")
    assert plan.meta["target"] == "vllm"
    assert vllm_problems(plan) == []
    for members in tied_sets(plan.assignments).values():
        assert len({plan.choice(u) for u in members}) == 1
    assert {plan.choice(u).bits for u in plan.units} <= {4, 8}
    assert res["avg_bits"] <= 6.0 + 1e-9
    # 4-bit g32 everywhere is 5.0 bits per weight: a 6.0 budget leaves room, and the exact solver uses it
    assert {plan.choice(u).bits for u in plan.units} == {4, 8}


def test_target_vllm_refuses_what_it_cannot_serve(tmp_path, text_file):
    with pytest.raises(ValueError, match="integer zero points.*rtn or gptq"):
        candidate_choices(_cfg(text_file, quantizer="hqq"))
    with pytest.raises(ValueError, match="--group-size 32 | 64 | 128"):
        candidate_choices(_cfg(text_file, group_size=16))
    with pytest.raises(ValueError, match="--candidate-bits 4,8"):
        candidate_choices(_cfg(text_file, candidate_bits=(2, 3)))
    assert {c.bits for c in candidate_choices(_cfg(text_file))} == {4, 8}
    assert {c.bits for c in candidate_choices(_cfg(text_file, method="uniform"))} == {4, 8, 16}
    with pytest.raises(ValueError, match="feasible"):  # below all-4-bit g32 (5.0 bits)
        Pipeline(_cfg(text_file, bits=4.5), tmp_path / "r", progress=False).execute()


def test_runs_without_a_target_keep_their_spec():
    assert "target" not in QuantizeConfig().spec() and QuantizeConfig(target="vllm").spec()["target"] == "vllm"
