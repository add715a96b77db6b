"""moebits: mixed-precision quantization of Mixture-of-Experts language models."""
from .plan import Plan
from .table import SensitivityTable
from .units import Choice, Unit

__version__ = "0.1.0"
__all__ = ["Unit", "Choice", "Plan", "SensitivityTable", "__version__"]
