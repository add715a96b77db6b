"""The `moebits` command. Each subcommand is a thin layer over a library call; errors that a user
can fix are printed as one clear line (exit code 2), not as a traceback."""
from __future__ import annotations

import inspect
import json
import logging
import sys
import types
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mixed-precision quantization of Mixture-of-Experts language models.")
console = Console(stderr=True)

MODEL_HELP = "demo (the embedded demo MoE), tiny:<arch>, a local HF directory, or a hub name"


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


def _user_errors():
    """Errors caused by the input, shown as a message rather than a traceback."""
    from .allocate import InfeasibleBudgetError
    from .data import DataError
    from .models import ModelLoadError, UnsupportedModelError
    from .plan import PlanError
    from .job.rundir import RunMismatchError

    return (InfeasibleBudgetError, DataError, ModelLoadError, UnsupportedModelError, PlanError, RunMismatchError,
            FileNotFoundError, ValueError)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])


def _parse_bits(s: str, option: str = "--candidate-bits") -> tuple[int, ...]:
    try:
        return tuple(sorted({int(b) for b in s.split(",") if b.strip()}))
    except ValueError:
        _fail(f"{option} must be a comma list of integers, got {s!r}")


@app.command()
def info(model: str = typer.Option("demo", help=MODEL_HELP), as_json: bool = typer.Option(False, "--json"),
         calib: str = typer.Option("demo", help="text for the routing statistics"),
         nsamples: int = typer.Option(32, help="calibration windows for the routing statistics (0: skip)"),
         seqlen: Optional[int] = typer.Option(None, "--seqlen", "--calib-seqlen",
                                              help="tokens per calibration window (default: the model's, "
                                                   "min(2048, max positions); the demo 256)"),
         seed: int = 0, trust_remote_code: bool = False):
    """Architecture, experts, units, parameters, and how skewed the routing is; for a packed
    checkpoint (a run's model/), its bits histogram and sizes."""
    from .calibrate import calibrate, frequency_summary
    from .data import calibration_windows
    from .models import load_model
    from .packed import is_packed

    if is_packed(model):
        return _info_packed(Path(model), as_json)
    try:
        m, tok, ad = load_model(model, trust_remote_code=trust_remote_code)
        summary = ad.summary()
        if nsamples > 0:
            from .data import default_seqlen

            win = calibration_windows(tok, calib, nsamples, seqlen or default_seqlen(model, trust_remote_code), seed)
            cal = calibrate(ad, win, max_tokens_per_expert=1, seed=seed, progress=not as_json, hessians=False)
            summary["routing"] = {"calib": calib, "tokens": cal.total_tokens, "never_routed": len(cal.never_routed),
                                  "layers": frequency_summary(cal.stats, cal.total_tokens)}
    except _user_errors() as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    t = Table(title=f"{model} ({summary['model_type']})", show_header=False)
    for k, v in summary.items():
        if k != "routing":
            t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    Console().print(t)
    if "routing" in summary:
        rows = summary["routing"]["layers"]
        r = Table(title=f"routing: {summary['routing']['tokens']:,} tokens of {calib}",
                  caption="frequency = routed tokens / tokens (top-k: a layer's frequencies sum to k)")
        for c in ("layer", "min", "max", "max/mean", "CV", "never routed"):
            r.add_column(c, justify="right")
        for row in rows:
            r.add_row(str(row["layer"]), f"{row['min']:.4f}", f"{row['max']:.4f}", f"{row['max_over_mean']:.1f}",
                      f"{row['cv']:.3f}", str(row["never_routed"]))
        Console().print(r)
        cvs = [row["cv"] for row in rows]
        verdict = "skewed" if min(cvs) > 0.5 else "mildly skewed" if max(cvs) > 0.25 else "near uniform"
        Console().print(f"expert usage is {verdict}: CV {min(cvs):.2f}-{max(cvs):.2f} across layers "
                        "(frequency weighting and anchor sampling exploit skew).")


