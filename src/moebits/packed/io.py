"""Write and read a moebits packed checkpoint directory:

    DIR/config.json          the model's config + quantization_config {"quant_method": "moebits", "format_version": 2, ...}
    DIR/model.safetensors    packed units + every other tensor as in the original checkpoint;
                             its metadata holds the index (JSON under the key "moebits", see layout.py)
    DIR/plan.json            the plan the model was quantized by
    DIR/tokenizer*, generation_config.json

The index lives in the safetensors header, not beside it: the file describes itself, the index
can never disagree with the tensors it indexes, and transformers hands the quantizer the file.

Non-unit tensors keep their names; each is stored in the narrowest of fp16 / bf16 / its own dtype
that holds it exactly (a model trained and saved in fp16 but run in fp32 goes back to fp16; a
random fp32 model stays fp32), so loading reproduces the in-memory model bit for bit.

Damage is refused with an error naming the file: a truncated or corrupted header (safetensors
checks that the header covers the file exactly), an unknown format_version (1 and 2 are read), an index entry or a
tensor missing, a shape that disagrees with the index, or a unit tensor whose crc32 differs from
the one recorded at write time (checked after loading, on the resident bytes).
"""
from __future__ import annotations

import copy
import json
import shutil
import zlib
from collections import defaultdict
from pathlib import Path

import torch

from ..models.adapter import MoEAdapter
from ..plan import Plan
from ..quant.pack import pack_codes, pack_zero_stream, packed_bytes
from ..quant.qweight import QuantizedWeight
from ..units import FP_BITS, KINDS, SHARED, Choice, Unit
from .layout import (EXPERT_TENSORS, FORMAT_VERSION, LINEAR_TENSOR, READABLE_VERSIONS, ModuleSpec, PackedIndex,
                     SetSpec, TensorSpec, UnitEntry, lowrank_name, set_name, zero_stream_bytes)

WEIGHTS_NAME = "model.safetensors"
INDEX_KEY = "moebits"
QUANT_METHOD = "moebits"


class PackedFormatError(ValueError):
    """A packed checkpoint that cannot be read as written: truncated, corrupted, or of an unknown version."""


def crc32(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


# ---- writing --------------------------------------------------------------------------------------
class _TensorBuilder:
    """Collects the units of one fused tensor into sets (rows appended in unit order)."""

    def __init__(self, in_features: int):
        self.spec = TensorSpec(in_features)
        self.parts: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.factors: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))

    def add(self, qw: QuantizedWeight, quantizer: str, module: str, tensor: str,
            zero_points: str = "packed") -> UnitEntry:
        rows, k = qw.shape[-2:]
        if k != self.spec.in_features:
            raise ValueError(f"{module}.{tensor}: a unit has {k} input columns, expected {self.spec.in_features}")
        zero_bits = Choice(qw.bits, qw.group_size, quantizer).zero_bits(zero_points)
        name = set_name(qw.bits, qw.group_size, zero_bits)
        spec = self.spec.sets.setdefault(name, SetSpec(qw.bits, max(qw.group_size, 0) if qw.bits != FP_BITS else 0, 0,
                                                       zero_bits if qw.bits != FP_BITS else FP_BITS))
        entry = UnitEntry(module, tensor, name, spec.rows, rows, quantizer)
        spec.rows += rows
        if qw.bits == FP_BITS:
            self.parts[name]["weight"].append(qw.weight.to(torch.float16))
        else:
            self.parts[name]["codes"].append(pack_codes(qw.codes, qw.bits))
            self.parts[name]["scale"].append(qw.scale.to(torch.float16))
            if spec.packed_zeros:  # integer codes: checked here, packed into the set's one bitstream in tensors()
                z = qw.zero.float()
                if not torch.equal(z, z.round()) or float(z.min()) < 0 or float(z.max()) > 2 ** qw.bits - 1:
                    raise ValueError(f"{module}.{tensor}: a {quantizer} unit has zero points that are not integers in "
                                     f"0..{2 ** qw.bits - 1}, so they cannot be stored packed; save with "
                                     "zero_points='fp16'")
                self.parts[name]["zero"].append(z.to(torch.uint8))
            else:
                self.parts[name]["zero"].append(qw.zero.to(torch.float16))
        if qw.rank:
            lname = lowrank_name(qw.rank)
            lr = self.spec.lowrank.setdefault(lname, {"rank": qw.rank, "out": rows, "count": 0})
            if lr["out"] != rows:
                raise ValueError(f"{module}.{tensor}: compensators of rank {qw.rank} with {rows} and {lr['out']} rows")
            entry.lowrank, entry.slot = lname, lr["count"]
            lr["count"] += 1
            self.factors[lname]["U"].append(qw.u.to(torch.float16))
            self.factors[lname]["V"].append(qw.v.to(torch.float16))
        return entry

    def tensors(self, base: str) -> dict[str, torch.Tensor]:
        out = {f"{base}.{s}.{what}": torch.cat(parts) for s, d in self.parts.items() for what, parts in d.items()}
        for s, spec in self.spec.sets.items():
            if spec.packed_zeros:
                out[f"{base}.{s}.zero"] = pack_zero_stream(out[f"{base}.{s}.zero"], spec.zero_bits)
        out.update({f"{base}.{r}.{what}": torch.stack(parts) for r, d in self.factors.items() for what, parts in d.items()})
        return out


