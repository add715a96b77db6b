"""The demo MoE: a small Qwen2-MoE trained by the project on Shakespeare, shipped as the default model."""
from pathlib import Path

#: folder of the shipped demo checkpoint (config, safetensors, tokenizer, model card, corpus copy)
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"

from moebits.demo.corpus import EVAL_PLAYS, demo_text  # noqa: E402

__all__ = ["CHECKPOINT_DIR", "EVAL_PLAYS", "demo_text"]
