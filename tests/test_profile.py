import numpy as np
import pytest
import torch

from conftest import ARCHS
from moebits.calibrate import calibrate, frequency_summary
from moebits.data import random_windows
from moebits.models import MoEAdapter, tiny_model
from moebits.profile import profile
from moebits.units import Choice, Unit


def _calibrated(arch, cap=100000, windows=6, seqlen=48):
    ad = MoEAdapter(tiny_model(arch))
    win = random_windows(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(1)), windows, seqlen)
    return ad, win, calibrate(ad, win, max_tokens_per_expert=cap, progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_local_metric_equals_mxmoe_layer_rerun(arch):
    """DESIGN: the layer-output error of one expert's block is expert-local (exact, fp32)."""
    ad, win, cal = _calibrated(arch)
    st = cal.stats
    l = ad.moe_layers[-1]
    units = [Unit(l, e, k) for e in (0, 5) for k in ("gate", "up", "down")]
    if ad.num_shared_experts:
        units += [Unit(l, "shared", "down")]
    choices = [Choice(2, 32, "rtn"), Choice(3, 32, "gptq")]
    te = profile(ad, "expert", units, choices, st, cal.inputs, progress=False)
    tl = profile(ad, "layer", units, choices, st, cal.inputs, windows=win, progress=False)
    for u in units:
        for c in choices:
            a, b = te.error[te.unit_index(u), te.choice_index(c)], tl.error[tl.unit_index(u), tl.choice_index(c)]
            assert a > 0 and abs(a - b) <= 1e-4 * b, f"{u.name} {c.label}: expert {a} vs layer {b}"


def test_calibration_counts_and_statistics():
    ad, win, cal = _calibrated("qwen2_moe", cap=16)
    n_tokens = win.numel()
    assert cal.total_tokens == n_tokens
    routed = [s for s in cal.stats if s.unit.kind == "gate" and not s.unit.is_shared]
    for layer in ad.moe_layers:
        assert sum(s.tokens for s in routed if s.unit.layer == layer) == n_tokens * ad.top_k
    for s in cal.stats:
        assert s.act_var > 0 and s.weight_scale > 0 and 0 <= s.act_outlier_ratio < 1
        if s.unit.is_shared:
            assert s.frequency == 1.0 and s.tokens == n_tokens
    # capped sample, and routing weights captured with it
    for (l, e), inp in cal.inputs.items():
        assert inp.x.shape[0] <= 16 and inp.g.shape == (inp.x.shape[0],)
    rows = frequency_summary(cal.stats, cal.total_tokens)
    assert [r["layer"] for r in rows] == ad.moe_layers and all(r["min"] <= r["max"] for r in rows)
    for r in rows:  # frequencies of a layer sum to top_k
        f = [s.tokens / n_tokens for s in routed if s.unit.layer == r["layer"]]
        assert sum(f) == pytest.approx(ad.top_k) and r["max"] == pytest.approx(max(f))


def test_never_routed_expert_gets_fallback_tokens_and_a_warning(caplog):
    model = tiny_model("mixtral")
    ad = MoEAdapter(model)
    # the router never picks expert 7 (its choice is redirected to expert 6): a dead expert
    def never_seven(module, args, out):
        logits, scores, idx = out
        return logits, scores, torch.where(idx == 7, torch.full_like(idx, 6), idx)

    for l in ad.moe_layers:
        ad.moe_block(l).gate.register_forward_hook(never_seven)
    win = random_windows(torch.randint(0, 256, (2000,)), 4, 32)
    cal = calibrate(ad, win, progress=False)
    assert {(l, 7) for l in ad.moe_layers} <= set(cal.never_routed)
    assert "never routed" in caplog.text
    inp = cal.inputs[(ad.moe_layers[0], 7)]
    assert inp.fallback and inp.x.shape[0] > 0
    s = cal.stats[Unit(ad.moe_layers[0], 7, "down")]
    assert s.never_routed and s.tokens == 0 and s.frequency > 0 and s.act_var > 0


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_whole_expert_perturbation_local_metric_equals_layer_rerun(arch):
    """BT-MoE's loss (all blocks of an expert quantized at once, with compensators) is expert-local too,
    and it is not the sum of the three single-block errors."""
    ad, win, cal = _calibrated(arch)
    st = cal.stats
    l = ad.moe_layers[-1]
    experts = [0, 5] + (["shared"] if ad.num_shared_experts else [])
    units = [Unit(l, e, k) for e in experts for k in ("gate", "up", "down")]
    choices = [Choice(2, 32, "rtn"), Choice(2, 32, "rtn", rank=4), Choice(3, 32, "gptq", rank=8)]
    te = profile(ad, "expert", units, choices, st, cal.inputs, whole_expert=True, progress=False)
    tl = profile(ad, "layer", units, choices, st, cal.inputs, windows=win, whole_expert=True, progress=False)
    single = profile(ad, "expert", units, choices[:1], st, cal.inputs, progress=False)
    for e in experts:
        rows = [te.unit_index(Unit(l, e, k)) for k in ("gate", "up", "down")]
        for c in choices:
            j = te.choice_index(c)
            a = te.error[rows, j].sum()
            b = tl.error[[tl.unit_index(Unit(l, e, k)) for k in ("gate", "up", "down")], tl.choice_index(c)].sum()
            assert a > 0 and abs(a - b) <= 1e-4 * b, f"L{l}.{e} {c.label}: expert {a} vs layer {b}"
            assert np.allclose(te.error[rows, j], a / 3)  # split evenly over the expert's units
        # joint perturbation differs from the sum of isolated single-block errors
        a = te.error[rows, te.choice_index(choices[0])].sum()
        s = single.error[[single.unit_index(Unit(l, e, k)) for k in ("gate", "up", "down")], 0].sum()
        assert abs(a - s) > 1e-3 * s
        # a compensator at the same bits lowers the joint error
        assert te.error[rows, te.choice_index(choices[1])].sum() < a
