"""Every stored byte of a packed checkpoint verified, and every size in its index bounded by what is stored.

Written into the safetensors metadata next to the index (any format_version; checkpoints written before
these keys existed still load, with the unit checksums of the index only):

    moebits_checksums       JSON {tensor name: crc32 of its stored bytes}, for EVERY tensor in the file
    moebits_integrity       sha256 of the index string + "\\n" + the checksums string

so a flipped byte in any tensor (attention, embeddings, norms, not only the experts), an edited index
(two units' rows swapped, a size changed) or an edited checksum table is refused with the file named.
Unit tensors are also checked after loading, on the resident bytes (io.verify_checksums); the others
are checked here on the file's bytes, read once, one tensor at a time.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

CHECKSUMS_KEY = "moebits_checksums"
INTEGRITY_KEY = "moebits_integrity"
_CHUNK = 16 << 20


def digest(index_json: str, checksums_json: str) -> str:
    return hashlib.sha256(index_json.encode() + b"\n" + checksums_json.encode()).hexdigest()


def integrity_metadata(index_json: str, crcs: dict[str, int]) -> dict[str, str]:
    """The metadata entries that make the file self-verifying (`crcs`: every stored tensor)."""
    checksums = json.dumps(dict(sorted(crcs.items())), separators=(",", ":"))
    return {CHECKSUMS_KEY: checksums, INTEGRITY_KEY: digest(index_json, checksums)}


def _header(f: Path) -> tuple[dict, int]:
    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        return json.loads(fh.read(n)), 8 + n


def file_crcs(f: Path, names=None) -> dict[str, int]:
    """crc32 of the stored bytes of tensors `names` (default: all) of the safetensors file `f`."""
    header, start = _header(f)
    out = {}
    with open(f, "rb") as fh:
        for name, info in header.items():
            if name == "__metadata__" or (names is not None and name not in names):
                continue
            begin, end = info["data_offsets"]
            fh.seek(start + begin)
            crc, left = 0, end - begin
            while left:
                chunk = fh.read(min(left, _CHUNK))
                if not chunk:
                    break
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
            out[name] = crc
    return out


def verify_metadata(f: Path, meta: dict, tensor_names, skip=()) -> bool:
    """Check the index digest and the crc32 of every stored tensor not in `skip` (checked elsewhere,
    after loading). Returns False for a checkpoint written before these keys existed (nothing to
    check); raises `error_cls` naming the file on any mismatch."""
    from .io import INDEX_KEY, PackedFormatError

    if CHECKSUMS_KEY not in meta and INTEGRITY_KEY not in meta:
        return False
    checksums = meta.get(CHECKSUMS_KEY)
    if checksums is None or INTEGRITY_KEY not in meta or digest(meta[INDEX_KEY], checksums) != meta[INTEGRITY_KEY]:
        raise PackedFormatError(f"{f}: the moebits index or its checksums were changed after writing (their sha256 "
                                "differs from the one recorded); re-save it with `moebits quantize` or copy it again")
    crcs = {k: int(v) for k, v in json.loads(checksums).items()}
    stored = set(tensor_names)
    if set(crcs) != stored:
        odd = sorted(set(crcs) ^ stored)
        raise PackedFormatError(f"{f}: the stored tensors differ from the ones checksummed at write time (e.g. "
                                f"{odd[:3]}); re-save it with `moebits quantize` or copy it again")
    want = {n: c for n, c in crcs.items() if n not in set(skip)}
    got = file_crcs(f, set(want))
    for name, c in want.items():
        if got.get(name) != c:
            raise PackedFormatError(f"{f}: tensor {name} is corrupted (crc32 differs from the one written); "
                                    "re-save it with `moebits quantize` or copy it again")
    return True


def check_sizes(index, shapes: dict[str, tuple], f: Path) -> None:
    """Every size the index declares must agree with the tensors stored, before anything is allocated
    from it (a damaged `hidden` or `num_experts` would otherwise ask for petabytes)."""
    from ..units import KINDS
    from .io import PackedFormatError

    def bad(msg):
        raise PackedFormatError(f"{f}: the moebits index is inconsistent with the stored tensors: {msg}; re-save "
                                "it with `moebits quantize` or copy it again")

    for prefix, m in index.modules.items():
        for v in (m.num_experts, m.intermediate, m.hidden, m.out_features):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(f"{prefix} has a size {v!r} that is not a non-negative integer")
        for t, spec in m.tensors.items():
            if not isinstance(spec.in_features, int) or spec.in_features <= 0:
                bad(f"{prefix}.{t} has in_features {spec.in_features!r}")
            for s, ss in spec.sets.items():
                if not all(isinstance(x, int) and x >= 0 for x in (ss.bits, ss.group_size, ss.rows)):
                    bad(f"{prefix}.{t}.{s} has a size that is not a non-negative integer")
                if ss.zero_bits not in (16, ss.bits):
                    bad(f"{prefix}.{t}.{s} stores zeros at {ss.zero_bits!r} bits (16, or its {ss.bits}-bit code width)")
        rows = {t: sum(ss.rows for ss in spec.sets.values()) for t, spec in m.tensors.items()}
        if m.type == "experts":
            gu, dn = m.tensors.get("gate_up"), m.tensors.get("down")
            if gu is None or dn is None:
                bad(f"{prefix} lacks its gate_up or down tensor")
            if (gu.in_features, dn.in_features) != (m.hidden, m.intermediate):
                bad(f"{prefix} declares hidden {m.hidden} / intermediate {m.intermediate}, its tensors have "
                    f"{gu.in_features} / {dn.in_features} input columns")
            if rows["gate_up"] != 2 * m.num_experts * m.intermediate or rows["down"] != m.num_experts * m.hidden:
                bad(f"{prefix} declares {m.num_experts} experts of {m.intermediate}x{m.hidden}; its tensors store "
                    f"{rows['gate_up']} gate/up and {rows['down']} down rows")
            want = {"gate": m.intermediate, "up": m.intermediate, "down": m.hidden}
        elif m.type == "linear":
            if rows.get("weight") != m.out_features:
                bad(f"{prefix} declares {m.out_features} output rows, its tensors store {rows.get('weight')}")
            want = {k: m.out_features for k in KINDS}
        else:
            bad(f"{prefix} has unknown type {m.type!r}")
        for name, e in index.units.items():
            if e.module == prefix and e.rows != want.get(name.rsplit(".", 1)[-1], e.rows):
                bad(f"unit {name} declares {e.rows} rows, its module's units have {want[name.rsplit('.', 1)[-1]]}")
    _check_rows_disjoint(index, bad)


def _check_rows_disjoint(index, bad) -> None:
    """No two units may share rows of a set (a swapped or duplicated `row` would silently mix weights)."""
    spans: dict[tuple[str, str, str], list[tuple[int, int, str]]] = {}
    for name, e in index.units.items():
        spans.setdefault((e.module, e.tensor, e.set), []).append((e.row, e.row + e.rows, name))
    for key, s in spans.items():
        s.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(s, s[1:]):
            if b0 < a1:
                bad(f"units {an} and {bn} overlap in {key[0]}.{key[1]}.{key[2]}")
