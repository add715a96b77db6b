"""freq (MPQ-Freq, the seeds' heuristic baseline): more bits to more frequently routed experts; the
`freq` solver reads only the routing frequencies, so nothing is profiled."""
from __future__ import annotations

from . import Method, register_method
from .uniform import fill_unprofiled

register_method(Method("freq", fill_unprofiled, "freq", profiles=False,
                       description="MPQ-Freq: bits follow routing frequency"))
