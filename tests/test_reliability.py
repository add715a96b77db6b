"""Issue 22: nothing lost, nothing silently wrong. Each test reproduces one case of the issue (they fail on
the code before it: see docs/reliability.md)."""
import json
import shutil

import pytest
from typer.testing import CliRunner

from moebits.cli import app

runner = CliRunner()


def quantize_args(text_file, out, *extra):
    return ["quantize", "--model", "tiny:qwen2_moe", "--method", "uniform", "--quantizer", "rtn", "--bits", "4.5",
            "--group-size", "32", "--calib", str(text_file), "--eval", str(text_file), "--nsamples", "2",
            "--seqlen", "32", "--eval-windows", "2", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text_file):
    """A finished run (packed model) of the tiny Qwen2-MoE; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("rel") / "run"
    r = runner.invoke(app, quantize_args(text_file, out))
    assert r.exit_code == 0, r.output
    return out


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
    assert str(w) in r.output.replace("\n", "")
    assert snapshot(w) == before  # nothing deleted, nothing added


def test_export_refuses_a_directory_it_did_not_write_and_replaces_its_own(tmp_path, run_dir):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    r = runner.invoke(app, ["export", str(run_dir), "--format", "dequantized", "--out", str(user)])
    assert r.exit_code == 2 and "not written by moebits" in r.output.replace("\n", " ")
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
    assert r.exit_code == 2 and "existing file" in r.output and f.read_bytes() == b"x"


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
        assert "not a moebits run" in r.output and "--overwrite" not in r.output
        assert sorted(p.name for p in d.iterdir()) == ["a.jpg"]


def test_quantize_overwrite_of_a_run_removes_only_the_runs_artefacts(tmp_path, run_dir, text_file):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "my_notes.txt").write_text("keep\n")
    r = runner.invoke(app, quantize_args(text_file, run, "--seed", "1"))
    assert r.exit_code == 2 and "different run" in r.output and "--overwrite" in r.output
    r = runner.invoke(app, quantize_args(text_file, run, "--seed", "1", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert (run / "my_notes.txt").read_text() == "keep\n"
    assert json.loads((run / "run.json").read_text())["seed"] == 1


def test_quantize_out_an_existing_file_is_refused(tmp_path, text_file):
    f = tmp_path / "out.txt"
    f.write_text("data\n")
    for extra in ((), ("--overwrite",)):
        r = runner.invoke(app, quantize_args(text_file, f, *extra))
        assert r.exit_code == 2 and "existing file" in r.output and "Traceback" not in r.output
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
