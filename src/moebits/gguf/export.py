"""`moebits export RUN --format gguf --out FILE.gguf [--pure TYPE]`: a run as a GGUF for llama.cpp.

The run's original model (from its run.json) is written tensor by tensor, each weight quantized by llama.cpp's
ggml code (`writer.py`) with the run's importance matrix at

  * the types of the run's `gguf_plan.json` (a run of `quantize --target llamacpp`: every GGUF tensor -> ggml
    type, chosen under a file budget), or
  * one type for every tensor (`--pure TYPE`; `F16` is the file `llama-quantize` takes for its stock mixes), or
  * by default, the moebits plan's bits mapped to K-quants: a fused expert tensor takes the widest bits of its
    experts (llama.cpp holds one type per tensor), 2/3/4/5/6/8 bits -> Q2_K/Q3_K/Q4_K/Q5_K/Q6_K/Q8_0 and 16 ->
    F16; tensors outside the plan (attention, embeddings, output) Q8_0.

Beside FILE.gguf it writes FILE.imatrix.gguf (the importance matrix, llama.cpp's format: the run's own
`imatrix.gguf` when it has one, else collected over the run's calibration windows), FILE.tensor-types.txt
(every quantized tensor pinned to its type, `llama-quantize --tensor-type-file` syntax) and FILE.moebits.json
(what was written), so that

    llama-quantize --imatrix FILE.imatrix.gguf --tensor-type-file FILE.tensor-types.txt MODEL-F16.gguf OUT.gguf Q8_0

reproduces FILE.gguf from the F16 export of the same run (`--pure F16`); the trailing type only names the
file type, every quantized tensor being pinned.

An existing FILE.gguf is replaced only when moebits wrote it (its metadata says so); anything else is refused.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from . import ggml
from .imatrix import Imatrix

RUN_IMATRIX = "imatrix.gguf"  # an importance matrix the run saved (quantize --target llamacpp)
RUN_GGUF_PLAN = "gguf_plan.json"
BITS_TO_TYPE = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0", 16: "F16"}
OUTSIDE_PLAN_TYPE = "Q8_0"


class GGUFExportRefused(ValueError):
    pass


def sidecars(out: Path) -> dict[str, Path]:
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    return {"imatrix": out.with_name(stem + ".imatrix.gguf"), "tensor_types": out.with_name(stem + ".tensor-types.txt"),
            "report": out.with_name(stem + ".moebits.json")}


def written_by_moebits(path: Path) -> bool:
    """Whether `path` is a GGUF moebits wrote (its metadata carries writer.MOEBITS_KEY)."""
    import gguf

    from .writer import MOEBITS_KEY

    try:
        return gguf.GGUFReader(str(path)).get_field(MOEBITS_KEY) is not None
    except Exception:  # not a GGUF at all
        return False


def check_target(out: Path) -> None:
    """Refuse to replace files moebits did not write (FILE.gguf and its side files)."""
    if out.is_dir():
        raise GGUFExportRefused(f"--out {out} is a directory; give a file name such as {out / 'model.gguf'}")
    if not out.name.endswith(".gguf"):
        raise GGUFExportRefused(f"--out {out}: a GGUF file name ends with .gguf")
    side = sidecars(out)
    ours = out.exists() and written_by_moebits(out)
    if out.exists() and not ours:
        raise GGUFExportRefused(f"{out} exists and was not written by moebits; refusing to replace it "
                                "(choose another --out, or move it away yourself)")
    for kind, p in side.items():
        if p.exists() and not ours:
            raise GGUFExportRefused(f"{p} exists and {out} is not a moebits export it belongs to; refusing to "
                                    "replace it (choose another --out)")


def plan_types(plan, gm, default: str = OUTSIDE_PLAN_TYPE) -> tuple[dict[str, str], str]:
    """GGUF types from a moebits plan (unit bits); see the module docstring. Returns (types, note)."""
    bits: dict[str, int] = defaultdict(int)
    for unit, a in plan.assignments.items():
        name, _ = gm.unit_tensor(unit)
        bits[name] = max(bits[name], int(a.choice.bits))
    types = {}
    for t in gm.tensors:
        if not t.quantizable:
            continue
        if t.name in bits:
            b = bits[t.name]
            b = min((k for k in BITS_TO_TYPE if k >= b), default=16)
            types[t.name] = BITS_TO_TYPE[b]
        else:
            types[t.name] = default
    note = ("types from the moebits plan: each fused expert tensor at the widest bits of its experts, "
            f"bits -> {BITS_TO_TYPE}; tensors outside the plan at {default}")
    return types, note


def run_imatrix(pipe, run_dir: Path, progress: bool = False) -> tuple[Imatrix, str]:
    """The run's importance matrix: its saved file, or collected over its calibration windows."""
    from ..data import calibration_windows
    from .imatrix import collect_imatrix

    saved = run_dir / RUN_IMATRIX
    if saved.exists():
        return Imatrix.load(saved), str(saved)
    cfg = pipe.cfg
    cfg.resolve_seqlens()
    windows = calibration_windows(pipe.tokenizer, cfg.calib, cfg.nsamples, cfg.calib_seqlen, cfg.seed)
    im = collect_imatrix(pipe.model, windows, cfg.batch_size, pipe.adapter, progress,
                         dataset=f"moebits calibration: {cfg.calib} ({cfg.nsamples} x {cfg.calib_seqlen} tokens, "
                                 f"seed {cfg.seed})")
    return im, "collected over the run's calibration windows"


