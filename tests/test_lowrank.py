import pytest
import torch

from moebits.quant import (RankTooLargeError, fit_lowrank, hessian_from_inputs, quantize_hqq, quantize_lowrank,
                           quantize_rtn, quantize_weight)
from moebits.units import Choice


def _weight(out=64, k=128, seed=1, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (out, k) if batch is None else (batch, out, k)
    w = torch.randn(*shape, generator=g) * 0.05
    w[..., :3] *= 6  # outlier input channels: a residual with structure, as in trained weights
    return w


def _rel(w, approx):
    return (torch.linalg.matrix_norm(w - approx) / torch.linalg.matrix_norm(w)).item()


@pytest.mark.parametrize("quantizer", ["rtn", "hqq"])
def test_error_falls_strictly_with_rank_and_vanishes_at_full_rank(quantizer):
    w = _weight()
    errs = [_rel(w, quantize_weight(w, Choice(2, 64, quantizer, rank=r))) for r in (0, 4, 8, 16, 32, 64)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # full rank: the compensator absorbs the whole residual; what is left is the fp16 rounding of U and V
    full = fit_lowrank(w, 64, lambda t: quantize_rtn(t, 2, 64))
    assert full.residual.item() < 2e-3
    exact = fit_lowrank(w, 64, lambda t: quantize_rtn(t, 2, 64), factor_dtype=None)
    assert exact.residual.item() < 1e-5
    assert _rel(w, exact.weight) < 1e-5


def test_rank_r_compensator_is_the_best_rank_r_fit_of_the_first_residual():
    """Iteration 0 is quantize-then-SVD: its residual equals the tail singular values (Eckart-Young)."""
    w = _weight()
    q = quantize_rtn(w, 2, 64)
    s = torch.linalg.svdvals(w - q)
    fit = fit_lowrank(w, 8, lambda t: quantize_rtn(t, 2, 64), max_iters=0, factor_dtype=None)
    expected = (s[8:].square().sum().sqrt() / torch.linalg.matrix_norm(w)).item()
    assert fit.residual.item() == pytest.approx(expected, rel=1e-4)
    assert fit.U.shape == (64, 8) and fit.V.shape == (8, 128)


@pytest.mark.parametrize("quantizer", ["rtn", "hqq", "gptq"])
def test_alternating_never_increases_the_residual(quantizer):
    ws = _weight(batch=3)
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(3))
    H = torch.stack([hessian_from_inputs(x)] * 3)
    choice = Choice(2, 64, quantizer, rank=8)
    fit = quantize_lowrank(ws, choice, hessian=H if quantizer == "gptq" else None, max_iters=6)
    first = fit.history[0]  # plain quantize-then-SVD
    assert torch.all(fit.residual <= first + 1e-7)
    # the returned residual is what the returned weight and factors really give, factors as stored (fp16)
    assert fit.U.dtype == torch.float16 and fit.V.dtype == torch.float16
    recomputed = torch.linalg.matrix_norm(ws - fit.quantized - fit.U.float() @ fit.V.float()) / torch.linalg.matrix_norm(ws)
    assert torch.allclose(recomputed, fit.residual, rtol=1e-4)
    assert torch.allclose(fit.weight, fit.quantized + fit.U.float() @ fit.V.float(), atol=1e-6)
    # each matrix keeps its best iterate: within the acceptance threshold (rtol = 1 %) of the best it saw
    hist = torch.stack(fit.history)  # [iters+1, B]
    assert torch.all(fit.residual <= hist.min(dim=0).values * (1 + 1e-2) + 1e-7)
    assert torch.all((fit.iterations >= 0) & (fit.iterations <= 6))


def test_alternating_helps_hqq_on_outlier_weights():
    w = _weight(batch=4)
    fit = fit_lowrank(w, 8, lambda t: quantize_hqq(t, 2, 64), max_iters=5)
    assert torch.all(fit.residual < fit.history[0]) and torch.all(fit.iterations >= 1)


def test_batched_fit_matches_one_at_a_time():
    ws = _weight(batch=3)
    batched = fit_lowrank(ws, 4, lambda t: quantize_rtn(t, 3, 64))
    for i in range(3):
        one = fit_lowrank(ws[i], 4, lambda t: quantize_rtn(t, 3, 64))
        assert torch.allclose(batched.weight[i], one.weight, atol=1e-5)
        assert int(batched.iterations[i]) == int(one.iterations)


def test_too_large_rank_is_refused_clearly():
    w = _weight(out=32, k=128)
    with pytest.raises(RankTooLargeError, match=r"rank 33 exceeds the smaller side of a \[32 x 128\] weight"):
        quantize_weight(w, Choice(3, 64, "rtn", rank=33))
    with pytest.raises(ValueError, match="not quantized"):
        quantize_lowrank(w, Choice(16, rank=4))


@pytest.mark.parametrize("quantizer", ["rtn", "hqq"])
def test_stored_codes_and_factors_dequantize_to_the_fitted_weight_exactly(quantizer):
    from moebits.quant import quantize_codes

    ws = _weight(batch=3)
    choice = Choice(2, 64, quantizer, rank=8)
    qw = quantize_codes(ws, choice)
    assert qw.rank == 8 and qw.u.dtype == torch.float16 and qw.v.shape == (3, 8, 128)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 3
    assert torch.equal(qw.dequantize(ws.dtype), quantize_weight(ws, choice))
    assert torch.equal(qw[1].dequantize(ws.dtype), quantize_weight(ws, choice)[1])
