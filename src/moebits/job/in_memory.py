"""The whole job, stage by stage, in a run directory:

    calibrate -> evaluate fp -> fill the sensitivity table (by the method) -> allocate -> quantize -> evaluate

Each stage's artefact is written atomically; a rerun with the same request resumes at the first
missing artefact (see rundir.py). Methods (moebits.methods) differ only in how they fill the sensitivity table
and which solver reads it; from the table on, every method takes the same path: `Budget` (budget.py) ->
`allocate.plan_under_budget` -> `Plan`.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from ..allocate import combine_groups, expert_level, layer_uniform, plan_under_budget, tie_gate_up
from ..allocate.groups import vllm_servable
from ..apply import apply_plan, save_quantized
from ..atomic import atomic_write_json
from ..attention import attention_hessians, attention_size, check_attention_choice, quantize_attention
from ..budget import Budget, budget_request
from ..calibrate import Calibration, calibrate
from ..data import calibration_windows, load_text, tokenize
from ..evaluate import perplexity
from ..methods import get_method
from ..models import load_model
from ..plan import Plan
from ..table import SensitivityTable
from ..units import Choice, Unit
from .rundir import Run

log = logging.getLogger(__name__)

GRANULARITIES = ("linear", "expert", "layer")


SAVE_FORMATS = ("packed", "dequantized")


@dataclass
class QuantizeConfig:
    model: str = "demo"
    method: str = "uniform"
    quantizer: str = "rtn"
    bits: float | None = None  # budget: average storage bits per weight over the units
    memory_gb: float | None = None  # budget: GB of unit weights
    latency: float | None = None  # budget: seconds per forward of the units (roofline on `gpu`)
    gpu: str = "h100"
    cost: str = "roofline"  # latency model: roofline (analytic, --gpu) | latency-fri (measured here, FRI-interpolated)
    batch_tokens: int = 4096
    group_size: int = 128
    candidate_bits: tuple[int, ...] = (2, 3, 4, 8)
    wbits: int | None = None  # uniform: N-bit codes for every unit, whatever the storage (instead of a budget)
    bits_set: tuple[int, ...] | None = None  # bt: bit-widths of the (bits, rank) choices; None: 2, 3, 4
    ranks: tuple[int, ...] | None = None  # bt: compensator ranks; None: 0, w/32, w/16, w/8, w/4 of the expert width
    attn_bits: int | None = None  # every method: attention projections at this many bits (None: untouched)
    attn_rank: int = 0  # ... with a low-rank compensator of this rank
    calib: str = "demo"
    nsamples: int = 128
    seqlen: int | None = None  # sets calib_seqlen and eval_seqlen; None: the model's (data.default_seqlen)
    calib_seqlen: int | None = None  # tokens per calibration window (None: seqlen)
    eval_seqlen: int | None = None  # tokens per evaluation window (None: seqlen)
    eval: str = "demo"
    eval_windows: int | None = None
    metric: str = "expert"
    solver: str | None = None  # None: the method's default
    granularity: str | None = None  # linear (per block) | expert (one choice per expert) | layer; None: the method's
    tie_gate_up: bool = False
    anchors: float | None = None  # fri: rule budget as a fraction of the units (x quantized choices); None: see rules
    rules: int | None = None  # fri: rule budget in profiled (unit, choice) pairs; exclusive with anchors
    sampler: str = "adaptive"  # fri: adaptive | stratified | random (samplers.py, adaptive.py)
    predictor: str = "ridge"  # fri: fri | ridge | knn | gbm | mlp (predict.PREDICTORS)
    proxy: bool = True  # fri: the RTN weight-space proxy feature (proxy.py)
    fill: bool = True  # lagrangian solver: greedy fill after bisection (False: Algorithm 1 exactly)
    act_order: bool = False
    max_tokens_per_expert: int | None = None  # routed inputs kept per expert for profiling; None: all of them
    holdout: float = 0.0  # fraction of each expert's routed tokens held out of its Hessian to measure its error
    seed: int = 0
    dtype: str = "auto"
    device: str = "cpu"
    batch_size: int = 8
    save_model: bool = True
    save_format: str = "packed"  # packed (real low-bit, moebits format) | dequantized (16-bit HF checkpoint)
    trust_remote_code: bool = False
    target: str = "none"  # serving target the plan must fit: none | vllm (export/vllm_rules.py) | llamacpp (gguf/)
    bpw: float | None = None  # llamacpp: bits per weight over the whole GGUF file
    size_gb: float | None = None  # llamacpp: GB (1e9 bytes) of the GGUF's tensor data
    gguf_types: str | None = None  # llamacpp: candidate ggml types, comma-separated (None: gguf.target.DEFAULT_TYPES)
    # DMPQ (rl solver) and quantization-aware training (any method); see dmpq.py and qat.py
    rl_steps: int = 20_000
    reward: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0)  # w_acc, w_lat, w_mem, w_eng
    rl_accuracy: str = "proxy"  # proxy (additive table) | measured (held-out NLL of the quantized model)
    rl_sensitivity: str = "table"  # s_e: table (f*l at 2 bits) | measured (held-out NLL, one expert at 2 bits)
    energy: str = "horowitz45nm"  # energy model of the reward (energy.ENERGY_SPECS)
    qat_steps: int = 0  # > 0: quantization-aware fine-tuning of the experts after allocation
    qat_lr: float = 1e-4
    # activation quantization (issue 16; quant/act.py): per-token symmetric fake quant of each unit's input
    abits: int | None = None  # every candidate's activations at this width (uniform W4A4: --wbits 4 --abits 4)
    abits_set: tuple[int, ...] | None = None  # joint W/A allocation: candidates = weight choices x these widths
    abits_budget: float | None = None  # average activation bits (MAC-weighted); None: = --bits when abits_set
    act_clip: float = 1.0  # per-token clipping ratio of activation quantization
    rotate: str | None = None  # hadamard (residual + online down, QuaRot) | hadamard-offline (residual only); rotate.py

    OUTPUT_OPTIONS = ("save_model", "save_format")  # do not make a run "different"
    TUPLE_OPTIONS = ("candidate_bits", "reward", "bits_set", "ranks", "abits_set")  # lists in run.json

    def spec(self) -> dict:
        d = asdict(self)
        for k in self.TUPLE_OPTIONS:
            if d[k] is not None:
                d[k] = list(d[k])
        for k in self.OUTPUT_OPTIONS:
            d.pop(k)
        if d["target"] == "none":  # runs made before --target existed keep their spec
            d.pop("target")
        for k, default in (("bits_set", None), ("ranks", None), ("attn_bits", None), ("attn_rank", 0), ("abits", None),
                           ("abits_set", None), ("abits_budget", None), ("act_clip", 1.0), ("rotate", None),
                           ("rules", None), ("anchors", None), ("predictor", "ridge"), ("proxy", True), ("fill", True),
                           ("holdout", 0.0), ("bpw", None), ("size_gb", None), ("gguf_types", None)):
            if d[k] == default:  # likewise for runs made before bt, --attn-bits, ..., --rules, --holdout
                d.pop(k)
        # one length for both: the spec of runs made before --calib-seqlen / --eval-seqlen existed
        if d["calib_seqlen"] is not None and d["calib_seqlen"] == d["eval_seqlen"]:
            d["seqlen"] = d["calib_seqlen"]
        if d["seqlen"] is not None and d["calib_seqlen"] in (None, d["seqlen"]) and d["eval_seqlen"] in (None, d["seqlen"]):
            d.pop("calib_seqlen"), d.pop("eval_seqlen")
        else:
            d.pop("seqlen")
        return d

    def resolve_seqlens(self) -> None:
        """Fill `calib_seqlen` and `eval_seqlen`: each as given, else `seqlen`, else the model's default
        (min(2048, max positions); the demo 256). `seqlen` then holds the length when both are equal."""
        if self.calib_seqlen is None or self.eval_seqlen is None:
            from ..data import default_seqlen

            base = self.seqlen if self.seqlen is not None else default_seqlen(self.model, self.trust_remote_code)
            self.calib_seqlen = self.calib_seqlen if self.calib_seqlen is not None else base
            self.eval_seqlen = self.eval_seqlen if self.eval_seqlen is not None else base
        for name in ("calib_seqlen", "eval_seqlen"):
            if getattr(self, name) < 2:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 2 tokens, got {getattr(self, name)}")
        self.seqlen = self.calib_seqlen if self.calib_seqlen == self.eval_seqlen else None

    def check_values(self) -> None:
        """Option values that no stage could use, refused before a run directory is touched (issue 22).
        Raises ValueError naming the option and what it accepts. (Budgets: `budget_request`.)"""
        for name, low in (("nsamples", 1), ("group_size", 1), ("batch_size", 1), ("batch_tokens", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise ValueError(f"--eval-windows must be at least 1 (or left out: the whole text), got {self.eval_windows}")
        for name in ("seqlen", "calib_seqlen", "eval_seqlen"):
            v = getattr(self, name)
            if v is not None and v < 2:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 2 tokens, got {v}")
        if not self.candidate_bits:
            raise ValueError("--candidate-bits is empty; give bit-widths such as 2,3,4,8")
        check_device(self.device)

    def check_holdout(self) -> None:
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"--holdout is the fraction of each expert's routed tokens held out, in [0, 1); "
                             f"got {self.holdout}")
        if self.holdout > 0 and self.metric != "expert":
            raise ValueError("--holdout measures a unit's error on its held-out routed tokens, which the expert "
                             f"metric does; the {self.metric} metric re-runs every token: use --metric expert")

    @classmethod
    def from_spec(cls, spec: dict) -> "QuantizeConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"run spec has options this version does not know: {unknown}")
        d = dict(spec)
        for k in cls.TUPLE_OPTIONS:
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def budget_request(self) -> tuple[str, float]:
        if self.target == "llamacpp":  # a budget over the whole GGUF file (gguf/target.py)
            from ..gguf.target import file_budget

            b = file_budget(self.bpw, self.size_gb)
            return b.kind, b.value
        if self.bpw is not None or self.size_gb is not None:
            raise ValueError("--bpw / --size-gb budget a GGUF file: use them with --target llamacpp")
        if self.wbits is not None:
            if self.method != "uniform":
                raise ValueError(f"--wbits sets one code width for every unit (method uniform); method "
                                 f"{self.method!r} needs a budget: --bits, --memory-gb or --latency")
            if any(v is not None for v in (self.bits, self.memory_gb, self.latency)):
                raise ValueError("--wbits fixes the code width of every unit; give no budget (--bits, --memory-gb, "
                                 "--latency) with it")
            Choice(self.wbits, self.group_size, self.quantizer)  # validates the width
            return "wbits", float(self.wbits)
        return budget_request(self.bits, self.memory_gb, self.latency)

    DEFAULT_ANCHORS = 0.15  # fri: rule budget when neither --anchors nor --rules is given (results/fri_rules.md)

    def check_fri_options(self) -> None:
        """One rule budget (`--rules` or `--anchors`), known sampler and predictor, `--no-fill` only with
        the lagrangian solver. Raises ValueError with what to change."""
        from ..methods.fri.predictors import PREDICTORS
        from ..methods.fri.samplers import SAMPLERS

        if self.rules is not None and self.anchors is not None:
            raise ValueError(f"--rules {self.rules} and --anchors {self.anchors} both set the rule budget: give one "
                             "(--rules N profiled unit x choice pairs, or --anchors FRACTION of the units)")
        if self.rules is not None and self.rules < 1:
            raise ValueError(f"--rules must be >= 1 profiled (unit, choice) pairs, got {self.rules}")
        if self.anchors is not None and not 0.0 < self.anchors <= 1.0:
            raise ValueError(f"--anchors is a fraction of the units in (0, 1], got {self.anchors}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown --sampler {self.sampler!r}; choose one of {SAMPLERS}")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"unknown --predictor {self.predictor!r}; choose one of {PREDICTORS}")
        if not self.fill and self.solver_name != "lagrangian":
            raise ValueError(f"--no-fill switches off the lagrangian solver's greedy fill; solver "
                             f"{self.solver_name!r} has none (use --solver lagrangian)")

    def rule_budget(self, n_units: int, n_quantized_choices: int) -> int:
        """Profiled (unit, choice) pairs allowed: --rules, else --anchors (default 0.15) x units x choices."""
        self.check_fri_options()
        if self.rules is not None:
            return int(self.rules)
        fraction = self.DEFAULT_ANCHORS if self.anchors is None else self.anchors
        return int(np.floor(fraction * n_units + 1e-9)) * int(n_quantized_choices)

    @property
    def solver_name(self) -> str:
        if self.solver is None and self.act_budget() is not None:
            return "ilp"  # the only solver with a second (activation-bits) constraint; see allocate/__init__.py
        return self.solver or get_method(self.method).solver

    def act_budget(self) -> float | None:
        """The average-activation-bits budget of a joint W/A allocation (None: no such constraint)."""
        if self.abits_set is None:
            if self.abits_budget is not None:
                raise ValueError("--abits-budget bounds a joint weight/activation allocation: give --abits-set too")
            return None
        if self.abits_budget is not None:
            return float(self.abits_budget)
        return float(self.bits) if self.bits is not None else None

    def check_act_options(self) -> None:
        from ..quant.act import check_act_bits

        if self.abits is not None and self.abits_set is not None:
            raise ValueError("--abits fixes every unit's activation bits, --abits-set lets the allocator choose: "
                             "give one of them")
        for a in ([self.abits] if self.abits is not None else []) + list(self.abits_set or ()):
            check_act_bits(a)
        if self.abits_set is not None and self.method in ("uniform", "freq"):
            raise ValueError(f"method {self.method!r} does not profile, so it cannot choose activation bits; "
                             "use --abits for one width, or --method mxmoe|fri with --abits-set")
        if self.act_budget() is not None and self.solver not in (None, "ilp"):
            raise ValueError(f"a joint weight/activation allocation (--abits-set) has two budgets; solver "
                             f"{self.solver!r} takes one: use --solver ilp (the default then)")
        if not 0.0 < self.act_clip <= 1.0:
            raise ValueError(f"--act-clip must be in (0, 1], got {self.act_clip}")
        if (self.abits is not None or self.abits_set) and self.save_model and self.save_format == "dequantized":
            raise ValueError("a dequantized 16-bit checkpoint cannot carry activation quantization (transformers "
                             "would load it without); save --save-format packed, which records it")

    @property
    def granularity_name(self) -> str:
        return self.granularity or get_method(self.method).granularity or "linear"

    def attention_choice(self) -> Choice | None:
        """The fixed setting of the attention projections (`--attn-bits`, `--attn-rank`), None = untouched."""
        if self.attn_bits is None:
            if self.attn_rank:
                raise ValueError("--attn-rank needs --attn-bits (a compensator corrects quantized attention)")
            return None
        return Choice(self.attn_bits, self.group_size, self.quantizer, rank=self.attn_rank)

def check_device(device: str) -> None:
    """A device this machine has (a clear error instead of torch's traceback deep inside loading)."""
    import torch

    kind = str(device).split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
                         f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    if kind not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise ValueError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N")


TARGETS = ("none", "vllm", "llamacpp")


def candidate_choices(cfg: QuantizeConfig, shapes: dict | None = None) -> list[Choice]:
    method = get_method(cfg.method)
    if method.choices_need_shapes:
        if shapes is None:
            raise ValueError(f"method {method.name!r} derives its choices from the model's weight shapes")
        choices = method.choices(cfg, shapes)
    else:
        choices = method.choices(cfg)
    # --- serving target (issue 9): vLLM serves 4/8-bit integer-zero group-wise schemes only
    if cfg.target not in TARGETS:
        raise ValueError(f"unknown --target {cfg.target!r}; choose one of {TARGETS}")
    if cfg.target == "vllm":
        from ..export.vllm_rules import vllm_choices

        choices = vllm_choices(choices)
    return with_act_bits(cfg, choices)


def with_act_bits(cfg: QuantizeConfig, choices: list[Choice]) -> list[Choice]:
    """`--abits A`: every candidate at A activation bits; `--abits-set`: every candidate x every width."""
    cfg.check_act_options()
    if cfg.abits is not None:
        return [replace(c, act_bits=cfg.abits) for c in choices]
    if cfg.abits_set:
        return [replace(c, act_bits=a) for c in choices for a in sorted(set(cfg.abits_set))]
    return choices


def make_budget(cfg: QuantizeConfig, units: list[Unit], shapes: dict, choices: list[Choice],
                freq: np.ndarray | None) -> Budget:
    kind, value = cfg.budget_request()
    budget = Budget.build(kind, value, units, shapes, choices, freq, gpu=cfg.gpu, batch_tokens=cfg.batch_tokens,
                          latency_model=cfg.cost, seed=cfg.seed, device=cfg.device)
    act = cfg.act_budget()
    if act is not None and freq is not None:  # the MAC weights need routed frequencies (budget.ActBitsBudget)
        budget.with_act_bits(act, choices, freq)
    return budget


def structure_groups(granularity: str, tie: bool, units: list[Unit], target: str = "none") -> np.ndarray | None:
    """Unit ids that must share a choice: `granularity` linear | expert | layer, `tie` gate with up,
    `target` vllm: one choice per MoE layer's routed experts and per shared expert's gate/up."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
    parts = []
    if granularity == "expert":
        parts.append(expert_level(units))
    elif granularity == "layer":
        parts.append(layer_uniform(units))
    if tie:
        parts.append(tie_gate_up(units))
    if target == "vllm":
        parts.append(vllm_servable(units))
    return combine_groups(*parts) if parts else None


class Pipeline:
    def __init__(self, cfg: QuantizeConfig, out: str | Path, overwrite: bool = False, progress: bool = True):
        cfg.check_values()
        self.method = get_method(cfg.method)
        cfg.check_fri_options()
        if cfg.save_format not in SAVE_FORMATS:
            raise ValueError(f"unknown save format {cfg.save_format!r}; choose one of {', '.join(SAVE_FORMATS)}")
        if cfg.rotate is not None:
            from ..rotate import ROTATIONS

            if cfg.rotate not in ROTATIONS:
                raise ValueError(f"unknown --rotate {cfg.rotate!r}; choose one of {', '.join(ROTATIONS)}")
        cfg.resolve_seqlens()
        cfg.check_holdout()
        self.cfg, self.progress = cfg, progress
        self.rotation = None  # rotate.Rotation once load() rotated the model (--rotate)
        from ..fingerprint import run_inputs
        from .rundir import read_cached_json

        self.run = Run(out, cfg.spec(), overwrite=overwrite, inputs=run_inputs(cfg.model, cfg.calib, cfg.eval))
        self.results: dict = read_cached_json(self.run, "results.json") or {}

    @classmethod
    def from_run(cls, directory: str | Path, progress: bool = True, **output_options) -> "Pipeline":
        """The pipeline of an existing run directory, its configuration rebuilt from `run.json`."""
        spec_p = Path(directory) / "run.json"
        if not spec_p.exists():
            raise FileNotFoundError(f"{directory} is not a moebits run directory (no run.json)")
        cfg = QuantizeConfig.from_spec(json.loads(spec_p.read_text()))
        for k, v in output_options.items():
            setattr(cfg, k, v)
        return cls(cfg, directory, progress=progress)

    # -- stages ------------------------------------------------------------------------------
    def timed(self, key: str, fn):
        """Run `fn()` and record its wall seconds as `results[key]`."""
        t0 = time.perf_counter()
        out = fn()
        self.results[key] = round(time.perf_counter() - t0, 4)
        return out

    def load(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer, self.adapter = load_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code,
                                                              seed=cfg.seed)
        self.adapter.check_finite()
        self.warn_seqlen()
        self.rotation = None
        if cfg.rotate:  # before calibration: statistics, Hessians and profiles are of the rotated model
            from ..rotate import rotate_model

            self.rotation = self.timed("rotate_seconds", lambda: rotate_model(
                self.model, self.adapter, cfg.rotate, cfg.seed))
            self.results["rotation"] = self.rotation.to_dict()
        self.units = self.adapter.units()
        self.shapes = self.adapter.shapes()

    def calibrate(self) -> Calibration:
        cfg = self.cfg
        self.windows = calibration_windows(self.tokenizer, cfg.calib, cfg.nsamples, cfg.calib_seqlen, cfg.seed)
        if self.run.verified(Calibration.STATS_FILE) and self.run.verified(Calibration.INPUTS_FILE):
            self.calib = Calibration.load(self.run.root)
            return self.calib
        cal = self.timed("calibrate_seconds", lambda: calibrate(
            self.adapter, self.windows, cfg.batch_size, cfg.max_tokens_per_expert, cfg.seed, self.progress,
            holdout=cfg.holdout))
        cal.save(self.run.root)
        self.run.record(Calibration.INPUTS_FILE, Calibration.STATS_FILE)
        self.calib = cal
        self._save_results()
        return cal

    def eval_tokens(self) -> torch.Tensor:
        if not hasattr(self, "_eval_ids"):
            self._eval_ids = tokenize(self.tokenizer, load_text(self.cfg.eval, "eval"))
        return self._eval_ids

    def evaluate(self, key: str) -> None:
        if key in self.results:
            return
        res = self.timed(f"{key}_eval_seconds", lambda: perplexity(
            self.model, self.eval_tokens(), self.cfg.eval_seqlen, self.cfg.batch_size, self.cfg.eval_windows,
            self.progress, desc=f"eval ({key})"))
        self.results[key] = res.ppl
        self.results["eval_tokens"], self.results["eval_windows"] = res.tokens, res.windows
        self._save_results()

    def new_table(self, choices: list[Choice]) -> SensitivityTable:
        """An empty table over the run's units x `choices`, with the calibration's frequencies."""
        from ..profile import new_table

        return new_table(self.adapter, choices, self.calib.stats)

    def measure(self, units: list[Unit], choices: list[Choice], whole_expert: bool = False,
                table: SensitivityTable | None = None,
                pairs: list[tuple[Unit, Choice]] | None = None) -> SensitivityTable:
        """Profile `units` x `choices` (or exactly the (unit, choice) `pairs`) with the run's metric into
        `table` (a new one if None: other entries unknown); `whole_expert`: BT-MoE's joint perturbation
        of all blocks of an expert (see profile.py). Seconds add up in `results["profile_seconds"]`
        over calls; with the expert metric, calls share one `ExpertProfiler` (its reference forwards and
        prepared Hessians), so an adaptive sampler's rounds do not redo them."""
        from ..profile import profile

        cfg = self.cfg
        stats = self.calib.stats
        table = self.new_table(choices) if table is None else table
        before = self.results.get("profile_seconds", 0.0)
        inputs = self._profile_inputs()
        kw = {"act_clip": cfg.act_clip} if cfg.act_clip != 1.0 else {}
        t0 = time.perf_counter()
        if cfg.metric == "expert" and not whole_expert:
            profiler = self.expert_profiler()
            todo = pairs if pairs is not None else [(u, c) for u in units for c in choices]
            profiler.measure(todo, table, self.progress)
        elif pairs is not None:
            for c in dict.fromkeys(c for _, c in pairs):
                table = profile(self.adapter, cfg.metric, [u for u, pc in pairs if pc == c], [c], stats, inputs,
                                windows=self.windows, act_order=cfg.act_order, table=table, progress=self.progress,
                                whole_expert=whole_expert, **kw)
        else:
            table = profile(self.adapter, cfg.metric, units, choices, stats, inputs, windows=self.windows,
                            act_order=cfg.act_order, table=table, progress=self.progress, whole_expert=whole_expert,
                            **kw)
        self.results["profile_seconds"] = round(before + time.perf_counter() - t0, 4)
        n = len({u for u, _ in pairs}) if pairs is not None else len(units)
        self.results["profiled_units"] = self.results.get("profiled_units", 0) + n
        return table

    def _profile_inputs(self):
        """`calib.profile_inputs()`, made once per calibration (under --holdout it builds new tensors)."""
        cached = getattr(self, "_profile_inputs_of", None)
        if cached is None or cached[0] is not self.calib:
            cached = self._profile_inputs_of = (self.calib, self.calib.profile_inputs())
        return cached[1]

    def expert_profiler(self):
        """The run's `ExpertProfiler` on the profiling inputs (one per calibration, shared by every
        measure() call of the expert metric)."""
        from ..expert_profiler import ExpertProfiler

        inputs = self._profile_inputs()
        prof = getattr(self, "_profiler", None)
        if prof is None or prof.inputs is not inputs:
            prof = self._profiler = ExpertProfiler(self.adapter, inputs, self.cfg.act_order, self.cfg.act_clip)
        return prof

    def fill_table(self, choices: list[Choice]) -> SensitivityTable:
        """The method's sensitivity table, saved as table.csv when it holds measurements."""
        table_p = self.run.path("table.csv")
        if self.run.verified("table.csv"):
            return SensitivityTable.from_csv(table_p)
        self.results["profile_seconds"] = 0.0  # measure() adds up; an interrupted attempt's seconds do not count
        self.results.pop("profiled_units", None)
        try:
            table = self.method.fill(self, choices)
        finally:
            self._profiler = None  # its caches (reference forwards, Hessians) are of no use after this stage
        if not table.complete:
            raise RuntimeError(f"method {self.method.name!r} left {int((~np.isfinite(table.error)).sum())} "
                               "table entries unknown")
        if self.method.profiles:
            table.to_csv(table_p)
            self.run.record("table.csv")
        self.results.setdefault("profile_seconds", 0.0)
        self._save_results()
        return table

    def budget(self, choices: list[Choice], frequency: np.ndarray | None) -> Budget:
        return make_budget(self.cfg, self.units, self.shapes, choices, frequency)

    def groups(self) -> np.ndarray | None:
        return structure_groups(self.cfg.granularity_name, self.cfg.tie_gate_up, self.units, self.cfg.target)

    def allocate(self, choices: list[Choice], table: SensitivityTable) -> Plan:
        plan_p = self.run.path("plan.json")
        if self.run.verified("plan.json"):
            return self.load_plan(plan_p, choices, table)
        cfg = self.cfg
        attn = cfg.attention_choice()
        meta = {"method": cfg.method, "granularity": cfg.granularity_name, "tie_gate_up": cfg.tie_gate_up,
                "model": cfg.model, "attention": None if attn is None else attn.to_dict()}
        if any(c.quantizes_acts for c in choices):  # what reloading needs to reproduce the activations
            meta["act_quant"] = {"scheme": "per-token symmetric", "clip": cfg.act_clip}
        if cfg.target != "none":
            meta["target"] = cfg.target
        if self.rotation is not None:  # the plan's units are the rotated model's
            meta["rotation"] = self.rotation.to_dict()
        if cfg.solver_name == "lagrangian":  # greedy fill (moebits) or bisection only (Algorithm 1)
            meta["fill"] = cfg.fill
        if cfg.budget_request()[0] == "wbits":  # no budget: the user fixed the code width
            choice = Choice(cfg.wbits, cfg.group_size, cfg.quantizer, act_bits=cfg.abits or 16)
            plan = Plan.uniform(self.units, self.shapes, choice, {**meta, "solver": "wbits",
                                                                  "budget": {"wbits": cfg.wbits}})
            plan.meta["avg_bits"] = plan.avg_bits(self.shapes)
            self.results["allocate_seconds"] = 0.0
            self._note(f"--wbits {cfg.wbits}: {choice.label} for every unit, {plan.meta['avg_bits']:.4f} average "
                       "storage bits per weight (group metadata included)")
        else:
            budget = self.allocation_budget = self.budget(choices, table.frequency)
            options = {} if cfg.fill else {"fill": False}  # check_fri_options: only with lagrangian
            if cfg.solver_name == "rl":  # DMPQ's reward and state need more than the table and the budget
                from ..methods.dmpq import rl_solver_options

                options = rl_solver_options(self, choices, table, budget)
            plan = self.timed("allocate_seconds", lambda: plan_under_budget(
                table, budget, cfg.solver_name, groups=self.groups(), meta=meta, **options))
            if cfg.solver_name == "uniform":
                from ..allocate.uniform import explain

                column = choices.index(plan.choice(self.units[0]))
                plan.meta["note"] = explain(budget.cost, budget.total, choices, column,
                                            [self.shapes[u] for u in self.units], budget.describe)
                self._note(plan.meta["note"])
        if cfg.target == "vllm":  # --- serving target (issue 9): the plan must be servable
            from ..export.vllm_rules import vllm_problems

            problems = vllm_problems(plan, self.shapes)
            if problems:
                raise ValueError("--target vllm: this plan is not servable by vLLM: " + "; ".join(problems))
        plan.save(plan_p)
        self.run.record("plan.json")
        self._save_results()
        return plan

    def load_plan(self, plan_p: Path, choices: list[Choice], table: SensitivityTable) -> Plan:
        """The plan of an interrupted run, checked against the run's units, candidates, structure and budget."""
        from ..plan import check_loaded_plan

        plan = Plan.load(plan_p)
        if self.cfg.budget_request()[0] == "wbits":
            wb = Choice(self.cfg.wbits, self.cfg.group_size, self.cfg.quantizer, act_bits=self.cfg.abits or 16)
            check_loaded_plan(plan, plan_p, self.units, [wb])
        else:  # a latency-fri budget would be re-measured (noisy): its plan is checked without the budget
            budget = None if self.cfg.cost == "latency-fri" and self.cfg.latency is not None else \
                self.budget(choices, table.frequency)
            check_loaded_plan(plan, plan_p, self.units, choices, budget, self.groups())
        return plan

    def warn_seqlen(self) -> None:
        from ..data import seqlen_warnings

        for line in seqlen_warnings(self.model.config, calib_seqlen=self.cfg.calib_seqlen,
                                    eval_seqlen=self.cfg.eval_seqlen):
            log.warning(line)
            self._note(line)

    def _note(self, line: str) -> None:
        """A line the user should read (printed by the CLI, kept in results.json)."""
        log.info(line)
        notes = self.results.setdefault("notes", [])
        if line not in notes:
            notes.append(line)

    def quantize(self, plan: Plan) -> None:
        t0 = time.perf_counter()
        attn = self.cfg.attention_choice()
        hessians = None
        if attn is not None and attn.quantizer == "gptq":  # inputs of the unquantized model, like the experts'
            hessians = attention_hessians(self.adapter, self.windows, self.cfg.batch_size)
        self.codes = {} if self.cfg.save_model and self.cfg.save_format == "packed" else None
        if self.cfg.qat_steps > 0:  # fine-tune under the plan; leaves the model quantized by it (RTN grid)
            from ..qat import quantization_aware_training

            res = quantization_aware_training(self.adapter, plan, self.windows, self.cfg.qat_steps, self.cfg.qat_lr,
                                              seed=self.cfg.seed, progress=self.progress, codes=self.codes)
            self.results["qat"] = res.to_dict()
        else:
            apply_plan(self.adapter, plan, self.calib.inputs, self.cfg.act_order, self.progress, codes=self.codes)
        if attn is not None:
            quantize_attention(self.adapter, attn, hessians, self.cfg.act_order)
        self.install_act_quant(plan)
        self.results["quantize_seconds"] = round(time.perf_counter() - t0, 4)
        self._save_results()

    def install_act_quant(self, plan: Plan) -> None:
        """Quantize the input activations of the plan's W-A units in every later forward (quant/act.py)."""
        from ..models.act_quant import install_act_quant

        clip = (plan.meta.get("act_quant") or {}).get("clip", self.cfg.act_clip)
        n = install_act_quant(self.model, {u: a.choice.act_bits for u, a in plan.assignments.items()}, clip)
        if n:
            from ..budget import act_bits_average

            freq = self.calib.stats.aligned(self.units).frequency
            self.results["avg_act_bits"] = act_bits_average([plan.choice(u) for u in self.units],
                                                            [self.shapes[u] for u in self.units], freq)
            self.results["act_quant_units"] = n

    def save(self, plan: Plan) -> dict:
        """Save the quantized model under model/ (packed, or dequantized 16-bit); return the packed
        format's sizes (`model_bytes`, `expert_bytes`), also when it is not the format written."""
        from ..packed import packed_sizes, save_packed

        cfg, out = self.cfg, self.run.path("model")
        rotation = None if self.rotation is None else self.rotation.to_dict()
        if cfg.save_model and cfg.save_format == "packed":
            return save_packed(self.model, self.adapter, plan, self.codes, out, self.tokenizer, rotation=rotation)
        sizes = packed_sizes(self.model, self.adapter, plan)  # before save_quantized rounds the model to 16 bits
        if cfg.save_model:
            if self.rotation is not None and self.rotation.online_down:  # a plain HF checkpoint runs nothing online
                from ..rotate import fold_online

                fold_online(self.adapter)
            save_quantized(self.model, self.tokenizer, plan, out)
        return sizes

    def precheck_budget(self, choices: list[Choice]) -> None:
        """Fail before calibrating when a storage budget cannot be met (latency needs frequencies)."""
        if self.cfg.target == "vllm":  # --- serving target (issue 9): group size must divide every input width
            from ..export.vllm_rules import vllm_problems

            q = next(c for c in choices if not c.is_fp)
            problems = vllm_problems(Plan.uniform(self.units, self.shapes, q), self.shapes)
            if problems:
                raise ValueError(f"--target vllm cannot be met with --group-size {q.group_size}: {problems[0]}")
        if self.cfg.latency is not None or self.run.has("plan.json") or self.cfg.budget_request()[0] == "wbits":
            return
        self.budget(choices, None).check_feasible(self.cfg.solver_name, self.groups())

    # -- the whole job -------------------------------------------------------------------------
    def execute(self) -> dict:
        cfg = self.cfg
        if cfg.target == "llamacpp":  # --- serving target (issue 21): a ggml type per GGUF tensor
            from ..gguf.quantize import execute

            return execute(self)
        if self.finished():
            return self.results
        cfg.check_act_options()
        self.load()
        choices = candidate_choices(cfg, self.shapes)
        attn = cfg.attention_choice()
        if attn is not None:  # refuse an impossible attention setting before any work
            check_attention_choice(self.adapter, attn)
        self.precheck_budget(choices)
        self.calibrate()
        self.evaluate("ppl_fp")
        table = self.fill_table(choices)
        plan = self.allocate(choices, table)
        self.quantize(plan)
        self.results.pop("ppl_q", None)  # a quantized model is only ever evaluated right after quantizing
        self.evaluate("ppl_q")
        sizes = self.save(plan)
        unit_bits = plan.storage_bits(self.shapes)
        attn_size = attention_size(self.adapter, attn)
        params = sum(p.numel() for p in self.model.parameters())
        other = params - sum(a * b for a, b in self.shapes.values()) - attn_size.params
        model_bits = unit_bits + attn_size.storage_bits + 16 * other  # routers, norms, embeddings, biases: 16-bit
        self.results.update({
            "method": cfg.method, "quantizer": cfg.quantizer, "solver": plan.meta.get("solver"),
            "model": cfg.model, "budget": plan.meta.get("budget"),
            "avg_bits": plan.avg_bits(self.shapes), "weight_bytes": unit_bits / 8,
            # bytes of the packed checkpoint: every tensor, and the units' codes/scales/zeros/fp16 rows
            "model_bytes": sizes["model_bytes"], "expert_bytes": sizes["expert_bytes"],
            "model_format": (cfg.save_format if cfg.save_model else None),
            # what the units, attention at its setting (--attn-bits) and the 16-bit rest cost, counted exactly
            "attention": "fp16" if attn is None else attn.label, "attention_bytes": attn_size.storage_bits / 8,
            "model_counted_bytes": model_bits / 8, "model_avg_bits": model_bits / params,
            "bits_histogram": plan.bits_histogram(),
            "eval_seconds": self.results.get("ppl_fp_eval_seconds", 0) + self.results.get("ppl_q_eval_seconds", 0),
            "never_routed": len(self.calib.never_routed), "done": True,
        })
        for k in ("calibrate_seconds", "profile_seconds", "allocate_seconds", "quantize_seconds"):
            self.results.setdefault(k, 0.0)
        self._save_results()
        return self.results

    def _save_results(self) -> None:
        atomic_write_json(self.run.path("results.json"), self.results)
        self.run.record("results.json")

    def finished(self) -> bool:
        """A done run whose saved model is still there (a deleted model/ is re-quantized on resume)."""
        if not self.results.get("done"):
            return False
        self.run.verify_all()  # a done run's cached files: as written, or refused by name
        if self.results.get("model_format") and not (self.run.path("model") / "config.json").is_file():
            log.warning("%s: the run is done but its model/ is missing: quantizing again", self.run.root)
            self.results.pop("done")
            return False
        return True
