"""What one `moebits quantize` job is asked to do: `QuantizeConfig`, made of nine parts, one per concern.

Every option is declared once, as a field of its part, with its default, its help and (where the command
line spells it differently) how the CLI parses it:

    calib: str = option("demo", "calibration text: demo, a text file, or hf:NAME[:CONFIG]")

Everything else is derived from these declarations:
    - `moebits quantize`'s options (cli.py builds the command from `PARTS`, one help panel per part);
    - the `--config FILE` / `--recipe FILE` recipe: TOML or YAML with the same names, flat or grouped by
      part (`[fri]` / `fri:`), so a run is reproduced from one file (a run's `run.json` is one too);
    - run.json's spec (`spec()`): the options that define the result (not output or execution), those
      different from their defaults, and `version`. An old run directory is read by `upgrade_spec`, the one
      place that knows older versions (see SPEC_VERSION).

Each part checks its own values when it is built (`__post_init__`); `QuantizeConfig` then checks what
spans parts (e.g. `--holdout` needs the expert metric). Errors are ValueErrors naming the flag to change.
"""
from __future__ import annotations

import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..allocate import combine_groups, expert_level, layer_uniform, tie_gate_up
from ..allocate.groups import vllm_servable
from ..budget import Budget, budget_request
from ..units import ZERO_POINTS, Choice, Unit

GRANULARITIES = ("linear", "expert", "layer")
SAVE_FORMATS = ("packed", "dequantized")
TARGETS = ("none", "vllm", "llamacpp")
RL_ACCURACY = ("proxy", "measured")
RL_SENSITIVITY = ("table", "measured")
MODEL_HELP = "demo (the embedded demo MoE), tiny:<arch>, a local HF directory, or a hub name"


def option(default: Any, help: str = "", *, flags: tuple[str, ...] = (), parse: Callable[[str], Any] | None = None,
           cli_default: Any = MISSING, from_cli: Callable[[Any], Any] | None = None) -> Any:
    """A declared option: its default, its help, and for the CLI: extra flag spellings (`flags`), a parser
    of the text given (`parse`: comma lists), the default shown (`cli_default`) and how the parsed value
    maps onto the field (`from_cli`, e.g. 0 -> None)."""
    return field(default=default, metadata={"help": help, "flags": flags, "parse": parse, "cli_default": cli_default,
                                            "from_cli": from_cli})


def int_list(flag: str) -> Callable[[str], tuple[int, ...]]:
    def parse(text: str) -> tuple[int, ...]:
        if isinstance(text, (list, tuple)):
            text = ",".join(str(x) for x in text)
        try:
            return tuple(sorted({int(b) for b in str(text).split(",") if b.strip()}))
        except ValueError:
            raise ValueError(f"{flag} must be a comma list of integers, got {text!r}") from None
    return parse


def parse_reward(text) -> tuple[float, float, float, float]:
    if isinstance(text, (list, tuple)):
        text = ",".join(str(x) for x in text)
    try:
        w = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        w = ()
    if len(w) != 4 or not all(np.isfinite(w)):
        raise ValueError(f"--reward takes four numbers w_acc,w_lat,w_mem,w_eng (e.g. 1,0,0,0), got {text!r}")
    return w  # type: ignore[return-value]


def _zero_is_none(v):
    return v or None


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


