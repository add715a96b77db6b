"""`moebits report RUN [RUN ...] --out DIR [--truth TABLE]`: what the runs did, as pictures.

Writes `DIR/report.md` and `DIR/report.html` (the same content) with PNGs under `DIR/img/`:

* per run: bits per layer x expert for each kind (gate / up / down), the sensitivity of the table
  (profiled or FRI-predicted, log scale, at the lowest candidate bit-width) and the routing frequency on
  the same grid, FRI anchors marked; the bits histogram; seconds per stage;
* across runs: perplexity (and the zero-shot average when `moebits eval --run` added one) against average
  bits, one marker per method, the Pareto front drawn; the runs side by side in a table;
* for runs whose table is partly predicted (FRI: measured at anchors only), with `--truth TABLE` (a fully
  profiled table of the same model and choices): predicted against measured error on the held-out
  (non-anchor) units, with Spearman rho and the mean |log10| error.

A run directory is read defensively: whatever is missing or unreadable is listed under the run
("incomplete") and the rest is still shown; nothing a run lacks stops the report.
"""
from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import plots
from .job.config import full_spec
from .plan import Plan
from .stats import CalibrationStats
from .table import SensitivityTable
from .units import KINDS

STAGES = ("calibrate", "ppl_fp_eval", "profile", "fit", "predict", "allocate", "quantize", "ppl_q_eval")


# ------------------------------------------------------------------------------------------- reading

@dataclass
class RunView:
    """What one run directory holds; `None` for an artefact that is absent or unreadable."""
    path: Path
    name: str
    spec: dict | None = None
    results: dict | None = None
    plan: Plan | None = None
    table: SensitivityTable | None = None
    stats: CalibrationStats | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return bool(self.results and self.results.get("done"))

    def get(self, key: str, default=None):
        """A result, else the run's request (`spec`), else `default`."""
        for d in (self.results, self.spec):
            if d and d.get(key) is not None:
                return d[key]
        return default

    @property
    def method(self) -> str:
        return str(self.get("method", "?"))


