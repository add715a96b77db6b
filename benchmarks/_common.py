"""Shared by the benchmark scripts: where results go and how a table is written."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT.parent / "src"))  # run from a checkout without installing
# the zero-point accounting of the allocation benchmarks whose tables were made before issue 25 (every zero
# in 16 bits, "3.25 = 3-bit g128"): they keep it so that their committed tables reproduce; the default of
# `moebits quantize` is now "packed" (bench_zero_storage.py compares the two)
FP16_ZEROS = "fp16"


def write_table(name: str, headers: list[str], rows: list[list], notes: list[str] | None = None) -> Path:
    """Print a markdown table and write it to benchmarks/results/{name}.md (with the command that made it)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    cmd = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:])
    text = f"# {name}\n\n" + "\n".join(lines) + "\n\n" + "".join(f"- {n}\n" for n in (notes or [])) + f"\nCommand: `{cmd}`\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    print(text)
    return path
