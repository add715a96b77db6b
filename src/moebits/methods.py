"""Methods: a name, how it fills the sensitivity table, and which solver reads the table.

    uniform  one bit-width for every unit (the largest whose exact storage fits)   no profiling, `uniform`
    freq     MPQ-Freq: more bits to more frequently routed experts               no profiling, `freq`
    mxmoe    profile every unit x bit-width, exact ILP                           (MxMoE)       `ilp`
    fri      profile a rule budget, predict the rest (FRI or a regressor)        (FRI-MxMoE)   `lagrangian`
    bt       every unit x (bits, rank), whole-expert loss (registered in bt.py)  (BT-MoE)      `ilp`

Adding a method is one entry. In its own module (say `moebits/bt.py`):

    from .methods import Method, register_method

    def fill_bt(run, choices):          # run: the Pipeline (adapter, calib, windows, cfg, results, timed)
        ...                             # -> SensitivityTable over run.units x choices, every error finite
    def bt_choices(cfg):                # optional: the candidate choices (default: candidate_bits x cfg)
        ...
    register_method(Method("bt", fill=fill_bt, solver="ilp", choices=bt_choices, granularity="expert"))

and add the module's name to `PLUGIN_MODULES` below, so that `get_method("bt")` imports it (the CLI and the
pipeline only ever look methods up through `get_method` / `method_names`). A new solver is an entry of
`allocate.SOLVERS` with the contract of `allocate.allocate`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .table import SensitivityTable
from .units import FP_BITS, Choice

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import Pipeline, QuantizeConfig

FillTable = Callable[["Pipeline", "list[Choice]"], SensitivityTable]

# modules that register methods of their own (imported on the first look-up), e.g. "moebits.bt"
PLUGIN_MODULES: list[str] = ["moebits.dmpq", "moebits.bt"]


def candidate_bits_choices(cfg: "QuantizeConfig") -> list[Choice]:
    """The default candidates: every `--candidate-bits` width with the run's group size and quantizer."""
    return [Choice(b, cfg.group_size, cfg.quantizer) for b in sorted(cfg.candidate_bits)]


@dataclass(frozen=True)
class Method:
    name: str
    fill: FillTable  # (pipeline, choices) -> a complete SensitivityTable
    solver: str  # default solver (an `allocate.SOLVERS` key); --solver overrides
    choices: Callable[..., list[Choice]] = candidate_bits_choices
    choices_need_shapes: bool = False  # True: `choices(cfg, shapes)` (e.g. bt's ranks scale with the expert width)
    granularity: str | None = None  # default structure when the user leaves --granularity at "linear"
    profiles: bool = True  # False: the table holds no measurement (not saved, no profiling stage)
    description: str = ""


_METHODS: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    if method.name in _METHODS and not replace:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def _load_plugins() -> None:
    for name in PLUGIN_MODULES:
        importlib.import_module(name)


def method_names() -> tuple[str, ...]:
    _load_plugins()
    return tuple(_METHODS)


def get_method(name: str) -> Method:
    _load_plugins()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {tuple(_METHODS)}")
    return _METHODS[name]


# -- the built-in methods ---------------------------------------------------------------------------

def uniform_choices(cfg: "QuantizeConfig") -> list[Choice]:
    """Every bit-width the quantizer has, so the budget picks the largest fitting one."""
    bits = (1, 2, 3, 4, 8) if cfg.quantizer == "hqq" else (2, 3, 4, 5, 6, 7, 8)
    return [Choice(b, cfg.group_size, cfg.quantizer) for b in (*bits, FP_BITS)]


def fill_unprofiled(run: "Pipeline", choices: list[Choice]) -> SensitivityTable:
    return SensitivityTable.unprofiled(run.units, choices, run.calib.frequency())


def fill_profiled(run: "Pipeline", choices: list[Choice]) -> SensitivityTable:
    """MxMoE: measure every unit x choice."""
    return run.measure(run.units, choices)