def _info_packed(path: Path, as_json: bool) -> None:
    from .packed import describe_packed

    try:
        d = describe_packed(path)
    except _user_errors() as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(d, indent=2))
        return
    t = Table(title=f"{path} (moebits packed, format {d['format_version']}, {d['model_type']})", show_header=False)
    for k in ("moe_layers", "units", "avg_bits", "zero_points", "model_bytes", "expert_bytes", "file_bytes",
              "resident_bytes", "fp16_bytes"):
        v = d[k]
        t.add_row(k, f"{v:,}" if isinstance(v, int) else f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(t)
    h = Table(title="units per setting")
    h.add_column("setting")
    h.add_column("units", justify="right")
    for label, n in d["bits_histogram"].items():
        h.add_row(label, str(n))
    Console().print(h)
    Console().print(f"size: {d['model_bytes'] / 2**20:.2f} MiB stored, {d['resident_bytes'] / 2**20:.2f} MiB resident "
                    f"when loaded, vs {d['fp16_bytes'] / 2**20:.2f} MiB in fp16 ({d['fp16_bytes'] / d['model_bytes']:.2f}x)")


def _budget_opts(bits, memory_gb, latency) -> tuple[str, float]:
    from .budget import budget_request

    try:
        return budget_request(bits, memory_gb, latency)
    except ValueError as e:
        _fail(str(e))


def _cli_parameter(part: str, f, typ) -> inspect.Parameter:
    """A `moebits quantize` option from its declaration in job/config.py."""
    from .job.config import PARTS

    meta = f.metadata
    optional = typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in typing.get_args(typ)
    base = next((a for a in typing.get_args(typ) if a is not type(None)), typ) if optional else typ
    if meta["parse"] is not None:  # comma lists: text on the command line
        annotation, default = Optional[str], meta["cli_default"] if meta["cli_default"] is not MISSING else None
    else:
        default = meta["cli_default"] if meta["cli_default"] is not MISSING else f.default
        annotation = Optional[base] if (optional or default is None) else base
    flags = list(meta["flags"])
    if base is bool and default is None:  # tri-state: given on or off, or left to the job
        flags = [f"--{f.name.replace('_', '-')}/--no-{f.name.replace('_', '-')}"]
    opt = typer.Option(default, *flags, help=meta["help"], rich_help_panel=PARTS[part][1])
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation)


def _quantize(ctx: typer.Context, out: Path, overwrite: bool, config: Optional[Path], verbose: bool, **given) -> None:
    """Calibrate, profile, allocate, quantize and evaluate: the whole job, resumable.

    Options come from the command line, else from --config/--recipe FILE (TOML or YAML, the same names),
    else their defaults (job/config.py declares each once)."""
    from .job import QuantizeConfig, start
    from .job.config import declared_options, read_recipe

    _setup_logging(verbose)
    try:
        options = read_recipe(config) if config is not None else {}
        for _, f, _ in declared_options():
            if getattr(ctx.get_parameter_source(f.name), "name", None) != "COMMANDLINE":  # given, not defaulted
                continue
            v = given[f.name]
            if f.metadata["parse"] is not None and v is not None:
                v = f.metadata["parse"](v)
            if f.metadata["from_cli"] is not None:
                v = f.metadata["from_cli"](v)
            options[f.name] = v
        cfg = QuantizeConfig(**options)
        cfg.budget_request()  # exactly one budget (or --wbits), before any work
        results = start(cfg, out, overwrite, explicit=set(options)).execute()
    except _user_errors() as e:
        _fail(str(e))
    _print_results(results, out)


def _register_quantize() -> None:
    from .job.config import declared_options

    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    params += [_cli_parameter(part, f, typ) for part, f, typ in declared_options()]
    params += [
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                          default=typer.Option(..., help="run directory (stages are saved and resumed here)")),
        inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, help="replace a different run already in --out")),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", "--recipe",
                                               help="a recipe: TOML or YAML holding these options by name, flat or "
                                                    "grouped by part (data, budget, allocation, fri, bt, rl, "
                                                    "activations, output, execution); options given here win; a "
                                                    "run's run.json is one too")),
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(False)),
    ]

    def quantize(**kw):
        return _quantize(**kw)

    quantize.__doc__ = _quantize.__doc__
    quantize.__signature__ = inspect.Signature(params)
    quantize.__annotations__ = {p.name: p.annotation for p in params}
    app.command("quantize")(quantize)


_register_quantize()


