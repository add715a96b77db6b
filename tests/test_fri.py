import numpy as np
import pytest
from sklearn.base import clone
from sklearn.compose import TransformedTargetRegressor
from sklearn.linear_model import Ridge

from moebits.methods.fri.interpolation import FRIRegressor
from moebits.methods.fri.predictors import explain_entry, fit_predict_table, fit_table
from moebits.table import SensitivityTable
from moebits.units import Choice

from test_features import make_stats

BITS = np.array([2, 3, 4, 8])


def synthetic(n, seed):
    """columns: bits, log act variance, kind (categorical); y = exp(-bits) * g(var) * kind factor."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.choice(BITS, n), rng.uniform(-3, 3, n), rng.integers(0, 3, n)])
    return X, truth(X)


def truth(X):
    return np.exp(-X[:, 0]) * (1 + np.exp(0.5 * X[:, 1])) * np.array([1.0, 1.5, 3.0])[X[:, 2].astype(int)]


def eq4_distance(xq, rules, sigma, cat):
    cont = [j for j in range(rules.shape[1]) if j not in cat]
    d2 = (((xq[cont] - rules[:, cont]) / sigma) ** 2).sum(1) + (xq[cat] != rules[:, cat]).sum(1)
    return np.sqrt(d2)


@pytest.mark.parametrize("target", ["log", "linear"])
def test_reproduces_anchors_exactly(target):
    X, y = synthetic(300, 0)
    fri = FRIRegressor(n_neighbors=6, epsilon=1e-9, categorical_features=[2], target=target).fit(X, y)
    np.testing.assert_allclose(fri.predict(X), y, rtol=1e-5)


@pytest.mark.parametrize("target", ["log", "linear"])
def test_prediction_bounded_by_neighbours(target):
    X, y = synthetic(200, 1)
    Xq, _ = synthetic(500, 2)
    fri = FRIRegressor(n_neighbors=5, epsilon=0.1, categorical_features=[2], target=target).fit(X, y)
    ex = fri.explain(Xq)
    assert np.all(ex.prediction >= ex.rule_target.min(1) * (1 - 1e-12))
    assert np.all(ex.prediction <= ex.rule_target.max(1) * (1 + 1e-12))
    np.testing.assert_allclose(ex.weight.sum(1), 1.0)
    np.testing.assert_allclose(ex.prediction, fri.predict(Xq))
    np.testing.assert_array_equal(ex.rule_target, y[ex.rule_index])
    assert np.all(np.diff(ex.distance, axis=1) >= -1e-12)  # nearest first


def test_interpolates_smooth_function_and_beats_constant():
    X, y = synthetic(400, 3)
    Xq, yq = synthetic(2000, 4)
    for target in ("log", "linear"):
        pred = FRIRegressor(n_neighbors=4, categorical_features=[2], target=target).fit(X, y).predict(Xq)
        log_err = np.abs(np.log(pred) - np.log(yq))
        const_err = np.abs(np.log(np.exp(np.log(y).mean())) - np.log(yq))
        assert np.median(log_err) < 0.15, target
        assert log_err.mean() < 0.2 * const_err.mean(), target
        rel_mae = np.abs(pred - yq).mean() / np.abs(yq - y.mean()).mean()
        assert rel_mae < 0.3, target


def test_distance_is_eq4_with_hamming_on_categoricals():
    X, y = synthetic(100, 5)
    fri = FRIRegressor(n_neighbors=100, categorical_features=[2]).fit(X, y)
    Xq, _ = synthetic(7, 6)
    ex = fri.explain(Xq)
    sigma = X[:, :2].std(0)
    for q in range(len(Xq)):
        expected = eq4_distance(Xq[q], X[ex.rule_index[q]], sigma, [2])
        np.testing.assert_allclose(ex.distance[q], expected, atol=1e-6)


def test_query_differing_only_in_type_is_at_distance_one():
    X = np.array([[2.0, 0.0, 0.0], [8.0, 3.0, 1.0], [4.0, -3.0, 2.0]])
    fri = FRIRegressor(n_neighbors=1, categorical_features=[2]).fit(X, np.array([1.0, 2.0, 3.0]))
    q = np.array([[2.0, 0.0, 1.0], [2.0, 0.0, 7.0]])  # kind changed to a seen (1) and an unseen (7) code
    ex = fri.explain(q)
    np.testing.assert_array_equal(ex.rule_index[:, 0], [0, 0])
    np.testing.assert_allclose(ex.distance[:, 0], [1.0, 1.0], atol=1e-6)
    assert np.all(ex.firing[:, 0] == 0.0)  # the singleton membership of the type does not match
    assert fri.explain(X[:1]).firing[0, 0] == pytest.approx(1.0)


def test_constant_feature_does_not_enter_the_distance():
    X, y = synthetic(50, 7)
    X_const = np.column_stack([X, np.full(len(X), 5.0)])
    q = np.column_stack([X[:3] + 0.1, np.full(3, 100.0)])
    a = FRIRegressor(categorical_features=[2]).fit(X, y).explain(q[:, :3])
    b = FRIRegressor(categorical_features=[2]).fit(X_const, y).explain(q)
    np.testing.assert_allclose(a.distance, b.distance)


def test_log_and_linear_targets_differ_and_log_needs_positive_y():
    X, y = synthetic(100, 8)
    Xq, _ = synthetic(50, 9)
    p_log = FRIRegressor(target="log").fit(X, y).predict(Xq)
    p_lin = FRIRegressor(target="linear").fit(X, y).predict(Xq)
    assert np.all(p_log <= p_lin + 1e-12)  # weighted geometric mean <= weighted arithmetic mean
    assert not np.allclose(p_log, p_lin)
    with pytest.raises(ValueError, match="positive"):
        FRIRegressor(target="log").fit(X, y - 1.0)
    FRIRegressor(target="linear").fit(X, y - 1.0)
    with pytest.raises(ValueError, match="target"):
        FRIRegressor(target="sqrt").fit(X, y)


def test_sklearn_clone_and_params():
    fri = FRIRegressor(n_neighbors=3, epsilon=0.01, categorical_features=[2], target="linear")
    c = clone(fri)
    assert c.get_params() == fri.get_params() and c is not fri
    assert c.set_params(n_neighbors=5).n_neighbors == 5
    X, y = synthetic(30, 10)
    assert FRIRegressor(n_neighbors=100).fit(X, y).predict(X[:2]).shape == (2,)  # K clipped to #rules


def make_table(stats, choices, measured_units):
    table = SensitivityTable([s.unit for s in stats], choices)
    for u, s in enumerate(stats):
        for c, ch in enumerate(choices):
            if ch.is_fp:
                continue
            table.error[u, c] = np.exp(-ch.bits) * s.act_var * (3.0 if s.unit.kind == "down" else 1.0)
    table.measured[:] = False
    table.measured[measured_units] = True
    truth = table.error.copy()
    table.error[~table.measured] = np.nan
    table.frequency[:] = [s.frequency for s in stats]
    return table, truth


@pytest.mark.parametrize("estimator", [None, Ridge(alpha=1e-3),
                                       TransformedTargetRegressor(Ridge(alpha=1e-3), func=np.log, inverse_func=np.exp)])
def test_fit_predict_table_fills_unmeasured_and_keeps_measured(estimator):
    stats = make_stats(n_layers=4, n_experts=6)
    choices = [Choice(2), Choice(3), Choice(4), Choice(8), Choice(16)]
    measured = np.array([s.unit.expert in (0, 3, "shared") for s in stats])  # anchor experts: all 3 kinds
    table, truth = make_table(stats, choices, measured)
    filled = fit_predict_table(table, stats, estimator)
    assert filled.complete and filled is not table
    np.testing.assert_array_equal(filled.measured[:, :4], table.measured[:, :4])
    assert not filled.measured[:, 4].any()  # a NaN "measurement" is not a measurement
    np.testing.assert_array_equal(filled.error[measured, :4], table.error[measured, :4])
    np.testing.assert_array_equal(filled.error[:, 4], 0.0)  # 16 bits: no quantization error
    assert np.isnan(table.error[~measured]).all()  # the input table is not modified
    if estimator is None:  # FRI: predictions within the range of the measured errors
        q = filled.error[~measured][:, :4]
        assert q.min() >= np.nanmin(table.error[:, :4]) and q.max() <= np.nanmax(table.error[:, :4])
        spearman = np.corrcoef(np.argsort(np.argsort(q.ravel())), np.argsort(np.argsort(truth[~measured][:, :4].ravel())))[0, 1]
        assert spearman > 0.8


def test_explain_entry_names_the_anchor_rules():
    stats = make_stats(n_layers=3, n_experts=4)
    choices = [Choice(2), Choice(4)]
    measured = np.arange(len(stats)) % 2 == 0
    table, _ = make_table(stats, choices, measured)
    fitted = fit_table(table, stats)
    unit = table.units[int(np.flatnonzero(~measured)[0])]
    rules = explain_entry(table, fitted, unit, choices[1])
    assert len(rules) == min(FRIRegressor().n_neighbors, 2 * measured.sum())  # default K
    measured_names = {table.units[i].name for i in np.flatnonzero(measured)}
    assert all(r["unit"] in measured_names for r in rules)
    assert sum(r["weight"] for r in rules) == pytest.approx(1.0)
    assert rules[0]["distance"] <= rules[-1]["distance"]


@pytest.mark.parametrize("target", ["log", "linear"])
def test_passes_sklearn_estimator_checks(target):
    import warnings

    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(FRIRegressor(target=target), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert failed == []
