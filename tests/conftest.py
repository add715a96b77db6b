import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)
if not torch.cuda.is_available():
    # Triton kernels run on the CPU only under its interpreter, which must be chosen before triton is
    # first imported (triton jit-decorates its own library functions at import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3"]


def shared_data_dir() -> Path | None:
    env = os.environ.get("MOEBITS_DATA")
    for p in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[2] / "shared" / "data"]:
        if p.is_dir():
            return p
    return None


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """Real English text (WikiText-2 test when available, else a generated paragraph mix)."""
    d = shared_data_dir()
    p = tmp_path_factory.mktemp("text") / "text.txt"
    if d is not None and (d / "wikitext2" / "wiki.test.raw").exists():
        p.write_text((d / "wikitext2" / "wiki.test.raw").read_text()[:60000])
    else:
        words = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
        g = torch.Generator().manual_seed(0)
        p.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (20000,), generator=g).tolist()))
    return p
