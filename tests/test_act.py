"""Activation fake quantization (quant/act.py), Choice.act_bits, and the expert input-transform
mechanism (models/transforms.py) it runs through."""
import numpy as np
import pytest
import torch

from conftest import ARCHS
from moebits.models import MoEAdapter, tiny_model
from moebits.models.act_quant import act_quantizer, install_act_quant, remove_act_quant
from moebits.quant.act import quantize_activations
from moebits.table import SensitivityTable
from moebits.units import Choice, Unit


def _acts(shape=(64, 96), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[::7, 3] *= 30.0  # outlier channels, as in real activations
    return x


def test_sixteen_bits_is_the_identity():
    x = _acts()
    assert torch.equal(quantize_activations(x, 16), x)
    assert torch.equal(quantize_activations(x.half(), 16), x.half())


def test_eight_bits_within_half_a_step_per_token():
    """|x - Q8(x)| <= max_k |x_tk| / (2 * 127) for every element (clip 1): the analytic bound."""
    x = _acts()
    q = quantize_activations(x, 8)
    bound = x.abs().amax(-1, keepdim=True) / 254
    err = (q - x).abs()
    assert (err <= bound * (1 + 1e-5) + 1e-12).all()
    assert err.max() > 0  # it did quantize
    # rounding error ~ uniform on [-s/2, s/2]: squared error ~ K s_t^2 / 12 per token (within 30 %)
    step = x.abs().amax(-1) / 127
    expected = (x.shape[1] * step ** 2 / 12).sum()
    assert 0.7 < ((q - x) ** 2).sum() / expected < 1.3


def _reference(x: np.ndarray, bits: int, clip: float) -> np.ndarray:
    """Per-token symmetric quantization written out row by row in numpy (float32 arithmetic)."""
    qmax = np.float32(2 ** (bits - 1) - 1)
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        row = x[t]
        m = np.float32(np.abs(row).max()) * np.float32(clip)
        s = m / qmax if m > 0 else np.float32(np.finfo(np.float32).tiny)
        codes = np.clip(np.round(row / s), -qmax, qmax)
        out[t] = codes * s
    return out


@pytest.mark.parametrize("bits,clip", [(4, 1.0), (5, 0.9), (8, 1.0), (2, 0.8)])
def test_matches_an_independent_reference(bits, clip):
    x = _acts(seed=bits)
    x[5] = 0.0  # an all-zero token stays zero
    q = quantize_activations(x, bits, clip)
    ref = _reference(x.numpy().astype(np.float32), bits, clip)
    np.testing.assert_allclose(q.numpy(), ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(q[5], torch.zeros_like(q[5]))
    # at most 2^bits - 1 distinct levels per token (symmetric: -qmax..qmax)
    for t in range(0, x.shape[0], 9):
        assert len(torch.unique(q[t])) <= 2 ** bits - 1


def test_clipping_saturates_the_largest_values_and_is_odd():
    x = _acts()
    q = quantize_activations(x, 4, clip=0.5)
    m = x.abs().amax(-1, keepdim=True)
    assert torch.allclose(q.abs().amax(-1, keepdim=True), 0.5 * m, rtol=1e-6)
    assert torch.equal(quantize_activations(-x, 4, 0.5), -q)


def test_bad_act_bits_and_clip_are_refused():
    with pytest.raises(ValueError, match="activation bits"):
        quantize_activations(torch.ones(2, 2), 12)
    with pytest.raises(ValueError, match="clipping ratio"):
        quantize_activations(torch.ones(2, 2), 4, clip=0.0)
    with pytest.raises(ValueError, match="act_bits"):
        Choice(4, act_bits=1)


def test_choice_act_bits_label_io_and_storage():
    c = Choice(4, 128, "gptq", act_bits=4)
    assert c.label == "w4g128-gptq-a4" and Choice(16, act_bits=8).label == "fp16-a8"
    assert Choice(4, 128, "gptq").label == "w4g128-gptq"
    assert Choice.from_dict(c.to_dict()) == c
    old = {"bits": 3, "group_size": 128, "quantizer": "rtn", "rank": 0}  # a plan written before act bits
    assert Choice.from_dict(old).act_bits == 16
    assert c.storage_bits(64, 256) == Choice(4, 128, "gptq").storage_bits(64, 256)
    assert c.weight_choice == Choice(4, 128, "gptq") and c.quantizes_acts


def test_table_csv_keeps_act_bits_and_reads_old_tables(tmp_path):
    units = [Unit(0, 0, "gate"), Unit(0, 0, "up")]
    choices = [Choice(4, act_bits=4), Choice(4, act_bits=8), Choice(4)]
    t = SensitivityTable(units, choices, error=np.arange(6.0).reshape(2, 3), frequency=np.ones(2))
    t.to_csv(tmp_path / "t.csv")
    back = SensitivityTable.from_csv(tmp_path / "t.csv")
    assert back.choices == choices and np.array_equal(back.error, t.error)
    # an older table has no act_bits column
    lines = (tmp_path / "t.csv").read_text().splitlines()
    old = [",".join(line.split(",")[:-1]) for line in lines if not line.endswith(",4") and not line.endswith(",8")]
    (tmp_path / "old.csv").write_text("\n".join(old) + "\n")
    assert SensitivityTable.from_csv(tmp_path / "old.csv").choices == [Choice(4)]


# ---- the input-transform mechanism --------------------------------------------------------------

def _ids(seed=0, n=2, length=24):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_transforms_leave_the_model_unchanged_and_removal_restores_it(arch):
    model = tiny_model(arch)
    ad = MoEAdapter(model)
    ids = _ids()
    ref = _logits(model, ids)
    for layer in ad.moe_layers:  # a transform that copies (so gate and up are computed separately)
        for k in ("gate", "up", "down"):
            ad.set_layer_input_transform(layer, k, "rotate", lambda x: x * 1.0)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    ad.clear_input_transforms()
    assert "forward" not in ad.experts(ad.moe_layers[0]).__dict__
    assert torch.equal(_logits(model, ids), ref)


def test_stages_compose_rotation_first_whatever_the_install_order():
    model = tiny_model("qwen2_moe")
    ad = MoEAdapter(model)
    calls = []
    u = Unit(ad.moe_layers[0], 1, "down")
    ad.set_input_transform(u, "act_quant", lambda x: calls.append("act_quant") or x)
    ad.set_input_transform(u, "rotate", lambda x: calls.append("rotate") or x)
    ad.expert_forward(u.layer, 1, torch.randn(3, ad.hidden))
    assert calls == ["rotate", "act_quant"]
    with pytest.raises(ValueError, match="stage"):
        ad.set_input_transform(u, "bogus", lambda x: x)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "deepseek_v2"])
