"""`moebits quantize --workers N`: pass 1 of the streaming path as Ray tasks (moebits.job.ray_streaming).

The reference is the single-process streaming run (itself checked against the in-memory path in
test_stream.py): with 2 Ray workers the statistics, the table (every entry, bit for bit), the plan,
the perplexities and the packed model must be the same. One local Ray session serves the module."""
import json
import os
import re
import socket
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moebits.models.loading import byte_tokenizer, tiny_model
from moebits.job import QuantizeConfig
from moebits.plan import Plan
from moebits.job.ray_streaming import RayStreamPipeline, RayUnavailable
from moebits.job.streaming import StreamPipeline
from moebits.job import ray_streaming as ray_pass
from moebits.table import SensitivityTable


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    # Ray's own memory monitor kills tasks when the *host* is above 95 % memory, whoever uses it; on a
    # shared CI/dev machine that kills these 100 MB workers, so leave out-of-memory to the kernel here
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, text_file):
    d = tmp_path_factory.mktemp("ray")
    ckpt = d / "dsv2"
    tiny_model("deepseek_v2", num_hidden_layers=4).save_pretrained(ckpt, max_shard_size="40KB")
    byte_tokenizer().save_pretrained(ckpt)
    text = d / "short.txt"
    text.write_text(text_file.read_text()[:6000])
    return ckpt, str(text)


def config(ckpt, text, **kw):
    base = dict(model=str(ckpt), method="fri", quantizer="gptq", bits=3.5, group_size=32, nsamples=8, seqlen=64,
                eval_windows=4, batch_size=4, calib=text, eval=text,
                sampler="stratified", proxy=False)  # FRI in one pass of measurements (adaptive rounds do not stream)
    return QuantizeConfig(**{**base, **kw})


@pytest.fixture
def one_thread():
    """As each worker (worker_threads=1): the last bits of a CPU GEMM depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The single-process streaming run (1 thread)."""
    d = tmp_path_factory.mktemp("one") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return d, StreamPipeline(config(*setup), d, progress=False).execute()
    finally:
        torch.set_num_threads(threads)


def assert_same_run(a_dir, a, b_dir, b):
    assert json.loads((a_dir / "stats.json").read_text()) == json.loads((b_dir / "stats.json").read_text())
    ta, tb = SensitivityTable.from_csv(a_dir / "table.csv"), SensitivityTable.from_csv(b_dir / "table.csv")
    assert ta.units == tb.units and ta.choices == tb.choices
    assert np.array_equal(ta.measured, tb.measured) and tb.measured.any()
    assert np.array_equal(ta.error, tb.error)
    pa, pb = Plan.load(a_dir / "plan.json"), Plan.load(b_dir / "plan.json")
    assert pa.assignments == pb.assignments and len({str(pa.choice(u)) for u in pa.units}) > 1
    assert b["ppl_fp"] == a["ppl_fp"] and b["ppl_q"] == a["ppl_q"]
    ma, mb = load_file(str(a_dir / "model" / "model.safetensors")), load_file(str(b_dir / "model" / "model.safetensors"))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert not (b_dir / "stream").exists()


def test_two_ray_workers_give_the_single_process_table_and_plan(ray_session, setup, reference, tmp_path, one_thread):
    pipe = RayStreamPipeline(config(*setup), tmp_path / "two", workers=2, progress=False)
    two = pipe.execute()
    assert sorted(pipe.computed["pass1"]) == [0, 1, 2, 3] and two["stream"]["workers"] == 2
    assert_same_run(*reference, tmp_path / "two", two)


class _Stop(Exception):
    pass


def test_a_single_process_run_stopped_in_pass1_resumes_on_ray(ray_session, setup, reference, tmp_path, one_thread):
    first = StreamPipeline(config(*setup), tmp_path / "run", progress=False)

    def stop(pass_name, layer):
        if pass_name == "pass1" and layer == 1:
            raise _Stop

    first.on_layer = stop
    with pytest.raises(_Stop):
        first.execute()
    again = RayStreamPipeline(config(*setup), tmp_path / "run", workers=2, progress=False)
    res = again.execute()
    assert sorted(again.computed["pass1"]) == [2, 3]  # layers 0 and 1 are not profiled again
    assert_same_run(*reference, tmp_path / "run", res)


def test_missing_ray_names_the_extra(monkeypatch, setup, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RayUnavailable, match=re.escape("pip install 'moebits[ray]'")):
        RayStreamPipeline(config(*setup), tmp_path / "run", workers=2)
    assert not (tmp_path / "run").exists()  # refused before any work


def test_unreachable_or_malformed_address_fails_fast(setup, tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RayUnavailable, match="no Ray cluster answers at 127.0.0.1"):
        RayStreamPipeline(config(*setup), tmp_path / "a", ray_address=f"127.0.0.1:{port}")
    with pytest.raises(RayUnavailable, match="expected HOST:PORT"):
        ray_pass.check_reachable("headnode")


def test_cli_refuses_workers_with_no_stream_and_bad_counts(setup, tmp_path):
    from typer.testing import CliRunner

    from moebits.cli import app

    ckpt, text = setup
    args = ["quantize", "--model", str(ckpt), "--method", "freq", "--bits", "3.5", "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(app, args + ["--workers", "2", "--no-stream"])
    assert res.exit_code != 0 and "drop --no-stream" in res.output
    res = CliRunner().invoke(app, args + ["--workers", "0"])
    assert res.exit_code != 0 and "--workers must be at least 1" in res.output
    assert not (tmp_path / "r").exists()
