import re

import numpy as np
import pytest
from typer.testing import CliRunner

from moebits.cli import app
from moebits.job import Pipeline, QuantizeConfig
from moebits.plan import Plan
from moebits.plots import pareto_front, unit_grid
from moebits.report import heldout_comparison, read_run, write_report
from moebits.table import SensitivityTable
from moebits.units import Unit


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_file):
    """Three finished tiny runs (uniform, FRI, full profiling), one interrupted after calibration, and a
    directory that is no run at all."""
    root = tmp_path_factory.mktemp("runs")
    base = dict(model="tiny:qwen2_moe", quantizer="rtn", group_size=32, calib=str(text_file), eval=str(text_file),
                nsamples=4, seqlen=64, eval_windows=2, save_model=False)
    for name, kw in [("uniform", dict(method="uniform", bits=4.5)), ("fri", dict(method="fri", bits=3.5, anchors=0.3)),
                     ("mxmoe", dict(method="mxmoe", bits=3.5))]:
        Pipeline(QuantizeConfig(**base, **kw), root / name, progress=False).execute()
    p = Pipeline(QuantizeConfig(**base, method="mxmoe", bits=3.0), root / "interrupted", progress=False)
    p.load()
    p.calibrate()
    (root / "junk").mkdir()
    (root / "junk" / "notes.txt").write_text("not a run")
    return root


def _coloured_pixels(png) -> int:
    """Pixels that are clearly not grey: axes, text and an empty white canvas are all grey, the data
    (heatmap cells, bars, markers) is coloured."""
    from matplotlib.image import imread

    rgb = imread(png)[..., :3]
    assert rgb.std() > 0.01  # not one flat colour
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.15).sum())


def test_report_from_tiny_runs_has_every_picture_and_flags_incomplete_runs(runs, tmp_path):
    dirs = [runs / n for n in ("uniform", "fri", "mxmoe", "interrupted", "junk")] + [runs / "missing"]
    res = write_report(dirs, tmp_path / "rep", truth=runs / "mxmoe" / "table.csv")
    md, page = res["markdown"].read_text(), res["html"].read_text()
    assert set(res["incomplete"]) == {"interrupted", "junk", "missing"}
    assert "no plan.json" in res["incomplete"]["interrupted"] and "not a directory" in res["incomplete"]["missing"]
    assert any("not a moebits run directory" in x for x in res["incomplete"]["junk"])
    # the same pictures in both pages, each a real file with data drawn on it
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert linked and sorted(linked) == sorted(re.findall(r"<img src='([^']+)'", page))
    assert sorted(tmp_path / "rep" / x for x in linked) == sorted(res["images"])
    for rel in linked:
        png = tmp_path / "rep" / rel
        assert png.stat().st_size > 0 and _coloured_pixels(png) > 200, rel
    names = {p.name for p in res["images"]}
    for run in ("uniform", "fri", "mxmoe"):
        assert {f"{run}_bits.png", f"{run}_bits_hist.png", f"{run}_frequency.png", f"{run}_stages.png"} <= names
    assert {"fri_sensitivity.png", "mxmoe_sensitivity.png", "fri_predicted_vs_truth.png", "pareto_ppl.png"} <= names
    assert "uniform_sensitivity.png" not in names  # uniform has no table
    assert "mxmoe_predicted_vs_truth.png" not in names  # nothing predicted in a full profile
    assert "interrupted_frequency.png" in names  # what an incomplete run has is still shown
    # the side-by-side table: one row per run, numbers from results.json
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0][2:] for r in rows] == ["uniform", "fri", "mxmoe", "interrupted", "junk", "missing"]
    fri = read_run(runs / "fri")
    assert f"{fri.results['ppl_q']:.3f}" in rows[1] and f"{fri.results['avg_bits']:.4f}" in rows[1]
    assert rows[3].endswith("incomplete |") and "Spearman rho" in md


def test_bits_grid_is_the_plan(runs):
    plan = Plan.load(runs / "fri" / "plan.json")
    units = plan.units
    bits = np.array([plan.choice(u).bits for u in units], float)
    for kind in ("gate", "up", "down"):
        grid, layers, cols = unit_grid(bits, units, kind)
        assert cols[-1] == "S" and len(cols) == 9  # 8 routed experts, then the shared one
        for i, layer in enumerate(layers):
            for j, col in enumerate(cols):
                u = Unit(layer, "shared" if col == "S" else int(col), kind)
                assert grid[i, j] == plan.choice(u).bits


def test_heldout_comparison_uses_only_what_fri_predicted(runs):
    fri = SensitivityTable.from_csv(runs / "fri" / "table.csv")
    truth = SensitivityTable.from_csv(runs / "mxmoe" / "table.csv")
    cmp = heldout_comparison(fri, truth)
    assert cmp["n"] == int((~fri.measured).sum()) > 0
    np.testing.assert_array_equal(np.sort(cmp["predicted"]), np.sort(fri.error[~fri.measured]))
    assert -1 <= cmp["rho"] <= 1 and cmp["mae_log10"] > 0
    with pytest.raises(ValueError, match="units and choices"):
        heldout_comparison(fri, SensitivityTable(truth.units[:3], truth.choices))


def test_pareto_front():
    x = [2.5, 3.0, 3.0, 3.5, 4.0, 4.0]
    y = [10.0, 9.0, 11.0, 9.5, 8.0, 8.0]
    assert pareto_front(x, y).tolist() == [0, 1, 4, 5]  # 2 and 3 are beaten; equal points both stay
    assert pareto_front(x, y, maximize=True).tolist() == [0, 2]


def test_report_cli_says_where_and_what_is_incomplete(runs, tmp_path):
    r = CliRunner().invoke(app, ["report", str(runs / "uniform"), str(runs / "interrupted"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "report.md" in r.output and "incomplete run interrupted" in r.output
    assert (tmp_path / "o" / "report.html").exists()
    r = CliRunner().invoke(app, ["report", str(runs / "uniform"), "--out", str(tmp_path / "p"), "--truth",
                                 str(tmp_path / "none.csv")])
    assert r.exit_code == 2 and "not found" in r.output


def test_zero_shot_average_from_moebits_eval_is_plotted(runs, tmp_path):
    """`moebits eval --run` writes `tasks_average` as zeroshot's average dict; the report plots its
    acc_norm-or-acc mean against bits and puts it in the table."""
    import json
    import shutil

    dirs = []
    for name, acc in (("uniform", 0.61), ("mxmoe", 0.57)):
        d = tmp_path / name
        shutil.copytree(runs / name, d)
        r = json.loads((d / "results.json").read_text())
        r["tasks_average"] = {"acc": acc - 0.02, "acc_norm": acc, "tasks": ["piqa", "arc_easy"], "label": "Avg (2 tasks)"}
        (d / "results.json").write_text(json.dumps(r))
        dirs.append(d)
    res = write_report(dirs, tmp_path / "rep")
    png = tmp_path / "rep" / "img" / "pareto_zeroshot.png"
    assert png in res["images"] and _coloured_pixels(png) > 200
    md = res["markdown"].read_text()
    assert "| 0.6100 |" in md and "| 0.5700 |" in md
