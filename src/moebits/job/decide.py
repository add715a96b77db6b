"""Does the model fit? The choice between the in-memory and the streaming path of `moebits quantize`.

The model's bytes are estimated from its checkpoint without loading it: every tensor's element count
(read from the safetensors headers) times the element size of the dtype it will be computed in. That
is compared with the memory available now (host: MemAvailable of /proc/meminfo; a CUDA device: its
free memory), keeping a margin for activations and the allocator.

The in-memory path also keeps every MoE layer's calibration inputs at once: each routed token's input
row (fp32) for the expert metric, and each expert's two Hessians. With all routed tokens kept (the
default) that can exceed the weights by far on a real model (DeepSeek-V2-Lite, 128 x 2048 tokens:
~8 GB of rows per MoE layer), while the streaming path holds one layer's. So the estimate adds
`calibration_bytes` when the calibration's size is known.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

FIT_MARGIN = 0.6  # the in-memory path may use at most this share of the available memory for the weights


@dataclass
class StreamDecision:
    stream: bool
    reason: str
    model_bytes: int | None = None
    available_bytes: int | None = None


def available_bytes(device: str = "cpu") -> int:
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def checkpoint_bytes(directory: str | Path, dtype: torch.dtype) -> int:
    """Bytes of a checkpoint's floating tensors in `dtype` (others as stored), from the safetensors headers."""
    from ..models.lazy import SafetensorsSource
    from ..packed.incremental import read_header

    src = SafetensorsSource(directory)
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for f in src.files:
        header, _ = read_header(f)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for s in info["shape"]:
                n *= s
            total += n * (size if info["dtype"] in ("F16", "BF16", "F32", "F64") else
                          (info["data_offsets"][1] - info["data_offsets"][0]) // max(n, 1))
    return total


def calibration_bytes(config, calib_tokens: int, max_tokens_per_expert: int | None = None) -> int:
    """Bytes the in-memory path keeps for a calibration of `calib_tokens` tokens: per MoE layer, the
    routed input rows in fp32 (top-k per token, all tokens for a shared expert; at most
    `max_tokens_per_expert` per expert when capped) and two fp32 Hessians per expert."""
    hidden = int(config.hidden_size)
    experts = int(next((getattr(config, a) for a in ("num_experts", "num_local_experts", "n_routed_experts")
                        if getattr(config, a, None)), 0))
    if not experts:
        return 0
    top_k = int(getattr(config, "num_experts_per_tok", 1) or 1)
    width = int(getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", hidden))
    shared = int(getattr(config, "n_shared_experts", 0) or 0) or int(bool(getattr(config, "shared_expert_intermediate_size", 0)))
    layers = int(config.num_hidden_layers) - int(getattr(config, "first_k_dense_replace", 0) or 0)
    routed_rows = calib_tokens * top_k
    if max_tokens_per_expert:
        routed_rows = min(routed_rows, experts * max_tokens_per_expert)
    shared_rows = calib_tokens if shared else 0
    rows = (routed_rows + shared_rows) * hidden * 4
    hessians = (experts + (1 if shared else 0)) * (hidden * hidden + width * width) * 4
    return layers * (rows + hessians)


def decide_stream(model: str, dtype: torch.dtype, device: str, force: bool | None, calib_tokens: int | None = None,
                  max_tokens_per_expert: int | None = None) -> StreamDecision:
    """`force` True/False: the user's `--stream` / `--no-stream`; None: stream when the model, with the
    calibration inputs of `calib_tokens` tokens (when given), does not fit."""
    if force is True:
        return StreamDecision(True, "--stream")
    if force is False:
        return StreamDecision(False, "--no-stream")
    if model.startswith("tiny:"):
        return StreamDecision(False, "a tiny model fits in memory")
    if model == "demo":
        from ..demo import CHECKPOINT_DIR

        path = Path(CHECKPOINT_DIR)
    else:
        path = Path(model).expanduser()
        if not path.is_dir():
            return StreamDecision(False, "not a local checkpoint directory: loaded in memory")
    try:
        need = checkpoint_bytes(path, dtype)
    except Exception as e:  # noqa: BLE001 - no safetensors: the in-memory loader reports what is wrong
        return StreamDecision(False, f"size unknown ({type(e).__name__}): loaded in memory")
    have = available_bytes(device)
    gib = 2 ** 30
    what = f"the model needs {need / gib:.1f} GiB in {str(dtype).split('.')[-1]}"
    if calib_tokens:
        try:
            from transformers import AutoConfig

            calib = calibration_bytes(AutoConfig.from_pretrained(str(path)), calib_tokens, max_tokens_per_expert)
        except Exception:  # noqa: BLE001 - an unreadable config: the loader reports it; decide on the weights
            calib = 0
        if calib:
            need += calib
            what += f" + {calib / gib:.1f} GiB of calibration inputs ({calib_tokens:,} tokens, all layers at once)"
    if need > FIT_MARGIN * have:
        return StreamDecision(True, f"{what}, more than {FIT_MARGIN:.0%} of the {have / gib:.1f} GiB available on "
                                    f"{device}", need, have)
    return StreamDecision(False, f"{what}: fits in the {have / gib:.1f} GiB available on {device}", need, have)
