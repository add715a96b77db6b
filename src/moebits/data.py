"""Text sources and token windows.

A source is `demo` (the demo corpus: its training split for calibration, held-out plays for
evaluation), a path to a plain-text file (`.txt`, `.raw`, ...), or `hf:NAME[:CONFIG]` (a Hugging
Face dataset's `text` column, rows joined with ``"\n\n"``; needs the `datasets` package and internet
or a local cache).

WikiText raw files (``wiki.test.raw``, ``wiki.valid.raw``, ``wiki.train.raw``) are read the way GPTQ
reads WikiText-2 -- the text every paper that quotes a "WikiText-2 perplexity" (the seeds included)
evaluates: :func:`wikitext_gptq_text`, i.e. exactly what ``hf:wikitext:wikitext-2-raw-v1`` gives. To
tokenize such a file byte for byte instead, prefix it with ``rawfile:`` (``rawfile:wiki.test.raw``);
that variant has fewer newlines and gives a different perplexity, so it is never the default.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

# A WikiText raw split's file name (wikitext-2-raw-v1 and wikitext-103-raw-v1 use the same names).
WIKITEXT_RAW_NAME = re.compile(r"^wiki\.(train|valid|test)\.raw$")
RAWFILE_PREFIX = "rawfile:"


class DataError(ValueError):
    pass


def wikitext_rows(raw: str) -> list[str]:
    """The rows of the Hugging Face ``wikitext`` data set built from a raw split: one row per line of the
    file with its newline kept, and ``""`` for a line that holds only whitespace."""
    # Split at "\n" only, as iterating over a text file does (str.splitlines would also cut at \x0c, \u2028, ...).
    lines = [line + "\n" for line in raw.split("\n")]
    lines[-1] = lines[-1][:-1]  # the text after the last newline has none
    if not lines[-1]:
        lines.pop()
    return [line if line.strip() else "" for line in lines]


def wikitext_gptq_text(raw: str) -> str:
    """The WikiText evaluation text as GPTQ builds it: ``"\n\n".join(rows)`` over :func:`wikitext_rows`.
    For WikiText-2's ``wiki.test.raw`` (1,288,556 characters, 4,358 newlines) this gives 1,294,336
    characters with 11,605 newlines; GPTQ then tokenizes that text once."""
    return "\n\n".join(wikitext_rows(raw))


def _is_heading(line: str) -> bool:
    """A top-level WikiText heading (`` = Title = ``); `` = = Section = = `` and deeper are not."""
    squeezed = line.replace("= = =", "===").replace("= =", "==").strip()
    return squeezed.startswith("= ") and squeezed.endswith(" =")


def wikitext_documents(raw: str) -> list[str]:
    """The articles of a raw WikiText split, as EleutherAI's ``wikitext_document_level`` data set (the
    source of lm-eval's ``wikitext`` task) cuts them: split the file at ``"\n"``, start a new document
    at every top-level heading line, join each document's lines with ``"\n"``, and drop documents that
    are only whitespace -- except the last, which is always kept. WikiText-2 test: 62 documents."""
    docs: list[str] = []
    lines: list[str] = []
    for line in raw.split("\n"):
        if _is_heading(line):
            page = "\n".join(lines)
            if page.strip():
                docs.append(page)
            lines = []
        lines.append(line)
    docs.append("\n".join(lines))
    return docs


def load_text(source: str, purpose: str = "calib") -> str:
    """`purpose` is "calib" (training split) or "eval" (held-out split) for sources that have both.

    A file named like a WikiText raw split (``wiki.test.raw``, ...) is returned as GPTQ's text
    (:func:`wikitext_gptq_text`); ``rawfile:PATH`` returns any file unchanged."""
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
    verbatim = source.startswith(RAWFILE_PREFIX)
    if verbatim:
        source = source[len(RAWFILE_PREFIX):]
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
    if not verbatim and WIKITEXT_RAW_NAME.match(path.name):
        logger.info("%s: WikiText raw split, read as GPTQ's \\n\\n-joined rows (rawfile:%s reads it verbatim)",
                    source, source)
        return wikitext_gptq_text(text)
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor (no special tokens), tokenized once."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def window_starts(n_tokens: int, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """The seeded offsets `random_windows` cuts its windows at: `[nsamples]`."""
    if n_tokens <= seqlen:
        raise DataError(f"calibration text has {n_tokens} tokens, not more than one window of {seqlen}; "
                        "use a longer text or a smaller --seqlen")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seqlen, (nsamples,), generator=g)


def random_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets: `[nsamples, seqlen]`."""
    starts = window_starts(token_ids.numel(), nsamples, seqlen, seed)
    return torch.stack([token_ids[s:s + seqlen] for s in starts.tolist()])


