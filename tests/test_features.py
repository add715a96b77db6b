import numpy as np
import pytest
from sklearn.linear_model import Ridge

from moebits.methods.fri.features import ABLATIONS, FeatureSpec, build_features, sklearn_pipeline
from moebits.stats import CalibrationStats, UnitStats
from moebits.units import Choice, Unit

CHOICES = [Choice(2), Choice(3), Choice(4), Choice(8)]


def make_stats(n_layers=3, n_experts=2, hidden=64, inter=32, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for layer in range(n_layers):
        for expert in [*range(n_experts), "shared"]:
            tokens = 1000 if expert == "shared" else int(rng.integers(0, 300))
            for kind in ("gate", "up", "down"):
                n, k = (hidden, inter) if kind == "down" else (inter, hidden)
                out.append(UnitStats(Unit(layer, expert, kind), n, k, tokens, tokens / 1000, float(tokens),
                                     act_var=float(rng.uniform(1e-3, 10)), act_mean_abs=float(rng.uniform(0.1, 1)),
                                     act_outlier_ratio=float(rng.choice([0.0, 1e-3])), act_kurtosis=float(rng.uniform(-1, 50)),
                                     weight_scale=float(rng.uniform(0.01, 0.1)), weight_max_over_mean=float(rng.uniform(5, 20)),
                                     num_layers=n_layers))
    return CalibrationStats.from_rows(out, total_tokens=1000)


def test_paper_features_shape_names_and_unit_major_rows():
    stats = make_stats()
    f = build_features(stats, CHOICES)
    assert f.X.shape == (len(stats) * len(CHOICES), len(f.names))
    assert f.names == ["bits", "kind", "shared", "log_M", "log_N", "log_K", "log_flops", "log_ai",
                       "log_act_var", "log_weight_scale"]
    assert [f.names[j] for j in f.categorical] == ["kind", "shared"]
    assert f.categories == [[0, 1, 2], [0, 1]]
    col = {n: j for j, n in enumerate(f.names)}
    for u in (0, 5, len(stats) - 1):
        s = stats[u]
        for c, choice in enumerate(CHOICES):
            x = f.X[f.row(u, c)]
            assert f.row(u, c) == u * len(CHOICES) + c
            assert x[col["bits"]] == choice.bits
            assert x[col["kind"]] == ("gate", "up", "down").index(s.unit.kind)
            assert x[col["shared"]] == float(s.unit.is_shared)
            assert x[col["log_N"]] == pytest.approx(np.log1p(s.out_features))
            assert x[col["log_K"]] == pytest.approx(np.log1p(s.in_features))
            assert x[col["log_flops"]] == pytest.approx(np.log1p(2 * s.tokens * s.out_features * s.in_features))
            assert x[col["log_ai"]] == pytest.approx(np.log1p(2 * s.tokens / choice.bits))
            assert x[col["log_act_var"]] == pytest.approx(np.log(s.act_var))
    assert np.isfinite(f.X).all()  # M = 0 (never routed) and outlier ratio 0 must not give -inf


def test_groups_switch_columns_on_and_off():
    stats = make_stats()
    no_act = build_features(stats, CHOICES, FeatureSpec.ablation("no_act"))
    assert "log_act_var" not in no_act.names and "log_weight_scale" in no_act.names
    bits_only = build_features(stats, CHOICES, FeatureSpec(("bits",)))
    assert bits_only.names == ["bits"] and bits_only.categorical == []
    extra = build_features(stats, CHOICES, FeatureSpec(("bits", "depth", "wmax", "type")))
    assert extra.names == ["bits", "kind", "shared", "log_weight_max_over_mean", "depth"]
    assert extra.categorical == [1, 2]
    depth = extra.X[:, extra.names.index("depth")]
    assert depth.min() == 0.0 and depth.max() == 1.0
    assert set(ABLATIONS) >= {"full", "no_act", "no_weight", "bits_only"}


@pytest.mark.parametrize("act_stat,name", [("var", "log_act_var"), ("mean_abs", "log_act_mean_abs"),
                                           ("outlier", "log_act_outlier_ratio"), ("kurtosis", "slog_act_kurtosis")])
def test_act_stat_selects_one_activation_column(act_stat, name):
    f = build_features(make_stats(), CHOICES, FeatureSpec(act_stat=act_stat))
    assert [n for n in f.names if "act" in n] == [name]
    assert np.isfinite(f.X).all()


def test_invalid_specs_and_indistinguishable_choices_are_refused():
    with pytest.raises(ValueError, match="unknown feature groups"):
        FeatureSpec(("bits", "colour"))
    with pytest.raises(ValueError, match="act_stat"):
        FeatureSpec(act_stat="median")
    with pytest.raises(ValueError, match="same features"):
        build_features(make_stats(), [Choice(4, 128), Choice(4, 64)])
    f = build_features(make_stats(), [Choice(4, rank=0), Choice(4, rank=32)], FeatureSpec(("bits", "rank")))
    assert f.names == ["bits", "log1p_rank"]


def test_sklearn_pipeline_one_hot_encodes_even_unseen_kinds():
    stats = make_stats()
    f = build_features(stats, CHOICES)
    y = np.exp(-f.X[:, 0])
    is_down = f.X[:, f.names.index("kind")] == 2
    model = sklearn_pipeline(Ridge(alpha=1e-3), f).fit(f.X[~is_down], y[~is_down])  # no "down" in training
    pred = model.predict(f.X)
    assert pred.shape == (len(f.X),) and np.isfinite(pred).all()
    encoded = model.named_steps["encode"].transform(f.X[:2])
    assert encoded.shape[1] == len(f.continuous) + 3 + 2  # kind one-hot (3) + shared one-hot (2)
