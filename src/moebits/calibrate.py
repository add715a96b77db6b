"""The calibration pass: one forward over the calibration windows that records, per unit, how often
it is routed and what its inputs look like, keeps each expert's routed input tokens (for profiling)
and accumulates each expert's GPTQ Hessians over *all* its routed tokens.

The work is done per MoE layer by a `LayerCollector`: feed it that layer's `RoutedBatch` events (in
any pass that sees them: the in-memory `calibrate()` below, or a streaming pass that materialises
one decoder layer at a time) and `finish()` returns the layer's `UnitStats` rows, `ExpertInputs`
(with Hessians) and never-routed experts; `Calibration.from_layers` joins the layers.

Memory: statistics are running moments. Hessians are `X^T X` sums per expert, one `[H, H]` (gate/up
inputs) and one `[I, I]` (down inputs) each, products in float32 and sums in float64 (a sum over
thousands of batches keeps ~1e-12 relative precision instead of fp32's ~1e-7 x batches; the float64
copy lives only while a layer is collected, the result is stored in float32): per layer
`(E + shared) * (H^2 + I^2) * 8` bytes while collecting (DeepSeek-V2-Lite: 3.2 GB, the demo: 8.7 MB).
Routed inputs are kept in full by default (`max_tokens_per_expert=None`: `tokens * top_k * H * 4`
bytes per layer; the demo at 128 x 256 tokens: 67 MB per layer); a cap keeps a uniform random sample
of that many tokens per expert instead (reservoir by random priority, seeded per layer, so later
windows are not favoured over earlier ones). The Hessians always see every routed token.

Next to each Hessian the collector keeps the routing-weighted column second moments `E[g^2 a^2]` of
the same rows (`a` the expert input x or the down input h, `g` the routing weight: the shared scale
for a shared expert, the generic tokens' weights for a never-routed one), in float64 while collected
(`(E + shared) * (H + I) * 8` bytes per layer): the RTN proxy of FRI (`methods/fri/proxy.py`) reads
them instead of running every expert's gate/up forward again.

`holdout=F` draws (seeded) a fraction F of each expert's routed tokens as held out: the "fit"
Hessians (`h_in_fit`, `h_down_fit`) leave them out, and `Calibration.profile_inputs()` measures a
unit's error on them only, so an expert routed a few times is not scored on the tokens its GPTQ fit
saw. The final quantization (`inputs`) uses the Hessians of all tokens.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .models.adapter import MoEAdapter, RoutedBatch
from .atomic import atomic_path
from .stats import CalibrationStats, UnitStats
from .units import SHARED, Unit

log = logging.getLogger(__name__)

OUTLIER_TAU = 6.0  # |a| > OUTLIER_TAU * (RMS of the unit's routed inputs in that forward) counts as an outlier
GENERIC_CAP = 512  # generic tokens kept per layer as stand-in inputs of never-routed experts (when no cap is set)


class _Moments:
    """Running raw moments of all elements seen, in float64 (for variance, kurtosis, mean-abs)."""

    def __init__(self):
        self.n, self.s1, self.s2, self.s3, self.s4, self.abs1, self.outliers = 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0

    def add(self, a: torch.Tensor) -> None:
        if a.numel() == 0:
            return
        # powers in float32, sums accumulated in float64: exact enough for statistics, no float64 copies
        a = a.detach().reshape(-1).float()
        a_abs, a2 = a.abs(), a * a
        f64 = torch.float64
        s1, s2, s3, s4, abs1 = torch.stack([a.sum(dtype=f64), a2.sum(dtype=f64), (a2 * a).sum(dtype=f64),
                                            (a2 * a2).sum(dtype=f64), a_abs.sum(dtype=f64)]).tolist()
        rms = math.sqrt(s2 / a.numel())
        self.n += a.numel()
        self.s1, self.s2, self.s3, self.s4, self.abs1 = self.s1 + s1, self.s2 + s2, self.s3 + s3, self.s4 + s4, self.abs1 + abs1
        self.outliers += int((a_abs > OUTLIER_TAU * rms).sum()) if rms > 0 else 0

    def add_sums(self, n: int, sums: list[float], outliers: int) -> None:
        """What `add` adds for `n` elements whose float64 sums (s1, s2, s3, s4, abs1) and outlier count
        were computed elsewhere (`_segment_moments`, several experts' rows at once)."""
        self.n += n
        s1, s2, s3, s4, abs1 = sums
        self.s1, self.s2, self.s3, self.s4, self.abs1 = self.s1 + s1, self.s2 + s2, self.s3 + s3, self.s4 + s4, self.abs1 + abs1
        self.outliers += outliers

    def summary(self) -> dict:
        if self.n == 0:
            return {"act_var": 0.0, "act_mean_abs": 0.0, "act_outlier_ratio": 0.0, "act_kurtosis": 0.0}
        n = self.n
        mu, m2, m3, m4 = self.s1 / n, self.s2 / n, self.s3 / n, self.s4 / n
        var = max(m2 - mu * mu, 0.0)
        c4 = m4 - 4 * mu * m3 + 6 * mu * mu * m2 - 3 * mu ** 4
        return {"act_var": var, "act_mean_abs": self.abs1 / n, "act_outlier_ratio": self.outliers / n,
                "act_kurtosis": c4 / (var * var) if var > 0 else 0.0}


def _segment_moments(a: torch.Tensor, rows: list[int]) -> list[tuple[int, list[float], int]]:
    """`_Moments.add`'s numbers for consecutive row segments of `a [N, D]` (float32; `rows[i]` rows in
    segment i), bit for bit, in fewer torch calls: each segment's powers are written into one
    reused buffer (elementwise, so the same values), its five float64 sums are one reduction of that
    buffer (the same reduction as `add`'s five: tests/test_profile_speed.py checks it) and its outliers
    are counted against its threshold as `add` counts them. Calibration calls this for the rows of every
    expert of every batch. Returns [(elements, [s1, s2, s3, s4, abs1], outliers)] per segment."""
    D = a.shape[1]
    flat = a.reshape(-1)
    buf = torch.empty(5, max(rows) * D, dtype=torch.float32, device=a.device)  # a^2, a^3, a^4, |a| (row 0 unused)
    buf64 = torch.empty(5, max(rows) * D, dtype=torch.float64, device=a.device)  # a, a^2, a^3, a^4, |a| in float64
    out, start = [], 0
    for n in rows:
        m = n * D
        seg, p, p64 = flat[start:start + m], buf[:, :m], buf64[:, :m]
        start += m
        torch.mul(seg, seg, out=p[1])
        torch.mul(p[1], seg, out=p[2])
        torch.mul(p[1], p[1], out=p[3])
        torch.abs(seg, out=p[4])
        p64[0].copy_(seg)  # float32 -> float64 is exact: what sum(dtype=float64) converts to before it adds
        p64[1:].copy_(p[1:])
        sums = p64.sum(dim=1).tolist()
        rms = math.sqrt(sums[1] / m) if m else 0.0
        outliers = int(torch.count_nonzero(p[4] > OUTLIER_TAU * rms)) if rms > 0 else 0
        out.append((m, sums, outliers))
    return out


class _Sample:
    """The rows kept for one expert: all of them (`cap` None), or a uniform random sample of at most
    `cap` rows kept by random priority; with each row's routing weight and held-out flag."""

    def __init__(self, cap: int | None, generator: torch.Generator):
        self.cap, self.g = cap, generator
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.prio: torch.Tensor | None = None

    def add(self, rows: torch.Tensor, weights: torch.Tensor, held: torch.Tensor) -> None:
        if rows.shape[0] == 0:
            return
        part = (rows.detach().float().cpu(), weights.detach().float().cpu(), held.cpu())
        if self.cap is None:
            self.parts.append(part)
            return
        prio = torch.rand(rows.shape[0], generator=self.g)
        if self.parts:
            part = tuple(torch.cat([a, b]) for a, b in zip(self.parts[0], part))
            prio = torch.cat([self.prio, prio])
        if prio.shape[0] > self.cap:
            keep = torch.topk(prio, self.cap).indices.sort().values
            part, prio = tuple(t[keep] for t in part), prio[keep]
        self.parts, self.prio = [part], prio

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(rows [n, H], weights [n], held [n] bool), or None when nothing was added."""
        if not self.parts:
            return None
        if len(self.parts) > 1:
            self.parts = [tuple(torch.cat(ts) for ts in zip(*self.parts))]
        return self.parts[0]


class _XtX:
    """Running `X^T X` of all rows added: products in float32, the sum in float64 (see the module doc)."""

    def __init__(self):
        self.sum: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        x = x.float()
        p = x.T @ x
        # a float32 product added into the float64 sum is converted exactly first: the same sum as adding p.double()
        self.sum = p.double() if self.sum is None else self.sum.add_(p)
        self.n += x.shape[0]

    def hessian(self, plus: "_XtX | None" = None) -> torch.Tensor | None:
        """`X^T X / n` in float32 on the CPU (the convention of `quant.hessian_from_inputs`); with
        `plus`, of the rows of both. None without rows."""
        parts = [a for a in (self, plus) if a is not None and a.n]
        if not parts:
            return None
        s = parts[0].sum if len(parts) == 1 else parts[0].sum + parts[1].sum
        return (s / sum(a.n for a in parts)).float().cpu()



class _WeightedSquares:
    """Per expert of a layer (slot `i`), the running column sums of `g^2 a^2` over its rows `a [n, D]` with
    routing weights `g [n]`, of its fit rows and its held-out rows apart (all rows are fit rows without a
    holdout), and their row counts: products in float32, sums in float64. The collector passes all
    routed experts of a batch at once (one product for the batch, one sum per expert, one scatter:
    on the CPU, per-expert torch calls cost more than their arithmetic), one accumulator per input kind."""

    def __init__(self, slots: int):
        self.slots = slots
        self.sums: torch.Tensor | None = None  # [2 (fit, held), slots, D] float64
        self.n = torch.zeros(2, slots, dtype=torch.long)
        self._means: dict = {}  # part -> ([slots, D] float32 means, row counts), made once rows stop coming

    def add(self, slots: list[int], rows: list[int], a: torch.Tensor, g: torch.Tensor,
            held: torch.Tensor | None = None) -> None:
        """Rows `a [N, D]`, weights `g [N]` of the experts `slots`, `rows[i]` consecutive rows each;
        `held [N]` bool marks held-out rows (None: none)."""
        if a.shape[0] == 0:
            return
        self._means = {}
        a, g = a.float(), g.float()
        sq = ((g * g)[:, None] * a).mul_(a)  # g^2 a a: the RTN proxy's order of products
        if self.sums is None:
            self.sums = torch.zeros(2, self.slots, a.shape[1], dtype=torch.float64, device=a.device)
        idx = torch.tensor(slots, device=self.sums.device)
        parts = [(0, sq, None)] if held is None else [(0, sq * ~held[:, None], ~held), (1, sq * held[:, None], held)]
        for part, t, mask in parts:  # rows of the other part count as zeros (adding 0 changes no sum)
            sums = torch.stack([p.sum(0, dtype=torch.float64) for p in t.split(rows)])
            self.sums[part].index_add_(0, idx, sums.to(self.sums.device))
            n = torch.tensor(rows) if mask is None else torch.stack([m.sum() for m in mask.split(rows)])
            self.n[part].index_add_(0, idx, n.cpu())

    def mean(self, slot: int, part: int | None = None) -> torch.Tensor | None:
        """`sum g^2 a^2 / n [D]` (float32, CPU) of the slot's rows (`part` None), its fit rows (0) or held-out
        rows (1); None without rows."""
        if self.sums is None:
            return None
        if part not in self._means:  # every slot's at once (finish asks for each expert in turn)
            s, n = (self.sums.sum(0), self.n.sum(0)) if part is None else (self.sums[part], self.n[part])
            self._means[part] = ((s / n.clamp(min=1)[:, None]).float().cpu(), n.tolist())
        m, n = self._means[part]
        return m[slot].clone() if n[slot] else None  # a copy: saved tensors must not share memory


@dataclass
class ExpertInputs:
    """The tokens routed to one expert: inputs `x [n, H]` and routing weights `g [n]` (all of them,
    or a sample under a cap), and the GPTQ Hessians `X^T X / n` of *all* its routed tokens.
    Hessians are None in calibrations saved before they were accumulated: `apply.layer_hessians`
    then builds them from `x`.

    `m_in [H]` / `m_down [I]`: `sum g^2 a^2 / n` per column of the expert's inputs `a = x` / down inputs
    `a = h` (the RTN proxy's second moments), over the same rows as the Hessians: every routed token
    (under a cap a better estimate of the same expectation than the kept sample `x`), for a never-routed
    expert its generic tokens with their weights. None in calibrations saved before they were
    accumulated or collected without Hessians: the proxy then computes them from `x` and `g`."""
    x: torch.Tensor
    g: torch.Tensor
    fallback: bool = False  # True when the expert was never routed and these are generic tokens
    h_in: torch.Tensor | None = None  # [H, H] of the gate/up inputs (float32)
    h_down: torch.Tensor | None = None  # [I, I] of the down projection's inputs
    held_out: torch.Tensor | None = None  # [n] bool, with --holdout: rows left out of the fit Hessians
    h_in_fit: torch.Tensor | None = None  # Hessians of the tokens not held out (with --holdout)
    h_down_fit: torch.Tensor | None = None
    m_in: torch.Tensor | None = None  # [H] sum g^2 x^2 / n of all tokens (float32)
    m_down: torch.Tensor | None = None  # [I] sum g^2 h^2 / n of all tokens
    m_in_held: torch.Tensor | None = None  # the same of the held-out tokens only (with --holdout)
    m_down_held: torch.Tensor | None = None

    def for_profiling(self) -> "ExpertInputs":
        """What a unit's error is measured with: under a holdout, the held-out rows, their second
        moments and the Hessians fitted without them; when the draw left an expert no held-out row
        (or no fit row), all its rows, all-token Hessians and moments (as without a holdout)."""
        m = self.held_out
        if m is None or not bool(m.any()) or self.h_in_fit is None:
            return replace(self, held_out=None, h_in_fit=None, h_down_fit=None, m_in_held=None, m_down_held=None)
        return ExpertInputs(self.x[m], self.g[m], self.fallback, self.h_in_fit, self.h_down_fit,
                            m_in=self.m_in_held, m_down=self.m_down_held)


@dataclass
class LayerCalibration:
    """What a `LayerCollector` found in one MoE layer."""
    layer: int
    rows: list[UnitStats]  # the layer's units, in `adapter.units()` order
    inputs: dict[tuple[int, int | str], ExpertInputs]  # (layer, expert) -> inputs and Hessians
    never_routed: list[tuple[int, int]]
    total_tokens: int  # tokens that passed the layer


@dataclass
class Calibration:
    stats: CalibrationStats  # per-unit columns, aligned with adapter.units()
    inputs: dict[tuple[int, int | str], ExpertInputs]  # (layer, expert) -> routed inputs and Hessians
    total_tokens: int
    never_routed: list[tuple[int, int]] = field(default_factory=list)

    STATS_FILE = "stats.json"
    INPUTS_FILE = "calib_inputs.safetensors"
    _TENSORS = ("h_in", "h_down", "held_out", "h_in_fit", "h_down_fit",  # optional per-expert tensors
                "m_in", "m_down", "m_in_held", "m_down_held")

    @classmethod
    def from_layers(cls, layers: list[LayerCalibration]) -> "Calibration":
        """Join the layers' results (in layer order) into one calibration; warn about never-routed experts."""
        if not layers:
            raise ValueError("no MoE layer was calibrated")
        totals = {lc.total_tokens for lc in layers}
        if len(totals) != 1:
            raise ValueError(f"the layers saw different numbers of tokens {sorted(totals)}: "
                             "feed every layer's collector the same windows")
        layers = sorted(layers, key=lambda lc: lc.layer)
        rows = [r for lc in layers for r in lc.rows]
        inputs = {k: v for lc in layers for k, v in lc.inputs.items()}
        never = [k for lc in layers for k in lc.never_routed]
        total = totals.pop()
        if never:
            log.warning("%d expert(s) were never routed during calibration (e.g. %s); their errors are measured on "
                        "generic tokens of their layer and they count as routed once. Use more --nsamples to see "
                        "them.", len(never), ", ".join(f"L{l}.E{e}" for l, e in never[:5]))
        return cls(CalibrationStats.from_rows(rows, total), inputs, total, never)

    def frequency(self) -> np.ndarray:
        """[U] routed-token frequency of `stats.units`."""
        return self.stats.frequency

    def profile_inputs(self) -> dict[tuple[int, int | str], ExpertInputs]:
        """The inputs errors are measured on: `inputs` itself, or under a holdout the held-out tokens
        with the Hessians fitted on the rest (`ExpertInputs.for_profiling`)."""
        if not any(inp.held_out is not None for inp in self.inputs.values()):
            return self.inputs
        return {k: inp.for_profiling() for k, inp in self.inputs.items()}

    # -- a calibration in a directory: stats.json (readable) + calib_inputs.safetensors (the samples) --
    def save(self, directory: str | Path) -> None:
        """Write both files atomically (the inputs first: `exists` looks for the stats)."""
        directory = Path(directory)
        self.save_inputs(directory / self.INPUTS_FILE)
        self.stats.save(directory / self.STATS_FILE, {"never_routed": [list(k) for k in self.never_routed]})

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        return (Path(directory) / cls.STATS_FILE).exists() and (Path(directory) / cls.INPUTS_FILE).exists()

    @classmethod
    def load(cls, directory: str | Path) -> "Calibration":
        directory = Path(directory)
        if not cls.exists(directory):
            raise FileNotFoundError(f"no calibration in {directory} (expected {cls.STATS_FILE} and {cls.INPUTS_FILE})")
        stats, meta = CalibrationStats.load(directory / cls.STATS_FILE)
        try:
            inputs = cls.load_inputs(directory / cls.INPUTS_FILE)
        except Exception as e:  # safetensors raises its own error types; what matters is the file
            raise ValueError(f"{directory / cls.INPUTS_FILE} is unreadable ({type(e).__name__}: {str(e)[:120]}); "
                             "it is truncated or damaged: delete it to calibrate again") from None
        return cls(stats, inputs, meta["total_tokens"], [tuple(x) for x in meta.get("never_routed", [])])

    def save_inputs(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        import json

        tensors, meta = {}, {}
        for (layer, expert), inp in self.inputs.items():
            key = f"{layer}.{expert}"
            tensors[f"{key}.x"], tensors[f"{key}.g"] = inp.x.contiguous(), inp.g.contiguous()
            for name in self._TENSORS:
                t = getattr(inp, name)
                if t is not None:
                    tensors[f"{key}.{name}"] = t.contiguous()
            meta[key] = "fallback" if inp.fallback else "routed"
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"experts": json.dumps(meta), "total_tokens": str(self.total_tokens)})

    @classmethod
    def load_inputs(cls, path: str | Path) -> dict[tuple[int, int | str], ExpertInputs]:
        from safetensors import safe_open
        import json

        out = {}
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["experts"])
            names = set(f.keys())
            for key, kind in meta.items():
                layer, expert = key.split(".")
                e: int | str = SHARED if expert == SHARED else int(expert)
                extra = {n: f.get_tensor(f"{key}.{n}") for n in cls._TENSORS if f"{key}.{n}" in names}
                out[(int(layer), e)] = ExpertInputs(f.get_tensor(f"{key}.x"), f.get_tensor(f"{key}.g"),
                                                    kind == "fallback", **extra)
        return out


