"""llama.cpp's own quantizers, called through ctypes from the ggml library that `llama-cpp-python` ships.

moebits does not re-implement ggml's formats: `quantize` calls `ggml_quantize_chunk` (what `llama-quantize`
calls, with an importance matrix when given), `dequantize` calls the type's `to_float` from
`ggml_get_type_traits` (what llama.cpp's kernels compute with), and sizes come from the type traits. The
library is `libggml-base` inside the installed `llama_cpp` package (`pip install moebits[gguf]`).

    q = quantize(w, "Q4_K", imatrix)        # w float32 [rows, cols] (or [experts, rows, cols]) -> uint8 bytes
    w_hat = dequantize(q, "Q4_K", w.shape)  # float32
    w_hat = quantize_dequantize(w_torch, "Q4_K", imatrix)  # torch in, torch out (same dtype and device)

The calls release the GIL and ggml documents its quantizers as thread-safe, so callers may quantize
tensors from several threads; one tensor is itself split over `threads` row slices as llama-quantize does.

Column widths: ggml quantizes rows in blocks (32 weights for the legacy and IQ4_NL types, 256 = QK_K for
the K- and most i-quants), so a row width that is not a multiple of the block size is refused here;
`fallback_type` is llama-quantize's own rule for such tensors (Q4_K -> Q5_0, Q6_K -> Q8_0, ... -> F16).
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

INSTALL_HINT = ("llama.cpp's ggml library is not installed: `pip install 'moebits[gguf]'` (llama-cpp-python "
                "compiles llama.cpp from source, ~15-25 min on 2 cores; see README, 'GGUF for llama.cpp')")

# ggml's `enum ggml_type` (ggml.h; stable: values are stored in GGUF files). Checked against
# `ggml_type_name` when the library loads.
_TYPE_IDS = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14,
    "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22,
    "IQ4_XS": 23, "IQ1_M": 29, "BF16": 30,
}
GGML_TYPES: tuple[str, ...] = tuple(_TYPE_IDS)
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
I_QUANTS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL")
FLOAT_TYPES = ("F32", "F16", "BF16")

# llama-quantize refuses these without an importance matrix ("the result will be garbage"), a superset of
# ggml_quantize_requires_imatrix (src/llama-quant.cpp, tensor_requires_imatrix).
_LLAMA_REQUIRES_IMATRIX = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")

# llama-quantize's fallback for a tensor whose row width is not a multiple of the type's block size
# (src/llama-quant.cpp, tensor_type_fallback); F16 when the fallback does not fit either.
_FALLBACK = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}


class GGMLUnavailable(ValueError):
    """llama-cpp-python (and with it ggml) is not installed (a ValueError: the CLI prints its message)."""


class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_load_lock = threading.Lock()


def _lib_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise GGMLUnavailable(INSTALL_HINT)
    return Path(spec.origin).parent / "lib"


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    with _load_lock:
        lib_dir = _lib_dir()
        names = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
        name = next((v for k, v in names.items() if sys.platform.startswith(k)), "libggml-base.so")
        path = lib_dir / name
        if not path.exists():
            raise GGMLUnavailable(f"{path} not found (is llama-cpp-python built with shared ggml libraries?). "
                                  + INSTALL_HINT)
        lib = ctypes.CDLL(str(path), mode=getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 2))
        lib.ggml_type_name.argtypes, lib.ggml_type_name.restype = [ctypes.c_int], ctypes.c_char_p
        lib.ggml_blck_size.argtypes, lib.ggml_blck_size.restype = [ctypes.c_int], ctypes.c_int64
        lib.ggml_type_size.argtypes, lib.ggml_type_size.restype = [ctypes.c_int], ctypes.c_size_t
        lib.ggml_row_size.argtypes, lib.ggml_row_size.restype = [ctypes.c_int, ctypes.c_int64], ctypes.c_size_t
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_init.argtypes, lib.ggml_quantize_init.restype = [ctypes.c_int], None
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        lib.ggml_validate_row_data.restype = ctypes.c_bool
        for name_, tid in _TYPE_IDS.items():
            got = lib.ggml_type_name(tid).decode()
            if got.upper() != name_:
                raise GGMLUnavailable(f"this ggml names type {tid} {got!r}, moebits expects {name_!r}: "
                                      "an incompatible llama-cpp-python; reinstall moebits[gguf]")
        return lib


def available() -> bool:
    """True when llama.cpp's ggml library can be loaded."""
    try:
        _lib()
        return True
    except (GGMLUnavailable, OSError):
        return False


def require() -> None:
    """Raise GGMLUnavailable with the install hint when ggml cannot be loaded."""
    try:
        _lib()
    except OSError as e:
        raise GGMLUnavailable(f"{e}. {INSTALL_HINT}") from e


