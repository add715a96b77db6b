"""Zero points stored at the code width (issue 25): the run-wide `zero_points` setting ("packed" default,
"fp16" the old accounting), what it costs, what the packed format (version 2) stores, that the freed bits
are spent by the allocator, and that old plans, run directories and format-1 checkpoints keep their meaning."""
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moebits.allocate import plan_under_budget
from moebits.budget import Budget
from moebits.job import QuantizeConfig
from moebits.job.config import read_recipe, upgrade_spec
from moebits.models import MoEAdapter, tiny_model
from moebits.packed import (PackedFormatError, describe_packed, load_quantized, packed_sizes, read_index, read_units,
                            save_packed)
from moebits.plan import Assignment, Plan, PlanError
from moebits.quant import hessian_from_inputs, quantize_codes
from moebits.table import SensitivityTable
from moebits.units import Choice, Unit

V1_CHECKPOINT = Path(__file__).parent / "data" / "packed_v1_b26f7aa"
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
# integer-zero (rtn, gptq) and real-zero (hqq) units, 2/3/4/5/8 bits, partial groups (24), per-channel (0), fp16;
# rtn and hqq both at w3g32 in one fused tensor: their zeros are stored differently, so in different sets
MIXED = [Choice(3, 32, "rtn"), Choice(3, 32, "hqq"), Choice(2, 16, "gptq"), Choice(5, 24, "gptq"), Choice(16),
         Choice(8, 0, "rtn"), Choice(4, 32, "hqq"), Choice(4, 32, "gptq")]


def quantized(arch: str = "qwen2_moe"):
    """A tiny model quantized in place by a MIXED plan (GPTQ with a random Hessian per unit). Returns
    model, adapter, the unit assignments and every unit's codes."""
    model = tiny_model(arch)
    ad = MoEAdapter(model)
    g = torch.Generator().manual_seed(0)
    assignments, codes = {}, {}
    for i, u in enumerate(ad.units()):
        c = MIXED[i % len(MIXED)]
        w = ad.weight(u)
        h = hessian_from_inputs(torch.randn(256, w.shape[1], generator=g)) if c.quantizer == "gptq" else None
        codes[u] = quantize_codes(w, c, h)
        ad.set_weight(u, codes[u].dequantize(w.dtype))
        assignments[u] = Assignment(c)
    return model, ad, assignments, codes