def _print_results(r: dict, out: Path) -> None:
    if r.get("target") == "llamacpp":
        from .gguf.quantize import print_results

        return print_results(r, out)
    t = Table(title=f"moebits quantize -> {out}")
    for c in ("method", "quantizer", "avg bits", "weight MB", "ppl fp", "ppl q", "Δppl %", "seconds"):
        t.add_column(c, justify="right")
    secs = sum(r.get(k, 0) for k in ("calibrate_seconds", "profile_seconds", "fit_seconds", "predict_seconds",
                                     "allocate_seconds", "quantize_seconds", "eval_seconds"))
    t.add_row(r["method"], r["quantizer"], f"{r['avg_bits']:.4f}", f"{r['weight_bytes'] / 1e6:.2f}",
              f"{r['ppl_fp']:.3f}", f"{r['ppl_q']:.3f}", f"{100 * (r['ppl_q'] / r['ppl_fp'] - 1):+.2f}", f"{secs:.1f}")
    Console().print(t)
    stages = ", ".join(f"{k[:-8]} {r[k]:.1f}s" for k in ("calibrate_seconds", "profile_seconds", "fit_seconds",
                                                        "predict_seconds", "allocate_seconds", "quantize_seconds",
                                                        "eval_seconds") if k in r)
    Console().print(f"stages: {stages}; eval tokens {r.get('eval_tokens', 0):,}; bits: {r.get('bits_histogram')}")
    if "model_avg_bits" in r:
        Console().print(f"avg bits {r['avg_bits']:.4f} over the expert blocks (routed and shared experts); "
                        f"{r['model_avg_bits']:.3f} over the whole model (attention, embeddings, norms included)")
    if "avg_act_bits" in r:
        Console().print(f"activations: {r['act_quant_units']:,} units quantized per token, "
                        f"{r['avg_act_bits']:.3f} average activation bits (weighted by MACs per token)")
    for note in r.get("notes", []):
        Console().print(f"[bold]note:[/] {note}")
    if r.get("attention", "fp16") != "fp16":
        Console().print(f"attention {r['attention']}: {r['attention_bytes'] / 1e6:.3f} MB; whole model counted at "
                        f"these settings {r['model_counted_bytes'] / 1e6:.3f} MB (the packed format stores attention "
                        "dequantized)")


@app.command()
def profile(
    model: str = typer.Option("demo", help=MODEL_HELP),
    metric: str = typer.Option("expert", help="expert | layer"),
    bits: str = typer.Option("2,3,4,8", help="bit-widths to profile"),
    quantizer: str = "rtn", group_size: int = 128,
    calib: str = "demo", nsamples: int = 128,
    seqlen: Optional[int] = typer.Option(None, "--seqlen", "--calib-seqlen",
                                         help="tokens per calibration window (default: the model's, min(2048, max "
                                              "positions); the demo 256)"),
    seed: int = 0,
    act_order: bool = False,
    max_tokens_per_expert: int = typer.Option(0, help="routed inputs kept per expert to measure errors on (0: all)"),
    holdout: float = typer.Option(0.0, help="fraction of each expert's routed tokens held out of its Hessian and "
                                            "used to measure its error (expert metric)"),
    out: Path = typer.Option(..., help="run directory; writes OUT/table.csv"),
    overwrite: bool = False, verbose: bool = False,
):
    """Measure the error of every unit x bit-width (full profiling) into OUT/table.csv."""
    from .job import Pipeline, QuantizeConfig, candidate_choices

    _setup_logging(verbose)
    cfg = QuantizeConfig(model=model, method="mxmoe", quantizer=quantizer, bits=0.0, group_size=group_size,
                         candidate_bits=_parse_bits(bits), calib=calib, nsamples=nsamples, seqlen=seqlen,
                         metric=metric, act_order=act_order, seed=seed,
                         max_tokens_per_expert=max_tokens_per_expert or None, holdout=holdout)
    try:
        p = Pipeline(cfg, out, overwrite=overwrite)
        p.load()
        p.calibrate()
        table = p.fill_table(candidate_choices(cfg))
    except _user_errors() as e:
        _fail(str(e))
    Console().print(f"profiled {int(table.measured.sum()):,} unit x choice pairs ({metric} metric) in "
                    f"{table.measured_seconds:.1f}s of measurement -> {out / 'table.csv'}")


