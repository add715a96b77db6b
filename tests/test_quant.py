import pytest
import torch

from moebits.models import MoEAdapter, tiny_model
from moebits.quant import hessian_from_inputs, quantize_gptq, quantize_hqq, quantize_rtn, quantize_weight
from moebits.units import Choice


def _correlated_inputs(n=1024, k=256, seed=0):
    """Inputs with correlated features and outlier channels, like real activations."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(32, k, generator=g)
    x = torch.randn(n, 32, generator=g) @ basis + 0.3 * torch.randn(n, k, generator=g)
    x[:, :4] *= 8
    return x


def _weight(out=96, k=256, seed=1):
    return torch.randn(out, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _out_err(w, wq, x):
    return ((x @ (w - wq).T) ** 2).mean().item()


@pytest.mark.parametrize("quantize", [
    lambda w, b, H: quantize_rtn(w, b, 128),
    lambda w, b, H: quantize_hqq(w, b, 128),
    lambda w, b, H: quantize_gptq(w, H, b, 128),
], ids=["rtn", "hqq", "gptq"])
def test_error_falls_as_bits_rise_and_8bit_is_near_lossless(quantize):
    w, x = _weight(), _correlated_inputs()
    H = hessian_from_inputs(x)
    errs = [((w - quantize(w, b, H)) ** 2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[0] > 4 * errs[2], errs
    rel8 = errs[3] / (w ** 2).mean().item()
    assert rel8 < 1e-4, f"8-bit relative weight error {rel8:.2e}"


def test_rtn_grid_has_at_most_2_to_the_bits_levels_per_group():
    w = _weight()
    q = quantize_rtn(w, 3, 128)
    for row in range(4):
        for g in range(2):
            assert len(torch.unique(q[row, g * 128:(g + 1) * 128])) <= 8


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_real_calibration_inputs(bits):
    """Output error on a trained-like expert's own routed inputs, held-out tokens included."""
    from moebits.calibrate import calibrate
    from moebits.data import random_windows

    model = tiny_model("qwen2_moe", hidden_size=128, moe_intermediate_size=128, shared_expert_intermediate_size=128)
    ad = MoEAdapter(model)
    win = random_windows(torch.randint(0, 256, (20000,), generator=torch.Generator().manual_seed(0)), 16, 128)
    cal = calibrate(ad, win, max_tokens_per_expert=4096, progress=False)
    x = cal.inputs[(1, "shared")].x  # every token: a large, real input sample
    fit, held = x[: len(x) // 2], x[len(x) // 2:]
    from moebits.units import Unit

    w = ad.weight(Unit(1, "shared", "gate")).clone()
    H = hessian_from_inputs(fit)
    e_rtn = _out_err(w, quantize_rtn(w, bits, 128), held)
    e_gptq = _out_err(w, quantize_gptq(w, H, bits, 128), held)
    assert e_gptq < e_rtn, (e_gptq, e_rtn)


def test_gptq_act_order_and_batching():
    x = _correlated_inputs()
    H = hessian_from_inputs(x)
    ws = torch.stack([_weight(seed=s) for s in range(3)])
    batched = quantize_gptq(ws, torch.stack([H] * 3), 3, 128, act_order=True)
    single = torch.stack([quantize_gptq(w, H, 3, 128, act_order=True) for w in ws])
    assert torch.allclose(batched, single, atol=1e-6)
    assert _out_err(ws[0], batched[0], x) < _out_err(ws[0], quantize_rtn(ws[0], 3, 128), x)


def test_partial_groups_and_storage_formula():
    w = _weight(out=8, k=200)
    for q in (quantize_rtn(w, 3, 128), quantize_hqq(w, 3, 128)):
        assert q.shape == w.shape and torch.isfinite(q).all()
    # zero_points="fp16": codes + 16-bit scale + 16-bit zero per group of each row (the papers' W3.25)
    fp = "fp16"
    assert Choice(3, 128).storage_bits(64, 1024, fp) == 64 * 1024 * 3 + 64 * 8 * 32
    assert Choice(3, 128).bits_per_weight(64, 1024, fp) == 3.25
    assert Choice(2, 128).bits_per_weight(64, 1024, fp) == 2.25
    assert Choice(8, 128).bits_per_weight(10, 128, fp) == 8.25
    # a partial last group still pays full metadata: 200 columns = 2 groups
    assert Choice(4, 128).storage_bits(8, 200, fp) == 8 * 200 * 4 + 8 * 2 * 32
    assert Choice(16).bits_per_weight(8, 200, fp) == 16
    assert Choice(4, 128, rank=16).storage_bits(64, 1024, fp) == 64 * 1024 * 4 + 64 * 8 * 32 + 16 * 16 * (64 + 1024)


def test_quantize_weight_dispatch_and_errors():
    w = _weight()
    assert torch.equal(quantize_weight(w, Choice(4, 128, "rtn")), quantize_rtn(w, 4, 128))
    with pytest.raises(ValueError, match="Hessian"):
        quantize_weight(w, Choice(4, 128, "gptq"))
    with pytest.raises(ValueError):
        Choice(4, 128, "awq")
    with pytest.raises(ValueError, match="HQQ supports"):
        quantize_hqq(w, 5, 128)


def _degenerate_weight():
    """Rows whose first group (g32) is all zero, constant positive, constant negative, one-signed."""
    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(3)) * 0.05
    w[0, :32] = 0.0
    w[1, :32] = 0.375
    w[2, :32] = -1.25
    w[3, :32] = 1.0 + torch.rand(32, generator=torch.Generator().manual_seed(4))  # all in [1, 2]
    w[4] = 0.0  # a whole zero row
    return w


