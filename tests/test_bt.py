"""BT-MoE through the pipeline: (bits, rank) per expert, compensators applied, saved, reloaded; attention
at a fixed setting for any method; too-large ranks refused before any work."""
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moebits.cli import app
from moebits.models import load_model
from moebits.job import Pipeline, QuantizeConfig, candidate_choices
from moebits.plan import Plan
from moebits.quant import RankTooLargeError, quantize_lowrank
from moebits.units import KINDS, Unit


def _cfg(text, **kw):
    base = dict(model="tiny:qwen2_moe", method="bt", quantizer="rtn", group_size=32, calib=str(text), eval=str(text),
                nsamples=4, seqlen=64, eval_windows=4)
    base.update(kw)
    return QuantizeConfig(**base)


def _independent_storage_bits(w: torch.Tensor, fit, bits: int, group: int, quantizer: str) -> int:
    """What is stored, counted from the fitted tensors: b-bit codes, an fp16 scale per group of each row
    (a partial group pays in full), a zero per group -- at the code width for rtn/gptq's integer zeros
    (zero_points "packed", the default), fp16 for hqq's -- and the fp16 factors as they came out of the fit."""
    out, k = w.shape
    assert fit.U.dtype == fit.V.dtype == torch.float16
    zero_bits = bits if quantizer in ("rtn", "gptq") else 16
    return bits * out * k + (16 + zero_bits) * out * math.ceil(k / group) + 16 * (fit.U.numel() + fit.V.numel())


def test_bt_end_to_end_plan_cost_weights_and_reload(tmp_path, text_file):
    choices = candidate_choices(_cfg(text_file, bits=3.0, bits_set=(2,), ranks=(0, 4)),
                                load_model("tiny:qwen2_moe")[2].shapes())
    assert [(c.bits, c.rank) for c in choices] == [(2, 0), (2, 4)]
    # a budget between "every expert 2-bit" (3.0 bits at g32) and "every expert 2-bit + rank 4": the ILP
    # must give a compensator to some experts and not to others
    cfg = _cfg(text_file, bits=3.6, bits_set=(2,), ranks=(0, 4))
    p = Pipeline(cfg, tmp_path / "bt", progress=False)
    res = p.execute()
    plan = Plan.load(tmp_path / "bt" / "plan.json")
    assert res["method"] == "bt" and res["solver"] == "ilp" and plan.meta["granularity"] == "expert"
    per_expert = {}
    for u, a in plan.assignments.items():
        per_expert.setdefault((u.layer, u.expert), set()).add(a.choice)
    assert all(len(s) == 1 for s in per_expert.values())  # one (bits, rank) per expert, all blocks alike
    ranks = {next(iter(s)).rank for s in per_expert.values()}
    assert ranks == {0, 4}, ranks
    # stored size, counted from the fitted factors, equals the cost the allocator used, exactly
    ref_model, _, ref = load_model("tiny:qwen2_moe", seed=0)
    stored = 0
    for u in p.units:
        c = plan.choice(u)
        w0 = ref.weight(u)
        fit = quantize_lowrank(w0, c)
        stored += _independent_storage_bits(w0, fit, c.bits, c.group_size, c.quantizer)
        # the model holds Q + UV of this fit (RTN: independent of the batch it was quantized in; batched
        # and single SVDs agree to float rounding)
        torch.testing.assert_close(p.adapter.weight(u), fit.weight, rtol=0, atol=2e-6)
        if c.rank:
            assert not torch.allclose(fit.weight, fit.quantized)
    assert stored == plan.storage_bits(p.shapes) == res["weight_bytes"] * 8
    assert stored == pytest.approx(plan.meta["total_cost"], rel=0, abs=0.5)
    assert stored <= 3.6 * sum(o * i for o, i in p.shapes.values())
    # the whole-expert loss table: each expert's three units carry a third of the joint error
    t = p.fill_table(choices)
    for (layer, e) in list(per_expert)[:3]:
        rows = [t.unit_index(Unit(layer, e, k)) for k in KINDS]
        assert np.allclose(t.error[rows], t.error[rows[0]])
        assert np.all(t.error[rows[0], 1] < t.error[rows[0], 0])  # rank 4 lowers every expert's error
    # saved in the packed format (codes + fp16 U, V), its expert bytes the predicted cost, reloaded exactly
    assert res["model_format"] == "packed" and res["expert_bytes"] * 8 == stored
    back, _, _ = load_model(str(tmp_path / "bt" / "model"), dtype="float32", allow_packed=True)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, p.model(input_ids=ids).logits, rtol=0, atol=0)
    assert Plan.load(tmp_path / "bt" / "model" / "plan.json").assignments == plan.assignments
    assert math.isfinite(res["ppl_q"]) and res["ppl_q"] != res["ppl_fp"]


