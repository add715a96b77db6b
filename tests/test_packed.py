"""The packed format: bit layout, codes that reproduce the quantizers, save -> load in a fresh
process with equal logits on every architecture, resident bytes, and damaged files refused."""
import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moebits.apply import apply_plan
from moebits.models import MoEAdapter, tiny_model
from moebits.models.loading import byte_tokenizer
from moebits.packed import (PackedFormatError, load_quantized, packed_sizes, read_index, read_units,
                            resident_bytes, save_packed)
from moebits.plan import Assignment, Plan
from moebits.quant import hessian_from_inputs, quantize_codes, quantize_weight
from moebits.quant.pack import pack_codes, packed_bytes, unpack_codes
from moebits.units import Choice

from conftest import ARCHS

SRC = str(Path(__file__).resolve().parents[1] / "src")


def reference_pack(row: list[int], bits: int) -> list[int]:
    """The documented layout, bit by bit: value j at bits [j*b, (j+1)*b), LSB-first in each byte."""
    out = [0] * ((len(row) * bits + 7) // 8)
    for j, v in enumerate(row):
        for t in range(bits):
            pos = j * bits + t
            out[pos // 8] |= ((v >> t) & 1) << (pos % 8)
    return out


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_matches_bitwise_reference_and_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    for k in (1, 3, 7, 8, 13, 64, 130):  # byte-aligned rows and rows ending mid-byte
        codes = torch.randint(0, 2 ** bits, (3, k), generator=g).to(torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.shape == (3, packed_bytes(k, bits))
        assert packed.tolist() == [reference_pack(r, bits) for r in codes.tolist()]
        assert torch.equal(unpack_codes(packed, bits, k), codes)
    if bits < 8:
        with pytest.raises(ValueError, match="exceeds"):
            pack_codes(torch.full((1, 4), 2 ** bits, dtype=torch.uint8), bits)


def test_pack_layout_examples():
    # 4 bits: value 2j is the low nibble of byte j
    assert pack_codes(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x03]]
    # 3 bits: value 2 straddles bytes 0 and 1
    assert pack_codes(torch.tensor([[0, 0, 7]], dtype=torch.uint8), 3).tolist() == [[0xC0, 0x01]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k,group_size", [(256, 128), (200, 64), (200, 0)], ids=["full", "partial", "per-channel"])
def test_codes_dequantize_to_exactly_what_quantize_weight_returns(k, group_size, dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(2, 16, k, generator=g) * 0.05).to(dtype)
    H = hessian_from_inputs(torch.randn(512, k, generator=g)).expand(2, k, k).contiguous()
    cases = [(Choice(b, group_size, "rtn"), None, False) for b in (2, 3, 8)]
    cases += [(Choice(b, group_size, "hqq"), None, False) for b in (1, 3, 4)]
    cases += [(Choice(b, group_size, "gptq"), H, ao) for b in (2, 5) for ao in (False, True)]
    cases += [(Choice(16), None, False)]
    for choice, h, act_order in cases:
        want = quantize_weight(w, choice, h, act_order=act_order)
        qw = quantize_codes(w, choice, h, act_order=act_order)
        assert torch.equal(qw.dequantize(dtype), want), (choice, act_order)
        if not choice.is_fp:
            assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) < 2 ** choice.bits
            G = 1 if group_size <= 0 else -(-k // group_size)
            assert qw.scale.shape == qw.zero.shape == (2, 16, G) and qw.scale.dtype == torch.float16
            if choice.quantizer != "hqq":  # RTN/GPTQ zeros are integers
                assert torch.equal(qw.zero, qw.zero.round())


MIXED = [Choice(2, 16, "rtn"), Choice(3, 24, "rtn"), Choice(4, 128, "hqq"), Choice(16), Choice(8, 0, "rtn"),
         Choice(5, 32, "rtn")]


def mixed_quantized(arch: str, lowrank: bool = False, **overrides):
    """A tiny model quantized in memory by a plan mixing bits, group sizes, quantizers and fp16,
    with, optionally, BT-MoE compensators on a few units. Returns model, adapter, plan, codes."""
    model = tiny_model(arch, **overrides)
    ad = MoEAdapter(model)
    plan = Plan({u: Assignment(MIXED[i % len(MIXED)]) for i, u in enumerate(ad.units())})
    codes = {}
    apply_plan(ad, plan, progress=False, codes=codes)
    if lowrank:
        g = torch.Generator().manual_seed(1)
        for u in ad.units()[:7:3]:
            qw = codes[u]
            out, k = qw.shape
            qw.u = (torch.randn(out, 4, generator=g) * 0.05).half()
            qw.v = (torch.randn(4, k, generator=g) * 0.05).half()
            ad.set_weight(u, qw.dequantize(ad.weight(u).dtype))
            plan.assignments[u] = Assignment(dataclasses.replace(plan.choice(u), rank=4))
    return model, ad, plan, codes


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_and_loaded_model_has_the_in_memory_logits(arch, tmp_path):
    model, ad, plan, codes = mixed_quantized(arch, lowrank=True)
    sizes = save_packed(model, ad, plan, codes, tmp_path / "model", byte_tokenizer())
    assert packed_sizes(model, ad, plan) == sizes  # the analytic sizes are the written ones
    stored = sum(t.numel() * t.element_size() for t in load_file(str(tmp_path / "model" / "model.safetensors")).values())
    assert stored == sizes["model_bytes"]
    # read back unit by unit: exactly the codes, scales, zeros (and factors) the quantizer returned
    back = read_units(tmp_path / "model")
    assert back.keys() == codes.keys()
    for u, qw in codes.items():
        assert torch.equal(back[u].dequantize(), qw.dequantize()), u
        if qw.codes is not None:
            assert torch.equal(back[u].codes, qw.codes) and torch.equal(back[u].zero, qw.zero)
    loaded = load_quantized(tmp_path / "model", dtype=torch.float32)
    with torch.no_grad():
        want, got = model(input_ids=IDS).logits, loaded(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # real savings: the experts' fused fp32 tensors are gone, codes stay packed in memory
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n, _ in loaded.named_parameters())
    assert abs(resident_bytes(loaded) / sizes["model_bytes"] - 1) < 0.02


def test_fresh_process_from_pretrained_and_resident_bound(tmp_path):
    model, ad, plan, codes = mixed_quantized("qwen2_moe")
    sizes = save_packed(model, ad, plan, codes, tmp_path / "model", byte_tokenizer())
    with torch.no_grad():
        torch.save(model(input_ids=IDS).logits, tmp_path / "want.pt")
    torch.save(IDS, tmp_path / "ids.pt")
    script = f"""
import json, torch, moebits
torch.set_num_threads({torch.get_num_threads()})  # the same kernels' reduction order as this process
from transformers import AutoModelForCausalLM
from moebits.packed import resident_bytes
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, dtype=torch.float32)
with torch.no_grad():
    got = m(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits
want = torch.load({str(tmp_path / 'want.pt')!r})
print(json.dumps({{"equal": bool(torch.equal(got, want)), "diff": (got - want).abs().max().item(), "resident": resident_bytes(m),
                  "experts": type(m.model.layers[0].mlp.experts).__name__}}))
"""
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["equal"] and res["experts"] == "PackedExperts", res
    # bound from the plan: the units' exact storage + every other tensor (fp32 here), +2 %
    shapes = ad.shapes()
    unit_params = sum(a * b for a, b in shapes.values())
    other = sum(p.numel() * p.element_size() for p in model.parameters()) - 4 * unit_params
    bound = (plan.storage_bits(shapes) / 8 + other) * 1.02
    assert res["resident"] <= bound, (res["resident"], bound)
    assert sizes["expert_bytes"] == plan.storage_bits(shapes) / 8  # the format stores exactly what the plan costs


def _tensor_offsets(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return 8 + n, json.loads(raw[8:8 + n])


def _rewrite_metadata(path: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    index = json.loads(meta["moebits"])
    edit(index)
    save_file(tensors, str(path), metadata={**meta, "moebits": json.dumps(index)})


@pytest.fixture
def saved(tmp_path):
    model, ad, plan, codes = mixed_quantized("mixtral")
    save_packed(model, ad, plan, codes, tmp_path / "model", byte_tokenizer())
    return tmp_path / "model"


def test_truncated_file_is_refused_naming_it(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(PackedFormatError, match=r"model\.safetensors.*truncated or corrupted"):
        load_quantized(saved)


def test_corrupted_codes_are_refused(saved):
    f = saved / "model.safetensors"
    start, header = _tensor_offsets(f)
    name = next(k for k in header if k.endswith(".codes"))
    raw = bytearray(f.read_bytes())
    raw[start + header[name]["data_offsets"][0] + 3] ^= 0x5A
    f.write_bytes(bytes(raw))
    read_index(saved)  # the header is intact ...
    with pytest.raises(PackedFormatError, match=rf"{name} is corrupted"):  # ... the bytes are not
        load_quantized(saved)


def test_unknown_version_and_missing_entry_are_refused(saved):
    f = saved / "model.safetensors"
    _rewrite_metadata(f, lambda d: d["units"].pop("L1.E3.down"))
    with pytest.raises(PackedFormatError, match=r"model\.safetensors: the index has no entry .*E3\.down"):
        read_index(saved)
    _rewrite_metadata(f, lambda d: d.update(format_version=99))
    with pytest.raises(PackedFormatError, match=r"model\.safetensors: moebits packed format_version 99"):
        read_index(saved)
    cfg = json.loads((saved / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 3
    (saved / "config.json").write_text(json.dumps(cfg))
    from moebits.atomic import seal

    seal(saved, "packed")  # as a (future) moebits would have written it: the marker's hashes agree
    with pytest.raises(PackedFormatError, match="config.json.*format_version 3"):
        load_quantized(saved)


def test_config_and_files(saved):
    cfg = json.loads((saved / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "moebits" and q["format_version"] == 2
    assert (saved / "plan.json").exists() and not saved.with_name("model.partial").exists()
    index = read_index(saved)
    assert sum(index.bits_histogram().values()) == len(index.units)
