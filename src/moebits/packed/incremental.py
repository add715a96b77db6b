"""Writing a packed checkpoint one decoder layer at a time (the streaming path, moebits.job.streaming).

Each finished layer becomes a *part*: a safetensors file holding that layer's packed units and its
other tensors (attention, norms, router), with the layer's share of the index (modules, unit entries,
checksums) in its metadata; the tensors outside the layers (embeddings, final norm, lm_head) are one
more part. Parts are written atomically into `OUT.layers/`, so a stopped run keeps its finished
layers and `has(part)` tells a rerun what to skip.

`finish` joins the parts into the ordinary packed checkpoint (format v2, see io.py: one
`model.safetensors` whose metadata holds the whole index), copying each tensor's bytes from its part
without loading more than one tensor at a time, then writes config.json, the tokenizer and the plan,
and moves the directory into place atomically. The file is laid out as `safetensors.save_file` lays
it out (tensors by decreasing element size, then by name; header padded to 8 bytes), so every tensor
is aligned and `safe_open`, `load_quantized` and `from_pretrained` read it as any other.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from ..models.adapter import MoEAdapter
from ..plan import Plan
from ..quant.qweight import QuantizedWeight
from ..atomic import atomic_path
from ..units import Unit
from .io import (INDEX_KEY, WEIGHTS_NAME, _other_tensors, build_layer_units, crc32, packed_config, replace_dir)
from .layout import PackedIndex

PART_KEY = "moebits_part"
PART_CRCS_KEY = "moebits_part_crcs"  # crc32 of every tensor of the part (parts written before it: computed at join)
REST = "rest"  # the part holding everything outside the decoder layers
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_COPY_CHUNK = 64 << 20


def read_header(path: Path) -> tuple[dict, int]:
    """(the safetensors header of `path`, the byte offset where its data starts)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