def _choose(flag: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {flag} {value!r}; choose one of {', '.join(map(str, allowed))}")


# -- the parts ------------------------------------------------------------------------------------------

@dataclass
class DataOptions:
    """Model & data: what is quantized, on which text, in which windows."""
    model: str = option("demo", MODEL_HELP)
    dtype: str = option("auto", "auto | float32 | bfloat16 | float16")
    device: str = option("cpu", "cpu | cuda | cuda:N")
    trust_remote_code: bool = option(False, "run the model repository's own code (off: safetensors + transformers only)")
    calib: str = option("demo", "calibration text: demo, a text file, or hf:NAME[:CONFIG]")
    nsamples: int = option(128, "calibration windows")
    seqlen: int | None = option(None, "tokens per window, calibration and evaluation (default: the model's, "
                                      "min(2048, max positions); the demo 256)")
    calib_seqlen: int | None = option(None, "tokens per calibration window (default: --seqlen)")
    eval_seqlen: int | None = option(None, "tokens per evaluation window (default: --seqlen)")
    eval: str = option("demo", "evaluation text (held-out split for demo)", flags=("--eval",))
    eval_windows: int | None = option(None, "evaluate at most this many windows")
    batch_size: int = option(8, "windows per forward")
    max_tokens_per_expert: int | None = option(
        None, "routed inputs kept per expert to measure errors on (0: all of them; GPTQ Hessians always use all)",
        cli_default=0, from_cli=_zero_is_none)
    holdout: float = option(0.0, "measure each unit's error on this fraction of its routed tokens, held out of the "
                                 "Hessian its GPTQ is fitted with (expert metric)")
    seed: int = option(0, "seed of the calibration windows, samplers, rotations and solvers")

    def __post_init__(self):
        for name in ("nsamples", "batch_size"):  # option values no stage could use (issue 22)
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise ValueError(f"--eval-windows must be at least 1 (or left out: the whole text), got {self.eval_windows}")
        check_device(self.device)
        for name in ("calib_seqlen", "eval_seqlen", "seqlen"):
            v = getattr(self, name)
            if v is not None and v < 2:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 2 tokens, got {v}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"--holdout is the fraction of each expert's routed tokens held out, in [0, 1); "
                             f"got {self.holdout}")