def test_act_quant_in_the_model_equals_the_adapters_expert_forward(arch):
    """The fused forward with per-unit act quant computes, for each expert, exactly what
    `expert_forward` computes with the same per-kind quantizers (an independent path: plain matmuls)."""
    torch.manual_seed(0)
    model = tiny_model(arch)
    ad = MoEAdapter(model)
    layer = ad.moe_layers[-1]
    bits = {"gate": 4, "up": 8, "down": 3}
    install_act_quant(model, {Unit(layer, 2, k): b for k, b in bits.items()})
    x = torch.randn(40, ad.hidden)
    idx = torch.full((40, ad.top_k), 2)
    idx[:, 1:] = ad.num_experts  # padding slot: only expert 2 runs
    w = torch.zeros(40, ad.top_k)
    w[:, 0] = 0.7
    with torch.no_grad():
        got = ad.experts(layer)(x, idx, w)
        quantizers = {k: act_quantizer(b) for k, b in bits.items()}
        plain = ad.expert_forward(layer, 2, x, act_quant=quantizers)  # installed act quant replaced: same bits
        remove_act_quant(model)
        unquant = ad.expert_forward(layer, 2, x)
    torch.testing.assert_close(got, 0.7 * plain, rtol=1e-5, atol=1e-6)
    assert (plain - unquant).abs().max() > 1e-3  # 3/4-bit activations do change the output


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_shared_expert_act_quant_via_pre_hooks(arch):
    model = tiny_model(arch)
    ad = MoEAdapter(model)
    layer = ad.moe_layers[0]
    ids = _ids(1)
    ref = _logits(model, ids)
    install_act_quant(model, {Unit(layer, "shared", "down"): 4})
    changed = _logits(model, ids)
    assert (changed - ref).abs().max() > 1e-4
    x = torch.randn(5, ad.hidden)
    mlp = ad.shared_mlp(layer)
    with torch.no_grad():
        direct = mlp(x)
        manual = ad.expert_forward(layer, "shared", x)  # applies the installed 4-bit down quantizer
    torch.testing.assert_close(direct, manual, rtol=1e-5, atol=1e-6)
    remove_act_quant(model)
    assert torch.equal(_logits(model, ids), ref)


# ---- profiling with activation bits -------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_expert_local_metric_equals_layer_metric_with_activation_quantization(arch):
    """Activation quantization of expert e's block changes only f_e: the expert-local error equals
    MxMoE's layer re-run (fp32), for act-only, weight+act and shared-expert choices."""
    from moebits.calibrate import calibrate
    from moebits.data import random_windows
    from moebits.profile import profile

    ad = MoEAdapter(tiny_model(arch))
    win = random_windows(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(1)), 4, 32)
    cal = calibrate(ad, win, max_tokens_per_expert=100000, progress=False)
    layer = ad.moe_layers[-1]
    units = [Unit(layer, 3, k) for k in ("gate", "up", "down")]
    if ad.num_shared_experts:
        units += [Unit(layer, "shared", "up"), Unit(layer, "shared", "down")]
    choices = [Choice(16, act_bits=4), Choice(4, 32, "rtn", act_bits=4), Choice(3, 32, "gptq", act_bits=8),
               Choice(4, 32, "rtn")]
    te = profile(ad, "expert", units, choices, cal.stats, cal.inputs, progress=False, act_clip=0.9)
    tl = profile(ad, "layer", units, choices, cal.stats, cal.inputs, windows=win, progress=False, act_clip=0.9)
    for u in units:
        for c in choices:
            a, b = te.error[te.unit_index(u), te.choice_index(c)], tl.error[tl.unit_index(u), tl.choice_index(c)]
            assert a > 0 and abs(a - b) <= 1e-4 * b, f"{u.name} {c.label}: expert {a} vs layer {b}"
        # 4-bit activations on top of 4-bit weights cost more than the weights alone
        i = te.unit_index(u)
        assert te.error[i, 1] > te.error[i, 3]
    assert not ad.experts(layer).__dict__.get("moebits_input_transforms")  # nothing left installed
