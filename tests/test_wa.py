"""Weight-activation (W-A) quantization end to end: the activation-bits budget in the exact ILP, the
roofline's activation terms, and W-A runs that reload from their packed checkpoint."""
import itertools
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moebits.allocate import allocate
from moebits.budget import ActBitsBudget, act_bits_average
from moebits.cli import app
from moebits.cost import GPUS, compute_peak, expected_traffic, latency_matrix
from moebits.plan import Plan
from moebits.units import Choice

runner = CliRunner()


def _brute_force(loss, cost, budget, cost2, budget2):
    """The optimum by enumeration of every plan (an independent reference)."""
    U, C = loss.shape
    best, best_idx = np.inf, None
    for idx in itertools.product(range(C), repeat=U):
        r = np.arange(U), np.array(idx)
        if cost[r].sum() <= budget + 1e-9 and cost2[r].sum() <= budget2 + 1e-9 and loss[r].sum() < best:
            best, best_idx = loss[r].sum(), np.array(idx)
    return best, best_idx


@pytest.mark.parametrize("seed", range(4))
def test_ilp_with_an_activation_bits_constraint_finds_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    wbits, abits = [2, 3, 4, 8], [4, 5, 8]
    choices = [Choice(b, act_bits=a) for b in wbits for a in abits]
    U = 5
    shapes = [(32, 64)] * U
    freq = rng.uniform(0.1, 1.0, U)
    # loss falls with both weight and activation bits, unit sensitivities differ
    sens = rng.uniform(0.5, 2.0, (U, 2))
    loss = np.array([[s[0] * 4.0 ** -c.bits + s[1] * 4.0 ** -c.act_bits for c in choices] for s in sens]) * freq[:, None]
    cost = np.array([[c.storage_bits(*shapes[u]) for c in choices] for u in range(U)], float)
    budget = 4.25 * 32 * 64 * U
    act = ActBitsBudget.build(5.0, shapes, choices, freq)
    res = allocate(loss, cost, budget, solver="ilp", extra=[(act.cost, act.total)], mip_rel_gap=0)
    ref, _ = _brute_force(loss, cost, budget, act.cost, act.total)
    assert res.total_loss == pytest.approx(ref, rel=1e-9)
    assert act.average(res.choice_index) <= 5.0 + 1e-9
    assert act_bits_average([choices[j] for j in res.choice_index], shapes, freq) == pytest.approx(
        act.average(res.choice_index))
    # the constraint binds: without it the allocator would take 8-bit activations everywhere
    free = allocate(loss, cost, budget, solver="ilp", mip_rel_gap=0)
    assert all(choices[j].act_bits == 8 for j in free.choice_index) and free.total_loss < res.total_loss


def test_second_constraint_is_refused_by_other_solvers_and_infeasible_act_budget_named():
    choices = [Choice(4, act_bits=a) for a in (4, 8)]
    loss, cost = np.ones((3, 2)), np.ones((3, 2))
    act = ActBitsBudget.build(6.0, [(8, 8)] * 3, choices, np.ones(3))
    with pytest.raises(ValueError, match="--solver ilp"):
        allocate(loss, cost, 3.0, solver="lagrangian", extra=[(act.cost, act.total)])
    with pytest.raises(ValueError, match="activation bits"):
        ActBitsBudget.build(3.0, [(8, 8)] * 3, choices, np.ones(3))


def test_act_bits_weighting_is_by_macs_per_token():
    """A hot unit at 8 bits and a cold one at 4 average closer to 8."""
    choices = [Choice(4, act_bits=4), Choice(4, act_bits=8)]
    avg = act_bits_average([choices[1], choices[0]], [(16, 16), (16, 16)], np.array([0.9, 0.1]))
    assert avg == pytest.approx(0.9 * 8 + 0.1 * 4)


def test_roofline_activation_bytes_and_integer_peaks():
    h100, a100 = GPUS["h100"], GPUS["a100"]
    assert compute_peak(h100, Choice(4, act_bits=4)) == h100.int8_ops  # Hopper has no int4 tensor path
    assert compute_peak(a100, Choice(4, act_bits=4)) == a100.int4_ops
    assert compute_peak(a100, Choice(4, act_bits=8)) == a100.int8_ops
    assert compute_peak(a100, Choice(4)) == a100.fp16_flops  # weight-only: fp16 GEMM after dequantization
    assert compute_peak(a100, Choice(16, act_bits=8)) == a100.fp16_flops
    shapes, freq = [(256, 512)], [1.0]
    choices = [Choice(4), Choice(4, act_bits=4)]
    p, moved, flops = expected_traffic(shapes, freq, choices, batch_tokens=100)
    m = 100.0
    w = choices[0].storage_bits(256, 512) / 8
    assert moved[0, 0] == pytest.approx(w + m * (2 * 512 + 2 * 256))
    assert moved[0, 1] == pytest.approx(w + m * (512 * 4 / 8 + 2 + 2 * 256))
    lat = latency_matrix(shapes, freq, choices, "a100", batch_tokens=65536)  # compute-bound: int4 is 4x faster
    assert lat[0, 1] < lat[0, 0]


