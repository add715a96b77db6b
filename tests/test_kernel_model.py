"""The packed Triton kernel inside a loaded packed model (`PackedExperts`), on the CPU under Triton's
interpreter, against the dequantizing torch path of the same model (today's path, itself checked equal
to the in-memory quantized model in test_packed.py).

Tolerance: logits may differ by at most 2e-5 x max(1, max |logit|). Both paths compute in fp32 here
(the tiny models are fp32; the kernel dequantizes in fp32 and its dot runs on fp32 inputs), so they
differ only by summation order (the kernel accumulates K in blocks of 64; torch's matmul in its own
order; compensators as x V^T U^T instead of x (W + UV)^T): a few fp32 ulps per matmul, measured at
<= 1.2e-6 on logits of magnitude ~3. The bound is 15-50x that and, each test checks, far below the
difference quantization itself makes (a wrong code, scale, zero, segment or expert is caught).
"""
import dataclasses
import logging

import pytest
import torch

pytest.importorskip("triton")  # conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA

from moebits.models import tiny_model  # noqa: E402
from moebits.models.act_quant import install_act_quant  # noqa: E402
from moebits.models.loading import byte_tokenizer  # noqa: E402
from moebits.models.transforms import set_expert_transform  # noqa: E402
from moebits.packed import load_quantized, save_packed  # noqa: E402
from moebits.packed import kernel_path  # noqa: E402
from moebits.packed.kernel_path import set_kernel  # noqa: E402
from moebits.packed.modules import PackedExperts, PackedLinear  # noqa: E402
from moebits.rotate import OnlineHadamard  # noqa: E402
from moebits.units import Unit  # noqa: E402

from conftest import ARCHS  # noqa: E402
from test_packed import mixed_quantized  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPT = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
LAYERS = 2  # the interpreter runs every program in Python: two decoder layers (DeepSeek: one dense, one MoE)


def tolerance(logits: torch.Tensor) -> float:
    return 2e-5 * max(1.0, logits.abs().max().item())


def paths(model, mode: str) -> set[str]:
    """What the latest forward of every packed module (routed experts, shared-expert linears) ran."""
    return {m.last_path for m in model.modules() if isinstance(m, (PackedExperts, PackedLinear))}


@torch.no_grad()
def prefill_and_decode(model, mode: str):
    """Logits of a 2 x 6 prompt (prefill) and of one cached decode step (2 tokens), on `mode`'s path."""
    set_kernel(model, mode)
    out = model(input_ids=PROMPT[:, :-1].to(DEVICE), use_cache=True)
    step = model(input_ids=PROMPT[:, -1:].to(DEVICE), past_key_values=out.past_key_values).logits
    assert paths(model, mode) == {"triton" if mode == "triton" else "torch"}
    return out.logits.float().cpu(), step.float().cpu()


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    """qwen2_moe with the mixed plan (2/3/4/5/8 bits, fp16 rows, group sizes 16/24/128/per-channel, HQQ
    zeros) and compensators on a few units, saved packed."""
    model, ad, plan, codes = mixed_quantized("qwen2_moe", lowrank=True, num_hidden_layers=LAYERS)
    d = tmp_path_factory.mktemp("packed") / "m"
    save_packed(model, ad, plan, codes, d, byte_tokenizer())
    return d


@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_path_logits_equal_torch_path(arch, tmp_path):
    model, ad, plan, codes = mixed_quantized(arch, lowrank=arch == "deepseek_v2", num_hidden_layers=LAYERS)
    save_packed(model, ad, plan, codes, tmp_path / "m", byte_tokenizer())
    loaded = load_quantized(tmp_path / "m", dtype=torch.float32, device=DEVICE)
    want_prefill, want_step = prefill_and_decode(loaded, "torch")
    got_prefill, got_step = prefill_and_decode(loaded, "triton")
    for got, want in ((got_prefill, want_prefill), (got_step, want_step)):
        torch.testing.assert_close(got, want, rtol=0, atol=tolerance(want))
    # the bound discriminates: the unquantized model is far outside it
    with torch.no_grad():
        fp = tiny_model(arch, num_hidden_layers=LAYERS)(input_ids=PROMPT[:, :-1]).logits
    assert (fp - want_prefill).abs().max() > 100 * tolerance(want_prefill)