class PackedLayerWriter:
    """Parts of a packed checkpoint under construction in `OUT.layers/`, then `finish` into `OUT/`."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.parts_dir = self.out_dir.with_name(self.out_dir.name + ".layers")
        self.parts_dir.mkdir(parents=True, exist_ok=True)

    def part_path(self, part: int | str) -> Path:
        return self.parts_dir / (f"L{part:05d}.safetensors" if isinstance(part, int) else f"{part}.safetensors")

    def has(self, part: int | str) -> bool:
        return self.part_path(part).exists()

    def write_layer(self, model, adapter: MoEAdapter, plan: Plan, qweights: dict[Unit, QuantizedWeight],
                    layer: int) -> Path:
        """Layer `layer` (materialised in `model`, its units quantized as `qweights`) as a part."""
        prefix = f"model.layers.{layer}."
        modules, entries, checks, tensors = {}, {}, {}, {}
        if layer in adapter.moe_layers:
            modules, entries, tensors = build_layer_units(model, adapter, plan, qweights, layer)
            checks = {n: crc32(t) for n, t in sorted(tensors.items())}
        tensors.update(_other_tensors(model, adapter, keep=lambda n: n.startswith(prefix), layers=[layer]))
        return self._write(layer, tensors, PackedIndex(modules, entries, checks))

    def write_rest(self, model, adapter: MoEAdapter) -> Path:
        """Everything outside the decoder layers (embeddings, final norm, lm_head unless tied)."""
        tensors = _other_tensors(model, adapter, keep=lambda n: not n.startswith("model.layers."), layers=[])
        return self._write(REST, tensors, PackedIndex({}, {}, {}))

    def _write(self, part, tensors: dict[str, torch.Tensor], index: PackedIndex) -> Path:
        from safetensors.torch import save_file

        crcs = {n: crc32(t) for n, t in tensors.items()}
        with atomic_path(self.part_path(part)) as tmp:
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp),
                      metadata={"format": "pt", PART_KEY: json.dumps(index.to_dict()), PART_CRCS_KEY: json.dumps(crcs)})
        return self.part_path(part)

    def finish(self, model, adapter: MoEAdapter, plan: Plan, layers: list[int], tokenizer=None,
               generation_config=None) -> dict:
        """Join the parts of `layers` and the rest into `OUT/` (packed format v2). Returns its sizes."""
        parts = [self.part_path(l) for l in layers] + [self.part_path(REST)]
        missing = [p.name for p in parts if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{self.parts_dir}: parts {missing[:3]} are missing; rerun to write them")
        from .integrity import file_crcs, integrity_metadata

        modules, units, checks, entries, crcs = {}, {}, {}, [], {}  # entries: (name, info, part, data_start)
        for p in parts:
            header, start = read_header(p)
            part_index = PackedIndex.from_dict(json.loads(header["__metadata__"][PART_KEY]))
            recorded = header["__metadata__"].get(PART_CRCS_KEY)
            crcs.update({k: int(v) for k, v in json.loads(recorded).items()} if recorded else file_crcs(p))
            modules.update(part_index.modules)
            units.update(part_index.units)
            checks.update(part_index.checksums)
            entries += [(n, info, p, start) for n, info in header.items() if n != "__metadata__"]
        index = PackedIndex(modules, units, dict(sorted(checks.items())))
        plan.check_covers(adapter.units())
        lost = [u.name for u in adapter.units() if u.name not in units]
        if lost:
            raise ValueError(f"the parts hold no codes for {len(lost)} unit(s), e.g. {lost[:3]}")
        # layout as safetensors.save_file: by decreasing element size, then name (keeps every tensor aligned)
        entries.sort(key=lambda e: (-_ITEMSIZE[e[1]["dtype"]], e[0]))
        out_header, offset = {}, 0
        for name, info, _, _ in entries:
            n = info["data_offsets"][1] - info["data_offsets"][0]
            out_header[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + n]}
            offset += n
        index_json = json.dumps(index.to_dict())
        out_header["__metadata__"] = {"format": "pt", INDEX_KEY: index_json,
                                      **integrity_metadata(index_json, {n: crcs[n] for n, *_ in entries})}
        raw = json.dumps(out_header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)

        sizes = {"model_bytes": offset,
                 "expert_bytes": sum(out_header[n]["data_offsets"][1] - out_header[n]["data_offsets"][0]
                                     for n in index.tensor_names())}
        other = [info["dtype"] for n, info, _, _ in entries if n not in checks and info["dtype"] in ("F16", "BF16", "F32")]
        stored = max(set(other), key=other.count) if other else "F32"
        stored_dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[stored]

        from ..atomic import check_replaceable, new_partial_dir

        check_replaceable(self.out_dir)
        tmp = new_partial_dir(self.out_dir, "packed")
        try:
            self._join(tmp, entries, raw, model, adapter, plan, index, sizes, stored_dtype, tokenizer,
                       generation_config)
            from ..atomic import seal

            seal(tmp, "packed")
            replace_dir(tmp, self.out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return sizes

    def _join(self, tmp: Path, entries, raw: bytes, model, adapter, plan, index, sizes, stored_dtype, tokenizer,
              generation_config) -> None:
        with open(tmp / WEIGHTS_NAME, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            handles = {}
            try:
                for name, info, p, start in entries:
                    f = handles.get(p) or handles.setdefault(p, open(p, "rb"))
                    begin, end = info["data_offsets"]
                    f.seek(start + begin)
                    left = end - begin
                    while left:
                        chunk = f.read(min(left, _COPY_CHUNK))
                        out.write(chunk)
                        left -= len(chunk)
            finally:
                for f in handles.values():
                    f.close()
        packed_config(model, adapter, plan, index, sizes, stored_dtype).save_pretrained(tmp)
        gen = generation_config if generation_config is not None else getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / "plan.json")

    def cleanup(self) -> None:
        """Remove the parts (after `finish`)."""
        shutil.rmtree(self.parts_dir, ignore_errors=True)
