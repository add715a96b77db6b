import numpy as np
import pytest

from moebits import cost
from moebits.units import Choice

CHOICES = [Choice(b, 128) for b in (2, 3, 4, 8)] + [Choice(16)]


def test_storage_exact_known_example():
    s = cost.storage_matrix([(1024, 1024)], [Choice(3, 128)], zero_points="fp16")
    assert s[0, 0] == 3 * 1024 * 1024 + 32 * 1024 * 8  # codes + one 16-bit scale and zero per 128 columns
    assert s[0, 0] / (1024 * 1024) == 3.25
    # packed (the default): the integer zero at the code width, 3 + (16 + 3) / 128 bits per weight
    p = cost.storage_matrix([(1024, 1024)], [Choice(3, 128)])
    assert p[0, 0] == 3 * 1024 * 1024 + (16 + 3) * 1024 * 8
    assert p[0, 0] / (1024 * 1024) == 3 + 19 / 128


@pytest.mark.parametrize("zero_points", ["packed", "fp16"])
def test_storage_bits_hand_count(zero_points):
    """Codes + a 16-bit scale + one zero per (row, group); the zero at the code width only for rtn/gptq
    under "packed" (HQQ's real-valued zeros stay 16-bit); a partial last group and per-channel counted."""
    cases = [  # out, in, group size, groups per row
        (64, 1024, 128, 8), (8, 200, 128, 2), (100, 300, 128, 3), (48, 64, 128, 1), (32, 256, 0, 1), (16, 130, 64, 3)]
    for out, n_in, g, groups in cases:
        for bits in (2, 3, 4, 8):
            for q in ("rtn", "gptq", "hqq"):
                c = Choice(bits, g, q)
                zero = bits if zero_points == "packed" and q != "hqq" else 16
                want = bits * out * n_in + (16 + zero) * out * groups
                assert c.storage_bits(out, n_in, zero_points) == want, (out, n_in, g, bits, q)
                assert c.zero_bits(zero_points) == zero
                assert cost.storage_matrix([(out, n_in)], [c], zero_points)[0, 0] == want
        assert Choice(16).storage_bits(out, n_in, zero_points) == 16 * out * n_in  # unquantized: no metadata
        r = Choice(4, g, "gptq", rank=8)
        assert r.storage_bits(out, n_in, zero_points) == Choice(4, g, "gptq").storage_bits(out, n_in, zero_points) \
            + 16 * 8 * (out + n_in)
    # the zero format is not part of a choice's identity (the sensitivity table does not depend on it)
    assert Choice(3, 128, "gptq").label == "w3g128-gptq"
    with pytest.raises(ValueError, match="zero_points"):
        Choice(3, 128).storage_bits(8, 128, "int8")


def test_nominal_bits_both_settings():
    assert Choice(3, 128, "gptq").nominal_bits("fp16") == 3.25
    assert Choice(3, 128, "gptq").nominal_bits() == 3 + 19 / 128
    assert Choice(4, 128, "rtn").nominal_bits() == 4 + 20 / 128  # a peer's "4-bit" g128: 4.156
    assert Choice(3, 128, "hqq").nominal_bits() == 3.25  # real-valued zeros stay fp16


def test_storage_matches_choice_and_is_monotone_in_bits():
    shapes = [(1408, 2048), (2048, 1408), (100, 300), (1408, 2048)]
    s = cost.storage_matrix(shapes, CHOICES, zero_points="fp16")
    assert s.shape == (4, 5)
    for i, (o, n) in enumerate(shapes):
        assert [int(x) for x in s[i]] == [c.storage_bits(o, n, "fp16") for c in CHOICES]
    assert np.all(np.diff(s, axis=1) > 0)
    # a partial last group pays full metadata: 300 columns = 3 groups of 128
    assert s[2, 0] == 2 * 100 * 300 + 32 * 100 * 3


def test_budget_conversions_round_trip():
    shapes = [(1024, 1024), (512, 2048)]
    n = 2 * 1024 * 1024
    assert cost.num_weights(shapes) == n
    total = cost.avg_bits_to_total_bits(3.25, shapes)
    assert total == 3.25 * n
    assert cost.total_bits_to_avg_bits(total, shapes) == 3.25
    assert cost.bits_to_gb(cost.gb_to_bits(1.5)) == pytest.approx(1.5)
    assert cost.bits_to_gb(8e9) == 1.0  # decimal GB
    assert cost.memory_gb_to_total_bits(1.0, fixed_bits=8e8) == pytest.approx(7.2e9)
    assert "3.250 bits per weight" in cost.avg_bits_formatter(shapes)(total)