def type_id(type_name: str) -> int:
    name = type_name.upper()
    if name not in _TYPE_IDS:
        raise ValueError(f"unknown ggml type {type_name!r}; moebits knows {', '.join(GGML_TYPES)}")
    return _TYPE_IDS[name]


def type_name(tid: int) -> str:
    for n, i in _TYPE_IDS.items():
        if i == int(tid):
            return n
    raise ValueError(f"ggml type id {tid} is not one moebits handles ({', '.join(GGML_TYPES)})")


@lru_cache(maxsize=None)
def _traits(type_name: str) -> tuple[int, int, bool, int]:
    """(block size, bytes per block, is_quantized, to_float function pointer or 0)."""
    t = _lib().ggml_get_type_traits(type_id(type_name)).contents
    return int(t.blck_size), int(t.type_size), bool(t.is_quantized), int(t.to_float or 0)


def block_size(type_name: str) -> int:
    """Weights per block (32, or 256 = QK_K for the K-quants and most i-quants; 1 for float types)."""
    return _traits(type_name.upper())[0]


def bits_per_weight(type_name: str) -> float:
    """Storage bits per weight of the type, scales included: type_size * 8 / block_size (Q4_K: 4.5)."""
    bs, ts, _, _ = _traits(type_name.upper())
    return ts * 8 / bs


def row_bytes(type_name: str, n_cols: int) -> int:
    """Bytes of one row of `n_cols` weights (ggml_row_size); refuses widths the type cannot store."""
    check_cols(type_name, n_cols)
    return int(_lib().ggml_row_size(type_id(type_name), int(n_cols)))


def tensor_bytes(type_name: str, shape) -> int:
    """Bytes of a tensor of `shape` (rows last-but-one ... , cols last) stored at `type_name`."""
    shape = tuple(int(s) for s in shape)
    return row_bytes(type_name, shape[-1]) * int(np.prod(shape[:-1], dtype=np.int64))


def is_quantized(type_name: str) -> bool:
    return _traits(type_name.upper())[2]


def requires_imatrix(type_name: str) -> bool:
    """Whether llama.cpp refuses this type without an importance matrix (ggml's own rule, and
    llama-quantize's wider one for IQ3_XXS / IQ2_S / IQ1_M)."""
    name = type_name.upper()
    return bool(_lib().ggml_quantize_requires_imatrix(type_id(name))) or name in _LLAMA_REQUIRES_IMATRIX


def fits(type_name: str, n_cols: int) -> bool:
    """Whether rows of `n_cols` weights can be stored at `type_name` (a multiple of its block size)."""
    return n_cols % block_size(type_name) == 0


def check_cols(type_name: str, n_cols: int) -> None:
    bs = block_size(type_name)
    if n_cols % bs:
        fb = fallback_type(type_name, n_cols)
        raise ValueError(f"{type_name.upper()} stores rows in blocks of {bs} weights and this tensor's rows have "
                         f"{n_cols} (not a multiple of {bs}); llama-quantize falls back to {fb} for such a "
                         f"tensor (moebits.gguf.ggml.fallback_type)")


def fallback_type(type_name: str, n_cols: int) -> str:
    """The type llama-quantize stores a tensor of row width `n_cols` at when `type_name` does not fit:
    `type_name` itself when it fits, else its fallback (K-quants to a legacy 32-block type, i-quants to
    IQ4_NL), else F16 (src/llama-quant.cpp, tensor_type_fallback)."""
    name = type_name.upper()
    if fits(name, n_cols):
        return name
    fb = _FALLBACK.get(name, name)
    return fb if fits(fb, n_cols) else "F16"


def _as_rows(weight: np.ndarray) -> np.ndarray:
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.ndim not in (2, 3):
        raise ValueError(f"quantize takes a [rows, cols] or [experts, rows, cols] array, got shape {w.shape}")
    return w


