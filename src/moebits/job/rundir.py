"""A run directory: each stage writes its artefact atomically, so an interrupted run resumes at the
first missing stage and a finished stage is never silently redone or half-written.

    DIR/run.json        what was asked for (model, method, budget, ...) -- a different request refuses
    DIR/stats.json      calibration statistics           (calibrate; with calib_inputs.safetensors)
    DIR/table.csv       sensitivity table                (profile)
    DIR/plan.json       unit -> choice                   (allocate)
    DIR/model/          quantized model, packed format   (quantize; see moebits.packed)
    DIR/results.json    metrics and seconds per stage    (evaluate)
    DIR/cache.json      what the caches were computed from (content fingerprints of the model and the
                        texts, fingerprint.py) and the sha256 of every cached file as written

A cached file is used only if its sha256 is the one recorded when moebits wrote it (else the run refuses
with the file named); a missing one is recomputed; inputs whose content changed make a different run.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..atomic import (RefusedPath, atomic_path, atomic_write_bytes, atomic_write_json,  # noqa: F401 (re-exported)
                     atomic_write_text, check_replaceable)
from .config import SpecVersionError, full_spec, same_request

# what a run writes into its directory: clearing a run (--overwrite) removes these and nothing else
RUN_ARTEFACTS = ("run.json", "cache.json", "stats.json", "calib_inputs.safetensors", "table.csv", "plan.json", "model",
                 "model.layers", "results.json", "stream", "model.partial", "model.old",
                 "gguf_table.json", "gguf_plan.json", "imatrix.gguf")  # --target llamacpp (gguf/)
STAGE_ARTEFACTS = tuple(n for n in RUN_ARTEFACTS if n not in ("run.json", "cache.json"))
MANIFEST = "cache.json"
MANIFEST_FORMAT = "moebits.cache/1"


class RunMismatchError(RuntimeError):
    pass


class CacheError(ValueError):
    """A cached file of a run that is not what moebits wrote (edited, truncated, damaged)."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(root: Path) -> dict | None:
    p = root / MANIFEST
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text())
        if m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("files"), dict):
            raise ValueError("not a moebits cache manifest")
        return m
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise CacheError(f"{p} is damaged ({e}); delete it and the run's cached files, or rerun with "
                         "--overwrite") from None


def record_file(root: str | Path, *names: str) -> None:
    """Record the sha256 of the files `names` of the run directory `root` as written by moebits."""
    root = Path(root)
    m = _read_manifest(root) or {"format": MANIFEST_FORMAT, "inputs": {}, "files": {}}
    for n in names:
        if (root / n).is_file():
            m["files"][n] = file_sha256(root / n)
        else:
            m["files"].pop(n, None)
    atomic_write_json(root / MANIFEST, m)


def is_run_dir(path: str | Path) -> bool:
    """A directory moebits recognises as a run: it holds run.json."""
    return (Path(path) / "run.json").is_file()


