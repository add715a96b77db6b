"""`--target llamacpp`: choose a ggml type for every GGUF tensor under a file-size budget, measured.

The decision unit is a GGUF tensor (tensors.py): per MoE layer the three fused expert tensors
`ffn_{gate,up,down}_exps` (every expert of a layer shares the type: the choice is made once for the
tensor, so the fused-tensor rule cannot be violated), the shared-expert tensors and the attention (and
dense FFN) projections. The candidates are ggml types (`DEFAULT_TYPES`; `I_QUANT_TYPES` on request), each
stored as llama.cpp would store it on that tensor (its fallback when the rows are not a multiple of the
type's block). The budget is the whole file: bits per weight as llama.cpp reports it (all tensor bits /
all elements) or its tensor-data size in GB (1e9 bytes); the embeddings, output and F32 tensors are
fixed by llama.cpp's stock rule (`GGUFLayout.stock_types`) and their bytes come off the budget first.

Errors are measured on llama.cpp's own quantization: each (tensor, type) is quantized and dequantized by
ggml (ggml.py) with the importance matrix collected over moebits' calibration windows (imatrix.py: per
input column the mean squared activation of the tokens reaching the tensor, per expert for fused expert
tensors -- what llama-imatrix collects, and what the export quantizes with), then

* a fused expert tensor's error is the frequency-weighted sum of its experts' expert-local errors,
  sum_e f_e * ||g_e (f_e^q(x) - f_e(x))||^2 / n_e over expert e's routed tokens: by the expert-local
  decomposition (DESIGN.md) quantizing one expert's block changes the layer output only there, so this is
  the layer-output squared error per calibration token of each expert's block alone, summed;
* a shared-expert tensor the same with the shared expert (frequency 1, Qwen2-MoE's sigmoid gate applied);
* an attention or dense tensor by its decoder layer's output error: the layer re-run on the calibration
  windows with that projection quantized, squared output change per token (MxMoE's layer metric).

All are squared layer-output error per calibration token, so one objective adds them. `--method fri`
measures only a rule budget of (expert block, type) pairs (anchor experts, sampling.py) and predicts the
rest with the project's predictors on the unit features plus the type (bits per weight and a type code);
attention tensors, few, are always measured. The allocation is the exact multiple-choice knapsack over
tensors (HiGHS, allocate/ilp.py, to a zero gap).

The result is `gguf_plan.json` in the run directory (format below, `GGUFPlan`): the ggml type of every
tensor of the file, which `moebits export RUN --format gguf` writes exactly.
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..units import FP_BITS, Unit
from . import ggml
from .tensors import GGUFLayout, GGUFTensor, effective_type, layout

log = logging.getLogger(__name__)

DEFAULT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
I_QUANT_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")
METHODS = ("mxmoe", "fri", "freq", "uniform")
PLAN_FILE = "gguf_plan.json"
TABLE_FILE = "gguf_table.json"
PLAN_FORMAT = "moebits.gguf-plan/1"


@dataclass(frozen=True)
class GGMLChoice:
    """A ggml type as a column of a `SensitivityTable` (it reads what `units.Choice` offers): `bits` is
    the type's bits per weight, what the predictors' `bits` feature means."""
    type: str

    @property
    def bits(self) -> float:
        return ggml.bits_per_weight(self.type)

    group_size = 0
    quantizer = "ggml"
    rank = 0
    act_bits = FP_BITS
    quantizes_acts = False

    @property
    def is_fp(self) -> bool:
        return self.type in ggml.FLOAT_TYPES

    @property
    def label(self) -> str:
        return self.type

    @property
    def weight_choice(self) -> "GGMLChoice":
        return self


def parse_types(text: str | None, iquants: bool = False) -> tuple[str, ...]:
    """`--gguf-types Q3_K,Q4_K,...` (default DEFAULT_TYPES, plus I_QUANT_TYPES with `iquants`), checked."""
    names = [t.strip().upper() for t in text.split(",") if t.strip()] if text else list(DEFAULT_TYPES)
    if iquants:
        names += [t for t in I_QUANT_TYPES if t not in names]
    unknown = [t for t in names if t not in ggml.GGML_TYPES]
    if unknown:
        raise ValueError(f"unknown ggml type(s) {unknown}; ggml types: {', '.join(ggml.GGML_TYPES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--gguf-types lists a type twice: {names}")
    return tuple(names)


# -- measuring errors -------------------------------------------------------------------------------

@dataclass
class TensorTable:
    """Loss and bytes of every allocated tensor at every requested type (columns = `types`).

    `loss[t, c]`: squared layer-output error per calibration token of tensor t stored at `types[c]` (as
    llama.cpp stores it: `effective[t][c]`); `cost[t, c]`: its exact bytes; `measured[t, c]`: the
    fraction of the tensor's blocks whose error was measured (the rest predicted; 1 for full profiling).
    """
    names: list[str]
    types: list[str]
    effective: list[list[str]]
    loss: np.ndarray
    cost: np.ndarray
    measured: np.ndarray
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": "moebits.gguf-table/1", "types": self.types, "seconds": self.seconds,
                "tensors": {n: {"effective": e, "loss": [float(x) for x in lo], "bytes": [int(x) for x in co],
                                "measured": [float(x) for x in m]}
                            for n, e, lo, co, m in zip(self.names, self.effective, self.loss, self.cost, self.measured)}}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorTable":
        t = d["tensors"]
        names = list(t)
        return cls(names, list(d["types"]), [t[n]["effective"] for n in names],
                   np.array([t[n]["loss"] for n in names], float), np.array([t[n]["bytes"] for n in names], float),
                   np.array([t[n]["measured"] for n in names], float), d.get("seconds", {}))


def cost_matrix(lay: GGUFLayout, types: list[str]) -> tuple[list[GGUFTensor], list[list[str]], np.ndarray]:
    """The allocated tensors, the type each stores per requested type, and their exact bytes [T, C]."""
    tensors = lay.allocated
    effective = [[effective_type(ty, t.cols) for ty in types] for t in tensors]
    cost = np.array([[t.nbytes(ty) for ty in types] for t in tensors], dtype=np.float64)
    return tensors, effective, cost


def unit_error_table(adapter, tensors: list[GGUFTensor], effective: list[list[str]], inputs: dict,
                     imatrix: dict[str, np.ndarray], units: list[Unit] | None = None, frequency=None,
                     progress: bool = False):
    """Expert-local errors of expert and shared blocks, ggml-quantized: a `SensitivityTable` over the
    blocks of the expert/shared tensors x the distinct stored types (GGMLChoice); with `units`, only
    those blocks are measured (the other entries stay NaN, for a predictor to fill)."""
    from ..table import SensitivityTable

    block_tensors = [t for t in tensors if t.role in ("experts", "shared")]
    all_units = [u for t in block_tensors for u in t.units]
    stored = sorted({e for t, eff in zip(tensors, effective) if t.role in ("experts", "shared") for e in eff},
                    key=lambda ty: (ggml.bits_per_weight(ty), ty))
    choices = [GGMLChoice(ty) for ty in stored]
    table = SensitivityTable(all_units, choices)
    if frequency is not None:
        table.frequency[:] = frequency
    want = set(all_units if units is None else units)
    eff_of = {t.name: set(eff) for t, eff in zip(tensors, effective)}
    refs: dict = {}
    for t in block_tensors:
        members = [(i, u) for i, u in enumerate(t.units) if u in want]
        if not members:
            continue
        if refs and next(iter(refs))[0] != t.layer:
            refs.clear()  # one layer's reference outputs at a time
        im = imatrix[t.name]
        for ty in sorted(eff_of[t.name]):
            t0 = time.perf_counter()
            if t.role == "experts":
                idx = [i for i, _ in members]
                w = adapter.routed_weights_batched(t.layer, t.kind)[idx]
                wq = ggml.quantize_dequantize(w, ty, im[idx])
            else:
                wq = ggml.quantize_dequantize(adapter.weight(t.units[0]), ty, im)[None]
            t_quant = (time.perf_counter() - t0) / len(members)
            for (i, u), q in zip(members, wq):
                t1 = time.perf_counter()
                inp = inputs[(u.layer, u.expert)]
                x = inp.x.to(q.dtype)
                key = (u.layer, u.expert)
                if key not in refs:
                    refs[key] = adapter.expert_forward(u.layer, u.expert, x)
                y_q = adapter.expert_forward(u.layer, u.expert, x, {u.kind: q})
                d = (y_q - refs[key]).double() * inp.g.double()[:, None]
                table.set(u, GGMLChoice(ty), (d * d).sum().item() / max(1, x.shape[0]),
                          seconds=t_quant + time.perf_counter() - t1, measured=True)
    return table


@torch.no_grad()
def layer_tensor_errors(adapter, tensors: list[GGUFTensor], effective: list[list[str]], windows: torch.Tensor,
                        imatrix: dict[str, np.ndarray], batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Attention / dense tensors: tensor name -> {stored type: squared decoder-layer output change per
    token}, the projection quantized by ggml alone, the layer re-run on `windows` (profile.py's layer metric)."""
    from ..profile import _run_layer, capture_layer_io

    mods = dict(adapter.model.named_modules())
    out: dict[str, dict[str, float]] = {}
    by_layer: dict[int, list[tuple[GGUFTensor, list[str]]]] = defaultdict(list)
    for t, eff in zip(tensors, effective):
        if t.role in ("attention", "dense"):
            by_layer[t.layer].append((t, eff))
    for layer, items in sorted(by_layer.items()):
        calls = capture_layer_io(adapter, windows, layer, batch_size)
        ref = _run_layer(adapter, layer, calls)
        n_tokens = sum(r.shape[0] * r.shape[1] for r in ref)
        for t, eff in items:
            weight = mods[t.source].weight
            original = weight.data.clone()
            out[t.name] = {}
            for ty in sorted(set(eff)):
                weight.data.copy_(ggml.quantize_dequantize(original, ty, imatrix[t.name]))
                got = _run_layer(adapter, layer, calls)
                weight.data.copy_(original)
                out[t.name][ty] = sum(((o.double() - r.double()) ** 2).sum().item() for o, r in zip(got, ref)) / n_tokens
    return out


