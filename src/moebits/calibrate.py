"""The calibration pass: one streaming forward over the calibration windows that records, per unit,
how often it is routed and what its inputs look like, and keeps a capped sample of each expert's
routed input tokens (for profiling and GPTQ).

Memory stays bounded: statistics are running moments, and each expert keeps at most
`max_tokens_per_expert` inputs, a uniform random sample of its routed tokens (reservoir by random
priority, seeded), so later windows are not favoured over earlier ones.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .models.adapter import MoEAdapter, RoutedBatch
from .run import atomic_path
from .stats import CalibrationStats, UnitStats
from .units import KINDS, SHARED, Unit

log = logging.getLogger(__name__)

OUTLIER_TAU = 6.0  # |a| > OUTLIER_TAU * (RMS of the unit's routed inputs in that forward) counts as an outlier


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

    def summary(self) -> dict:
        if self.n == 0:
            return {"act_var": 0.0, "act_mean_abs": 0.0, "act_outlier_ratio": 0.0, "act_kurtosis": 0.0}
        n = self.n
        mu, m2, m3, m4 = self.s1 / n, self.s2 / n, self.s3 / n, self.s4 / n
        var = max(m2 - mu * mu, 0.0)
        c4 = m4 - 4 * mu * m3 + 6 * mu * mu * m2 - 3 * mu ** 4
        return {"act_var": var, "act_mean_abs": self.abs1 / n, "act_outlier_ratio": self.outliers / n,
                "act_kurtosis": c4 / (var * var) if var > 0 else 0.0}


class _Reservoir:
    """A uniform random sample of at most `cap` rows, kept by random priority."""

    def __init__(self, cap: int, generator: torch.Generator):
        self.cap, self.g = cap, generator
        self.rows: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.prio: torch.Tensor | None = None

    def add(self, rows: torch.Tensor, weights: torch.Tensor) -> None:
        if rows.shape[0] == 0:
            return
        prio = torch.rand(rows.shape[0], generator=self.g)
        rows, weights = rows.detach().float().cpu(), weights.detach().float().cpu()
        if self.rows is not None:
            rows, weights, prio = torch.cat([self.rows, rows]), torch.cat([self.weights, weights]), torch.cat([self.prio, prio])
        if rows.shape[0] > self.cap:
            keep = torch.topk(prio, self.cap).indices.sort().values
            rows, weights, prio = rows[keep], weights[keep], prio[keep]
        self.rows, self.weights, self.prio = rows, weights, prio


@dataclass
class ExpertInputs:
    """A sample of the tokens routed to one expert: inputs `x [n, H]` and routing weights `g [n]`."""
    x: torch.Tensor
    g: torch.Tensor
    fallback: bool = False  # True when the expert was never routed and these are generic tokens


@dataclass
class Calibration:
    stats: CalibrationStats  # per-unit columns, aligned with adapter.units()
    inputs: dict[tuple[int, int | str], ExpertInputs]  # (layer, expert) -> routed input sample
    total_tokens: int
    never_routed: list[tuple[int, int]] = field(default_factory=list)

    STATS_FILE = "stats.json"
    INPUTS_FILE = "calib_inputs.safetensors"

    def frequency(self) -> np.ndarray:
        """[U] routed-token frequency of `stats.units`."""
        return self.stats.frequency

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
        return cls(stats, cls.load_inputs(directory / cls.INPUTS_FILE), meta["total_tokens"],
                   [tuple(x) for x in meta.get("never_routed", [])])

    def save_inputs(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        import json

        tensors, meta = {}, {}
        for (layer, expert), inp in self.inputs.items():
            key = f"{layer}.{expert}"
            tensors[f"{key}.x"], tensors[f"{key}.g"] = inp.x.contiguous(), inp.g.contiguous()
            meta[key] = "fallback" if inp.fallback else "routed"
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"experts": json.dumps(meta), "total_tokens": str(self.total_tokens)})

    @staticmethod
    def load_inputs(path: str | Path) -> dict[tuple[int, int | str], ExpertInputs]:
        from safetensors import safe_open
        import json

        out = {}
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["experts"])
            for key, kind in meta.items():
                layer, expert = key.split(".")
                e: int | str = SHARED if expert == SHARED else int(expert)
                out[(int(layer), e)] = ExpertInputs(f.get_tensor(f"{key}.x"), f.get_tensor(f"{key}.g"), kind == "fallback")
        return out


@torch.no_grad()
def calibrate(adapter: MoEAdapter, windows: torch.Tensor, batch_size: int = 8, max_tokens_per_expert: int = 512,
              seed: int = 0, progress: bool = True) -> Calibration:
    """Run the model over `windows [n, T]` once and gather per-unit statistics and input samples."""
    model = adapter.model
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    E = adapter.num_experts
    counts = {l: torch.zeros(E, dtype=torch.long) for l in adapter.moe_layers}
    mass = {l: torch.zeros(E, dtype=torch.float64) for l in adapter.moe_layers}
    moments: dict[Unit, _Moments] = {u: _Moments() for u in adapter.units()}
    samples = {(l, e): _Reservoir(max_tokens_per_expert, gen) for l in adapter.moe_layers for e in range(E)}
    generic = {l: _Reservoir(max_tokens_per_expert, gen) for l in adapter.moe_layers}  # fallback tokens
    has_shared = adapter.num_shared_experts > 0
    if has_shared:
        samples.update({(l, SHARED): _Reservoir(max_tokens_per_expert, gen) for l in adapter.moe_layers})
    shared_mass = {l: 0.0 for l in adapter.moe_layers}

    def on_batch(b: RoutedBatch):
        l, x = b.layer, b.hidden.float()
        flat_idx, flat_w = b.top_k_index.reshape(-1), b.top_k_weights.reshape(-1).float()
        tok_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(b.top_k_index.shape[1])
        counts[l] += torch.bincount(flat_idx.cpu(), minlength=E)[:E]
        mass[l] += torch.zeros(E, dtype=torch.float64).index_add_(0, flat_idx.cpu(), flat_w.double().cpu())
        generic[l].add(x, torch.full((x.shape[0],), flat_w.mean().item()))
        for e in torch.unique(flat_idx).tolist():
            if e >= E:
                continue
            sel = flat_idx == e
            xe, ge = x[tok_of[sel]], flat_w[sel]
            moments[Unit(l, e, "gate")].add(xe)
            moments[Unit(l, e, "down")].add(adapter.expert_intermediate(l, e, xe))
            samples[(l, e)].add(xe, ge)
        if has_shared:
            s = adapter.shared_scale(l, x.to(b.hidden.dtype)).float()
            shared_mass[l] += s.sum().item()
            moments[Unit(l, SHARED, "gate")].add(x)
            moments[Unit(l, SHARED, "down")].add(adapter.expert_intermediate(l, SHARED, x))
            samples[(l, SHARED)].add(x, s)

    total_tokens = 0
    with adapter.capture_routing(on_batch):
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="calibrate", disable=not progress, leave=False):
            batch = windows[start:start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            total_tokens += batch.numel()

    inputs: dict[tuple[int, int | str], ExpertInputs] = {}
    never: list[tuple[int, int]] = []
    for key, res in samples.items():
        if res.rows is None:  # never routed: generic tokens of its layer stand in
            never.append(key)
            gres = generic[key[0]]
            inputs[key] = ExpertInputs(gres.rows.clone(), gres.weights.clone(), fallback=True)
            moments[Unit(key[0], key[1], "gate")].add(gres.rows)
            moments[Unit(key[0], key[1], "down")].add(adapter.expert_intermediate(key[0], key[1], gres.rows.to(
                adapter.weight(Unit(key[0], key[1], "gate")).dtype)))
        else:
            inputs[key] = ExpertInputs(res.rows, res.weights)
    if never:
        log.warning("%d expert(s) were never routed during calibration (e.g. %s); their errors are measured on "
                    "generic tokens of their layer and they count as routed once. Use more --nsamples to see them.",
                    len(never), ", ".join(f"L{l}.E{e}" for l, e in never[:5]))

    stats = []
    for u in adapter.units():
        # gate and up read the same input: their activation statistics are shared
        m = moments[Unit(u.layer, u.expert, "down" if u.kind == "down" else "gate")].summary()
        w = adapter.weight(u).float().abs()
        if u.is_shared:
            tokens, freq, rmass = total_tokens, 1.0, shared_mass[u.layer]
        else:
            tokens = int(counts[u.layer][u.expert])
            freq = max(tokens, 1) / total_tokens  # never-routed experts count as routed once
            rmass = float(mass[u.layer][u.expert])
        out_f, in_f = w.shape
        stats.append(UnitStats(unit=u, out_features=out_f, in_features=in_f, tokens=tokens, frequency=freq,
                               routing_mass=rmass, weight_scale=w.mean().item(),
                               weight_max_over_mean=(w.max() / w.mean().clamp(min=1e-12)).item(),
                               num_layers=len(adapter.decoder_layers),
                               never_routed=(u.layer, u.expert) in never, **m))
    return Calibration(stats=CalibrationStats.from_rows(stats, total_tokens), inputs=inputs, total_tokens=total_tokens,
                       never_routed=never)


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
