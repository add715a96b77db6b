"""`--target llamacpp`: GGUF tensors as decision units, exact file sizes, errors measured on ggml's quantization."""
import numpy as np
import pytest
import torch

from moebits.gguf import ggml

pytestmark = pytest.mark.skipif(not ggml.available(), reason="llama.cpp's ggml (moebits[gguf]) is not installed")

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]


@pytest.fixture(scope="module")
def demo():
    """The demo model, a small calibration (6 windows x 64 tokens) and its importance matrix."""
    from moebits.calibrate import calibrate
    from moebits.data import calibration_windows
    from moebits.gguf.imatrix import collect_imatrix
    from moebits.gguf.tensors import layout
    from moebits.models import load_model

    model, tok, ad = load_model("demo", "float32", "cpu", False, seed=0)
    win = calibration_windows(tok, "demo", 6, 64, 0)
    cal = calibrate(ad, win, progress=False)
    lay = layout(ad)
    im = collect_imatrix(model, win, 8, ad)
    imatrix = {t.name: im.for_tensor(t.name) for t in lay.allocated}
    return model, ad, win, cal, lay, imatrix


def test_layout_units_and_exact_bytes(demo):
    from moebits.gguf.target import cost_matrix
    from moebits.gguf.tensors import effective_type

    model, ad, _, _, lay, _ = demo
    # every parameter in exactly one tensor, except the demo's tied embedding: llama.cpp's qwen2moe needs an
    # output matrix, so the file holds it twice (token_embd and output.weight, convert.py)
    copies = sum(t.n_elements for t in lay.tensors if t.name == "output.weight" and t.source == "model.embed_tokens.weight")
    assert copies == model.model.embed_tokens.weight.numel()
    assert lay.n_elements == sum(p.numel() for p in model.parameters()) + copies
    units = [u for t in lay.allocated for u in t.units]
    assert sorted(units, key=lambda u: u.sort_key()) == sorted(ad.units(), key=lambda u: u.sort_key())
    assert len(units) == len(set(units))
    # the fused-tensor rule by construction: each layer's experts of a kind are one decision unit (one row)
    tensors, effective, cost = cost_matrix(lay, TYPES)
    exps = [t for t in tensors if t.role == "experts"]
    assert len(exps) == 3 * len(ad.moe_layers) and all(len(t.units) == ad.num_experts for t in exps)
    assert {t.role for t in tensors} == {"experts", "shared", "attention"}
    # the demo's rows are 128 wide: no K-quant fits (QK_K = 256), llama.cpp's fallback types are stored
    assert all(t.cols == 128 for t in tensors)
    assert effective[0] == ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q8_0"]
    assert effective_type("Q4_K", 256) == "Q4_K"
    # exact bytes: ggml's row size x rows, e.g. Q5_0 stores 32 values in 22 bytes
    t = exps[0]
    assert cost[0].tolist() == [tensors[0].rows * ggml.row_bytes(e, 128) for e in effective[0]]
    assert t.nbytes("Q4_K") == ad.num_experts * 128 * (128 // 32) * 22
    # fixed tensors: the output matrix Q8_0 (Q6_K's fallback: rows not a multiple of 256), the embedding at
    # the mix's base type (Q4_K -> Q5_0), as llama-quantize treats a file with both
    stock = lay.stock_types()
    assert not lay.tied_embeddings and stock["output.weight"] == "Q8_0" and stock["token_embd.weight"] == "Q5_0"
    assert all(stock[t.name] == "F32" for t in lay.tensors if t.role == "fixed")


def _synthetic_table(lay, seed=0):
    """Real costs of the demo's tensors, losses decreasing in bytes (random per tensor)."""
    from moebits.gguf.target import TensorTable, cost_matrix

    tensors, effective, cost = cost_matrix(lay, TYPES)
    rng = np.random.default_rng(seed)
    scale = rng.lognormal(0, 1.5, size=(len(tensors), 1))
    loss = scale * np.exp(-1.4 * cost / cost[:, :1]) * rng.uniform(0.8, 1.2, size=(len(tensors), 1))
    return TensorTable([t.name for t in tensors], TYPES, effective, loss, cost, np.ones(cost.shape))


@pytest.mark.parametrize("bpw", [4.8, 5.5, 6.5])
def test_budget_binds(demo, bpw):
    """The plan fits the whole-file budget, and every upgrade of one tensor to a type of lower loss would not."""
    from moebits.gguf.target import allocate_tensors, file_budget

    lay = demo[4]
    table = _synthetic_table(lay)
    plan = allocate_tensors(lay, table, file_budget(bpw, None))
    assert plan.bpw <= bpw
    assert plan.file_bytes == lay.file_bytes(plan.types)
    col = {n: table.effective[i].index(plan.types[n]) for i, n in enumerate(table.names)}
    for i, n in enumerate(table.names):
        j = col[n]
        better = [k for k in range(len(TYPES)) if table.loss[i, k] < table.loss[i, j] - 1e-15]
        for k in better:
            extra = table.cost[i, k] - table.cost[i, j]
            assert 8 * (plan.file_bytes + extra) / plan.n_elements > bpw, (n, TYPES[k])
    assert plan.meta["optimal"]


def test_size_budget_and_infeasible_refused_with_range(demo):
    from moebits.allocate import InfeasibleBudgetError
    from moebits.gguf.target import allocate_tensors, file_budget

    lay = demo[4]
    table = _synthetic_table(lay)
    plan = allocate_tensors(lay, table, file_budget(None, 0.0065))
    assert plan.file_bytes <= 0.0065e9
    with pytest.raises(InfeasibleBudgetError, match=r"feasible: 4\.\d+ bpw – 8\.\d+ bpw") as e:
        allocate_tensors(lay, table, file_budget(3.0, None))
    assert "asked 3.0000 bpw" in str(e.value)
    with pytest.raises(ValueError, match="one budget"):
        file_budget(4.0, 1.0)


def test_pipeline_refuses_infeasible_budget_before_calibrating(tmp_path):
    from moebits.allocate import InfeasibleBudgetError
    from moebits.job import Pipeline, QuantizeConfig

    cfg = QuantizeConfig(method="mxmoe", target="llamacpp", bpw=2.5, nsamples=2)
    with pytest.raises(InfeasibleBudgetError, match="feasible"):
        Pipeline(cfg, tmp_path / "run", progress=False).execute()
    assert not (tmp_path / "run" / "stats.json").exists()
    with pytest.raises(ValueError, match="--bpw"):
        Pipeline(QuantizeConfig(method="mxmoe", target="llamacpp", bits=4.0), tmp_path / "r2", progress=False).execute()


def test_fused_tensor_error_equals_independent_computation(demo):
    """A fused tensor's loss = sum_e f_e * ||g (down(silu(gate x) * up x) - same with ggml's weights)||^2 / n_e,
    the weights quantized by ggml's C quantizer with each expert's importance row and dequantized by ggml."""
    from moebits.gguf.target import cost_matrix, tensor_table, unit_error_table

    model, ad, _, cal, lay, imatrix = demo
    tensors, effective, cost = cost_matrix(lay, TYPES)
    layer = ad.moe_layers[1]
    pick = [i for i, t in enumerate(tensors) if t.layer == layer and t.role == "experts" and t.kind == "down"]
    sub, sub_eff = [tensors[i] for i in pick], [effective[i] for i in pick]
    inputs = cal.profile_inputs()
    units = [u for t in sub for u in t.units]
    freq = cal.stats.aligned(units).frequency
    table = tensor_table(sub, TYPES, sub_eff, cost[pick], unit_error_table(ad, sub, sub_eff, inputs, imatrix,
                                                                           frequency=freq), {})
    t = sub[0]
    exps = ad.experts(layer)
    inter = ad.intermediate
    for j, ty in enumerate(TYPES):
        want = 0.0
        for e, u in enumerate(t.units):
            w = exps.down_proj.data[e].float().numpy()
            q = ggml.quantize(w, sub_eff[0][j], imatrix[t.name][e])
            wq = torch.from_numpy(ggml.dequantize(q, sub_eff[0][j], w.shape))
            x, g = inputs[(layer, e)].x.float(), inputs[(layer, e)].g.double()
            gate, up = exps.gate_up_proj.data[e, :inter].float(), exps.gate_up_proj.data[e, inter:].float()
            h = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
            d = g[:, None] * ((h @ wq.T).double() - (h @ torch.from_numpy(w).T).double())
            want += cal.stats[u].frequency * float((d * d).sum()) / x.shape[0]
        assert table.loss[0, j] == pytest.approx(want, rel=1e-4), ty
    assert table.loss[0, 0] > table.loss[0, 2] > table.loss[0, 3] > table.loss[0, 4]  # Q4_0 > Q5_0 > Q5_1 > Q8_0


def test_attention_error_is_layer_output_change(demo):
    from moebits.gguf.target import cost_matrix, layer_tensor_errors
    from moebits.profile import _run_layer, capture_layer_io

    model, ad, win, _, lay, imatrix = demo
    tensors, effective, _ = cost_matrix(lay, TYPES)
    i = next(i for i, t in enumerate(tensors) if t.layer == 2 and t.name.endswith("attn_v.weight"))
    got = layer_tensor_errors(ad, [tensors[i]], [effective[i]], win, imatrix)[tensors[i].name]
    proj = ad.decoder_layers[2].self_attn.v_proj
    calls = capture_layer_io(ad, win, 2)
    ref = _run_layer(ad, 2, calls)
    w = proj.weight.data.clone()
    proj.weight.data.copy_(torch.from_numpy(ggml.dequantize(ggml.quantize(w.numpy(), "Q4_0", imatrix[tensors[i].name]),
                                                            "Q4_0", w.shape)))
    out = _run_layer(ad, 2, calls)
    proj.weight.data.copy_(w)
    want = sum(float(((o - r).double() ** 2).sum()) for o, r in zip(out, ref)) / win.numel()
    assert got["Q4_0"] == pytest.approx(want, rel=1e-6)
    assert got["Q4_0"] > got["Q5_0"] > got["Q8_0"] > 0


def test_fri_predicts_unmeasured_pairs(demo):
    """A rule budget of anchor experts measured, the rest predicted: measured entries kept, predictions
    finite and ranked like the measured truth."""
    from scipy.stats import spearmanr

    from moebits.gguf.target import cost_matrix, predict_unit_errors, unit_error_table
    from moebits.methods.fri.samplers import sample_anchors

    model, ad, _, cal, lay, imatrix = demo
    tensors, effective, _ = cost_matrix(lay, TYPES)
    keep = [i for i, t in enumerate(tensors) if t.layer < 3]  # three layers: cheap, still shallow/middle/deep
    tensors, effective = [tensors[i] for i in keep], [effective[i] for i in keep]
    inputs = cal.profile_inputs()
    units = [u for t in tensors if t.role in ("experts", "shared") for u in t.units]
    freq = cal.stats.aligned(units).frequency
    full = unit_error_table(ad, tensors, effective, inputs, imatrix, frequency=freq)
    anchors = sample_anchors(units, "stratified", rules=4 * 30, seed=0, bits_per_unit=4)
    part = unit_error_table(ad, tensors, effective, inputs, imatrix, units=anchors, frequency=freq)
    assert 0 < part.measured.sum() < part.measured.size
    pred = predict_unit_errors(part, cal.stats)
    assert np.isfinite(pred.error).all()
    m = part.measured
    np.testing.assert_array_equal(pred.error[m], full.error[m])
    rho = spearmanr(np.log(pred.error[~m]), np.log(full.error[~m])).statistic
    assert rho > 0.8, rho


@pytest.mark.parametrize("method", ["mxmoe", "fri"])
def test_quantize_then_export_writes_the_plan(tmp_path, text_file, method):
    """`quantize --target llamacpp` then `export --format gguf`: the file holds the plan's types, its tensor data
    is the plan's byte count (within the budget), and llama.cpp loads it."""
    import json

    import gguf
    from typer.testing import CliRunner

    from moebits.cli import app
    from moebits.gguf.llamacpp import load as load_llama, logits as llama_logits

    runner = CliRunner()
    run = tmp_path / "run"
    extra = ["--rules", "60", "--sampler", "stratified"] if method == "fri" else []
    r = runner.invoke(app, ["quantize", "--model", "tiny:qwen2_moe", "--method", method, "--target", "llamacpp",
                            "--bpw", "6.0", "--calib", str(text_file), "--eval", str(text_file), "--nsamples", "4",
                            "--seqlen", "32", "--eval-windows", "2", "--out", str(run), *extra])
    assert r.exit_code == 0, r.output
    plan = json.loads((run / "gguf_plan.json").read_text())
    res = json.loads((run / "results.json").read_text())
    assert plan["bpw"] <= 6.0 and res["gguf_bpw"] == plan["bpw"] and np.isfinite(res["ppl_q"])
    table = json.loads((run / "gguf_table.json").read_text())["tensors"]
    measured = [m for t in table.values() for m in t["measured"]]
    if method == "fri":  # a rule budget measured, the rest predicted
        assert 0 < res["rules"] <= res["rule_budget"] and min(measured) < 1
    else:
        assert min(measured) == 1.0
    out = tmp_path / "m.gguf"
    r = runner.invoke(app, ["export", str(run), "--format", "gguf", "--out", str(out)])
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(str(out))
    assert sum(int(t.n_bytes) for t in reader.tensors) == plan["file_bytes"]
    assert {t.name: t.tensor_type.name for t in reader.tensors} == plan["types"]
    assert np.isfinite(llama_logits(load_llama(out, n_ctx=32), [1, 2, 3, 4])).all()
    r = runner.invoke(app, ["quantize", "--model", "tiny:qwen2_moe", "--method", method, "--target", "llamacpp",
                            "--bpw", "4.0", "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                            "--out", str(tmp_path / "r2"), *extra])
    assert r.exit_code != 0 and "feasible" in r.output and "bpw" in r.output


def test_demo_run_perplexity_is_llama_cpps(tmp_path):
    """The run's ppl_q (moebits' evaluation of the model with every tensor as ggml stores it; the tied demo's
    output a separate copy at its own type, as in the file) = llama.cpp's perplexity of the exported GGUF."""
    import json

    from typer.testing import CliRunner

    from moebits.cli import app
    from moebits.data import load_text, tokenize
    from moebits.gguf.llamacpp import perplexity as llama_perplexity
    from moebits.models import load_model

    runner = CliRunner()
    run = tmp_path / "run"
    r = runner.invoke(app, ["quantize", "--method", "uniform", "--target", "llamacpp", "--bpw", "5.0",
                            "--nsamples", "2", "--seqlen", "64", "--eval-windows", "6", "--out", str(run)])
    assert r.exit_code == 0, r.output
    res = json.loads((run / "results.json").read_text())
    plan = json.loads((run / "gguf_plan.json").read_text())
    assert plan["types"]["output.weight"] == "Q8_0" and plan["types"]["token_embd.weight"] == "Q5_0"
    r = runner.invoke(app, ["export", str(run), "--format", "gguf", "--out", str(tmp_path / "d.gguf")])
    assert r.exit_code == 0, r.output
    _, tok, _ = load_model("demo", "auto", "cpu", False)
    ids = tokenize(tok, load_text("demo", "eval"))
    got = llama_perplexity(tmp_path / "d.gguf", ids, 64, 6, kv_cache="F32")["ppl"]
    assert abs(got / res["ppl_q"] - 1) < 0.005, (got, res["ppl_q"])
    assert res["ppl_q"] > res["ppl_fp"]
