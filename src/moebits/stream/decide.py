"""Does the model fit? The choice between the in-memory and the streaming path of `moebits quantize`.

The model's bytes are estimated from its checkpoint without loading it: every tensor's element count
(read from the safetensors headers) times the element size of the dtype it will be computed in. That
is compared with the memory available now (host: MemAvailable of /proc/meminfo; a CUDA device: its
free memory), keeping a margin for activations, calibration statistics and the allocator.
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


def decide_stream(model: str, dtype: torch.dtype, device: str, force: bool | None) -> StreamDecision:
    """`force` True/False: the user's `--stream` / `--no-stream`; None: stream when the model does not fit."""
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
    if need > FIT_MARGIN * have:
        return StreamDecision(True, f"the model needs {need / gib:.1f} GiB in {str(dtype).split('.')[-1]}, more than "
                                    f"{FIT_MARGIN:.0%} of the {have / gib:.1f} GiB available on {device}", need, have)
    return StreamDecision(False, f"the model ({need / gib:.2f} GiB) fits in the {have / gib:.1f} GiB available on "
                                 f"{device}", need, have)
