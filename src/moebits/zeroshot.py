"""Zero-shot evaluation on the standard tasks of the MoE-quantization papers, fully offline.

The accuracy tasks run through EleutherAI's lm-evaluation-harness (``lm-eval``) on an in-memory
model: each task is the official lm-eval task (same ``doc_to_text`` / ``doc_to_target`` /
``doc_to_choice`` / metrics, so the same prompts and the same log-likelihood scoring) with only
its *data source* replaced by the local files under ``data_dir`` (``dataset_path: json``). Where
a local file's schema differs from the hub dataset the official task reads, a small
``process_docs`` maps it back:

- ``piqa``: the labels live in a separate ``valid-labels.lst`` file; they are merged in by line.
- ``hellaswag``: the local file holds the llama.cpp variant (``ctx`` = ``"<activity>: <ctx_a>
  <ctx_b>"``, already cleaned). lm-eval builds ``preprocess(activity + ": " + ctx_a + " " +
  ctx_b.capitalize())``; the only thing lost is the capitalisation of ``ctx_b``, which is the
  fragment after the last sentence end when the context does not end a sentence (ActivityNet
  items; WikiHow items have an empty ``ctx_b``). It is restored here.

WikiText-2 perplexity follows the GPTQ convention through :func:`moebits.evaluate.perplexity`
(the whole ``wiki.test.raw`` tokenized once). It is reported but kept out of the accuracy average.

``evaluate_tasks(...)`` returns ``{"tasks": {name: {metric: value}}, "average": float, ...}``;
``format_table`` / ``print_table`` lay results out like Table 1 of the FRI-MxMoE paper.
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


logger = logging.getLogger(__name__)

# Supported tasks, in the order they are run.
TASKS: tuple[str, ...] = ("wikitext2", "lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge",
                          "winogrande")
ACCURACY_TASKS: tuple[str, ...] = TASKS[1:]

# Tasks the papers report for which no local data exists: requesting one yields a note, not a crash.
UNAVAILABLE: dict[str, str] = {
    "lambada_standard": "lambada_standard skipped: no local copy of LAMBADA-standard (cimec/lambada) exists in the "
                        "data folder (only OpenAI's lambada_test.jsonl, i.e. lambada_openai)",
}

# The score shown per task: acc_norm where lm-eval reports it for that task, else acc; PPL for WikiText-2.
PRIMARY_METRIC: dict[str, str] = {
    "wikitext2": "ppl", "lambada_openai": "acc", "lambada_standard": "acc", "hellaswag": "acc_norm",
    "piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "winogrande": "acc",
}

# Files each task reads, relative to the data folder (layout of ../shared/data).
DATA_FILES: dict[str, tuple[str, ...]] = {
    "wikitext2": ("wikitext2/wiki.test.raw",),
    "lambada_openai": ("lambada/lambada_test.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "arc_easy": ("arc/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc/ARC-Challenge-Test.jsonl",),
    "winogrande": ("winogrande/winogrande_xl_validation.jsonl",),
}

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


def _check_data(data_dir: Path | None, tasks: Sequence[str]) -> Path:
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
    return root


# ------------------------------------------------------------------------------ task-specific glue

def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning: strip, ' [title]' -> '. ', drop '[...]' tags, collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_query(ctx: str) -> str:
    """The lm-eval query from a local (llama.cpp-variant) context: clean it, and capitalise ``ctx_b``
    (the fragment after the last sentence end, present when the context stops mid-sentence)."""
    ctx = hellaswag_preprocess(ctx)
    if ctx and ctx[-1] not in ".!?":
        cut = max(ctx.rfind(". "), ctx.rfind("! "), ctx.rfind("? "))
        if cut >= 0:
            ctx = ctx[:cut + 2] + ctx[cut + 2:].capitalize()
    return ctx


def _hellaswag_docs(dataset):
    return dataset.map(lambda doc: {"query": hellaswag_query(doc["ctx"]),
                                    "choices": [hellaswag_preprocess(e) for e in doc["endings"]],
                                    "gold": int(doc["label"])})


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
    """The lm-eval task config (a dict, as `lm_eval.simple_evaluate(tasks=[...])` takes) of one accuracy
    task, reading its local file. Prompts and metrics mirror lm-eval's official YAML of the same name."""
    root = Path(data_dir)

    def source(split: str) -> dict:
        return {"dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {split: str(root / DATA_FILES[task][0])}}, f"{split}_split": split}

    if task == "lambada_openai":
        return {"task": task, **source("test"), "output_type": "loglikelihood",
                "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}", "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                dict(_ACC)]}
    if task == "hellaswag":
        return {"task": task, **source("validation"), "output_type": "multiple_choice",
                "process_docs": _hellaswag_docs, "doc_to_text": "{{query}}", "doc_to_target": "{{label}}",
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
    raise ValueError(f"{task!r} is not an lm-eval accuracy task here; accuracy tasks: {', '.join(ACCURACY_TASKS)}")


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
    from .evaluate import perplexity

    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        notes.append(f"wikitext2: seqlen {seqlen} > model max_position_embeddings {max_pos}; used {max_pos}")
        seqlen = max_pos
    text = (root / DATA_FILES["wikitext2"][0]).read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids.reshape(-1)
    res = perplexity(model, ids, seqlen, batch_size=batch_size, max_windows=limit, progress=progress,
                     desc="wikitext2")
    return res.to_dict()


def evaluate_tasks(model, tokenizer, tasks: str | Sequence[str], data_dir: str | os.PathLike | None = None,
                   limit: int | None = None, batch_size: int = 8, seqlen: int = 2048, progress: bool = True,
                   bootstrap_iters: int = 1000) -> dict:
    """Evaluate `model` (a transformers causal LM, in memory) on `tasks` (names, a comma list or ``"all"``)
    reading the local files under `data_dir` (default: :func:`default_data_dir`).

    `limit` caps the documents per accuracy task (the first `limit`, as lm-eval's ``--limit``) and the
    number of `seqlen`-token windows of WikiText-2. Returns::

        {"tasks": {"piqa": {"acc": .., "acc_stderr": .., "acc_norm": .., "acc_norm_stderr": .., "n": ..},
                   "wikitext2": {"ppl": .., "nll": .., "tokens": .., "windows": .., "seqlen": ..}, ...},
         "average": mean of the primary metric (PRIMARY_METRIC) over the accuracy tasks run (None if none),
         "metric": {task: primary metric name}, "limit": limit,
         "seconds": {"wikitext2": .., "harness": .. (all accuracy tasks together)},
         "notes": [...], "skipped": {task: reason}}
    """
    tasks = parse_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of documents (or None for all), got {limit!r}")
    if data_dir is None:
        data_dir = default_data_dir()
    root = _check_data(data_dir, tasks)
    notes: list[str] = []
    skipped = {t: UNAVAILABLE[t] for t in tasks if t in UNAVAILABLE}
    for t, reason in skipped.items():
        logger.warning(reason)
        notes.append(reason)

    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    was_training = getattr(model, "training", False)
    if "wikitext2" in tasks:
        t0 = time.perf_counter()
        results["wikitext2"] = _wikitext2(model, tokenizer, root, seqlen, limit, batch_size, progress, notes)
        seconds["wikitext2"] = time.perf_counter() - t0
    harness_tasks = [t for t in tasks if t in ACCURACY_TASKS]
    if harness_tasks:  # one harness call: requests of all tasks are length-sorted and batched together
        t0 = time.perf_counter()
        results.update(_harness_results(model, tokenizer, harness_tasks, root, limit, batch_size, progress,
                                        bootstrap_iters, notes))
        seconds["harness"] = time.perf_counter() - t0

    if was_training:  # the harness puts the model in eval mode
        model.train()
    scores = [results[t][PRIMARY_METRIC[t]] for t in tasks if t in ACCURACY_TASKS]
    return {
        "tasks": results,
        "average": sum(scores) / len(scores) if scores else None,
        "metric": {t: PRIMARY_METRIC[t] for t in tasks},
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


def table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]], list[str], int]:
    """Header, body and footnotes of the paper's Table 1 layout: Model | Method | #Bits (W-A) | AC .. WG | Avg. | PPL.
    Task columns appear when some row evaluated (or skipped) that task; label columns when some row fills them."""
    present = set()
    for r in rows:
        present |= set(r["result"]["tasks"]) | set(r["result"].get("skipped", {}))
    cols = [(t, ab) for t, ab in TABLE_COLUMNS if t in present]
    labels = [(k, h) for k, h in (("model", "Model"), ("method", "Method"), ("bits", "#Bits (W-A)"))
              if any(r.get(k) not in (None, "") for r in rows)]
    header = [h for _, h in labels] + [ab for _, ab in cols] + ["Avg."]
    show_ppl = "wikitext2" in present
    if show_ppl:
        header.append("PPL")
    body = []
    for r in rows:
        res = r["result"]
        cells = [str(r.get(k) or "") for k, _ in labels]
        for t, _ in cols:
            v = res["tasks"].get(t, {}).get(PRIMARY_METRIC[t])
            cells.append("n/a" if v is None else f"{100 * v:.2f}")
        cells.append("n/a" if res.get("average") is None else f"{100 * res['average']:.2f}")
        if show_ppl:
            ppl = res["tasks"].get("wikitext2", {}).get("ppl")
            cells.append("n/a" if ppl is None else (f"{ppl:.2f}" if math.isfinite(ppl) else "inf"))
        body.append(cells)
    notes = ["Accuracy in %: " + ", ".join(f"{ab} = {t} {PRIMARY_METRIC[t]}" for t, ab in cols)
             + ". Avg. = mean over the accuracy tasks evaluated (n/a columns excluded)."
             + (" PPL = WikiText-2 test perplexity (GPTQ convention)." if show_ppl else "")]
    limits = sorted({r["result"].get("limit") for r in rows} - {None})
    if limits:
        notes.append("Limit: first " + "/".join(map(str, limits)) + " documents per task (WikiText-2: windows of "
                     "seqlen tokens); scores on a subset, not the full test sets.")
    for r in rows:
        for n in r["result"].get("notes", []):
            if n not in notes:
                notes.append(n)
    return header, body, notes, len(labels)


def format_table(rows) -> str:
    """Markdown table in the layout of the FRI-MxMoE paper's Table 1. `rows`: one `evaluate_tasks` result, or
    a list of ``{"model": .., "method": .., "bits": "3.25-16", "result": <evaluate_tasks result>}``."""
    header, body, notes, n_labels = table_cells(_rows(rows))
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * n_labels + ["---:"] * (len(header) - n_labels)) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in body]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def print_table(rows, console=None) -> None:
    """Print the Table-1 layout with rich."""
    from rich.console import Console
    from rich.table import Table

    header, body, notes, n_labels = table_cells(_rows(rows))
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
