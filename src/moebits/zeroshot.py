"""Zero-shot evaluation on the standard tasks of the MoE-quantization papers, fully offline.

The accuracy tasks run through EleutherAI's lm-evaluation-harness (``lm-eval``) on an in-memory
model: each task is the official lm-eval task (same ``doc_to_text`` / ``doc_to_target`` /
``doc_to_choice`` / metrics, so the same prompts and the same log-likelihood scoring) with only
its *data source* replaced by the local files under ``data_dir`` (``dataset_path: json``). Where
a local file's schema differs from the hub dataset the official task reads, a small
``process_docs`` maps it back:

- ``piqa``: the labels live in a separate ``valid-labels.lst`` file; they are merged in by line.
- ``hellaswag``: two layouts are accepted. The original one (HF ``Rowan/hellaswag`` or rowanz's
  ``hellaswag_val.jsonl``: ``activity_label``, ``ctx_a``, ``ctx_b``, tagged ``endings``) goes through
  lm-eval's own ``process_docs`` unchanged. The llama.cpp variant (``{"ctx", "endings", "label"}``, the
  copy in ``shared/data``) was cleaned before it was saved: ``[header]``/``[title]``/``[step]`` tags
  removed *and* the space before an ending trimmed. Its contexts are rebuilt exactly (lm-eval's
  cleaning, and the capitalisation of ``ctx_b``, the fragment after the last sentence end, restored),
  but an ending that began with a tag is scored as ``" Water..."`` where lm-eval's preprocessing of
  the original scores ``"  Water..."`` (two spaces: the target delimiter plus the space the removed
  tag leaves). **This is a deviation from lm-eval**: scores on that file can differ slightly from
  lm-eval's; every result computed from it carries a note saying so.

Two WikiText-2 measures, both from the local ``wiki.test.raw``:

- ``wikitext2`` (column *PPL*): perplexity in **GPTQ's convention**, the one the quantization papers
  (the seeds included) quote: the text is ``"\n\n".join(rows)`` of the data set's rows
  (:func:`moebits.data.wikitext_gptq_text`: 1,294,336 characters, 11,605 newlines), tokenized once,
  cut into non-overlapping ``seqlen`` windows (:func:`moebits.evaluate.perplexity`). Not in the
  accuracy average.
- ``wikitext``: lm-eval's own ``wikitext`` task -- document-level rolling log-likelihood over the 62
  articles (:func:`moebits.data.wikitext_documents`, as EleutherAI's ``wikitext_document_level`` cuts
  them), lm-eval's detokenizer and metrics ``word_perplexity`` / ``byte_perplexity`` /
  ``bits_per_byte``: the numbers to compare with lm-eval's leaderboard-style results.

Metrics and the average: ``metric="acc_norm"`` (default) scores each task by ``acc_norm`` where lm-eval
reports it (HellaSwag, PIQA, ARC) and ``acc`` elsewhere (LAMBADA, WinoGrande); ``metric="acc"`` uses
``acc`` everywhere; ``"both"`` shows both. Both averages are always in the result, labelled with the
number of tasks they cover and the Table-1 tasks they miss (e.g. ``"Avg (6 tasks, no LS)"``: the
FRI-MxMoE paper averages 7 tasks, LAMBADA-standard has no local data).

Data checks: every file is checked against the document count of the official split
(:data:`OFFICIAL_COUNTS`) before any model work, so a truncated or wrong file is named instead of
silently scored; ``limit`` still evaluates only the first documents of a complete file.

``evaluate_tasks(...)`` returns ``{"tasks": {name: {metric: value}}, "average": {...}, ...}``;
``format_table`` / ``print_table`` lay results out like Table 1 of the FRI-MxMoE paper.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .data import DataError, wikitext_documents, wikitext_gptq_text

logger = logging.getLogger(__name__)

# Supported tasks, in the order they are run.
TASKS: tuple[str, ...] = ("wikitext2", "wikitext", "lambada_openai", "hellaswag", "piqa", "arc_easy",
                          "arc_challenge", "winogrande")
ACCURACY_TASKS: tuple[str, ...] = TASKS[2:]
LM_EVAL_TASKS: tuple[str, ...] = TASKS[1:]  # run through lm-eval's harness
METRICS: tuple[str, ...] = ("acc", "acc_norm", "both")

# Tasks the papers report for which no local data exists: requesting one yields a note, not a crash.
UNAVAILABLE: dict[str, str] = {
    "lambada_standard": "lambada_standard skipped: no local copy of LAMBADA-standard (cimec/lambada) exists in the "
                        "data folder (only OpenAI's lambada_test.jsonl, i.e. lambada_openai)",
}

# The score shown per task under metric="acc_norm": acc_norm where lm-eval reports it for that task, else acc;
# perplexities for the WikiText-2 measures. metric="acc" replaces every acc_norm by acc (see score_metric).
PRIMARY_METRIC: dict[str, str] = {
    "wikitext2": "ppl", "wikitext": "word_perplexity", "lambada_openai": "acc", "lambada_standard": "acc",
    "hellaswag": "acc_norm", "piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
    "winogrande": "acc",
}

# Files each task reads, relative to the data folder (layout of ../shared/data).
DATA_FILES: dict[str, tuple[str, ...]] = {
    "wikitext2": ("wikitext2/wiki.test.raw",),
    "wikitext": ("wikitext2/wiki.test.raw",),
    "lambada_openai": ("lambada/lambada_test.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "arc_easy": ("arc/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc/ARC-Challenge-Test.jsonl",),
    "winogrande": ("winogrande/winogrande_xl_validation.jsonl",),
}

# Documents (lines) in each file of the official splits; a file that differs is truncated or the wrong split.
OFFICIAL_COUNTS: dict[str, int] = {
    "wikitext2/wiki.test.raw": 4358, "lambada/lambada_test.jsonl": 5153, "hellaswag/hellaswag_val.jsonl": 10042,
    "piqa/valid.jsonl": 1838, "piqa/valid-labels.lst": 1838, "arc/ARC-Easy-Test.jsonl": 2376,
    "arc/ARC-Challenge-Test.jsonl": 1172, "winogrande/winogrande_xl_validation.jsonl": 1267,
}

HELLASWAG_ORIGINAL_KEYS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
HELLASWAG_LLAMACPP_KEYS = ("ctx", "endings", "label")
HELLASWAG_DEVIATION = (
    "hellaswag: the data file is the llama.cpp variant (bracket tags removed and the space before an ending "
    "trimmed): endings that began with a tag are scored as ' Water...' where lm-eval's preprocessing of the "
    "original file scores '  Water...', so HS can differ slightly from lm-eval's score; give the original "
    "Rowan/hellaswag layout (activity_label, ctx_a, ctx_b, tagged endings) to match lm-eval exactly")
WIKITEXT2_CONVENTION = (
    "PPL = WikiText-2 test perplexity, GPTQ convention: the data set's rows joined with \"\\n\\n\" (1,294,336 "
    "characters of wiki.test.raw), tokenized once, non-overlapping windows of seqlen tokens")
WIKITEXT_CONVENTION = (
    "W-PPL = lm-eval's wikitext task (word_perplexity; byte_perplexity and bits_per_byte in the JSON): rolling "
    "log-likelihood over the 62 test articles, lm-eval's detokenizer")

# Column order and abbreviations of the paper's Table 1.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("arc_challenge", "AC"), ("arc_easy", "AE"), ("hellaswag", "HS"), ("lambada_openai", "LO"),
    ("lambada_standard", "LS"), ("piqa", "PQ"), ("winogrande", "WG"),
)

DATA_ENV = "MOEBITS_DATA"
NO_DATA_MESSAGE = (f"no evaluation data folder found: pass --data DIR (a folder laid out like ../shared/data: "
                   f"wikitext2/, lambada/, hellaswag/, piqa/, arc/, winogrande/) or set {DATA_ENV}")


# ----------------------------------------------------------------------------------------------- data

def default_data_dir() -> Path | None:
    """``$MOEBITS_DATA`` if set, else ``../shared/data`` relative to the current directory if it exists,
    else None (and a warning saying how to point at the data)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    candidate = Path.cwd().parent / "shared" / "data"
    if candidate.is_dir():
        return candidate.resolve()
    logger.warning(NO_DATA_MESSAGE)
    return None


