import json

import pytest
import torch

from moebits.evaluate import perplexity
from moebits.models import load_model
from moebits.job import Pipeline, QuantizeConfig, candidate_choices
from moebits.plan import Plan, PlanError
from moebits.job.rundir import RunMismatchError


def test_perplexity_matches_a_direct_computation():
    model, tok, _ = load_model("tiny:olmoe")
    ids = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, ids, seqlen=100, batch_size=3, progress=False)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in range(10):
            x = ids[w * 100:(w + 1) * 100]
            logp = torch.log_softmax(model(input_ids=x[None]).logits[0].double(), -1)
            nll -= logp[torch.arange(99), x[1:]].sum().item()
            n += 99
    assert res.windows == 10 and res.tokens == n
    assert res.ppl == pytest.approx(float(torch.exp(torch.tensor(nll / n))), rel=1e-5)


def _cfg(text, **kw):
    base = dict(model="tiny:qwen2_moe", method="uniform", quantizer="rtn", bits=4.5, group_size=32, calib=str(text),
                eval=str(text), nsamples=4, seqlen=64, eval_windows=4)
    base.update(kw)
    return QuantizeConfig(**base)


def _reference_rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest per row and group of `group` columns, written out loop by loop
    (independent of moebits.quant): range [min(w, 0), max(w, 0)], scale = range / (2^b - 1) stored in
    fp16, integer zero point (random weights: no degenerate group)."""
    w = w.double()
    out = torch.empty_like(w)
    qmax = 2 ** bits - 1
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group):
            g = w[r, c0:c0 + group]
            lo, hi = min(g.min().item(), 0.0), max(g.max().item(), 0.0)  # zero in the range (GPTQ reference)
            scale = float(torch.tensor((hi - lo) / qmax).half())
            zero = min(max(round(-lo / scale), 0), qmax)
            q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
            out[r, c0:c0 + group] = (q - zero) * scale
    return out


def test_uniform_run_writes_plan_results_and_resumes(tmp_path, text_file):
    out = tmp_path / "run"
    p = Pipeline(_cfg(text_file, save_model=False), out, progress=False)  # compare the model as evaluated
    res = p.execute()
    # the evaluated model holds exactly the 3-bit g32 RTN weights of the original units, and every other
    # parameter is untouched
    ref_model, _, ref = load_model("tiny:qwen2_moe", seed=0)
    for u in p.units:
        w0, wq = ref.weight(u), p.adapter.weight(u)
        torch.testing.assert_close(wq, _reference_rtn(w0, 3, 32).to(wq.dtype), rtol=0, atol=0)
        assert not torch.equal(wq, w0.to(wq.dtype))
    unit_storage = {p.adapter.weight(u).untyped_storage().data_ptr() for u in p.units}
    others = [(n, a, b) for (n, a), (_, b) in zip(p.model.named_parameters(), ref_model.named_parameters())
              if a.untyped_storage().data_ptr() not in unit_storage]
    assert any("router" in n or "gate.weight" in n for n, _, _ in others)
    for n, a, b in others:
        assert torch.equal(a, b), n
    for k in ("method", "quantizer", "avg_bits", "weight_bytes", "ppl_fp", "ppl_q", "eval_tokens", "calibrate_seconds",
              "profile_seconds", "allocate_seconds", "quantize_seconds", "eval_seconds"):
        assert k in res, k
    # an fp16 scale and a code-width integer zero per group (zero_points "packed", the default):
    # 4-bit g32 = 4 + 20/32 = 4.625 > 4.5, so 3-bit g32 = 3 + 19/32
    assert res["avg_bits"] == pytest.approx(3 + (16 + 3) / 32)
    plan = Plan.load(out / "plan.json")
    assert {a.choice.bits for a in plan.assignments.values()} == {3}
    assert res["ppl_q"] != res["ppl_fp"]
    # a finished run is not redone; the same request resumes, a different one is refused
    again = Pipeline(_cfg(text_file), out, progress=False).execute()
    assert again == res
    with pytest.raises(RunMismatchError, match="bits"):
        Pipeline(_cfg(text_file, bits=3.0), out, progress=False)
    # --overwrite replaces it
    res2 = Pipeline(_cfg(text_file, bits=3.0), out, overwrite=True, progress=False).execute()
    assert res2["avg_bits"] == pytest.approx(2 + (16 + 2) / 32)  # 3-bit g32 = 3.594 > 3.0: 2-bit g32


def test_interrupted_run_resumes_from_saved_stages(tmp_path, text_file):
    out = tmp_path / "run"
    p = Pipeline(_cfg(text_file, method="mxmoe", quantizer="rtn", bits=3.5), out, progress=False)
    p.load()
    p.calibrate()
    stats_mtime = (out / "stats.json").stat().st_mtime_ns
    # ... interrupted here. A new process resumes without recalibrating:
    res = Pipeline(_cfg(text_file, method="mxmoe", quantizer="rtn", bits=3.5), out, progress=False).execute()
    assert (out / "stats.json").stat().st_mtime_ns == stats_mtime
    assert res["done"] and (out / "table.csv").exists() and res["avg_bits"] <= 3.5 + 1e-9


def test_infeasible_budget_names_the_feasible_range(tmp_path, text_file):
    with pytest.raises(ValueError, match=r"feasible"):
        Pipeline(_cfg(text_file, bits=1.0), tmp_path / "r", progress=False).execute()


def test_corrupted_plan_is_refused(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text('{"format": "moebits.plan/1", "units": {"L0.E1.gate": {"bits": 3}, "L0.E1.nope": {}}}')
    with pytest.raises(PlanError, match="L0.E1.nope"):
        Plan.load(p)
    p.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(p)


def test_latency_budget_with_measured_latency_fri(tmp_path, text_file, monkeypatch):
    """--latency with --cost latency-fri: kernel latencies measured here, interpolated, budget respected.

    The latencies are measured once and reused by the run: two measurements of the same kernels differ by
    up to 2x on a busy (or just warming) CPU, so a budget placed between the cheapest and the dearest plan
    of one measurement can be infeasible under the next. What is checked is the allocation under the
    run's matrix, not the stability of wall-clock timings."""
    import numpy as np

    from moebits import latency as latency_module
    from moebits.job import make_budget

    measure, measured = latency_module.latency_fri_matrix, []

    def measure_once(*args, **kwargs):
        if not measured:
            measured.append(measure(*args, **kwargs))
        return measured[0]

    monkeypatch.setattr(latency_module, "latency_fri_matrix", measure_once)

    cfg = _cfg(text_file, method="freq", bits=None, latency=1.0, cost="latency-fri", batch_tokens=64)
    p = Pipeline(cfg, tmp_path / "r", progress=False)
    p.load()
    p.calibrate()
    freq = np.array([s.frequency for s in p.calib.stats])
    b = make_budget(cfg, p.units, p.shapes, candidate_choices(cfg), freq)
    assert b.cost.shape == (len(p.units), 4) and np.all(b.cost > 0)
    # a budget between the cheapest and the dearest plan is met, and binds
    lo, hi = b.cost.min(axis=1).sum(), b.cost.max(axis=1).sum()
    cfg.latency = float(lo + 0.5 * (hi - lo))
    p2 = Pipeline(cfg, tmp_path / "r2", progress=False)
    res = p2.execute()
    assert res["done"] and res["budget"] == {"latency": cfg.latency}
    # the plan's latency under the run's matrix fits, and the budget binds: what is left
    # is less than any unit's next step up (MPQ-Freq spends the budget until nothing more fits)
    cost = p2.allocation_budget.cost
    plan = Plan.load(tmp_path / "r2" / "plan.json")
    choices = candidate_choices(cfg)
    idx = np.array([choices.index(plan.choice(u)) for u in p2.units])
    used = cost[np.arange(len(idx)), idx]
    assert used.sum() <= cfg.latency * (1 + 1e-12)
    assert used.sum() > cost.min(axis=1).sum()  # it did upgrade units
    steps = np.where(cost > used[:, None], cost - used[:, None], np.inf).min(axis=1)
    assert cfg.latency - used.sum() < steps.min()


