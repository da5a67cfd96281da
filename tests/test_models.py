"""Models: exact gradients (checked by finite differences), stable losses, every namespace."""

from __future__ import annotations

import numpy as np
import pytest

from optim_core import models

RNG = np.random.default_rng(20260126)
N_SAMPLES, N_FEATURES, N_CLASSES = 9, 5, 3


def _data(task: str, n_outputs: int = 1):
    X = RNG.normal(size=(N_SAMPLES, N_FEATURES))
    if task == "binary":
        y = RNG.integers(0, 2, N_SAMPLES)
    elif task == "multiclass":
        y = RNG.integers(0, N_CLASSES, N_SAMPLES)
    else:
        y = RNG.normal(size=(N_SAMPLES,) if n_outputs == 1 else (N_SAMPLES, n_outputs))
    return X, y


# (id, model factory, data kind, outputs)
CASES = [
    ("linear", lambda: models.LinearRegression(N_FEATURES), "regression", 1),
    ("logistic", lambda: models.LogisticRegression(N_FEATURES), "binary", 1),
    ("softmax", lambda: models.SoftmaxRegression(N_FEATURES, N_CLASSES), "multiclass", 1),
    ("mlp-relu", lambda: models.MLP([N_FEATURES, 4, 6, N_CLASSES]), "multiclass", 1),
    ("mlp-tanh", lambda: models.MLP([N_FEATURES, 4, N_CLASSES], "tanh"), "multiclass", 1),
    ("mlp-sigmoid", lambda: models.MLP([N_FEATURES, 7, N_CLASSES], "sigmoid"), "multiclass", 1),
    ("mlp-dropout", lambda: models.MLP([N_FEATURES, 8, 6, N_CLASSES], dropout=0.4),
     "multiclass", 1),
    ("mlp-regression", lambda: models.MLP([N_FEATURES, 4, 1], task="regression"),
     "regression", 1),
    ("mlp-regression-2", lambda: models.MLP([N_FEATURES, 4, 2], "tanh", task="regression"),
     "regression", 2),
]


def _random_params(model, X, seed=0):
    """Initialize, then move every parameter (biases too) away from its initial value."""
    model.init_params(X, seed=seed)
    rng = np.random.default_rng(seed)
    for p in model.params.values():
        p[...] = rng.normal(scale=0.7, size=p.shape)