@app.command("allocate")
def allocate_cmd(
    table: Path = typer.Option(..., help="sensitivity table CSV (from `moebits profile`)"),
    model: str = typer.Option("demo", help=MODEL_HELP + " (for the unit shapes)"),
    bits: Optional[float] = None, memory_gb: Optional[float] = None, latency: Optional[float] = None,
    gpu: str = "h100", batch_tokens: int = 4096,
    solver: str = typer.Option("ilp", help="ilp | lagrangian | freq | uniform"),
    granularity: str = "linear", tie_gate_up: bool = False,
    abits_budget: Optional[float] = typer.Option(None, help="a table with activation-bit choices: average "
                                                            "activation bits (MAC-weighted; default: = --bits)"),
    act_clip: float = typer.Option(1.0, help="the clip ratio the table's activation bits were profiled with"),
    fill: bool = typer.Option(True, help="lagrangian: greedy fill after bisection (moebits); --no-fill is the "
                                         "paper's Algorithm 1 exactly"),
    zero_points: str = typer.Option("packed", help="how zero points are stored and charged: packed (integer zeros "
                                                   "at the code width) | fp16 (the papers' W3.25 convention)"),
    ilp_nodes: int = typer.Option(1000, help="ilp: stop branch and bound after this many nodes, keeping the best "
                                             "plan found (its proven gap is printed); 0: no limit"),
    out: Path = typer.Option(..., help="plan JSON to write"),
):
    """Choose one setting per unit from a sensitivity table under a budget; write a plan."""
    from .allocate import plan_under_budget
    from .budget import Budget
    from .models import load_model
    from .job import structure_groups
    from .table import SensitivityTable

    kind, value = _budget_opts(bits, memory_gb, latency)
    try:
        t = SensitivityTable.from_csv(table)
        if not t.complete:
            _fail(f"{table} has unknown errors (NaN); fill it first (full profiling or `--method fri`)")
        _, _, ad = load_model(model)
        if set(t.units) != set(ad.units()):
            _fail(f"{table} does not describe the units of {model}")
        budget = Budget.build(kind, value, t.units, ad.shapes(), t.choices, t.frequency, gpu=gpu,
                              batch_tokens=batch_tokens, zero_points=zero_points)
        meta = {"table": str(table), "granularity": granularity, "tie_gate_up": tie_gate_up}
        if len({c.act_bits for c in t.choices}) > 1:  # W-A table: the activation-bits budget, as in quantize
            a = abits_budget if abits_budget is not None else (bits if kind == "bits" else None)
            if a is not None:
                budget.with_act_bits(a, t.choices, t.frequency)
        if any(c.quantizes_acts for c in t.choices):
            meta["act_quant"] = {"scheme": "per-token symmetric", "clip": act_clip}
        if not fill and solver != "lagrangian":
            _fail(f"--no-fill switches off the lagrangian solver's greedy fill; solver {solver!r} has none")
        if solver == "lagrangian":
            meta["fill"] = fill
        if ilp_nodes < 0:
            _fail(f"--ilp-nodes must be >= 0 (0: no limit), got {ilp_nodes}")
        options = {"node_limit": ilp_nodes or None} if solver == "ilp" else ({} if fill else {"fill": False})
        plan = plan_under_budget(t, budget, solver, groups=structure_groups(granularity, tie_gate_up, t.units),
                                 meta=meta, **options)
        plan.save(out)
    except _user_errors() as e:
        _fail(str(e))
    act = f", avg {plan.meta['avg_act_bits']:.3f} activation bits" if "avg_act_bits" in plan.meta else ""
    Console().print(f"{solver}: {len(plan.assignments):,} units, avg {plan.meta['avg_bits']:.4f} bits{act}, "
                    f"loss {plan.meta['total_loss']:.6g}, {plan.meta['seconds'] * 1e3:.1f} ms -> {out}\n"
                    f"{plan.bits_histogram()}")
    if solver == "ilp" and plan.meta.get("optimal") is False and plan.meta.get("gap") is not None:
        Console().print(f"ilp: stopped at --ilp-nodes {ilp_nodes}; the plan is proven within {plan.meta['gap']:.3%} "
                        "of the optimum (raise --ilp-nodes, or 0, to prove more)")


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("demo", help=MODEL_HELP + ", or a packed moebits checkpoint"),
    plan: Optional[Path] = typer.Option(None, help="quantize --model by this plan before evaluating"),
    run: Optional[Path] = typer.Option(None, help="a run directory: evaluate the quantized model it saved (RUN/model)"),
    tasks: str = typer.Option("all", help="comma list of tasks, all, or none"),
    ppl: Optional[bool] = typer.Option(None, "--ppl/--no-ppl",
                                       help="perplexity on the run's evaluation text (default: on with --run)"),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 (default: the run's)"),
    data: Optional[Path] = typer.Option(None, help="folder laid out like shared/data (default: $MOEBITS_DATA or ../shared/data)"),
    limit: Optional[int] = typer.Option(None, help="at most N items per task"),
    batch_size: int = 8,
    seqlen: int = typer.Option(2048, "--seqlen", "--eval-seqlen",
                               help="tokens per WikiText-2 window (capped at the model's max positions)"),
    metric: str = typer.Option("acc_norm", help="acc | acc_norm (where the task has it, else acc) | both; "
                                                "the JSON always holds both"),
    check_counts: bool = typer.Option(True, help="refuse data files whose document count is not the official split's"),
    out: Optional[Path] = typer.Option(None, help="write the scores as JSON here"),
):
    """Perplexity (WikiText-2, GPTQ convention; `wikitext`: lm-eval's) and zero-shot accuracy (lm-eval's tasks
    on local files). With --run, the model the run saved is loaded (not re-quantized) and its perplexity
    on the run's evaluation text is checked against the run's ppl_q."""
    from . import zeroshot
    from .apply import apply_plan
    from .models import load_model
    from .plan import Plan
    from .atomic import atomic_write_json
    from .job.rundir import read_json, record_file

    res: dict = {}
    try:
        task_list = [] if tasks.strip() == "none" else zeroshot.parse_tasks(tasks)
        zeroshot.check_metric(metric)
        data_dir = None
        if task_list:
            data_dir = data or zeroshot.default_data_dir()
            if data_dir is None:
                _fail(zeroshot.NO_DATA_MESSAGE)
        if run is not None:
            if plan is not None:
                _fail("give --run (evaluate the model it saved) or --plan (quantize --model by a plan), not both")
            m, tok, label, cfg = _load_run_model(run, dtype)
            if ppl is not False:
                res["perplexity"] = _run_perplexity(run, m, tok, cfg)
        else:
            m, tok, ad = load_model(model, dtype=dtype or "auto", allow_packed=True)
            label = model
            if plan is not None:
                if ad is None:
                    _fail(f"{model} is already quantized (packed); evaluate it without --plan")
                p = Plan.load(plan)
                if p.meta.get("rotation"):  # the plan quantizes the rotated model: rotate it the same way first
                    from .rotate import rotate_model

                    r = p.meta["rotation"]
                    rotate_model(m, ad, r["method"], r["seed"])
                apply_plan(ad, p)
                if p.meta.get("attention"):
                    _apply_plan_attention(ad, p)
                from .models.act_quant import install_act_quant

                install_act_quant(m, {u: a.choice.act_bits for u, a in p.assignments.items()},
                                  float((p.meta.get("act_quant") or {}).get("clip", 1.0)))
                label = f"{model} + {plan}"
        if task_list:
            res.update(zeroshot.evaluate_tasks(m, tok, task_list, data_dir, limit=limit, batch_size=batch_size,
                                               seqlen=seqlen, metric=metric, check_counts=check_counts))
    except _user_errors() as e:
        _fail(str(e))
    if task_list:
        zeroshot.print_table([{"model": label, "method": "plan" if plan or run else "fp16", "result": res}])
    if out is not None:
        atomic_write_json(out, res)
    if run is not None and (run / "results.json").exists():
        try:
            r = read_json(run / "results.json")
        except _user_errors() as e:
            _fail(str(e))
        if task_list:
            r["tasks"] = res["tasks"]
            r["tasks_average"] = res.get("average")
        if "perplexity" in res:
            r["ppl_loaded"] = res["perplexity"]
        atomic_write_json(run / "results.json", r)
        if (run / "cache.json").exists():
            record_file(run, "results.json")
    _check_reproduced(run, res.get("perplexity"))