def tensor_table(tensors: list[GGUFTensor], types: list[str], effective: list[list[str]], cost: np.ndarray,
                 units_table, layer_errors: dict[str, dict[str, float]]) -> TensorTable:
    """Per tensor and requested type: the loss of the type it stores. A fused tensor's loss is
    sum_e f_e * l_e (its blocks' rows of `units_table`, frequency-weighted); measured = the fraction of
    its blocks measured at that type."""
    T, C = len(tensors), len(types)
    loss, measured = np.zeros((T, C)), np.zeros((T, C))
    col = {c.type: j for j, c in enumerate(units_table.choices)} if units_table is not None else {}
    for i, (t, eff) in enumerate(zip(tensors, effective)):
        for j, ty in enumerate(eff):
            if t.role in ("experts", "shared"):
                rows = [units_table.unit_index(u) for u in t.units]
                e = units_table.error[rows, col[ty]]
                loss[i, j] = float((units_table.frequency[rows] * e).sum())
                measured[i, j] = float(units_table.measured[rows, col[ty]].mean())
            else:
                loss[i, j] = layer_errors[t.name][ty]
                measured[i, j] = 1.0
    return TensorTable([t.name for t in tensors], list(types), effective, loss, cost, measured)


def predict_unit_errors(table, stats, predictor: str = "ridge", seed: int = 0):
    """Fill a partly measured unit table (GGMLChoice columns) with the project's predictors: features of
    the unit (Table 7's type, scale, activation and weight groups) plus the type's bits per weight and a
    categorical type code; per-unit offsets as for the fri method (predict.predict_table)."""
    from ..methods.fri.features import FeatureMatrix, FeatureSpec, build_features
    from ..methods.fri.predictors import fit_table, make_estimator, predict_table
    from ..units import Choice

    aligned = stats.aligned(table.units)
    base = build_features(aligned, [Choice(4)], FeatureSpec(("type", "scale", "act", "weight")))
    U, C = len(table.units), len(table.choices)
    per_unit = np.repeat(base.X, C, axis=0)
    bpw = np.tile([c.bits for c in table.choices], U)[:, None]
    code = np.tile(np.arange(C, dtype=float), U)[:, None]
    X = np.hstack([per_unit, bpw, code])
    names = base.names + ["bpw", "ggml_type"]
    features = FeatureMatrix(X, names, categorical=base.categorical + [len(names) - 1],
                             categories=base.categories + [list(range(C))], n_units=U, n_choices=C)
    fitted = fit_table(table, stats, make_estimator(predictor, seed), features=features)
    return predict_table(table, fitted, unit_offset=True)