def fill_fri(run: "Pipeline", choices: list[Choice]) -> SensitivityTable:
    """FRI-MxMoE: measure a rule budget of (unit, choice) pairs, fit the predictor on them, predict the rest.

    moebits' default (`--sampler adaptive --predictor ridge --proxy`): a stratified start, then rounds of
    the pairs most uncertain and nearest the allocation's decision boundary (adaptive.py), Ridge on log
    error with the RTN proxy feature (proxy.py, its seconds counted in `profile_seconds`), per-unit
    offsets. The paper: `--sampler stratified --predictor fri --no-proxy` (whole anchor experts, FRI
    on Table 7's features), plus `--solver lagrangian --no-fill` for Algorithm 1's allocation.
    """
    from .adaptive import adaptive_fill
    from .features import PAPER_GROUPS, FeatureSpec
    from .predict import fit_table, make_estimator, predict_table
    from .sampling import sample_anchors

    cfg = run.cfg
    n_quantized = sum(not c.is_fp for c in choices)
    rules = cfg.rule_budget(len(run.units), n_quantized)
    estimator = make_estimator(cfg.predictor, cfg.seed)
    spec = FeatureSpec(PAPER_GROUPS + (("proxy",) if cfg.proxy else ()))
    proxy = None
    if cfg.proxy:
        from .proxy import rtn_proxy

        # the profiler keeps the reference forwards the proxy computes, for the pairs measured next
        profiler = run.expert_profiler() if cfg.metric == "expert" else None
        px = rtn_proxy(run.adapter, run.units, choices, run.calib.inputs, profiler=profiler)
        proxy, run.results["proxy_seconds"] = px.values, round(px.seconds, 4)
    if cfg.sampler == "adaptive":
        table = run.new_table(choices)

        def measure(pairs):  # one call per round: its GPTQ is batched over all the round's pairs
            run.measure([], choices, table=table,
                        pairs=[(run.units[u], choices[j]) for j in sorted({c for _, c in pairs})
                               for u, c in pairs if c == j])

        budget = run.budget(choices, table.frequency)
        res = run.timed("adaptive_seconds", lambda: adaptive_fill(
            table, run.calib.stats, measure, rules, budget.cost, budget.total, estimator, spec, proxy,
            seed=cfg.seed, groups=run.groups()))
        run.results["rounds"] = res.rounds
        # fitting, bootstraps and scoring between rounds (the rest of adaptive_seconds is profiling)
        run.results["fit_seconds"] = round(run.results["adaptive_seconds"] - run.results.get("profile_seconds", 0.0), 4)
        filled = res.table
    else:
        anchors = sample_anchors(run.units, cfg.sampler, rules=rules, seed=cfg.seed, bits_per_unit=n_quantized)
        table = run.measure(anchors, choices)
        fitted = run.timed("fit_seconds", lambda: fit_table(table, run.calib.stats, estimator, spec, proxy))
        filled = run.timed("predict_seconds", lambda: predict_table(table, fitted, unit_offset=True))
    run.results["anchors"] = len({(u.layer, u.expert) for u, m in zip(table.units, table.measured.any(axis=1)) if m})
    run.results["rules"] = int(table.measured.sum())
    run.results["rule_budget"] = rules
    run.results["profile_seconds"] = round(run.results.get("profile_seconds", 0.0)
                                           + run.results.get("proxy_seconds", 0.0), 4)
    return filled


register_method(Method("uniform", fill_unprofiled, "uniform", uniform_choices, profiles=False,
                       description="one bit-width for every unit"))
register_method(Method("freq", fill_unprofiled, "freq", profiles=False,
                       description="MPQ-Freq: bits follow routing frequency"))
register_method(Method("mxmoe", fill_profiled, "ilp", description="MxMoE: full profiling + exact ILP"))
register_method(Method("fri", fill_fri, "lagrangian", description="FRI-MxMoE: a rule budget + prediction"))