def _check_reproduced(run: Optional[Path], ppl: Optional[dict]) -> None:
    """`eval --run`: a loaded model whose perplexity is not finite, or not the run's ppl_q, is an error
    (exit 1): the saved model does not reproduce the run."""
    import math

    if run is None or not ppl:
        return
    if not math.isfinite(ppl["ppl"]):
        console.print(f"[bold red]error:[/] the model saved in {run / 'model'} gives perplexity {ppl['ppl']}: it is "
                      f"damaged; delete {run / 'model'} and rerun the run's `moebits quantize` command to re-create it")
        raise typer.Exit(1)
    if ppl.get("matches_ppl_q") is False:
        console.print(f"[bold red]error:[/] the model saved in {run / 'model'} gives perplexity {ppl['ppl']:.6g}, the "
                      f"run recorded ppl_q {ppl['ppl_q']:.6g}: the saved model does not reproduce the run (changed or "
                      f"damaged); delete {run / 'model'} and rerun the run's `moebits quantize` command to re-create it")
        raise typer.Exit(1)


def _load_run_model(run: Path, dtype: Optional[str]):
    """The quantized model a run saved, in the run's dtype unless one is given."""
    from .models import load_model
    from .packed import is_packed
    from .job import QuantizeConfig
    from .job.rundir import read_json

    spec_p, model_dir = run / "run.json", run / "model"
    if not spec_p.exists():
        _fail(f"{run} is not a moebits run directory (no run.json)")
    if not (model_dir / "config.json").exists():
        _fail(f"{run} holds no saved model ({model_dir} is missing: the run was made with --no-save-model or did "
              "not finish); rerun `moebits quantize` with --save-model, or evaluate with --model and --plan")
    cfg = QuantizeConfig.from_spec(read_json(spec_p))
    m, tok, _ = load_model(str(model_dir), dtype=dtype or cfg.dtype, device=cfg.device, allow_packed=True)
    kind = "moebits packed" if is_packed(model_dir) else "dequantized 16-bit"
    console.print(f"loaded {model_dir} ({kind}, {next(m.parameters()).dtype}); not re-quantized")
    return m, tok, str(model_dir), cfg


