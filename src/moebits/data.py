"""Text sources and token windows.

A source is `demo` (the demo corpus: its training split for calibration, held-out plays for
evaluation), a path to a plain-text file (`.txt`, `.raw`, ...), or `hf:NAME[:CONFIG]` (a Hugging
Face dataset's `text` column; needs the `datasets` package and internet or a local cache).
"""
from __future__ import annotations

from pathlib import Path

import torch


class DataError(ValueError):
    pass


def load_text(source: str, purpose: str = "calib") -> str:
    """`purpose` is "calib" (training split) or "eval" (held-out split) for sources that have both."""
    if purpose not in ("calib", "eval"):
        raise ValueError(f"purpose must be 'calib' or 'eval', got {purpose!r}")
    if source == "demo":
        from .demo import demo_text

        return demo_text("train" if purpose == "calib" else "eval")
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        try:
            import datasets
        except ImportError:
            raise DataError(f"{source}: install the `datasets` package to read Hugging Face datasets") from None
        split = "train" if purpose == "calib" else "test"
        try:
            ds = datasets.load_dataset(parts[0], parts[1] if len(parts) > 1 else None, split=split)
        except Exception as e:  # the hub raises many kinds; what matters is the message
            raise DataError(f"could not load {source} (split {split}): {str(e).splitlines()[0]}") from None
        if "text" not in ds.column_names:
            raise DataError(f"{source} has no `text` column (columns: {ds.column_names})")
        return "\n\n".join(ds["text"])
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"text source not found: {source} (give `demo`, a text file, or hf:NAME[:CONFIG])")
    if path.is_dir():
        raise DataError(f"text source {source} is a directory; give a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {source} as UTF-8 text: {e}") from None
    if not text.strip():
        raise DataError(f"text source {source} is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor (no special tokens), tokenized once."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets: `[nsamples, seqlen]`."""
    n = token_ids.numel()
    if n <= seqlen:
        raise DataError(f"calibration text has {n} tokens, not more than one window of {seqlen}; "
                        "use a longer text or a smaller --seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen, (nsamples,), generator=g)
    return torch.stack([token_ids[s:s + seqlen] for s in starts.tolist()])


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return random_windows(tokenize(tokenizer, load_text(source, "calib")), nsamples, seqlen, seed)
