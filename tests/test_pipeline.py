import json

import pytest
import torch

from moebits.evaluate import perplexity
from moebits.models import load_model
from moebits.pipeline import Pipeline, QuantizeConfig
from moebits.plan import Plan, PlanError
from moebits.run import RunMismatchError


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


def test_uniform_run_writes_plan_results_and_resumes(tmp_path, text_file):
    out = tmp_path / "run"
    res = Pipeline(_cfg(text_file), out, progress=False).execute()
    for k in ("method", "quantizer", "avg_bits", "weight_bytes", "ppl_fp", "ppl_q", "eval_tokens", "calibrate_seconds",
              "profile_seconds", "allocate_seconds", "quantize_seconds", "eval_seconds"):
        assert k in res, k
    assert res["avg_bits"] == pytest.approx(3 + 32 / 32)  # 4-bit g32 = 5.0 > 4.5, so 3-bit g32 = 4.0
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
    assert res2["avg_bits"] == pytest.approx(3.0)


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


def test_latency_budget_with_measured_latency_fri(tmp_path, text_file):
    """--latency with --cost latency-fri: kernel latencies measured here, interpolated, budget respected."""
    import numpy as np

    from moebits.pipeline import candidate_choices, make_budget

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
    res = Pipeline(cfg, tmp_path / "r2", progress=False).execute()
    assert res["done"] and res["budget"] == {"latency": cfg.latency}