def _run_perplexity(run: Path, model, tok, cfg) -> dict:
    """Perplexity with the run's evaluation settings, next to the run's own ppl_q."""
    from .data import load_text, tokenize
    from .evaluate import perplexity
    from .job.rundir import read_json

    cfg.resolve_seqlens()  # runs made before --eval-seqlen hold one `seqlen`
    r = perplexity(model, tokenize(tok, load_text(cfg.eval, "eval")), cfg.eval_seqlen, cfg.batch_size, cfg.eval_windows,
                   progress=False, desc="eval (loaded)")
    out = r.to_dict()
    rp = run / "results.json"
    ppl_q = read_json(rp).get("ppl_q") if rp.exists() else None
    msg = f"perplexity of the loaded model: {r.ppl:.6g} ({r.windows} windows of {r.seqlen} tokens of {cfg.eval})"
    if ppl_q is not None:
        out["ppl_q"] = ppl_q
        from .packed import is_packed

        if is_packed(run / "model"):  # the packed format reproduces the evaluated model bit for bit
            out["matches_ppl_q"] = f"{r.ppl:.4g}" == f"{ppl_q:.4g}"
            how = "to 4 significant digits"
        else:  # a dequantized checkpoint rounds the weights to 16 bits: close, not equal (0.4 % measured)
            out["matches_ppl_q"] = abs(r.ppl - ppl_q) <= 1e-2 * abs(ppl_q)
            how = "within 1 % (16-bit weights)"
        msg += f"; the run's ppl_q {ppl_q:.6g}: {'equal' if out['matches_ppl_q'] else 'DIFFERENT'} {how}"
    Console().print(msg)
    return out


@app.command("report")
def report_cmd(
    runs: list[Path] = typer.Argument(..., help="run directories (from `moebits quantize --out`)"),
    out: Path = typer.Option(..., help="folder for report.md, report.html and img/"),
    truth: Optional[Path] = typer.Option(None, help="fully profiled table of the same model (e.g. from "
                                                    "`moebits profile`): FRI runs get predicted vs measured"),
):
    """Pictures of what the runs did: bits, sensitivity and frequency per layer x expert, time per stage,
    perplexity against bits across runs (Markdown and HTML)."""
    from .report import write_report

    try:
        res = write_report(runs, out, truth)
    except _user_errors() as e:
        _fail(str(e))
    for name, problems in res["incomplete"].items():
        console.print(f"[yellow]incomplete run[/] {name}: {'; '.join(problems) or 'not finished'}")
    Console().print(f"report: {res['markdown']} and {res['html']} ({len(res['images'])} images in {out / 'img'})")


