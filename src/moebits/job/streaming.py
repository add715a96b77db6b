"""`StreamPipeline`: the quantize job of `in_memory.Pipeline`, layer by layer, for models beyond memory.

The stages and artefacts are the in-memory pipeline's (stats.json, table.csv, plan.json, model/,
results.json), and from the table on the code is the same (`allocate.plan_under_budget` on the
assembled table). What changes is how the model is touched:

    pass 1   for each decoder layer: materialise it, run it on the calibration (and evaluation) windows'
             fp hidden states, collect its statistics, profile the units of it the method measures,
             save LAYER results, carry its outputs to the next layer, drop it.
    (global) join the layers' statistics; the method fills the table from the measured entries
             (FRI fits and predicts); one budget, one allocation for all layers.
    pass 2   for each decoder layer: materialise it, quantize it by the plan (GPTQ on inputs from the
             quantized layers below), write it as a part of the packed checkpoint, carry its outputs
             (calibration and evaluation windows) to the next layer, drop it.

Which units pass 1 profiles is the method's first request (`Method.requests`, asked before pass 1 with a
context that has no statistics yet); after pass 1, `measure` answers it from the per-layer results and the
method completes the table as in memory. A method that asks for a second round of measurements (FRI's
adaptive sampler) is refused: each round would need another pass over the layers.

Work files live in OUT/stream/: `pass1/L{i}.json` (one per finished layer), the hidden states entering
the next unfinished layer (`*.L{i}.safetensors`), and OUT/model.layers/ (finished pass-2 layers).
Each is written atomically after the layer's outputs, so a rerun resumes at the first unfinished layer
of the unfinished pass. Peak memory: one decoder layer's weights (+ its Hessians), the embeddings and
head, and the hidden states of the windows; not the number of layers.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import torch

from ..calibrate import Calibration
from ..data import calibration_windows
from ..models.lazy import LazyModel, open_source
from ..models.loading import resolve_dtype
from ..packed.incremental import PackedLayerWriter
from ..plan import Plan
from ..stream.forward import BatchedWindows, HiddenStore, batch_nll, forward_layer
from ..stream.layer_pass import LayerPass1, Pass1Job, pass1_layer, pass2_layer
from ..table import SensitivityTable
from ..units import Choice, Unit
from ..methods import Context
from .config import candidate_choices
from .in_memory import Pipeline

log = logging.getLogger(__name__)


class StreamingUnsupported(ValueError):
    pass


class StreamPipeline(Pipeline):
    """`Pipeline` with the model opened lazily and the passes run layer by layer (see the module doc).
    `on_layer(pass_name, layer)` is called after each finished layer (tests interrupt runs with it)."""

    def __init__(self, cfg, out, overwrite: bool = False, progress: bool = True, reason: str = "--stream"):
        super().__init__(cfg, out, overwrite=overwrite, progress=progress)
        self._check_supported()
        self.reason = reason
        self.on_layer = None
        self.computed: dict[str, list[int]] = {"pass1": [], "pass2": []}  # layers computed by this process

    def _check_supported(self) -> None:
        cfg = self.cfg
        problems = []
        if cfg.attn_bits is not None:
            problems.append("--attn-bits (attention quantization)")
        if getattr(cfg, "abits", None) is not None or getattr(cfg, "abits_set", None):
            problems.append("--abits / --abits-set (activation quantization)")
        if cfg.method == "fri" and (getattr(cfg, "sampler", "stratified") == "adaptive" or getattr(cfg, "proxy", False)):
            problems.append("FRI's adaptive sampler and RTN proxy (rounds of measurements across all layers; stream "
                            "FRI with --sampler stratified --no-proxy)")
        if getattr(cfg, "rotate", None):
            problems.append("--rotate (the rotation is applied to the whole model in memory)")
        if cfg.qat_steps:
            problems.append("--qat-steps (quantization-aware training)")
        if cfg.solver_name == "rl":
            problems.append("the rl solver / method (DMPQ: its reward runs the whole model)")
        if cfg.metric != "expert" and self.method.profiles:
            problems.append(f"--metric {cfg.metric} (streaming profiles with the expert metric)")
        if cfg.save_format != "packed":
            problems.append(f"--save-format {cfg.save_format} (streaming writes the packed format)")
        if problems:
            raise StreamingUnsupported("the streaming path does not support " + "; ".join(problems) +
                                       "; run without --stream on a machine that holds the model")

    # -- the model ------------------------------------------------------------------------------
    def load(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        source, self.tokenizer, in_memory = open_source(cfg.model, cfg.trust_remote_code, seed=cfg.seed)
        self.lazy = LazyModel(source, resolve_dtype(cfg.dtype, cfg.device), cfg.device, cfg.trust_remote_code)
        self.model, self.adapter = self.lazy.model, self.lazy.adapter
        self.generation_config = None
        if hasattr(source, "directory") and (Path(source.directory) / "generation_config.json").exists():
            from transformers import GenerationConfig

            self.generation_config = GenerationConfig.from_pretrained(str(source.directory))
        self.units = self.adapter.units()
        self.shapes = self.adapter.shapes()
        self.warn_seqlen()
        self.work = self.run.path("stream")
        self._note(f"streaming layer by layer ({self.reason}): {self.lazy.num_layers} decoder layers, one "
                   f"materialised at a time (largest {max(self.lazy.layer_bytes(l) for l in range(self.lazy.num_layers)) / 2**20:.1f} "
                   f"MiB), embeddings/head {self.lazy.materialised().bytes / 2**20:.1f} MiB")

    def _layer_done(self, pass_name: str, layer: int) -> None:
        self.computed[pass_name].append(layer)
        self.results.setdefault("stream", {}).setdefault(f"{pass_name}_layer_seconds", {})[str(layer)] = \
            round(self._layer_t, 4)
        self.results["stream"]["peak_materialised_bytes"] = max(
            self.results["stream"].get("peak_materialised_bytes", 0), self.lazy.peak_materialised)
        self._save_results()
        if self.on_layer is not None:
            self.on_layer(pass_name, layer)

    def _eval_windows(self) -> torch.Tensor:
        """The windows `evaluate.perplexity` cuts from the evaluation text."""
        ids = self.eval_tokens().reshape(-1)
        seqlen = getattr(self.cfg, "eval_seqlen", None) or self.cfg.seqlen
        n = ids.numel() // seqlen
        if self.cfg.eval_windows is not None:
            n = min(n, self.cfg.eval_windows)
        if n == 0:
            raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                             "use a longer text or a smaller --seqlen")
        return ids[: n * seqlen].view(n, seqlen)

    def _batches(self):
        if not hasattr(self, "_calib_b"):
            self._calib_b = BatchedWindows(self.lazy, self.windows, self.cfg.batch_size)
            self._eval_b = BatchedWindows(self.lazy, self._eval_windows(), self.cfg.batch_size)
        return self._calib_b, self._eval_b

    # -- pass 1 ----------------------------------------------------------------------------------
    def _pass1_job(self, choices: list[Choice]) -> Pass1Job:
        """Pass 1 measures the method's first request (asked now, before any statistics exist)."""
        cfg = self.cfg
        ctx = Context(cfg, self.units, self.shapes, list(choices), results=self.results)
        self._requests = iter(self.method.requests(ctx, SensitivityTable(self.units, list(choices))))
        self.first_request = req = next(self._requests, None)
        all_choices = list(req.choices) if req else choices
        return Pass1Job(units=list(req.units) if req else [], choices=all_choices, metric=cfg.metric,
                        whole_expert=req.whole_expert if req else False, act_order=cfg.act_order,
                        max_tokens_per_expert=cfg.max_tokens_per_expert, seed=cfg.seed,
                        hessians=any(c.quantizer == "gptq" and not c.is_fp for c in all_choices),
                        holdout=getattr(cfg, "holdout", 0.0), progress=False)

    def calibrate(self) -> Calibration:
        cfg = self.cfg
        self.windows = calibration_windows(self.tokenizer, cfg.calib, cfg.nsamples,
                                           getattr(cfg, "calib_seqlen", None) or cfg.seqlen, cfg.seed)
        choices = candidate_choices(cfg, self.shapes)
        self.job = self._pass1_job(choices)
        pass1_dir = self.work / "pass1"
        done = {l for l in range(self.lazy.num_layers) if (pass1_dir / f"L{l}.json").exists()}
        if len(done) < self.lazy.num_layers:
            self.timed("pass1_seconds", lambda: self._pass1(pass1_dir, done))
        self.layer_results = [LayerPass1.load(pass1_dir / f"L{l}.json") for l in range(self.lazy.num_layers)]
        cal = Calibration.from_layers([r.layer_calibration() for r in self.layer_results if r.total_tokens is not None])
        self.results["calibrate_seconds"] = round(sum(r.seconds for r in self.layer_results), 4)
        if "ppl_fp" not in self.results:
            self.results["ppl_fp"] = self._ppl(HiddenStore(self.work, "fp_eval"))
        if not Calibration.exists(self.run.root):
            cal.save(self.run.root)  # statistics; the inputs were dropped with their layers
        self.calib = cal
        self._save_results()
        return cal

    def _pass1(self, pass1_dir: Path, done: set[int]) -> None:
        lazy = self.lazy
        calib_b, eval_b = self._batches()
        hs_c, hs_e = HiddenStore(self.work, "fp_calib"), HiddenStore(self.work, "fp_eval")
        first = min(set(range(lazy.num_layers)) - done)
        if first == 0 and not hs_c.has(0):
            hs_c.save(0, calib_b.embeddings())
            hs_e.save(0, eval_b.embeddings())
        for layer in range(first, lazy.num_layers):
            if layer in done:
                continue
            t0 = time.perf_counter()
            with lazy.layer(layer):
                result, out_c = pass1_layer(lazy, layer, hs_c.path(layer), calib_b, self.job)
                out_e = forward_layer(lazy, layer, eval_b, hs_e.load(layer))
            hs_c.save(layer + 1, out_c)
            hs_e.save(layer + 1, out_e)
            result.save(pass1_dir / f"L{layer}.json")  # the marker: written after the next layer's inputs
            hs_c.drop(layer)
            hs_e.drop(layer)
            self._layer_t = time.perf_counter() - t0
            self._layer_done("pass1", layer)

    def _ppl(self, store: HiddenStore) -> float:
        """Perplexity from the hidden states leaving the last layer (final norm + lm_head per batch)."""
        _, eval_b = self._batches()
        nll, count = batch_nll(self.lazy, store.load(self.lazy.num_layers), eval_b)
        self.results["eval_tokens"], self.results["eval_windows"] = count, eval_b.windows.shape[0]
        return math.exp(nll / count)

    def evaluate(self, key: str) -> None:
        if key in self.results:
            return
        if key == "ppl_q":
            self.results[key] = self._ppl(HiddenStore(self.work, "q_eval"))
            self._save_results()
            return
        raise RuntimeError(f"streaming evaluates {key} inside its passes")

    def context(self, choices: list[Choice]) -> Context:
        """As in memory, without what needs the whole model (adapter, captured inputs, windows)."""
        ctx = super().context(choices)
        return Context(ctx.cfg, ctx.units, ctx.shapes, ctx.choices, stats=ctx.stats,
                       allocation_budget=ctx.allocation_budget, groups=ctx.groups, tokenizer=self.tokenizer,
                       results=self.results)

    def requests(self, ctx: Context, table: SensitivityTable):
        """The first request (measured in pass 1); a further one is refused (it would need another pass)."""
        if self.first_request is not None:
            yield self.first_request
        if next(self._requests, None) is not None:
            raise StreamingUnsupported(f"method {self.method.name!r} asks for another round of measurements after "
                                       "pass 1; the streaming path measures one request")

    def measure(self, request, table: SensitivityTable) -> None:
        """Fill `table` with what pass 1 measured (the request must be the one pass 1 was given)."""
        job = self.job
        if set(request.units) - set(job.units) or list(request.choices) != list(job.choices) or \
                request.whole_expert != job.whole_expert:
            raise RuntimeError("the method asked for measurements other than those pass 1 made")
        for r in self.layer_results:
            for name, c, err, sec in r.entries:
                table.set(Unit.parse(name), job.choices[c], err, seconds=sec, measured=True)
        self.results["profiled_units"] = len(request.units)
        self.results["profile_seconds"] = round(float(table.seconds.sum()), 4)

    # -- pass 2 ----------------------------------------------------------------------------------
    def quantize(self, plan: Plan) -> None:
        t0 = time.perf_counter()
        lazy, cfg = self.lazy, self.cfg
        calib_b, eval_b = self._batches()
        writer = self.writer = PackedLayerWriter(self.run.path("model"))
        hs_q, hs_e = HiddenStore(self.work, "q_calib"), HiddenStore(self.work, "q_eval")
        todo = [l for l in range(lazy.num_layers) if not writer.has(l)]
        if todo and todo[0] == 0 and not hs_q.has(0):
            hs_q.save(0, calib_b.embeddings())
            hs_e.save(0, eval_b.embeddings())
        for layer in todo:
            t1 = time.perf_counter()
            with lazy.layer(layer):
                codes, out_q = pass2_layer(lazy, layer, hs_q.path(layer), calib_b, plan, act_order=cfg.act_order,
                                           max_tokens_per_expert=cfg.max_tokens_per_expert, seed=cfg.seed)
                out_e = forward_layer(lazy, layer, eval_b, hs_e.load(layer))
                hs_q.save(layer + 1, out_q)
                hs_e.save(layer + 1, out_e)
                writer.write_layer(self.model, self.adapter, plan, codes, layer)  # the marker
            hs_q.drop(layer)
            hs_e.drop(layer)
            self._layer_t = time.perf_counter() - t1
            self._layer_done("pass2", layer)
        if not writer.has("rest"):
            writer.write_rest(self.model, self.adapter)
        self.results["quantize_seconds"] = round(time.perf_counter() - t0, 4)
        self._save_results()

    def save(self, plan: Plan) -> dict:
        sizes = self.writer.finish(self.model, self.adapter, plan, list(range(self.lazy.num_layers)), self.tokenizer,
                                   self.generation_config)
        if not self.cfg.save_model:
            shutil.rmtree(self.run.path("model"), ignore_errors=True)
        return sizes

    def execute(self) -> dict:
        if self.finished():
            return self.results
        results = super().execute()
        self.writer.cleanup()
        shutil.rmtree(self.work, ignore_errors=True)  # hidden states and per-layer results: the run is done
        results["stream"]["reason"] = self.reason
        self._save_results()
        return results