def _layer_seed(seed: int, layer: int) -> int:
    """Each layer draws from its own generator, so a layer's samples do not depend on the order in
    which layers are collected (in-memory: interleaved per batch; streaming: one layer after another)."""
    return (int(seed) * 1_000_003 + 7919 * (layer + 1)) % (2 ** 63)


class LayerCollector:
    """Calibration of one MoE layer, fed that layer's `RoutedBatch` events one at a time.

        col = LayerCollector(adapter, layer, max_tokens_per_expert=None, seed=0, holdout=0.0)
        for b in routed_batches_of(layer): col.add(b)
        result = col.finish()  # LayerCalibration: UnitStats rows, ExpertInputs (with Hessians), never routed

    Reads the layer's expert weights through `adapter` (for the down inputs and weight statistics),
    so they must be materialised while it is used. `max_tokens_per_expert` None or 0: keep every
    routed token; `hessians=False` skips the `X^T X` sums (statistics only)."""

    def __init__(self, adapter: MoEAdapter, layer: int, max_tokens_per_expert: int | None = None, seed: int = 0,
                 hessians: bool = True, holdout: float = 0.0):
        if layer not in adapter.moe_layers:
            raise ValueError(f"layer {layer} is not a MoE layer (MoE layers: {adapter.moe_layers})")
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"holdout is a fraction of routed tokens in [0, 1), got {holdout}")
        if max_tokens_per_expert is not None and max_tokens_per_expert < 0:
            raise ValueError(f"max_tokens_per_expert must be >= 0 (0 or None: all tokens), got {max_tokens_per_expert}")
        cap = max_tokens_per_expert or None
        self.adapter, self.layer, self.holdout, self.with_hessians = adapter, layer, float(holdout), hessians
        self.gen = torch.Generator().manual_seed(_layer_seed(seed, layer))
        E = self.E = adapter.num_experts
        self.experts: list[int | str] = list(range(E)) + ([SHARED] if adapter.num_shared_experts > 0 else [])
        self.counts = torch.zeros(E, dtype=torch.long)
        self.mass = torch.zeros(E, dtype=torch.float64)
        self.shared_mass = 0.0
        self.tokens = 0
        self.moments = {e: {k: _Moments() for k in ("in", "down")} for e in self.experts}
        self.samples = {e: _Sample(cap, self.gen) for e in self.experts}
        self.generic = _Sample(cap or GENERIC_CAP, self.gen)  # fallback tokens of never-routed experts
        self.xtx = {e: {k: _XtX() for k in ("in", "down")} for e in self.experts}
        self.xtx_held = {e: {k: _XtX() for k in ("in", "down")} for e in self.experts}
        # the proxy's moments, per input kind (a shared expert's down input may be wider: its own sums)
        self.squares = {k: _WeightedSquares(E) for k in ("in", "down")}
        self.shared_squares = {k: _WeightedSquares(1) for k in ("in", "down")}

    def _held(self, n: int, device) -> torch.Tensor:
        if self.holdout <= 0:
            return torch.zeros(n, dtype=torch.bool, device=device)
        return (torch.rand(n, generator=self.gen) < self.holdout).to(device)

    def _squares(self, e) -> tuple[dict[str, _WeightedSquares], int]:
        """Where expert `e`'s weighted squares are summed: ({kind: accumulator}, slot)."""
        return (self.shared_squares, 0) if e == SHARED else (self.squares, int(e))

    def _add_expert(self, e, x: torch.Tensor, g: torch.Tensor) -> None:
        h = self.adapter.expert_intermediate(self.layer, e, x)  # the down projection's inputs
        self.moments[e]["in"].add(x)
        self.moments[e]["down"].add(h)
        held = self._held(x.shape[0], x.device)
        self.samples[e].add(x, g, held)
        if self.with_hessians:  # under a holdout, `xtx` sums the fit rows and `xtx_held` the others
            for k, a in (("in", x), ("down", h)):
                if self.holdout > 0:
                    self.xtx[e][k].add(a[~held])
                    self.xtx_held[e][k].add(a[held])
                else:
                    self.xtx[e][k].add(a)
            acc, slot = self._squares(e)
            for k, a in (("in", x), ("down", h)):
                acc[k].add([slot], [x.shape[0]], a, g, held if self.holdout > 0 else None)

    def _add_routed(self, routed: list[int], counts: torch.Tensor, order: torch.Tensor, x: torch.Tensor,
                    tok_of: torch.Tensor, flat_w: torch.Tensor, down_input: torch.Tensor | None = None) -> None:
        """`_add_expert` for every routed expert of a batch, with the same numbers: the rows of all of
        them gathered once in expert order, each expert's down inputs computed on its own rows (as
        before) or, when the forward gave them (`RoutedBatch.down_input [T*k, I]`, the same numbers),
        gathered from those, and the activation moments of all of them by `_segment_moments`."""
        rows = counts[routed].tolist()
        n_routed = int(counts.sum())
        pos = order[:n_routed].to(x.device)
        xs, ws = x[tok_of[pos]], flat_w[pos]  # [N, H] routed rows, expert by expert, in token order within each
        starts = np.concatenate([[0], np.cumsum(rows)]).tolist()
        if down_input is not None:
            hs = down_input[pos]
        else:
            h_parts = [self.adapter.expert_intermediate(self.layer, e, xs[a:b]) for e, a, b in zip(routed, starts, starts[1:])]
            hs = torch.cat(h_parts) if len(h_parts) > 1 else h_parts[0]
        for k, a in (("in", xs), ("down", hs)):
            for e, (n, sums, outliers) in zip(routed, _segment_moments(a.float(), rows)):
                self.moments[e][k].add_sums(n, sums, outliers)
        helds = []
        for e, a, b in zip(routed, starts, starts[1:]):
            xe, he = xs[a:b], hs[a:b]
            held = self._held(b - a, x.device)
            helds.append(held)
            self.samples[e].add(xe, ws[a:b], held)
            if self.with_hessians:
                for k, t in (("in", xe), ("down", he)):
                    if self.holdout > 0:
                        self.xtx[e][k].add(t[~held])
                        self.xtx_held[e][k].add(t[held])
                    else:
                        self.xtx[e][k].add(t)
        if self.with_hessians:  # every routed expert's weighted squares at once
            held_rows = torch.cat(helds) if self.holdout > 0 else None
            for k, a in (("in", xs), ("down", hs)):
                self.squares[k].add(routed, rows, a, ws, held_rows)

    @torch.no_grad()
    def add(self, b: RoutedBatch) -> None:
        if b.layer != self.layer:
            raise ValueError(f"a batch of layer {b.layer} was fed to the collector of layer {self.layer}")
        x = b.hidden.float()
        flat_idx, flat_w = b.top_k_index.reshape(-1), b.top_k_weights.reshape(-1).float()
        tok_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(b.top_k_index.shape[1])
        E = self.E
        self.tokens += x.shape[0]
        counts = torch.bincount(flat_idx.cpu(), minlength=E)
        self.counts += counts[:E]
        self.mass += torch.zeros(E, dtype=torch.float64).index_add_(0, flat_idx.cpu(), flat_w.double().cpu())
        self.generic.add(x, torch.full((x.shape[0],), flat_w.mean().item()), torch.zeros(x.shape[0], dtype=torch.bool))
        # one stable sort groups the routed (token, slot) positions by expert, in token order within each
        # expert (what a mask per expert selected, without E passes over all positions)
        order = torch.argsort(flat_idx, stable=True)
        routed = torch.nonzero(counts[:E]).flatten().tolist()
        if routed:
            self._add_routed(routed, counts[:E], order, x, tok_of, flat_w, b.down_input)
        if SHARED in self.samples:
            s = self.adapter.shared_scale(self.layer, x.to(b.hidden.dtype)).float()
            self.shared_mass += s.sum().item()
            self._add_expert(SHARED, x, s)

    def _fallback(self, e) -> ExpertInputs:
        """A never-routed expert: the layer's generic tokens stand in (statistics, Hessians, moments)."""
        rows, weights, _ = self.generic.result()
        w = self.adapter.weight(Unit(self.layer, e, "gate"))
        h = self.adapter.expert_intermediate(self.layer, e, rows.to(w.device, w.dtype)).float()
        self.moments[e]["in"].add(rows)
        self.moments[e]["down"].add(h)
        H, M = {}, {}
        if self.with_hessians:
            for k, a in (("in", rows), ("down", h)):
                acc, sq = _XtX(), _WeightedSquares(1)
                acc.add(a)
                sq.add([0], [a.shape[0]], a, weights)
                H[k], M[k] = acc.hessian(), sq.mean(0)
        return ExpertInputs(rows.clone(), weights.clone(), fallback=True, h_in=H.get("in"), h_down=H.get("down"),
                            m_in=M.get("in"), m_down=M.get("down"))

    def _routed(self, e, rows, weights, held) -> ExpertInputs:
        if not self.with_hessians:
            return ExpertInputs(rows, weights)
        fit, ho = self.xtx[e], self.xtx_held[e]
        acc, slot = self._squares(e)
        out = ExpertInputs(rows, weights, h_in=fit["in"].hessian(ho["in"]), h_down=fit["down"].hessian(ho["down"]),
                           m_in=acc["in"].mean(slot), m_down=acc["down"].mean(slot))
        if self.holdout > 0:
            out.held_out = held
            if fit["in"].n and ho["in"].n:  # else for_profiling falls back to all tokens
                out.h_in_fit, out.h_down_fit = fit["in"].hessian(), fit["down"].hessian()
                out.m_in_held, out.m_down_held = acc["in"].mean(slot, part=1), acc["down"].mean(slot, part=1)
        return out

    @torch.no_grad()
    def finish(self) -> LayerCalibration:
        if self.tokens == 0:
            raise ValueError(f"the collector of layer {self.layer} saw no tokens")
        l, ad = self.layer, self.adapter
        inputs: dict[tuple[int, int | str], ExpertInputs] = {}
        never: list[tuple[int, int]] = []
        for e in self.experts:
            res = self.samples[e].result()
            if res is None:
                never.append((l, e))
                inputs[(l, e)] = self._fallback(e)
            else:
                inputs[(l, e)] = self._routed(e, *res)
        self.xtx = self.xtx_held = self.squares = self.shared_squares = None  # the float64 sums are not needed any more
        never_set = set(never)
        rows = []
        for u in ad.units():
            if u.layer != l:
                continue
            # gate and up read the same input: their activation statistics are shared
            m = self.moments[u.expert]["down" if u.kind == "down" else "in"].summary()
            w = ad.weight(u).float().abs()
            if u.is_shared:
                tokens, freq, rmass = self.tokens, 1.0, self.shared_mass
            else:
                tokens = int(self.counts[u.expert])
                freq = max(tokens, 1) / self.tokens  # never-routed experts count as routed once
                rmass = float(self.mass[u.expert])
            out_f, in_f = w.shape
            rows.append(UnitStats(unit=u, out_features=out_f, in_features=in_f, tokens=tokens, frequency=freq,
                                  routing_mass=rmass, weight_scale=w.mean().item(),
                                  weight_max_over_mean=(w.max() / w.mean().clamp(min=1e-12)).item(),
                                  num_layers=len(ad.decoder_layers), never_routed=(u.layer, u.expert) in never_set,
                                  **m))
        return LayerCalibration(l, rows, inputs, never, self.tokens)


