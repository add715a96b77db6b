"""Methods: how the sensitivity table is filled, and which solver reads it. One module per method:

    uniform.py  one bit-width for every unit (the largest whose exact storage fits)   nothing measured  `uniform`
    freq.py     MPQ-Freq: more bits to more frequently routed experts                nothing measured  `freq`
    mxmoe.py    MxMoE: every unit x bit-width measured                                                `ilp`
    fri/        FRI-MxMoE: a rule budget of pairs measured, the rest predicted                        `lagrangian`
    bt.py       BT-MoE: every unit x (bits, rank), whole-expert loss                                  `ilp`
    dmpq.py     DMPQ: every unit x {2, 4, 8, 16} measured, a PPO policy allocates                     `rl`

The contract, three steps, run the same way by every executor (in memory, streaming, Ray):

    choices(cfg, shapes)            the candidate settings of every unit
    requests(ctx, measured)         what to measure: yields `Request(units, choices)`; the executor measures
                                    each into `measured` before asking for the next (FRI's adaptive rounds
                                    are several requests, mxmoe one, uniform none)
    complete(ctx, measured)         the whole table from what was measured (FRI predicts the rest)
    solver_options(ctx, table, budget)   what the solver needs beyond loss and cost (DMPQ's reward terms)

`ctx` (`Context`) is a read-only view of the run: the config, units, shapes, choices, calibration
statistics, the allocation's budget (built once) and structure groups, and, in memory only, the model
adapter and calibration inputs. A method never sees an executor. Adding one is one module:

    from . import Method, Request, register_method

    class Toy(Method):
        name, solver = "toy", "ilp"
        def requests(self, ctx, measured):      # optional; default: every unit x choice (none if not profiles)
            yield Request(tuple(ctx.units[::2]), tuple(ctx.choices))
        def complete(self, ctx, measured):      # -> SensitivityTable over ctx.units x ctx.choices, all finite
            ...

    register_method(Toy())

Every module of this package is imported on the first look-up (`METHOD_MODULES` only fixes the built-ins'
order), so the file is all there is to add; the CLI and the executors look methods up only through
`get_method` / `method_names`. A new solver is an entry of `allocate.SOLVERS` with the contract of
`allocate.allocate`.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..table import SensitivityTable
from ..units import Choice, Unit

if TYPE_CHECKING:  # pragma: no cover
    from ..budget import Budget
    from ..calibrate import Calibration
    from ..models.adapter import MoEAdapter
    from ..stats import CalibrationStats

# the modules that register methods (imported on the first look-up, in this order)
METHOD_MODULES: list[str] = ["moebits.methods.uniform", "moebits.methods.freq", "moebits.methods.mxmoe",
                             "moebits.methods.fri", "moebits.methods.dmpq", "moebits.methods.bt"]


@dataclass(frozen=True)
class Request:
    """Measure `units` x `choices` with the run's metric (`whole_expert`: BT-MoE's joint perturbation of
    all blocks of an expert at one choice)."""
    units: tuple[Unit, ...]
    choices: tuple[Choice, ...]
    whole_expert: bool = False
    pairs: tuple[tuple[Unit, Choice], ...] | None = None  # exactly these (unit, choice) pairs, not units x choices

    @classmethod
    def of_pairs(cls, pairs) -> "Request":
        pairs = tuple(pairs)
        return cls(tuple(dict.fromkeys(u for u, _ in pairs)), tuple(dict.fromkeys(c for _, c in pairs)), pairs=pairs)


@dataclass(frozen=True)
class Context:
    """What a method reads of the run (built by the executor). `stats` is None while the streaming executor
    asks for the first request (before its pass 1 has calibrated); `adapter`, `calib` (with the captured
    inputs), `windows` and `tokenizer` exist in memory only. `results` is where a method reports (rounds,
    seconds: results.json); `memo` holds what it derives once per run (FRI's RTN proxy)."""
    cfg: Any  # the job's QuantizeConfig (moebits.job.config); methods read it, never import the job
    units: list[Unit]
    shapes: dict
    choices: list[Choice]
    stats: "CalibrationStats | None" = None
    allocation_budget: Any = None  # () -> the allocation's Budget (built once, on first use; None: --wbits)
    groups: np.ndarray | None = None
    adapter: "MoEAdapter | None" = None
    calib: "Calibration | None" = None
    windows: Any = None
    tokenizer: Any = None
    expert_profiler: Any = None  # () -> the run's ExpertProfiler (in memory: shares reference forwards)
    results: dict = field(default_factory=dict)
    memo: dict = field(default_factory=dict)

    @property
    def budget(self) -> "Budget | None":
        """The allocation's budget (the same object the allocation uses)."""
        return None if self.allocation_budget is None else self.allocation_budget()

    @property
    def frequency(self) -> np.ndarray:
        """[U] routed-token frequency of `units`."""
        return self.stats.aligned(self.units).frequency

    def timed(self, key: str, fn):
        """`fn()`, its wall seconds reported as `results[key]`."""
        t0 = time.perf_counter()
        out = fn()
        self.results[key] = round(time.perf_counter() - t0, 4)
        return out


def candidate_bits_choices(cfg) -> list[Choice]:
    """The default candidates: every `--candidate-bits` width with the run's group size and quantizer."""
    return [Choice(b, cfg.group_size, cfg.quantizer) for b in sorted(cfg.candidate_bits)]


class Method:
    """A method: subclass, set the class attributes, override the steps that differ from the defaults."""
    name: str = ""
    solver: str = "ilp"  # default solver (an `allocate.SOLVERS` key); --solver overrides
    granularity: str | None = None  # default structure when the user leaves --granularity unset
    profiles: bool = True  # False: nothing is measured (no profiling stage, no table.csv)
    description: str = ""

    def choices(self, cfg, shapes: dict | None = None) -> list[Choice]:
        return candidate_bits_choices(cfg)

    def requests(self, ctx: Context, measured: SensitivityTable) -> Iterator[Request]:
        if self.profiles:
            yield Request(tuple(ctx.units), tuple(ctx.choices))

    def complete(self, ctx: Context, measured: SensitivityTable) -> SensitivityTable:
        if self.profiles:
            return measured
        return SensitivityTable.unprofiled(ctx.units, ctx.choices, ctx.stats.frequency)

    def solver_options(self, ctx: Context, table: SensitivityTable, budget: "Budget") -> dict:
        """Keyword options of `allocate.plan_under_budget` for the run's solver."""
        if ctx.cfg.solver_name == "rl":  # DMPQ's reward and state need more than the table and the budget
            from .dmpq import rl_solver_options

            return rl_solver_options(ctx, table, budget)
        if ctx.cfg.solver_name == "ilp":
            return {"node_limit": ctx.cfg.ilp_nodes or None}
        return {} if ctx.cfg.fill else {"fill": False}  # QuantizeConfig.check: --no-fill only with lagrangian


_METHODS: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    if method.name in _METHODS and not replace:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def _load_plugins() -> None:
    """Import the built-in methods in order, then any other module of this package (a new method is a file)."""
    import pkgutil

    for name in METHOD_MODULES + sorted(f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(name)


def method_names() -> tuple[str, ...]:
    """Every registered method: the built-ins in `METHOD_MODULES` order (whatever imported first), then others."""
    _load_plugins()
    order = {m: i for i, m in enumerate(METHOD_MODULES)}
    return tuple(sorted(_METHODS, key=lambda n: order.get(type(_METHODS[n]).__module__, len(order))))


def get_method(name: str) -> Method:
    _load_plugins()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {method_names()}")
    return _METHODS[name]
