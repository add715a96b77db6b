"""The streaming path (moebits.job.streaming): a lazily opened model, layer-by-layer passes, the per-layer packed writer.

Checked against the in-memory path as the independent reference: identical calibration statistics,
tables, plans and perplexities on tiny models (pass 1 uses fp inputs in both); the streamed packed
output reloads with the logits of the in-memory model quantized *sequentially* (each MoE layer's GPTQ
Hessians collected on the model whose lower layers are already quantized) by the same plan; a run
stopped after layer k resumes at k+1 without recomputing layers; and the parameters materialised at
once never exceed one decoder layer plus the embeddings/head."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moebits.apply import apply_layer, apply_plan
from moebits.calibrate import calibrate
from moebits.data import calibration_windows
from moebits.models.adapter import MoEAdapter
from moebits.models.lazy import LazyModel, SafetensorsSource
from moebits.models.loading import byte_tokenizer, tiny_model
from moebits.packed import load_quantized, read_index, save_packed
from moebits.packed.incremental import PackedLayerWriter
from moebits.job import Pipeline, QuantizeConfig
from moebits.plan import Plan
from moebits.job.decide import decide_stream
from moebits.job.streaming import StreamingUnsupported, StreamPipeline
from moebits.job import decide as decide_mod
from moebits.table import SensitivityTable
from moebits.units import Choice

from conftest import ARCHS


def save_checkpoint(model, directory, shard="40KB"):
    """A sharded HF checkpoint (per-expert tensor names, as transformers saves them) with a tokenizer."""
    model.save_pretrained(directory, max_shard_size=shard)
    byte_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tiny_model("deepseek_v2"), tmp_path_factory.mktemp("ckpt") / "dsv2")


@pytest.fixture(scope="module")
def text(tmp_path_factory, text_file):
    """A short calibration/evaluation text (tokenizing the whole demo corpus byte by byte takes long)."""
    p = tmp_path_factory.mktemp("txt") / "short.txt"
    p.write_text(text_file.read_text()[:6000])
    return str(p)


TEXT: dict = {}


@pytest.fixture(autouse=True)
def _short_text(text):
    TEXT["path"] = text


def config(model, **kw):
    base = dict(model=str(model), method="fri", quantizer="rtn", bits=3.5, group_size=32, nsamples=8, seqlen=64,
                eval_windows=4, batch_size=4)
    base["calib"] = base["eval"] = TEXT["path"]
    base.update(sampler="stratified", proxy=False)  # FRI in one pass of measurements (adaptive rounds do not stream)
    return QuantizeConfig(**{**base, **kw})


@pytest.mark.parametrize("arch", ARCHS)
def test_lazy_model_loads_each_layer_as_saved(arch, tmp_path):
    """Per-expert checkpoint tensors (Mixtral's block_sparse_moe w1/w2/w3 included) fused as the model holds them."""
    model = tiny_model(arch)
    lazy = LazyModel(SafetensorsSource(save_checkpoint(model, tmp_path / arch)))
    want = model.state_dict()
    assert all(p.is_meta for n, p in lazy.model.named_parameters() if n.startswith("model.layers."))
    for layer in range(lazy.num_layers):
        with lazy.layer(layer):
            got = {n: p for n, p in lazy.model.named_parameters() if n.startswith(f"model.layers.{layer}.")}
            assert got and all(torch.equal(p, want[n]) for n, p in got.items())
        assert all(p.is_meta for n, p in lazy.model.named_parameters() if n.startswith(f"model.layers.{layer}."))
    for n, b in lazy.model.named_buffers():  # computed buffers (rotary frequencies) are real, not meta
        assert torch.equal(b, dict(model.named_buffers())[n]), n


@pytest.mark.parametrize("method,quantizer", [("fri", "rtn"), ("fri", "gptq"), ("bt", "rtn")])
def test_stream_gives_the_in_memory_statistics_table_and_plan(ckpt, tmp_path, method, quantizer):
    kw = dict(method=method, quantizer=quantizer)
    if method == "bt":
        kw.update(bits=None, memory_gb=6e-5, bits_set=(2,), ranks=(0, 4))
    mem = Pipeline(config(ckpt, **kw), tmp_path / "mem", progress=False).execute()
    st = StreamPipeline(config(ckpt, **kw), tmp_path / "stream", progress=False).execute()
    assert json.loads((tmp_path / "mem" / "stats.json").read_text()) == \
        json.loads((tmp_path / "stream" / "stats.json").read_text())
    t_mem = SensitivityTable.from_csv(tmp_path / "mem" / "table.csv")
    t_st = SensitivityTable.from_csv(tmp_path / "stream" / "table.csv")
    assert t_mem.units == t_st.units and t_mem.choices == t_st.choices
    assert np.array_equal(t_mem.measured, t_st.measured) and t_st.measured.any()
    assert np.array_equal(t_mem.error, t_st.error)
    p_mem, p_st = Plan.load(tmp_path / "mem" / "plan.json"), Plan.load(tmp_path / "stream" / "plan.json")
    assert p_mem.assignments == p_st.assignments
    assert st["ppl_fp"] == mem["ppl_fp"]
    if quantizer == "rtn":  # no Hessians: sequential quantization is the same quantization
        assert st["ppl_q"] == mem["ppl_q"]
    for k in ("model_bytes", "expert_bytes", "avg_bits", "model_avg_bits"):
        assert st[k] == mem[k], k
    assert not (tmp_path / "stream" / "stream").exists()  # work files are gone once the run is done


def sequential_reference(ckpt, plan: Plan, cfg: QuantizeConfig):
    """The in-memory model quantized by `plan` one MoE layer after the other, each layer's Hessians
    collected by a whole-model forward of the model whose lower layers are already quantized."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ad = MoEAdapter(model)
    windows = calibration_windows(byte_tokenizer(), cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed)
    codes = {}
    for layer in ad.moe_layers:
        cal = calibrate(ad, windows, cfg.batch_size, cfg.max_tokens_per_expert, cfg.seed, progress=False)
        apply_layer(ad, plan, layer, [u for u in plan.units if u.layer == layer], cal.inputs, cfg.act_order, codes)
    return model, ad, codes


def test_streamed_gptq_model_reloads_with_the_sequential_in_memory_logits(ckpt, tmp_path):
    cfg = config(ckpt, method="freq", quantizer="gptq")
    res = StreamPipeline(cfg, tmp_path / "run", progress=False).execute()
    plan = Plan.load(tmp_path / "run" / "plan.json")
    want_model, _, _ = sequential_reference(ckpt, plan, cfg)
    got_model = load_quantized(tmp_path / "run" / "model", dtype=torch.float32)
    assert type(got_model.model.layers[1].mlp.experts).__name__ == "PackedExperts"
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = want_model(input_ids=ids).logits, got_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # and it is not the one-shot (fp-Hessian) quantization: the sequential inputs changed something
    oneshot = Pipeline(cfg, tmp_path / "mem", progress=False).execute()
    assert res["ppl_q"] != oneshot["ppl_q"]


def test_layer_writer_writes_what_save_packed_writes(tmp_path):
    model = tiny_model("qwen2_moe")
    ad = MoEAdapter(model)
    plan = Plan.uniform(ad.units(), ad.shapes(), Choice(3, 32, "rtn"))
    codes = {}
    apply_plan(ad, plan, codes=codes, progress=False)
    save_packed(model, ad, plan, codes, tmp_path / "whole", byte_tokenizer())
    writer = PackedLayerWriter(tmp_path / "layered")
    for layer in range(len(ad.decoder_layers)):
        writer.write_layer(model, ad, plan, codes, layer)
    writer.write_rest(model, ad)
    writer.finish(model, ad, plan, list(range(len(ad.decoder_layers))), byte_tokenizer())
    writer.cleanup()
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "layered" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert read_index(tmp_path / "whole").to_dict() == read_index(tmp_path / "layered").to_dict()
    qa = json.loads((tmp_path / "whole" / "config.json").read_text())["quantization_config"]
    qb = json.loads((tmp_path / "layered" / "config.json").read_text())["quantization_config"]
    assert qa == qb
    with safe_open(str(tmp_path / "layered" / "model.safetensors"), "pt") as f:  # an ordinary safetensors file
        assert "moebits" in f.metadata()


class _Stop(Exception):
    pass


def _stop_after(pass_name, k):
    def hook(p, layer):
        if p == pass_name and layer == k:
            raise _Stop
    return hook


@pytest.fixture(scope="module")
def whole_gptq_run(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("whole") / "run"
    return d, StreamPipeline(config(ckpt, quantizer="gptq"), d, progress=False).execute()


@pytest.mark.parametrize("stage", ["pass1", "pass2"])
def test_a_stopped_run_resumes_at_the_next_layer(ckpt, tmp_path, stage, whole_gptq_run):
    cfg = config(ckpt, quantizer="gptq")
    first = StreamPipeline(cfg, tmp_path / "run", progress=False)
    first.on_layer = _stop_after(stage, 1)
    with pytest.raises(_Stop):
        first.execute()
    assert first.computed[stage] == [0, 1]
    again = StreamPipeline(cfg, tmp_path / "run", progress=False)
    res = again.execute()
    assert again.computed[stage] == [2]  # layers 0 and 1 are not computed again
    if stage == "pass2":
        assert again.computed["pass1"] == []
    whole_dir, whole = whole_gptq_run
    assert Plan.load(tmp_path / "run" / "plan.json").assignments == Plan.load(whole_dir / "plan.json").assignments
    assert res["ppl_q"] == whole["ppl_q"] and res["ppl_fp"] == whole["ppl_fp"]
    a, b = load_file(str(tmp_path / "run" / "model" / "model.safetensors")), load_file(str(whole_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_memory_holds_one_layer_at_a_time_however_deep(tmp_path):
    model = tiny_model("qwen3_moe", num_hidden_layers=12)
    ckpt = save_checkpoint(model, tmp_path / "deep")
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    seen = []
    pipe = StreamPipeline(config(ckpt), tmp_path / "run", progress=False)
    original = LazyModel.load_layer

    def spy(self, layer):
        fresh = self.loaded != layer
        original(self, layer)
        if fresh:
            seen.append(self.materialised())

    LazyModel.load_layer = spy
    try:
        pipe.execute()
    finally:
        LazyModel.load_layer = original
    lazy = pipe.lazy
    rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("model.layers."))
    layer_bytes = [lazy.layer_bytes(l) for l in range(12)]
    per_layer_tensors = len([n for n, _ in model.named_parameters() if n.startswith("model.layers.0.")])
    rest_tensors = len([n for n, _ in model.named_parameters() if not n.startswith("model.layers.")])
    assert len(seen) == 2 * 12  # every layer loaded once per pass
    assert all(m.bytes <= rest + max(layer_bytes) for m in seen)
    assert all(m.tensors <= rest_tensors + per_layer_tensors for m in seen)
    assert lazy.peak_materialised == rest + max(layer_bytes) < whole / 4
    assert pipe.results["stream"]["peak_materialised_bytes"] == lazy.peak_materialised


def test_decide_stream(ckpt, monkeypatch):
    assert decide_stream("tiny:qwen2_moe", torch.float32, "cpu", None).stream is False
    assert decide_stream(str(ckpt), torch.float32, "cpu", True).stream is True
    fits = decide_stream(str(ckpt), torch.float32, "cpu", None)
    assert fits.stream is False and fits.model_bytes == sum(p.numel() * 4 for p in tiny_model("deepseek_v2").parameters())
    monkeypatch.setattr(decide_mod, "available_bytes", lambda device="cpu": fits.model_bytes)
    d = decide_stream(str(ckpt), torch.float32, "cpu", None)
    assert d.stream is True and "more than" in d.reason


def test_unsupported_options_are_refused_before_any_work(ckpt, tmp_path):
    with pytest.raises(StreamingUnsupported, match="attn-bits"):
        StreamPipeline(config(ckpt, attn_bits=4), tmp_path / "a")
    with pytest.raises(StreamingUnsupported, match="metric layer"):
        StreamPipeline(config(ckpt, metric="layer"), tmp_path / "b")
    with pytest.raises(StreamingUnsupported, match="abits"):
        StreamPipeline(config(ckpt, abits=8), tmp_path / "c")
    with pytest.raises(StreamingUnsupported, match="adaptive"):
        StreamPipeline(config(ckpt, sampler="adaptive"), tmp_path / "e")
    with pytest.raises(StreamingUnsupported, match="rotate"):
        StreamPipeline(config(ckpt, rotate="hadamard"), tmp_path / "d")


def test_in_memory_tiny_source_streams(tmp_path):
    """In-memory sources (tiny:<arch>) go through the same interface; stats equal the in-memory run's."""
    cfg = config("tiny:olmoe", method="freq")
    a = Pipeline(cfg, tmp_path / "mem", progress=False).execute()
    b = StreamPipeline(cfg, tmp_path / "st", progress=False).execute()
    assert a["ppl_q"] == b["ppl_q"] and a["ppl_fp"] == b["ppl_fp"]
    assert json.loads((tmp_path / "mem" / "stats.json").read_text()) == json.loads((tmp_path / "st" / "stats.json").read_text())


def test_default_fri_command_streams_with_the_streamable_sampler(ckpt, tmp_path):
    """`moebits quantize --method fri` with FRI's defaults must not be refused on the models that need
    streaming: unset --sampler/--proxy fall back to stratified/no proxy (said on stderr, recorded in the
    run); set explicitly, the adaptive sampler is still refused with the reason."""
    from typer.testing import CliRunner

    from moebits.cli import app

    args = ["quantize", "--model", str(ckpt), "--method", "fri", "--bits", "3.5", "--group-size", "32",
            "--nsamples", "8", "--seqlen", "64", "--eval-windows", "4", "--calib", TEXT["path"], "--eval", TEXT["path"],
            "--stream"]
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "--sampler stratified --no-proxy" in r.output
    run_cfg = json.loads((tmp_path / "a" / "run.json").read_text())
    cfg = run_cfg.get("config", run_cfg)
    assert cfg["sampler"] == "stratified" and cfg["proxy"] is False
    r = CliRunner().invoke(app, args + ["--sampler", "adaptive", "--out", str(tmp_path / "b")])
    assert r.exit_code != 0 and "adaptive" in r.output


def test_calibration_inputs_count_in_the_stream_decision(ckpt, monkeypatch):
    """All routed tokens of every layer are kept in memory by the in-memory path: a model whose weights
    fit but whose calibration inputs do not streams. The estimate equals the bytes a real calibration keeps."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(ckpt))
    model = tiny_model("deepseek_v2")
    ad = MoEAdapter(model)
    win = calibration_windows(byte_tokenizer(), TEXT["path"], 4, 32, 0)
    cal = calibrate(ad, win, max_tokens_per_expert=None, progress=False)
    kept = sum(inp.x.numel() * 4 + (inp.h_in.numel() + inp.h_down.numel()) * 4 for inp in cal.inputs.values())
    assert decide_mod.calibration_bytes(cfg, win.numel()) == kept
    weights = decide_stream(str(ckpt), torch.float32, "cpu", None).model_bytes
    monkeypatch.setattr(decide_mod, "available_bytes", lambda device="cpu": int(weights / decide_mod.FIT_MARGIN) + 1)
    assert decide_stream(str(ckpt), torch.float32, "cpu", None).stream is False
    d = decide_stream(str(ckpt), torch.float32, "cpu", None, calib_tokens=win.numel())
    assert d.stream is True and "calibration inputs" in d.reason