class Run:
    """A directory of stage artefacts, bound to one request (`spec`).

    An existing directory is reused when it holds the same request (resume); a different request is
    refused unless `overwrite`, which then removes the run's own artefacts only (anything else in the
    directory stays). A run that produced nothing yet (a refused or failed start: run.json alone) is
    simply taken over by the new request. A directory that is not a run is never emptied: refused."""

    def __init__(self, root: str | Path, spec: dict, overwrite: bool = False, inputs: dict | None = None):
        self.root = Path(root)
        self.spec = spec
        spec_path, old = self.root / "run.json", None
        if self.root.is_symlink() or (self.root.exists() and not self.root.is_dir()):
            raise RunMismatchError(f"--out {self.root} is an existing file, not a directory; choose a new "
                                   "directory path for the run")
        if spec_path.exists():
            try:
                old = json.loads(spec_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = None
            if not same_request(old, spec) and self.stage_artefacts():
                if not overwrite:
                    diff = _spec_diff(old, spec)
                    raise RunMismatchError(
                        f"{self.root} already holds a different run (its run.json: {diff}). "
                        "Choose another --out, or pass --overwrite to replace it."
                    )
                self.clear()
        elif self.root.exists() and any(self.root.iterdir()):
            raise RunMismatchError(
                f"{self.root} exists and is not a moebits run directory (no run.json); moebits does not delete what "
                "it did not write: choose a new or empty directory for --out"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        if not spec_path.exists() or old != spec:  # an old version's request is rewritten at this version
            atomic_write_json(spec_path, spec)
        if inputs is not None:
            self.check_inputs(inputs, overwrite)

    # -- what the caches were computed from, and their checksums (cache.json) --------------------
    def check_inputs(self, inputs: dict, overwrite: bool = False) -> None:
        """The content fingerprints of the model and the texts must be those the cached stages were
        computed from; else this is a different run (refused, or cleared with `overwrite`). A run made
        before fingerprints existed adopts the current ones (its files are trusted as they are)."""
        m = _read_manifest(self.root)
        if m is None:
            m = {"format": MANIFEST_FORMAT, "inputs": dict(inputs), "files": {}}
            for n in STAGE_ARTEFACTS:  # a run made before cache.json: record what it holds now
                if (self.root / n).is_file():
                    m["files"][n] = file_sha256(self.root / n)
            atomic_write_json(self.root / MANIFEST, m)
            return
        changed = [k for k in inputs if k in m.get("inputs", {}) and m["inputs"][k] != inputs[k]]
        if changed and self.stage_artefacts():
            if not overwrite:
                raise RunMismatchError(
                    f"{self.root} was computed from a different {' and '.join(changed)} (its content changed since "
                    f"{MANIFEST} recorded it: fingerprint {m['inputs'][changed[0]][:20]}... -> {inputs[changed[0]][:20]}...); restore it, "
                    "choose another --out, or pass --overwrite to recompute the run")
            self.clear()
            m = {"format": MANIFEST_FORMAT, "inputs": {}, "files": {}}
        m["inputs"] = {**m.get("inputs", {}), **inputs}
        atomic_write_json(self.root / MANIFEST, m)

    def verify_all(self) -> None:
        """Check every file cache.json records (CacheError naming the first that differs or is missing)."""
        m = _read_manifest(self.root)
        for name in (m or {}).get("files", {}):
            if not (self.root / name).is_file():
                raise CacheError(f"{self.root / name} is missing from this finished run; rerun with --overwrite to "
                                 "recompute the run, or restore the file")
            self.verified(name)

    def record(self, *names: str) -> None:
        record_file(self.root, *names)

    def verified(self, name: str) -> bool:
        """Whether the cached file `name` exists and is what moebits wrote. A file the manifest does not
        know (written by an interrupted write, or by hand) counts as absent: it is recomputed. A file
        whose sha256 differs from the recorded one is refused (CacheError naming it)."""
        p = self.root / name
        if not p.is_file():
            return False
        m = _read_manifest(self.root)
        want = (m or {}).get("files", {}).get(name)
        if m is None:
            return True  # no manifest at all: a Run made without inputs (library use); nothing to check against
        if want is None:
            return False
        if file_sha256(p) != want:
            raise CacheError(f"{p} was changed or damaged after moebits wrote it (its sha256 differs from the one "
                             f"recorded in {self.root / MANIFEST}); delete it to recompute it, or restore it")
        return True

    def stage_artefacts(self) -> list[str]:
        """The stage artefacts this run directory holds (run.json aside)."""
        return [n for n in STAGE_ARTEFACTS if (self.root / n).exists()]

    def clear(self) -> None:
        """Remove what a run writes (RUN_ARTEFACTS and its temporary files); leave everything else."""
        for name in RUN_ARTEFACTS:
            p = self.root / name
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
        for p in self.root.glob(".*"):  # temporaries of atomic writes: .NAME.XXXX.tmp / .NAME.XXXX.moebits-partial
            if any(p.name.startswith(f".{n}.") for n in RUN_ARTEFACTS) and \
                    p.name.endswith((".tmp", ".moebits-partial", ".moebits-old")):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def path(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return (self.root / name).exists()


def read_json(path: str | Path) -> dict:
    """A JSON object file moebits wrote; a truncated or garbled one is a ValueError naming it."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is not valid JSON ({e}): it is truncated or damaged; delete it to recompute it "
                         "(or restore it)") from None
    if not isinstance(d, dict):
        raise CacheError(f"{path} does not hold a JSON object: it is damaged; delete it to recompute it")
    return d


def read_cached_json(run: Run, name: str) -> dict | None:
    """A run's cached JSON file (None when absent or not recorded), verified; damage names the file."""
    if not run.verified(name):
        return None
    return read_json(run.path(name))


def _spec_diff(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "its run.json is unreadable"
    try:
        a, b = full_spec(old), full_spec(new)
    except SpecVersionError as e:
        return str(e)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:4]) or "different"
