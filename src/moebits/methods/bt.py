"""BT-MoE's choice set: every (bits, rank) pair, one per expert (seed 003, Sec. 3.2).

Bits come from `--bits-set` (default 2, 3, 4); ranks from `--ranks`, by default scaled to the expert's
width w (the smaller side of its weight matrices, i.e. the expert's intermediate size): 0, w/32, w/16,
w/8, w/4 -- for a 128-wide expert 0, 4, 8, 16, 32; for Qwen1.5-MoE's 1408 0, 44, 88, 176, 352. The
storage of a choice counts its fp16 factors exactly (`Choice.storage_bits`), so the knapsack weighs a
rank against a bit honestly.
"""
from __future__ import annotations

from typing import Iterable

from . import Method, Request, register_method
from ..quant.lowrank import RankTooLargeError
from ..units import Choice, Unit

DEFAULT_BITS = (2, 3, 4)
RANK_FRACTIONS = (0, 1 / 32, 1 / 16, 1 / 8, 1 / 4)


def expert_width(shapes: dict[Unit, tuple[int, int]]) -> int:
    """The smallest side of any unit's weight: the largest rank every unit can take."""
    return min(min(s) for s in shapes.values())


def default_ranks(width: int) -> tuple[int, ...]:
    return tuple(sorted({int(width * f) for f in RANK_FRACTIONS}))


def check_ranks(ranks: Iterable[int], shapes: dict[Unit, tuple[int, int]]) -> None:
    for r in ranks:
        if r < 0:
            raise RankTooLargeError(f"--ranks: ranks must be >= 0, got {r}")
        for u, (o, i) in shapes.items():
            if r > min(o, i):
                raise RankTooLargeError(
                    f"--ranks: rank {r} exceeds the smaller side of {u.name} [{o} x {i}] (at most {min(o, i)}); "
                    f"the default ranks for this model are {list(default_ranks(expert_width(shapes)))}")


def bt_choices(bits_set: Iterable[int], ranks: Iterable[int], group_size: int, quantizer: str) -> list[Choice]:
    """Every (bits, rank) pair, ordered by bits then rank."""
    return [Choice(b, group_size, quantizer, rank=r) for b in sorted(set(bits_set)) for r in sorted(set(ranks))]


# -- the `bt` method ----------------------------------------------------------------------------------

class BT(Method):
    name, solver, granularity = "bt", "ilp", "expert"
    description = "BT-MoE: (bits, rank) per expert, whole-expert loss + exact ILP"

    def choices(self, cfg, shapes=None) -> list[Choice]:
        """`--bits-set` x `--ranks` with the run's quantizer and group size; ranks default to the width's."""
        if shapes is None:
            raise ValueError(f"method {self.name!r} derives its choices from the model's weight shapes")
        ranks = cfg.ranks if cfg.ranks is not None else default_ranks(expert_width(shapes))
        check_ranks(ranks, shapes)
        return bt_choices(cfg.bits_set or DEFAULT_BITS, ranks, cfg.group_size, cfg.quantizer)

    def requests(self, ctx, measured):
        """Every unit x (bits, rank). At the expert granularity (the default, the paper's) the loss is the
        whole expert perturbed at once; at `--granularity linear` (or layer) each block on its own."""
        yield Request(tuple(ctx.units), tuple(ctx.choices), whole_expert=ctx.cfg.granularity_name == "expert")


register_method(BT())
