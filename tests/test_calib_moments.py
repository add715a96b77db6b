"""Calibration's g²-weighted column second moments (`ExpertInputs.m_in` / `m_down`) and the RTN proxy
that reads them instead of running every expert's gate/up forward (issue 25).

References are independent: the moments recomputed from the kept tokens (`x`, `g` and
`adapter.expert_intermediate`) in float64, and the proxy through its old forward path on the same
inputs with the moments blanked."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from moebits.calibrate import Calibration, calibrate
from moebits.data import random_windows
from moebits.expert_profiler import ExpertProfiler
from moebits.methods.fri.proxy import rtn_proxy
from moebits.models import MoEAdapter, tiny_model
from moebits.units import SHARED, Choice

MOMENTS = ("m_in", "m_down", "m_in_held", "m_down_held")
CHOICES = [Choice(b, 32, "gptq") for b in (2, 3, 4, 8)] + [Choice(3, 16, "rtn"), Choice(16, 32, "gptq")]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _windows(n=6, seqlen=40, seed=1):
    return random_windows(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(seed)), n, seqlen)


def _never_seven(ad):
    """Route expert 7 of every MoE layer nowhere (its tokens go to expert 6): a never-routed expert."""
    def hook(module, args, out):
        logits, scores, idx = out
        return logits, scores, torch.where(idx == 7, torch.full_like(idx, 6), idx)

    for l in ad.moe_layers:
        ad.moe_block(l).gate.register_forward_hook(hook)


def _reference(ad, layer, expert, x, g):
    """(E[g^2 x^2] [H], E[g^2 h^2] [I]) of the rows `x` with weights `g`, in float64."""
    h = ad.expert_intermediate(layer, expert, x.float()).double()
    g2 = g.double()[:, None] ** 2
    x = x.double()
    return (g2 * x * x).mean(0), (g2 * h * h).mean(0)


def _close(got: torch.Tensor, ref: torch.Tensor):
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7 * ref.abs().max().item())


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2", "mixtral"])
def test_moments_equal_the_kept_tokens_moments(arch):
    """Routed, shared (qwen2_moe: a sigmoid-gated shared expert, deepseek_v2: scale 1) and never-routed
    experts: the moments are those of the rows `x` with the weights `g` (no cap: every routed token)."""
    ad = MoEAdapter(tiny_model(arch))
    if arch == "mixtral":
        _never_seven(ad)
    cal = calibrate(ad, _windows(), batch_size=4, progress=False)
    kinds = set()
    for (l, e), inp in cal.inputs.items():
        m_in, m_down = _reference(ad, l, e, inp.x, inp.g)
        _close(inp.m_in, m_in)
        _close(inp.m_down, m_down)
        assert inp.m_in_held is None and inp.m_down_held is None
        kinds.add("fallback" if inp.fallback else "shared" if e == SHARED else "routed")
    want = {"routed", "fallback"} if arch == "mixtral" else {"routed", "shared"}
    assert kinds == want
    if arch == "qwen2_moe":  # the shared expert's weights are its gate's scale, not 1
        g = cal.inputs[(ad.moe_layers[0], SHARED)].g
        assert not torch.allclose(g, torch.ones_like(g))


def test_moments_without_hessians_are_not_collected():
    ad = MoEAdapter(tiny_model("qwen2_moe"))
    cal = calibrate(ad, _windows(n=2), progress=False, hessians=False)
    assert all(getattr(inp, n) is None for inp in cal.inputs.values() for n in MOMENTS)


def test_moments_under_a_cap_cover_every_routed_token():
    """A cap keeps a sample of `x`; the moments (like the Hessians) still see every routed token."""
    ad = MoEAdapter(tiny_model("olmoe"))
    win = _windows()
    full = calibrate(ad, win, batch_size=4, progress=False)
    capped = calibrate(ad, win, batch_size=4, progress=False, max_tokens_per_expert=5)
    assert any(c.x.shape[0] < f.x.shape[0] for c, f in zip(capped.inputs.values(), full.inputs.values()))
    for k, f in full.inputs.items():
        assert torch.equal(capped.inputs[k].m_in, f.m_in) and torch.equal(capped.inputs[k].m_down, f.m_down), k


def test_holdout_profiles_on_the_held_out_tokens_moments():
    ad = MoEAdapter(tiny_model("qwen2_moe"))
    cal = calibrate(ad, _windows(n=8), batch_size=4, holdout=0.3, progress=False)
    prof = cal.profile_inputs()
    split = 0
    for (l, e), inp in cal.inputs.items():
        # the calibration's own moments: all tokens (what the proxy reads from `calib.inputs`)
        m_in, m_down = _reference(ad, l, e, inp.x, inp.g)
        _close(inp.m_in, m_in)
        _close(inp.m_down, m_down)
        p, m = prof[(l, e)], inp.held_out
        if m is not None and 0 < int(m.sum()) < len(m):
            split += 1
            h_in, h_down = _reference(ad, l, e, inp.x[m], inp.g[m])
            _close(p.m_in, h_in)
            _close(p.m_down, h_down)
            assert not torch.allclose(p.m_in, inp.m_in)  # really the held-out rows, not all of them
        else:  # no held-out (or no fit) token: profiled on all, as without a holdout
            assert torch.equal(p.m_in, inp.m_in) and torch.equal(p.m_down, inp.m_down)
        assert p.m_in_held is None and p.m_down_held is None
    assert split > 5


def _no_forward(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the proxy ran an expert forward although the calibration has the moments")

    monkeypatch.setattr(MoEAdapter, "expert_intermediate", refuse)
    monkeypatch.setattr(MoEAdapter, "expert_forward", refuse)
    monkeypatch.setattr(ExpertProfiler, "intermediate", refuse)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2", "mixtral"])
def test_proxy_from_moments_equals_the_forward_path_and_runs_no_forward(arch, monkeypatch):
    ad = MoEAdapter(tiny_model(arch))
    if arch == "mixtral":
        _never_seven(ad)
    cal = calibrate(ad, _windows(), batch_size=4, progress=False)  # no cap: the same tokens both ways
    units = ad.units()
    old_inputs = {k: replace(v, m_in=None, m_down=None) for k, v in cal.inputs.items()}
    ref = rtn_proxy(ad, units, CHOICES, old_inputs).values
    with monkeypatch.context() as mp:
        _no_forward(mp)
        prof = ExpertProfiler(ad, cal.inputs)
        got = rtn_proxy(ad, units, CHOICES, cal.inputs, profiler=prof).values
        assert len(prof.refs.items) == 0  # nothing computed for the profiler either
    assert got.shape == ref.shape and (ref[:, :-1] > 0).all() and (ref[:, -1] == 0).all()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)


def test_moments_survive_save_and_load_and_an_old_calibration_still_works(tmp_path, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    ad = MoEAdapter(tiny_model("qwen2_moe"))
    cal = calibrate(ad, _windows(n=8), batch_size=4, holdout=0.3, progress=False)
    cal.save(tmp_path / "new")
    back = Calibration.load(tmp_path / "new")
    held = 0
    for k, inp in cal.inputs.items():
        for n in MOMENTS:
            a, b = getattr(inp, n), getattr(back.inputs[k], n)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (k, n)
        held += inp.m_in_held is not None
    assert held > 5
    for k, p in cal.profile_inputs().items():
        assert torch.equal(back.profile_inputs()[k].m_in, p.m_in)
    # a calibration saved before the moments were collected: no m_* tensors in the file
    cal.save(tmp_path / "old")
    f = tmp_path / "old" / Calibration.INPUTS_FILE
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    kept = {k: v for k, v in load_file(str(f)).items() if not k.rsplit(".", 1)[1] in MOMENTS}
    assert len(kept) < len(load_file(str(f)))
    save_file(kept, str(f), metadata=meta)
    old = Calibration.load(tmp_path / "old")
    assert all(getattr(inp, n) is None for inp in old.inputs.values() for n in MOMENTS)
    assert all(getattr(inp, n) is None for inp in old.profile_inputs().values() for n in MOMENTS)
    units = ad.units()
    blanked = {k: replace(v, m_in=None, m_down=None) for k, v in cal.inputs.items()}
    assert np.array_equal(rtn_proxy(ad, units, CHOICES, old.inputs).values,
                          rtn_proxy(ad, units, CHOICES, blanked).values)  # the forward path, as before
    with monkeypatch.context() as mp:
        _no_forward(mp)
        new = rtn_proxy(ad, units, CHOICES, back.inputs).values
    np.testing.assert_allclose(new, rtn_proxy(ad, units, CHOICES, old.inputs).values, rtol=1e-5, atol=0)


def test_a_streamed_calibration_has_the_in_memory_moments(tmp_path):
    """Streaming pass 1 collects each layer with a `LayerCollector` on the lazily loaded layer: the
    moments are those of the in-memory calibration."""
    from moebits.models.lazy import LazyModel, SafetensorsSource
    from moebits.models.loading import byte_tokenizer
    from moebits.stream.forward import BatchedWindows
    from moebits.stream.layer_pass import collect_layer

    model = tiny_model("deepseek_v2")
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    byte_tokenizer().save_pretrained(tmp_path / "ckpt")
    win = _windows()
    whole = calibrate(MoEAdapter(model), win, batch_size=4, seed=3, holdout=0.3, progress=False)
    lazy = LazyModel(SafetensorsSource(tmp_path / "ckpt"))
    batches = BatchedWindows(lazy, win, 4)
    hidden, seen = batches.embeddings(), 0
    for layer in range(lazy.num_layers):
        with lazy.layer(layer):
            lc, hidden = collect_layer(lazy, layer, batches, hidden, keep_output=True, seed=3, hessians=True,
                                       holdout=0.3)
        if lc is None:
            continue
        for k, inp in lc.inputs.items():
            ref = whole.inputs[k]
            for n in MOMENTS:
                a, b = getattr(inp, n), getattr(ref, n)
                assert (a is None) == (b is None), (k, n)
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
            assert inp.m_in is not None and inp.m_down is not None
            seen += 1
    assert seen == len(whole.inputs)