def _imatrix_rows(imatrix, w: np.ndarray) -> np.ndarray | None:
    """The importance matrix as [n_mat, cols] float32 (n_mat = experts of a 3-D tensor, else 1)."""
    if imatrix is None:
        return None
    cols, n_mat = w.shape[-1], (w.shape[0] if w.ndim == 3 else 1)
    im = np.ascontiguousarray(np.asarray(imatrix, dtype=np.float32))
    if im.shape == (cols,) and n_mat == 1:
        im = im[None]
    if im.shape != (n_mat, cols):
        want = f"[{cols}]" if n_mat == 1 else f"[{n_mat}, {cols}] (one row per expert)"
        raise ValueError(f"importance matrix of shape {list(im.shape)} for a weight of shape {list(w.shape)}: "
                         f"expected {want}")
    if not np.isfinite(im).all() or (im < 0).any():
        raise ValueError("the importance matrix holds negative or non-finite values (mean squared activations "
                         "are >= 0)")
    return im


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def quantize(weight: np.ndarray, type_name: str, imatrix: np.ndarray | None = None,
             threads: int | None = None) -> np.ndarray:
    """ggml's bytes of `weight` (float32 [rows, cols], or [experts, rows, cols] with an importance matrix
    [experts, cols]) at `type_name`, by `ggml_quantize_chunk`; uint8 [rows, row_bytes] (or
    [experts, rows, row_bytes]). `imatrix` [cols]: per input column the mean squared activation."""
    name = type_name.upper()
    lib, tid = _lib(), type_id(name)
    w = _as_rows(weight)
    cols = w.shape[-1]
    check_cols(name, cols)
    if requires_imatrix(name) and imatrix is None:
        raise ValueError(f"{name} needs an importance matrix (llama.cpp refuses it without one): pass imatrix=")
    im = _imatrix_rows(imatrix, w)
    rows_per_mat = w.shape[-2]
    n_mat = w.shape[0] if w.ndim == 3 else 1
    rb = int(lib.ggml_row_size(tid, cols))
    out = np.empty((n_mat * rows_per_mat, rb), dtype=np.uint8)
    lib.ggml_quantize_init(tid)  # once per type (thread-safe in ggml); chunks below then only read tables
    src = w.reshape(-1, cols)

    def run(mat: int, r0: int, r1: int) -> int:
        row = mat * rows_per_mat + r0
        im_ptr = None if im is None else im[mat].ctypes.data
        return int(lib.ggml_quantize_chunk(tid, src.ctypes.data, out.ctypes.data, row * cols, r1 - r0, cols,
                                           im_ptr))

    n_threads = threads or default_threads()
    step = max(1, -(-rows_per_mat // n_threads)) if src.size >= 1 << 16 else rows_per_mat
    jobs = [(m, r, min(r + step, rows_per_mat)) for m in range(n_mat) for r in range(0, rows_per_mat, step)]
    if len(jobs) == 1 or n_threads == 1:
        written = sum(run(*j) for j in jobs)
    else:
        with ThreadPoolExecutor(n_threads) as pool:
            written = sum(pool.map(lambda j: run(*j), jobs))
    if written != out.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.size} ({name}, {w.shape})")
    return out.reshape(*w.shape[:-1], rb)


def dequantize(data: np.ndarray, type_name: str, shape) -> np.ndarray:
    """float32 array of `shape` from ggml bytes at `type_name`, by the type's `to_float` (F32: a copy)."""
    name = type_name.upper()
    shape = tuple(int(s) for s in shape)
    cols = shape[-1]
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    want = tensor_bytes(name, shape)
    if raw.size != want:
        raise ValueError(f"{raw.size} bytes for a {name} tensor of shape {list(shape)}: expected {want}")
    if name == "F32":
        return raw.view(np.float32).reshape(shape).copy()
    to_float = _traits(name)[3]
    if not to_float:
        raise ValueError(f"ggml has no to_float for {name}")
    fn = _TO_FLOAT(to_float)
    out = np.empty(n, dtype=np.float32)
    rows = n // cols
    rb = want // rows
    n_threads = default_threads() if n >= 1 << 18 else 1
    step = -(-rows // n_threads)

    def run(r0: int) -> None:
        r1 = min(r0 + step, rows)
        fn(raw.ctypes.data + r0 * rb, out[r0 * cols:].ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
           (r1 - r0) * cols)

    if n_threads == 1:
        run(0)
    else:
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(run, range(0, rows, step)))
    return out.reshape(shape)


def validate(data: np.ndarray, type_name: str) -> bool:
    """ggml's own check of quantized bytes (finite scales, ...), as llama-quantize runs on every chunk."""
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    return bool(_lib().ggml_validate_row_data(type_id(type_name), raw.ctypes.data, raw.size))


def quantize_dequantize(weight, type_name: str, imatrix=None):
    """`weight` (torch [rows, cols] or [experts, rows, cols]) as llama.cpp stores and computes it at
    `type_name`: quantized by ggml and dequantized by ggml, returned in the input's dtype and device."""
    import torch

    w = weight.detach().to("cpu", torch.float32).numpy()
    im = imatrix.detach().cpu().float().numpy() if isinstance(imatrix, torch.Tensor) else imatrix
    back = dequantize(quantize(w, type_name, im), type_name, w.shape)
    return torch.from_numpy(back).to(device=weight.device, dtype=weight.dtype)
