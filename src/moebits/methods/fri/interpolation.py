"""Fuzzy rule interpolation (FRI-MxMoE, Eq. 2-5) as a scikit-learn regressor.

This is the paper-faithful predictor (`--predictor fri`). It is not moebits' default: on the demo,
Ridge on log error with the RTN proxy feature predicts better under anchor-only cross-validation and
gives plans whose true objective is far closer to the full-profiling optimum (results/fri_rules*.md).
With the proxy feature and adaptive (pair-wise, uneven) rules FRI's plans are far worse still; a
likely reason is that its prediction is a convex combination of neighbouring rules, so it cannot
extrapolate to a unit more (or less) sensitive than every rule near it, and a unit's own measured pair
does not correct its other bit-widths (in-sample FRI reproduces a rule exactly: offset 0).

Rules. Every training sample (an anchor: one profiled unit at one bit-width) becomes a rule (Eq. 3)
    R_i: IF x_1 is A_1^(i) and ... and x_d is A_d^(i) THEN y is y^(i)
whose antecedent for a continuous feature j is the triangle of Eq. 2 centred at the anchor's value,
    mu_ij(x) = max(0, 1 - |x - c_ij| / w_j),   w_j = sigma_j (the feature's std over the rules),
and for a categorical feature the singleton (1 if equal, else 0).

Prediction. The rule base is sparse: a query usually fires no rule at all (some mu_ij = 0), so the
answer is interpolated (Eq. 5) from the K rules nearest in the heterogeneous distance of Eq. 4,
    D(x, R_i)^2 = sum_cont ((x_j - c_ij) / sigma_j)^2 + sum_cat [x_j != c_ij],
    y_hat = sum_i w_i y_i / sum_i w_i,   w_i = 1 / (D(x, R_i) + epsilon).
The memberships and the distance use the same scale sigma_j, so inside a triangle's support the
continuous distance is D_cont = sum_j (1 - mu_ij)^2: the distance *is* the membership shortfall,
and Eq. 4 continues it linearly beyond the support, where every mu is 0. The membership functions
therefore do not change the numeric prediction (which is exactly Eq. 5); `explain` reports each
neighbour's firing strength (min over features of mu_ij) so a user sees whether a prediction came
from rules that match the query (strength > 0) or from interpolation between non-firing ones.

target="log" interpolates log y (a weighted geometric mean of the neighbours' errors), "linear"
interpolates y. Both are convex combinations, so min_i y_i <= y_hat <= max_i y_i (Appendix F).
The defaults (target="log", K=4, epsilon=1e-6) are the ones chosen on the demo model by
`benchmarks/bench_fri_prediction.py` (results/fri_prediction_hparams.md): a 5-fold cross-validation
over the anchor experts only (never the held-out units), 25 stratified anchor sets at 5-25 % of the
units, grid target x K in {1,2,4,8,16,32} x epsilon in {1e-6, 0.1, 1}. "log" beats "linear" at every
K (CV within-bit rho 0.810 vs 0.791 at best; the errors span ~3 decades across bit-widths), K=4
beats the former default K=8 (0.810 vs 0.797), and epsilon hardly matters below 1.

Search. One-hot encoding each categorical feature with entries 1/sqrt(2) makes the squared
Euclidean distance between two codes 0 if equal and 1/2 + 1/2 = 1 otherwise, i.e. Hamming; with the
continuous columns divided by sigma_j, the Euclidean distance in that space is exactly D of Eq. 4,
so scikit-learn's exact `NearestNeighbors` finds the K nearest rules (no chunking of our own).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.validation import check_is_fitted, validate_data

_HALF_SQRT2 = 1.0 / np.sqrt(2.0)


@dataclass
class Explanation:
    """Why each query got its prediction: the rules (training rows) it was interpolated from."""
    prediction: np.ndarray  # [n]
    rule_index: np.ndarray  # [n, K] training-row index of each neighbour, nearest first
    distance: np.ndarray  # [n, K] D(x, R_i) of Eq. 4
    weight: np.ndarray  # [n, K] normalised IDW weight alpha_i (rows sum to 1)
    rule_target: np.ndarray  # [n, K] y_i of each neighbour
    firing: np.ndarray  # [n, K] firing strength min_j mu_ij in [0, 1] (0 = rule does not fire)


class FRIRegressor(RegressorMixin, BaseEstimator):
    """Fuzzy rule interpolation: K-nearest inverse-distance weighting over a sparse rule base.

    Parameters
    ----------
    n_neighbors : K, the number of rules interpolated (clipped to the number of rules). The paper
        does not state its K; 4 is the anchor-only cross-validation choice of
        `benchmarks/bench_fri_prediction.py` on the demo model (2 and 8 are within 0.012 CV rho).
    epsilon : IDW smoothing of Eq. 5, in units of the normalised distance; w_i = 1 / (D_i + epsilon).
        Small by default (the paper's "prevents division by zero"), so anchors are reproduced; the
        same benchmark finds 1e-6, 0.1 and 1 within 0.002 CV rho of each other.
    categorical_features : column indices compared by equality (Hamming) instead of distance.
    target : "log" interpolates log y (needs y > 0), "linear" interpolates y.
    """

    def __init__(self, n_neighbors: int = 4, epsilon: float = 1e-6, categorical_features=None, target: str = "log"):
        self.n_neighbors = n_neighbors
        self.epsilon = epsilon
        self.categorical_features = categorical_features
        self.target = target

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.positive_only = self.target == "log"
        return tags

    # ---------------------------------------------------------------- fitting
    def fit(self, X, y):
        X, y = validate_data(self, X, y, y_numeric=True, dtype=np.float64)
        if self.target not in ("log", "linear"):
            raise ValueError(f"target must be 'log' or 'linear', got {self.target!r}")
        if not (isinstance(self.n_neighbors, (int, np.integer)) and self.n_neighbors >= 1):
            raise ValueError(f"n_neighbors must be a positive integer, got {self.n_neighbors!r}")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0 (it keeps w_i finite at a rule), got {self.epsilon!r}")
        if self.target == "log" and np.any(y <= 0):
            raise ValueError("target='log' needs positive targets (errors); use target='linear' for y <= 0")

        cat = self._categorical_indices(X.shape[1])
        cont = np.setdiff1d(np.arange(X.shape[1]), cat)
        sigma = X[:, cont].std(axis=0) if len(X) else np.ones(len(cont))
        # a feature constant over the rules adds the same amount to every rule's distance: it cannot
        # rank rules, only blur the weights, so it is left out (scale inf -> contribution 0)
        self.scale_ = np.where(sigma > 0, sigma, np.inf)  # [n_cont] sigma_j = triangle width w_j
        self.continuous_features_ = cont
        self.categorical_features_ = cat
        self.categories_ = [np.unique(X[:, j]) for j in cat]  # codes seen in the rules, per categorical column
        self.rules_ = X  # [n_rules, d] antecedent centres c_i
        self.rule_targets_ = y  # [n_rules] consequents y_i
        self._interp_targets = np.log(y) if self.target == "log" else y
        self.nn_ = NearestNeighbors(n_neighbors=min(self.n_neighbors, len(X))).fit(self._embed(X))
        return self

    def _categorical_indices(self, d: int) -> np.ndarray:
        if self.categorical_features is None:
            return np.zeros(0, dtype=int)
        idx = np.asarray(self.categorical_features)
        if idx.dtype == bool:
            if idx.shape != (d,):
                raise ValueError(f"boolean categorical_features must have length {d}, got {idx.shape}")
            return np.flatnonzero(idx)
        idx = np.unique(idx.astype(int))
        if idx.size and (idx.min() < 0 or idx.max() >= d):
            raise ValueError(f"categorical_features {idx.tolist()} out of range for {d} features")
        return idx

    def _embed(self, X: np.ndarray) -> np.ndarray:
        """[n, d] features -> [n, d'] space whose Euclidean distance is D of Eq. 4."""
        parts = [X[:, self.continuous_features_] / self.scale_]
        for j, codes in zip(self.categorical_features_, self.categories_):
            # one column per code seen in the rules plus one for "unseen": an unseen code is then at
            # distance 1 from every rule, as Hamming says, instead of 1/2
            pos = np.searchsorted(codes, X[:, j])
            known = (pos < len(codes)) & (codes[np.minimum(pos, len(codes) - 1)] == X[:, j])
            onehot = np.zeros((len(X), len(codes) + 1))
            onehot[np.arange(len(X)), np.where(known, pos, len(codes))] = _HALF_SQRT2
            parts.append(onehot)
        return np.hstack(parts)

    # ---------------------------------------------------------------- inference
    def _neighbors(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> distance [n, K], rule_index [n, K], normalised weights alpha [n, K]."""
        distance, rule_index = self.nn_.kneighbors(self._embed(X))
        w = 1.0 / (distance + self.epsilon)
        return distance, rule_index, w / w.sum(axis=1, keepdims=True)

    def _interpolate(self, rule_index: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        z = (alpha * self._interp_targets[rule_index]).sum(axis=1)
        return np.exp(z) if self.target == "log" else z

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        _, rule_index, alpha = self._neighbors(X)
        return self._interpolate(rule_index, alpha)

    def firing_strength(self, X, rule_index: np.ndarray) -> np.ndarray:
        """min over features of mu_ij(x) for query rows X [n, d] and rules rule_index [n, K]."""
        check_is_fitted(self)
        X = np.asarray(X, dtype=np.float64)
        centres = self.rules_[rule_index]  # [n, K, d]
        cont, cat = self.continuous_features_, self.categorical_features_
        mu_cont = np.maximum(0.0, 1.0 - np.abs(X[:, None, cont] - centres[:, :, cont]) / self.scale_)
        mu_cat = (X[:, None, cat] == centres[:, :, cat]).astype(float)
        mu = np.concatenate([mu_cont, mu_cat], axis=2)
        return mu.min(axis=2) if mu.shape[2] else np.ones(rule_index.shape)

    def explain(self, X) -> Explanation:
        """Prediction plus the K rules behind it (indices into the training rows), nearest first."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        distance, rule_index, alpha = self._neighbors(X)
        return Explanation(prediction=self._interpolate(rule_index, alpha), rule_index=rule_index,
                           distance=distance, weight=alpha, rule_target=self.rule_targets_[rule_index],
                           firing=self.firing_strength(X, rule_index))