def _quantize(out, text_file, extra):
    args = ["quantize", "--model", "tiny:qwen2_moe", "--calib", str(text_file), "--eval", str(text_file),
            "--nsamples", "4", "--seqlen", "64", "--eval-windows", "4", "--dtype", "float32", "--group-size", "32",
            "--out", str(out), *extra]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads((out / "results.json").read_text()), r.output


def test_uniform_w4a4_reloads_and_reproduces_its_perplexity(tmp_path, text_file):
    res, out = _quantize(tmp_path / "run", text_file, ["--wbits", "4", "--abits", "4", "--act-clip", "0.9"])
    plan = Plan.load(tmp_path / "run" / "plan.json")
    assert {a.choice.act_bits for a in plan.assignments.values()} == {4}
    assert res["avg_act_bits"] == pytest.approx(4.0) and "average activation bits" in out
    # the same weights without activation quantization: a different perplexity (the act quant is in effect)
    w4, _ = _quantize(tmp_path / "w4", text_file, ["--wbits", "4"])
    assert res["ppl_q"] != pytest.approx(w4["ppl_q"], rel=1e-6)
    cfg = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["quantization_config"]
    assert cfg["act_quant"]["clip"] == 0.9 and set(cfg["act_quant"]["units"].values()) == {4}
    r = runner.invoke(app, ["eval", "--run", str(tmp_path / "run"), "--tasks", "none"])
    assert r.exit_code == 0, r.output
    loaded = json.loads((tmp_path / "run" / "results.json").read_text())["ppl_loaded"]
    assert loaded["matches_ppl_q"] and f"{loaded['ppl']:.4g}" == f"{res['ppl_q']:.4g}"
    # AutoModelForCausalLM after `import moebits`: same logits as load_quantized
    import moebits  # noqa: F401
    from transformers import AutoModelForCausalLM

    from moebits.packed import load_quantized

    ids = torch.randint(0, 200, (1, 32), generator=torch.Generator().manual_seed(0))
    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "model"))
    b = load_quantized(tmp_path / "run" / "model")
    with torch.no_grad():
        la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
    assert torch.equal(la, lb)
    assert a.model.layers[0].mlp.experts.__dict__.get("moebits_input_transforms")