def test_fri_through_the_pipeline_measures_anchors_and_predicts_the_rest(tmp_path, text_file):
    """--method fri: anchors measured exactly as full profiling measures them, the rest predicted, and the
    plan meets the budget; the same run with --method mxmoe is the reference for the anchors."""
    import numpy as np

    from moebits.table import SensitivityTable

    kw = dict(quantizer="rtn", bits=3.5, anchors=0.3, save_model=False)
    paper = dict(sampler="stratified", predictor="fri", proxy=False)  # whole anchor experts (adaptive: test_adaptive.py)
    res = Pipeline(_cfg(text_file, method="fri", **kw, **paper), tmp_path / "fri", progress=False).execute()
    Pipeline(_cfg(text_file, method="mxmoe", **kw), tmp_path / "full", progress=False).execute()
    fri = SensitivityTable.from_csv(tmp_path / "fri" / "table.csv")
    full = SensitivityTable.from_csv(tmp_path / "full" / "table.csv")
    assert fri.units == full.units and fri.complete and full.measured.all()
    m = fri.measured
    assert 0 < m.all(axis=1).mean() < 1 and res["rules"] == int(m.sum()) and res["anchors"] > 0
    assert np.array_equal(m.all(axis=1), m.any(axis=1))  # an anchor unit is measured at every bit-width
    np.testing.assert_allclose(fri.error[m], full.error[m], rtol=1e-6)
    assert not np.allclose(fri.error[~m], full.error[~m])  # predictions are not copies of the truth
    assert np.all(fri.error > 0) and res["avg_bits"] <= 3.5 + 1e-9
    assert res["solver"] == "lagrangian" and {"fit_seconds", "predict_seconds"} <= set(res)
    plan = Plan.load(tmp_path / "fri" / "plan.json")
    assert len({a.choice.bits for a in plan.assignments.values()}) > 1  # mixed precision