@pytest.mark.parametrize(("factory", "kind", "outputs"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_gradient_matches_central_differences(factory, kind, outputs):
    model = factory()
    X, y = _data(kind, outputs)
    _random_params(model, X)
    key = 12345  # dropout masks are a pure function of the key: the loss is deterministic
    _, grads = model.loss_and_grad(X, y, rng=key)
    h = 1e-6
    for name, param in model.params.items():
        numeric = np.zeros(param.shape)
        flat, out = param.reshape(-1), numeric.reshape(-1)
        for i in range(flat.size):
            original = flat[i]
            flat[i] = original + h
            plus = model.loss_and_grad(X, y, rng=key)[0]
            flat[i] = original - h
            minus = model.loss_and_grad(X, y, rng=key)[0]
            flat[i] = original
            out[i] = (plus - minus) / (2 * h)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize(("factory", "kind", "outputs"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_loss_without_training_equals_loss_and_grad_in_eval_mode(factory, kind, outputs):
    model = factory()
    X, y = _data(kind, outputs)
    _random_params(model, X)
    loss, grads = model.loss_and_grad(X, y, training=False)
    assert isinstance(loss, float)
    assert loss == model.loss(X, y)
    assert list(grads) == list(model.params)


def test_dropout_is_active_only_in_training():
    model = models.MLP([N_FEATURES, 32, N_CLASSES], dropout=0.5)
    X, y = _data("multiclass")
    _random_params(model, X)
    trained = {model.loss_and_grad(X, y, training=True, rng=k)[0] for k in range(5)}
    assert len(trained) == 5  # each key draws another mask
    assert model.loss_and_grad(X, y, rng=7)[0] == model.loss_and_grad(X, y, rng=7)[0]
    assert model.loss_and_grad(X, y, training=False, rng=7)[0] == model.loss(X, y)
    # A generator supplies one key per call.
    key = int(np.random.default_rng(3).integers(0, 2**63))
    assert model.loss_and_grad(X, y, rng=np.random.default_rng(3))[0] == \
        model.loss_and_grad(X, y, rng=key)[0]


def test_losses_are_stable_for_huge_logits():
    X = np.array([[1.0], [-1.0]])
    logistic = models.LogisticRegression(1)
    logistic.params = {"W": np.array([1000.0]), "b": np.array(0.0)}
    # Right with margin 1000: loss ~ 0; wrong: loss ~ 1000 (not inf, not nan).
    assert logistic.loss(X, np.array([1, 0])) == pytest.approx(0.0, abs=1e-300)
    assert logistic.loss(X, np.array([0, 1])) == pytest.approx(1000.0)
    _, grads = logistic.loss_and_grad(X, np.array([0, 1]))
    assert np.all(np.isfinite(grads["W"]))
    np.testing.assert_allclose(logistic.predict_proba(X), [[0.0, 1.0], [1.0, 0.0]])

    softmax = models.SoftmaxRegression(1, 3)
    softmax.params = {"W": np.array([[1e4, 0.0, -1e4]]), "b": np.zeros(3)}
    assert softmax.loss(X, np.array([0, 2])) == pytest.approx(0.0, abs=1e-300)
    assert softmax.loss(X, np.array([1, 1])) == pytest.approx(1e4)
    np.testing.assert_allclose(softmax.predict_proba(X).sum(axis=1), 1.0)


def test_losses_match_their_definitions():
    X, y = _data("multiclass")
    model = models.SoftmaxRegression(N_FEATURES, N_CLASSES)
    _random_params(model, X)
    Z = X @ model.params["W"] + model.params["b"]
    P = np.exp(Z) / np.exp(Z).sum(axis=1, keepdims=True)
    assert model.loss(X, y) == pytest.approx(-np.mean(np.log(P[np.arange(N_SAMPLES), y])))
    np.testing.assert_allclose(model.predict_proba(X), P)

    Xb, yb = _data("binary")
    logistic = models.LogisticRegression(N_FEATURES)
    _random_params(logistic, Xb)
    p = 1 / (1 + np.exp(-(Xb @ logistic.params["W"] + logistic.params["b"])))
    expected = -np.mean(yb * np.log(p) + (1 - yb) * np.log(1 - p))
    assert logistic.loss(Xb, yb) == pytest.approx(expected)

    Xr, yr = _data("regression")
    linear = models.LinearRegression(N_FEATURES)
    _random_params(linear, Xr)
    prediction = Xr @ linear.params["W"] + linear.params["b"]
    assert linear.loss(Xr, yr) == pytest.approx(np.mean((prediction - yr) ** 2))
    r2 = 1 - np.sum((yr - prediction) ** 2) / np.sum((yr - yr.mean()) ** 2)
    assert linear.score(Xr, yr) == pytest.approx(r2)


def test_score_is_accuracy_for_classifiers():
    X, y = _data("multiclass")
    model = models.MLP([N_FEATURES, 6, N_CLASSES])
    _random_params(model, X)
    predictions = model.predict(X)
    assert model.score(X, y) == pytest.approx(np.mean(predictions == y))
    assert model.score(X, predictions) == 1.0
    assert (model.task, model.metric_name) == ("classification", "accuracy")
    assert (models.LinearRegression(2).task, models.LinearRegression(2).metric_name) == \
        ("regression", "r2")


@pytest.mark.parametrize(("factory", "kind", "outputs"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_every_namespace_gives_numpys_numbers_in_its_own_arrays(xp, factory, kind, outputs):
    X, y = _data(kind, outputs)
    reference = factory()
    _random_params(reference, X)
    ref_loss, ref_grads = reference.loss_and_grad(X, y, rng=99)

    model = factory()
    X_xp = xp.asarray(X)
    y_xp = xp.asarray(y, dtype="int64" if kind in ("binary", "multiclass") else "float64")
    model.params = {name: xp.asarray(p) for name, p in reference.params.items()}
    loss, grads = model.loss_and_grad(X_xp, y_xp, rng=99)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for name, grad in grads.items():
        assert type(grad) is type(X_xp)
        assert grad.dtype == X_xp.dtype
        np.testing.assert_allclose(xp.to_numpy(grad), ref_grads[name], rtol=1e-10, atol=1e-13)
    predictions = model.predict(X_xp)
    assert type(predictions) is type(X_xp)
    np.testing.assert_allclose(xp.to_numpy(predictions), reference.predict(X))
    if hasattr(model, "predict_proba") and model.task == "classification":
        proba = model.predict_proba(X_xp)
        assert proba.dtype == X_xp.dtype
        np.testing.assert_allclose(xp.to_numpy(proba), reference.predict_proba(X), rtol=1e-12)
    assert model.score(X_xp, y_xp) == pytest.approx(reference.score(X, y))


def test_float32_inputs_give_float32_parameters_and_gradients(xp):
    X, y = _data("multiclass")
    X32 = xp.asarray(X, dtype="float32")
    model = models.MLP([N_FEATURES, 4, N_CLASSES], dropout=0.2)
    params = model.init_params(X32, seed=0)
    assert all(p.dtype == X32.dtype for p in params.values())
    loss, grads = model.loss_and_grad(X32, xp.asarray(y, dtype="int64"), rng=1)
    assert np.isfinite(loss)
    assert all(g.dtype == X32.dtype for g in grads.values())


def test_integer_inputs_give_the_namespaces_default_float(xp):
    X_int = xp.asarray(np.arange(10).reshape(5, 2), dtype="int64")
    params = models.LinearRegression(2).init_params(X_int)
    default = xp.xp.__array_namespace_info__().default_dtypes()["real floating"]
    assert params["W"].dtype == default


def test_init_params_is_seeded_and_scaled():
    X = np.zeros((2, 64))
    a = models.MLP([64, 128, 10]).init_params(X, seed=1)
    b = models.MLP([64, 128, 10]).init_params(X, seed=1)
    c = models.MLP([64, 128, 10]).init_params(X, seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["W0"], c["W0"])
    assert np.std(a["W0"]) == pytest.approx(np.sqrt(2 / 64), rel=0.05)  # He normal
    assert not np.any(a["b0"])
    assert list(a) == ["W0", "b0", "W1", "b1"]
    assert {k: v.shape for k, v in a.items()} == \
        {"W0": (64, 128), "b0": (128,), "W1": (128, 10), "b1": (10,)}
    linear = models.LinearRegression(3).init_params(np.zeros((1, 3)))
    assert linear["W"].shape == (3,) and linear["b"].shape == ()


def test_params_setter_and_inputs_are_validated():
    model = models.SoftmaxRegression(3, 2)
    assert model.params is None
    with pytest.raises(RuntimeError, match="init_params"):
        model.predict(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="keys"):
        model.params = {"W": np.zeros((3, 2))}
    with pytest.raises(ValueError, match="shape"):
        model.params = {"W": np.zeros((2, 3)), "b": np.zeros(2)}
    with pytest.raises(TypeError, match="floating"):
        model.params = {"W": np.zeros((3, 2), dtype=int), "b": np.zeros(2, dtype=int)}
    with pytest.raises(TypeError, match="dtype"):
        model.params = {"W": np.zeros((3, 2)), "b": np.zeros(2, dtype=np.float32)}
    model.params = {"W": np.zeros((3, 2)), "b": np.zeros(2)}
    with pytest.raises(ValueError, match="shape"):
        model.predict(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="samples"):
        model.loss(np.zeros((4, 3)), np.zeros(3, dtype=int))
    with pytest.raises(TypeError, match="rng"):
        model.loss_and_grad(np.zeros((4, 3)), np.zeros(4, dtype=int), rng="seed")


@pytest.mark.parametrize(("call", "message"), [
    (lambda: models.LinearRegression(0), "n_features"),
    (lambda: models.SoftmaxRegression(3, 1), "n_classes"),
    (lambda: models.MLP([3]), "layer_sizes"),
    (lambda: models.MLP([3, 0, 2]), "layer_sizes"),
    (lambda: models.MLP([3, 2], activation="gelu"), "activation"),
    (lambda: models.MLP([3, 2], dropout=1.0), "dropout"),
    (lambda: models.MLP([3, 1]), "2 outputs"),
    (lambda: models.MLP([3, 1], task="ranking"), "task"),
])
def test_bad_constructor_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