def test_mxmoe_joint_weight_activation_allocation(tmp_path, text_file):
    res, _ = _quantize(tmp_path / "run", text_file,
                       ["--method", "mxmoe", "--bits", "5", "--candidate-bits", "2,4,8", "--abits-set", "4,8"])
    plan = Plan.load(tmp_path / "run" / "plan.json")
    acts = {a.choice.act_bits for a in plan.assignments.values()}
    assert acts <= {4, 8} and len(acts) == 2  # both widths used: the act budget binds between them
    assert plan.meta["solver"] == "ilp" and plan.meta["budget"] == {"bits": 5.0, "act_bits": 5.0}
    assert plan.meta["avg_bits"] <= 5.0 + 1e-9 and plan.meta["avg_act_bits"] <= 5.0 + 1e-9
    assert res["avg_act_bits"] == pytest.approx(plan.meta["avg_act_bits"])
    r = runner.invoke(app, ["eval", "--run", str(tmp_path / "run"), "--tasks", "none"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "results.json").read_text())["ppl_loaded"]["matches_ppl_q"]
    # the report shows both budgets and both averages
    r = runner.invoke(app, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "5 bits + 5 activation bits" in md and f"/ A{res['avg_act_bits']:.2f}" in md
    # `moebits allocate` on the run's W-A table takes the same second budget
    r = runner.invoke(app, ["allocate", "--table", str(tmp_path / "run" / "table.csv"), "--model", "tiny:qwen2_moe",
                            "--bits", "5", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    p2 = Plan.load(tmp_path / "p.json")
    assert p2.meta["avg_act_bits"] <= 5.0 + 1e-9 and "activation bits" in r.output


def test_wa_options_are_checked(tmp_path, text_file):
    base = ["quantize", "--model", "tiny:qwen2_moe", "--out", str(tmp_path / "x")]
    cases = [(["--wbits", "4", "--abits", "4", "--abits-set", "4,8"], "give one of them"),
             (["--wbits", "4", "--abits", "12"], "activation bits"),
             (["--method", "fri", "--bits", "5", "--abits-set", "4,8", "--solver", "lagrangian"], "--solver ilp"),
             (["--wbits", "4", "--abits", "4", "--save-format", "dequantized"], "packed")]
    for extra, msg in cases:
        r = runner.invoke(app, base + extra + ["--calib", str(text_file), "--eval", str(text_file), "--nsamples", "2",
                                               "--seqlen", "32", "--eval-windows", "1"])
        assert r.exit_code != 0 and msg in r.output, (extra, r.output)


def test_integer_wa_kernel_computes_the_quantized_product_and_latency_fri_has_act_bits():
    from moebits.latency import FEATURES, KernelPoint, features, latency_fri_matrix, make_int_kernel

    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    fn = make_int_kernel(24, 64, 4, 8, seed=3)
    # independent reference: same seeded weights, fake-quantized x in float
    g = torch.Generator().manual_seed(3)
    w = (torch.randint(0, 16, (24, 64), generator=g, dtype=torch.int16) - 8).float()
    w_scale = torch.rand(24, generator=g) * 0.01 + 1e-3
    from moebits.quant.act import quantize_activations

    ref = (quantize_activations(x, 8) @ w.T) * w_scale
    torch.testing.assert_close(fn(x), ref, rtol=1e-4, atol=1e-5)
    assert fn(x[:3]).shape == (3, 24)  # tiny batches are padded for the int GEMM
    X = features([KernelPoint(8, 32, 64, 4, 4), KernelPoint(8, 32, 64, 4)])
    col = FEATURES.index("act_bits")
    assert X[0, col] == 4 and X[1, col] == 16 and X[0, FEATURES.index("log_bytes")] < X[1, FEATURES.index("log_bytes")]
    choices = [Choice(4, 32), Choice(4, 32, act_bits=8)]
    lat, info = latency_fri_matrix([(32, 64), (64, 32)], [0.5, 0.5], choices, batch_tokens=64, anchors=8, holdout=0,
                                   repeats=3, warmup=1, threads=1)
    assert lat.shape == (2, 2) and (lat > 0).all()
    assert {p.act_bits for p in info["points"]} == {16, 8}


def test_exports_refuse_wa_plans_with_the_reason(tmp_path):
    """compressed-tensors pack-quantized cannot carry activation quantization, a 16-bit dequantized export
    would drop it: both refuse, naming what to use instead."""
    pytest.importorskip("compressed_tensors")
    import sys
    from dataclasses import replace
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_export import quantized_checkpoint, servable_bits

    from moebits.export.compressed import ExportRefused, write_compressed_tensors
    from moebits.plan import Assignment

    dense, plan, codes, _, _ = quantized_checkpoint(tmp_path, servable_bits)
    wa = Plan({u: Assignment(replace(a.choice, act_bits=8)) for u, a in plan.assignments.items()})
    with pytest.raises(ExportRefused, match="activations"):
        write_compressed_tensors(dense, codes, wa, tmp_path / "ct")
    run = tmp_path / "run"
    _quantize(run, _text(tmp_path), ["--wbits", "4", "--abits", "8"])
    from moebits.export.run_export import export_run

    for fmt in ("dequantized", "compressed-tensors"):
        with pytest.raises(ExportRefused, match="activations"):
            export_run(run, fmt, tmp_path / fmt)


def _text(tmp_path):
    p = tmp_path / "text.txt"
    words = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
    g = torch.Generator().manual_seed(0)
    p.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (6000,), generator=g).tolist()))
    return p


def test_quarot_style_w4a4_rotated_reloads_and_reproduces_its_perplexity(tmp_path, text_file):
    """--rotate hadamard --wbits 4 --abits 4: the online Hadamard (stage 'rotate') and the activation
    quantization (stage 'act_quant') both come back when the packed model is loaded."""
    pytest.importorskip("moebits.rotate")
    res, _ = _quantize(tmp_path / "run", text_file, ["--quantizer", "gptq", "--rotate", "hadamard", "--wbits", "4",
                                                     "--abits", "4", "--act-clip", "0.9"])
    assert res["avg_act_bits"] == pytest.approx(4.0)
    r = runner.invoke(app, ["eval", "--run", str(tmp_path / "run"), "--tasks", "none"])
    assert r.exit_code == 0, r.output
    loaded = json.loads((tmp_path / "run" / "results.json").read_text())["ppl_loaded"]
    assert loaded["matches_ppl_q"] and f"{loaded['ppl']:.4g}" == f"{res['ppl_q']:.4g}"