def test_calibration_table_and_plan_survive_save_and_reload(tmp_path, text_file):
    import numpy as np

    from moebits.calibrate import Calibration
    from moebits.table import SensitivityTable

    p = Pipeline(_cfg(text_file, method="mxmoe", bits=3.5), tmp_path / "r", progress=False)
    p.load()
    cal = p.calibrate()
    back = Calibration.load(tmp_path / "r")
    assert back.stats == cal.stats and back.total_tokens == cal.total_tokens
    assert back.never_routed == [tuple(k) for k in cal.never_routed]
    assert back.inputs.keys() == cal.inputs.keys()
    for k, v in cal.inputs.items():
        assert torch.equal(back.inputs[k].x, v.x) and torch.equal(back.inputs[k].g, v.g)
        assert back.inputs[k].fallback == v.fallback
    np.testing.assert_array_equal(back.frequency(), cal.frequency())

    choices = candidate_choices(p.cfg)
    table = p.fill_table(choices)
    table.error[0, 0] = float("nan")  # unknown entries survive as unknown
    table.to_csv(tmp_path / "t.csv")
    t2 = SensitivityTable.from_csv(tmp_path / "t.csv")
    assert t2.units == table.units and t2.choices == table.choices
    np.testing.assert_array_equal(t2.error, table.error)
    np.testing.assert_array_equal(t2.frequency, table.frequency)
    np.testing.assert_array_equal(t2.measured, table.measured)
    np.testing.assert_allclose(t2.seconds, table.seconds, atol=1e-6)

    table = SensitivityTable.from_csv(tmp_path / "r" / "table.csv")
    plan = p.allocate(choices, table)
    again = Plan.load(tmp_path / "r" / "plan.json")
    assert again.assignments == plan.assignments and again.meta == json.loads(json.dumps(plan.meta))

    q = Pipeline.from_run(tmp_path / "r", progress=False)
    assert q.cfg == p.cfg and q.execute()["done"]
    assert Plan.load(tmp_path / "r" / "plan.json").assignments == plan.assignments  # resumed, not redone
    with pytest.raises(FileNotFoundError, match="run.json"):
        Pipeline.from_run(tmp_path / "nothing")


def test_a_registered_method_runs_through_the_pipeline(tmp_path, text_file):
    """A new method is one `register_method` entry: its table fill and default solver are used."""
    import numpy as np

    from moebits import methods
    from moebits.table import SensitivityTable

    calls = []

    class Toy(methods.Method):  # a made-up sensitivity: error 2^-bits, larger for `down`; nothing measured
        name, solver, granularity, profiles = "toy", "ilp", "expert", False

        def complete(self, ctx, measured):
            calls.append(len(ctx.choices))
            bits = np.array([c.bits for c in ctx.choices], float)
            scale = np.array([4.0 if u.kind == "down" else 1.0 for u in ctx.units])
            return SensitivityTable(ctx.units, ctx.choices, error=scale[:, None] * 2.0 ** -bits[None, :],
                                    frequency=ctx.frequency)

    methods.register_method(Toy())
    try:
        assert "toy" in methods.method_names()
        p = Pipeline(_cfg(text_file, method="toy", bits=3.5, save_model=False), tmp_path / "r", progress=False)
        res = p.execute()
        assert calls == [4] and res["solver"] == "ilp" and res["avg_bits"] <= 3.5 + 1e-9
        plan = Plan.load(tmp_path / "r" / "plan.json")
        assert plan.meta["granularity"] == "expert" and plan.meta["method"] == "toy"
        for u in p.units:  # expert granularity: gate, up and down of an expert share one choice
            assert plan.choice(u) == plan.choice(type(u)(u.layer, u.expert, "gate"))
        with pytest.raises(ValueError, match="already registered"):
            methods.register_method(Toy())
    finally:
        methods._METHODS.pop("toy", None)
    with pytest.raises(ValueError, match="unknown method 'toy'.*fri"):
        Pipeline(_cfg(text_file, method="toy"), tmp_path / "r2", progress=False)