def test_kernel_path_with_input_transforms(packed_dir):
    """Activation quantization differing between gate and up (two input planes), an online Hadamard on
    every down projection: the kernel path applies them as the torch path does."""
    loaded = load_quantized(packed_dir, dtype=torch.float32, device=DEVICE)
    ad_units = [Unit(layer, e, k) for layer in range(LAYERS) for e in range(8) for k in ("gate", "up", "down")]
    act_bits = {u: (8 if u.kind == "gate" else 6 if u.kind == "up" else 4) if u.expert % 3 else 16 for u in ad_units}
    assert install_act_quant(loaded, act_bits) > 0
    for layer in range(LAYERS):
        set_expert_transform(loaded.model.layers[layer].mlp.experts, None, "down", "rotate", OnlineHadamard(32))
    want_prefill, want_step = prefill_and_decode(loaded, "torch")
    got_prefill, got_step = prefill_and_decode(loaded, "triton")
    for got, want in ((got_prefill, want_prefill), (got_step, want_step)):
        torch.testing.assert_close(got, want, rtol=0, atol=tolerance(want))
    plain = load_quantized(packed_dir, dtype=torch.float32, device=DEVICE)
    plain_prefill, _ = prefill_and_decode(plain, "torch")
    assert (plain_prefill - want_prefill).abs().max() > 100 * tolerance(want_prefill)  # the transforms matter


def test_unknown_transform_falls_back_or_refuses(packed_dir, caplog, monkeypatch):
    loaded = load_quantized(packed_dir, dtype=torch.float32, device=DEVICE)
    experts = loaded.model.layers[1].mlp.experts
    set_expert_transform(experts, 3, "up", "act_quant", lambda x: x * 0.5)  # not marked row-wise
    set_kernel(loaded, "triton")
    with pytest.raises(RuntimeError, match="not marked row-wise"), torch.no_grad():
        loaded(input_ids=PROMPT)
    monkeypatch.setattr(kernel_path, "_logged", set())
    set_kernel(loaded, "auto")
    with caplog.at_level(logging.INFO, logger="moebits.kernel"), torch.no_grad():
        loaded(input_ids=PROMPT)
        loaded(input_ids=PROMPT)
    assert experts.last_path == "torch"
    fallbacks = [r for r in caplog.records if "dequantizing torch path" in r.getMessage()]
    assert len(fallbacks) == 1  # said once, with the reason
    reason = fallbacks[0].getMessage()
    assert ("not marked row-wise" in reason) if DEVICE == "cuda" else ("needs a CUDA device" in reason)


def test_kernel_mode_from_environment(packed_dir, monkeypatch):
    """`from_pretrained` through the registered quantizer, the mode from MOEBITS_KERNEL."""
    from transformers import AutoModelForCausalLM

    import moebits  # noqa: F401  (registers the quantizer)

    model = AutoModelForCausalLM.from_pretrained(str(packed_dir), dtype=torch.float32).to(DEVICE)
    monkeypatch.setenv(kernel_path.ENV, "triton")
    with torch.no_grad():
        model(input_ids=PROMPT[:1, :4].to(DEVICE))
    assert paths(model, "triton") == {"triton"}
    monkeypatch.setenv(kernel_path.ENV, "fast")
    with pytest.raises(ValueError, match="unknown kernel mode"):
        model(input_ids=PROMPT[:1, :4].to(DEVICE))


def test_grads_fall_back_to_torch_path(packed_dir):
    loaded = load_quantized(packed_dir, dtype=torch.float32, device=DEVICE)
    set_kernel(loaded, "auto")
    emb = loaded.get_input_embeddings()(PROMPT[:1, :4].to(DEVICE)).detach().requires_grad_()
    loaded(inputs_embeds=emb).logits.sum().backward()
    assert emb.grad is not None and paths(loaded, "torch") == {"torch"}
