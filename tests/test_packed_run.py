"""A run's model/ is packed by default: `moebits eval --run` loads it (not re-quantizing) and gets the
run's ppl_q; results report the packed sizes, which the loaded model's resident bytes match;
`moebits info --model RUN/model` shows the histogram and sizes."""
import json

import pytest
import torch
from typer.testing import CliRunner

from moebits.cli import app
from moebits.packed import describe_packed, load_quantized, resident_bytes
from moebits.plan import Plan

runner = CliRunner()


def _quantize(out, text_file, model="tiny:qwen2_moe", dtype="float32", extra=()):
    args = ["quantize", "--model", model, "--calib", str(text_file), "--eval", str(text_file), "--nsamples", "4",
            "--seqlen", "64", "--eval-windows", "4", "--dtype", dtype, "--out", str(out), *extra]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads((out / "results.json").read_text())


def _eval_run(run):
    r = runner.invoke(app, ["eval", "--run", str(run), "--tasks", "none"])
    assert r.exit_code == 0, r.output
    assert "loaded" in r.output and "not re-quantized" in r.output
    return json.loads((run / "results.json").read_text())["ppl_loaded"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eval_run_loads_the_packed_model_and_reproduces_ppl_q(tmp_path, text_file, dtype):
    res = _quantize(tmp_path / "run", text_file, dtype=dtype,
                    extra=["--method", "mxmoe", "--quantizer", "gptq", "--bits", "3.5", "--group-size", "32"])
    assert res["model_format"] == "packed"
    plan = Plan.load(tmp_path / "run" / "plan.json")
    assert len(plan.bits_histogram()) > 1  # a mixed plan
    ppl = _eval_run(tmp_path / "run")
    assert f"{ppl['ppl']:.4g}" == f"{res['ppl_q']:.4g}" and ppl["matches_ppl_q"]
    # resident bytes of the loaded model (in the dtype it was stored in) match the reported sizes
    m = load_quantized(tmp_path / "run" / "model")
    assert abs(resident_bytes(m) / res["model_bytes"] - 1) < 0.02
    assert res["expert_bytes"] == plan.storage_bits({u: (a, b) for u, (a, b) in _shapes(m, plan).items()}) / 8


def _shapes(model, plan):
    """Unit shapes of the tiny model, read back from the loaded packed modules."""
    out = {}
    for u in plan.units:
        mlp = model.model.layers[u.layer].mlp
        if u.is_shared:
            lin = getattr(mlp.shared_expert, f"{u.kind}_proj")
            out[u] = (lin.out_features, lin.in_features)
        else:
            h, i = mlp.experts.hidden, mlp.experts.intermediate
            out[u] = (h, i) if u.kind == "down" else (i, h)
    return out


def test_info_on_a_packed_model_and_the_dequantized_option(tmp_path, text_file):
    res = _quantize(tmp_path / "run", text_file, extra=["--bits", "4.75", "--quantizer", "rtn"])
    r = runner.invoke(app, ["info", "--model", str(tmp_path / "run" / "model"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout[r.stdout.index("{"):])
    assert d["bits_histogram"] == {"w4g128-rtn": 81} and d["model_bytes"] == res["model_bytes"]
    assert d["expert_bytes"] == res["expert_bytes"] < d["fp16_bytes"]
    # today's 16-bit output stays available; the sizes reported are still the packed format's
    res16 = _quantize(tmp_path / "run16", text_file, extra=["--bits", "4.75", "--quantizer", "rtn",
                                                           "--save-format", "dequantized"])
    assert res16["model_format"] == "dequantized" and res16["model_bytes"] == res["model_bytes"]
    ppl = _eval_run(tmp_path / "run16")
    assert ppl["ppl"] == pytest.approx(res16["ppl_q"], rel=1e-2)  # fp16-rounded non-unit weights
    r = runner.invoke(app, ["quantize", "--model", str(tmp_path / "run" / "model"), "--bits", "3",
                            "--out", str(tmp_path / "again")])
    assert r.exit_code == 2 and "already quantized" in r.output
    r = runner.invoke(app, ["quantize", "--model", "tiny:mixtral", "--bits", "3", "--save-format", "gguf",
                            "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "save format" in r.output


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_demo_run_eval_equals_ppl_q(tmp_path, dtype):
    """The demo MoE (6 layers x 32 experts), W3.25 RTN, a few windows of its held-out text."""
    args = ["quantize", "--model", "demo", "--bits", "3.25", "--nsamples", "4", "--seqlen", "128",
            "--eval-windows", "6", "--dtype", dtype, "--out", str(tmp_path / "run")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    ppl = _eval_run(tmp_path / "run")
    assert f"{ppl['ppl']:.4g}" == f"{res['ppl_q']:.4g}", (ppl, res["ppl_q"])
    d = describe_packed(tmp_path / "run" / "model", load=False)
    assert d["model_bytes"] == res["model_bytes"] and d["fp16_bytes"] > 3 * d["expert_bytes"]