def _narrowest_exact(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp16 or bf16 when that holds it exactly, else unchanged."""
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        return t
    for dt in (torch.float16, torch.bfloat16):
        c = t.to(dt)
        if torch.equal(c.to(t.dtype), t):
            return c
    return t


def unit_bytes(choice, out_features: int, in_features: int, zero_points: str = "packed") -> int:
    """Bytes a unit takes in the packed format (rows padded to whole bytes, an fp16 scale per group, and
    an fp16 zero per group where its zeros are stored in fp16). Packed integer zeros are not counted here:
    they belong to their set's one bitstream (`packed_sizes` counts it)."""
    if choice.bits == FP_BITS:
        n = 2 * out_features * in_features
    else:
        zero = 2 if choice.zero_bits(zero_points) == FP_BITS else 0
        n = out_features * (packed_bytes(in_features, choice.bits) + (2 + zero) * choice.groups_per_row(in_features))
    return n + 2 * choice.rank * (out_features + in_features)


def _zero_stream_bytes(adapter: MoEAdapter, plan: Plan) -> int:
    """Bytes of every packed zero bitstream the writer makes for `plan`: per fused tensor (or shared
    linear) and per set, the rows' zeros at the code width, rounded up to whole bytes once per set."""
    shapes = adapter.shapes()
    sets: dict[tuple, list] = defaultdict(lambda: [0, 0])  # (module key, tensor, set) -> [values, bits]
    for u in adapter.units():
        c = plan.choice(u)
        zb = c.zero_bits(plan.zero_points)
        if c.is_fp or zb == FP_BITS:
            continue
        out_f, in_f = shapes[u]
        tensor = (u.layer, "shared", u.kind) if u.is_shared else (u.layer, "gate_up" if u.kind != "down" else "down")
        key = (tensor, set_name(c.bits, c.group_size, zb))
        sets[key][0] += out_f * c.groups_per_row(in_f)
        sets[key][1] = zb
    return sum(zero_stream_bytes(n, 1, zb) for n, zb in sets.values())


def _replaced_names(model, adapter: MoEAdapter, layers=None) -> set[str]:
    """State-dict names of the dense unit weights the packed modules replace (of `layers`, default all)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = set()
    for layer in adapter.moe_layers if layers is None else [l for l in layers if l in adapter.moe_layers]:
        prefix = names[id(adapter.experts(layer))]
        out |= {f"{prefix}.gate_up_proj", f"{prefix}.down_proj"}
        shared = adapter.shared_mlp(layer)
        if shared is not None:
            out |= {f"{names[id(getattr(shared, f'{k}_proj'))]}.weight" for k in KINDS}
    return out


def _other_tensors(model, adapter: MoEAdapter, keep=None, layers=None) -> dict[str, torch.Tensor]:
    """Every tensor that is not a unit, tied copies once, each in its narrowest exact dtype.
    `keep(name)`: only names it accepts (a layer's, for the per-layer writer); `layers`: whose units are replaced."""
    replaced, seen, out = _replaced_names(model, adapter, layers), set(), {}
    for name, t in model.state_dict(keep_vars=False).items():
        if t.is_meta:  # a lazily opened model: layers not materialised now are written on their own turn
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if name in replaced or key in seen:  # tied weights (lm_head = embed_tokens): stored once, re-tied at load
            continue
        seen.add(key)
        if keep is not None and not keep(name):
            continue
        out[name] = _narrowest_exact(t.detach().cpu()).contiguous()
    return out


def packed_sizes(model, adapter: MoEAdapter, plan: Plan) -> dict:
    """`model_bytes` and `expert_bytes` of the packed checkpoint of `model` quantized by `plan`,
    without writing it (equal to what `save_packed` returns)."""
    shapes = adapter.shapes()
    expert = sum(unit_bytes(plan.choice(u), *shapes[u], plan.zero_points) for u in adapter.units())
    expert += _zero_stream_bytes(adapter, plan)
    other = sum(t.numel() * t.element_size() for t in _other_tensors(model, adapter).values())
    return {"model_bytes": expert + other, "expert_bytes": expert}


def build_layer_units(model, adapter: MoEAdapter, plan: Plan, qweights: dict[Unit, QuantizedWeight], layer: int,
                      names: dict | None = None) -> tuple[dict[str, ModuleSpec], dict[str, UnitEntry], dict[str, torch.Tensor]]:
    """The packed modules, index entries and unit tensors of one MoE layer."""
    names = names if names is not None else {id(m): n for n, m in model.named_modules()}
    modules: dict[str, ModuleSpec] = {}
    entries: dict[str, UnitEntry] = {}
    tensors: dict[str, torch.Tensor] = {}
    ex = adapter.experts(layer)
    prefix = names[id(ex)]
    tspecs = {}
    for tname, kinds in EXPERT_TENSORS.items():
        k = adapter.hidden if tname == "gate_up" else adapter.intermediate
        b = _TensorBuilder(k)
        for e in range(adapter.num_experts):
            for kind in kinds:
                u = Unit(layer, e, kind)
                entries[u.name] = b.add(qweights[u], plan.choice(u).quantizer, prefix, tname, plan.zero_points)
        tspecs[tname] = b.spec
        tensors.update(b.tensors(f"{prefix}.{tname}"))
    modules[prefix] = ModuleSpec("experts", tspecs, adapter.num_experts, adapter.intermediate, adapter.hidden)
    shared = adapter.shared_mlp(layer)
    if shared is not None:
        for kind in KINDS:
            lin = getattr(shared, f"{kind}_proj")
            prefix = names[id(lin)]
            u = Unit(layer, SHARED, kind)
            b = _TensorBuilder(lin.in_features)
            entries[u.name] = b.add(qweights[u], plan.choice(u).quantizer, prefix, LINEAR_TENSOR, plan.zero_points)
            modules[prefix] = ModuleSpec("linear", {LINEAR_TENSOR: b.spec}, out_features=lin.out_features,
                                         bias=lin.bias is not None)
            tensors.update(b.tensors(prefix))
    return modules, entries, tensors


def build_packed(model, adapter: MoEAdapter, plan: Plan,
                 qweights: dict[Unit, QuantizedWeight]) -> tuple[dict[str, torch.Tensor], PackedIndex, set[str]]:
    """All tensors to store, the index, and the names of the unit tensors among them."""
    plan.check_covers(adapter.units())
    missing = [u.name for u in adapter.units() if u not in qweights]
    if missing:
        raise ValueError(f"no quantized codes for {len(missing)} unit(s), e.g. {missing[:3]}")
    names = {id(m): n for n, m in model.named_modules()}
    modules: dict[str, ModuleSpec] = {}
    entries: dict[str, UnitEntry] = {}
    tensors: dict[str, torch.Tensor] = {}
    for layer in adapter.moe_layers:
        m, e, t = build_layer_units(model, adapter, plan, qweights, layer, names)
        modules.update(m)
        entries.update(e)
        tensors.update(t)
    unit_names = set(tensors)
    index = PackedIndex(modules, entries, {n: crc32(t) for n, t in sorted(tensors.items())})
    tensors.update(_other_tensors(model, adapter))
    return tensors, index, unit_names


def packed_config(model, adapter: MoEAdapter, plan: Plan, index: PackedIndex, sizes: dict, stored_dtype,
                  rotation: dict | None = None):
    """The config.json of a packed checkpoint: the model's, its dtype as stored, and the quantization_config."""
    cfg = copy.deepcopy(model.config)
    cfg.dtype = stored_dtype
    cfg.quantization_config = {
        "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "weights": WEIGHTS_NAME,
        "avg_bits": plan.avg_bits(adapter.shapes()), "zero_points": plan.zero_points,
        "bits_histogram": index.bits_histogram(), **sizes,
    }
    act = act_quant_config(plan)
    if act is not None:
        cfg.quantization_config["act_quant"] = act
    if rotation is not None:
        cfg.quantization_config["rotation"] = rotation
    return cfg


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` directory to `out_dir` (replacing one there only if moebits wrote it)."""
    from ..atomic import publish_dir

    publish_dir(tmp, out_dir)


def save_packed(model, adapter: MoEAdapter, plan: Plan, qweights: dict[Unit, QuantizedWeight], out_dir: str | Path,
                tokenizer=None, rotation: dict | None = None) -> dict:
    """Write a packed checkpoint atomically (temp dir + rename). Returns its sizes:
    `model_bytes` (every stored tensor) and `expert_bytes` (the units' codes, scales, zeros,
    fp16 rows and compensators). `rotation` (rotate.Rotation.to_dict()) goes into
    `quantization_config["rotation"]`: the stored weights are the rotated ones, and loading rebuilds
    the online Hadamards it records."""
    from safetensors.torch import save_file

    tensors, index, unit_names = build_packed(model, adapter, plan, qweights)
    sizes = {"model_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
             "expert_bytes": sum(tensors[n].numel() * tensors[n].element_size() for n in unit_names)}
    other = [t.dtype for n, t in tensors.items() if n not in unit_names and t.is_floating_point()]
    stored_dtype = max(set(other), key=other.count) if other else next(model.parameters()).dtype

    from ..atomic import atomic_dir

    from .integrity import integrity_metadata

    index_json = json.dumps(index.to_dict())
    crcs = {n: crc32(t) for n, t in tensors.items()}
    with atomic_dir(out_dir, "packed") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt", INDEX_KEY: index_json, **integrity_metadata(index_json, crcs)})
        packed_config(model, adapter, plan, index, sizes, stored_dtype, rotation).save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / "plan.json")
    return sizes


def act_quant_config(plan: Plan) -> dict | None:
    """What `quantization_config.act_quant` records of a W-A plan (None when no unit quantizes its
    activations): the scheme, the clip ratio and the activation bits of every unit below 16, so that
    loading (hf.py) installs the same activation quantization."""
    units = {u.name: a.choice.act_bits for u, a in plan.assignments.items() if a.choice.quantizes_acts}
    if not units:
        return None
    meta = plan.meta.get("act_quant") or {}
    return {"scheme": "per-token symmetric", "clip": float(meta.get("clip", 1.0)), "units": units}


# ---- reading --------------------------------------------------------------------------------------
def weights_file(path: str | Path) -> Path:
    p = Path(path)
    return p / WEIGHTS_NAME if p.is_dir() else p


def read_index(path: str | Path) -> PackedIndex:
    """The index of a packed checkpoint (a directory or its safetensors file), validated against
    the tensors the file holds. Raises PackedFormatError naming the file."""
    from safetensors import SafetensorError, safe_open

    f = weights_file(path)
    if not f.exists():
        raise PackedFormatError(f"{f}: not found; a moebits packed checkpoint holds its weights in {WEIGHTS_NAME}")
    try:
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata() or {}
            shapes = {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
    except (SafetensorError, OSError) as e:
        raise PackedFormatError(f"{f}: unreadable safetensors file ({e}); it is truncated or corrupted, "
                                "re-save it with `moebits quantize` or copy it again") from None
    if INDEX_KEY not in meta:
        raise PackedFormatError(f"{f}: no moebits index in the safetensors metadata; not a moebits packed checkpoint")
    try:
        d = json.loads(meta[INDEX_KEY])
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            raise PackedFormatError(f"{f}: moebits packed format_version {version!r} is not known to this moebits "
                                    f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade moebits")
        index = PackedIndex.from_dict(d)
    except PackedFormatError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise PackedFormatError(f"{f}: the moebits index in its metadata is damaged ({type(e).__name__}: {e})") from None
    from .integrity import check_sizes, verify_metadata

    check_sizes(index, shapes, f)  # first: every later check trusts the sizes it reads
    _check_index(index, shapes, f)
    # every stored byte: the index digest, and the crc32 of every tensor that is not a unit (units are
    # checked once resident, verify_checksums / read_units)
    verify_metadata(f, meta, shapes, skip=index.checksums)
    return index


def _expected_shapes(index: PackedIndex) -> dict[str, tuple]:
    out = {}
    for prefix, m in index.modules.items():
        for t, spec in m.tensors.items():
            base = prefix if m.type == "linear" else f"{prefix}.{t}"
            k = spec.in_features
            for s, ss in spec.sets.items():
                if ss.bits == FP_BITS:
                    out[f"{base}.{s}.weight"] = (ss.rows, k)
                else:
                    g = 1 if ss.group_size <= 0 else -(-k // ss.group_size)
                    out[f"{base}.{s}.codes"] = (ss.rows, packed_bytes(k, ss.bits))
                    out[f"{base}.{s}.scale"] = (ss.rows, g)
                    out[f"{base}.{s}.zero"] = (zero_stream_bytes(ss.rows, g, ss.zero_bits),) if ss.packed_zeros \
                        else (ss.rows, g)
            for r, lr in spec.lowrank.items():
                out[f"{base}.{r}.U"] = (lr["count"], lr["out"], lr["rank"])
                out[f"{base}.{r}.V"] = (lr["count"], lr["rank"], k)
    return out


def _check_index(index: PackedIndex, shapes: dict[str, tuple], f: Path) -> None:
    for name, want in _expected_shapes(index).items():
        if name not in shapes:
            raise PackedFormatError(f"{f}: tensor {name} named by the index is missing")
        if shapes[name] != want:
            raise PackedFormatError(f"{f}: tensor {name} has shape {shapes[name]}, the index says {want}")
    for name, e in index.units.items():
        m = index.modules.get(e.module)
        spec = m.tensors.get(e.tensor) if m else None
        if spec is None or e.set not in spec.sets or (e.lowrank and e.lowrank not in spec.lowrank):
            raise PackedFormatError(f"{f}: index entry of {name} refers to a set that is not stored")
        if not 0 <= e.row <= e.row + e.rows <= spec.sets[e.set].rows:
            raise PackedFormatError(f"{f}: index entry of {name} lies outside its set ({e.set})")
    for prefix, m in index.modules.items():
        if m.type == "experts":
            need = [f"E{i}.{k}" for i in range(m.num_experts) for k in KINDS]
            have = {n.split(".", 1)[1] for n, e in index.units.items() if e.module == prefix}
            lost = [n for n in need if n not in have]
            if lost:
                raise PackedFormatError(f"{f}: the index has no entry for {len(lost)} unit(s) of {prefix}, e.g. {lost[:3]}")
        elif not any(e.module == prefix for e in index.units.values()):
            raise PackedFormatError(f"{f}: the index has no unit entry for {prefix}")


def verify_checksums(model, index: PackedIndex, f: Path) -> None:
    """Compare every unit tensor now resident in `model` with the crc32 recorded at write time."""
    for name, want in index.checksums.items():
        try:
            t = model.get_buffer(name)
        except AttributeError:
            raise PackedFormatError(f"{f}: tensor {name} was not loaded into the model") from None
        if t.is_meta:
            raise PackedFormatError(f"{f}: tensor {name} was not loaded from the file")
        if crc32(t) != want:
            raise PackedFormatError(f"{f}: tensor {name} is corrupted (crc32 differs from the one written); "
                                    "re-save or copy the checkpoint again")


def read_units(path: str | Path) -> dict[Unit, QuantizedWeight]:
    """Every unit of a packed checkpoint as a `QuantizedWeight` (codes unpacked to uint8 `[out, in]`),
    for exporters and checks. Checksums are verified."""
    from safetensors import safe_open

    from ..quant.pack import unpack_codes, unpack_zero_stream

    f = weights_file(path)
    index = read_index(f)
    with safe_open(str(f), framework="pt") as sf:
        tensors = {n: sf.get_tensor(n) for n in index.tensor_names()}
    for name, want in index.checksums.items():
        if crc32(tensors[name]) != want:
            raise PackedFormatError(f"{f}: tensor {name} is corrupted (crc32 differs from the one written)")
    out = {}
    for name, e in index.units.items():
        m = index.modules[e.module]
        spec = m.tensors[e.tensor]
        ss = spec.sets[e.set]
        base = e.module if m.type == "linear" else f"{e.module}.{e.tensor}"
        rows = slice(e.row, e.row + e.rows)
        if ss.bits == FP_BITS:
            qw = QuantizedWeight(ss.bits, ss.group_size, weight=tensors[f"{base}.{e.set}.weight"][rows])
        else:
            codes = unpack_codes(tensors[f"{base}.{e.set}.codes"][rows], ss.bits, spec.in_features)
            scale = tensors[f"{base}.{e.set}.scale"][rows]
            zero = tensors[f"{base}.{e.set}.zero"]
            zero = unpack_zero_stream(zero, ss.zero_bits, scale.shape[-1], rows).half() if ss.packed_zeros \
                else zero[rows]
            qw = QuantizedWeight(ss.bits, ss.group_size, codes, scale, zero)
        if e.lowrank:
            qw.u, qw.v = tensors[f"{base}.{e.lowrank}.U"][e.slot], tensors[f"{base}.{e.lowrank}.V"][e.slot]
        out[Unit.parse(name)] = qw
    return out
