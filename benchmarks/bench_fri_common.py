"""Shared by the `bench_fri_*.py` benchmarks (a helper, not a benchmark of its own): the demo model, its
calibration, the ground-truth sensitivity table, anchor masks and held-out metrics.

    .venv/bin/python benchmarks/bench_fri_common.py     # checks that calibration and table agree

Ground truth: `benchmarks/results/demo_table_gptq.csv`, the *full* expert-local profiling table written
by `benchmarks/bench_profiling.py` (GPTQ g128, bits {2,3,4,8}, every unit; calibration 32 x 256 tokens,
seed 0, no per-expert token cap). The features need the calibration statistics, so the same calibration
is re-run here (same windows, same cap) and its frequencies are checked against the table's
`frequency` column. For a model without such a table (e.g. `tiny:qwen2_moe` while developing), the
table is profiled in-process.

Held-out evaluation: the anchors are whole experts (gate, up, down at every bit-width); every metric
is computed on the *non-anchor* units only, at the quantized bit-widths. Shared experts are always
anchors (see samplers.py), so the held-out units are routed experts.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from _common import RESULTS
from moebits.calibrate import Calibration, calibrate
from moebits.data import calibration_windows
from moebits.models import load_model
from moebits.methods.fri.predictors import fit_table, predict_table
from moebits.profile import new_table, profile
from moebits.methods.fri.samplers import sample_anchors
from moebits.stats import CalibrationStats
from moebits.table import SensitivityTable
from moebits.units import Choice

CHOICES = [Choice(b, 128, "gptq") for b in (2, 3, 4, 8)]
CACHE = Path(tempfile.gettempdir()) / "moebits_fri_demo_table_gptq.csv"
THREADS_NOTE = ("torch runs on 1 thread: on this shared 2-core machine two intra-op threads stall on each other "
                "(a batched GPTQ call measured 0.35 s on 1 thread vs 15-17 s on 2 under load)")
FRACTIONS = (0.05, 0.10, 0.15, 0.20, 0.25)


@dataclass
class Demo:
    model: object
    tokenizer: object
    adapter: object
    windows: torch.Tensor
    cal: Calibration
    table: SensitivityTable  # full ground truth, units in adapter order
    stats: CalibrationStats  # aligned with table.units
    table_source: str
    calib_seconds: float


def load_demo(model: str = "demo", nsamples: int = 32, seqlen: int = 256, seed: int = 0, progress: bool = False) -> Demo:
    torch.manual_seed(seed)
    m, tok, ad = load_model(model)
    source = "demo" if model == "demo" or model.startswith("tiny:") else model
    win = calibration_windows(tok, source, nsamples, seqlen, seed)
    t0 = time.perf_counter()
    # no per-expert cap, exactly like bench_profiling.py: the profiled errors used every routed token
    cal = calibrate(ad, win, max_tokens_per_expert=win.numel(), seed=seed, progress=progress)
    t_cal = time.perf_counter() - t0
    path = RESULTS / "demo_table_gptq.csv"
    if model == "demo":
        cache = CACHE if seed == 0 else CACHE.with_name(f"{CACHE.stem}_seed{seed}.csv")
        if path.exists() and seed == 0:  # the committed table was measured on the seed-0 calibration
            table = SensitivityTable.from_csv(path)
            src = str(path.relative_to(RESULTS.parent.parent))
        else:  # bench_profiling.py's computation, same calibration, cached outside the repository
            if cache.exists() and not np.allclose(SensitivityTable.from_csv(cache).frequency,
                                                  cal.frequency(), rtol=1e-9, atol=0):
                cache.unlink()  # measured on another checkpoint or calibration
            if not cache.exists():
                print(f"profiling every unit in-process for calibration seed {seed} (as bench_profiling.py "
                      f"--skip-layer does), cached in {cache}", flush=True)
                profile(ad, "expert", ad.units(), CHOICES, cal.stats, cal.inputs, table=new_table(ad, CHOICES, cal.stats),
                        progress=progress).to_csv(cache)
            table = SensitivityTable.from_csv(cache)
            src = f"in-process full profiling, calibration seed {seed}"
    else:
        table = profile(ad, "expert", ad.units(), CHOICES, cal.stats, cal.inputs, table=new_table(ad, CHOICES, cal.stats),
                        progress=progress)
        src = f"profiled in-process ({model})"
    if [u for u in table.units] != ad.units():
        raise SystemExit("the table's units are not the model's units in adapter order")
    if [c for c in table.choices] != CHOICES:
        raise SystemExit(f"the table's choices {[c.label for c in table.choices]} are not {[c.label for c in CHOICES]}")
    if not (table.complete and table.measured.all()):
        raise SystemExit("the ground-truth table must be fully measured")
    stats = cal.stats.aligned(table.units)
    freq = stats.frequency
    if not np.allclose(freq, table.frequency, rtol=1e-9, atol=0):
        bad = np.argmax(np.abs(freq - table.frequency))
        raise SystemExit(f"calibration frequencies differ from the table's (e.g. {table.units[bad].name}: "
                         f"{freq[bad]} vs {table.frequency[bad]}): not the same calibration")
    return Demo(m, tok, ad, win, cal, table, stats, src, t_cal)


# ---------------------------------------------------------------------------------------------- anchors


def anchor_units(table: SensitivityTable, method: str, fraction: float, seed: int) -> np.ndarray:
    """[U] bool: units of the anchor experts under a fraction-of-units budget."""
    anchors = set(sample_anchors(table.units, method, fraction=fraction, seed=seed, bits_per_unit=len(table.choices)))
    return np.array([u in anchors for u in table.units])


def sparse(table: SensitivityTable, mask: np.ndarray) -> SensitivityTable:
    """The table as FRI would see it: only the anchor units measured."""
    meas = np.repeat(mask[:, None], len(table.choices), axis=1)
    return SensitivityTable(list(table.units), list(table.choices), error=np.where(meas, table.error, np.nan),
                            measured=meas, seconds=np.where(meas, table.seconds, 0.0), frequency=table.frequency.copy())


def predict(table: SensitivityTable, stats, mask: np.ndarray, estimator=None, spec=None) -> np.ndarray:
    """[U, C] error: measured on the anchors, predicted elsewhere."""
    kw = {} if spec is None else {"spec": spec}
    sp = sparse(table, mask)
    return predict_table(sp, fit_table(sp, stats, estimator, **kw)).error


# ---------------------------------------------------------------------------------------------- metrics


def _rho(a, b) -> float:
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


def heldout_metrics(truth: np.ndarray, pred: np.ndarray, heldout: np.ndarray) -> dict:
    """Errors on the held-out units [U] bool, all quantized choices (columns) of `truth`/`pred` [U, C].

    mae / rmse: linear domain, in units of the intrinsic error l_u (dominated by 2-bit entries);
    mae_log / rmse_log: on log10 l (0.30 = a factor 2), the scale FRI interpolates on;
    rho_pooled: Spearman over all held-out (unit, bit) pairs (inflated: bit-width alone orders them);
    rho_bit: mean over bit-widths of Spearman across held-out units at that bit-width (what allocation
    needs: which experts are more sensitive at the same bits); rho_bit_min: the worst bit-width."""
    t, p = truth[heldout], pred[heldout]
    d = p - t
    dl = np.log10(p) - np.log10(t)
    per_bit = [_rho(t[:, c], p[:, c]) for c in range(t.shape[1])]
    return {"mae": float(np.abs(d).mean()), "rmse": float(np.sqrt((d ** 2).mean())),
            "mae_log": float(np.abs(dl).mean()), "rmse_log": float(np.sqrt((dl ** 2).mean())),
            "rho_pooled": _rho(t.ravel(), p.ravel()), "rho_bit": float(np.nanmean(per_bit)),
            "rho_bit_min": float(np.nanmin(per_bit)), "rho_per_bit": per_bit}


def mean_std(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.{digits}f}"


def main():
    d = load_demo()
    t = d.table
    print(f"table {d.table_source}: {len(t.units)} units x {len(t.choices)} choices; calibration "
          f"{d.windows.shape[0]} x {d.windows.shape[1]} tokens in {d.calib_seconds:.1f} s; frequencies agree.")
    for c, ch in enumerate(t.choices):
        e = t.error[:, c]
        print(f"  {ch.label}: error min {e.min():.3g}  median {np.median(e):.3g}  max {e.max():.3g}")


if __name__ == "__main__":
    main()
