"""Feature matrix for (unit, choice) pairs: the antecedents of FRI rules (paper Table 7) and the
inputs of any scikit-learn regressor that competes with FRI (paper Table 4).

One row per (unit, choice), **unit-major**: row `u * n_choices + c` describes `units[u]` under
`choices[c]`, so `table.error.ravel()` (C order) lines up with the rows and `divmod(row, n_choices)`
recovers `(u, c)`.

Everything is one float matrix `X [n_units * n_choices, n_features]`; categorical columns hold
integer codes and are listed in `FeatureMatrix.categorical`. `FRIRegressor(categorical_features=...)`
takes that list as is (Hamming distance on them); other regressors get them one-hot encoded through
`sklearn_pipeline` below.

Groups (switchable for the ablations of Tables 8, 10, 11), in the fixed column order:

| group  | columns                                              | why / transform |
|--------|------------------------------------------------------|-----------------|
| bits   | `bits`, and `act_bits` when some choice quantizes activations (W-A choices) | linear: log-error is close to linear in bits (each bit ~ /4 in MSE) |
| type   | `kind` (gate=0, up=1, down=2), `shared` (0/1)        | categorical, see below |
| scale  | `log_M`, `log_N`, `log_K`, `log_flops`, `log_ai`     | log1p: sizes span decades; M = 0 for never-routed experts |
| act    | one of `log_act_var`, `log_act_mean_abs`, `log_act_outlier_ratio`, `slog_act_kurtosis` | log: spans decades |
| weight | `log_weight_scale` (mean abs w)                      | log |
| wmax   | `log_weight_max_over_mean` (not in the paper)        | log; RTN error depends on the range of a group |
| depth  | `depth` in [0, 1] (not in the paper's error FRI)     | linear |
| rank   | `log1p_rank` (compensator rank, BT-MoE choices)      | log1p |
| proxy  | `log_proxy` (not in the paper): RTN weight-space error weighted by the input's second moments, per (unit, choice) (`proxy.py`) | log |

GEMM convention: the unit computes `(M x K) @ (K x N)` with M = routed calibration tokens, N = out
features, K = in features; FLOPs = 2MNK and the arithmetic-intensity proxy FLOPs / (K N b) = 2M / b.
In log space `log_flops` and `log_ai` are (nearly) linear combinations of `log_M`, `log_N`, `log_K`
and `bits`; we keep them because the paper does (they re-weight the distance towards M and bits).

Shared experts: a separate binary `shared` column instead of a fourth value of `kind`. Folding
"shared" into the type would make a shared expert's gate, up and down indistinguishable by type
(gate and up also share M, N, K and input statistics, so only the weight scale would tell them
apart), while a separate column keeps the sub-layer role and still puts a shared unit at Hamming
distance 1 from the routed unit of the same kind (2 from a routed unit of another kind).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...stats import CalibrationStats
from ...units import KINDS, Choice

GROUPS = ("bits", "type", "scale", "act", "weight", "wmax", "depth", "rank", "proxy")
PAPER_GROUPS = ("bits", "type", "scale", "act", "weight")
ACT_STATS = ("var", "mean_abs", "outlier", "kurtosis")
PROXY_GROUPS = PAPER_GROUPS + ("proxy",)  # moebits' default for the fri method (see methods.fill_fri)

# Table 8/10 rows. Their ticks cover only Bit / Act. Stats / Weight Scale, so type and scale -- never
# ticked, never ablated -- stay in every row; "bits_literal" is the other reading of "Bit-only".
ABLATIONS = {
    "full": PAPER_GROUPS,
    "no_act": ("bits", "type", "scale", "weight"),
    "no_weight": ("bits", "type", "scale", "act"),
    "bits_only": ("bits", "type", "scale"),
    "bits_literal": ("bits",),
}

_TINY = 1e-30  # floor before log for strictly positive statistics (var, mean |a|, mean |w|)
_OUTLIER_FLOOR = 1e-6  # outlier ratios are often exactly 0; below ~1e-6 they are sampling noise


@dataclass(frozen=True)
class FeatureSpec:
    groups: tuple[str, ...] = PAPER_GROUPS
    act_stat: str = "var"  # which activation statistic the `act` group uses (Table 11)

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))
        unknown = [g for g in self.groups if g not in GROUPS]
        if unknown:
            raise ValueError(f"unknown feature groups {unknown}; known: {GROUPS}")
        if not self.groups:
            raise ValueError("FeatureSpec needs at least one feature group")
        if self.act_stat not in ACT_STATS:
            raise ValueError(f"act_stat must be one of {ACT_STATS}, got {self.act_stat!r}")

    @classmethod
    def ablation(cls, name: str, act_stat: str = "var") -> "FeatureSpec":
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation {name!r}; known: {sorted(ABLATIONS)}")
        return cls(ABLATIONS[name], act_stat)


@dataclass
class FeatureMatrix:
    X: np.ndarray  # [n_units * n_choices, n_features] float64, unit-major rows
    names: list[str]  # [n_features]
    categorical: list[int] = field(default_factory=list)  # column indices holding integer codes
    categories: list[list[int]] = field(default_factory=list)  # all possible codes per categorical column
    n_units: int = 0
    n_choices: int = 0

    @property
    def continuous(self) -> list[int]:
        cat = set(self.categorical)
        return [j for j in range(self.X.shape[1]) if j not in cat]

    def row(self, unit_index: int, choice_index: int) -> int:
        return unit_index * self.n_choices + choice_index


def _log_pos(x: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(x, _TINY))


def _signed_log1p(x: np.ndarray) -> np.ndarray:
    # works for Pearson (>= 1) and excess (>= -2) kurtosis alike, and compresses heavy tails
    return np.sign(x) * np.log1p(np.abs(x))


def _act_column(stats: CalibrationStats, act_stat: str) -> tuple[str, np.ndarray]:
    if act_stat == "var":
        return "log_act_var", _log_pos(stats.act_var)
    if act_stat == "mean_abs":
        return "log_act_mean_abs", _log_pos(stats.act_mean_abs)
    if act_stat == "outlier":
        return "log_act_outlier_ratio", np.log(stats.act_outlier_ratio + _OUTLIER_FLOOR)
    return "slog_act_kurtosis", _signed_log1p(stats.act_kurtosis)


def _check_choices_distinguishable(choices: list[Choice], spec: FeatureSpec) -> None:
    """Two choices with equal feature rows would get equal predictions: refuse rather than mislead."""
    seen: dict[tuple, Choice] = {}
    for c in choices:
        key = ((c.bits, c.act_bits) if "bits" in spec.groups else None, c.rank if "rank" in spec.groups else None)
        if key in seen:
            raise ValueError(f"choices {seen[key].label} and {c.label} have the same features under groups "
                             f"{spec.groups}; add a group that tells them apart (e.g. 'rank') or drop one")
        seen[key] = c


def build_features(stats: CalibrationStats, choices: list[Choice], spec: FeatureSpec = FeatureSpec(),
                   proxy: np.ndarray | None = None) -> FeatureMatrix:
    """Feature rows for every (unit, choice) pair of `stats.units` x `choices`, unit-major.

    `proxy` [U, C] (`proxy.rtn_proxy(...).values`, rows aligned with `stats.units`) is needed by the
    `proxy` group."""
    _check_choices_distinguishable(choices, spec)
    U, C = len(stats), len(choices)
    per_unit: list[tuple[str, np.ndarray]] = []  # [U] columns, repeated over choices
    per_choice: list[tuple[str, np.ndarray]] = []  # [C] columns, tiled over units
    categorical_names = {"kind": list(range(len(KINDS))), "shared": [0, 1]}

    tokens = stats.tokens.astype(float)  # M
    out_f = stats.out_features.astype(float)  # N
    in_f = stats.in_features.astype(float)  # K
    bits = np.array([c.bits for c in choices], float)

    if "bits" in spec.groups:
        per_choice.append(("bits", bits))
        if any(c.quantizes_acts for c in choices):  # W-A choices: the activation width is a feature too
            per_choice.append(("act_bits", np.array([c.act_bits for c in choices], float)))
    if "rank" in spec.groups:
        per_choice.append(("log1p_rank", np.log1p(np.array([c.rank for c in choices], float))))
    if "type" in spec.groups:
        per_unit.append(("kind", stats.kind_index))
        per_unit.append(("shared", stats.is_shared.astype(float)))
    if "scale" in spec.groups:
        per_unit += [("log_M", np.log1p(tokens)), ("log_N", np.log1p(out_f)), ("log_K", np.log1p(in_f)),
                     ("log_flops", np.log1p(2 * tokens * out_f * in_f))]
    if "act" in spec.groups:
        per_unit.append(_act_column(stats, spec.act_stat))
    if "weight" in spec.groups:
        per_unit.append(("log_weight_scale", _log_pos(stats.weight_scale)))
    if "wmax" in spec.groups:
        per_unit.append(("log_weight_max_over_mean", _log_pos(stats.weight_max_over_mean)))
    if "depth" in spec.groups:
        per_unit.append(("depth", stats.depth))

    columns: dict[str, np.ndarray] = {}  # name -> [U * C]
    for name, v in per_unit:
        columns[name] = np.repeat(v, C)
    for name, v in per_choice:
        columns[name] = np.tile(v, U)
    if "proxy" in spec.groups:
        if proxy is None:
            raise ValueError("the 'proxy' feature group needs the proxy matrix (proxy.rtn_proxy) for every unit x choice")
        proxy = np.asarray(proxy, float)
        if proxy.shape != (U, C):
            raise ValueError(f"proxy has shape {proxy.shape}, expected ({U}, {C})")
        columns["log_proxy"] = _log_pos(proxy).ravel()
    if "scale" in spec.groups:
        # the AI proxy depends on both the unit (M) and the choice (b): FLOPs / (K N b) = 2M / b
        columns["log_ai"] = np.log1p(2 * np.repeat(tokens, C) / np.tile(bits, U))

    order = ["bits", "act_bits", "log_proxy", "log1p_rank", "kind", "shared", "log_M", "log_N", "log_K", "log_flops", "log_ai",
             "log_act_var", "log_act_mean_abs", "log_act_outlier_ratio", "slog_act_kurtosis",
             "log_weight_scale", "log_weight_max_over_mean", "depth"]
    names = [n for n in order if n in columns]
    X = np.stack([columns[n] for n in names], axis=1) if U * C else np.zeros((0, len(names)))
    categorical = [j for j, n in enumerate(names) if n in categorical_names]
    return FeatureMatrix(X=X, names=names, categorical=categorical,
                         categories=[categorical_names[names[j]] for j in categorical], n_units=U, n_choices=C)


def sklearn_pipeline(estimator, features: FeatureMatrix):
    """`estimator` behind one-hot encoding of the categorical columns and standardisation of the
    continuous ones -- the common preprocessing for the Table 4 baselines (Ridge, SVR, RF, GBM, MLP)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    parts = [("cont", StandardScaler(), features.continuous)]
    if features.categorical:
        # fixed categories: a held-out split or a fold may lack a kind, the encoding must not change
        onehot = OneHotEncoder(categories=[np.array(c, float) for c in features.categories],
                               handle_unknown="ignore", sparse_output=False)
        parts.insert(0, ("cat", onehot, features.categorical))
    return Pipeline([("encode", ColumnTransformer(parts)), ("regress", estimator)])