def available_tasks(data_dir: str | os.PathLike) -> list[str]:
    """The supported tasks whose files are all present under `data_dir`."""
    root = Path(data_dir)
    return [t for t in TASKS if all((root / f).is_file() for f in DATA_FILES[t])]


def parse_tasks(spec: str | Iterable[str]) -> list[str]:
    """``"all"``, a comma list (``"piqa,arc_easy"``) or a list of names -> validated task names.
    Known-but-unavailable tasks (``lambada_standard``) pass through; they become notes in the result."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        expanded = list(TASKS) if name == "all" else [name]
        for task in expanded:
            if task not in TASKS and task not in UNAVAILABLE:
                raise ValueError(f"unknown task {task!r}; supported tasks: {', '.join(TASKS)} (or 'all')")
            if task not in out:
                out.append(task)
    if not out:
        raise ValueError(f"no task given; supported tasks: {', '.join(TASKS)} (or 'all')")
    return out


def count_documents(path: Path) -> int:
    """Documents in one data file: its non-blank lines (JSON lines, labels), or every line of a WikiText raw
    split (whose blank lines are part of the text)."""
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".raw":
            return sum(1 for _ in f)
        return sum(1 for line in f if line.strip())


def check_document_counts(root: Path, tasks: Sequence[str]) -> None:
    """Raise a DataError naming every file of `tasks` whose document count differs from the official split's."""
    wrong = []
    for rel in dict.fromkeys(f for t in tasks for f in DATA_FILES.get(t, ())):
        expected = OFFICIAL_COUNTS.get(rel)
        if expected is None:
            continue
        found = count_documents(root / rel)
        if found != expected:
            wrong.append(f"{root / rel} has {found:,} {'lines' if rel.endswith('.raw') else 'documents'}, "
                         f"the official split has {expected:,}")
    if wrong:
        raise DataError("data file(s) truncated or not the official split: " + "; ".join(wrong)
                        + ". Use the complete official files (--limit N evaluates only the first N documents "
                        "of a complete file), or pass check_counts=False (CLI: --no-check-counts) to score "
                        "a file of your own")


