"""Property: whatever happens to a run directory or a packed checkpoint (truncated, a flipped byte, an
edited JSON field, a deleted file), moebits either refuses cleanly, naming the damaged file, or gives a
result identical to the undamaged one -- never exit 0 with a different model (issue 22).

Hypothesis draws the file and the damage; each example copies a small cached run of a tiny model. The
examples are few and deterministic (derandomized, no deadline) so the suite stays near a minute on 2 cores.
"""
import json
import shutil

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from moebits.cli import app  # noqa: E402

runner = CliRunner()
RUN_FILES = ["run.json", "cache.json", "stats.json", "calib_inputs.safetensors", "plan.json", "results.json",
             "model/model.safetensors", "model/config.json", "model/plan.json", "model/.moebits-output"]
MODEL_FILES = ["model.safetensors", "config.json", "plan.json", ".moebits-output", "tokenizer.json"]
SETTINGS = dict(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def args(text_file, out):
    return ["quantize", "--model", "tiny:qwen2_moe", "--method", "uniform", "--quantizer", "rtn", "--bits", "4.5",
            "--group-size", "32", "--calib", str(text_file), "--eval", str(text_file), "--nsamples", "2",
            "--seqlen", "32", "--eval-windows", "2", "--out", str(out)]


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("prop") / "run"
    r = runner.invoke(app, args(text_file, out))
    assert r.exit_code == 0, r.output
    return out


def model_outputs(model_dir):
    from moebits.packed import load_quantized

    m = load_quantized(model_dir)
    with torch.no_grad():
        return m(input_ids=torch.arange(24)[None] % 250).logits


# ---- damage ----------------------------------------------------------------------------------------
damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    st.tuples(st.just("flip"), st.floats(0.0, 0.999), st.integers(0, 7)),
    st.tuples(st.just("delete")),
    st.tuples(st.just("edit"), st.integers(0, 10 ** 6), st.sampled_from([0, 1, -1, 2.5, None, "x", True, 1e12, [] ])),
)


def apply_damage(f, d) -> bool:
    """Damage file `f` by `d`; False when the damage does not apply (nothing changed)."""
    if not f.exists():
        return False
    raw = f.read_bytes()
    if d[0] == "delete":
        f.unlink()
        return True
    if d[0] == "truncate":
        new = raw[: int(d[1] * len(raw))]
    elif d[0] == "flip":
        if not raw:
            return False
        b = bytearray(raw)
        b[int(d[1] * len(raw))] ^= 1 << d[2]
        new = bytes(b)
    else:  # edit one JSON field (a leaf of the object), as a person with an editor would
        try:
            obj = json.loads(raw)
        except ValueError:
            return False
        leaves = []

        def walk(o, path):
            if isinstance(o, dict):
                for k, v in o.items():
                    walk(v, path + [k])
            elif isinstance(o, list) and o:
                for i, v in enumerate(o[:3]):
                    walk(v, path + [i])
            else:
                leaves.append(path)

        walk(obj, [])
        if not leaves or not leaves[0]:
            return False
        path = leaves[d[1] % len(leaves)]
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        if parent[path[-1]] == d[2] and type(parent[path[-1]]) is type(d[2]):
            return False
        parent[path[-1]] = d[2]
        new = json.dumps(obj).encode()
    if new == raw:
        return False
    tmp = f.with_name(f.name + ".new")
    tmp.write_bytes(new)
    tmp.replace(f)
    return True


def assert_refused_naming(r, name):
    text = r.output.replace("\n", "")
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert name.split("/")[-1] in text, (name, r.output)


@settings(max_examples=8, **SETTINGS)
@given(name=st.sampled_from(RUN_FILES), d=damage)
def test_a_damaged_run_directory_resumes_identically_or_is_refused_by_name(tmp_path_factory, cached_run, text_file,
                                                                          name, d):
    run = tmp_path_factory.mktemp("case") / "run"
    shutil.copytree(cached_run, run)
    if not apply_damage(run / name, d):
        return
    want_results = json.loads((cached_run / "results.json").read_text())
    r = runner.invoke(app, args(text_file, run))
    if r.exit_code != 0:
        assert_refused_naming(r, name)
        return
    # exit 0: the result must be the undamaged run's
    got = json.loads((run / "results.json").read_text())
    for k in ("ppl_fp", "ppl_q", "avg_bits", "bits_histogram", "model_bytes"):
        assert got[k] == want_results[k], (name, d, k)
    assert json.loads((run / "plan.json").read_text())["units"] == json.loads((cached_run / "plan.json").read_text())["units"]
    try:
        logits = model_outputs(run / "model")
    except ValueError as e:  # the saved model is refused at load, by name
        assert name.split("/")[-1] in str(e), (name, str(e))
        return
    assert torch.equal(logits, model_outputs(cached_run / "model")), (name, d)


@settings(max_examples=20, **SETTINGS)
@given(name=st.sampled_from(MODEL_FILES), d=damage)
def test_a_damaged_packed_checkpoint_loads_identically_or_is_refused_by_name(tmp_path_factory, cached_run, name, d):
    model = tmp_path_factory.mktemp("case") / "model"
    shutil.copytree(cached_run / "model", model)
    if not apply_damage(model / name, d):
        return
    try:
        logits = model_outputs(model)
    except (ValueError, OSError) as e:
        assert name in str(e) or (name != "model.safetensors" and "config.json" in str(e)), (name, d, str(e))
        return
    assert torch.equal(logits, model_outputs(cached_run / "model")), (name, d)
