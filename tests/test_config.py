"""One declaration per option (job/config.py): the CLI, recipes and run.json's spec come from it; old run
directories resume through the spec's version number."""
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moebits.cli import app
from moebits.job import QuantizeConfig
from moebits.job.config import OWNER, PARTS, SPEC_VERSION, declared_options, read_recipe, upgrade_spec

runner = CliRunner()
V1_RUN = Path(__file__).parent / "data" / "run_v1_0746e4f"
V1_ARGS = ["quantize", "--model", "tiny:qwen2_moe", "--method", "mxmoe", "--quantizer", "rtn", "--bits", "3.5",
           "--group-size", "32", "--calib", "demo", "--eval", "demo", "--nsamples", "4", "--seqlen", "32",
           "--eval-windows", "2", "--no-save-model"]
# what that command meant then: zero points stored (and charged) in fp16, the default before run.json version 3
V1_MEANING = V1_ARGS + ["--zero-points", "fp16"]


def test_a_run_directory_made_before_versioned_specs_resumes_and_finishes_as_it_would_have(tmp_path):
    """tests/data/run_v1_0746e4f: made by moebits 0746e4f (run.json without a version), interrupted after
    profiling. The same command resumes it: the table is not re-measured, and the plan and perplexity are
    the ones that version produced when it finished."""
    run = tmp_path / "run"
    shutil.copytree(V1_RUN, run)
    table_before = (run / "table.csv").read_bytes()
    # the old run read at version 3 stored fp16 zeros; today's default (packed) is another request
    r = runner.invoke(app, V1_ARGS + ["--out", str(run)])
    assert r.exit_code == 2 and "zero_points: 'fp16' -> 'packed'" in " ".join(r.output.split())
    r = runner.invoke(app, V1_MEANING + ["--out", str(run)])
    assert r.exit_code == 0, r.output
    assert (run / "table.csv").read_bytes() == table_before  # resumed: not profiled again
    results = json.loads((run / "results.json").read_text())
    assert results["done"] and results["profile_seconds"] == 52.3315  # the old run's own measurement time
    plan, expected = (json.loads((d / n).read_text()) for d, n in ((run, "plan.json"), (V1_RUN, "expected_plan.json")))
    assert {u: {k: c[k] for k in ("bits", "group_size", "quantizer", "rank")} for u, c in plan["units"].items()} == \
        {u: {k: c[k] for k in ("bits", "group_size", "quantizer", "rank")} for u, c in expected["units"].items()}
    old = json.loads((V1_RUN / "expected_results.json").read_text())
    assert results["avg_bits"] == old["avg_bits"] and results["ppl_q"] == pytest.approx(old["ppl_q"], rel=1e-6)
    assert json.loads((run / "run.json").read_text())["version"] == SPEC_VERSION
    # a different request is still refused, naming what differs
    assert json.loads((run / "plan.json").read_text())["zero_points"] == "fp16"
    r = runner.invoke(app, [a if a != "3.5" else "3.0" for a in V1_MEANING] + ["--out", str(run)])
    assert r.exit_code == 2 and "bits: 3.5 -> 3.0" in " ".join(r.output.split())


def test_a_run_directory_of_an_unknown_version_is_refused_naming_it(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(V1_RUN, run)
    spec = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**spec, "version": 99}))
    r = runner.invoke(app, V1_ARGS + ["--out", str(run)])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "version 99" in out and f"1 to {SPEC_VERSION}" in out
    (run / "run.json").write_text(json.dumps({**spec, "frobnicate": 1}))
    r = runner.invoke(app, V1_ARGS + ["--out", str(run)])
    assert r.exit_code == 2 and "(version 1) has options this moebits does not know: ['frobnicate']" in " ".join(
        r.output.split())
    with pytest.raises(ValueError, match="version 99"):
        upgrade_spec({"version": 99})


