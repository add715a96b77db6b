"""llama.cpp's quantizers through moebits.gguf.ggml: the bytes ggml writes dequantize to the same values
with the gguf package's independent numpy reference, errors fall with bits, an importance matrix lowers
the error it weights, widths the type cannot store are refused with llama-quantize's fallback, and the
module is thread-safe."""
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from moebits.gguf import ggml  # noqa: E402

K_AND_LEGACY = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# IQ2_XS / IQ2_S left out: ggml's one-time grid initialisation for them takes 5-15 s on this CPU
I_QUANTS = ["IQ2_XXS", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL"]


def weight(rows=16, cols=512, seed=0) -> np.ndarray:
    g = np.random.default_rng(seed)
    w = g.standard_normal((rows, cols)).astype(np.float32) * 0.05
    w[:, g.integers(0, cols, 4)] *= 8  # a few outlier columns, as trained weights have
    return w


def importance(cols=512, seed=1) -> np.ndarray:
    return (np.random.default_rng(seed).gamma(0.5, 1.0, cols) + 1e-3).astype(np.float32)


def test_available_and_type_traits():
    assert ggml.available()
    assert set(K_AND_LEGACY + I_QUANTS + ["IQ2_XS", "IQ2_S", "F16", "BF16", "F32"]) <= set(ggml.GGML_TYPES)
    # bits per weight from ggml's own type traits (scales included), as llama.cpp documents them
    want = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5, "Q4_0": 4.5,
            "IQ4_XS": 4.25, "IQ2_XXS": 2.0625, "F16": 16.0, "F32": 32.0}
    for t, b in want.items():
        assert ggml.bits_per_weight(t) == b, t
    assert ggml.block_size("Q4_K") == 256 and ggml.block_size("Q8_0") == 32
    assert ggml.row_bytes("Q4_K", 512) == 288 and ggml.row_bytes("Q8_0", 64) == 68
    assert ggml.requires_imatrix("IQ2_XXS") and ggml.requires_imatrix("IQ3_XXS") and not ggml.requires_imatrix("Q2_K")


@pytest.mark.parametrize("type_name", K_AND_LEGACY + I_QUANTS + ["F16", "BF16"])
def test_ggml_bytes_match_gguf_reference_dequantizer(type_name):
    w = weight()
    im = importance() if ggml.requires_imatrix(type_name) or type_name.startswith("IQ") else None
    q = ggml.quantize(w, type_name, im)
    assert q.dtype == np.uint8 and q.shape == (16, ggml.row_bytes(type_name, 512)) and ggml.validate(q, type_name)
    ours = ggml.dequantize(q, type_name, w.shape)
    ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[type_name])
    assert ref.shape == w.shape
    # two implementations of one format: equal up to float32 rounding of the scale products
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    assert np.abs(ours - w).max() < np.abs(w).max()  # and it is a quantization of w, not noise


def test_error_decreases_with_bits():
    w = weight(64, 512)
    errs = [float(((ggml.dequantize(ggml.quantize(w, t), t, w.shape) - w) ** 2).mean())
            for t in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]]
    assert all(a > 1.5 * b for a, b in zip(errs, errs[1:])), errs
    assert float(((ggml.dequantize(ggml.quantize(w, "F16"), "F16", w.shape) - w) ** 2).mean()) < errs[-1]


@pytest.mark.parametrize("type_name", ["Q3_K", "Q4_K", "IQ4_XS", "Q4_0"])
def test_imatrix_lowers_the_error_it_weights(type_name):
    w, im = weight(64, 512), importance(512)
    plain = ggml.dequantize(ggml.quantize(w, type_name), type_name, w.shape)
    weighted = ggml.dequantize(ggml.quantize(w, type_name, im), type_name, w.shape)
    assert not np.array_equal(plain, weighted)  # the importance matrix reaches ggml's quantizer

    def err(x):
        return float((im[None] * (x - w) ** 2).sum())

    assert err(weighted) < 0.97 * err(plain), (err(weighted), err(plain))


def test_expert_tensor_uses_each_experts_row_of_the_imatrix():
    w3 = np.stack([weight(8, 256, s) for s in range(3)])  # [experts, rows, cols]
    im3 = np.stack([importance(256, s) for s in range(3)])
    q3 = ggml.quantize(w3, "Q4_K", im3)
    assert q3.shape == (3, 8, ggml.row_bytes("Q4_K", 256))
    for e in range(3):  # the same bytes as quantizing expert e alone with its own row
        np.testing.assert_array_equal(q3[e], ggml.quantize(w3[e], "Q4_K", im3[e]))
    with pytest.raises(ValueError, match=r"\[3, 256\]"):
        ggml.quantize(w3, "Q4_K", im3[0])
    with pytest.raises(ValueError, match="negative or non-finite"):
        ggml.quantize(w3[0], "Q4_K", -im3[0])


def test_width_not_a_multiple_of_the_block_is_refused_with_llamas_fallback():
    w = weight(4, 96)
    with pytest.raises(ValueError, match=r"blocks of 256.*falls back to Q5_0"):
        ggml.quantize(w, "Q4_K")
    assert ggml.fallback_type("Q4_K", 96) == "Q5_0" and ggml.fallback_type("Q6_K", 128) == "Q8_0"
    assert ggml.fallback_type("Q2_K", 128) == "Q4_0" and ggml.fallback_type("IQ2_XXS", 64) == "IQ4_NL"
    assert ggml.fallback_type("Q4_K", 100) == "F16" and ggml.fallback_type("Q4_K", 512) == "Q4_K"
    with pytest.raises(ValueError, match="needs an importance matrix"):
        ggml.quantize(weight(), "IQ2_XXS")
    with pytest.raises(ValueError, match="unknown ggml type"):
        ggml.quantize(weight(), "Q7_K")


def test_quantize_dequantize_torch_and_threads():
    w = torch.from_numpy(weight(32, 256)).to(torch.bfloat16)
    out = ggml.quantize_dequantize(w, "Q4_K")
    assert out.dtype == torch.bfloat16 and out.shape == w.shape and out.device == w.device
    ref = ggml.dequantize(ggml.quantize(w.float().numpy(), "Q4_K"), "Q4_K", w.shape)
    assert torch.equal(out, torch.from_numpy(ref).to(torch.bfloat16))
    # many threads quantizing different types at once give what one thread gives (no shared state)
    jobs = [(weight(16, 256, s), t) for s in range(3) for t in ("Q3_K", "Q5_K", "IQ4_NL", "Q8_0")]
    serial = [ggml.quantize(x, t, importance(256)) for x, t in jobs]
    got = [None] * len(jobs)

    def run(i):
        got[i] = ggml.quantize(jobs[i][0], jobs[i][1], importance(256), threads=2)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, got):
        np.testing.assert_array_equal(a, b)