def hellaswag_layout(path: Path) -> str:
    """``"original"`` (HF Rowan/hellaswag or rowanz's file) or ``"llama.cpp"`` (cleaned ``ctx`` + ``endings``),
    from the keys of the file's first document."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    try:
        keys = set(json.loads(first)) if first is not None else set()
    except (json.JSONDecodeError, TypeError):
        raise DataError(f"{path}: the first line is not a JSON object") from None
    if set(HELLASWAG_ORIGINAL_KEYS) <= keys:
        return "original"
    if set(HELLASWAG_LLAMACPP_KEYS) <= keys:
        return "llama.cpp"
    raise DataError(f"{path}: unknown HellaSwag layout (keys {sorted(keys)}); expected the original one "
                    f"({', '.join(HELLASWAG_ORIGINAL_KEYS)}) or llama.cpp's ({', '.join(HELLASWAG_LLAMACPP_KEYS)})")


def _check_data(data_dir: Path | None, tasks: Sequence[str], counts: bool = True) -> Path:
    if data_dir is None:
        raise FileNotFoundError(NO_DATA_MESSAGE)
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation data folder {str(root)!r} does not exist. {NO_DATA_MESSAGE}")
    missing = {t: [f for f in DATA_FILES[t] if not (root / f).is_file()] for t in tasks if t in DATA_FILES}
    missing = {t: fs for t, fs in missing.items() if fs}
    if missing:
        have = available_tasks(root)
        lines = "; ".join(f"{t}: {', '.join(fs)}" for t, fs in missing.items())
        raise FileNotFoundError(f"missing data files in {str(root)!r} ({lines}). Tasks available in that folder: "
                                f"{', '.join(have) if have else 'none'}")
    if counts:
        check_document_counts(root, tasks)
    if "hellaswag" in tasks:
        hellaswag_layout(root / DATA_FILES["hellaswag"][0])
    return root


# ------------------------------------------------------------------------------ task-specific glue

def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning: strip, ' [title]' -> '. ', drop '[...]' tags, collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _lm_eval_task_module(task_dir: str, module: str):
    """A Python module of one of lm-eval's own task folders (e.g. ``hellaswag.utils``), used unchanged."""
    name = f"lm_eval.tasks.{task_dir}.{module}"
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"cannot import {name} from the installed lm-eval ({e}); moebits uses the task folders "
                          "of lm-eval 0.4 (pip install 'moebits[eval]', i.e. lm-eval>=0.4.5)") from None