def unit_tensor_bytes(path: Path) -> tuple[int, dict]:
    index = read_index(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {n: f.get_tensor(n) for n in index.tensor_names()}
    return sum(t.numel() * t.element_size() for t in tensors.values()), tensors


# ---- cost ------------------------------------------------------------------------------------------

def test_the_freed_bits_are_spent_by_the_allocator():
    """At --bits 3.25 g128, "fp16" buys uniform 3-bit exactly; "packed" pays 3 + 19/128 for the same codes,
    and the exact allocator spends the 0.10 bits per weight left on 4-bit upgrades, up to the budget."""
    units = [Unit(0, e, k) for e in range(20) for k in ("gate", "up", "down")]
    shapes = {u: (64, 1024) for u in units}
    choices = [Choice(b, 128, "gptq") for b in (2, 3, 4)]
    table = SensitivityTable(units, choices)
    rng = np.random.default_rng(0)
    base = rng.random(len(units)) + 0.5
    table.error[:] = base[:, None] * np.array([1000.0, 4.0, 1.0])[None, :]
    table.frequency[:] = rng.random(len(units)) + 0.1
    plans = {}
    for zp in ("fp16", "packed"):
        budget = Budget.build("bits", 3.25, units, shapes, choices, zero_points=zp)
        plans[zp] = plan = plan_under_budget(table, budget, "ilp")
        assert plan.zero_points == zp and plan.avg_bits(shapes) <= 3.25 + 1e-12
    assert set(plans["fp16"].bits_histogram()) == {"w3g128-gptq"}  # 3.25 exactly: nothing left over
    hist = plans["packed"].bits_histogram()
    n4 = hist.get("w4g128-gptq", 0)
    assert n4 >= 5  # ~0.10 bits x 61440 weights per unit / (1 + 1/128 bits per upgrade) per unit: 6 of 60
    upgrade = Choice(4, 128, "gptq").storage_bits(64, 1024) - Choice(3, 128, "gptq").storage_bits(64, 1024)
    total = 3.25 * 64 * 1024 * len(units)
    used = plans["packed"].storage_bits(shapes)
    assert total - used < upgrade  # binds: no further upgrade fits
    assert plans["packed"].meta["total_loss"] < plans["fp16"].meta["total_loss"]


def test_plan_records_its_zero_points_and_old_plans_read_as_fp16(tmp_path):
    u = Unit(0, 0, "gate")
    plan = Plan({u: Assignment(Choice(3, 128, "gptq"))})
    assert plan.zero_points == "packed"
    assert plan.storage_bits({u: (64, 1024)}) == 3 * 64 * 1024 + 19 * 64 * 8
    plan.save(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["zero_points"] == "packed"
    assert Plan.load(tmp_path / "p.json").zero_points == "packed"
    d = json.loads((tmp_path / "p.json").read_text())
    del d["zero_points"]  # as every plan written before issue 25
    (tmp_path / "old.json").write_text(json.dumps(d))
    old = Plan.load(tmp_path / "old.json")
    assert old.zero_points == "fp16" and old.storage_bits({u: (64, 1024)}) == 3.25 * 64 * 1024
    (tmp_path / "bad.json").write_text(json.dumps({**d, "zero_points": "int4"}))
    with pytest.raises(PlanError, match="zero_points"):
        Plan.load(tmp_path / "bad.json")


def test_zero_points_is_an_option_and_old_specs_read_as_fp16(tmp_path):
    assert QuantizeConfig().zero_points == "packed"
    assert "zero_points" not in QuantizeConfig().spec()  # the default
    assert QuantizeConfig(zero_points="fp16").spec()["zero_points"] == "fp16"
    with pytest.raises(ValueError, match="--zero-points"):
        QuantizeConfig(zero_points="int8")
    assert upgrade_spec({"version": 2, "bits": 3.25})["zero_points"] == "fp16"  # what it meant then
    assert "zero_points" not in upgrade_spec(QuantizeConfig().spec())
    (tmp_path / "r.toml").write_text('[budget]\nzero_points = "fp16"\nbits = 3.25\n')
    assert read_recipe(tmp_path / "r.toml")["zero_points"] == "fp16"


# ---- the packed format -----------------------------------------------------------------------------

def test_packed_checkpoint_stores_what_the_plan_costs_and_reloads_exactly(tmp_path):
    model, ad, assignments, codes = quantized()
    with torch.no_grad():
        want = model(IDS).logits
    shapes = ad.shapes()
    stored, sets = {}, {}
    for zp in ("fp16", "packed"):
        plan = Plan(dict(assignments), zero_points=zp)
        sizes = save_packed(model, ad, plan, codes, tmp_path / zp)
        assert packed_sizes(model, ad, plan) == sizes
        stored[zp], tensors = unit_tensor_bytes(tmp_path / zp)
        assert stored[zp] == sizes["expert_bytes"]
        index = read_index(tmp_path / zp)
        assert index.format_version == 2
        assert describe_packed(tmp_path / zp, load=False)["zero_points"] == zp  # `moebits info` shows it
        sets[zp] = [(p, t, s, ss) for p, m in index.modules.items() for t, spec in m.tensors.items()
                    for s, ss in spec.sets.items()]
        packed_sets = [x for x in sets[zp] if x[3].packed_zeros]
        # exact up to < 1 byte per packed zero bitstream (each set rounds up once)
        assert 0 <= stored[zp] - plan.storage_bits(shapes) / 8 < max(len(packed_sets), 1)
        for p, t, s, ss in packed_sets:
            base = p if index.modules[p].type == "linear" else f"{p}.{t}"
            z = tensors[f"{base}.{s}.zero"]
            k = index.modules[p].tensors[t].in_features
            G = 1 if ss.group_size == 0 else -(-k // ss.group_size)
            assert z.dtype == torch.uint8 and z.shape == (-(-ss.rows * G * ss.bits // 8),) and ss.zero_bits == ss.bits
        # save -> reload: the in-memory quantized model's logits, and the quantizer's own codes and zeros
        loaded = load_quantized(tmp_path / zp)
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, want)
        back = read_units(tmp_path / zp)
        for u, qw in codes.items():
            if not assignments[u].choice.is_fp:
                assert torch.equal(back[u].zero.float(), qw.zero.float()) and torch.equal(back[u].codes, qw.codes)
    assert not any(ss.packed_zeros for *_, ss in sets["fp16"])
    # hand count of what packing saves: (16 - b) bits per integer zero, none for HQQ or fp16 units
    saved_bits = sum((16 - a.choice.bits) * shapes[u][0] * a.choice.groups_per_row(shapes[u][1])
                     for u, a in assignments.items() if a.choice.quantizer != "hqq" and not a.choice.is_fp)
    assert 0 <= stored["fp16"] - stored["packed"] - saved_bits / 8 < len([x for x in sets["packed"] if x[3].packed_zeros])
    # rtn and hqq units at w3g32 of one fused tensor live in two sets
    gu = read_index(tmp_path / "packed").modules["model.layers.0.mlp.experts"].tensors["gate_up"].sets
    assert gu["w3g32"].zero_bits == 16 and gu["w3g32z3"].zero_bits == 3


def test_corrupted_packed_zeros_are_refused(tmp_path):
    model, ad, assignments, codes = quantized()
    save_packed(model, ad, Plan(assignments), codes, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    raw = bytearray(f.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k.endswith("z3.zero"))
    raw[8 + n + header[name]["data_offsets"][0]] ^= 0x24
    f.write_bytes(bytes(raw))
    with pytest.raises(PackedFormatError, match=rf"{name} is corrupted"):
        load_quantized(tmp_path / "m")
    with pytest.raises(PackedFormatError, match=rf"{name} is corrupted"):
        read_units(tmp_path / "m")


def test_non_integer_zeros_are_refused_when_packing(tmp_path):
    model, ad, assignments, codes = quantized()
    u = next(u for u, a in assignments.items() if a.choice.quantizer == "rtn")
    codes[u].zero = codes[u].zero + 0.5
    with pytest.raises(ValueError, match="not integers.*zero_points='fp16'"):
        save_packed(model, ad, Plan(assignments), codes, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_format_1_checkpoint_still_loads_with_its_weights_and_logits():
    """tests/data/packed_v1_b26f7aa: written by moebits b26f7aa (every zero fp16, no zero_bits)."""
    import hashlib

    from moebits.packed.modules import PackedExperts

    index = read_index(V1_CHECKPOINT / "model")
    assert index.format_version == 1
    assert all(ss.zero_bits == 16 for m in index.modules.values() for t in m.tensors.values() for ss in t.sets.values())
    assert Plan.load(V1_CHECKPOINT / "model" / "plan.json").zero_points == "fp16"
    assert describe_packed(V1_CHECKPOINT / "model", load=False)["zero_points"] == "fp16"
    model = load_quantized(V1_CHECKPOINT / "model")
    # the dense expert weights of the in-memory quantized model that wrote it, bit for bit
    digest = lambda t: hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()  # noqa: E731
    want = json.loads((V1_CHECKPOINT / "expected_weights.json").read_text())
    got = {}
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        assert isinstance(ex, PackedExperts)
        gate_up, down = ex.dense_weights(torch.arange(ex.num_experts), torch.float32)
        got[f"{i}.gate_up"], got[f"{i}.down"] = digest(gate_up), digest(down)
        for k in ("gate", "up", "down"):
            got[f"{i}.shared.{k}"] = digest(getattr(layer.mlp.shared_expert, f"{k}_proj").dequantize(torch.float32))
    assert got == want
    # and its logits (the reduction order of the fixture's: torch on 1 thread)
    expected = load_file(str(V1_CHECKPOINT / "expected.safetensors"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            assert torch.equal(model(expected["ids"]).logits, expected["logits"])
    finally:
        torch.set_num_threads(threads)
    assert len(read_units(V1_CHECKPOINT / "model")) == len(index.units)
