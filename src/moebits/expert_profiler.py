"""The expert-local metric (profile.py) for any set of (unit, choice) pairs, at the cost of what it measures.

`ExpertProfiler.measure(pairs, table)` gives every pair the number `profile.profile_expert` has always
given it (bit for bit: tests/test_profile_speed.py holds the old loop as its reference), but does the
work once where the old loop repeated it per call, per choice and per batch:

* **GPTQ's Hessian work once per expert.** The damped inverse Hessian's Cholesky factor depends on the
  Hessian alone (`quant.gptq.prepare_hessian`); gate and up read the same one. It is prepared once per
  (expert, input) and kept (LRU, bounded by bytes) across calls, e.g. the adaptive sampler's rounds.
* **One GPTQ call for many pairs.** GPTQ's rows never interact, so every weight that reads one Hessian
  (gate and up, at every bit-width asked for) is stacked as rows of one matrix with per-row bit-widths,
  and experts whose stacks have one shape go in one batched call: a round of the adaptive sampler
  spread over all layers and bit-widths is a handful of calls instead of one per (layer, kind,
  choice), whose per-column loop costs nearly the same for 1 or 64 experts.
* **Each expert's reference forward once, and only the part a block changes.** The unquantized pieces
  (gate activation, up output, output) of every touched expert are kept (LRU, bounded by bytes;
  recomputed when evicted), so a quantized gate costs its own matmul and the down projection, a
  quantized down projection one matmul, and no round recomputes a reference.

Memory: at most `cache_bytes` of reference pieces (`(2 I + H) * 4` bytes per routed token of an expert
in float32), `hessian_bytes` of prepared Hessians, and one chunk of about `chunk_bytes` of float32
weights being quantized (GPTQ's working copies are a few times that).
"""
from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .calibrate import ExpertInputs
from .models.act_quant import act_quantizer
from .models.adapter import MoEAdapter
from .quant import quantize_weight
from .quant.gptq import PreparedHessian, prepare_hessian, quantize_gptq_prepared
from .table import SensitivityTable
from .units import Choice, Unit

CACHE_BYTES = 512 * 2 ** 20  # reference pieces kept across calls
HESSIAN_BYTES = 256 * 2 ** 20  # prepared Hessians kept across calls
CHUNK_BYTES = 64 * 2 ** 20  # float32 weights quantized before their errors are measured and they are dropped
GPTQ_CALL_BYTES = 4 * 2 ** 20  # rows x column block x 4 bytes per batched GPTQ call (near the L2 cache)
DAMP = 0.01  # quant.quantize_weight's default, which profiling has always used


def hessian_input(kind: str) -> str:
    """Which of an expert's two Hessians a block reads: "in" (gate, up) or "down"."""
    return "down" if kind == "down" else "in"


@dataclass
class _Reference:
    """One expert's unquantized forward, in pieces (what a quantized block leaves unchanged)."""
    x: torch.Tensor  # [n, H] inputs in the weights' dtype
    xg: torch.Tensor  # gate's input after the installed transforms (x itself when there are none)
    xu: torch.Tensor
    gate_act: torch.Tensor  # [n, I] act(xg @ gate^T)
    up_out: torch.Tensor  # [n, I] xu @ up^T
    h: torch.Tensor  # [n, I] the down projection's input (gate_act * up_out through its transforms)
    y: torch.Tensor | None  # [n, H] the expert's output; None until a pair needs it (the proxy needs only h)
    g: torch.Tensor  # [n, 1] routing weights in float64 (the error is weighted in float64, as always)
    down: torch.Tensor  # the expert's down weight (a view of the model's)
    act_fn: object
    x_is_copy: bool  # False when `x` is the calibration's own tensor (same dtype): it costs nothing here

    @property
    def nbytes(self) -> int:
        own = [self.gate_act, self.up_out, self.h, self.g] + ([self.x] if self.x_is_copy else [])
        own += [] if self.y is None else [self.y]
        own += [t for t in (self.xg, self.xu) if t is not self.x]
        return sum(t.numel() * t.element_size() for t in own)


class _LRU:
    """An ordered dict bounded by the summed `nbytes` of its values (the newest entry is always kept)."""

    def __init__(self, max_bytes: int, size=lambda v: v.nbytes):
        self.max_bytes, self.size = max_bytes, size
        self.items: OrderedDict = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key):
        v = self.items.get(key)
        if v is None:
            self.misses += 1
            return None
        self.hits += 1
        self.items.move_to_end(key)
        return v

    def put(self, key, value) -> None:
        if key in self.items:
            self.bytes -= self.size(self.items.pop(key))
        self.items[key] = value
        self.bytes += self.size(value)
        while self.bytes > self.max_bytes and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.bytes -= self.size(old)


