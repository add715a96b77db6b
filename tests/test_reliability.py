"""Issue 22: nothing lost, nothing silently wrong. Each test reproduces one case of the issue (they fail on
the code before it: see docs/reliability.md)."""
import json
import shutil

import pytest
from typer.testing import CliRunner

from moebits.cli import app

runner = CliRunner()


def said(r) -> str:
    """What the command printed, without the line breaks rich adds at the terminal width."""
    return r.output.replace("\n", "")


def quantize_args(text_file, out, *extra, method="uniform", bits="4.5"):
    return ["quantize", "--model", "tiny:qwen2_moe", "--method", method, "--quantizer", "rtn", "--bits", bits,
            "--group-size", "32", "--calib", str(text_file), "--eval", str(text_file), "--nsamples", "2",
            "--seqlen", "32", "--eval-windows", "2", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text_file):
    """A finished run (packed model) of the tiny Qwen2-MoE; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("rel") / "run"
    r = runner.invoke(app, quantize_args(text_file, out))
    assert r.exit_code == 0, r.output
    return out


def stored(f):
    """(metadata, {tensor name: bytes}) of a safetensors file (its header's key order is not fixed)."""
    from safetensors import safe_open

    with safe_open(str(f), "pt") as sf:
        return sf.metadata(), {k: sf.get_tensor(k).contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
                               for k in sf.keys()}


def snapshot(directory):
    """{relative path: bytes} of every file under `directory`."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---- 1. data loss --------------------------------------------------------------------------------------
def test_export_into_the_runs_parent_deletes_nothing(tmp_path, run_dir):
    """The issue's repro: `moebits export w/run --format dequantized --out w` deleted w/run and w/other.txt."""
    w = tmp_path / "w"
    w.mkdir()
    shutil.copytree(run_dir, w / "run")
    (w / "other.txt").write_text("keep\n")
    before = snapshot(w)
    r = runner.invoke(app, ["export", str(w / "run"), "--format", "dequantized", "--out", str(w)])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert str(w) in said(r)
    assert snapshot(w) == before  # nothing deleted, nothing added


def test_export_refuses_a_directory_it_did_not_write_and_replaces_its_own(tmp_path, run_dir):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    r = runner.invoke(app, ["export", str(run_dir), "--format", "dequantized", "--out", str(user)])
    assert r.exit_code == 2 and "not written by moebits" in said(r).replace("\n", " ")
    assert (user / "notes.txt").read_text() == "mine\n" and len(list(user.iterdir())) == 1
    # an export moebits wrote (marker file) is replaced by a second export; an empty directory is fine too
    out = tmp_path / "export"
    out.mkdir()
    for _ in range(2):
        r = runner.invoke(app, ["export", str(run_dir), "--format", "dequantized", "--out", str(out)])
        assert r.exit_code == 0, r.output
    assert (out / ".moebits-output").exists() and (out / "plan.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary sibling left behind
    # a file at --out is refused by name
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    r = runner.invoke(app, ["export", str(run_dir), "--format", "dequantized", "--out", str(f)])
    assert r.exit_code == 2 and "existing file" in said(r) and f.read_bytes() == b"x"


def test_export_of_a_run_into_itself_or_its_model_is_refused(tmp_path, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = snapshot(run)
    for out in (run, run / "model"):
        r = runner.invoke(app, ["export", str(run), "--format", "dequantized", "--out", str(out)])
        assert r.exit_code == 2 and "Traceback" not in r.output
    assert snapshot(run) == before


def test_quantize_overwrite_never_empties_a_directory_that_is_not_a_run(tmp_path, text_file):
    """The issue: `quantize --out DIR --overwrite` emptied a non-run DIR, and the refusal without
    --overwrite suggested --overwrite."""
    d = tmp_path / "photos"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"\xff\xd8data")
    for extra in ((), ("--overwrite",)):
        r = runner.invoke(app, quantize_args(text_file, d, *extra))
        assert r.exit_code == 2, r.output
        assert "not a moebits run" in said(r) and "--overwrite" not in said(r)
        assert sorted(p.name for p in d.iterdir()) == ["a.jpg"]


def test_quantize_overwrite_of_a_run_removes_only_the_runs_artefacts(tmp_path, run_dir, text_file):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "my_notes.txt").write_text("keep\n")
    r = runner.invoke(app, quantize_args(text_file, run, "--seed", "1"))
    assert r.exit_code == 2 and "different run" in said(r) and "--overwrite" in said(r)
    r = runner.invoke(app, quantize_args(text_file, run, "--seed", "1", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert (run / "my_notes.txt").read_text() == "keep\n"
    assert json.loads((run / "run.json").read_text())["seed"] == 1


def test_quantize_out_an_existing_file_is_refused(tmp_path, text_file):
    f = tmp_path / "out.txt"
    f.write_text("data\n")
    for extra in ((), ("--overwrite",)):
        r = runner.invoke(app, quantize_args(text_file, f, *extra))
        assert r.exit_code == 2 and "existing file" in said(r) and "Traceback" not in r.output
        assert f.read_text() == "data\n"


def test_atomic_dir_keeps_the_old_directory_when_the_write_fails(tmp_path):
    from moebits.atomic import RefusedPath, atomic_dir

    out = tmp_path / "out"
    with atomic_dir(out, "test") as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, "test") as tmp:
            (tmp / "a.txt").write_text("v2")
            raise RuntimeError("killed half way")
    assert (out / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the half-written sibling is gone
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "x").write_text("x")
    with pytest.raises(RefusedPath, match="theirs"):
        with atomic_dir(tmp_path / "theirs", "test"):
            pytest.fail("must refuse before any work")
    assert (tmp_path / "theirs" / "x").read_text() == "x"


def test_an_export_written_before_the_marker_is_still_recognised(tmp_path, run_dir):
    out = tmp_path / "old_export"
    r = runner.invoke(app, ["export", str(run_dir), "--format", "dequantized", "--out", str(out)])
    assert r.exit_code == 0, r.output
    (out / ".moebits-output").unlink()  # as written by an older moebits: config, weights, tokenizer, plan
    r = runner.invoke(app, ["export", str(run_dir), "--format", "dequantized", "--out", str(out)])
    assert r.exit_code == 0, r.output
    (out / ".moebits-output").unlink()
    (out / "thesis.tex").write_text("not ours")  # a foreign file: the directory is no longer provably ours
    r = runner.invoke(app, ["export", str(run_dir), "--format", "dequantized", "--out", str(out)])
    assert r.exit_code == 2 and (out / "thesis.tex").exists()


# ---- 2. silent wrong results ---------------------------------------------------------------------------
def copy_run(run_dir, tmp_path, name="run"):
    run = tmp_path / name
    shutil.copytree(run_dir, run)
    return run


def mxmoe_args(text_file, out, *extra):
    """A run whose plan mixes bit-widths (3.75 bits over candidates {2, 3, 4, 8})."""
    return quantize_args(text_file, out, *extra, method="mxmoe", bits="3.75")


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("rel") / "mixed"
    r = runner.invoke(app, mxmoe_args(text_file, out))
    assert r.exit_code == 0, r.output
    return out


def record_file(run, name):
    """Re-record `name` in the run's cache.json, as moebits does after writing it (the files changed here
    simulate what moebits itself would have left). A no-op for code without cache.json."""
    try:
        from moebits.job.rundir import record_file as record
    except ImportError:
        try:
            from moebits.run import record_file as record
        except ImportError:
            return
    record(run, name)


def interrupt_before_quantizing(run):
    """What a run killed after allocating leaves: no model, results without ppl_q/done."""
    shutil.rmtree(run / "model")
    res = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({k: v for k, v in res.items() if k in ("ppl_fp", "calibrate_seconds")}))
    record_file(run, "results.json")


def edit_plan(run, fn):
    """Change plan.json as a person would (and re-record it, so that only the plan check can object)."""
    d = json.loads((run / "plan.json").read_text())
    fn(d["units"])
    (run / "plan.json").write_text(json.dumps(d))
    record_file(run, "plan.json")


def test_a_resumed_plan_outside_the_candidates_is_refused(tmp_path, mixed_run, text_file):
    """The issue: one unit's bits set to 5 in plan.json (candidates {2,3,4,8}) -> exit 0, w5g128, avg bits over budget."""
    run = copy_run(mixed_run, tmp_path)
    interrupt_before_quantizing(run)
    edit_plan(run, lambda units: units[next(iter(units))].update(bits=5))
    r = runner.invoke(app, mxmoe_args(text_file, run))
    assert r.exit_code == 2 and "plan.json" in said(r) and "candidate" in said(r), r.output
    assert not (run / "model").exists()


def test_a_resumed_plan_over_the_budget_is_refused(tmp_path, mixed_run, text_file):
    run = copy_run(mixed_run, tmp_path)
    interrupt_before_quantizing(run)
    edit_plan(run, lambda units: [v.update(bits=8) for v in units.values()])  # valid choices, 9 bits average
    r = runner.invoke(app, mxmoe_args(text_file, run))
    assert r.exit_code == 2 and "plan.json" in said(r) and "budget" in said(r), r.output


def test_a_plan_edited_behind_moebits_back_is_refused_by_its_checksum(tmp_path, mixed_run, text_file):
    run = copy_run(mixed_run, tmp_path)
    interrupt_before_quantizing(run)
    d = json.loads((run / "plan.json").read_text())
    d["units"][next(iter(d["units"]))]["bits"] = 2
    (run / "plan.json").write_text(json.dumps(d))  # not re-recorded: the cache check refuses it
    r = runner.invoke(app, mxmoe_args(text_file, run))
    assert r.exit_code == 2 and "plan.json" in said(r) and "changed or damaged" in said(r), r.output


def tensor_span(f, name):
    """(absolute start, end) of tensor `name`'s bytes in the safetensors file `f`."""
    import struct

    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    info = json.loads(raw[8:8 + n])[name]
    return 8 + n + info["data_offsets"][0], 8 + n + info["data_offsets"][1]


def rewrite_metadata(f, fn):
    """Rewrite the safetensors header of `f` with `fn(metadata)` applied (tensor bytes unchanged)."""
    import struct

    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    fn(header["__metadata__"])
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    replace_file(f, struct.pack("<Q", len(new)) + new + raw[8 + n:])


def replace_file(f, data: bytes):
    """Write a new file in place of `f` (a new inode: a model still mapping the old one keeps its bytes)."""
    tmp = f.with_name(f.name + ".new")
    tmp.write_bytes(data)
    tmp.replace(f)


def attention_tensor(f):
    from safetensors import safe_open

    with safe_open(str(f), "pt") as sf:
        return next(k for k in sf.keys() if "self_attn.q_proj.weight" in k)


@pytest.mark.parametrize("damage", ["flip", "nan"])
def test_a_damaged_attention_weight_is_refused_on_load(tmp_path, run_dir, damage):
    """The issue: flipped bytes or a NaN in an attention weight loaded without a word."""
    from moebits.packed import PackedFormatError, load_quantized

    run = copy_run(run_dir, tmp_path)
    f = run / "model" / "model.safetensors"
    name = attention_tensor(f)
    start, _ = tensor_span(f, name)
    raw = bytearray(f.read_bytes())
    if damage == "flip":
        raw[start + 3] ^= 0x10
    else:  # a NaN in the stored dtype's bytes
        import torch
        from safetensors import safe_open

        with safe_open(str(f), "pt") as sf:
            dt = sf.get_slice(name).get_dtype()
        nan = torch.tensor([float("nan")], dtype={"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[dt])
        b = nan.view(torch.uint8).numpy().tobytes()
        raw[start:start + len(b)] = b
    replace_file(f, bytes(raw))
    with pytest.raises(PackedFormatError, match=name.replace(".", r"\.")):
        load_quantized(run / "model")
    r = runner.invoke(app, ["eval", "--run", str(run), "--tasks", "none"])
    assert r.exit_code != 0 and "model.safetensors" in said(r) and "Traceback" not in r.output


def test_swapped_unit_rows_in_the_index_are_refused(tmp_path, mixed_run):
    from moebits.packed import PackedFormatError, load_quantized

    run = copy_run(mixed_run, tmp_path)
    f = run / "model" / "model.safetensors"

    def swap(meta):
        index = json.loads(meta["moebits"])
        same_set = {}
        for name, e in index["units"].items():
            same_set.setdefault((e["module"], e["tensor"], e["set"], e["rows"]), []).append(name)
        a, b = next(v for v in same_set.values() if len(v) >= 2)[:2]
        index["units"][a]["row"], index["units"][b]["row"] = index["units"][b]["row"], index["units"][a]["row"]
        meta["moebits"] = json.dumps(index)

    rewrite_metadata(f, swap)
    with pytest.raises(PackedFormatError, match="changed after writing"):
        load_quantized(run / "model")


@pytest.mark.parametrize("field,value", [("hidden", 10 ** 12), ("num_experts", 10 ** 8), ("intermediate", -1)])
def test_index_sizes_are_bounded_by_the_stored_tensors(tmp_path, run_dir, field, value):
    """The issue: hidden=1e12 tried to allocate petabytes, num_experts=1e8 exhausted memory, `info`
    printed 4.6e19 MiB. Checked with the index digest removed too (a checkpoint of the old format)."""
    from moebits.packed import PackedFormatError, describe_packed, load_quantized

    run = copy_run(run_dir, tmp_path)
    f = run / "model" / "model.safetensors"

    def edit(meta):
        index = json.loads(meta["moebits"])
        next(m for m in index["modules"].values() if m["type"] == "experts")[field] = value
        meta["moebits"] = json.dumps(index)
        meta.pop("moebits_integrity", None), meta.pop("moebits_checksums", None)

    rewrite_metadata(f, edit)
    with pytest.raises(PackedFormatError, match="inconsistent with the stored tensors"):
        load_quantized(run / "model")
    with pytest.raises(PackedFormatError):
        describe_packed(run / "model")
    r = runner.invoke(app, ["info", "--model", str(run / "model")])
    assert r.exit_code == 2 and "inconsistent" in said(r)


def test_a_checkpoint_written_before_the_checksums_still_loads(tmp_path, run_dir):
    """Format-version-aware: a file without the new metadata keys loads (unit crcs checked as before)."""
    import torch

    from moebits.packed import load_quantized

    run = copy_run(run_dir, tmp_path)
    f = run / "model" / "model.safetensors"
    want = load_quantized(run / "model")
    rewrite_metadata(f, lambda meta: (meta.pop("moebits_integrity"), meta.pop("moebits_checksums")))
    got = load_quantized(run / "model")
    ids = torch.arange(20)[None]
    assert torch.equal(want(input_ids=ids).logits, got(input_ids=ids).logits)


def test_eval_run_exits_non_zero_when_the_saved_model_does_not_reproduce_ppl_q(tmp_path, run_dir):
    """The issue: `eval --run` printed DIFFERENT (or nan) and exited 0."""
    run = copy_run(run_dir, tmp_path)
    r = runner.invoke(app, ["eval", "--run", str(run), "--tasks", "none"])
    assert r.exit_code == 0 and "equal" in said(r), r.output
    res = json.loads((run / "results.json").read_text())
    res["ppl_q"] *= 1.5  # the recorded figure no longer describes the saved model
    (run / "results.json").write_text(json.dumps(res))
    r = runner.invoke(app, ["eval", "--run", str(run), "--tasks", "none"])
    assert r.exit_code == 1 and "does not reproduce" in said(r)


def test_a_nan_perplexity_of_the_saved_model_exits_non_zero(tmp_path, run_dir, monkeypatch):
    from moebits import cli, evaluate

    run = copy_run(run_dir, tmp_path)
    real = evaluate.perplexity

    def nan_ppl(*a, **k):
        r = real(*a, **k)
        r.ppl = float("nan")
        return r

    monkeypatch.setattr(evaluate, "perplexity", nan_ppl)
    r = runner.invoke(cli.app, ["eval", "--run", str(run), "--tasks", "none"])
    assert r.exit_code == 1 and "nan" in said(r) and "damaged" in said(r)


def test_editing_the_calibration_text_between_interruption_and_resume_is_noticed(tmp_path, text_file, mixed_run):
    """The issue: run.json records the text's path only; an edited text silently reused the old statistics."""
    text = tmp_path / "calib.txt"
    text.write_text(text_file.read_text())
    run = tmp_path / "run"
    args = mxmoe_args(text_file, run)
    args[args.index("--calib") + 1] = str(text)
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    interrupt_before_quantizing(run)
    text.write_text(text.read_text()[::-1])  # same path, different content
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "different calib" in said(r) and "--overwrite" in said(r), r.output
    r = runner.invoke(app, args + ["--overwrite"])
    assert r.exit_code == 0, r.output


def test_scaled_calibration_inputs_are_refused(tmp_path, mixed_run, text_file):
    """The issue: calib_inputs.safetensors x50 changed 36 units' bits, exit 0."""
    from safetensors.torch import load_file, save_file

    run = copy_run(mixed_run, tmp_path)
    for name in ("table.csv", "plan.json"):
        (run / name).unlink()
    interrupt_before_quantizing(run)
    p = run / "calib_inputs.safetensors"
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        meta = f.metadata()
    save_file({k: v * 50 for k, v in load_file(str(p)).items()}, str(p), metadata=meta)
    r = runner.invoke(app, mxmoe_args(text_file, run))
    assert r.exit_code == 2 and "calib_inputs.safetensors" in said(r) and "changed or damaged" in said(r), r.output


def test_a_done_run_whose_model_was_deleted_quantizes_again(tmp_path, run_dir, text_file):
    """The issue: a finished run whose model/ was deleted re-ran as "done" (and left no model)."""
    run = copy_run(run_dir, tmp_path)
    before = stored(run / "model" / "model.safetensors")
    ppl_q = json.loads((run / "results.json").read_text())["ppl_q"]
    shutil.rmtree(run / "model")
    r = runner.invoke(app, quantize_args(text_file, run))
    assert r.exit_code == 0, r.output
    assert stored(run / "model" / "model.safetensors") == before
    assert json.loads((run / "results.json").read_text())["ppl_q"] == ppl_q


def test_a_seqlen_beyond_the_models_positions_warns(tmp_path, text_file, caplog):
    """The issue: --seqlen 4096 on a model with 512 positions evaluated past its limit without a word."""
    from moebits.models import load_model

    model, _, _ = load_model("tiny:qwen2_moe")
    limit = model.config.max_position_embeddings
    r = runner.invoke(app, ["quantize", "--model", "tiny:qwen2_moe", "--bits", "4.5", "--group-size", "32",
                            "--calib", str(text_file), "--eval", str(text_file), "--nsamples", "1",
                            "--seqlen", str(limit * 2), "--eval-windows", "1", "--no-save-model",
                            "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert f"beyond the model's {limit} positions" in said(r)


# ---- 3. one-line answers instead of tracebacks ----------------------------------------------------------
def refused(r, *words):
    """A clean refusal: exit 2, one error naming `words`, no traceback."""
    text = said(r)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), r.output
    for w in words:
        assert w in text, (w, r.output)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from moebits.models import load_model

    d = tmp_path_factory.mktemp("rel") / "tiny_model"
    model, tok, _ = load_model("tiny:qwen2_moe")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_a_damaged_input_model_file_is_named(tmp_path, model_dir, text_file, damage):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    replace_file(f, raw[: len(raw) // 2] if damage == "truncated" else b"\x13\x37" * 64 + raw[128:])
    args = quantize_args(text_file, tmp_path / "run")
    args[args.index("--model") + 1] = str(d)
    refused(runner.invoke(app, args), "model.safetensors", "truncated or damaged")


@pytest.mark.parametrize("option,value", [("--nsamples", "0"), ("--nsamples", "-1"), ("--eval-windows", "0"),
                                          ("--group-size", "0"), ("--group-size", "-8"), ("--bits", "nan"),
                                          ("--bits", "inf"), ("--bits", "-3")])
def test_impossible_option_values_are_refused_before_any_work(tmp_path, text_file, option, value):
    args = quantize_args(text_file, tmp_path / "run")
    args[args.index(option) + 1] = value
    refused(runner.invoke(app, args), option)
    assert not (tmp_path / "run").exists()  # refused before the run directory is touched


def test_cuda_without_cuda_is_one_line(tmp_path, text_file):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(runner.invoke(app, quantize_args(text_file, tmp_path / "run", "--device", "cuda")), "CUDA is not available",
            "--device cpu")


def test_allocate_with_a_truncated_table_names_it(tmp_path):
    import numpy as np

    from moebits.models import load_model
    from moebits.table import SensitivityTable
    from moebits.units import Choice

    _, _, ad = load_model("tiny:qwen3_moe")
    choices = [Choice(b, 32) for b in (2, 4)]
    t = SensitivityTable(ad.units(), choices)
    rng = np.random.default_rng(0)
    for u in ad.units():
        for c in choices:
            t.set(u, c, float(rng.uniform(1, 2) / c.bits))
    t.frequency[:] = 0.5
    p = tmp_path / "table.csv"
    t.to_csv(p)
    text = p.read_text()
    for cut in (len(text) // 2, text.rindex("\n", 0, len(text) - 1) + 1):  # mid-row, and at a row boundary
        p.write_text(text[:cut])
        r = runner.invoke(app, ["allocate", "--table", str(p), "--model", "tiny:qwen3_moe", "--bits", "3.5",
                                "--out", str(tmp_path / "plan.json")])
        refused(r, "table.csv")
        assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("name", ["results.json", "calib_inputs.safetensors", "stats.json"])
def test_a_truncated_run_file_is_named(tmp_path, mixed_run, text_file, name):
    run = copy_run(mixed_run, tmp_path)
    for later in ("table.csv", "plan.json"):
        (run / later).unlink()
    interrupt_before_quantizing(run)
    f = run / name
    replace_file(f, f.read_bytes()[: f.stat().st_size // 2])
    refused(runner.invoke(app, mxmoe_args(text_file, run)), name)


def test_a_truncated_results_json_of_an_old_run_is_named(tmp_path, run_dir, text_file):
    """A run made before cache.json (nothing to compare the sha256 with): the JSON error still names the file."""
    run = copy_run(run_dir, tmp_path)
    (run / "cache.json").unlink()
    f = run / "results.json"
    replace_file(f, f.read_bytes()[:40])
    refused(runner.invoke(app, quantize_args(text_file, run)), "results.json")
    refused(runner.invoke(app, ["eval", "--run", str(run), "--tasks", "none"]), "results.json")


def test_a_refused_run_does_not_block_its_directory(tmp_path, text_file):
    out = tmp_path / "run"
    r = runner.invoke(app, quantize_args(text_file, out, "--bits", "1.5"))  # infeasible: refused after loading
    refused(r, "feasible")
    r = runner.invoke(app, quantize_args(text_file, out))  # the corrected command, no --overwrite needed
    assert r.exit_code == 0, r.output