def _read(run: RunView, name: str, reader):
    p = run.path / name
    if not p.exists():
        run.problems.append(f"no {name}")
        return None
    try:
        return reader(p)
    except Exception as e:  # any damage: say what and go on with the rest
        run.problems.append(f"{name} unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None


def _profiles(method: str) -> bool:
    """Whether a run of `method` writes a sensitivity table (unknown methods: look for one)."""
    from .methods import get_method

    try:
        return get_method(method).profiles
    except ValueError:
        return False


def read_run(path: str | Path, name: str | None = None) -> RunView:
    path = Path(path)
    run = RunView(path, name or path.name or str(path))
    if not path.is_dir():
        run.problems.append("not a directory")
        return run
    run.spec = _read(run, "run.json", lambda p: full_spec(json.loads(p.read_text())))  # any version, defaults filled
    if run.spec is None:
        run.problems[-1] += " (not a moebits run directory)"
    run.results = _read(run, "results.json", lambda p: json.loads(p.read_text()))
    run.plan = _read(run, "plan.json", Plan.load)
    if _profiles(run.method) or (path / "table.csv").exists():
        run.table = _read(run, "table.csv", SensitivityTable.from_csv)
    run.stats = _read(run, "stats.json", lambda p: CalibrationStats.load(p)[0])
    if run.results is not None and not run.results.get("done"):
        run.problems.append("results.json says the run did not finish")
    return run


# ------------------------------------------------------------------------------------------- numbers

def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def size_bytes(results: dict | None) -> float | None:
    """The stored size of the model as results.json gives it (whole model first, experts only else)."""
    for key in ("model_bytes", "packed_bytes", "weight_bytes", "expert_bytes"):
        v = _num((results or {}).get(key))
        if v is not None:
            return v
    return None


def zero_shot_average(results: dict | None) -> tuple[float | None, str]:
    """The zero-shot average `moebits eval --run` left in results.json, and what it averages: the mean of
    acc_norm-or-acc over the tasks (zeroshot.py's default metric), or a plain number as older runs wrote."""
    avg = (results or {}).get("tasks_average")
    if isinstance(avg, dict):
        for key in ("acc_norm", "acc"):
            if _num(avg.get(key)) is not None:
                return _num(avg[key]), f"{avg.get('label') or 'zero-shot average'} ({key})"
        return None, ""
    return _num(avg), "zero-shot average"


def stage_seconds(results: dict | None) -> dict[str, float]:
    out = {}
    for stage in STAGES:
        v = _num((results or {}).get(f"{stage}_seconds"))
        if v is not None and (v > 0 or stage in ("calibrate", "allocate", "quantize")):
            out[stage.replace("ppl_fp_eval", "eval fp").replace("ppl_q_eval", "eval q")] = v
    return out


def _budget_text(b) -> str:
    """`{"bits": 3.25}` -> "3.25 bits"; anything else as it is written."""
    if not (isinstance(b, dict) and b):
        return "—"
    k, v = next(iter(b.items()))
    x = _num(v)
    if x is None:
        return f"{k} {v}"
    act = f" + {b['act_bits']:g} activation bits" if _num(b.get("act_bits")) is not None else ""
    return {"bits": f"{x:g} bits", "memory": f"{x:g} GB", "latency": f"{x * 1e3:.4g} ms",
            "wbits": f"{x:g}-bit codes"}.get(k, f"{k} {x:g}") + act


def _bits_text(r: dict) -> str:
    """Average weight bits, with the average activation bits of a W-A run (e.g. "4.9972 / A5.00")."""
    w = _fmt(r.get("avg_bits"), ".4f")
    a = _num(r.get("avg_act_bits"))
    return w if a is None else f"{w} / A{a:.2f}"


def _fmt(x, spec: str, missing: str = "—") -> str:
    x = _num(x)
    return missing if x is None else format(x, spec)


def anchor_units(table: SensitivityTable) -> np.ndarray:
    """[U] bool: units measured at every choice (FRI anchors; all units of a full profile)."""
    return table.measured.all(axis=1)


def is_predicted(table: SensitivityTable | None) -> bool:
    """A table measured at some units and predicted at the others (FRI, or any method that predicts)."""
    return table is not None and bool(table.measured.any()) and not bool(table.measured.all())


def heldout_comparison(run_table: SensitivityTable, truth: SensitivityTable) -> dict:
    """Predicted (the run's table) vs measured (`truth`) error on entries the run did not measure,
    quantized choices, both finite and positive. Raises ValueError when the tables do not match."""
    from scipy.stats import spearmanr

    if set(run_table.units) != set(truth.units) or set(run_table.choices) != set(truth.choices):
        raise ValueError("the truth table does not have the run's units and choices")
    rows = np.array([truth.unit_index(u) for u in run_table.units])
    cols = np.array([truth.choice_index(c) for c in run_table.choices])
    measured = truth.error[np.ix_(rows, cols)]
    predicted = run_table.error
    quantized = np.array([not c.is_fp for c in run_table.choices])[None, :]
    sel = (~run_table.measured) & quantized & np.isfinite(predicted) & np.isfinite(measured) & (predicted > 0) & (measured > 0)
    if not sel.any():
        raise ValueError("the run predicted no entry the truth table measured")
    bits = np.broadcast_to(np.array([c.bits for c in run_table.choices], float)[None, :], sel.shape)[sel]
    p, m = predicted[sel], measured[sel]
    rho_per_bit = [spearmanr(p[bits == b], m[bits == b]).statistic for b in sorted(set(bits.tolist()))
                   if (bits == b).sum() > 2]
    return {"predicted": p, "measured": m, "bits": bits, "n": int(sel.sum()),
            "rho": float(spearmanr(p, m).statistic), "rho_within_bits": float(np.nanmean(rho_per_bit)) if rho_per_bit else float("nan"),
            "mae_log10": float(np.mean(np.abs(np.log10(p) - np.log10(m))))}


# ------------------------------------------------------------------------------------------- document

@dataclass
class Doc:
    """Markdown and HTML from one list of blocks, so both say the same."""
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def items(self, lines: list[str]):
        if lines:
            self.blocks.append(("ul", lines))

    def table(self, headers: list[str], rows: list[list[str]]):
        self.blocks.append(("table", headers, rows))

    def img(self, rel: str, alt: str):
        self.blocks.append(("img", rel, alt))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {x}" for x in b[1]))
            elif b[0] == "table":
                lines = ["| " + " | ".join(b[1]) + " |", "|" + "|".join("---" for _ in b[1]) + "|"]
                lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in b[2]]
                out.append("\n".join(lines))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        e = html.escape
        out = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
               "th{background:#f3f3f3}img{max-width:100%;display:block;margin:0.5em 0}"
               "code{background:#f3f3f3}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
            elif b[0] == "table":
                head = "".join(f"<th>{e(h)}</th>" for h in b[1])
                body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
                out.append(f"<table><tr>{head}</tr>{body}</table>")
            elif b[0] == "img":
                out.append(f"<img src='{e(b[1])}' alt='{e(b[2])}'>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def _inline(text: str) -> str:
    """The little markdown the report writes: `code` and **bold**."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "run"


# ------------------------------------------------------------------------------------------- sections

def _run_section(doc: Doc, run: RunView, img: Path, out: Path, slug: str, truth: SensitivityTable | None) -> list[Path]:
    images: list[Path] = []

    def add(path: Path, alt: str):
        images.append(path)
        doc.img(path.relative_to(out).as_posix(), alt)

    status = "complete" if run.complete else "**incomplete**"
    doc.h(2, f"{run.name} ({run.method}, {status})")
    doc.p(f"`{run.path}`")
    if run.problems:
        doc.items([f"{x}" for x in run.problems])
    r = run.results or {}
    if r:
        doc.p(f"method {run.method}, quantizer {run.get('quantizer', '?')}, solver {r.get('solver', '?')}, "
              f"budget {_budget_text(r.get('budget'))}; avg bits {_bits_text(r)}; "
              f"perplexity {_fmt(r.get('ppl_fp'), '.3f')} (fp) -> {_fmt(r.get('ppl_q'), '.3f')} (quantized)")

    table = run.table
    marks = None  # [layers, experts] FRI anchors (whole experts: the same cells for every kind)
    if is_predicted(table):
        marks = plots.unit_grid(anchor_units(table).astype(float), table.units, KINDS[0])[0] == 1
    if run.plan is not None:
        units = run.plan.units
        bits = np.array([run.plan.choice(u).bits for u in units], float)
        panels = {k: plots.unit_grid(bits, units, k)[0] for k in KINDS}
        _, layers, cols = plots.unit_grid(bits, units, KINDS[0])
        add(plots.grid_panels(panels, layers, cols, img / f"{slug}_bits.png", f"{run.name}: bits per block",
                              "bits", discrete=sorted(set(bits.tolist())), cmap="viridis"), "bits per layer x expert")
        hist = run.plan.bits_histogram()
        add(plots.bar_chart(hist, img / f"{slug}_bits_hist.png", f"{run.name}: blocks per setting", "blocks"),
            "bits histogram")
    if table is not None:
        quantized = [j for j, c in enumerate(table.choices) if not c.is_fp]
        j = min(quantized or range(len(table.choices)), key=lambda j: table.choices[j].bits)
        panels = {k: plots.unit_grid(table.error[:, j], table.units, k)[0] for k in KINDS}
        _, layers, cols = plots.unit_grid(table.error[:, j], table.units, KINDS[0])
        what = "measured" if table.measured.all() else "measured at anchors, FRI-predicted elsewhere"
        add(plots.grid_panels(panels, layers, cols, img / f"{slug}_sensitivity.png",
                              f"{run.name}: error per routed token at {table.choices[j].label} ({what})",
                              "error l_u (log)", log=True, marks=marks, mark_label="anchor", cmap="magma"),
            "sensitivity per layer x expert")
    freq_units, freq = None, None
    if run.stats is not None:
        freq_units, freq = run.stats.units, run.stats.frequency
    elif table is not None:
        freq_units, freq = table.units, table.frequency
    if freq is not None:
        grid, layers, cols = plots.unit_grid(freq, freq_units, KINDS[0])
        add(plots.grid_panels({"routed-token frequency": grid}, layers, cols, img / f"{slug}_frequency.png",
                              f"{run.name}: routing frequency f_u (shared expert: 1)", "frequency",
                              marks=marks, mark_label="anchor", cmap="cividis"), "routing frequency")
    seconds = stage_seconds(run.results)
    if seconds:
        add(plots.bar_chart(seconds, img / f"{slug}_stages.png", f"{run.name}: seconds per stage", "seconds",
                            color="tab:orange"), "time per stage")
    if truth is not None and is_predicted(table):
        try:
            cmp = heldout_comparison(table, truth)
        except ValueError as e:
            doc.p(f"predicted vs measured: not shown ({e}).")
        else:
            doc.p(f"Prediction on held-out units: {cmp['n']:,} predicted entries, Spearman rho {cmp['rho']:.3f} "
                  f"(within a bit-width, mean {cmp['rho_within_bits']:.3f}), mean |log10 predicted - log10 measured| "
                  f"{cmp['mae_log10']:.3f}.")
            add(plots.predicted_vs_measured(cmp["predicted"], cmp["measured"], cmp["bits"],
                                            img / f"{slug}_predicted_vs_truth.png", f"{run.name}: predicted vs measured"),
                "predicted vs measured error")
    return images


def _across_runs(doc: Doc, runs: list[RunView], img: Path, out: Path) -> list[Path]:
    images = []
    doc.h(2, "Runs side by side")
    rows = []
    for run in runs:
        r = run.results or {}
        ppl_fp, ppl_q = _num(r.get("ppl_fp")), _num(r.get("ppl_q"))
        size = size_bytes(r)
        secs = sum(stage_seconds(r).values()) if r else None
        rows.append([run.name, run.method, str(run.get("quantizer", "—")), _budget_text(r.get("budget") or (
            {"bits": run.spec["bits"]} if run.spec and run.spec.get("bits") is not None else None)),
            _bits_text(r), "—" if size is None else f"{size / 1e6:.2f}",
            _fmt(ppl_q, ".3f"), "—" if ppl_fp is None or ppl_q is None else f"{100 * (ppl_q / ppl_fp - 1):+.2f}",
            _fmt(zero_shot_average(r)[0], ".4f"), "—" if secs is None else f"{secs:.1f}",
            "complete" if run.complete else "incomplete"])
    doc.table(["run", "method", "quantizer", "budget", "avg bits", "size MB", "ppl", "Δppl %", "zero-shot avg",
               "seconds", "status"], rows)
    doc.p("avg bits: storage bits per weight of the expert blocks (W-A runs: / A the average activation bits, "
          "weighted by MACs per token); size: the model as stored (results.json's `model_bytes`, else the expert "
          "weights); seconds: the "
          "sum of the stages' wall time (calibration, profiling, fitting, allocation, quantization, evaluation).")

    def points(value):
        pts = []
        for run in runs:
            r = run.results or {}
            x, y = _num(r.get("avg_bits")), value(r)
            if run.complete and x is not None and y is not None:
                pts.append({"x": x, "y": y, "method": run.method, "label": run.name})
        return pts

    ppl = points(lambda r: _num(r.get("ppl_q")))
    if ppl:
        fps = [v for v in (_num((run.results or {}).get("ppl_fp")) for run in runs if run.complete) if v is not None]
        ref = fps[0] if fps and max(fps) - min(fps) <= 1e-9 * max(fps) else None
        path = plots.pareto_plot(ppl, img / "pareto_ppl.png", "perplexity (quantized)", reference=ref,
                                 reference_label="fp16")
        images.append(path)
        doc.img(path.relative_to(out).as_posix(), "perplexity vs average bits")
    zs = points(lambda r: zero_shot_average(r)[0])
    if zs:
        labels = {label for value, label in (zero_shot_average(run.results) for run in runs if run.complete)
                  if value is not None}
        ylabel = labels.pop() if len(labels) == 1 else "zero-shot average (runs differ in tasks)"
        path = plots.pareto_plot(zs, img / "pareto_zeroshot.png", ylabel, maximize=True)
        images.append(path)
        doc.img(path.relative_to(out).as_posix(), "zero-shot average vs average bits")
    if not ppl and not zs:
        doc.p("No complete run with a perplexity: nothing to plot across runs.")
    return images


def write_report(run_dirs: list[str | Path], out: str | Path, truth: str | Path | None = None) -> dict:
    """Write `out/report.md`, `out/report.html` and `out/img/*.png`. Returns their paths and the runs'
    problems (an incomplete run is reported, not raised)."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    out = Path(out)
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    truth_table = SensitivityTable.from_csv(truth) if truth is not None else None
    names = [Path(d).name or str(d) for d in run_dirs]
    runs = [read_run(d, n if names.count(n) == 1 else f"{n} ({i + 1})") for i, (d, n) in enumerate(zip(run_dirs, names))]
    doc = Doc()
    doc.h(1, "moebits report")
    doc.p(f"{len(runs)} run(s): {sum(r.complete for r in runs)} complete, {sum(not r.complete for r in runs)} "
          "incomplete." + (f" Ground truth for FRI: `{truth}`." if truth is not None else ""))
    images = _across_runs(doc, runs, img, out)
    slugs: set[str] = set()
    for run in runs:
        slug = _slug(run.name)
        while slug in slugs:
            slug += "_"
        slugs.add(slug)
        images += _run_section(doc, run, img, out, slug, truth_table)
    md, page = out / "report.md", out / "report.html"
    from .atomic import atomic_write_text

    atomic_write_text(md, doc.markdown())
    atomic_write_text(page, doc.html("moebits report"))
    return {"markdown": md, "html": page, "images": images,
            "incomplete": {run.name: run.problems for run in runs if not run.complete}}
