"""Content fingerprints of what a run is computed from: the model's weights and the texts.

A run directory caches every stage (run.py). Its options are in run.json; these fingerprints key the
caches by the *content* of the inputs, so that editing the calibration text, or replacing the model's
weights under the same path, between an interrupted run and its resume is noticed instead of silently
reusing statistics computed from the old inputs.

- text (calibration / evaluation): sha256 of the text moebits reads (`data.load_text`).
- a model directory: sha256 over every file's name and size, the whole of each file up to 64 MiB,
  and of larger files their safetensors header (names, dtypes, shapes, offsets) plus three 1 MiB
  samples (start, middle, end) -- cheap on a 30 GB checkpoint, and any re-save or edit of the header
  changes it. `tiny:<arch>` models are built from a config and the run's seed: their name is their key.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

_WHOLE = 64 << 20
_SAMPLE = 1 << 20


def text_fingerprint(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _file_digest(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= _WHOLE:
            for chunk in iter(lambda: f.read(_SAMPLE * 8), b""):
                h.update(chunk)
            return
        if path.suffix == ".safetensors":
            n = struct.unpack("<Q", f.read(8))[0]
            h.update(f.read(min(n, _WHOLE)))
        for at in (0, size // 2, max(size - _SAMPLE, 0)):
            f.seek(at)
            h.update(f.read(_SAMPLE))


def directory_fingerprint(directory: str | Path) -> str:
    """sha256 of a model directory's files (see the module docstring); hidden files are skipped."""
    h = hashlib.sha256()
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts):
            h.update(str(p.relative_to(directory)).encode() + b"\0")
            _file_digest(h, p)
    return "sha256:" + h.hexdigest()


def model_fingerprint(spec: str) -> str:
    """The content key of the model `spec` ("demo", "tiny:<arch>", a local directory, or a hub name)."""
    if spec == "demo":
        from .demo import CHECKPOINT_DIR

        return directory_fingerprint(CHECKPOINT_DIR) if Path(CHECKPOINT_DIR).is_dir() else "demo"
    if spec.startswith("tiny:"):
        return spec  # built from a config and the run's seed (both in run.json)
    p = Path(spec).expanduser()
    if p.is_dir():
        return directory_fingerprint(p)
    return f"hub:{spec}"  # resolved by transformers' cache; its files are not ours to hash here


def run_inputs(model: str, calib: str, eval_text: str) -> dict[str, str]:
    """The fingerprints a run's caches are keyed by (run.py's cache.json)."""
    from .data import load_text

    return {"model": model_fingerprint(model), "calib": text_fingerprint(load_text(calib, "calib")),
            "eval": text_fingerprint(load_text(eval_text, "eval"))}
