"""The calibration pass per layer (`LayerCollector`), its Hessians over all routed tokens, and --holdout."""
import pytest
import torch

from moebits.apply import layer_hessians
from moebits.calibrate import Calibration, LayerCollector, calibrate
from moebits.data import random_windows
from moebits.models import MoEAdapter, tiny_model
from moebits.units import SHARED, Unit


def _setup(arch="qwen2_moe", windows=6, seqlen=40, seed=1):
    ad = MoEAdapter(tiny_model(arch))
    win = random_windows(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(seed)), windows, seqlen)
    return ad, win


def _routed_batches(ad, win, batch_size=4, layers=None):
    """Every RoutedBatch of a forward over `win` (captured independently of the collectors)."""
    seen = []
    with ad.capture_routing(seen.append, layers):
        for s in range(0, win.shape[0], batch_size):
            ad.model(input_ids=win[s:s + batch_size], use_cache=False)
    return seen


def _close(h: torch.Tensor, ref: torch.Tensor):
    """Equal up to float32 products (the accumulation is float64): 1e-6 of the largest entry."""
    torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def _assert_same_inputs(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        for name in ("x", "g", "h_in", "h_down", "held_out", "h_in_fit", "h_down_fit", "m_in", "m_down", "m_in_held",
                     "m_down_held"):
            ta, tb = getattr(a[k], name), getattr(b[k], name)
            assert (ta is None) == (tb is None), (k, name)
            if ta is not None:
                assert torch.equal(ta, tb), (k, name)
        assert a[k].fallback == b[k].fallback


@pytest.mark.parametrize("holdout", [0.0, 0.3])
def test_layer_by_layer_collectors_give_what_calibrate_gives(holdout):
    """A streaming pass sees one layer's batches at a time: the result must not depend on it."""
    ad, win = _setup()
    whole = calibrate(ad, win, batch_size=4, seed=3, holdout=holdout, progress=False)
    layers = []
    for l in reversed(ad.moe_layers):  # even in another order of layers
        col = LayerCollector(ad, l, seed=3, holdout=holdout)
        for b in _routed_batches(ad, win, layers=[l]):
            col.add(b)
        layers.append(col.finish())
    streamed = Calibration.from_layers(layers)
    assert streamed.stats == whole.stats and streamed.total_tokens == whole.total_tokens == win.numel()
    assert streamed.never_routed == whole.never_routed
    _assert_same_inputs(streamed.inputs, whole.inputs)


def test_collector_refuses_another_layers_batch_and_bad_options():
    ad, win = _setup()
    b = _routed_batches(ad, win[:1], layers=[ad.moe_layers[1]])[0]
    with pytest.raises(ValueError, match="layer"):
        LayerCollector(ad, ad.moe_layers[0]).add(b)
    with pytest.raises(ValueError, match="holdout"):
        LayerCollector(ad, ad.moe_layers[0], holdout=1.0)
    with pytest.raises(ValueError, match="not a MoE layer"):
        LayerCollector(ad, 99)
    with pytest.raises(ValueError, match="saw no tokens"):
        LayerCollector(ad, ad.moe_layers[0]).finish()


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_hessians_equal_the_batch_xtx_of_all_routed_tokens(arch):
    """Accumulated over batches (and under a sample cap of 8 tokens), each expert's Hessians equal
    X^T X / n of *all* its routed tokens, gathered here independently from the routing events."""
    ad, win = _setup(arch)
    cal = calibrate(ad, win, batch_size=2, max_tokens_per_expert=8, progress=False)
    batches = _routed_batches(ad, win)
    for l in ad.moe_layers:
        hidden = torch.cat([b.hidden for b in batches if b.layer == l]).double()  # [T, H]
        idx = torch.cat([b.top_k_index for b in batches if b.layer == l])  # [T, k]
        experts = list(range(ad.num_experts)) + ([SHARED] if ad.num_shared_experts else [])
        for e in experts:
            X = hidden if e == SHARED else hidden[(idx == e).any(dim=1)]
            inp = cal.inputs[(l, e)]
            if X.shape[0] == 0:
                assert inp.fallback
                continue
            A = ad.expert_intermediate(l, e, X.float()).double()
            _close(inp.h_in.double(), X.T @ X / X.shape[0])
            _close(inp.h_down.double(), A.T @ A / A.shape[0])
            assert inp.x.shape[0] == min(8, X.shape[0])  # the kept sample is capped, the Hessian is not
            assert layer_hessians(ad, l, cal.inputs, [e])[(e, "in")] is inp.h_in


def test_default_keeps_every_routed_token_and_old_calibrations_fall_back(tmp_path):
    ad, win = _setup()
    cal = calibrate(ad, win, progress=False)
    for s in cal.stats:
        if s.unit.kind == "gate" and not s.never_routed:
            assert cal.inputs[(s.unit.layer, s.unit.expert)].x.shape[0] == s.tokens
    # a calibration saved before Hessians were accumulated: GPTQ builds them from the kept tokens
    l = ad.moe_layers[0]
    inp = cal.inputs[(l, 0)]
    old = {(l, 0): type(inp)(inp.x, inp.g)}
    H = layer_hessians(ad, l, old, [0])
    _close(H[(0, "in")], inp.h_in.double())
    # and the Hessians survive save / load
    cal.save(tmp_path)
    back = Calibration.load(tmp_path)
    _assert_same_inputs(back.inputs, cal.inputs)


def test_holdout_fits_on_the_rest_and_profiles_on_the_held_out_tokens(tmp_path):
    ad, win = _setup(windows=8)
    F = 0.25
    cal = calibrate(ad, win, holdout=F, progress=False)
    prof = cal.profile_inputs()
    held_total = routed_total = 0
    for (l, e), inp in cal.inputs.items():
        if inp.fallback:
            assert prof[(l, e)] .x.shape == inp.x.shape  # nothing to hold out
            continue
        m = inp.held_out
        X, A = inp.x.double(), ad.expert_intermediate(l, e, inp.x).double()
        _close(inp.h_in.double(), X.T @ X / len(X))  # all tokens
        p = prof[(l, e)]
        if 0 < m.sum() < len(m):
            fit, fitA = X[~m], A[~m]
            _close(p.h_in.double(), fit.T @ fit / len(fit))
            _close(p.h_down.double(), fitA.T @ fitA / len(fitA))
            assert torch.equal(p.x, inp.x[m]) and torch.equal(p.g, inp.g[m])
        else:  # no held-out (or no fit) token: measured on all, as without a holdout
            assert torch.equal(p.x, inp.x) and p.h_in is inp.h_in
        if e != SHARED:
            held_total += int(m.sum())
            routed_total += len(m)
    assert abs(held_total / routed_total - F) < 0.05
    # without a holdout, profiling sees exactly the calibration's inputs
    assert calibrate(ad, win, progress=False).profile_inputs().keys() == cal.inputs.keys()
    cal.save(tmp_path)
    _assert_same_inputs(Calibration.load(tmp_path).profile_inputs(), prof)


def test_never_routed_expert_has_fallback_hessians():
    ad, win = _setup("mixtral", windows=4, seqlen=32)

    def never_seven(module, args, out):
        logits, scores, idx = out
        return logits, scores, torch.where(idx == 7, torch.full_like(idx, 6), idx)

    for l in ad.moe_layers:
        ad.moe_block(l).gate.register_forward_hook(never_seven)
    cal = calibrate(ad, win, progress=False)
    inp = cal.inputs[(ad.moe_layers[0], 7)]
    assert inp.fallback
    X = inp.x.double()
    _close(inp.h_in.double(), X.T @ X / len(X))
    assert Unit(ad.moe_layers[0], 7, "gate") in cal.stats