# -- the plan -------------------------------------------------------------------------------------

@dataclass
class GGUFPlan:
    """The ggml type of every tensor of the GGUF file (`types`: what llama.cpp stores, after fallback),
    which of them were allocated, and the totals. Saved as `gguf_plan.json`:

        {"format": "moebits.gguf-plan/1", "arch": "QWEN2MOE",
         "types": {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q5_0", ...every tensor...},
         "allocated": ["blk.0.attn_q.weight", ...],
         "loss": {name: loss}, "file_bytes": ..., "n_elements": ..., "bpw": ..., "meta": {...}}
    """
    arch: str
    types: dict[str, str]
    allocated: list[str]
    loss: dict[str, float]
    file_bytes: int
    n_elements: int
    meta: dict = field(default_factory=dict)

    @property
    def bpw(self) -> float:
        return 8.0 * self.file_bytes / self.n_elements

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "arch": self.arch, "bpw": self.bpw, "file_bytes": self.file_bytes,
                "n_elements": self.n_elements, "meta": self.meta, "allocated": self.allocated,
                "loss": self.loss, "types": self.types}

    def save(self, path: str | Path) -> None:
        from ..atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "GGUFPlan":
        d = json.loads(Path(path).read_text())
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"{path} is not a moebits GGUF plan (expected \"format\": \"{PLAN_FORMAT}\")")
        return cls(d["arch"], d["types"], d["allocated"], d["loss"], d["file_bytes"],
                   d["n_elements"], d.get("meta", {}))

    def histogram(self) -> dict[str, int]:
        h: dict[str, int] = defaultdict(int)
        for n in self.allocated:
            h[self.types[n]] += 1
        return dict(sorted(h.items()))