@dataclass
class BudgetOptions:
    """Budget & choices: how much the quantized units may cost, and the settings they choose from."""
    quantizer: str = option("rtn", "rtn | gptq | hqq")
    bits: float | None = option(None, "budget: average storage bits per weight (3.25 = 3-bit g128)")
    memory_gb: float | None = option(None, "budget: GB of expert weights")
    latency: float | None = option(None, "budget: seconds per forward of the experts (roofline on --gpu)")
    wbits: int | None = option(None, "uniform only, instead of a budget: N-bit codes for every unit whatever they "
                                     "cost to store (as GPTQ's --wbits)")
    gpu: str = option("h100", "GPU of the roofline latency model: a100 | h100 | rtx4090")
    cost: str = option("roofline", "latency model for --latency: roofline (analytic, --gpu) | latency-fri (kernel "
                                   "latencies measured on this machine, FRI-interpolated)")
    batch_tokens: int = option(4096, "tokens per forward for the latency model")
    group_size: int = option(128, "weights per quantization group (one scale and zero each)")
    zero_points: str = option("packed", "how zero points are stored and charged: packed (rtn/gptq integer zeros at "
                                        "the code width, as GPTQ/AWQ/compressed-tensors store them; HQQ's real-valued "
                                        "ones in fp16) | fp16 (every zero in 16 bits: the papers' W3.25 = 3-bit g128)")
    candidate_bits: tuple[int, ...] = option((2, 3, 4, 8), "bit-widths the allocator may choose",
                                             parse=int_list("--candidate-bits"), cli_default="2,3,4,8")
    act_order: bool = option(False, "GPTQ: quantize columns by decreasing Hessian diagonal")
    target: str = option("none", "serving target the plan must fit: none | vllm (layer-uniform routed-expert bits "
                                 "from {4, 8}, rtn/gptq, servable by construction) | llamacpp (a ggml type per GGUF "
                                 "tensor, budget --bpw or --size-gb)")
    bpw: float | None = option(None, "--target llamacpp: bits per weight over the whole GGUF file (as llama.cpp "
                                     "reports it)")
    size_gb: float | None = option(None, "--target llamacpp: GGUF tensor data in GB (1e9 bytes)")
    gguf_types: str | None = option(None, "--target llamacpp: candidate ggml types (default Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,"
                                          "Q8_0; i-quants e.g. IQ2_XS,IQ3_S use the importance matrix)")

    def __post_init__(self):
        _choose("--target", self.target, TARGETS)
        _choose("--zero-points", self.zero_points, ZERO_POINTS)
        for name in ("group_size", "batch_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if not self.candidate_bits:
            raise ValueError("--candidate-bits is empty; give bit-widths such as 2,3,4,8")
        if self.wbits is not None:
            Choice(self.wbits, self.group_size, self.quantizer)  # validates the width
            if any(v is not None for v in (self.bits, self.memory_gb, self.latency)):
                raise ValueError("--wbits fixes the code width of every unit; give no budget (--bits, --memory-gb, "
                                 "--latency) with it")


@dataclass
class AllocationOptions:
    """Method: how the sensitivity table is filled and read (the method, its metric, solver and structure)."""
    method: str = option("uniform", "uniform | freq | mxmoe | fri | rl | bt (see `moebits.methods`)")
    metric: str = option("expert", "profiling metric: expert (exact, fast) | layer (MxMoE's rerun)")
    solver: str | None = option(None, "ilp | lagrangian | freq | uniform | rl (default: the method's)")
    granularity: str | None = option(None, "linear (per block) | expert | layer (default: the method's, linear "
                                           "for the built-in ones)")
    tie_gate_up: bool = option(False, "gate and up of an expert share one choice")
    ilp_nodes: int = option(1000, "ilp solver: stop HiGHS's branch and bound after this many nodes and keep the best "
                                  "plan found; its proven gap goes to plan.json and the log (0: no limit, prove "
                                  "to 1e-4; deterministic, unlike a time limit)")
    fill: bool = option(True, "lagrangian solver: spend the budget bisection leaves unused on the best loss-per-bit "
                              "upgrades (moebits' improvement); --no-fill is Algorithm 1 exactly. Paper-faithful "
                              "FRI-MxMoE: --method fri --sampler stratified --predictor fri --no-proxy --solver "
                              "lagrangian --no-fill")

    def __post_init__(self):
        from ..methods import get_method

        get_method(self.method)  # "unknown method ...; choose one of ..."
        if self.ilp_nodes < 0:
            raise ValueError(f"--ilp-nodes must be >= 0 (0: no limit), got {self.ilp_nodes}")
        if self.granularity is not None:
            _choose("granularity", self.granularity, GRANULARITIES)


@dataclass
class FRIOptions:
    """FRI: the rule budget, which pairs are profiled, and what predicts the rest (method fri)."""
    DEFAULT_ANCHORS = 0.15  # rule budget when neither --anchors nor --rules is given (results/fri_rules.md)

    anchors: float | None = option(None, "fri: rule budget as a fraction of the units (x quantized bit-widths = "
                                         "profiled pairs); default 0.15; not with --rules")
    rules: int | None = option(None, "fri: rule budget in profiled (unit, bit-width) pairs, the paper's rule-base "
                                     "size: constant as experts grow; not with --anchors")
    sampler: str = option("adaptive", "fri: adaptive (stratified start, then the pairs most uncertain and nearest "
                                      "the allocation's decision boundary; moebits; the default in memory) | "
                                      "stratified (the paper's depth-adaptive anchor experts; the default when "
                                      "streaming) | random", cli_default=None)
    predictor: str = option("ridge", "fri: ridge (log error; moebits' default) | fri (the paper's fuzzy rule "
                                     "interpolation) | knn | gbm | mlp")
    proxy: bool = option(True, "fri: add the RTN weight-space error proxy as a feature (moebits; the default in "
                               "memory) | --no-proxy: Table 7's features only (the default when streaming)",
                         cli_default=None)
    acquisition: str = option("expert", "fri, adaptive sampler: expert (default: whole-expert rounds, each "
                                        "expert's best pair per unit, after a start of half the budget: about 40 % "
                                        "fewer experts' forwards at the same rule budget) | score (rank pairs by "
                                        "score; the default before 0.3) | per-cost (experiment: score / (pair cost "
                                        "+ the expert's overhead if untouched)); results/fri_acquisition.md")

    def __post_init__(self):
        from ..methods.fri.adaptive import ACQUISITIONS
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
        if self.acquisition not in ACQUISITIONS:
            raise ValueError(f"unknown --acquisition {self.acquisition!r}; choose one of {ACQUISITIONS} "
                             "(per-cost needs --sampler adaptive)")

    def rule_budget(self, n_units: int, n_quantized_choices: int) -> int:
        """Profiled (unit, choice) pairs allowed: --rules, else --anchors (default 0.15) x units x choices."""
        if self.rules is not None:
            return int(self.rules)
        fraction = self.DEFAULT_ANCHORS if self.anchors is None else self.anchors
        return int(math.floor(fraction * n_units + 1e-9)) * int(n_quantized_choices)


@dataclass
class BTOptions:
    """BT: the (bits, rank) choices of BT-MoE (method bt)."""
    bits_set: tuple[int, ...] | None = option(None, "bt: bit-widths of the (bits, rank) choices (default 2,3,4)",
                                              parse=int_list("--bits-set"))
    ranks: tuple[int, ...] | None = option(None, "bt: compensator ranks (default 0,w/32,w/16,w/8,w/4 of the expert "
                                                 "width w)", parse=int_list("--ranks"))

    def __post_init__(self):
        pass  # ranks are checked against the model's widths (methods/bt.py)


@dataclass
class RLOptions:
    """RL: DMPQ's policy and reward (method/solver rl), and quantization-aware training (any method)."""
    rl_steps: int = option(20_000, "rl: PPO environment steps")
    reward: tuple[float, ...] = option((1.0, 0.0, 0.0, 0.0), "rl: w_acc,w_lat,w_mem,w_eng of R = w_acc·ΔAcc − "
                                       "w_lat·L − w_mem·M − w_eng·E (L, M, E relative to the all-16-bit plan)",
                                       parse=parse_reward, cli_default="1,0,0,0")
    rl_accuracy: str = option("proxy", "rl: ΔAcc from the profiled table (proxy, additive) or measured (NLL of the "
                                       "quantized model on held-out calibration windows)")
    rl_sensitivity: str = option("table", "rl: expert sensitivity s_e in the state: table | measured")
    energy: str = option("horowitz45nm", "rl: energy model of the reward: horowitz45nm | h100-tdp")
    qat_steps: int = option(0, "quantization-aware fine-tuning steps of the experts after allocation (STE, "
                               "calibration text only; 0 = post-training quantization)")
    qat_lr: float = option(1e-4, "QAT learning rate (Adam)")

    def __post_init__(self):
        self.reward = parse_reward(self.reward)
        if self.rl_accuracy not in RL_ACCURACY:
            raise ValueError(f"--rl-accuracy must be one of {RL_ACCURACY}, got {self.rl_accuracy!r}")
        if self.rl_sensitivity not in RL_SENSITIVITY:
            raise ValueError(f"--rl-sensitivity must be one of {RL_SENSITIVITY}, got {self.rl_sensitivity!r}")


@dataclass
class ActivationOptions:
    """Activations, rotation and attention: what is quantized besides the experts' weights."""
    abits: int | None = option(None, "activation bits of every unit's input (per-token symmetric fake quant; e.g. "
                                     "--wbits 4 --abits 4 = W4A4); default 16 = none")
    abits_set: tuple[int, ...] | None = option(None, "mxmoe/fri: activation widths the allocator may choose per "
                                                     "unit, jointly with the weight bits (e.g. 4,5,8; exact ILP)",
                                               parse=int_list("--abits-set"))
    abits_budget: float | None = option(None, "with --abits-set: average activation bits, weighted by each unit's "
                                              "MACs per token (default: = --bits)")
    act_clip: float = option(1.0, "clipping ratio of activation quantization (QuaRot uses 0.9)")
    rotate: str | None = option(None, "rotate the model before calibrating, function unchanged (GPTQ* with "
                                      "--quantizer gptq): hadamard (random Hadamard on the residual stream + online "
                                      "Hadamard before every down projection, QuaRot) | hadamard-offline (residual "
                                      "stream only, nothing run online; exportable to compressed-tensors); seeded by "
                                      "--seed")
    attn_bits: int | None = option(None, "quantize attention projections to this many bits with --quantizer "
                                         "(default: attention untouched, 16-bit)")
    attn_rank: int = option(0, "low-rank compensator rank for the attention projections")

    def __post_init__(self):
        from ..quant.act import check_act_bits

        if self.abits is not None and self.abits_set is not None:
            raise ValueError("--abits fixes every unit's activation bits, --abits-set lets the allocator choose: "
                             "give one of them")
        for a in ([self.abits] if self.abits is not None else []) + list(self.abits_set or ()):
            check_act_bits(a)
        if self.abits_budget is not None and self.abits_set is None:
            raise ValueError("--abits-budget bounds a joint weight/activation allocation: give --abits-set too")
        if not 0.0 < self.act_clip <= 1.0:
            raise ValueError(f"--act-clip must be in (0, 1], got {self.act_clip}")
        if self.rotate is not None:
            from ..rotate import ROTATIONS

            if self.rotate not in ROTATIONS:
                raise ValueError(f"unknown --rotate {self.rotate!r}; choose one of {', '.join(ROTATIONS)}")
        if self.attn_bits is None and self.attn_rank:
            raise ValueError("--attn-rank needs --attn-bits (a compensator corrects quantized attention)")


@dataclass
class OutputOptions:
    """Output: what is written besides the run's artefacts (does not make a run different)."""
    save_model: bool = option(True, "save the quantized model under OUT/model")
    save_format: str = option("packed", "packed (real low-bit moebits format, loads with `import moebits` + "
                                        "from_pretrained) | dequantized (16-bit weights)")

    def __post_init__(self):
        if self.save_format not in SAVE_FORMATS:
            raise ValueError(f"unknown save format {self.save_format!r}; choose one of {', '.join(SAVE_FORMATS)}")


@dataclass
class ExecutionOptions:
    """Execution: where and how the job runs (does not make a run different)."""
    stream: bool | None = option(None, "layer by layer from the safetensors shards, one decoder layer in memory at "
                                       "a time (default: when the model does not fit in memory)")
    workers: int = option(1, "run pass 1 of the streaming path (calibration + profiling, per layer) as Ray tasks, "
                             "at most N at once; > 1 implies --stream (refused with --no-stream); needs pip install "
                             "'moebits[ray]'")
    ray_address: str | None = option(None, "join an existing Ray cluster (HEAD:6379, ray://HEAD:10001, or auto) "
                                           "instead of starting a local one (local: start one even with --workers "
                                           "1); implies --stream")
    worker_threads: int = option(1, "torch threads (and Ray CPUs) per Ray task")

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")


# part name -> (class, title of its help panel, whether its options define the result: in run.json's spec)
PARTS: dict[str, tuple[type, str, bool]] = {
    "data": (DataOptions, "Model & data", True),
    "budget": (BudgetOptions, "Budget & choices", True),
    "allocation": (AllocationOptions, "Method", True),
    "fri": (FRIOptions, "FRI", True),
    "bt": (BTOptions, "BT", True),
    "rl": (RLOptions, "RL & QAT", True),
    "activations": (ActivationOptions, "Activations, rotation, attention", True),
    "output": (OutputOptions, "Output", False),
    "execution": (ExecutionOptions, "Execution", False),
}
OWNER: dict[str, str] = {f.name: part for part, (cls, _, _) in PARTS.items() for f in fields(cls)}
TUPLE_OPTIONS = tuple(n for n, part in OWNER.items() for f in fields(PARTS[part][0]) if f.name == n
                      and "tuple" in str(f.type))


def declared_options() -> list[tuple[str, Any, str]]:
    """(part name, dataclass field, resolved type) of every option, in declaration order."""
    out = []
    for part, (cls, _, _) in PARTS.items():
        hints = typing.get_type_hints(cls)
        out += [(part, f, hints[f.name]) for f in fields(cls)]
    return out


class QuantizeConfig:
    """The options of one quantize job, by part (`cfg.fri.sampler`); every option can also be read and set
    by its own name (`cfg.sampler`), and `QuantizeConfig(sampler="random", bits=3.0)` routes each keyword to
    its part. Built parts are checked; `check()` re-checks after options are set one by one."""

    def __init__(self, **options):
        unknown = sorted(set(options) - set(OWNER))
        if unknown:
            raise TypeError(f"QuantizeConfig got unknown options {unknown}")
        by_part: dict[str, dict] = {p: {} for p in PARTS}
        for k, v in options.items():
            if k in TUPLE_OPTIONS and isinstance(v, list):
                v = tuple(v)
            by_part[OWNER[k]][k] = v
        for part, (cls, _, _) in PARTS.items():
            object.__setattr__(self, part, cls(**by_part[part]))
        self.check()

    # flat access: `cfg.bits` is `cfg.budget.bits`
    def __getattr__(self, name: str):
        part = OWNER.get(name)
        if part is None:
            raise AttributeError(f"QuantizeConfig has no option {name!r}")
        return getattr(object.__getattribute__(self, part), name)

    def __setattr__(self, name: str, value) -> None:
        part = OWNER.get(name)
        if part is None:
            raise AttributeError(f"QuantizeConfig has no option {name!r}")
        setattr(getattr(self, part), name, value)

    def __eq__(self, other) -> bool:
        return isinstance(other, QuantizeConfig) and self.options() == other.options()

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.options().items() if v != _default(k)}
        return f"QuantizeConfig({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    def options(self) -> dict:
        """Every option by name."""
        return {k: getattr(getattr(self, OWNER[k]), k) for k in OWNER}

    def replace(self, **changes) -> "QuantizeConfig":
        return QuantizeConfig(**{**self.options(), **changes})

    def check(self) -> None:
        """The parts' own checks (again) and what spans parts."""
        for part in PARTS:
            getattr(self, part).__post_init__()
        if self.holdout > 0 and self.metric != "expert":
            raise ValueError("--holdout measures a unit's error on its held-out routed tokens, which the expert "
                             f"metric does; the {self.metric} metric re-runs every token: use --metric expert")
        if self.target != "llamacpp" and (self.bpw is not None or self.size_gb is not None):
            raise ValueError("--bpw / --size-gb budget a GGUF file: use them with --target llamacpp")
        if self.target == "llamacpp":  # what a ggml-type allocation takes (gguf/quantize.py)
            from ..gguf.quantize import check_config

            check_config(self)
        if self.wbits is not None and self.method != "uniform":
            raise ValueError(f"--wbits sets one code width for every unit (method uniform); method "
                             f"{self.method!r} needs a budget: --bits, --memory-gb or --latency")
        if not self.fill and self.solver_name != "lagrangian":
            raise ValueError(f"--no-fill switches off the lagrangian solver's greedy fill; solver "
                             f"{self.solver_name!r} has none (use --solver lagrangian)")
        if self.abits_set is not None and self.method in ("uniform", "freq"):
            raise ValueError(f"method {self.method!r} does not profile, so it cannot choose activation bits; "
                             "use --abits for one width, or --method mxmoe|fri with --abits-set")
        if self.act_budget() is not None and self.solver not in (None, "ilp"):
            raise ValueError(f"a joint weight/activation allocation (--abits-set) has two budgets; solver "
                             f"{self.solver!r} takes one: use --solver ilp (the default then)")
        if (self.abits is not None or self.abits_set) and self.save_model and self.save_format == "dequantized":
            raise ValueError("a dequantized 16-bit checkpoint cannot carry activation quantization (transformers "
                             "would load it without); save --save-format packed, which records it")

    # -- run.json ----------------------------------------------------------------------------------
    def spec(self) -> dict:
        """run.json's request: `version` and every result-defining option that differs from its default
        (lists for tuples); one `seqlen` when the calibration and evaluation windows are equal."""
        d = {k: v for k, v in self.options().items() if PARTS[OWNER[k]][2]}
        if d["calib_seqlen"] is not None and d["calib_seqlen"] == d["eval_seqlen"]:
            d["seqlen"] = d["calib_seqlen"]
        if d["seqlen"] is not None and d["calib_seqlen"] in (None, d["seqlen"]) and d["eval_seqlen"] in (None, d["seqlen"]):
            d["calib_seqlen"] = d["eval_seqlen"] = None
        else:
            d["seqlen"] = None
        out = {"version": SPEC_VERSION}
        out.update({k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if v != _default(k)})
        return out

    @classmethod
    def from_spec(cls, spec: dict) -> "QuantizeConfig":
        return cls(**{k: v for k, v in upgrade_spec(spec).items() if k != "version"})

    # -- derived ------------------------------------------------------------------------------------
    def resolve_seqlens(self) -> None:
        """Fill `calib_seqlen` and `eval_seqlen`: each as given, else `seqlen`, else the model's default
        (min(2048, max positions); the demo 256). `seqlen` then holds the length when both are equal."""
        if self.calib_seqlen is None or self.eval_seqlen is None:
            from ..data import default_seqlen

            base = self.seqlen if self.seqlen is not None else default_seqlen(self.model, self.trust_remote_code)
            self.calib_seqlen = self.calib_seqlen if self.calib_seqlen is not None else base
            self.eval_seqlen = self.eval_seqlen if self.eval_seqlen is not None else base
        self.data.__post_init__()
        self.seqlen = self.calib_seqlen if self.calib_seqlen == self.eval_seqlen else None

    def budget_request(self) -> tuple[str, float]:
        """(kind, value) of the one budget, or ("wbits", N)."""
        if self.target == "llamacpp":  # a budget over the whole GGUF file (gguf/target.py)
            from ..gguf.target import file_budget

            b = file_budget(self.bpw, self.size_gb)
            return b.kind, b.value
        if self.wbits is not None:
            return "wbits", float(self.wbits)
        return budget_request(self.bits, self.memory_gb, self.latency)

    def rule_budget(self, n_units: int, n_quantized_choices: int) -> int:
        return self.fri.rule_budget(n_units, n_quantized_choices)

    @property
    def solver_name(self) -> str:
        from ..methods import get_method

        if self.solver is None and self.act_budget() is not None:
            return "ilp"  # the only solver with a second (activation-bits) constraint; see allocate/__init__.py
        return self.solver or get_method(self.method).solver

    def act_budget(self) -> float | None:
        """The average-activation-bits budget of a joint W/A allocation (None: no such constraint)."""
        if self.abits_set is None:
            return None
        if self.abits_budget is not None:
            return float(self.abits_budget)
        return float(self.bits) if self.bits is not None else None

    @property
    def granularity_name(self) -> str:
        from ..methods import get_method

        return self.granularity or get_method(self.method).granularity or "linear"

    def attention_choice(self) -> Choice | None:
        """The fixed setting of the attention projections (`--attn-bits`, `--attn-rank`), None = untouched."""
        if self.attn_bits is None:
            return None
        return Choice(self.attn_bits, self.group_size, self.quantizer, rank=self.attn_rank)


