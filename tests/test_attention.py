import pytest
import torch

from conftest import ARCHS
from moebits.attention import attention_hessians, attention_size, quantize_attention
from moebits.data import random_windows
from moebits.models import MoEAdapter, tiny_model
from moebits.quant import RankTooLargeError, quantize_rtn
from moebits.units import Choice


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_quantization_changes_only_attention_projections(arch):
    model = tiny_model(arch)
    ad = MoEAdapter(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    attn = ad.attention_linears()
    names = {f"{n}.weight" for n in attn}
    if arch.startswith("deepseek"):  # MLA's low-rank projections are attention weights too
        assert any("kv_a_proj_with_mqa" in n for n in names) and any("kv_b_proj" in n for n in names)
    choice = Choice(3, 32, "rtn")
    size = quantize_attention(ad, choice)
    for n, p in model.named_parameters():
        if n in names:
            assert not torch.equal(p, before[n]), n
            assert torch.equal(p, quantize_rtn(before[n], 3, 32)), n  # exactly the chosen quantizer
        else:
            assert torch.equal(p, before[n]), f"{n} is not an attention projection but changed"
    shapes = [tuple(m.weight.shape) for m in attn.values()]
    assert size.params == sum(o * i for o, i in shapes)
    assert size.storage_bits == sum(choice.storage_bits(o, i) for o, i in shapes)
    assert attention_size(ad, None).storage_bits == 16 * size.params


def test_attention_gptq_with_compensator_and_too_large_rank():
    model = tiny_model("deepseek_v2")
    ad = MoEAdapter(model)
    win = random_windows(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0)), 4, 32)
    H = attention_hessians(ad, win)
    assert set(H) == set(ad.attention_linears())
    w0 = {n: m.weight.detach().clone() for n, m in ad.attention_linears().items()}
    # kv_b_proj has 16 inputs in the tiny DeepSeek: rank 20 cannot fit, and nothing is written
    with pytest.raises(RankTooLargeError, match=r"--attn-rank: .*kv_b_proj.*rank 20 exceeds"):
        quantize_attention(ad, Choice(2, 32, "gptq", rank=20), H)
    assert all(torch.equal(m.weight, w0[n]) for n, m in ad.attention_linears().items())
    quantize_attention(ad, Choice(2, 32, "gptq", rank=4), H)
    plain = MoEAdapter(tiny_model("deepseek_v2"))
    quantize_attention(plain, Choice(2, 32, "gptq"), H)
    err = lambda a: sum(((m.weight - w0[n]) ** 2).sum().item() for n, m in a.attention_linears().items())
    assert err(ad) < err(plain)
