"""The `rl` method (DMPQ, seed 004): bits from {2, 4, 8, 16} per expert, chosen by a PPO agent that
trades accuracy against latency, memory and energy (`allocate/rl.py`, `rl/`).

    table     every unit x {2, 4, 8, 16} profiled (as mxmoe): the additive proxy of ΔAcc
    solver    `rl`, at expert granularity (gate/up/down of an expert share bits) unless told otherwise
    reward    R = w_acc ΔAcc - w_lat L - w_mem M - w_eng E   (`--reward w_acc,w_lat,w_mem,w_eng`)
              L: the budget's latency model (roofline on --gpu, or latency-fri with --cost latency-fri);
              M: exact storage bytes; E: `energy.py` (--energy); ΔAcc: the proxy, or measured
              (`--rl-accuracy measured`: NLL of the quantized model on held-out calibration windows)
    state     bits, f_u, c_u (gradient contribution), s_u (sensitivity: table or measured), costs, budget

`rl_solver_options` gives the solver what it needs beyond loss and cost whenever the solver is `rl` (also
for another method's table with `--solver rl`: `Method.solver_options` calls it).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import cost as costs
from ..energy import energy_matrix
from ..units import FP_BITS, Choice
from . import Context, Method, register_method

if TYPE_CHECKING:  # pragma: no cover
    from ..budget import Budget
    from ..table import SensitivityTable

DMPQ_BITS = (2, 4, 8, FP_BITS)
HELD_OUT_WINDOWS = 8  # validation windows for measured ΔAcc / sensitivity


def _held_out(ctx: Context):
    from ..data import held_out_windows, load_text, tokenize

    cfg = ctx.cfg
    ids = tokenize(ctx.tokenizer, load_text(cfg.calib, "calib"))
    return held_out_windows(ids, HELD_OUT_WINDOWS, cfg.calib_seqlen, cfg.nsamples, cfg.seed)


def rl_solver_options(ctx: Context, table: "SensitivityTable", budget: "Budget") -> dict:
    """Reward terms, state statistics and search settings for the `rl` solver of a run (in memory: the
    gradient contribution and measured terms run the model)."""
    from ..expert_stats import gradient_contribution, measured_sensitivity, table_sensitivity

    cfg, choices = ctx.cfg, table.choices
    shapes = [ctx.shapes[u] for u in table.units]
    freq = table.frequency
    if budget.kind == "latency":
        lat = budget.cost
    else:
        lat = costs.latency_matrix(shapes, freq, choices, cfg.gpu, cfg.batch_tokens, zero_points=cfg.zero_points)
        if cfg.cost == "latency-fri":
            from ..latency import latency_fri_matrix

            lat = latency_fri_matrix(shapes, freq, choices, cfg.batch_tokens, seed=cfg.seed, device=cfg.device)[0]
    objectives = {"lat": lat, "mem": costs.storage_matrix(shapes, choices, cfg.zero_points) / costs.BITS_PER_BYTE,
                  "eng": energy_matrix(shapes, freq, choices, cfg.batch_tokens, cfg.energy, cfg.zero_points)}
    contribution = ctx.timed("contribution_seconds", lambda: gradient_contribution(ctx.adapter, ctx.windows))
    scorer = None
    groups = ctx.groups
    if cfg.rl_accuracy == "measured" or cfg.rl_sensitivity == "measured":
        from ..plan_scorer import MeasuredLoss

        inverse = None if groups is None else np.unique(groups, return_inverse=True)[1].reshape(-1)
        scorer = MeasuredLoss(ctx.adapter, choices, _held_out(ctx), ctx.calib.inputs, cfg.act_order, cfg.batch_size)
    if cfg.rl_sensitivity == "measured":
        low = int(np.argmin([c.bits for c in choices]))
        sens = ctx.timed("sensitivity_seconds", lambda: measured_sensitivity(
            scorer, low, groups if groups is not None else np.arange(len(table.units))))
    else:
        sens = table_sensitivity(table, min(c.bits for c in choices))
    accuracy = None
    if cfg.rl_accuracy == "measured":
        scorer.inverse = inverse
        accuracy = scorer
    ctx.results["rl_statistics"] = {"f": "calibration frequency", "c": "Fisher-diagonal gradient contribution",
                                    "s": f"{cfg.rl_sensitivity} sensitivity at {min(c.bits for c in choices)} bits",
                                    "accuracy": cfg.rl_accuracy}
    return {"objectives": objectives, "features": np.column_stack([freq, contribution, sens]),
            "weights": tuple(cfg.reward), "steps": cfg.rl_steps, "seed": cfg.seed, "accuracy": accuracy}


class DMPQ(Method):
    """Every unit x {2, 4, 8, 16} measured (as mxmoe): the additive proxy the reward (and a knapsack) reads."""
    name, solver, granularity = "rl", "rl", "expert"
    description = "DMPQ: PPO over per-expert bits {2,4,8,16}, hardware-aware reward"

    def choices(self, cfg, shapes=None) -> list[Choice]:
        return [Choice(b, cfg.group_size, cfg.quantizer) for b in DMPQ_BITS]


register_method(DMPQ())