def _default(name: str):
    f = next(f for f in fields(PARTS[OWNER[name]][0]) if f.name == name)
    return f.default


# -- old run directories: the one place that knows earlier versions of run.json -----------------------
SPEC_VERSION = 4
# version 1 (run.json without "version", moebits up to issue 23): every option but the output ones, and
# options added later omitted at their defaults -- i.e. a subset of version 2's options, with no option
# whose meaning or default has changed since. So version 1 reads as version 2 as it is.
# version 2 -> 3 (issue 25): `zero_points` appeared with the default "packed" (integer zeros stored and
# charged at the code width); every earlier run stored and charged fp16 zeros, so it reads as "fp16".
# version 3 -> 4 (issue 25): FRI's `acquisition` default became "expert" (whole-expert rounds); an FRI run
# that left it at its default sampled with "score", so it reads as "score" (other methods never read it).
_UPGRADES: dict[int, Callable[[dict], dict]] = {1: lambda spec: spec,
                                                2: lambda spec: {"zero_points": "fp16", **spec},
                                                3: lambda spec: ({"acquisition": "score", **spec}
                                                                 if spec.get("method", _default("method")) == "fri"
                                                                 else spec)}


class SpecVersionError(ValueError):
    pass


def upgrade_spec(spec: dict) -> dict:
    """A run.json spec of any known version, as this version's options (unknown versions or options refused)."""
    if not isinstance(spec, dict):
        raise SpecVersionError("run.json does not hold a request (expected a JSON object)")
    spec = dict(spec)
    version = spec.pop("version", 1)
    if not isinstance(version, int) or version > SPEC_VERSION or version < 1:
        raise SpecVersionError(f"run.json has version {version!r}; this moebits reads versions 1 to {SPEC_VERSION} "
                               "(made by a newer moebits? upgrade moebits, or start a new run directory)")
    for v in range(version, SPEC_VERSION):
        spec = _UPGRADES[v](spec)
    unknown = sorted(k for k in spec if k not in OWNER or not PARTS[OWNER[k]][2])
    if unknown:
        raise SpecVersionError(f"run.json (version {version}) has options this moebits does not know: {unknown}")
    return spec