def export_gguf(run_dir: str | Path, out: str | Path, pure: str | None = None, reference: str = "F16",
                progress: bool = False) -> dict:
    """Write RUN as FILE.gguf (+ side files); returns the report written to FILE.moebits.json."""
    from ..job import Pipeline
    from ..plan import Plan
    from ..atomic import atomic_write_json, atomic_write_text
    from .convert import GGUFModel
    from .llamacpp import tensor_type_lines
    from .writer import write_gguf

    run_dir, out = Path(run_dir), Path(out)
    ggml.require()
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a moebits run directory (no run.json)")
    check_target(out)
    pipe = Pipeline.from_run(run_dir, progress=progress)
    if pipe.cfg.rotate:
        raise GGUFExportRefused(f"{run_dir} was quantized with --rotate {pipe.cfg.rotate}; llama.cpp runs the "
                                "original (unrotated) architecture: quantize without --rotate to export GGUF")
    pipe.load()
    gm = GGUFModel(pipe.model)
    if pure is not None:
        pure = pure.upper()
        ggml.type_id(pure)
        types, source = {t.name: pure for t in gm.tensors if t.quantizable}, f"--pure {pure}"
    elif (run_dir / RUN_GGUF_PLAN).exists():
        d = json.loads((run_dir / RUN_GGUF_PLAN).read_text())
        types = {k: v for k, v in d["types"].items() if k in gm.by_name and gm.by_name[k].quantizable}
        source = f"{RUN_GGUF_PLAN} (quantize --target llamacpp)"
    elif (run_dir / "plan.json").exists():
        types, source = plan_types(Plan.load(run_dir / "plan.json"), gm)
    else:
        raise GGUFExportRefused(f"{run_dir} has no plan (plan.json / {RUN_GGUF_PLAN}): finish `moebits quantize`, "
                                "or pass --pure TYPE")
    needs_im = any(ggml.is_quantized(ggml.fallback_type(t, gm.by_name[n].cols)) for n, t in types.items())
    imatrix, im_source = run_imatrix(pipe, run_dir, progress) if needs_im else (None, "none (no quantized tensor)")
    side = sidecars(out)
    report = write_gguf(out, pipe.model, pipe.tokenizer, types, imatrix, model_dir=_model_dir(pipe),
                        reference=reference, imatrix_file=side["imatrix"].name, progress=progress)
    quantized = {r.name: r.type for r in report.tensors if gm.by_name[r.name].quantizable}
    if imatrix is not None:
        imatrix.save(side["imatrix"])
    atomic_write_text(side["tensor_types"], "\n".join(tensor_type_lines(quantized)) + "\n")
    summary = {"format": "gguf", "out": str(out), "run": str(run_dir), "types_from": source,
               "imatrix": im_source, "reference": reference, **report.summary(),
               "side_files": {k: str(v) for k, v in side.items() if k != "report"},
               "llama_quantize": (f"llama-quantize --imatrix {side['imatrix'].name} --tensor-type-file "
                                  f"{side['tensor_types'].name} MODEL-F16.gguf {out.name} Q8_0")}
    atomic_write_json(side["report"], summary)
    return summary


def _model_dir(pipe) -> Path | None:
    """A directory with the model's tokenizer files (for the gguf package's SpecialVocab), if local."""
    spec = pipe.cfg.model
    if spec == "demo":
        from ..demo import CHECKPOINT_DIR

        return Path(CHECKPOINT_DIR)
    p = Path(spec).expanduser()
    return p if p.is_dir() else None
