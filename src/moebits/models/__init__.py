"""Model adapters: find MoE blocks, enumerate units, read/write a unit's weight, hooks."""
from .adapter import ARCHS, MoEAdapter, RoutedBatch, UnsupportedModelError
from .loading import TINY_CONFIGS, ModelLoadError, byte_tokenizer, load_model, tiny_model

__all__ = ["ARCHS", "MoEAdapter", "RoutedBatch", "UnsupportedModelError", "TINY_CONFIGS", "ModelLoadError",
           "byte_tokenizer", "load_model", "tiny_model"]