def test_bt_linear_granularity_and_layer_metric(tmp_path, text_file):
    cfg = _cfg(text_file, bits=3.6, bits_set=(2, 3), ranks=(0, 2), granularity="linear", save_model=False)
    p = Pipeline(cfg, tmp_path / "lin", progress=False)
    res = p.execute()
    plan = Plan.load(tmp_path / "lin" / "plan.json")
    assert plan.meta["granularity"] == "linear" and res["avg_bits"] <= 3.6 + 1e-9
    table = p.fill_table(candidate_choices(cfg, p.shapes))
    # single-block losses: the blocks of an expert carry different errors
    rows = [table.unit_index(Unit(0, 1, k)) for k in KINDS]
    assert not np.allclose(table.error[rows[0]], table.error[rows[2]])
    # the faithful layer re-run gives the same whole-expert table as the expert-local metric
    q = Pipeline(_cfg(text_file, bits=3.6, bits_set=(2,), ranks=(0, 2), metric="layer", save_model=False),
                 tmp_path / "layer", progress=False)
    e = Pipeline(_cfg(text_file, bits=3.6, bits_set=(2,), ranks=(0, 2), save_model=False), tmp_path / "exp",
                 progress=False)
    for r in (q, e):
        r.load()
        r.calibrate()
    cq = candidate_choices(q.cfg, q.shapes)
    tq, te = q.fill_table(cq), e.fill_table(cq)
    st = e.calib.stats
    routed = [i for i, u in enumerate(te.units) if st[u].tokens > 0]  # never-routed: fallback tokens, no layer output
    assert len(routed) >= len(te.units) - 6
    np.testing.assert_allclose(tq.error[routed], te.error[routed], rtol=1e-4)


def test_attn_bits_changes_only_attention_and_the_whole_model_size(tmp_path, text_file):
    kw = dict(method="uniform", bits=4.0, save_model=False)
    a = Pipeline(_cfg(text_file, **kw), tmp_path / "a", progress=False)
    ra = a.execute()
    b = Pipeline(_cfg(text_file, attn_bits=4, attn_rank=2, **kw), tmp_path / "b", progress=False)
    rb = b.execute()
    attn = {f"{n}.weight" for n in a.adapter.attention_linears()}
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    ref = dict(load_model("tiny:qwen2_moe", seed=0)[0].named_parameters())
    for n in pa:
        if n in attn:
            assert not torch.equal(pb[n], pa[n]) and torch.equal(pa[n], ref[n]), n
            fit = quantize_lowrank(ref[n].detach(), b.cfg.attention_choice())
            torch.testing.assert_close(pb[n], fit.weight, rtol=0, atol=2e-6)
        else:
            assert torch.equal(pb[n], pa[n]), f"{n} changed with --attn-bits"
    shapes = [tuple(m.weight.shape) for m in a.adapter.attention_linears().values()]
    n_attn = sum(o * i for o, i in shapes)
    # 4-bit codes, per group of 32 an fp16 scale and a 4-bit integer zero (rtn, zero_points "packed"), fp16 factors
    attn_bits = sum(4 * o * i + (16 + 4) * o * math.ceil(i / 32) + 16 * 2 * (o + i) for o, i in shapes)
    assert ra["avg_bits"] == rb["avg_bits"] and ra["weight_bytes"] == rb["weight_bytes"]
    assert ra["attention"] == "fp16" and rb["attention"] == "w4g32-rtn-r2"
    assert ra["model_counted_bytes"] - rb["model_counted_bytes"] == (16 * n_attn - attn_bits) / 8
    assert rb["attention_bytes"] * 8 == attn_bits
    params = sum(p.numel() for p in a.model.parameters())
    assert rb["model_avg_bits"] == pytest.approx(rb["model_counted_bytes"] * 8 / params)
    assert Plan.load(tmp_path / "b" / "plan.json").meta["attention"]["rank"] == 2


def test_too_large_rank_is_refused_before_any_work(tmp_path, text_file):
    with pytest.raises(RankTooLargeError, match=r"rank 40 exceeds the smaller side of L0\.E0\.gate \[32 x 64\]"):
        Pipeline(_cfg(text_file, bits=3.6, ranks=(0, 40)), tmp_path / "r", progress=False).execute()
    assert not (tmp_path / "r" / "stats.json").exists()
    r = CliRunner().invoke(app, ["quantize", "--model", "tiny:qwen2_moe", "--method", "bt", "--bits", "3.5",
                                 "--ranks", "0,40", "--group-size", "32", "--calib", str(text_file), "--eval",
                                 str(text_file), "--nsamples", "2", "--out", str(tmp_path / "cli")])
    assert r.exit_code == 2 and "rank 40 exceeds" in r.output
    r = CliRunner().invoke(app, ["quantize", "--model", "tiny:deepseek_v2", "--method", "uniform", "--bits", "4",
                                 "--attn-bits", "4", "--attn-rank", "20", "--group-size", "32", "--calib",
                                 str(text_file), "--nsamples", "2", "--out", str(tmp_path / "cli2")])
    assert r.exit_code == 2 and "--attn-rank" in r.output and "kv_b_proj" in r.output


def test_bt_plan_packed_size_equals_predicted_cost_and_reloads_exactly(tmp_path):
    """Compensators stored in the packed format (fp16 U, V beside the codes): the bytes written for the
    experts equal the plan's predicted storage exactly, and the reloaded model computes the same logits."""
    from moebits.apply import apply_plan
    from moebits.models import MoEAdapter, byte_tokenizer, tiny_model
    from moebits.packed import load_quantized, save_packed
    from moebits.plan import Assignment
    from moebits.units import Choice

    model = tiny_model("qwen2_moe")
    ad = MoEAdapter(model)
    options = [Choice(2, 32, "rtn"), Choice(2, 32, "hqq", rank=4), Choice(3, 32, "rtn", rank=8), Choice(4, 32, "hqq")]
    plan = Plan({u: Assignment(options[(u.layer + (0 if u.is_shared else u.expert)) % len(options)])
                 for u in ad.units()})
    codes = {}
    apply_plan(ad, plan, progress=False, codes=codes)
    assert {codes[u].rank for u in ad.units()} == {0, 4, 8}
    sizes = save_packed(model, ad, plan, codes, tmp_path / "model", byte_tokenizer())
    assert sizes["expert_bytes"] * 8 == plan.storage_bits(ad.shapes())
    loaded = load_quantized(tmp_path / "model", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
