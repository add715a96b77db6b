"""Writing files and directories so that nothing is half-written and nothing is lost.

Every file or directory moebits writes goes first to a temporary sibling (same parent, so the final
`rename` is atomic on one filesystem) and is swapped into place only once complete: a reader never
sees half an artefact, and an interrupted write leaves the old one (or nothing).

Replacing an existing directory deletes it, so moebits replaces only what it can prove it wrote:

- a directory holding the marker file `.moebits-output` (written into every directory made here);
- a directory written before the marker existed, recognised by its contents: a moebits `plan.json`
  plus only the files moebits writes next to it (config, weights, tokenizer, ...);
- an empty directory.

Anything else is refused with `RefusedPath`, which names the path and says what to do. A run
directory (run.py) is recognised by its `run.json`, and clearing it removes only the artefacts a
run writes.
"""
from __future__ import annotations

import fnmatch
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

MARKER = ".moebits-output"
_PARTIAL = ".moebits-partial"  # suffix of a temporary sibling directory under construction

# what moebits writes into a model/export directory (dequantized, packed, compressed-tensors): a
# directory made before the marker existed holding only these (and a moebits plan.json) is ours
_MODEL_DIR_FILES = ("config.json", "generation_config.json", "plan.json", "moebits_export.json", "*.safetensors",
                    "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                    "vocab*", "merges.txt", "chat_template*", MARKER)


class RefusedPath(ValueError):
    """moebits will not write (or delete) a path it cannot prove it owns; the message says what to do."""


# ---- files ------------------------------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path in `path`'s directory to write to; on success it is renamed to `path`, so
    readers never see half a file (and a failed write leaves no file)."""
    path = Path(path)
    if path.is_dir():
        raise RefusedPath(f"{path} is a directory; expected a file path to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ---- directories ------------------------------------------------------------------------------------
def has_marker(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _legacy_model_dir(path: Path) -> bool:
    """A model/export directory written before the marker: a moebits plan.json and only files moebits writes."""
    plan = path / "plan.json"
    try:
        ok = plan.is_file() and json.loads(plan.read_text()).get("format") == "moebits.plan/1"
    except (OSError, ValueError, AttributeError):
        return False
    return ok and all(p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in _MODEL_DIR_FILES)
                      for p in path.iterdir())


def owned_dir(path: str | Path) -> bool:
    """Whether the existing directory `path` may be replaced: moebits provably wrote it, or it is empty."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    return has_marker(path) or not any(path.iterdir()) or _legacy_model_dir(path)


def check_replaceable(out_dir: str | Path, what: str = "--out") -> None:
    """Refuse, before any work, an output path whose current content moebits did not write."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise RefusedPath(f"{what} {out_dir} is an existing file, not a directory; choose a new directory path")
    if out_dir.exists() and not owned_dir(out_dir):
        raise RefusedPath(f"{what} {out_dir} exists and was not written by moebits (it holds no {MARKER} marker); "
                          "moebits does not delete what it did not write: choose a new or empty directory")


def _write_marker(directory: Path, kind: str, files: dict | None = None) -> None:
    d = {"writer": "moebits", "kind": kind, **({"files": files} if files is not None else {})}
    (directory / MARKER).write_text(json.dumps(d, indent=1) + "\n")


_HASHED_MAX = 64 << 20  # small files (config, plan, tokenizer) are hashed into the marker; weights verify themselves


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def seal(directory: Path, kind: str) -> None:
    """Write the marker with the sha256 of every small file of `directory` (not *.safetensors: a packed
    checkpoint checksums its own tensors), so that `verify_sealed` can tell an edited config or plan."""
    files = {p.name: _sha256(p) for p in sorted(directory.iterdir())
             if p.is_file() and p.name != MARKER and not p.name.endswith(".safetensors")
             and p.stat().st_size <= _HASHED_MAX}
    _write_marker(directory, kind, files)


def verify_sealed(directory: str | Path) -> None:
    """Refuse (ValueError naming the file) a small file of a sealed directory that differs from what
    moebits wrote, or is missing. Directories without a sealed marker (older ones) pass."""
    directory = Path(directory)
    try:
        files = json.loads((directory / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(files, dict):
        return
    for name, want in files.items():
        p = directory / name
        if not p.is_file():
            raise RefusedPath(f"{p} is missing (moebits wrote it with this directory); copy the directory again or "
                              "re-create it")
        if _sha256(p) != want:
            raise RefusedPath(f"{p} was changed or damaged after moebits wrote it (its sha256 differs from the one "
                              f"in {directory / MARKER}); copy the directory again or re-create it")


def new_partial_dir(out_dir: str | Path, kind: str) -> Path:
    """A fresh temporary sibling directory of `out_dir` (marked as ours, so a stale one from a killed
    run can be removed safely later)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=_PARTIAL))
    _write_marker(tmp, kind)
    return tmp


def remove_stale_partials(out_dir: Path) -> None:
    """Temporary siblings of `out_dir` left by a killed writer (they carry our marker)."""
    if not out_dir.parent.is_dir():
        return
    for p in out_dir.parent.glob(f".{glob_escape(out_dir.name)}.*"):
        if p.is_dir() and not p.is_symlink() and p.name.endswith((_PARTIAL, ".moebits-old")) and has_marker(p):
            shutil.rmtree(p, ignore_errors=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def publish_dir(tmp: Path, out_dir: str | Path) -> Path:
    """Swap the finished directory `tmp` into `out_dir`. An existing `out_dir` must be ours
    (`owned_dir`); it is renamed aside, the new one renamed in, then the old one deleted, so at no
    point is a half-written directory at `out_dir`."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(4)}.moebits-old")
        _write_marker_if_missing(out_dir)  # so a crash between the renames leaves a removable sibling
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)
    return out_dir


def _write_marker_if_missing(directory: Path) -> None:
    if not has_marker(directory):
        _write_marker(directory, "replaced")


@contextmanager
def atomic_dir(out_dir: str | Path, kind: str):
    """Yield a temporary sibling directory to fill; on success it replaces `out_dir` (which must be
    absent, empty, or written by moebits: checked before any work); on failure it is removed."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    tmp = new_partial_dir(out_dir, kind)
    try:
        yield tmp
        seal(tmp, kind)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_owned(path: str | Path) -> None:
    """Delete `path` (a file, or a directory moebits provably wrote); refuse anything else."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        check_replaceable(path, "directory")
        shutil.rmtree(path)
