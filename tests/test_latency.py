import numpy as np
import pytest
import torch

from moebits.latency import (FEATURES, KernelPoint, anchor_grid, features, latency_fri_matrix, make_kernel,
                             measure_latency)
from moebits.quant.rtn import group_view
from moebits.units import Choice


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K", [128, 200])
def test_packed_kernel_equals_byte_kernel_and_dequant_reference(bits, K):
    x = torch.randn(5, K)
    y_plane = make_kernel(24, K, bits, 64, "bitplane", seed=7)(x)
    y_byte = make_kernel(24, K, bits, 64, "byte", seed=7)(x)
    torch.testing.assert_close(y_plane, y_byte)
    # reference: rebuild the same codes / scales and dequantize group-wise by hand
    gen = torch.Generator().manual_seed(7)
    Kp = 64 * ((K + 63) // 64)
    codes = torch.randint(0, 2 ** bits, (24, Kp), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(24, Kp // 64, 1, generator=gen) * 0.01 + 1e-3).half().float()
    w = ((group_view(codes.float(), 64) - 2 ** (bits - 1)) * scale).reshape(24, Kp)[:, :K]
    torch.testing.assert_close(y_plane, x @ w.T)


@pytest.mark.parametrize("bits", [4, 16])
def test_latency_grows_with_mnk(bits):
    # one thread: on a shared CPU, intra-op threads stall on each other and swamp a tiny kernel's time
    small = measure_latency(KernelPoint(4, 32, 64, bits), repeats=9, threads=1)
    large = measure_latency(KernelPoint(1024, 512, 512, bits), repeats=5, threads=1)
    assert 0 < small < large
    assert large > 5 * small  # 2048x the FLOPs: far beyond timing noise


def test_features_columns():
    X = features([KernelPoint(64, 128, 256, 4), KernelPoint(64, 128, 256, 16)])
    assert X.shape == (2, len(FEATURES))
    col = dict(zip(FEATURES, range(len(FEATURES))))
    np.testing.assert_allclose(X[0, col["log_flops"]], np.log(2 * 64 * 128 * 256))
    assert X[0, col["bits"]] == 4 and X[1, col["log_bytes"]] > X[0, col["log_bytes"]]


def test_anchor_grid_covers_shapes_bits_and_token_range():
    pts = anchor_grid([(128, 64), (64, 128), (128, 64)], [2, 4], 10, 1000, n_anchors=24, seed=1)
    assert {(p.N, p.K) for p in pts} == {(128, 64), (64, 128)} and {p.bits for p in pts} == {2, 4}
    assert min(p.M for p in pts) == 10 and max(p.M for p in pts) == 1000
    assert anchor_grid([(8, 8)], [4], 10, 1000, 8, seed=2) != anchor_grid([(8, 8)], [4], 10, 1000, 8, seed=3)


def _roofline_like(pt: KernelPoint) -> float:
    """A known, noiseless latency: launch overhead + the larger of weight traffic and FLOPs."""
    weight_bytes = pt.N * pt.K * pt.bits / 8
    return 2e-6 + max(weight_bytes / 1e9, 2 * pt.M * pt.N * pt.K / 5e10)


def test_fri_interpolates_a_known_latency_from_its_anchors():
    """The interpolation alone, on a known function (wall-clock noise would make the bound flaky):
    held-out points within a factor 1.5 of the truth, and every predicted cell close to it."""
    shapes = [(256, 256)] * 6 + [(256, 512)] * 3
    freq = np.array([0.02, 0.05, 0.1, 0.2, 0.4, 1.0, 0.0, 0.1, 1.0])
    choices = [Choice(4), Choice(16)]
    lat, info = latency_fri_matrix(shapes, freq, choices, batch_tokens=1024, anchors=24, holdout=4, seed=0,
                                   measure=_roofline_like)
    assert info["holdout_max_ratio"] < 1.5, (info["holdout_latency"], info["holdout_pred"])
    assert np.all(lat[6] == 0)  # never routed -> never runs
    truth = np.array([[_roofline_like(KernelPoint(max(1, round(f * 1024)), n, k, c.bits)) for c in choices]
                      for (n, k), f in zip(shapes, freq)])
    ratio = lat[freq > 0] / truth[freq > 0]
    assert np.all((ratio > 1 / 1.5) & (ratio < 1.5)), ratio


def test_fri_matrix_from_real_kernel_timings_has_the_right_structure():
    torch.manual_seed(0)
    shapes = [(256, 256)] * 6 + [(256, 512)] * 3
    freq = np.array([0.02, 0.05, 0.1, 0.2, 0.4, 1.0, 0.0, 0.1, 1.0])
    choices = [Choice(4), Choice(16)]
    lat, info = latency_fri_matrix(shapes, freq, choices, batch_tokens=1024, anchors=24, holdout=4, seed=0,
                                   repeats=7, threads=1)
    assert lat.shape == (len(shapes), len(choices))
    assert np.all(lat[6] == 0) and np.all(lat[np.arange(9) != 6] > 0)  # never routed -> never runs
    assert np.all(np.isfinite(info["holdout_pred"]))
    with pytest.raises(ValueError):
        latency_fri_matrix(shapes, freq[:3], choices, 2048)
