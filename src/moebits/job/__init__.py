"""The quantize job: what is asked (`QuantizeConfig`), where its artefacts live (`rundir.Run`),
and who runs it (the executors):

    in_memory.py      `Pipeline`: the whole model in memory, stage by stage
    streaming.py      `StreamPipeline`: the same stages, one decoder layer in memory at a time
    ray_streaming.py  `RayStreamPipeline`: streaming, with pass 1 as Ray tasks per layer
    decide.py         does the model fit? (chooses between in-memory and streaming)

`start(cfg, out, ...)` picks the executor; `moebits quantize` parses its options and calls it.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .in_memory import Pipeline, QuantizeConfig, candidate_choices, make_budget, structure_groups
from .rundir import Run, RunMismatchError

__all__ = ["QuantizeConfig", "Pipeline", "Run", "RunMismatchError", "start", "candidate_choices", "make_budget",
           "structure_groups"]


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def start(cfg: QuantizeConfig, out: Path, overwrite: bool = False, stream: bool | None = None,
          fri_defaults: tuple[bool, bool] = (False, False), workers: int = 1, ray_address: str | None = None,
          worker_threads: int = 1) -> Pipeline:
    """The in-memory pipeline, or the streaming one when asked or when the model does not fit (logged);
    with --workers N > 1 or --ray-address, the streaming one with pass 1 on Ray.

    `fri_defaults`: whether --sampler / --proxy were left to their defaults. FRI's in-memory defaults
    (adaptive rounds across all layers, the RTN proxy) cannot stream; when the run streams, unset ones
    fall back to the streamable paper configuration (stratified, no proxy) instead of refusing the
    default command on exactly the models that need streaming. Set explicitly, they are refused."""
    from ..data import default_seqlen
    from ..models.loading import resolve_dtype
    from .decide import decide_stream
    from .ray_streaming import RayStreamPipeline
    from .streaming import StreamingUnsupported, StreamPipeline

    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if cfg.target == "llamacpp" and (workers > 1 or ray_address or stream):
        raise ValueError("--target llamacpp runs in memory; drop --stream / --workers / --ray-address")
    if workers > 1 or ray_address:
        flag = f"--workers {workers}" + (f" --ray-address {ray_address}" if ray_address else "")
        if stream is False:
            raise ValueError(f"{flag} runs pass 1 of the streaming path on Ray, layer by layer; drop --no-stream (or "
                             "run without --workers/--ray-address for the in-memory path)")
        _say(f"quantizing streaming layer by layer, pass 1 on Ray: {flag}")
        _fri_streaming_defaults(cfg, fri_defaults)
        try:
            return RayStreamPipeline(cfg, out, workers=workers, ray_address=ray_address,
                                     worker_threads=worker_threads, overwrite=overwrite, reason=flag)
        except StreamingUnsupported as e:
            raise StreamingUnsupported(f"{e} (--workers/--ray-address run on the streaming path)") from None

    decision = decide_stream(cfg.model, resolve_dtype(cfg.dtype, cfg.device), cfg.device, stream,
                             calib_tokens=cfg.nsamples * (cfg.calib_seqlen or cfg.seqlen or
                                                          default_seqlen(cfg.model, cfg.trust_remote_code)),
                             max_tokens_per_expert=cfg.max_tokens_per_expert)
    path = "streaming layer by layer" if decision.stream else "in memory"
    _say(f"quantizing {path}: {decision.reason}")
    if decision.stream and cfg.target == "llamacpp":
        raise ValueError(f"--target llamacpp runs in memory, and this model would stream ({decision.reason})")
    if decision.stream:
        _fri_streaming_defaults(cfg, fri_defaults)
        return StreamPipeline(cfg, out, overwrite=overwrite, reason=decision.reason)
    return Pipeline(cfg, out, overwrite=overwrite)


def _fri_streaming_defaults(cfg: QuantizeConfig, fri_defaults: tuple[bool, bool]) -> None:
    """FRI's unset --sampler / --proxy fall back to what streams (see `start`), said on stderr."""
    if cfg.method != "fri":
        return
    changed = []
    if fri_defaults[0] and cfg.sampler == "adaptive":
        cfg.sampler = "stratified"
        changed.append("--sampler stratified")
    if fri_defaults[1] and cfg.proxy:
        cfg.proxy = False
        changed.append("--no-proxy")
    if changed:
        _say(f"streaming FRI uses {' '.join(changed)} (the adaptive sampler's rounds and the RTN proxy "
             "need the whole model in memory)")
