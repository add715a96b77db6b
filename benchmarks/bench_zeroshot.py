"""Zero-shot suite (issues 6, 17): wall time and scores of the paper's Table-1 tasks on one model, offline.

    python benchmarks/bench_zeroshot.py [--model demo] [--data ../shared/data] [--limit 4000] [--batch-size 16]
                                        [--metric acc|acc_norm|both] [--tasks all,lambada_standard]
    python benchmarks/bench_zeroshot.py --limit 20 --name zeroshot_smoke    # a quick check (~1-2 min)

`--model` takes what `moebits.models.loading.load_model` takes: `demo` (the project's demo checkpoint,
`moebits.demo.CHECKPOINT_DIR`), a local Hugging Face directory, or `tiny:<arch>`. When the demo checkpoint is
not there yet, the script falls back to `tiny:qwen2_moe` (random weights) and says so in the table.
Each task runs in its own `evaluate_tasks` call so that its wall time is measured; the suite time is
their sum. `--limit` caps the documents per task (first N, lm-eval's `--limit`) and the WikiText-2
windows; the table states it. The default limit (4000) only cuts HellaSwag (10,042) and LAMBADA (5,153):
the full suite took ~21 min on the demo model here, HellaSwag alone ~15 min. Writes
`benchmarks/results/NAME.md` (default `zeroshot`) through `_common.write_table`; give a smoke run its own
`--name` so that it does not replace the real table.

The table's notes state the conventions: PPL is WikiText-2 in GPTQ's convention (the rows of
`wiki.test.raw` joined with "\n\n"), W-PPL lm-eval's own `wikitext` task (word perplexity over the 62
articles), which metric each task column holds and how many tasks the average covers, and the HellaSwag
file's deviation from lm-eval (the llama.cpp variant) when that file is used.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _common import write_table  # noqa: E402

from moebits import zeroshot as zs  # noqa: E402
from moebits.models.loading import load_model  # noqa: E402

# Accuracy of a random guess (uniform over the choices; ARC has a few 3- and 5-choice items, ~25%).
CHANCE = {"arc_challenge": "~25", "arc_easy": "~25", "hellaswag": "25", "lambada_openai": "~0", "piqa": "50",
          "winogrande": "50"}
# Full-suite size: documents per lm-eval task (the official splits' counts; wikitext: articles).
FULL_DOCS = {t: zs.OFFICIAL_COUNTS[zs.DATA_FILES[t][0]] for t in zs.ACCURACY_TASKS} | {"wikitext": 62}


def resolve_model(spec: str):
    """(model, tokenizer, description). `demo` falls back to a tiny random model when the checkpoint is absent."""
    fallback = None
    if spec == "demo":
        from moebits.demo import CHECKPOINT_DIR

        if not (Path(CHECKPOINT_DIR) / "config.json").is_file():
            fallback = f"demo checkpoint not found at {CHECKPOINT_DIR}"
            spec = "tiny:qwen2_moe"
    model, tok, _ = load_model(spec, dtype="float32", device="cpu")
    n_params = sum(p.numel() for p in model.parameters())
    desc = f"`{spec}` ({model.config.model_type}, {n_params / 1e6:.2f} M parameters, float32)"
    if fallback:
        desc += f" -- **{fallback}: measured on a tiny random model instead**"
    return model, tok, desc, spec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default=None, help="evaluation data folder (default: $MOEBITS_DATA or ../shared/data)")
    ap.add_argument("--tasks", default="all,lambada_standard")
    ap.add_argument("--limit", type=int, default=4000,
                    help="documents per task (WikiText-2: windows); 0 = full test sets (~21 min for the demo model "
                         "here); e.g. 20 for a quick check")
    ap.add_argument("--metric", default="acc_norm", choices=zs.METRICS,
                    help="what the task columns show (the JSON-like per-task notes give both)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: see the note in the results file)")
    ap.add_argument("--name", default="zeroshot", help="results file: benchmarks/results/NAME.md")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else zs.default_data_dir()
    if data is None:
        print(zs.NO_DATA_MESSAGE, file=sys.stderr)
        return 2
    limit = args.limit or None
    tasks = zs.parse_tasks(args.tasks)

    t0 = time.perf_counter()
    model, tok, desc, spec = resolve_model(args.model)
    load_s = time.perf_counter() - t0

    per_task: dict[str, dict] = {}
    merged = {"tasks": {}, "metric": args.metric, "notes": [], "skipped": {}, "limit": limit, "seconds": {}}
    for task in tasks:
        t1 = time.perf_counter()
        res = zs.evaluate_tasks(model, tok, [task], data, limit=limit, batch_size=args.batch_size,
                                seqlen=args.seqlen, progress=False, metric=args.metric)
        wall = time.perf_counter() - t1
        merged["tasks"].update(res["tasks"])
        merged["skipped"].update(res["skipped"])
        merged["notes"] += [n for n in res["notes"] if n not in merged["notes"]]
        merged["seconds"][task] = wall
        per_task[task] = {"wall": wall, **res["tasks"].get(task, {})}
        print(f"{task:15s} {wall:7.1f} s  {res['tasks'].get(task, res['skipped'].get(task))}", flush=True)
    merged["average"] = zs.summarize(merged["tasks"])
    suite_s = sum(merged["seconds"].values())

    row = {"model": spec, "method": "Baseline", "bits": "16-16", "result": merged}
    zs.print_table([row])
    header, body, table_notes, _ = zs.table_cells([row])

    scope = f"first {limit} documents per task" if limit else "the full test sets"
    data_shown = os.path.relpath(Path(data).resolve(), Path(__file__).resolve().parents[1])  # no machine paths
    wiki_scope = f"at most {limit} windows; W-PPL: first {limit} articles" if limit else "whole test file"
    notes = [f"Model: {desc}. Data: `{data_shown}`. Scope: **{scope}** (WikiText-2: {wiki_scope}). CPU only, "
             f"{torch.get_num_threads()} torch thread(s), batch size {args.batch_size}; lm-eval "
             f"{_version('lm_eval')}, torch {torch.__version__}, {platform.machine()}."]
    notes += table_notes
    for task in tasks:
        if task in merged["skipped"]:
            continue
        m = per_task[task]
        if task == "wikitext2":
            notes.append(f"Per task -- wikitext2 (GPTQ convention): {m['windows']} windows x {m['seqlen']} tokens, "
                         f"PPL {m['ppl']:.2f}, {m['wall']:.1f} s ({m['tokens'] / m['wall']:.0f} tokens/s)")
            continue
        if task == "wikitext":
            notes.append(f"Per task -- wikitext (lm-eval's task): {m['n']}/{FULL_DOCS[task]} articles, word_perplexity "
                         f"{m['word_perplexity']:.2f}, byte_perplexity {m['byte_perplexity']:.4f}, bits_per_byte "
                         f"{m['bits_per_byte']:.4f}, {m['wall']:.1f} s")
            continue
        scores = []
        for metric in dict.fromkeys(zs.score_metric(task, mm) for mm in ("acc", "acc_norm")):
            se = m.get(f"{metric}_stderr")
            scores.append(f"{metric} {100 * m[metric]:.2f}" + (f" ± {100 * se:.2f}" if se is not None else ""))
        notes.append(f"Per task -- {task}: {m['n']}/{FULL_DOCS[task]} docs, {', '.join(scores)} % "
                     f"(chance {CHANCE[task]} %), {m['wall']:.1f} s ({m['n'] / m['wall']:.1f} docs/s)")
    avg = merged["average"]
    if avg["tasks"]:
        notes.append(f"{avg['label']}: acc {100 * avg['acc']:.2f} %, acc_norm (acc where a task has none) "
                     f"{100 * avg['acc_norm']:.2f} %.")
    notes += [
        f"Suite wall time: **{suite_s:.1f} s ({suite_s / 60:.1f} min)** for the tasks above, plus {load_s:.1f} s to "
        "load the model. Each task is its own `evaluate_tasks` call, so ~2 s of harness overhead (dataset load, "
        "request building, environment report) is counted in every task.",
        "Scores of a model this small sit near chance (see 'chance' above) -- expected: the suite is here to compare a "
        "quantized model with its 16-bit baseline, not to rank the demo model. Under a limit the standard errors "
        "are those of the subset.",
        "One torch thread by default: on this shared 2-core machine two OpenMP threads stalled for seconds per "
        "forward while other jobs ran (a 16x64-token forward of the demo model took ~10 s with 2 threads vs "
        "~0.15 s with 1); pass `--threads 2` on a quiet machine.",
    ]
    path = write_table(args.name, header, body, notes)
    print(f"\nsuite {suite_s:.1f} s (+ load {load_s:.1f} s); wrote {path}")
    return 0


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