@pytest.mark.parametrize("quantizer", ["rtn", "gptq", "hqq"])
@pytest.mark.parametrize("bits", [2, 4])
def test_zero_and_constant_groups_quantize_exactly(quantizer, bits):
    """The min-max grid used to divide by a zero fp16 scale (NaN) on an all-zero group and to clamp a
    one-signed group onto a shifted grid; now zero is always in the range, as in the GPTQ reference."""
    from moebits.quant import quantize_codes

    w = _degenerate_weight()
    H = hessian_from_inputs(_correlated_inputs(k=96))
    choice = Choice(bits, 32, quantizer)
    q = quantize_weight(w, choice, hessian=H)
    qw = quantize_codes(w, choice, hessian=H)
    assert torch.isfinite(q).all() and torch.equal(qw.dequantize(w.dtype), q)
    for row in range(3):
        assert torch.equal(q[row, :32], w[row, :32]), (row, q[row, :32])
    assert torch.equal(q[4], w[4])
    if quantizer == "rtn":  # one-signed group: every value within half a step of the grid (not clamped to 0..1)
        step = qw.scale[3, 0].float()
        assert (q[3, :32] - w[3, :32]).abs().max() <= step / 2 + 1e-6
        assert (q[3, :32] - w[3, :32]).abs().max() < 0.5 * (2.0 / (2 ** bits - 1))


@pytest.mark.parametrize("act_order", [False, True])
def test_per_channel_gptq_has_one_scale_per_row(act_order):
    """--group-size -1: one scale and zero per output row (what storage charges), so each row of the
    dequantized weight takes at most 2^bits values over all its 256 columns."""
    from moebits.quant import quantize_codes

    w, x = _weight(out=16, k=256), _correlated_inputs()
    choice = Choice(3, -1, "gptq")
    qw = quantize_codes(w, choice, hessian=hessian_from_inputs(x), act_order=act_order)
    assert qw.scale.shape == (16, 1) and qw.zero.shape == (16, 1)
    q = qw.dequantize()
    for row in q:
        assert len(torch.unique(row)) <= 8
    assert _out_err(w, q, x) < _out_err(w, quantize_rtn(w, 3, -1), x)


def test_non_finite_weights_are_refused_with_a_clear_error():
    w = _weight(out=4, k=64)
    w[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        quantize_weight(w, Choice(4, 32, "rtn"))
