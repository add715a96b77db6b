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

from .config import QuantizeConfig, candidate_choices, make_budget, structure_groups
from .in_memory import Pipeline
from .rundir import Run, RunMismatchError

__all__ = ["QuantizeConfig", "Pipeline", "Run", "RunMismatchError", "start", "candidate_choices", "make_budget",
           "structure_groups", "streaming_defaults"]


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def start(cfg: QuantizeConfig, out: str | Path, overwrite: bool = False, explicit: set[str] | None = None) -> Pipeline:
    """The executor of `cfg` in `out`: in memory, or streaming when asked (`--stream`) or when the model does
    not fit (logged); streaming with pass 1 on Ray with `--workers N > 1` or `--ray-address`.

    `explicit`: the options the user gave (None: all). FRI's in-memory defaults (adaptive rounds across all
    layers, the RTN proxy) cannot stream; when the run streams, a `sampler` / `proxy` left to its default
    becomes the streamable paper configuration (stratified, no proxy), said on stderr and recorded in
    run.json, instead of refusing the default command on exactly the models that need streaming. Given
    explicitly, they are refused."""
    from ..data import default_seqlen
    from ..models.loading import resolve_dtype
    from .decide import decide_stream
    from .ray_streaming import RayStreamPipeline
    from .streaming import StreamingUnsupported, StreamPipeline

    ex = cfg.execution
    if cfg.target == "llamacpp" and (ex.workers > 1 or ex.ray_address or ex.stream):
        raise ValueError("--target llamacpp runs in memory; drop --stream / --workers / --ray-address")
    if ex.workers > 1 or ex.ray_address:
        flag = f"--workers {ex.workers}" + (f" --ray-address {ex.ray_address}" if ex.ray_address else "")
        if ex.stream is False:
            raise ValueError(f"{flag} runs pass 1 of the streaming path on Ray, layer by layer; drop --no-stream (or "
                             "run without --workers/--ray-address for the in-memory path)")
        _say(f"quantizing streaming layer by layer, pass 1 on Ray: {flag}")
        try:
            return RayStreamPipeline(streaming_defaults(cfg, explicit), out, workers=ex.workers,
                                     ray_address=ex.ray_address, worker_threads=ex.worker_threads,
                                     overwrite=overwrite, reason=flag)
        except StreamingUnsupported as e:
            raise StreamingUnsupported(f"{e} (--workers/--ray-address run on the streaming path)") from None

    decision = decide_stream(cfg.model, resolve_dtype(cfg.dtype, cfg.device), cfg.device, ex.stream,
                             calib_tokens=cfg.nsamples * (cfg.calib_seqlen or cfg.seqlen or
                                                          default_seqlen(cfg.model, cfg.trust_remote_code)),
                             max_tokens_per_expert=cfg.max_tokens_per_expert)
    _say(f"quantizing {'streaming layer by layer' if decision.stream else 'in memory'}: {decision.reason}")
    if decision.stream and cfg.target == "llamacpp":
        raise ValueError(f"--target llamacpp runs in memory, and this model would stream ({decision.reason})")
    if decision.stream:
        return StreamPipeline(streaming_defaults(cfg, explicit), out, overwrite=overwrite, reason=decision.reason)
    return Pipeline(cfg, out, overwrite=overwrite)


def streaming_defaults(cfg: QuantizeConfig, explicit: set[str] | None) -> QuantizeConfig:
    """`cfg` with FRI's unset `sampler` / `proxy` at what streams (see `start`), said on stderr."""
    if cfg.method != "fri" or explicit is None:
        return cfg
    changes = {}
    if "sampler" not in explicit and cfg.sampler == "adaptive":
        changes["sampler"] = "stratified"
    if "proxy" not in explicit and cfg.proxy:
        changes["proxy"] = False
    if changes:
        said = " ".join("--sampler stratified" if k == "sampler" else "--no-proxy" for k in changes)
        _say(f"streaming FRI uses {said} (the adaptive sampler's rounds and the RTN proxy need the whole model in "
             "memory)")
    return cfg.replace(**changes)
