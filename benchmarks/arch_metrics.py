"""Architecture metrics of the source tree (issue 23's before/after): the largest modules and functions
by lines, import cycles between moebits modules, where `quantize`'s options are declared, README size.

    python benchmarks/arch_metrics.py [--label NAME] [--root DIR]   # prints; appends to results/arch_metrics.md

Lines are physical lines of the file / of the function's source (decorators and docstring included).
Import cycles are strongly connected components of the graph "module A imports module B" over every
`import` statement in src/moebits (top level, inside functions and under TYPE_CHECKING alike), and
separately over the top-level runtime imports only (what Python executes at import time).
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def modules(src: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(src.rglob("*.py")):
        rel = p.relative_to(src.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> list[str]:
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        if node.level:
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [target] + [f"{target}.{a.name}" for a in node.names]
    out = []
    for n in names:
        while n and n not in known:
            n = n.rpartition(".")[0]
        if n:
            out.append(n)
    return out


def import_graph(mods: dict[str, Path], runtime_only: bool) -> dict[str, set[str]]:
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        is_pkg = p.name == "__init__.py"
        body = tree.body if runtime_only else list(ast.walk(tree))
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[m].update(t for t in _resolve(m, is_pkg, node, known) if t != m)
        # a package imported for a submodule: `from .a import b` also runs a/__init__; not a cycle by itself
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), excluding the edges from a
    package to its own submodules (an __init__ re-exporting its children is not a design cycle)."""
    g = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return sorted(comps, key=len, reverse=True)


def functions(mods: dict[str, Path]) -> list[tuple[int, str]]:
    out = []
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                out.append((node.end_lineno - start + 1, f"{m}.{node.name}"))
    return sorted(out, reverse=True)


def quantize_option_places(root: Path) -> list[tuple[str, int]]:
    """Where `moebits quantize`'s options are written by hand: CLI parameters, the CLI's config call,
    config fields (or declarations), and the hand-kept lists that must name an option again (spec's
    dropped keys). A CLI generated from the declarations writes none."""
    rows = []
    src = root / "src" / "moebits"
    cli = ast.parse((src / "cli.py").read_text())
    quantize = [n for n in ast.walk(cli) if isinstance(n, ast.FunctionDef) and n.name == "quantize"
                and any(isinstance(a.default, ast.Call) for a in n.args.kwonlyargs + n.args.args if hasattr(a, "default"))
                or isinstance(n, ast.FunctionDef) and n.name == "quantize" and len(n.args.defaults) > 5]
    params = sum(len(n.args.args) + len(n.args.kwonlyargs) for n in quantize)
    rows.append(("cli.quantize parameters written by hand", params))
    calls = [c for n in quantize for c in ast.walk(n) if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "QuantizeConfig"]
    rows.append(("cli.quantize's QuantizeConfig(...) keywords", sum(len(c.keywords) for c in calls)))
    for p in sorted(src.rglob("*.py")):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "QuantizeConfig":
                n = sum(isinstance(s, ast.AnnAssign) for s in node.body)
                if n:
                    rows.append((f"{p.relative_to(src)} QuantizeConfig fields", n))
                keys = 0
                for f in node.body:
                    if isinstance(f, ast.FunctionDef) and f.name == "spec":
                        for t in ast.walk(f):
                            if isinstance(t, ast.Tuple) and len(t.elts) == 2 and isinstance(t.elts[0], ast.Constant) \
                                    and isinstance(t.elts[0].value, str):
                                keys += 1
                rows.append(("spec()'s hand-kept (key, default) list for old runs", keys))
        declared = sum(1 for node in ast.walk(tree) if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Call)
                       and getattr(node.value.func, "id", "") == "option")
        if declared:
            rows.append((f"{p.relative_to(src)} option(...) declarations (the one place)", declared))
    return rows


def readme(root: Path) -> dict:
    text = (root / "README.md").read_text()
    lines = text.splitlines()
    return {"lines": len(lines), "words": len(text.split()), "longest line": max(map(len, lines))}


def report(root: Path, label: str) -> str:
    src = root / "src" / "moebits"
    mods = modules(src)
    sizes = sorted(((len(p.read_text().splitlines()), m) for m, p in mods.items()), reverse=True)
    out = [f"## {label}", "", f"{len(mods)} modules, {sum(s for s, _ in sizes):,} lines in src/moebits", "",
           "| largest modules | lines |", "|---|---:|"]
    out += [f"| {m} | {n} |" for n, m in sizes[:10]]
    out += ["", "| largest functions | lines |", "|---|---:|"]
    out += [f"| {m} | {n} |" for n, m in functions(mods)[:10]]
    for runtime in (False, True):
        cyc = cycles(import_graph(mods, runtime))
        what = "top-level runtime imports" if runtime else "all imports (incl. function-level, TYPE_CHECKING)"
        out += ["", f"import cycles over {what}: {len(cyc)}"]
        out += [f"- {' <-> '.join(c)}" for c in cyc]
    out += ["", "| where quantize's options are written | count |", "|---|---:|"]
    out += [f"| {k} | {v} |" for k, v in quantize_option_places(root)]
    r = readme(root)
    out += ["", f"README.md: {r['lines']} lines, {r['words']:,} words, longest line {r['longest line']} characters", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="current tree")
    ap.add_argument("--root", type=Path, default=HERE.parent)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    text = report(a.root, a.label)
    print(text)
    if not a.no_write:
        res = HERE / "results" / "arch_metrics.md"
        head = "" if res.exists() else ("# Architecture metrics (issue 23)\n\nRegenerate: "
                                        "`python benchmarks/arch_metrics.py --label NAME` (appends a section).\n\n")
        with open(res, "a") as f:
            f.write(head + text + "\n")


if __name__ == "__main__":
    main()
