"""Issue 25: the faster profiler gives the numbers the old one gave, bit for bit.

The references below are the code as it was before the speed work (GPTQ's one-shot function and the
per-(layer, kind, choice) profiling loop over full `expert_forward`s), kept here verbatim so that any
later change to the fast path is checked against the same independent computation."""
import numpy as np
import pytest
import torch

from moebits.calibrate import _Moments, calibrate
from moebits.data import random_windows
from moebits.expert_profiler import ExpertProfiler, hessian_input
from moebits.models import MoEAdapter, tiny_model
from moebits.models.act_quant import act_quantizer
from moebits.profile import new_table, profile
from moebits.quant import quantize_weight
from moebits.quant.gptq import prepare_hessian, quantize_gptq, quantize_gptq_prepared
from moebits.quant.rtn import group_view
from moebits.table import SensitivityTable
from moebits.units import Choice, Unit


@pytest.fixture(autouse=True)
def one_thread():
    """Both sides run with the same settings; one thread keeps these tests fast on a loaded 2-core machine
    (two intra-op threads stall on each other there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the old GPTQ, verbatim ----------------------------------------------------------------------
def _minmax_ref(w_groups, bits):
    qmax = 2 ** bits - 1
    lo, hi = w_groups.amin(dim=-1), w_groups.amax(dim=-1)
    constant = lo == hi
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    zero_group = (lo == 0) & (hi == 0)
    lo, hi = torch.where(zero_group, -1.0, lo), torch.where(zero_group, 1.0, hi)
    scale = torch.where(constant & ~zero_group, hi - lo, (hi - lo) / qmax)
    scale = scale.clamp(min=2.0 ** -24).half().float()
    return scale, torch.round(-lo / scale).clamp(0, qmax)


def gptq_reference(w, hessian, bits, group_size=128, damp=0.01, act_order=False):
    squeeze = w.dim() == 2
    W = (w[None] if squeeze else w).float().clone()
    H = (hessian[None] if hessian.dim() == 2 else hessian).float().clone()
    B, R, K = W.shape
    g = K if group_size <= 0 else group_size
    eye = torch.eye(K, dtype=H.dtype)
    diag = torch.diagonal(H, dim1=1, dim2=2)
    dead = diag == 0
    H = H + torch.diag_embed(dead.float())
    W = W.masked_fill(dead[:, None, :], 0.0)
    G = -(-K // g)
    group_scale, group_zero = torch.zeros(B, R, G), torch.zeros(B, R, G)
    if act_order or group_size <= 0:
        group_scale, group_zero = _minmax_ref(group_view(W, g), bits)
    if act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=1, descending=True)
        W = W.gather(2, perm[:, None, :].expand(B, R, K))
        H = H.gather(1, perm[:, :, None].expand(B, K, K)).gather(2, perm[:, None, :].expand(B, K, K))
    mean_diag = torch.diagonal(H, dim1=1, dim2=2).mean(dim=1)
    H = H + damp * mean_diag[:, None, None] * eye
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.zeros_like(W)
    block = g if group_size > 0 else 128
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, :, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        if group_size <= 0 and not act_order:
            scale, zero = group_scale[..., 0], group_zero[..., 0]
        elif not act_order:
            scale, zero = _minmax_ref(W1, bits)
        for i in range(i2 - i1):
            col = W1[:, :, i]
            if act_order:
                gi = (perm[:, i1 + i] // g)[:, None, None].expand(B, R, 1)
                scale, zero = group_scale.gather(2, gi)[..., 0], group_zero.gather(2, gi)[..., 0]
            c = torch.clamp(torch.round(col / scale) + zero, 0, 2 ** bits - 1)
            q = (c - zero) * scale
            Q[:, :, i1 + i] = q
            err = (col - q) / Hinv1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, i, i:][:, None, :]
            Err1[:, :, i] = err
        W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]
    if act_order:
        Q = Q.gather(2, torch.argsort(perm, dim=1)[:, None, :].expand(B, R, K))
    Q = Q.to(w.dtype)
    return Q[0] if squeeze else Q


# ---- the old profiling loop, verbatim (full expert forwards, one batch per layer/kind/choice) -----
def profile_reference(adapter, units, choices, inputs, act_order=False, act_clip=1.0):
    out = {}
    groups = {}
    for u in units:
        groups.setdefault((u.layer, u.kind, u.is_shared), []).append(u)
    for (layer, kind, _), members in groups.items():
        for choice in choices:
            wc = choice.weight_choice
            w = torch.stack([adapter.weight(u) for u in members])
            h = None
            if wc.quantizer == "gptq" and not wc.is_fp:
                key = "h_down" if kind == "down" else "h_in"
                h = torch.stack([getattr(inputs[(u.layer, u.expert)], key) for u in members])
            wq = quantize_weight(w, wc, hessian=h, act_order=act_order)
            for u, q in zip(members, wq):
                inp = inputs[(u.layer, u.expert)]
                x = inp.x.to(q.dtype)
                ref = adapter.expert_forward(u.layer, u.expert, x)
                act = {u.kind: act_quantizer(choice.act_bits, act_clip)} if choice.quantizes_acts else None
                y_q = adapter.expert_forward(u.layer, u.expert, x, {u.kind: q}, act_quant=act)
                d = (y_q - ref).double() * inp.g.double()[:, None]
                out[(u, choice)] = (d * d).sum().item() / x.shape[0]
    return out


def _calibrated(arch, windows=6, seqlen=48, seed=1):
    ad = MoEAdapter(tiny_model(arch))
    win = random_windows(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(seed)), windows, seqlen)
    return ad, calibrate(ad, win, progress=False)


CHOICES = [Choice(b, 32, "gptq") for b in (2, 3, 4, 8)] + [Choice(16, 32, "gptq"), Choice(3, 32, "rtn"),
                                                          Choice(4, 32, "gptq", act_bits=8)]


@pytest.mark.parametrize("shape,group_size,act_order", [((3, 24, 128), 32, False), ((2, 16, 96), 32, True),
                                                        ((2, 8, 70), 32, False), ((2, 8, 64), -1, True),
                                                        ((2, 8, 64), -1, False)])
def test_gptq_equals_the_old_gptq_bit_for_bit_also_with_bits_per_row(shape, group_size, act_order):
    g = torch.Generator().manual_seed(0)
    B, R, K = shape
    w = torch.randn(B, R, K, generator=g)
    x = torch.randn(B, 200, K, generator=g)
    x[:, :, 5] = 0  # a dead input
    h = x.transpose(1, 2) @ x / 200
    refs = {b: gptq_reference(w, h, b, group_size, act_order=act_order) for b in (2, 3, 4, 8)}
    for b, ref in refs.items():
        assert torch.equal(quantize_gptq(w, h, b, group_size, act_order=act_order), ref)
    row_bits = torch.tensor([2, 3, 4, 8])[torch.randint(0, 4, (B, R), generator=g)]
    mixed = quantize_gptq_prepared(w, prepare_hessian(h, act_order=act_order), row_bits, group_size)
    for b, ref in refs.items():
        m = row_bits == b
        assert m.any() and torch.equal(mixed[m], ref[m])
    # rows of several weights on one Hessian, stacked, = each weight alone
    stacked = quantize_gptq_prepared(torch.cat([w, 2 * w], dim=1), prepare_hessian(h, act_order=act_order), 3,
                                     group_size)
    assert torch.equal(stacked[:, R:], quantize_gptq(2 * w, h, 3, group_size, act_order=act_order))


@pytest.mark.parametrize("arch,act_order", [("qwen2_moe", False), ("deepseek_v2", True), ("mixtral", False)])
def test_profiler_equals_the_old_loop_bit_for_bit(arch, act_order):
    ad, cal = _calibrated(arch)
    units = ad.units()
    ref = profile_reference(ad, units, CHOICES, cal.inputs, act_order)
    t = profile(ad, "expert", units, CHOICES, cal.stats, cal.inputs, act_order=act_order, progress=False)
    for (u, c), e in ref.items():
        assert t.error[t.unit_index(u), t.choice_index(c)] == e, f"{u.name} {c.label}"
    assert t.measured.all() and (t.seconds > 0).all()


def test_rounds_with_small_caches_equal_one_call_and_reuse_references(monkeypatch):
    """The adaptive sampler's use: pairs in several calls, through one profiler whose caches and chunks
    are too small for everything (eviction, recomputation), give what one call gives."""
    ad, cal = _calibrated("qwen2_moe")
    units = ad.units()
    ref = profile_reference(ad, units, CHOICES, cal.inputs)
    pairs = [(u, c) for u in units for c in CHOICES]
    rng = np.random.default_rng(0)
    rng.shuffle(pairs)
    monkeypatch.setattr("moebits.expert_profiler.GPTQ_CALL_BYTES", 20_000)  # stacks split, calls of 1-2 experts
    prof = ExpertProfiler(ad, cal.inputs, cache_bytes=20_000, hessian_bytes=50_000, chunk_bytes=30_000)
    t = new_table(ad, CHOICES, cal.stats)
    for part in np.array_split(np.arange(len(pairs)), 5):
        prof.measure([pairs[i] for i in part], t)
    assert all(t.error[t.unit_index(u), t.choice_index(c)] == e for (u, c), e in ref.items())
    assert prof.refs.hits > 0 and prof.refs.misses > 0 and prof.refs.bytes <= 20_000 + max(
        r.nbytes for r in prof.refs.items.values())
    # with room for everything, a second round recomputes no reference and prepares no Hessian again
    big = ExpertProfiler(ad, cal.inputs)
    t2 = new_table(ad, CHOICES, cal.stats)
    big.measure(pairs[:40], t2)
    misses = (big.refs.misses, big.hessians.misses)
    prepared = {(u.layer, u.expert, hessian_input(u.kind)) for u, c in pairs[:40]
                if c.quantizer == "gptq" and not c.is_fp}
    again = [p for p in pairs[40:] if (p[0].layer, p[0].expert, hessian_input(p[0].kind)) in prepared]
    assert len(again) > 10
    big.measure(again, t2)
    assert (big.refs.misses, big.hessians.misses) == misses


def test_profiler_sees_installed_input_transforms():
    """An online rotation before some blocks (rotate.py's kind of transform): the pieces the profiler
    reuses are taken after the transforms, exactly as `expert_forward` applies them."""
    ad, cal = _calibrated("qwen2_moe")
    l = ad.moe_layers[0]
    g = torch.Generator().manual_seed(3)
    qr = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    ad.set_input_transform(Unit(l, 1, "down"), "rotate", lambda h: h @ qr)
    ad.set_input_transform(Unit(l, 2, "gate"), "rotate", lambda x: x * 1.5)
    units = [Unit(l, e, k) for e in (0, 1, 2) for k in ("gate", "up", "down")]
    ref = profile_reference(ad, units, CHOICES, cal.inputs)
    t = profile(ad, "expert", units, CHOICES, cal.stats, cal.inputs, progress=False)
    assert all(t.error[t.unit_index(u), t.choice_index(c)] == e for (u, c), e in ref.items())


def test_profile_expert_refuses_a_profiler_made_for_other_inputs():
    ad, cal = _calibrated("mixtral")
    prof = ExpertProfiler(ad, cal.inputs)
    with pytest.raises(ValueError, match="other inputs"):
        profile(ad, "expert", ad.units()[:3], CHOICES[:1], cal.stats, dict(cal.inputs), progress=False, profiler=prof)


def proxy_reference(adapter, units, choices, inputs):
    """The RTN proxy as proxy.py computed it before (quantize_weight, expert_intermediate per expert)."""
    values = np.zeros((len(units), len(choices)))
    for i, u in enumerate(units):
        inp = inputs[(u.layer, u.expert)]
        x = inp.x.float()
        g2 = (inp.g.float() ** 2)[:, None]
        if u.kind == "down":
            x = adapter.expert_intermediate(u.layer, u.expert, x.to(adapter.weight(u).dtype)).float()
        m = (g2 * x * x).sum(0) / max(1, x.shape[0])
        w = adapter.weight(u).float()[None]
        for j, c in enumerate(choices):
            if not c.is_fp:
                wq = quantize_weight(w, Choice(c.bits, c.group_size, "rtn"))
                values[i, j] = torch.einsum("noi,ni->n", (wq - w) ** 2, m[None]).double().item()
    return np.maximum(values, 0.0)


def test_proxy_through_the_profiler_equals_the_old_proxy():
    """Inputs without the calibration's second moments (an old calibration): the proxy's forward path,
    bit for bit the old proxy (tests/test_calib_moments.py checks the moments path against it)."""
    from dataclasses import replace

    from moebits.methods.fri.proxy import rtn_proxy

    ad, cal = _calibrated("qwen2_moe")
    inputs = {k: replace(v, m_in=None, m_down=None) for k, v in cal.inputs.items()}
    units, choices = ad.units(), [Choice(b, 32, "gptq") for b in (2, 3, 8)] + [Choice(16, 32, "gptq")]
    ref = proxy_reference(ad, units, choices, inputs)
    prof = ExpertProfiler(ad, inputs)
    shared = rtn_proxy(ad, units, choices, inputs, profiler=prof)
    assert np.array_equal(rtn_proxy(ad, units, choices, inputs).values, ref)
    assert np.array_equal(shared.values, ref)
    assert len(prof.refs.items) == len(inputs)  # every expert's reference forward is kept for the pairs


class _MomentsRef(_Moments):
    """calibrate._Moments with its `add` as it was before the batched collection, verbatim."""

    def add(self, a):
        import math
        from moebits.calibrate import OUTLIER_TAU

        if a.numel() == 0:
            return
        a = a.detach().reshape(-1).float()
        a_abs, a2 = a.abs(), a * a
        f64 = torch.float64
        s1, s2, s3, s4, abs1 = torch.stack([a.sum(dtype=f64), a2.sum(dtype=f64), (a2 * a).sum(dtype=f64),
                                            (a2 * a2).sum(dtype=f64), a_abs.sum(dtype=f64)]).tolist()
        rms = math.sqrt(s2 / a.numel())
        self.n += a.numel()
        self.s1, self.s2, self.s3, self.s4, self.abs1 = self.s1 + s1, self.s2 + s2, self.s3 + s3, self.s4 + s4, self.abs1 + abs1
        self.outliers += int((a_abs > OUTLIER_TAU * rms).sum()) if rms > 0 else 0


def test_segment_moments_equal_the_old_moments_per_segment():
    from moebits.calibrate import _segment_moments

    g = torch.Generator().manual_seed(0)
    rows = [1, 7, 256, 3, 40, 1, 100]
    a = torch.randn(sum(rows), 24, generator=g) * torch.rand(sum(rows), 1, generator=g) * 5
    a[8:15] = 0.0  # an all-zero segment (rms 0: no outliers)
    a[300:302, 3] = 1e3  # outliers
    a[302, :] = 2.5  # a constant row
    got = _segment_moments(a, rows)
    start = 0
    for n, (numel, sums, outliers) in zip(rows, got):
        ref = _MomentsRef()
        ref.add(a[start:start + n].clone())
        start += n
        assert (numel, sums, outliers) == (ref.n, [ref.s1, ref.s2, ref.s3, ref.s4, ref.abs1], ref.outliers)
    assert sum(o for _, _, o in got) > 0


@pytest.mark.parametrize("arch,holdout,cap", [("qwen2_moe", 0.3, None), ("mixtral", 0.0, None),
                                              ("deepseek_v2", 0.0, 20), ("olmoe", 0.2, 30)])
def test_calibration_equals_the_old_mask_per_expert_collection(arch, holdout, cap):
    """The routed positions grouped by one sort, the rows of all experts gathered at once, their down inputs
    read off the model's forward and their moments taken together give the rows, statistics and Hessians a
    mask per expert, `expert_intermediate` and a `_Moments.add` per expert gave (the old collection below,
    verbatim)."""
    from moebits import calibrate as C

    class MaskPerExpert(C.LayerCollector):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.moments = {e: {k: _MomentsRef() for k in ("in", "down")} for e in self.experts}

        def _add_expert(self, e, x, g):  # verbatim
            h = self.adapter.expert_intermediate(self.layer, e, x)
            self.moments[e]["in"].add(x)
            self.moments[e]["down"].add(h)
            held = self._held(x.shape[0], x.device)
            self.samples[e].add(x, g, held)
            if self.with_hessians:
                for k, a in (("in", x), ("down", h)):
                    if self.holdout > 0:
                        self.xtx[e][k].add(a[~held])
                        self.xtx_held[e][k].add(a[held])
                    else:
                        self.xtx[e][k].add(a)

        def add(self, b):  # the old loop, verbatim
            x = b.hidden.float()
            flat_idx, flat_w = b.top_k_index.reshape(-1), b.top_k_weights.reshape(-1).float()
            tok_of = torch.arange(x.shape[0]).repeat_interleave(b.top_k_index.shape[1])
            E = self.E
            self.tokens += x.shape[0]
            self.counts += torch.bincount(flat_idx, minlength=E)[:E]
            self.mass += torch.zeros(E, dtype=torch.float64).index_add_(0, flat_idx, flat_w.double())
            self.generic.add(x, torch.full((x.shape[0],), flat_w.mean().item()), torch.zeros(x.shape[0], dtype=torch.bool))
            for e in torch.unique(flat_idx).tolist():
                sel = flat_idx == e
                self._add_expert(e, x[tok_of[sel]], flat_w[sel])
            if C.SHARED in self.samples:
                s = self.adapter.shared_scale(self.layer, x.to(b.hidden.dtype)).float()
                self.shared_mass += s.sum().item()
                self._add_expert(C.SHARED, x, s)

    read_off = []

    class Recording(C.LayerCollector):
        def add(self, b):
            read_off.append(b.down_input is not None)
            super().add(b)

    ad = MoEAdapter(tiny_model(arch))
    win = random_windows(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(2)), 6, 48)
    orig = C.LayerCollector
    try:
        C.LayerCollector = Recording
        new = calibrate(ad, win, progress=False, holdout=holdout, max_tokens_per_expert=cap)
        C.LayerCollector = MaskPerExpert
        old = calibrate(ad, win, progress=False, holdout=holdout, max_tokens_per_expert=cap)
    finally:
        C.LayerCollector = orig
    assert read_off and all(read_off)  # the down inputs came from the forward, not recomputed
    assert old.inputs.keys() == new.inputs.keys()
    for k, a in old.inputs.items():
        b = new.inputs[k]
        for f in ("x", "g", "h_in", "h_down", "held_out", "h_in_fit", "h_down_fit"):  # (the old code had no m_*)
            assert (getattr(a, f) is None and getattr(b, f) is None) or torch.equal(getattr(a, f), getattr(b, f)), (k, f)
    for col in ("tokens", "frequency", "routing_mass", "act_var", "act_mean_abs", "act_outlier_ratio", "act_kurtosis"):
        assert np.array_equal(getattr(old.stats, col), getattr(new.stats, col)), col
    assert (new.stats.act_outlier_ratio > 0).any()  # the outlier counts are compared, not all zero


@pytest.mark.parametrize("shape", [(3, 8, 64), (2, 5, 70), (1, 4, 33)])
def test_rtn_proxy_errors_equal_quantize_weight_bit_for_bit(shape):
    """The proxy's fused RTN (min/max once per group size, in-place rounding) against `quantize_weight` with
    RTN, on partial last groups, per-row groups, all-zero and constant groups and rows."""
    from moebits.methods.fri.proxy import _rtn_squared_errors

    g = torch.Generator().manual_seed(shape[2])
    w = torch.randn(*shape, generator=g) * torch.rand(shape[0], shape[1], 1, generator=g) * 3
    w[0, 0] = 0.0  # an all-zero row
    w[0, 1, :16] = 0.75  # a constant group
    w[-1, -1, 5] = 40.0  # an outlier
    m = torch.rand(shape[0], shape[2], generator=g)
    choices = [Choice(b, gs, "gptq") for gs in (16, 32, -1) for b in (2, 3, 4, 8)] + [Choice(16, 32, "gptq")]
    got = _rtn_squared_errors(w, m, choices)
    assert sorted(got) == [j for j, c in enumerate(choices) if not c.is_fp]
    for j, err in got.items():
        c = choices[j]
        wq = quantize_weight(w, Choice(c.bits, c.group_size, "rtn"))
        assert np.array_equal(err, torch.einsum("noi,ni->n", (wq - w) ** 2, m).double().numpy()), c.label


def test_down_inputs_are_not_read_off_a_forward_with_input_transforms():
    """With an online rotation installed the experts run `transforms.experts_forward`: calibration recomputes
    the down inputs (through the transforms) and gets what the old collection got."""
    from moebits import calibrate as C

    ad = MoEAdapter(tiny_model("olmoe"))
    l = ad.moe_layers[0]
    qr = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(3)))[0]
    ad.set_input_transform(Unit(l, 1, "down"), "rotate", lambda h: h @ qr)
    seen = {}
    orig_add = C.LayerCollector.add

    def add(self, b):
        seen.setdefault(b.layer, []).append(b.down_input is not None)
        orig_add(self, b)

    win = random_windows(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(2)), 4, 32)
    C.LayerCollector.add = add
    try:
        cal = calibrate(ad, win, progress=False)
    finally:
        C.LayerCollector.add = orig_add
    assert not any(seen[l]) and all(seen[m] for m in ad.moe_layers if m != l)
    x = cal.inputs[(l, 1)].x
    h = ad.expert_intermediate(l, 1, x)
    assert torch.allclose(cal.inputs[(l, 1)].h_down, h.T @ h / x.shape[0], rtol=1e-5, atol=1e-6)  # rotated inputs