def test_gpu_specs_and_lookup():
    assert cost.GPUS["a100"].bandwidth == 2.039e12 and cost.GPUS["a100"].fp16_flops == 312e12
    assert cost.GPUS["h100"].bandwidth == 3.35e12 and cost.GPUS["h100"].fp16_flops == pytest.approx(989e12, rel=1e-3)
    assert cost.GPUS["rtx4090"].bandwidth == 1.008e12 and cost.GPUS["rtx4090"].fp16_flops == pytest.approx(165e12, rel=1e-2)
    assert cost.get_gpu("H100") is cost.GPUS["h100"]
    with pytest.raises(ValueError, match="unknown GPU"):
        cost.get_gpu("tpu")


def test_latency_monotone_in_bits_when_memory_bound():
    lat = cost.latency_matrix([(1408, 2048), (2048, 1408)], [1.0, 0.3], CHOICES, "a100", batch_tokens=1)
    assert lat.shape == (2, 5)
    assert np.all(np.diff(lat, axis=1) > 0)  # decode: fewer bits, fewer bytes, faster


def test_roofline_switches_from_memory_to_compute_bound():
    shape, gpu = (4096, 4096), cost.GPUS["h100"]
    ch = [Choice(2, 128), Choice(16)]
    small = cost.latency_matrix([shape], [1.0], ch, gpu, batch_tokens=1, launch_overhead_s=0)
    big = cost.latency_matrix([shape], [1.0], ch, gpu, batch_tokens=1 << 16, launch_overhead_s=0)
    # memory-bound: time = bytes / bandwidth, so 2.25 vs 16 bits differ ~7x
    w16 = 16 * 4096 * 4096 / 8 + 2 * 2 * 4096
    assert small[0, 1] == pytest.approx(w16 / gpu.bandwidth)
    assert small[0, 1] / small[0, 0] > 5
    # compute-bound: time = FLOPs / peak, the same for every bit-width
    flops = 2 * (1 << 16) * 4096 * 4096
    assert big[0, 0] == pytest.approx(flops / gpu.fp16_flops)
    assert big[0, 0] == big[0, 1]
    # time grows with tokens, and the overhead is added once per kernel
    mid = cost.latency_matrix([shape], [1.0], ch, gpu, batch_tokens=256)
    assert small[0, 0] < mid[0, 0] - 5e-6 + 1e-12 and mid[0, 0] < big[0, 0]


def test_latency_expected_over_routing():
    """A unit routed for a fraction f of tokens runs with probability 1-(1-f)^B; an unrouted one costs nothing."""
    ch = [Choice(4, 128)]
    one = cost.latency_matrix([(1408, 2048)], [1.0], ch, "h100", batch_tokens=1)
    rare = cost.latency_matrix([(1408, 2048)], [0.01], ch, "h100", batch_tokens=1)
    never = cost.latency_matrix([(1408, 2048)], [0.0], ch, "h100", batch_tokens=1)
    assert rare[0, 0] == pytest.approx(0.01 * one[0, 0])
    assert never[0, 0] == 0.0
    # many tokens: every expert runs, tokens = f * B as in the plain roofline
    many = cost.latency_matrix([(1408, 2048)], [0.01], ch, "h100", batch_tokens=100_000, launch_overhead_s=0)
    m = 0.01 * 100_000
    expect = max((ch[0].storage_bits(1408, 2048) / 8 + 2 * m * (1408 + 2048)) / 3.35e12, 2 * m * 1408 * 2048 / 989.4e12)
    assert many[0, 0] == pytest.approx(expect, rel=1e-6)


def test_latency_rejects_bad_input():
    with pytest.raises(ValueError, match="frequencies"):
        cost.latency_matrix([(8, 8)], [1.5], CHOICES, "h100", 4)
    with pytest.raises(ValueError, match="shape"):
        cost.latency_matrix([(8, 8)], [0.5, 0.5], CHOICES, "h100", 4)
    with pytest.raises(ValueError, match="batch_tokens"):
        cost.latency_matrix([(8, 8)], [0.5], CHOICES, "h100", 0)