@dataclass
class _Job:
    """One weight to quantize: `unit` with `choice` (its weight part), for the pairs in `pairs`."""
    unit: Unit
    choice: Choice
    pairs: list  # [(unit, choice)] measured with this weight (choices differing only in activation bits)
    weight: torch.Tensor | None = None  # the quantized weight, once computed
    seconds: float = 0.0  # its share of the quantization calls


class ExpertProfiler:
    """Measures (unit, choice) pairs with the expert-local metric into a `SensitivityTable`, keeping the
    reference forwards and prepared Hessians it computed for later calls (see the module doc)."""

    def __init__(self, adapter: MoEAdapter, inputs: dict[tuple[int, int | str], ExpertInputs],
                 act_order: bool = False, act_clip: float = 1.0, cache_bytes: int = CACHE_BYTES,
                 hessian_bytes: int = HESSIAN_BYTES, chunk_bytes: int = CHUNK_BYTES):
        self.adapter, self.inputs, self.act_order, self.act_clip = adapter, inputs, act_order, act_clip
        self.chunk_bytes = chunk_bytes
        self.refs = _LRU(cache_bytes)
        self.hessians = _LRU(hessian_bytes)
        self.hessian_seconds = 0.0  # spent preparing Hessians (shared out over the jobs that needed them)
        self._scratch: torch.Tensor | None = None  # float64 buffer of the error reductions

    # -- quantization ----------------------------------------------------------------------------
    def _prepared(self, layer: int, expert, hkind: str) -> tuple[PreparedHessian, float]:
        """The expert's prepared Hessian and the seconds preparing it took now (0 when cached)."""
        key = (layer, expert, hkind)
        prep = self.hessians.get(key)
        if prep is not None:
            return prep, 0.0
        t0 = time.perf_counter()
        inp = self.inputs[(layer, expert)]
        h = inp.h_in if hkind == "in" else inp.h_down
        if h is None:  # a calibration saved before Hessians were accumulated (apply.layer_hessians)
            from .apply import layer_hessians

            h = layer_hessians(self.adapter, layer, self.inputs, [expert])[(expert, hkind)]
        prep = prepare_hessian(h, DAMP, self.act_order)
        self.hessians.put(key, prep)
        return prep, time.perf_counter() - t0

    def _quantize_gptq(self, jobs: list[_Job]) -> None:
        """Plain GPTQ jobs: the weights that read one Hessian stacked as rows (with their bit-widths),
        same-shape stacks of several experts batched into calls of about `GPTQ_CALL_BYTES` per block of
        columns (GPTQ's inner loop streams that block once per column: kept near the L2 cache it runs
        2x faster than a batch of the whole layer, and the loop's Python overhead stays amortised)."""
        by_hessian: dict[tuple, list[_Job]] = defaultdict(list)
        for j in jobs:
            by_hessian[(j.unit.layer, j.unit.expert, hessian_input(j.unit.kind), j.choice.group_size)].append(j)
        entries: dict[tuple, list[tuple]] = defaultdict(list)  # (rows, K, group size) -> [(hessian key, jobs)]
        for key, members in by_hessian.items():
            R, K = self.adapter.weight(members[0].unit).shape
            block = min(K, key[3] if key[3] > 0 else 128)
            if len(members) * R * block * 4 <= GPTQ_CALL_BYTES:
                entries[(len(members) * R, K, key[3])].append((key, members))
            else:  # a large stack: one weight per entry
                for j in members:
                    entries[(R, K, key[3])].append((key, [j]))
        for (rows, K, group_size), items in entries.items():
            block = min(K, group_size if group_size > 0 else 128)
            per_call = max(1, GPTQ_CALL_BYTES // (rows * block * 4))
            for s in range(0, len(items), per_call):
                self._gptq_call(items[s:s + per_call], group_size)

    def _gptq_call(self, items: list[tuple], group_size: int) -> None:
        preps, prep_seconds = [], []
        for (layer, expert, hkind, _), _members in items:
            p, s = self._prepared(layer, expert, hkind)
            preps.append(p)
            prep_seconds.append(s)
        t0 = time.perf_counter()
        weights = [[self.adapter.weight(j.unit) for j in members] for _, members in items]
        w = torch.stack([torch.cat(ws) for ws in weights])
        bits = torch.stack([torch.cat([torch.full((wi.shape[0],), float(j.choice.bits)) for wi, j in zip(ws, members)])
                            for ws, (_, members) in zip(weights, items)])
        if not bool(torch.isfinite(w).all()):  # as quantize_weight refuses it
            raise FloatingPointError(f"a {tuple(w.shape)} weight stack of layer {items[0][0][0]} to quantize with "
                                     f"GPTQ is not finite ({int((~torch.isfinite(w)).sum())} NaN/inf entries): "
                                     "check the checkpoint")
        q = quantize_gptq_prepared(w, PreparedHessian.cat(preps), bits, group_size)
        if not bool(torch.isfinite(q).all()):
            raise FloatingPointError(f"GPTQ gave non-finite values for a finite {tuple(w.shape)} weight stack "
                                     "(a quantizer defect; please report it)")
        share = (time.perf_counter() - t0) / len(items)
        for (_, members), ws, qi, s in zip(items, weights, q, prep_seconds):
            r0 = 0
            for j, wi in zip(members, ws):
                j.weight, r0 = qi[r0:r0 + wi.shape[0]], r0 + wi.shape[0]
                j.seconds += (share + s) / len(members)

    def _quantize_other(self, jobs: list[_Job]) -> None:
        """Any other quantizer (RTN, HQQ, low-rank, fp16, GPTQ with a compensator): one batched
        `quantize_weight` per (layer, kind, shared, choice), as profile.py always did."""
        groups: dict[tuple, list[_Job]] = defaultdict(list)
        for j in jobs:
            groups[(j.unit.layer, j.unit.kind, j.unit.is_shared, j.choice)].append(j)
        for (layer, kind, _, choice), members in groups.items():
            t0 = time.perf_counter()
            w = torch.stack([self.adapter.weight(j.unit) for j in members])
            h = None
            if choice.quantizer == "gptq" and not choice.is_fp:
                h = torch.stack([self._hessian(j.unit) for j in members])
            wq = quantize_weight(w, choice, hessian=h, act_order=self.act_order)
            share = (time.perf_counter() - t0) / len(members)
            for j, q in zip(members, wq):
                j.weight, j.seconds = q, share

    def _hessian(self, unit: Unit) -> torch.Tensor:
        inp = self.inputs[(unit.layer, unit.expert)]
        h = inp.h_in if hessian_input(unit.kind) == "in" else inp.h_down
        if h is None:
            from .apply import layer_hessians

            h = layer_hessians(self.adapter, unit.layer, self.inputs, [unit.expert])[(unit.expert, hessian_input(unit.kind))]
        return h

    # -- forwards --------------------------------------------------------------------------------
    def _reference(self, layer: int, expert, with_output: bool = True) -> tuple[_Reference, float]:
        """The expert's reference pieces (kept across calls) and the seconds computing them took now;
        `with_output=False`: the output `y` (one more matmul) may be left for a later call to add."""
        ref = self.refs.get((layer, expert))
        if ref is not None and (ref.y is not None or not with_output):
            return ref, 0.0
        t0 = time.perf_counter()
        if ref is None:
            ad = self.adapter
            gate_w, up_w, down_w = (ad.weight(Unit(layer, expert, k)) for k in ("gate", "up", "down"))
            inp = self.inputs[(layer, expert)]
            x = inp.x.to(gate_w.dtype)
            xg, xu = ad.block_input(layer, expert, "gate", x), ad.block_input(layer, expert, "up", x)
            gate_act = ad.act_fn(layer, expert)(xg @ gate_w.T.to(x.dtype))
            up_out = xu @ up_w.T.to(x.dtype)
            h = ad.block_input(layer, expert, "down", gate_act * up_out)
            ref = _Reference(x, xg, xu, gate_act, up_out, h, None, inp.g.double()[:, None], down_w,
                             ad.act_fn(layer, expert), x_is_copy=x is not inp.x)
        if with_output:
            ref.y = ref.h @ ref.down.T.to(ref.h.dtype)
        self.refs.put((layer, expert), ref)  # (again: its size grew by y)
        return ref, time.perf_counter() - t0

    def intermediate(self, layer: int, expert) -> torch.Tensor:
        """The expert's unquantized down-projection input `[n, I]` on its inputs (`expert_intermediate`),
        from its reference forward (computed and kept if it was not; its output is left for the pairs)."""
        return self._reference(layer, expert, with_output=False)[0].h

    def _output(self, ref: _Reference, unit: Unit, q: torch.Tensor, act: dict | None) -> torch.Tensor:
        """The expert's output with `unit`'s block replaced by `q` (and its input fake-quantized by
        `act`), computed as `MoEAdapter.expert_forward` computes it, from the unchanged pieces."""
        ad, layer, expert, kind = self.adapter, unit.layer, unit.expert, unit.kind
        x = ref.x
        if kind == "gate":
            xg = ad.block_input(layer, expert, "gate", x, act) if act else ref.xg
            h = ref.act_fn(xg @ q.T.to(x.dtype)) * ref.up_out
        elif kind == "up":
            xu = ad.block_input(layer, expert, "up", x, act) if act else ref.xu
            h = ref.gate_act * (xu @ q.T.to(x.dtype))
        elif act is None:  # the reference's own down input
            return ref.h @ q.T.to(ref.h.dtype)
        else:
            h = ref.gate_act * ref.up_out
        h = ad.block_input(layer, expert, "down", h, act)
        down = q if kind == "down" else ref.down
        return h @ down.T.to(h.dtype)

    # -- the measurement ------------------------------------------------------------------------
    def _float64(self, shape, device) -> torch.Tensor:
        """A float64 scratch tensor of `shape` (one buffer reused by every pair: no allocation per pair)."""
        n = int(np.prod(shape))
        if self._scratch is None or self._scratch.numel() < n or self._scratch.device != device:
            self._scratch = torch.empty(n, dtype=torch.float64, device=device)
        return self._scratch[:n].view(shape)

    def _jobs(self, pairs: list[tuple[Unit, Choice]]) -> list[_Job]:
        jobs: dict[tuple, _Job] = {}
        for u, c in pairs:
            key = (u, c.weight_choice)  # activation bits do not change the stored weight
            if key not in jobs:
                jobs[key] = _Job(u, c.weight_choice, [])
            jobs[key].pairs.append((u, c))
        return sorted(jobs.values(), key=lambda j: (j.unit.sort_key(), j.choice.bits))

    @staticmethod
    def _plain_gptq(c: Choice) -> bool:
        return c.quantizer == "gptq" and not c.is_fp and not c.rank

    def _chunks(self, jobs: list[_Job]):
        """Consecutive jobs (unit order) of about `chunk_bytes` of float32 weights; an expert's jobs
        that read one Hessian are never split."""
        chunk, size, last = [], 0, None
        for j in jobs:
            key = (j.unit.layer, j.unit.expert, hessian_input(j.unit.kind))
            n = self.adapter.weight(j.unit).numel() * 4
            if chunk and size + n > self.chunk_bytes and key != last:
                yield chunk
                chunk, size = [], 0
            chunk.append(j)
            size, last = size + n, key
        if chunk:
            yield chunk

    @torch.no_grad()
    def measure(self, pairs: list[tuple[Unit, Choice]], table: SensitivityTable, progress: bool = False) -> None:
        """Write the error of every (unit, choice) pair into `table` (and its seconds: the pair's share
        of the quantization calls and Hessian preparation, its own forward and a share of its expert's
        reference forward when that was computed now)."""
        bar = tqdm(total=len(pairs), desc="profile (expert)", disable=not progress, leave=False)
        for chunk in self._chunks(self._jobs(pairs)):
            self._quantize_gptq([j for j in chunk if self._plain_gptq(j.choice)])
            self._quantize_other([j for j in chunk if not self._plain_gptq(j.choice)])
            by_expert: dict[tuple, list[_Job]] = defaultdict(list)
            for j in chunk:
                by_expert[(j.unit.layer, j.unit.expert)].append(j)
            for (layer, expert), members in by_expert.items():
                ref, ref_seconds = self._reference(layer, expert)
                n_pairs = sum(len(j.pairs) for j in members)
                for j in members:
                    for u, c in j.pairs:
                        t1 = time.perf_counter()
                        act = {u.kind: act_quantizer(c.act_bits, self.act_clip)} if c.quantizes_acts else None
                        y_q = self._output(ref, u, j.weight, act)
                        # ((y_q - y).double() * g) squared and summed, as always, without temporaries: y_q is
                        # this pair's own tensor, and float32 -> float64 is exact (what .double() gives)
                        d = self._float64(y_q.shape, y_q.device).copy_(y_q.sub_(ref.y))
                        d.mul_(ref.g)
                        err = d.mul_(d).sum().item() / ref.x.shape[0]
                        seconds = j.seconds / len(j.pairs) + ref_seconds / n_pairs + time.perf_counter() - t1
                        table.set(u, c, err, seconds=seconds, measured=True)
                        bar.update()
                    j.weight = None
        bar.close()
