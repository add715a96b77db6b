"""One decoder layer's share of each streaming pass, as functions of (model, layer, its input hidden states).

Pass 1 (`pass1_layer`): the layer on its fp inputs; its MoE block's routed batches feed a
`calibrate.LayerCollector` (routing statistics, activation moments, expert inputs, Hessians), then the
units of this layer that the method measures are profiled (`profile.profile`, the same code as in
memory) on the collected inputs. The result (`LayerPass1`: the layer's `UnitStats` rows and table
entries) is small and saved as JSON; the inputs and Hessians are dropped with the layer.

Pass 2 (`pass2_layer`): the layer's units are quantized by the plan (`apply.apply_layer`), GPTQ
with Hessians collected on the layer's inputs *from the already quantized layers below* (as the GPTQ
reference does), and the quantized layer then produces the next layer's inputs.

Both take the input hidden states as a list of per-batch tensors or the path of a `HiddenStore`
file, so that independent layers of pass 1 can be mapped over workers once the inputs are on disk.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_write_json
from ..stats import UnitStats
from ..table import SensitivityTable
from ..units import Choice, Unit
from .forward import BatchedWindows, forward_layer, load_hidden


@dataclass
class Pass1Job:
    """What pass 1 measures in every layer (the same for all layers)."""
    units: list[Unit]  # units the method profiles (all layers); empty: statistics only
    choices: list[Choice]
    metric: str = "expert"
    whole_expert: bool = False
    act_order: bool = False
    max_tokens_per_expert: int | None = None
    seed: int = 0
    hessians: bool = False  # accumulate X^T X (needed by GPTQ choices)
    holdout: float = 0.0
    progress: bool = False


@dataclass
class LayerPass1:
    layer: int
    rows: list[UnitStats] = field(default_factory=list)
    never_routed: list[tuple[int, int]] = field(default_factory=list)
    total_tokens: int | None = None  # None for a layer without experts
    entries: list[tuple[str, int, float, float]] = field(default_factory=list)  # (unit, choice index, error, seconds)
    seconds: float = 0.0

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, {"layer": self.layer, "rows": [r.to_dict() for r in self.rows],
                                 "never_routed": [list(k) for k in self.never_routed],
                                 "total_tokens": self.total_tokens, "entries": [list(e) for e in self.entries],
                                 "seconds": self.seconds})

    @classmethod
    def load(cls, path: str | Path) -> "LayerPass1":
        d = json.loads(Path(path).read_text())
        return cls(d["layer"], [UnitStats.from_dict(r) for r in d["rows"]], [tuple(k) for k in d["never_routed"]],
                   d["total_tokens"], [tuple(e) for e in d["entries"]], d.get("seconds", 0.0))

    def layer_calibration(self):
        """The layer's statistics as a `LayerCalibration` without inputs (what `Calibration.from_layers` joins)."""
        from ..calibrate import LayerCalibration

        return LayerCalibration(self.layer, self.rows, {}, self.never_routed, self.total_tokens)


def _hidden(hidden) -> list[torch.Tensor]:
    return load_hidden(hidden) if isinstance(hidden, (str, Path)) else hidden


def collect_layer(lazy, layer: int, batches: BatchedWindows, hidden: list[torch.Tensor], *, keep_output: bool,
                  max_tokens_per_expert=None, seed: int = 0, hessians: bool = False, holdout: float = 0.0):
    """Run materialised layer `layer` on `hidden`; its MoE block's routed batches feed a LayerCollector.
    Returns (LayerCalibration or None for a dense layer, output hidden states or None)."""
    from ..calibrate import LayerCollector

    adapter = lazy.adapter
    if layer not in adapter.moe_layers:
        return None, (forward_layer(lazy, layer, batches, hidden) if keep_output else None)
    col = LayerCollector(adapter, layer, max_tokens_per_expert, seed, hessians=hessians, holdout=holdout)
    with adapter.capture_routing(col.add, layers=[layer], down_inputs=True):
        out = forward_layer(lazy, layer, batches, hidden)
    return col.finish(), (out if keep_output else None)


def pass1_layer(lazy, layer: int, hidden, batches: BatchedWindows, job: Pass1Job
                ) -> tuple[LayerPass1, list[torch.Tensor]]:
    """Pass 1 of one decoder layer (loaded here if it is not): statistics and table entries, and the
    layer's outputs on its fp inputs (the next layer's inputs)."""
    from ..calibrate import Calibration
    from ..profile import profile

    t0 = time.perf_counter()
    with lazy.layer(layer):
        lc, out = collect_layer(lazy, layer, batches, _hidden(hidden), keep_output=True,
                                max_tokens_per_expert=job.max_tokens_per_expert, seed=job.seed,
                                hessians=job.hessians, holdout=job.holdout)
        if lc is None:
            return LayerPass1(layer, seconds=time.perf_counter() - t0), out
        result = LayerPass1(layer, list(lc.rows), list(lc.never_routed), lc.total_tokens)
        units = [u for u in job.units if u.layer == layer]
        if units:
            cal = Calibration.from_layers([lc])
            inputs = cal.profile_inputs() if hasattr(cal, "profile_inputs") else cal.inputs
            table = SensitivityTable(lazy.adapter.units(), list(job.choices))
            profile(lazy.adapter, job.metric, units, job.choices, cal.stats, inputs, act_order=job.act_order,
                    table=table, progress=job.progress, whole_expert=job.whole_expert)
            for u in units_of_table(table, layer):
                i = table.unit_index(u)
                for c in range(len(job.choices)):
                    if table.measured[i, c]:
                        result.entries.append((u.name, c, float(table.error[i, c]), float(table.seconds[i, c])))
    result.seconds = time.perf_counter() - t0
    return result, out


def units_of_table(table: SensitivityTable, layer: int) -> list[Unit]:
    return [u for u in table.units if u.layer == layer]


def pass2_layer(lazy, layer: int, hidden, batches: BatchedWindows, plan, *, act_order: bool = False,
                max_tokens_per_expert=None, seed: int = 0) -> tuple[dict, list[torch.Tensor]]:
    """Quantize materialised layer `layer` by `plan` in place (GPTQ on its inputs `hidden`, which come
    from the quantized layers below); returns (the units' stored codes, the quantized layer's outputs)."""
    from ..apply import apply_layer

    adapter, hidden = lazy.adapter, _hidden(hidden)
    codes: dict = {}
    if layer in adapter.moe_layers:
        units = [u for u in plan.units if u.layer == layer]
        needs_h = any(plan.choice(u).quantizer == "gptq" and not plan.choice(u).is_fp for u in units)
        inputs = None
        if needs_h:
            lc, _ = collect_layer(lazy, layer, batches, hidden, keep_output=False,
                                  max_tokens_per_expert=max_tokens_per_expert, seed=seed, hessians=True)
            inputs = lc.inputs
        apply_layer(adapter, plan, layer, units, inputs, act_order, codes)
    return codes, forward_layer(lazy, layer, batches, hidden)
