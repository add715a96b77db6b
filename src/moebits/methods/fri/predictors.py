"""Fill a sparse SensitivityTable: fit an estimator on the measured entries, predict the others.

The estimator is FRI (`FRIRegressor`) or any scikit-learn regressor (Table 4's baselines). FRI gets
the categorical columns as Hamming features; any other regressor gets them one-hot encoded and the
continuous columns standardised (`features.sklearn_pipeline`). Unquantized choices (16 bits) have no
quantization error by definition: their entries are 0, never fitted nor predicted.

`make_estimator(name)` gives the named predictors of `--predictor` (`PREDICTORS`); all but `fri` regress
log error (`TransformedTargetRegressor`), since errors span ~3 decades and a raw-target regressor
predicts negative errors (results/fri_regressors.md).

The filled table is a *hybrid*: measured entries are kept as measured, predicted ones fill the rest.
With `unit_offset=True` a unit measured at some choices but not all (the adaptive sampler measures
pairs, not whole experts) also corrects its other predictions by its own mean log residual: the
estimator's error on a unit is nearly the same at every bit-width (on the demo with the proxy feature,
the sd over bits of log(error / proxy) within a unit is 0.06 vs 1.6 across units), so one measured
pair pins the whole row. A unit measured at every choice, or at none, is unaffected.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.base import clone

from .features import FeatureMatrix, FeatureSpec, build_features, sklearn_pipeline
from .interpolation import FRIRegressor

PREDICTORS = ("fri", "ridge", "knn", "gbm", "mlp")


def make_estimator(name: str, seed: int = 0):
    """The `--predictor` estimators: `fri` (the paper's FRIRegressor, its defaults) or a scikit-learn
    regressor of log error with the hyperparameters of results/fri_regressors.md."""
    if name == "fri":
        return FRIRegressor()
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import Ridge
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.neural_network import MLPRegressor

    regressors = {"ridge": lambda: Ridge(alpha=1.0),
                  "knn": lambda: KNeighborsRegressor(n_neighbors=4, weights="distance"),
                  "gbm": lambda: GradientBoostingRegressor(n_estimators=300, max_depth=3, random_state=seed),
                  "mlp": lambda: MLPRegressor(hidden_layer_sizes=(64, 64), max_iter=2000, random_state=seed)}
    if name not in regressors:
        raise ValueError(f"unknown predictor {name!r}; choose one of {PREDICTORS}")
    return TransformedTargetRegressor(regressors[name](), func=np.log, inverse_func=np.exp, check_inverse=False)
from ...stats import CalibrationStats
from ...table import SensitivityTable
from ...units import Choice, Unit


@dataclass
class FittedPredictor:
    estimator: object  # fitted; FRIRegressor or a Pipeline around the given regressor
    features: FeatureMatrix  # rows of every (unit, choice) of the table, unit-major
    train_rows: np.ndarray  # [n_train] feature rows the estimator was fitted on (= FRI rule i -> row)


def _prepare(estimator, features: FeatureMatrix):
    est = clone(estimator)
    if isinstance(est, FRIRegressor):
        return est.set_params(categorical_features=list(features.categorical))
    return sklearn_pipeline(est, features)


def fit_table(table: SensitivityTable, stats: CalibrationStats, estimator=None,
              spec: FeatureSpec = FeatureSpec(), proxy: np.ndarray | None = None,
              features: FeatureMatrix | None = None) -> FittedPredictor:
    """Fit a clone of `estimator` (default: FRIRegressor()) on the table's measured, quantized entries.
    `proxy` [U, C] (table order) feeds the `proxy` feature group; `features` reuses a built matrix."""
    if features is None:
        features = build_features(stats.aligned(table.units), table.choices, spec, proxy)
    quantized = np.array([not c.is_fp for c in table.choices])  # [C]
    train_mask = table.measured & np.isfinite(table.error) & quantized[None, :]  # [U, C]
    train_rows = np.flatnonzero(train_mask.ravel())  # unit-major, like the feature rows
    if len(train_rows) == 0:
        raise ValueError("the table has no measured quantized entries to fit on")
    est = _prepare(FRIRegressor() if estimator is None else estimator, features)
    est.fit(features.X[train_rows], table.error.ravel()[train_rows])
    return FittedPredictor(est, features, train_rows)


def unit_log_offsets(table: SensitivityTable, fitted: FittedPredictor) -> np.ndarray:
    """[U] mean of log(measured / in-sample prediction) over each unit's measured quantized entries
    (0 for a unit with none)."""
    quantized = np.array([not c.is_fp for c in table.choices])
    known = table.measured & np.isfinite(table.error) & quantized[None, :] & (table.error > 0)
    rows = np.flatnonzero(known.ravel())
    offset = np.zeros(len(table.units))
    if len(rows):
        C = len(table.choices)
        fit = np.maximum(fitted.estimator.predict(fitted.features.X[rows]), 1e-300)
        resid = np.log(table.error.ravel()[rows]) - np.log(fit)
        u = rows // C
        offset = np.bincount(u, resid, len(table.units)) / np.maximum(np.bincount(u, minlength=len(table.units)), 1)
    return offset


def predict_table(table: SensitivityTable, fitted: FittedPredictor, unit_offset: bool = False) -> SensitivityTable:
    """A new table: measured entries kept, every other entry predicted (`measured=False`); with
    `unit_offset`, a partly measured unit's predictions are scaled by exp(its mean log residual).

    A measured entry holding NaN (a failed measurement) counts as unknown and is predicted too."""
    quantized = np.array([not c.is_fp for c in table.choices])  # [C]
    known = table.measured & np.isfinite(table.error)  # [U, C]
    error = np.where(known, table.error, np.nan)
    error[:, ~quantized] = np.where(known[:, ~quantized], error[:, ~quantized], 0.0)
    rows = np.flatnonzero((~known & quantized[None, :]).ravel())  # unit-major feature rows
    if len(rows):
        C = len(table.choices)
        pred = fitted.estimator.predict(fitted.features.X[rows])
        if unit_offset:
            pred = pred * np.exp(unit_log_offsets(table, fitted)[rows // C])
        error[rows // C, rows % C] = pred
    return SensitivityTable(list(table.units), list(table.choices), error=error, measured=known,
                            seconds=np.where(known, table.seconds, 0.0), frequency=table.frequency.copy())


def fit_predict_table(table: SensitivityTable, stats: CalibrationStats, estimator=None,
                      spec: FeatureSpec = FeatureSpec(), proxy: np.ndarray | None = None,
                      unit_offset: bool = False) -> SensitivityTable:
    """Fit on the measured entries of `table`, fill the rest (marked `measured=False`)."""
    return predict_table(table, fit_table(table, stats, estimator, spec, proxy), unit_offset)


def explain_entry(table: SensitivityTable, fitted: FittedPredictor, unit: Unit, choice: Choice) -> list[dict]:
    """The anchors an FRI prediction came from: one dict per neighbour rule, nearest first."""
    if not isinstance(fitted.estimator, FRIRegressor):
        raise TypeError("only an FRIRegressor prediction can be explained by its rules")
    row = fitted.features.row(table.unit_index(unit), table.choice_index(choice))
    ex = fitted.estimator.explain(fitted.features.X[row:row + 1])
    out = []
    for k in range(ex.rule_index.shape[1]):
        u, c = divmod(int(fitted.train_rows[ex.rule_index[0, k]]), fitted.features.n_choices)
        out.append({"unit": table.units[u].name, "choice": table.choices[c].label,
                    "error": float(ex.rule_target[0, k]), "distance": float(ex.distance[0, k]),
                    "weight": float(ex.weight[0, k]), "firing": float(ex.firing[0, k])})
    return out