@dataclass(frozen=True)
class FileBudget:
    """`--bpw` (bits per weight over the whole file) or `--size-gb` (tensor data, 1e9 bytes)."""
    kind: str  # "bpw" | "size_gb"
    value: float

    def total_bytes(self, n_elements: int) -> float:
        return self.value * n_elements / 8.0 if self.kind == "bpw" else self.value * 1e9

    def describe(self, total_bytes: float, n_elements: int) -> str:
        return f"{8.0 * total_bytes / n_elements:.4f} bpw" if self.kind == "bpw" else f"{total_bytes / 1e9:.6g} GB"


def file_budget(bpw: float | None, size_gb: float | None) -> FileBudget:
    if (bpw is None) == (size_gb is None):
        raise ValueError("--target llamacpp needs one budget over the whole file: --bpw BITS_PER_WEIGHT or "
                         "--size-gb GB (1e9 bytes of tensor data)")
    value = bpw if bpw is not None else size_gb
    if not value > 0:
        raise ValueError(f"the budget must be positive, got {value}")
    return FileBudget("bpw" if bpw is not None else "size_gb", float(value))


def allocate_tensors(lay: GGUFLayout, table: TensorTable, budget: FileBudget, solver: str = "ilp",
                     frequency: np.ndarray | None = None, base_type: str = "Q4_K", meta: dict | None = None,
                     fixed_types: dict[str, str] | None = None) -> GGUFPlan:
    """The plan of least total loss whose whole file fits `budget` (exact MCKP over the allocated
    tensors for `ilp`). Raises InfeasibleBudgetError with the feasible range, in the budget's unit.
    `fixed_types` overrides the stock rule for tensors not allocated (e.g. {"output.weight": "Q4_0"});
    each is stored as llama.cpp would (fallback)."""
    from ..allocate import allocate

    fixed = lay.stock_types(base_type)
    for name, ty in (fixed_types or {}).items():
        if name not in fixed or lay.by_name[name].role == "fixed":
            raise ValueError(f"{name} is not an embedding/output tensor of this model's GGUF")
        fixed[name] = effective_type(ty, lay.by_name[name].cols)
    fixed_bytes = sum(lay.by_name[n].nbytes(ty) for n, ty in fixed.items())
    n = lay.n_elements
    allocatable = budget.total_bytes(n) - fixed_bytes

    def fmt(b: float) -> str:
        return budget.describe(b + fixed_bytes, n)

    options = {"mip_rel_gap": 0.0} if solver == "ilp" else {}
    res = allocate(table.loss, table.cost, allocatable, solver, frequency=frequency, budget_format=fmt, **options)
    idx = res.choice_index
    types = dict(fixed)
    for i, name in enumerate(table.names):
        types[name] = table.effective[i][idx[i]]
    ordered = {t.name: types[t.name] for t in lay.tensors}
    file_bytes = lay.file_bytes(ordered)
    info = {"solver": res.solver, "optimal": res.optimal, "gap": res.gap, "total_loss": res.total_loss,
            "budget": {budget.kind: budget.value}, "stock_rule": f"output/tied token_embd Q6_K (Q8_0 when rows are "
            f"not a multiple of {base_type}'s block); untied token_embd {base_type}; 1-D and routers F32",
            "allocate_seconds": res.seconds}
    return GGUFPlan(lay.arch, ordered, list(table.names),
                    {nm: float(table.loss[i, idx[i]]) for i, nm in enumerate(table.names)}, file_bytes, n,
                    {**(meta or {}), **info})


