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
import shutil
from pathlib import Path

from .atomic import (RefusedPath, atomic_path, atomic_write_bytes, atomic_write_json,  # noqa: F401 (re-exported)
                     atomic_write_text, check_replaceable)

# what a run writes into its directory: clearing a run (--overwrite) removes these and nothing else
RUN_ARTEFACTS = ("run.json", "stats.json", "calib_inputs.safetensors", "table.csv", "plan.json", "model",
                 "model.layers", "results.json", "stream", "model.partial", "model.old")
STAGE_ARTEFACTS = tuple(n for n in RUN_ARTEFACTS if n != "run.json")


class RunMismatchError(RuntimeError):
    pass


def is_run_dir(path: str | Path) -> bool:
    """A directory moebits recognises as a run: it holds run.json."""
    return (Path(path) / "run.json").is_file()


class Run:
    """A directory of stage artefacts, bound to one request (`spec`).

    An existing directory is reused when it holds the same request (resume); a different request is
    refused unless `overwrite`, which then removes the run's own artefacts only (anything else in the
    directory stays). A run that produced nothing yet (a refused or failed start: run.json alone) is
    simply taken over by the new request. A directory that is not a run is never emptied: refused."""

    def __init__(self, root: str | Path, spec: dict, overwrite: bool = False):
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
            if old != spec and self.stage_artefacts():
                if not overwrite:
                    diff = _spec_diff(old, spec)
                    raise RunMismatchError(
                        f"{self.root} already holds a different run ({diff}). "
                        "Choose another --out, or pass --overwrite to replace it."
                    )
                self.clear()
        elif self.root.exists() and any(self.root.iterdir()):
            raise RunMismatchError(
                f"{self.root} exists and is not a moebits run directory (no run.json); moebits does not delete what "
                "it did not write: choose a new or empty directory for --out"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        if not spec_path.exists() or old != spec:
            atomic_write_json(spec_path, spec)

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


def _spec_diff(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "its run.json is unreadable"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "different"