def full_spec(spec: dict) -> dict:
    """A run.json spec of any known version as every result-defining option of this version (defaults filled)."""
    s = upgrade_spec(spec)
    return {k: _norm(s.get(k, _default(k))) for k in OWNER if PARTS[OWNER[k]][2]}


def same_request(old: dict, new: dict) -> bool:
    """Two run.json specs ask for the same result (each read at this version, defaults filled in)."""
    try:
        return full_spec(old) == full_spec(new)
    except SpecVersionError:
        return False


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


# -- recipes ------------------------------------------------------------------------------------------
def read_recipe(path: str | Path) -> dict:
    """The options of a recipe file: TOML (.toml) or YAML (.yaml/.yml), flat (`bits = 3.25`) or grouped by
    part (`[fri]` / `fri:`), with the options' own names; a run's run.json is one too (JSON)."""
    import json

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError("a YAML recipe needs PyYAML (pip install pyyaml), or write it as TOML") from None
        data = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"recipe {path}: use .toml, .yaml/.yml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must hold a table of options")
    flat: dict = {}
    for k, v in data.items():
        key = k.replace("-", "_")
        if key in PARTS and isinstance(v, dict):
            for kk, vv in v.items():
                kk = kk.replace("-", "_")
                if OWNER.get(kk) != key:
                    raise ValueError(f"recipe {path}: [{key}] has no option {kk!r}"
                                     + (f" (it belongs to [{OWNER[kk]}])" if kk in OWNER else ""))
                flat[kk] = vv
        elif key == "version":
            flat = {**upgrade_spec({"version": v}), **flat}
        elif key in OWNER:
            flat[key] = v
        else:
            raise ValueError(f"recipe {path}: unknown option {k!r}")
    for k, v in list(flat.items()):
        parse = next(f for _, f, _ in declared_options() if f.name == k).metadata["parse"]
        if parse is not None and v is not None:
            flat[k] = parse(v)
    return flat