def test_every_declared_option_is_a_flag_a_recipe_key_and_survives_the_spec():
    import typer

    command = typer.main.get_command(app).commands["quantize"]
    flags = {o: p for p in command.params for o in p.opts + p.secondary_opts}
    for part, f, _ in declared_options():
        flag = flags.get(f"--{f.name.replace('_', '-')}")
        assert flag is not None and flag.help == f.metadata["help"], f.name  # the declaration's help
        assert OWNER[f.name] == part and flag.rich_help_panel == PARTS[part][1]  # one help panel per part
    cfg = QuantizeConfig(model="tiny:mixtral", method="fri", quantizer="gptq", bits=3.25, rules=40, sampler="random",
                         predictor="fri", proxy=False, candidate_bits=(2, 4), calib_seqlen=32, eval_seqlen=48,
                         reward=(1.0, 0.5, 0.0, 0.0), abits_set=(4, 8), act_clip=0.9, tie_gate_up=True)
    spec = cfg.spec()
    assert spec["version"] == SPEC_VERSION and "save_model" not in spec and "stream" not in spec
    assert QuantizeConfig.from_spec(json.loads(json.dumps(spec))) == cfg


def test_each_part_checks_its_values_when_built():
    bad = {"holdout": (1.5, "--holdout"), "target": ("tpu", "--target"), "method": ("magic", "unknown method"),
           "sampler": ("lucky", "--sampler"), "reward": ("1,2", "--reward"), "rl_accuracy": ("vibes", "--rl-accuracy"),
           "act_clip": (0.0, "--act-clip"), "save_format": ("zip", "save format"), "workers": (0, "--workers"),
           "calib_seqlen": (1, "--calib-seqlen"), "ilp_nodes": (-1, "--ilp-nodes")}
    for name, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            QuantizeConfig(**{name: value})
    with pytest.raises(ValueError, match="--metric expert"):  # spans two parts
        QuantizeConfig(holdout=0.2, metric="layer")
    with pytest.raises(TypeError, match="unknown options"):
        QuantizeConfig(bitz=3)


def test_a_recipe_holds_the_same_options_flat_or_by_part(tmp_path, text_file):
    (tmp_path / "r.toml").write_text(f'model = "tiny:qwen2_moe"\n[budget]\nbits = 3.5\ngroup-size = 32\n'
                                     f'candidate_bits = "2,4"\n[data]\ncalib = "{text_file}"\neval = "{text_file}"\n'
                                     f'nsamples = 2\nseqlen = 32\neval_windows = 1\n[allocation]\nmethod = "freq"\n')
    (tmp_path / "r.yaml").write_text(f"model: tiny:qwen2_moe\nbits: 3.5\ngroup_size: 32\ncandidate_bits: [2, 4]\n"
                                     f"calib: {text_file}\neval: {text_file}\nnsamples: 2\nseqlen: 32\n"
                                     f"eval_windows: 1\nmethod: freq\n")
    assert read_recipe(tmp_path / "r.toml") == read_recipe(tmp_path / "r.yaml")
    with pytest.raises(ValueError, match=r"\[fri\] has no option 'bits' \(it belongs to \[budget\]\)"):
        (tmp_path / "bad.toml").write_text("[fri]\nbits = 3\n")
        read_recipe(tmp_path / "bad.toml")
    r = runner.invoke(app, ["quantize", "--recipe", str(tmp_path / "r.toml"), "--no-save-model",
                            "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    flags = ["quantize", "--model", "tiny:qwen2_moe", "--bits", "3.5", "--group-size", "32", "--candidate-bits", "2,4",
             "--calib", str(text_file), "--eval", str(text_file), "--nsamples", "2", "--seqlen", "32",
             "--eval-windows", "1", "--method", "freq", "--no-save-model"]
    r = runner.invoke(app, flags + ["--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    spec_a, spec_b = (json.loads((tmp_path / d / "run.json").read_text()) for d in "ab")
    assert spec_a == spec_b
    # a run's run.json is a recipe: the same request again, a command-line option wins over the file
    r = runner.invoke(app, ["quantize", "--config", str(tmp_path / "a" / "run.json"), "--bits", "3.0",
                            "--no-save-model", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c" / "run.json").read_text()) == {**spec_a, "bits": 3.0}