@torch.no_grad()
def calibrate(adapter: MoEAdapter, windows: torch.Tensor, batch_size: int = 8,
              max_tokens_per_expert: int | None = None, seed: int = 0, progress: bool = True,
              hessians: bool = True, holdout: float = 0.0) -> Calibration:
    """Run the model over `windows [n, T]` once, every MoE layer feeding its `LayerCollector`.
    `max_tokens_per_expert` None/0 keeps every routed token (the default); the Hessians always
    cover every routed token."""
    model = adapter.model
    device = next(model.parameters()).device
    collectors = {l: LayerCollector(adapter, l, max_tokens_per_expert, seed, hessians, holdout)
                  for l in adapter.moe_layers}
    total_tokens = 0
    with adapter.capture_routing(lambda b: collectors[b.layer].add(b), down_inputs=True):
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="calibrate", disable=not progress, leave=False):
            batch = windows[start:start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            total_tokens += batch.numel()
    cal = Calibration.from_layers([collectors[l].finish() for l in adapter.moe_layers])
    if cal.total_tokens != total_tokens:
        raise RuntimeError(f"the MoE layers saw {cal.total_tokens} tokens, the windows hold {total_tokens}")
    return cal


def frequency_summary(stats: CalibrationStats, total_tokens: int) -> list[dict]:
    """Per MoE layer: min / max / coefficient of variation of routed-expert frequencies (routed tokens /
    calibration tokens, without the never-routed floor), max over mean, and how many were never routed."""
    out = []
    layer_of = np.array([u.layer for u in stats.units])
    routed_gate = np.array([u.kind == "gate" and not u.is_shared for u in stats.units])
    for layer in sorted(set(layer_of.tolist())):
        tokens = torch.tensor(stats.tokens[(layer_of == layer) & routed_gate], dtype=torch.float64)
        if tokens.numel():
            f = tokens / total_tokens
            mean = f.mean().item()
            out.append({"layer": layer, "min": f.min().item(), "max": f.max().item(),
                        "cv": (f.std(unbiased=False) / f.mean()).item() if mean > 0 else 0.0,
                        "max_over_mean": f.max().item() / mean if mean > 0 else 0.0,
                        "never_routed": int((tokens == 0).sum())})
    return out
