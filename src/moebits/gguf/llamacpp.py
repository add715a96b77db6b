"""Running llama.cpp from Python (llama-cpp-python): logits and perplexity of a GGUF, and `llama-quantize`.

`perplexity` scores a GGUF with llama.cpp's forward on the windows `moebits.evaluate.perplexity` uses
(non-overlapping windows of `seqlen` tokens, every token after the first of each window predicted, fresh
context per window), so the two numbers measure the same thing. (`llama-perplexity` scores only the second
half of each window; its number is not comparable with moebits'.)

`llama_quantize` is `llama-quantize` through libllama's `llama_model_quantize`: the same code path and
parameters (`imatrix`, per-tensor overrides as `--tensor-type-file` gives them, `pure`), with the
importance matrix normalised as llama-quantize normalises a GGUF imatrix file (sums / counts).
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path
from typing import Mapping

import numpy as np

from . import ggml
from .imatrix import Imatrix

# llama.h `enum llama_ftype`: the stock mixes llama-quantize takes by name
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
          "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
          "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25,
          "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32}


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise ggml.GGMLUnavailable(ggml.INSTALL_HINT) from e
    return llama_cpp


def load(path: str | Path, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = True,
         kv_cache: str = "F16"):
    """A llama_cpp.Llama on `path` (quiet), for logits of every position. `kv_cache`: the K/V cache type
    (F16: llama.cpp's default, what users run; F32: no rounding of keys and values)."""
    llama_cpp = _llama_cpp()
    kv = ggml.type_id(kv_cache)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                           n_threads=n_threads or ggml.default_threads(), verbose=False, seed=0, type_k=kv, type_v=kv)


def logits(llm, tokens) -> np.ndarray:
    """float32 [T, vocab]: llama.cpp's logits of every position of `tokens` (one sequence, fresh context)."""
    toks = [int(t) for t in tokens]
    if len(toks) > llm.n_ctx():
        raise ValueError(f"{len(toks)} tokens > the context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(toks)
    return np.array(llm.scores[: len(toks)], dtype=np.float32)


def perplexity(path_or_llm, token_ids, seqlen: int, max_windows: int | None = None, kv_cache: str = "F16") -> dict:
    """Perplexity of a GGUF on `token_ids` (1-D) in moebits' convention (see the module docstring)."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    n_windows = ids.size // seqlen if max_windows is None else min(ids.size // seqlen, max_windows)
    if n_windows == 0:
        raise ValueError(f"{ids.size} tokens, fewer than one window of {seqlen}")
    own = isinstance(path_or_llm, (str, Path))
    llm = load(path_or_llm, n_ctx=seqlen, kv_cache=kv_cache) if own else path_or_llm
    nll, count = 0.0, 0
    for w in range(n_windows):
        win = ids[w * seqlen:(w + 1) * seqlen]
        lg = logits(llm, win).astype(np.float64)[:-1]
        m = lg.max(axis=1, keepdims=True)
        logz = (m + np.log(np.exp(lg - m).sum(axis=1, keepdims=True))).reshape(-1)
        nll += float((logz - lg[np.arange(seqlen - 1), win[1:]]).sum())
        count += seqlen - 1
    if own:
        llm.close()
    mean = nll / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": n_windows, "seqlen": seqlen}


def tensor_type_lines(types: Mapping[str, str]) -> list[str]:
    """`--tensor-type-file` lines that pin every named tensor to its type (llama-quantize matches each
    pattern with std::regex_search against tensor names; anchored and escaped, each matches one tensor)."""
    return [f"^{name.replace('.', chr(92) + '.')}$={typ.lower()}" for name, typ in sorted(types.items())]


def parse_tensor_type_file(path: str | Path) -> list[tuple[str, str]]:
    """(pattern, type) pairs as llama-quantize reads `--tensor-type-file` (whitespace-separated name=type)."""
    out = []
    for arg in Path(path).read_text().split():
        if "=" not in arg or arg.startswith("=") or arg.endswith("="):
            raise ValueError(f"{path}: malformed tensor type {arg!r} (expected name=type)")
        name, typ = arg.split("=", 1)
        out.append((name.lower(), typ.upper()))
    return out


def llama_quantize(src: str | Path, dst: str | Path, ftype: str = "Q8_0", imatrix: Imatrix | None = None,
                   tensor_types: list[tuple[str, str]] | Mapping[str, str] | None = None, pure: bool = False,
                   nthread: int = 0) -> Path:
    """`llama-quantize [--imatrix] [--tensor-type-file] [--pure] src dst ftype`, through libllama."""
    llama_cpp = _llama_cpp()
    if ftype.upper() not in FTYPES:
        raise ValueError(f"unknown llama-quantize type {ftype!r}; one of {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype.upper()]
    params.nthread = nthread
    params.pure = pure
    keep = []  # ctypes buffers that must outlive the call
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix.sums) + 1))()
        for i, name in enumerate(imatrix.names()):
            arr = np.ascontiguousarray(imatrix.mean(name).reshape(-1), dtype=np.float32)
            bname = name.encode()
            keep += [arr, bname]
            entries[i].name = bname
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix.sums)].name = None
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if tensor_types:
        pairs = list(tensor_types.items()) if isinstance(tensor_types, Mapping) else list(tensor_types)
        tt = (llama_cpp.llama_model_tensor_override * (len(pairs) + 1))()
        for i, (pattern, typ) in enumerate(pairs):
            bp = pattern.encode()
            keep.append(bp)
            tt[i].pattern = bp
            tt[i].type = ggml.type_id(typ)
        tt[len(pairs)].pattern = None
        tt[len(pairs)].type = 43  # GGML_TYPE_COUNT: the terminator
        keep.append(tt)
        params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {ftype}) failed with code {rc}")
    return Path(dst)