def test_seqlens_default_from_the_model_and_are_recorded(tmp_path, text_file):
    from moebits.data import default_seqlen

    assert default_seqlen("demo") == 256 and default_seqlen("tiny:qwen2_moe") == 512  # tiny: max positions 512
    cfg = QuantizeConfig(model="tiny:qwen2_moe")
    cfg.resolve_seqlens()
    assert (cfg.calib_seqlen, cfg.eval_seqlen, cfg.seqlen) == (512, 512, 512) and cfg.spec()["seqlen"] == 512
    cfg = QuantizeConfig(seqlen=64, eval_seqlen=48)
    cfg.resolve_seqlens()
    assert (cfg.calib_seqlen, cfg.eval_seqlen) == (64, 48)
    assert "seqlen" not in cfg.spec() and QuantizeConfig.from_spec(cfg.spec()) == QuantizeConfig(
        calib_seqlen=64, eval_seqlen=48, seqlen=None)
    with pytest.raises(ValueError, match="--calib-seqlen"):
        QuantizeConfig(calib_seqlen=1, seqlen=8).resolve_seqlens()

    p = Pipeline(_cfg(text_file, seqlen=None, calib_seqlen=32, eval_seqlen=48), tmp_path / "r", progress=False)
    res = p.execute()
    assert p.windows.shape == (4, 32) and res["eval_tokens"] == 4 * 47
    spec = json.loads((tmp_path / "r" / "run.json").read_text())
    assert spec["calib_seqlen"] == 32 and spec["eval_seqlen"] == 48 and "seqlen" not in spec
    assert Pipeline.from_run(tmp_path / "r", progress=False).cfg == p.cfg


def test_a_run_made_before_separate_seqlens_and_full_token_sets_resumes(tmp_path, text_file):
    """Old run.json: one `seqlen`, max_tokens_per_expert 512, no holdout; old calib_inputs without Hessians."""
    from safetensors.torch import load_file, save_file

    p = Pipeline(_cfg(text_file, method="mxmoe", quantizer="gptq", bits=3.5, max_tokens_per_expert=512),
                 tmp_path / "r", progress=False)
    p.load()
    p.calibrate()
    spec = json.loads((tmp_path / "r" / "run.json").read_text())
    assert spec["seqlen"] == 64 and "calib_seqlen" not in spec and "holdout" not in spec
    assert spec["max_tokens_per_expert"] == 512
    f = tmp_path / "r" / "calib_inputs.safetensors"  # strip the Hessians, as an old calibration has none
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    save_file({k: v for k, v in load_file(str(f)).items() if k.endswith((".x", ".g"))}, str(f), metadata=meta)
    (tmp_path / "r" / "cache.json").unlink()  # an old run has no cache.json (its files are adopted as they are)
    q = Pipeline.from_run(tmp_path / "r", progress=False)
    assert q.execute()["done"] and q.cfg.calib_seqlen == q.cfg.eval_seqlen == 64
    assert all(inp.h_in is None for inp in q.calib.inputs.values())


def test_holdout_through_the_pipeline(tmp_path, text_file):
    with pytest.raises(ValueError, match="--metric expert"):
        Pipeline(_cfg(text_file, method="mxmoe", bits=3.5, holdout=0.2, metric="layer"), tmp_path / "x")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Pipeline(_cfg(text_file, method="mxmoe", bits=3.5, holdout=1.0), tmp_path / "y")
    tables = {}
    for h in (0.0, 0.3):
        p = Pipeline(_cfg(text_file, method="mxmoe", quantizer="gptq", bits=3.5, holdout=h), tmp_path / f"h{h}",
                     progress=False)
        res = p.execute()
        assert res["done"]
        tables[h] = p.fill_table(candidate_choices(p.cfg))
    assert json.loads((tmp_path / "h0.3" / "run.json").read_text())["holdout"] == 0.3
    # the same calibration tokens, measured on another subset with other Hessians: other errors
    assert not torch.allclose(torch.tensor(tables[0.0].error), torch.tensor(tables[0.3].error))
