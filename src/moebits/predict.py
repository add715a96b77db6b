"""Fill a sparse SensitivityTable: fit an estimator on the measured entries, predict the others.

The estimator is FRI (`FRIRegressor`) or any scikit-learn regressor (Table 4's baselines). FRI gets
the categorical columns as Hamming features; any other regressor gets them one-hot encoded and the
continuous columns standardised (`features.sklearn_pipeline`). Unquantized choices (16 bits) have no
quantization error by definition: their entries are 0, never fitted nor predicted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.base import clone

from .features import FeatureMatrix, FeatureSpec, build_features, sklearn_pipeline
from .fri import FRIRegressor
from .stats import CalibrationStats
from .table import SensitivityTable
from .units import Choice, Unit


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
              spec: FeatureSpec = FeatureSpec()) -> FittedPredictor:
    """Fit a clone of `estimator` (default: FRIRegressor()) on the table's measured, quantized entries."""
    features = build_features(stats.aligned(table.units), table.choices, spec)
    quantized = np.array([not c.is_fp for c in table.choices])  # [C]
    train_mask = table.measured & np.isfinite(table.error) & quantized[None, :]  # [U, C]
    train_rows = np.flatnonzero(train_mask.ravel())  # unit-major, like the feature rows
    if len(train_rows) == 0:
        raise ValueError("the table has no measured quantized entries to fit on")
    est = _prepare(FRIRegressor() if estimator is None else estimator, features)
    est.fit(features.X[train_rows], table.error.ravel()[train_rows])
    return FittedPredictor(est, features, train_rows)


def predict_table(table: SensitivityTable, fitted: FittedPredictor) -> SensitivityTable:
    """A new table: measured entries kept, every other entry predicted (`measured=False`).

    A measured entry holding NaN (a failed measurement) counts as unknown and is predicted too."""
    quantized = np.array([not c.is_fp for c in table.choices])  # [C]
    known = table.measured & np.isfinite(table.error)  # [U, C]
    error = np.where(known, table.error, np.nan)
    error[:, ~quantized] = np.where(known[:, ~quantized], error[:, ~quantized], 0.0)
    rows = np.flatnonzero((~known & quantized[None, :]).ravel())  # unit-major feature rows
    if len(rows):
        C = len(table.choices)
        error[rows // C, rows % C] = fitted.estimator.predict(fitted.features.X[rows])
    return SensitivityTable(list(table.units), list(table.choices), error=error, measured=known,
                            seconds=np.where(known, table.seconds, 0.0), frequency=table.frequency.copy())


def fit_predict_table(table: SensitivityTable, stats: CalibrationStats, estimator=None,
                      spec: FeatureSpec = FeatureSpec()) -> SensitivityTable:
    """Fit on the measured entries of `table`, fill the rest (marked `measured=False`)."""
    return predict_table(table, fit_table(table, stats, estimator, spec))


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