# -- what follows from the config before any model is touched ----------------------------------------
def candidate_choices(cfg: QuantizeConfig, shapes: dict | None = None) -> list[Choice]:
    from ..methods import get_method

    choices = get_method(cfg.method).choices(cfg, shapes)
    if cfg.target == "vllm":  # vLLM serves 4/8-bit integer-zero group-wise schemes only
        from ..export.vllm_rules import vllm_choices

        choices = vllm_choices(choices)
    return with_act_bits(cfg, choices)


def with_act_bits(cfg: QuantizeConfig, choices: list[Choice]) -> list[Choice]:
    """`--abits A`: every candidate at A activation bits; `--abits-set`: every candidate x every width."""
    from dataclasses import replace

    if cfg.abits is not None:
        return [replace(c, act_bits=cfg.abits) for c in choices]
    if cfg.abits_set:
        return [replace(c, act_bits=a) for c in choices for a in sorted(set(cfg.abits_set))]
    return choices


def make_budget(cfg: QuantizeConfig, units: list[Unit], shapes: dict, choices: list[Choice],
                freq: np.ndarray | None) -> Budget:
    kind, value = cfg.budget_request()
    budget = Budget.build(kind, value, units, shapes, choices, freq, gpu=cfg.gpu, batch_tokens=cfg.batch_tokens,
                          latency_model=cfg.cost, seed=cfg.seed, device=cfg.device, zero_points=cfg.zero_points)
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
