"""Methods: a name, how it fills the sensitivity table, and which solver reads the table.

    uniform  one bit-width for every unit (the largest whose exact storage fits)   no profiling, `uniform`
    freq     MPQ-Freq: more bits to more frequently routed experts               no profiling, `freq`
    mxmoe    profile every unit x bit-width, exact ILP                           (MxMoE)       `ilp`
    fri      profile a rule budget, predict the rest (FRI or a regressor)        (FRI-MxMoE)   `lagrangian`
    bt       every unit x (bits, rank), whole-expert loss                          (BT-MoE)      `ilp`
    rl       every unit x {2, 4, 8, 16}, a PPO policy allocates                    (DMPQ)        `rl`

One module per method in this package (uniform.py, freq.py, mxmoe.py, fri/, dmpq.py, bt.py). Adding a
method is one entry. In its own module (say `moebits/methods/bt.py`):

    from . import Method, register_method

    def fill_bt(run, choices):          # run: the Pipeline (adapter, calib, windows, cfg, results, timed)
        ...                             # -> SensitivityTable over run.units x choices, every error finite
    def bt_choices(cfg):                # optional: the candidate choices (default: candidate_bits x cfg)
        ...
    register_method(Method("bt", fill=fill_bt, solver="ilp", choices=bt_choices, granularity="expert"))

and add the module's name to `METHOD_MODULES` below, so that `get_method("bt")` imports it (the CLI and the
pipeline only ever look methods up through `get_method` / `method_names`). A new solver is an entry of
`allocate.SOLVERS` with the contract of `allocate.allocate`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..table import SensitivityTable
from ..units import Choice

if TYPE_CHECKING:  # pragma: no cover
    from ..job.config import QuantizeConfig
    from ..job.in_memory import Pipeline

FillTable = Callable[["Pipeline", "list[Choice]"], SensitivityTable]

# the modules that register methods (imported on the first look-up, in this order)
METHOD_MODULES: list[str] = ["moebits.methods.uniform", "moebits.methods.freq", "moebits.methods.mxmoe",
                             "moebits.methods.fri", "moebits.methods.dmpq", "moebits.methods.bt"]


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
    for name in METHOD_MODULES:
        importlib.import_module(name)


def method_names() -> tuple[str, ...]:
    """Every registered method: the built-ins in `METHOD_MODULES` order (whatever imported first), then others."""
    _load_plugins()
    order = {m: i for i, m in enumerate(METHOD_MODULES)}
    return tuple(sorted(_METHODS, key=lambda n: order.get(_METHODS[n].fill.__module__, len(order))))


def get_method(name: str) -> Method:
    _load_plugins()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {method_names()}")
    return _METHODS[name]
