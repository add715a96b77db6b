import json

import numpy as np
import pytest
from typer.testing import CliRunner

from moebits.cli import app
from moebits.plan import Plan
from moebits.table import SensitivityTable

runner = CliRunner()


def test_info_json_on_a_tiny_model(text_file):
    r = runner.invoke(app, ["info", "--model", "tiny:deepseek_v3", "--json", "--calib", str(text_file),
                            "--nsamples", "2", "--seqlen", "32"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["model_type"] == "deepseek_v3" and d["num_layers"] == 3 and d["num_moe_layers"] == 2
    assert d["num_routed_experts"] == 8 and d["num_shared_experts"] == 1 and d["top_k"] == 2
    assert d["num_units"] == 2 * 9 * 3 and d["params"] > 0 and d["vocab_size"] == 260
    assert len(d["routing"]["layers"]) == 2


def test_quantize_end_to_end_and_clear_errors(tmp_path, text_file):
    args = ["quantize", "--model", "tiny:mixtral", "--method", "mxmoe", "--quantizer", "gptq", "--bits", "3.5",
            "--group-size", "32", "--calib", str(text_file), "--eval", str(text_file), "--nsamples", "4",
            "--seqlen", "64", "--eval-windows", "4", "--out", str(tmp_path / "run")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["method"] == "mxmoe" and res["avg_bits"] <= 3.5 + 1e-9 and res["profile_seconds"] > 0
    assert (tmp_path / "run" / "table.csv").read_text().startswith("layer,expert,kind,bits,group_size,quantizer")
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    # the table is a real measurement (more bits, less error) and the plan is the table's optimum
    t = SensitivityTable.from_csv(tmp_path / "run" / "table.csv")
    assert t.complete and t.measured.all() and np.all(t.error > 0)
    assert [c.bits for c in t.choices] == [2, 3, 4, 8] and np.all(t.error[:, 3] < t.error[:, 0])
    plan = Plan.load(tmp_path / "run" / "plan.json")
    idx = np.array([t.choices.index(plan.choice(u)) for u in t.units])
    objective = t.loss[np.arange(len(idx)), idx].sum()
    assert objective == pytest.approx(plan.meta["total_loss"], rel=1e-9)
    # 3-bit g32 costs 4 bits per weight, so every unit fits at 2 bits (3.0): the ILP must spend the rest
    assert res["avg_bits"] > 3.0 and objective < t.loss[:, 0].sum()

    r = runner.invoke(app, args[:-1] + [str(tmp_path / "run")] + ["--seed", "1"])
    assert r.exit_code == 2 and "different run" in r.output and "--overwrite" in r.output
    r = runner.invoke(app, ["quantize", "--model", str(tmp_path / "missing"), "--bits", "3", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not found" in r.output
    r = runner.invoke(app, ["quantize", "--model", "tiny:mixtral", "--bits", "3.25", "--calib", str(tmp_path / "no.txt"),
                            "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "no.txt" in r.output
    r = runner.invoke(app, ["quantize", "--model", "tiny:mixtral", "--bits", "1.5", "--group-size", "32",
                            "--calib", str(text_file), "--eval", str(text_file), "--nsamples", "2", "--seqlen", "32",
                            "--out", str(tmp_path / "z")])
    assert r.exit_code == 2 and "feasible" in r.output


def test_profile_then_allocate(tmp_path, text_file):
    r = runner.invoke(app, ["profile", "--model", "tiny:qwen3_moe", "--bits", "2,4", "--group-size", "32",
                            "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    header = (tmp_path / "p" / "table.csv").read_text().splitlines()[0]
    assert header.startswith("layer,expert,kind,bits,group_size,quantizer,error,frequency,seconds,measured")
    for solver in ("ilp", "lagrangian"):
        r = runner.invoke(app, ["allocate", "--table", str(tmp_path / "p" / "table.csv"), "--model", "tiny:qwen3_moe",
                                "--bits", "3.5", "--solver", solver, "--out", str(tmp_path / f"{solver}.json")])
        assert r.exit_code == 0, r.output
    from moebits.plan import Plan

    ilp, lag = Plan.load(tmp_path / "ilp.json"), Plan.load(tmp_path / "lagrangian.json")
    assert ilp.meta["avg_bits"] <= 3.5 + 1e-9 and lag.meta["avg_bits"] <= 3.5 + 1e-9
    assert {a.choice.bits for a in ilp.assignments.values()} == {2, 4}  # a real mix at 3.5 bits
    loss = lambda p: sum(a.loss for a in p.assignments.values())
    assert loss(ilp) <= loss(lag) * (1 + 1e-9)
    # --zero-points fp16: zeros charged 16 bits (packed, the default, charges the code width), so the same
    # budget buys no better a plan, and the plan says how it was costed
    r = runner.invoke(app, ["allocate", "--table", str(tmp_path / "p" / "table.csv"), "--model", "tiny:qwen3_moe",
                            "--bits", "3.5", "--zero-points", "fp16", "--out", str(tmp_path / "fp16.json")])
    assert r.exit_code == 0, r.output
    fp16 = Plan.load(tmp_path / "fp16.json")
    assert ilp.zero_points == "packed" and fp16.zero_points == "fp16" and fp16.meta["avg_bits"] <= 3.5 + 1e-9
    assert loss(ilp) <= loss(fp16) * (1 + 1e-9)
    r = runner.invoke(app, ["allocate", "--table", str(tmp_path / "p" / "table.csv"), "--model", "tiny:qwen3_moe",
                            "--bits", "3.5", "--zero-points", "int4", "--out", str(tmp_path / "bad.json")])
    assert r.exit_code == 2 and "zero_points" in r.output
    r = runner.invoke(app, ["allocate", "--table", str(tmp_path / "p" / "table.csv"), "--model", "tiny:qwen3_moe",
                            "--bits", "1.0", "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "feasible" in r.output


def test_quantize_flags_for_window_lengths_holdout_and_token_cap(tmp_path, text_file):
    args = ["quantize", "--model", "tiny:mixtral", "--method", "mxmoe", "--quantizer", "gptq", "--bits", "3.5",
            "--group-size", "32", "--calib", str(text_file), "--eval", str(text_file), "--nsamples", "4",
            "--calib-seqlen", "32", "--eval-seqlen", "48", "--eval-windows", "3", "--holdout", "0.25",
            "--max-tokens-per-expert", "16", "--no-save-model", "--out", str(tmp_path / "run")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    spec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (spec["calib_seqlen"], spec["eval_seqlen"], spec["holdout"], spec["max_tokens_per_expert"]) == (32, 48, 0.25, 16)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["eval_tokens"] == 3 * 47
    r = runner.invoke(app, args[:-2] + ["--metric", "layer", "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "use --metric" in " ".join(r.output.split())