def held_out_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, calib_nsamples: int, seed: int = 0
                     ) -> torch.Tensor:
    """`[nsamples, seqlen]` windows of the calibration text that share no token position with the
    `calib_nsamples` calibration windows `random_windows(token_ids, calib_nsamples, seqlen, seed)`:
    a validation slice for choices that must not be scored on the calibration tokens themselves (nor on
    the evaluation text). Non-overlapping with each other, in text order."""
    n = token_ids.numel()
    used = torch.zeros(n, dtype=torch.bool)
    for s in window_starts(n, calib_nsamples, seqlen, seed).tolist():
        used[s:s + seqlen] = True
    free = [s for s in range(0, n - seqlen + 1, seqlen) if not used[s:s + seqlen].any()]
    if len(free) < nsamples:
        raise DataError(f"the calibration text has only {len(free)} windows of {seqlen} tokens outside the "
                        f"{calib_nsamples} calibration windows; ask for fewer held-out windows")
    g = torch.Generator().manual_seed(seed + 1)
    pick = sorted(torch.randperm(len(free), generator=g)[:nsamples].tolist())
    return torch.stack([token_ids[free[i]:free[i] + seqlen] for i in pick])


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return random_windows(tokenize(tokenizer, load_text(source, "calib")), nsamples, seqlen, seed)


DEMO_SEQLEN = 256  # the demo model was trained on 256-token windows (its max positions)
MAX_DEFAULT_SEQLEN = 2048  # the GPTQ literature's calibration and WikiText-2 window


def default_seqlen(model: str, trust_remote_code: bool = False) -> int:
    """The window length when none is given: min(2048, the model's `max_position_embeddings`), as in
    the GPTQ literature, so results on real models are comparable to published ones; the demo 256.
    Reads only the model's config. A model whose config cannot be read gets 2048 (loading it will then
    fail with the loader's own message)."""
    if model == "demo":
        return DEMO_SEQLEN
    max_pos = None
    if model.startswith("tiny:"):
        from .models.loading import TINY_CONFIGS

        max_pos = TINY_CONFIGS.get(model[5:], {}).get("max_position_embeddings")
    else:
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
            cfg = getattr(cfg, "text_config", None) or cfg
            max_pos = getattr(cfg, "max_position_embeddings", None)
        except Exception:  # noqa: BLE001 - any failure here is reported by load_model with a better message
            max_pos = None
    return min(MAX_DEFAULT_SEQLEN, int(max_pos)) if max_pos else MAX_DEFAULT_SEQLEN


def seqlen_warnings(model_config, **seqlens: int | None) -> list[str]:
    """Lines to warn with when a window is longer than the model's `max_position_embeddings` (the model
    then runs on positions it never saw: its perplexity and statistics are not what it would give)."""
    cfg = getattr(model_config, "text_config", None) or model_config
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if not max_pos:
        return []
    return [f"--{name.replace('_', '-')} {n} is beyond the model's {max_pos} positions: it runs on positions it "
            f"was not trained for; use --{name.replace('_', '-')} {max_pos} or less"
            for name, n in seqlens.items() if n is not None and n > max_pos]
