import pytest
import torch
import torch.nn.functional as F

from moebits.models import load_model
from moebits.plan import Plan
from moebits.qat import fake_quant_ste, quantization_aware_training
from moebits.quant import quantize_weight
from moebits.units import Choice, Unit


def test_ste_passes_the_gradient_through_the_rounding():
    torch.manual_seed(0)
    w = torch.randn(8, 64, requires_grad=True)
    upstream = torch.randn(8, 64)
    y = fake_quant_ste(w, 2, 32)
    # the forward is the RTN-dequantized weight ...
    assert torch.equal(y.detach(), quantize_weight(w.detach(), Choice(2, 32, "rtn")))
    y.backward(upstream)
    # ... and the backward the identity: every weight receives the upstream gradient
    assert torch.equal(w.grad, upstream)
    # without the STE, the same quantizer written with torch.round passes no gradient at all
    w2 = w.detach().clone().requires_grad_(True)
    g = w2.reshape(8, 2, 32)
    lo, hi = g.detach().amin(-1, keepdim=True), g.detach().amax(-1, keepdim=True)
    scale = (hi - lo) / 3
    zero = torch.round(-lo / scale)
    naive = (torch.clamp(torch.round(g / scale) + zero, 0, 3) - zero) * scale
    naive.reshape(8, 64).backward(upstream)
    assert torch.count_nonzero(w2.grad) == 0


def _windows(n, T, vocab, seed):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _loss(model, windows):
    logits = model(input_ids=windows, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1)).item()


def test_qat_lowers_the_training_loss_of_a_2_bit_model():
    torch.manual_seed(0)
    model, _, ad = load_model("tiny:qwen2_moe", "float32", seed=0)
    win = _windows(8, 64, model.config.vocab_size, 1)
    units, shapes = ad.units(), ad.shapes()
    keep = Unit(ad.moe_layers[0], 0, "down")  # one unit kept at 16 bits: QAT must leave it alone
    plan = Plan.uniform(units, shapes, Choice(2, 32, "rtn"))
    plan.assignments[keep].choice = Choice(16, 32, "rtn")
    before_keep = ad.weight(keep).clone()
    # reference: 2-bit RTN post-training quantization of the same model
    ref_model, _, ref = load_model("tiny:qwen2_moe", "float32", seed=0)
    from moebits.apply import apply_plan

    apply_plan(ref, plan, progress=False)
    ptq_loss = _loss(ref_model, win)
    res = quantization_aware_training(ad, plan, win, steps=15, lr=3e-3, batch_size=8, seed=0)
    qat_loss = _loss(model, win)
    assert res.losses[0] == pytest.approx(ptq_loss, rel=1e-4)  # step 0 sees exactly the PTQ model
    assert qat_loss < ptq_loss - 0.05  # fine-tuning under fake quantization lowers the training loss
    # the result is a 2-bit model: at most 4 distinct values in every group of 32 of every quantized row
    for u in units:
        if u == keep:
            continue
        groups = ad.weight(u).reshape(shapes[u][0], -1, 32)
        distinct = max(len(torch.unique(g)) for g in groups.reshape(-1, 32))
        assert distinct <= 4, u
    assert torch.equal(ad.weight(keep), before_keep.half().float())  # 16-bit units: frozen, kept as PTQ keeps them
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored
    assert plan.meta["qat"]["steps"] == 15