def hellaswag_query(ctx: str) -> str:
    """The lm-eval query from a local (llama.cpp-variant) context: clean it, and capitalise ``ctx_b``
    (the fragment after the last sentence end, present when the context stops mid-sentence)."""
    ctx = hellaswag_preprocess(ctx)
    if ctx and ctx[-1] not in ".!?":
        cut = max(ctx.rfind(". "), ctx.rfind("! "), ctx.rfind("? "))
        if cut >= 0:
            ctx = ctx[:cut + 2] + ctx[cut + 2:].capitalize()
    return ctx


def _hellaswag_llamacpp_docs(dataset):
    """llama.cpp-variant documents -> lm-eval's (query, choices, gold); see the module docstring for the one
    difference that cannot be undone (endings that began with a tag)."""
    return dataset.map(lambda doc: {"query": hellaswag_query(doc["ctx"]),
                                    "choices": [hellaswag_preprocess(e) for e in doc["endings"]],
                                    "gold": int(doc["label"])})


def _hellaswag_docs(layout: str):
    if layout == "original":
        return _lm_eval_task_module("hellaswag", "utils").process_docs  # lm-eval's preprocessing, unchanged
    return _hellaswag_llamacpp_docs


def _wikitext_docs(dataset):
    """The whole raw file (one row, ``sample_by="document"``) -> one row per article, as lm-eval's source data
    set ``EleutherAI/wikitext_document_level`` has them (column ``page``)."""
    import datasets

    return datasets.Dataset.from_dict({"page": wikitext_documents("".join(dataset["text"]))})


def _piqa_labels(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def _piqa_docs(labels_path: Path):
    def process_docs(dataset):
        labels = _piqa_labels(labels_path)
        if len(dataset) != len(labels):
            raise ValueError(f"{labels_path} has {len(labels)} labels for {len(dataset)} PIQA questions")
        return dataset.map(lambda doc, i: {"label": labels[i]}, with_indices=True)

    return process_docs


# WinoGrande, partial scoring (as lm-eval): one context per option (the sentence up to the blank with the
# option filled in), one shared continuation (the rest of the sentence); the gold is the option's index.
def winogrande_gold(doc: Mapping) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_continuation(doc: Mapping) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_contexts(doc: Mapping) -> list[str]:
    head = doc["sentence"][:doc["sentence"].index("_")]
    return [head + doc["option1"], head + doc["option2"]]


_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}


