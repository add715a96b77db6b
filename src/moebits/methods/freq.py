"""freq (MPQ-Freq, the seeds' heuristic baseline): more bits to more frequently routed experts; the
`freq` solver reads only the routing frequencies, so nothing is measured."""
from __future__ import annotations

from . import Method, register_method


class Freq(Method):
    name, solver, profiles = "freq", "freq", False
    description = "MPQ-Freq: bits follow routing frequency"


register_method(Freq())