def _apply_plan_attention(ad, plan) -> None:
    """A plan made with --attn-bits: quantize attention the same way (RTN/HQQ need no data)."""
    from .attention import quantize_attention
    from .units import Choice

    choice = Choice.from_dict(plan.meta["attention"])
    if choice.quantizer == "gptq":
        _fail("the plan quantized attention with GPTQ, which needs the run's calibration windows; evaluate the "
              "saved model instead (--model RUN/model)")
    quantize_attention(ad, choice)


@app.command("train-demo")
def train_demo_cmd(out: Path = typer.Option(Path("demo-model"), help="where to write the trained model"),
                   minutes: float = typer.Option(35.0, help="time budget of the training loop"),
                   seed: int = 0,
                   max_steps: Optional[int] = typer.Option(None, help="stop after this many steps"),
                   wikitext: Optional[Path] = typer.Option(None, help="WikiText-2 wiki.test.raw for the model card "
                                                                       "(default: from $MOEBITS_DATA or ../shared/data)"),
                   threads: Optional[int] = typer.Option(None, help="torch CPU threads")):
    """Train the demo MoE (Qwen2-MoE on Shakespeare) from scratch, with its tokenizer and model card."""
    from .demo.train import train_demo
    from .zeroshot import default_data_dir

    if wikitext is None and (d := default_data_dir()) is not None and (d / "wikitext2" / "wiki.test.raw").exists():
        wikitext = d / "wikitext2" / "wiki.test.raw"
    summary = train_demo(out, minutes=minutes, seed=seed, max_steps=max_steps, wikitext_path=wikitext,
                         num_threads=threads)
    Console().print_json(data={k: v for k, v in summary.items() if not isinstance(v, (list, dict))})


# --- export (issue 9) ------------------------------------------------------------------------------
@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="a run directory of `moebits quantize` (its packed model/)"),
    format: str = typer.Option(..., "--format", help="compressed-tensors (what vLLM serves) | dequantized "
                                                     "(16-bit weights any transformers loads) | gguf (llama.cpp)"),
    out: Path = typer.Option(..., help="directory to write (gguf: the .gguf file)"),
    pure: Optional[str] = typer.Option(None, help="gguf: every tensor at this ggml type (F16: llama-quantize's "
                                                  "input for its stock mixes; Q8_0, Q4_K, ...)"),
    envelope: bool = typer.Option(False, help="compressed-tensors: promote each MoE layer to its widest bit-width "
                                              "(exact) so a per-expert plan becomes servable"),
    verify: bool = typer.Option(True, help="decompress the export with compressed-tensors and compare every "
                                           "weight with the moebits weight"),
):
    """Export a quantized run for serving (docs/export.md)."""
    from .export.run_export import export_run

    try:
        r = export_run(run, format, out, use_envelope=envelope, verify=verify, pure=pure)
    except _user_errors() as e:
        _fail(str(e))
    if format == "gguf":
        t = Table(title=f"moebits export -> {out}")
        for c in ("arch", "tensors", "file MB", "bits/weight", "types", "fallbacks", "imatrix"):
            t.add_column(c, justify="right")
        t.add_row(r["arch"], str(r["tensors"]), f"{r['file_bytes'] / 1e6:.2f}", f"{r['bits_per_weight']:.3f}",
                  ", ".join(f"{k}:{v}" for k, v in sorted(r["types"].items())), str(len(r["fallbacks"])),
                  r["imatrix"])
        Console().print(t)
        Console().print(f"types: {r['types_from']}; beside it: {', '.join(r['side_files'].values())}\n"
                        f"reproduce from the F16 export: {r['llama_quantize']}")
        return
    t = Table(title=f"moebits export -> {out}")
    for c in ("format", "plan bits", "export bits", "promoted units", "schemes", "verified units"):
        t.add_column(c, justify="right")
    t.add_row(r["format"], f"{r['plan_avg_bits']:.4f}", f"{r['export_avg_bits']:.4f}", str(r.get("promoted_units", "-")),
              str(len(r.get("schemes", {})) or "-"), str(r.get("verified_units", "-")))
    Console().print(t)
    if r.get("transformers_note"):
        Console().print(f"[yellow]note:[/] {r['transformers_note']}")
# --- end export ---------------------------------------------------------------------------------------


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