def task_config(task: str, data_dir: str | os.PathLike) -> dict:
    """The lm-eval task config (a dict, as `lm_eval.simple_evaluate(tasks=[...])` takes) of one lm-eval task
    (the accuracy tasks and ``wikitext``), reading its local file. Prompts, metrics and -- where lm-eval keeps
    them in Python (WinoGrande's choices, HellaSwag's original-layout preprocessing, WikiText's detokenizer
    and word/byte counts) -- the functions mirror or are lm-eval's official task of the same name."""
    root = Path(data_dir)

    def source(split: str) -> dict:
        return {"dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {split: str(root / DATA_FILES[task][0])}}, f"{split}_split": split}

    if task == "lambada_openai":
        return {"task": task, **source("test"), "output_type": "loglikelihood",
                "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}", "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                dict(_ACC)]}
    if task == "wikitext":
        lm_wikitext = _lm_eval_task_module("wikitext", "preprocess_wikitext")
        cfg = {"task": task, **source("test"), "output_type": "loglikelihood_rolling", "process_docs": _wikitext_docs,
               "doc_to_text": "", "doc_to_target": lm_wikitext.wikitext_detokenizer,
               "process_results": lm_wikitext.process_results, "should_decontaminate": True,
               "doc_to_decontamination_query": "{{page}}",
               "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                               {"metric": "bits_per_byte"}]}
        cfg["dataset_path"] = "text"  # the whole file as one row; _wikitext_docs cuts it into articles
        cfg["dataset_kwargs"].update(sample_by="document", keep_linebreaks=True)
        return cfg
    if task == "hellaswag":
        path = root / DATA_FILES[task][0]
        layout = hellaswag_layout(path) if path.is_file() else "llama.cpp"
        return {"task": task, **source("validation"), "output_type": "multiple_choice",
                "process_docs": _hellaswag_docs(layout), "doc_to_text": "{{query}}", "doc_to_target": "{{label}}",
                "doc_to_choice": "choices", "metric_list": [dict(_ACC), dict(_ACC_NORM)]}
    if task == "piqa":
        return {"task": task, **source("validation"), "output_type": "multiple_choice",
                "process_docs": _piqa_docs(root / DATA_FILES["piqa"][1]),
                "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
                "doc_to_choice": "{{[sol1, sol2]}}", "metric_list": [dict(_ACC), dict(_ACC_NORM)]}
    if task in ("arc_easy", "arc_challenge"):
        return {"task": task, **source("test"), "output_type": "multiple_choice",
                "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{choices.label.index(answerKey)}}",
                "doc_to_choice": "{{choices.text}}", "metric_list": [dict(_ACC), dict(_ACC_NORM)]}
    if task == "winogrande":
        return {"task": task, **source("validation"), "output_type": "multiple_choice",
                "doc_to_text": winogrande_gold, "doc_to_target": winogrande_continuation,
                "doc_to_choice": winogrande_contexts, "metric_list": [dict(_ACC)]}
    raise ValueError(f"{task!r} is not an lm-eval task here; lm-eval tasks: {', '.join(LM_EVAL_TASKS)}")


# ------------------------------------------------------------------------------------------ evaluate

def _harness_results(model, tokenizer, tasks: Sequence[str], root: Path, limit, batch_size: int, progress: bool,
                     bootstrap_iters: int, notes: list[str]) -> dict[str, dict]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    class _LM(HFLM):
        """HFLM that honours `progress`, and scores a continuation longer than the model's window (lm-eval
        asserts; e.g. 15 PIQA solutions of 8 questions exceed the 256-token demo model) in a second pass
        with the window widened just for those requests, counted in `self.overlong` for a note."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.overlong: dict[str, int] = {}  # task -> requests scored with a widened window
            self.overlong_window: tuple[int, int] | None = None  # (model window, widened window)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            disable_tqdm = disable_tqdm or not progress
            window = self.max_length
            cont_len = [len(self._encode_pair(*r.args[:2])[1]) for r in requests]
            long_ids = [i for i, n in enumerate(cont_len) if n > window]
            if not long_ids:
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            fits = [i for i, n in enumerate(cont_len) if n <= window]
            out: list = [None] * len(requests)
            for i, r in zip(fits, super().loglikelihood([requests[i] for i in fits], disable_tqdm=disable_tqdm)):
                out[i] = r
            saved, self._max_length = self._max_length, max(cont_len[i] for i in long_ids)
            try:
                for i, r in zip(long_ids, super().loglikelihood([requests[i] for i in long_ids], disable_tqdm=True)):
                    out[i] = r
            finally:
                self._max_length = saved
            for i in long_ids:
                name = getattr(requests[i], "task_name", None) or "?"
                self.overlong[name] = self.overlong.get(name, 0) + 1
            self.overlong_window = (window, max(cont_len[i] for i in long_ids))
            return out

    quiet = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "datasets")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.INFO if progress else logging.ERROR)
    try:
        lm = _LM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[task_config(t, root) for t in tasks], limit=limit, bootstrap_iters=bootstrap_iters,
            task_manager=TaskManager(include_defaults=False), log_samples=False,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    if lm.overlong:
        window, widened = lm.overlong_window
        notes.extend(f"{task}: {n} answer choice(s) longer than the model's {window}-token window, scored with "
                     f"the window widened to {widened} (positions beyond the trained range)"
                     for task, n in sorted(lm.overlong.items()))
    metrics: dict[str, dict] = {}
    for task in tasks:
        raw = out["results"][task]
        m = {}
        for key, value in raw.items():
            if "," not in key:
                continue
            name, _filter = key.split(",", 1)
            m[name] = None if value == "N/A" else float(value)
        n = out.get("n-samples", {}).get(task, {})
        m["n"] = int(n.get("effective", n.get("original", 0))) if n else None
        metrics[task] = m
    return metrics


def _wikitext2(model, tokenizer, root: Path, seqlen: int, limit, batch_size: int, progress: bool,
               notes: list[str]) -> dict:
    """GPTQ-convention perplexity: GPTQ's text (rows joined with "\\n\\n"), tokenized once as GPTQ does
    (``tokenizer(text)``, so with the tokenizer's BOS if it adds one), non-overlapping `seqlen` windows."""
    from .evaluate import perplexity

    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        notes.append(f"wikitext2: seqlen {seqlen} > model max_position_embeddings {max_pos}; used {max_pos}")
        seqlen = max_pos
    text = wikitext_gptq_text((root / DATA_FILES["wikitext2"][0]).read_text(encoding="utf-8"))
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids.reshape(-1)
    res = perplexity(model, ids, seqlen, batch_size=batch_size, max_windows=limit, progress=progress,
                     desc="wikitext2")
    return {**res.to_dict(), "convention": "gptq"}


def score_metric(task: str, metric: str) -> str:
    """The metric that scores `task` under `metric` ("acc" or "acc_norm"): with "acc_norm", acc_norm where
    lm-eval reports it and acc elsewhere (LAMBADA, WinoGrande); with "acc", acc everywhere."""
    if metric not in ("acc", "acc_norm"):
        raise ValueError(f"metric must be 'acc' or 'acc_norm' here, got {metric!r}")
    return "acc" if metric == "acc" and task in ACCURACY_TASKS else PRIMARY_METRIC[task]


def average_label(tasks: Sequence[str]) -> str:
    """``"Avg (6 tasks, no LS)"``: how many tasks an average covers, and which of the paper's Table-1 tasks
    it lacks (the FRI-MxMoE paper averages all 7)."""
    missing = [ab for t, ab in TABLE_COLUMNS if t not in tasks]
    n = len(tasks)
    return f"Avg ({n} task{'' if n == 1 else 's'}" + (f", no {'/'.join(missing)}" if missing else "") + ")"


def summarize(task_results: Mapping[str, Mapping]) -> dict:
    """The averages of a result's accuracy tasks: ``{"acc": .., "acc_norm": .., "tasks": [..], "label": ..}``
    (a value is None when no task has it; tasks whose score is missing are left out and not counted)."""
    out: dict = {}
    counted: list[str] = []
    for metric in ("acc", "acc_norm"):
        scored = [(t, task_results[t].get(score_metric(t, metric))) for t in ACCURACY_TASKS if t in task_results]
        scored = [(t, v) for t, v in scored if v is not None]
        out[metric] = sum(v for _, v in scored) / len(scored) if scored else None
        if metric == "acc_norm":
            counted = [t for t, _ in scored]
    out["tasks"] = counted
    out["label"] = average_label(counted)
    return out


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return metric


def evaluate_tasks(model, tokenizer, tasks: str | Sequence[str], data_dir: str | os.PathLike | None = None,
                   limit: int | None = None, batch_size: int = 8, seqlen: int = 2048, progress: bool = True,
                   bootstrap_iters: int = 1000, metric: str = "acc_norm", check_counts: bool = True) -> dict:
    """Evaluate `model` (a transformers causal LM, in memory) on `tasks` (names, a comma list or ``"all"``)
    reading the local files under `data_dir` (default: :func:`default_data_dir`).

    `limit` caps the documents per lm-eval task (the first `limit`, as lm-eval's ``--limit``; WikiText
    articles for ``wikitext``) and the number of `seqlen`-token windows of ``wikitext2``. `metric` (``acc``,
    ``acc_norm`` or ``both``) chooses what tables show; the result always holds both. `check_counts`
    compares each file with the official split's document count (:data:`OFFICIAL_COUNTS`) first. Returns::

        {"tasks": {"piqa": {"acc": .., "acc_stderr": .., "acc_norm": .., "acc_norm_stderr": .., "n": ..},
                   "wikitext2": {"ppl": .., "nll": .., "tokens": .., "windows": .., "seqlen": .., "convention": "gptq"},
                   "wikitext": {"word_perplexity": .., "byte_perplexity": .., "bits_per_byte": .., "n": ..}, ...},
         "average": {"acc": mean acc, "acc_norm": mean of acc_norm-or-acc, "tasks": [..],
                     "label": "Avg (6 tasks, no LS)"},
         "metric": metric, "limit": limit, "seconds": {"wikitext2": .., "harness": .. (lm-eval tasks together)},
         "notes": [...], "skipped": {task: reason}}
    """
    tasks = parse_tasks(tasks)
    metric = check_metric(metric)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of documents (or None for all), got {limit!r}")
    if data_dir is None:
        data_dir = default_data_dir()
    root = _check_data(data_dir, tasks, counts=check_counts)
    notes: list[str] = []
    skipped = {t: UNAVAILABLE[t] for t in tasks if t in UNAVAILABLE}
    for t, reason in skipped.items():
        logger.warning(reason)
        notes.append(reason)
    if "hellaswag" in tasks and hellaswag_layout(root / DATA_FILES["hellaswag"][0]) == "llama.cpp":
        notes.append(HELLASWAG_DEVIATION)

    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    was_training = getattr(model, "training", False)
    if "wikitext2" in tasks:
        t0 = time.perf_counter()
        results["wikitext2"] = _wikitext2(model, tokenizer, root, seqlen, limit, batch_size, progress, notes)
        seconds["wikitext2"] = time.perf_counter() - t0
    harness_tasks = [t for t in tasks if t in LM_EVAL_TASKS]
    if harness_tasks:  # one harness call: requests of all tasks are length-sorted and batched together
        t0 = time.perf_counter()
        results.update(_harness_results(model, tokenizer, harness_tasks, root, limit, batch_size, progress,
                                        bootstrap_iters, notes))
        seconds["harness"] = time.perf_counter() - t0

    if was_training:  # the harness puts the model in eval mode
        model.train()
    return {
        "tasks": results,
        "average": summarize(results),
        "metric": metric,
        "limit": limit,
        "data_dir": str(root),
        "seconds": seconds,
        "notes": notes,
        "skipped": skipped,
    }


# --------------------------------------------------------------------------------------------- table

def _rows(rows) -> list[dict]:
    if isinstance(rows, Mapping) and "tasks" in rows:  # a single evaluate_tasks result
        rows = [{"result": rows}]
    return [dict(r) for r in rows]


def _fmt_ppl(v) -> str:
    return "n/a" if v is None else (f"{v:.2f}" if math.isfinite(v) else "inf")


def convention_notes(tasks: Iterable[str], metric: str = "acc_norm") -> list[str]:
    """What the numbers of a table with these columns mean: which metric each task shows, what the average
    covers, and which WikiText convention each perplexity column is."""
    tasks = set(tasks)
    cols = [(t, ab) for t, ab in TABLE_COLUMNS if t in tasks]
    shown = ("acc", "acc_norm") if metric == "both" else (metric,)
    notes = []
    if cols:
        for m in shown:
            notes.append(f"Accuracy in % ({m} rows): " + ", ".join(f"{ab} = {t} {score_metric(t, m)}" for t, ab in cols)
                         + ".")
        notes.append("Avg (N tasks, no X) = mean of the row's scores over the N accuracy tasks that have one; X = the "
                     "tasks of the FRI-MxMoE paper's Table 1 it lacks (that paper averages all 7 and does not say "
                     "whether acc or acc_norm).")
    if "wikitext2" in tasks:
        notes.append(WIKITEXT2_CONVENTION + ".")
    if "wikitext" in tasks:
        notes.append(WIKITEXT_CONVENTION + ".")
    return notes


def table_cells(rows: list[dict], metric: str | None = None) -> tuple[list[str], list[list[str]], list[str], int]:
    """Header, body and footnotes of the paper's Table 1 layout:
    Model | Method | #Bits (W-A) | Metric | AC .. WG | Avg (N tasks, no ..) | PPL | W-PPL.
    `metric` (acc, acc_norm, both; default: the results' own) picks the rows: with "both", two rows per result.
    Task columns appear when some row evaluated (or skipped) that task; label columns when some row fills them."""
    present: set[str] = set()
    for r in rows:
        present |= set(r["result"]["tasks"]) | set(r["result"].get("skipped", {}))
    if metric is None:
        found = {r["result"].get("metric", "acc_norm") for r in rows}
        metric = found.pop() if len(found) == 1 else "both"
    metric = check_metric(metric)
    shown = ("acc", "acc_norm") if metric == "both" else (metric,)
    cols = [(t, ab) for t, ab in TABLE_COLUMNS if t in present]
    labels = [(k, h) for k, h in (("model", "Model"), ("method", "Method"), ("bits", "#Bits (W-A)"))
              if any(r.get(k) not in (None, "") for r in rows)]
    averages = [r["result"].get("average") or summarize(r["result"]["tasks"]) for r in rows]
    avg_labels = sorted({a["label"] for a in averages})
    avg_header = avg_labels[0] if len(avg_labels) == 1 else "Avg."
    metric_col = ["Metric"] if cols else []  # the accuracy columns say which metric they hold
    if not cols:
        shown = shown[:1]
    header = [h for _, h in labels] + metric_col + [ab for _, ab in cols] + [avg_header] * bool(cols)
    show_ppl, show_wppl = "wikitext2" in present, "wikitext" in present
    header += ["PPL"] * show_ppl + ["W-PPL"] * show_wppl
    body = []
    for r, avg in zip(rows, averages):
        res = r["result"]
        for m in shown:
            cells = [str(r.get(k) or "") for k, _ in labels] + [m] * bool(cols)
            for t, _ in cols:
                v = res["tasks"].get(t, {}).get(score_metric(t, m))
                cells.append("n/a" if v is None else f"{100 * v:.2f}")
            if cols:
                cells.append("n/a" if avg.get(m) is None else f"{100 * avg[m]:.2f}")
            if show_ppl:
                cells.append(_fmt_ppl(res["tasks"].get("wikitext2", {}).get("ppl")))
            if show_wppl:
                cells.append(_fmt_ppl(res["tasks"].get("wikitext", {}).get("word_perplexity")))
            body.append(cells)
    notes = convention_notes(present, metric)
    if len(avg_labels) > 1:
        notes.append("Avg. covers different tasks per row: " + "; ".join(
            f"{r.get('model') or r.get('method') or i}: {a['label']}" for i, (r, a) in enumerate(zip(rows, averages))))
    limits = sorted({r["result"].get("limit") for r in rows} - {None})
    if limits:
        notes.append("Limit: first " + "/".join(map(str, limits)) + " documents per task (WikiText-2 PPL: windows of "
                     "seqlen tokens; W-PPL: articles); scores on a subset, not the full test sets.")
    for r in rows:
        for n in r["result"].get("notes", []):
            if n not in notes:
                notes.append(n)
    return header, body, notes, len(labels) + len(metric_col)


def format_table(rows, metric: str | None = None) -> str:
    """Markdown table in the layout of the FRI-MxMoE paper's Table 1. `rows`: one `evaluate_tasks` result, or
    a list of ``{"model": .., "method": .., "bits": "3.25-16", "result": <evaluate_tasks result>}``."""
    header, body, notes, n_labels = table_cells(_rows(rows), metric)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * n_labels + ["---:"] * (len(header) - n_labels)) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in body]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def print_table(rows, console=None, metric: str | None = None) -> None:
    """Print the Table-1 layout with rich."""
    from rich.console import Console
    from rich.table import Table

    header, body, notes, n_labels = table_cells(_rows(rows), metric)
    table = Table(title="Zero-shot accuracy (%) and WikiText-2 perplexity")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < n_labels else "right", no_wrap=True)
    for cells in body:
        table.add_row(*cells)
    console = console or Console()
    if not console.is_terminal:  # piped: do not squash the table to 80 columns
        widths = [max(len(c) for c in col) for col in zip(header, *body)]
        console.width = max(console.width, sum(widths) + 3 * len(widths) + 1)
    console.print(table)
    for n in notes:
        console.print(f"- {n}", highlight=False)
