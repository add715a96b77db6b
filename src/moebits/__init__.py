"""moebits: mixed-precision quantization of Mixture-of-Experts language models."""
from .plan import Plan
from .table import SensitivityTable
from .units import Choice, Unit

__version__ = "0.1.0"
__all__ = ["Unit", "Choice", "Plan", "SensitivityTable", "load_quantized", "__version__"]


def _register_with_transformers() -> None:
    """`AutoModelForCausalLM.from_pretrained(DIR)` loads a moebits packed checkpoint after `import moebits`."""
    from .packed.hf import register

    register()


_register_with_transformers()


def load_quantized(path, dtype="auto", device: str = "cpu"):
    """Load a moebits packed checkpoint (experts stay packed in memory); see `moebits.packed`."""
    from .packed import load_quantized as _load

    return _load(path, dtype=dtype, device=device)
