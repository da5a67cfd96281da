"""Explanations: the models' analytic input gradients, saliency, integrated gradients and
their completeness, permutation importance, shap's additivity, attribution heat maps."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from optim_core import datasets, fit, models
from optim_core.integrations import explain

RNG = np.random.default_rng(3)


def _numeric_input_gradient(model, X, seed, eps=1e-6):
    """Central differences of sum(seed * forward(X)) with respect to each input."""
    out = np.zeros_like(X)
    for i in range(X.shape[0]):
        for j in range(X.shape[1]):
            shifted = [X.copy(), X.copy()]
            shifted[0][i, j] += eps
            shifted[1][i, j] -= eps
            values = [np.sum(seed * model.forward(np, model.params, s)) for s in shifted]
            out[i, j] = (values[0] - values[1]) / (2 * eps)
    return out


MODELS = {
    "linear": lambda: models.LinearRegression(4),
    "logistic": lambda: models.LogisticRegression(4),
    "softmax": lambda: models.SoftmaxRegression(4, 3),
    "mlp-tanh": lambda: models.MLP([4, 6, 5, 3], activation="tanh"),
    "mlp-sigmoid": lambda: models.MLP([4, 6, 3], activation="sigmoid"),
    "mlp-relu-regression": lambda: models.MLP([4, 7, 2], task="regression"),
    "mlp-relu-1-output": lambda: models.MLP([4, 7, 1], task="regression"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_input_gradients_are_the_exact_derivatives(name):
    model = MODELS[name]()
    X = RNG.normal(size=(5, 4))
    model.init_params(X, seed=1)
    if isinstance(model, (models.LinearRegression, models.LogisticRegression,
                          models.SoftmaxRegression)):
        model.params = {k: v + RNG.normal(size=v.shape) for k, v in model.params.items()}
    outputs = model.forward(np, model.params, X)
    seed = RNG.normal(size=outputs.shape)
    analytic = model.input_gradient(np, model.params, X, seed)
    np.testing.assert_allclose(analytic, _numeric_input_gradient(model, X, seed), rtol=1e-6,
                               atol=1e-8)


@pytest.fixture(scope="module")
def digits_model():
    digits = datasets.load("digits", seed=0)
    model = models.MLP([64, 32, 10])
    fit(model, digits.X_train, digits.y_train, optimizer="adam", lr=0.003, epochs=10,
        batch_size=32, seed=0, progress=False)
    return model, digits


def test_integrated_gradients_are_complete_within_one_percent_on_digits(digits_model):
    model, digits = digits_model
    X = digits.X_test
    attributions, delta = explain.integrated_gradients(model, X, return_delta=True)
    assert attributions.shape == X.shape
    predicted = model.predict(X)
    gap = explain.model_output(model, X) - explain.model_output(model, np.zeros_like(X),
                                                                target=predicted)
    np.testing.assert_allclose(delta, attributions.sum(axis=1) - gap, atol=1e-12)
    relative = np.abs(delta) / np.abs(gap)
    assert relative.max() < 0.01, relative.max()  # every test image, default 64 nodes
    # Pixels equal to the (black) baseline get no attribution.
    assert np.all(attributions[X == 0] == 0)


def test_samples_are_integrated_in_chunks_with_the_same_result(digits_model, monkeypatch):
    model, digits = digits_model
    X = digits.X_test[:50]
    whole = explain.integrated_gradients(model, X, steps=16)
    monkeypatch.setattr(explain, "_ELEMENTS_PER_PASS", 16 * 64 * 7)  # 7 samples a pass
    np.testing.assert_allclose(explain.integrated_gradients(model, X, steps=16), whole,
                               rtol=1e-12, atol=1e-15)


def test_more_nodes_make_the_path_integral_more_accurate(digits_model):
    model, digits = digits_model
    X = digits.X_test[:40]
    errors = {}
    for method in explain.METHODS:
        for steps in (8, 64):
            _, delta = explain.integrated_gradients(model, X, steps=steps, method=method,
                                                    output="logit", return_delta=True)
            errors[method, steps] = np.median(np.abs(delta))
        assert errors[method, 64] < errors[method, 8]


def test_integrated_gradients_of_a_linear_model_are_exact(xp):
    model = models.SoftmaxRegression(4, 3)
    X = RNG.normal(size=(6, 4))
    model.params = {"W": xp.asarray(RNG.normal(size=(4, 3))), "b": xp.asarray(np.zeros(3))}
    baseline = RNG.normal(size=4)
    attributions = explain.integrated_gradients(model, xp.asarray(X), baseline=baseline,
                                                target=2, steps=3, output="logit")
    W = xp.to_numpy(model.params["W"])
    np.testing.assert_allclose(xp.to_numpy(attributions), (X - baseline) * W[:, 2],
                               rtol=1e-12)


def test_saliency_is_the_gradient_of_the_target(xp):
    model = models.MLP([4, 6, 3])
    X = xp.asarray(RNG.normal(size=(5, 4)))
    model.init_params(X, seed=2)
    raw = explain.saliency(model, X, target=1, output="logit", absolute=False)
    seed = np.zeros((5, 3))
    seed[:, 1] = 1
    np.testing.assert_allclose(xp.to_numpy(raw), xp.to_numpy(model.input_gradient(
        xp.xp, model.params, X, xp.asarray(seed))), rtol=1e-12)
    np.testing.assert_allclose(xp.to_numpy(explain.saliency(model, X, target=1,
                                                            output="logit")),
                               np.abs(xp.to_numpy(raw)))
    times_input = explain.saliency(model, X, target=1, output="logit", times_input=True)
    np.testing.assert_allclose(xp.to_numpy(times_input), xp.to_numpy(X) * xp.to_numpy(raw))


def test_bad_targets_and_baselines_are_refused():
    model = models.SoftmaxRegression(4, 3)
    X = RNG.normal(size=(6, 4))
    model.init_params(X, seed=0)
    with pytest.raises(ValueError, match="below 3"):
        explain.integrated_gradients(model, X, target=3)
    with pytest.raises(ValueError, match="one index per sample"):
        explain.integrated_gradients(model, X, target=np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="baseline"):
        explain.integrated_gradients(model, X, baseline=np.zeros(3))
    with pytest.raises(ValueError, match="output"):
        explain.integrated_gradients(model, X, output="margin")


def test_permutation_importance_finds_the_feature_the_model_uses():
    X = RNG.normal(size=(200, 4))
    y = (X[:, 2] > 0).astype(np.int64)
    model = models.LogisticRegression(4)
    fit(model, X, y, optimizer="adam", lr=0.1, epochs=30, progress=False, seed=0)
    result = explain.permutation_importance(model, X, y, n_repeats=3)
    assert int(np.argmax(result.importances_mean)) == 2
    assert result.importances_mean[2] > 0.3


def test_shap_kernel_explainer_on_the_estimator_is_additive():
    shap = pytest.importorskip("shap")
    from optim_core.sklearn import Classifier

    X = RNG.normal(size=(120, 4))
    y = (X[:, 0] - X[:, 1] > 0).astype(np.int64) + (X[:, 3] > 0.8)
    estimator = Classifier(hidden_layer_sizes=(8,), epochs=20, lr=0.01,
                           random_state=0).fit(X, y)
    explainer = shap.KernelExplainer(estimator.predict_proba, X[:20])
    points = X[:5]
    values = np.asarray(explainer.shap_values(points, silent=True))  # (5, 4, classes)
    assert values.shape == (5, 4, 3)
    total = values.sum(axis=1) + np.asarray(explainer.expected_value)
    np.testing.assert_allclose(total, estimator.predict_proba(points), atol=1e-8)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_attribution_maps_are_drawn_as_8x8_heat_maps(tmp_path, digits_model):
    model, digits = digits_model
    X = digits.X_test[:4]
    attributions = explain.integrated_gradients(model, X)
    path = explain.plot_attribution_maps(attributions, tmp_path / "maps.png", images=X,
                                         titles=["a", "b", "c", "d"], title="IG")
    width, height = _png_size(path)
    assert width == 4 * 130 and height > 2 * 130
    with pytest.raises(ValueError, match="shape"):
        explain.plot_attribution_maps(np.zeros((2, 10)), tmp_path / "bad.png")