def tensor_frequency(tensors: list[GGUFTensor], frequency_of: dict[Unit, float]) -> np.ndarray:
    """For the freq heuristic: a fused tensor's routed-token frequency summed over its experts (top-k
    per token), 1 for tensors every token passes (shared, attention)."""
    return np.array([sum(frequency_of[u] for u in t.units) if t.role == "experts" else 1.0 for t in tensors])


@torch.no_grad()
def apply_types(adapter, lay: GGUFLayout, types: dict[str, str], imatrix: dict[str, np.ndarray]) -> None:
    """Write every quantized tensor of the plan into the model as llama.cpp computes with it (ggml
    quantize + dequantize), so moebits' own evaluation sees the GGUF's weights. The embeddings and output
    are quantized without importance matrix (an untied output's is not collected here)."""
    mods = dict(adapter.model.named_modules())
    params = dict(adapter.model.named_parameters(remove_duplicate=False))
    out_t = lay.by_name.get("output.weight")
    if out_t is not None and out_t.source == lay.by_name["token_embd.weight"].source:
        # tied in the model, two tensors in the GGUF (llama.cpp's qwen2moe/olmoe need an output matrix):
        # the output gets its own copy, quantized at its own type, as llama.cpp computes with it
        model = adapter.model
        model.get_output_embeddings().weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        model.config.tie_word_embeddings = False
        params = {**params, "output.weight": model.get_output_embeddings().weight}
    for t in lay.tensors:
        ty = types[t.name]
        if t.role == "fixed" or ty in ("F32",):
            continue
        im = imatrix.get(t.name)
        if t.role == "experts":
            w = adapter.routed_weights_batched(t.layer, t.kind)
            w.copy_(ggml.quantize_dequantize(w, ty, im))
        elif t.role == "shared":
            w = adapter.weight(t.units[0])
            w.copy_(ggml.quantize_dequantize(w, ty, im))
        elif t.role in ("attention", "dense"):
            w = mods[t.source].weight.data
            w.copy_(ggml.quantize_dequantize(w, ty, im))
        else:  # token_embd / output
            w = (params["output.weight"] if t.role == "output" and "output.weight" in params else params[t.source]).data
            w.copy_(ggml.quantize_dequantize(w, ty, None))
