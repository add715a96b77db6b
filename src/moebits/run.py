"""A run directory: each stage writes its artefact atomically, so an interrupted run resumes at the
first missing stage and a finished stage is never silently redone or half-written.

    DIR/run.json        what was asked for (model, method, budget, ...) -- a different request refuses
    DIR/stats.json      calibration statistics           (calibrate; with calib_inputs.safetensors)
    DIR/table.csv       sensitivity table                (profile)
    DIR/plan.json       unit -> choice                   (allocate)
    DIR/model/          quantized model, packed format   (quantize; see moebits.packed)
    DIR/results.json    metrics and seconds per stage    (evaluate)
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


class RunMismatchError(RuntimeError):
    pass


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path in `path`'s directory to write to; on success it is renamed to `path`, so
    readers never see half a file (and a failed write leaves no file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class Run:
    """A directory of stage artefacts, bound to one request (`spec`)."""

    def __init__(self, root: str | Path, spec: dict, overwrite: bool = False):
        self.root = Path(root)
        self.spec = spec
        spec_path = self.root / "run.json"
        if spec_path.exists():
            try:
                old = json.loads(spec_path.read_text())
            except json.JSONDecodeError:
                old = None
            if old != spec:
                if not overwrite:
                    diff = _spec_diff(old, spec)
                    raise RunMismatchError(
                        f"{self.root} already holds a different run ({diff}). "
                        "Choose another --out, or pass --overwrite to replace it."
                    )
                self.clear()
        elif self.root.exists() and any(self.root.iterdir()) and not overwrite:
            raise RunMismatchError(
                f"{self.root} exists and is not a moebits run directory; choose another --out or pass --overwrite."
            )
        elif overwrite and self.root.exists():
            self.clear()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(spec_path, spec)

    def clear(self) -> None:
        import shutil

        for p in self.root.iterdir() if self.root.exists() else []:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()

    def path(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return (self.root / name).exists()


def _spec_diff(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "its run.json is unreadable"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "different"
