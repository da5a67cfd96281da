"""The scikit-learn estimators: scikit-learn's own checks, pipelines, grid search,
partial_fit, labels and feature names, and data of other array libraries."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from optim_core import datasets, models  # noqa: E402
from optim_core.sklearn import Classifier, Regressor  # noqa: E402

RNG = np.random.default_rng(2)


@parametrize_with_checks([Classifier(), Regressor(), Classifier(model="linear"),
                          Regressor(model="linear", optimizer="lion", lr=0.01)])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits", seed=0)


def test_in_a_pipeline_with_grid_search(digits):
    pipeline = make_pipeline(StandardScaler(), Classifier(epochs=8, random_state=0))
    search = GridSearchCV(pipeline, {"classifier__lr": [1e-3, 1e-2],
                                     "classifier__hidden_layer_sizes": [(16,), (64,)]}, cv=3)
    search.fit(digits.X_train, digits.y_train)
    assert set(search.best_params_) == {"classifier__lr", "classifier__hidden_layer_sizes"}
    assert len(search.cv_results_["mean_test_score"]) == 4
    assert search.score(digits.X_test, digits.y_test) > 0.9
    best = search.best_estimator_[-1]
    assert isinstance(best.model_, models.MLP) and best.n_features_in_ == 64
    np.testing.assert_array_equal(best.classes_, np.arange(10))


def test_partial_fit_continues_the_model_and_the_optimizer(digits):
    X, y = digits.X_train, digits.y_train
    estimator = Classifier(hidden_layer_sizes=(32,), lr=0.01, batch_size=32, random_state=0)
    with pytest.raises(ValueError, match="classes"):
        estimator.partial_fit(X, y)
    scores = []
    for _ in range(4):
        estimator.partial_fit(X, y, classes=np.arange(10))
        scores.append(estimator.score(digits.X_test, digits.y_test))
    assert estimator._optimizer.group_state[0]["step"] == 4 * int(np.ceil(len(X) / 32))
    assert scores[-1] > scores[0] and scores[-1] > 0.9
    # Pickled between two calls, it continues exactly as the one that was not.
    copy = pickle.loads(pickle.dumps(estimator))
    estimator.partial_fit(X, y)
    copy.partial_fit(X, y)
    for name, value in estimator.model_.params.items():
        np.testing.assert_array_equal(copy.model_.params[name], value)
    with pytest.raises(ValueError, match="features"):
        estimator.partial_fit(X[:, :10], y)
    with pytest.raises(ValueError, match="not in classes_"):
        estimator.partial_fit(X[:3], np.array([0, 1, 11]))


def test_string_labels_and_feature_names():
    pandas = pytest.importorskip("pandas")
    X = RNG.normal(size=(150, 3))
    labels = np.array(["cat", "dog", "emu"])[np.argmax(X, axis=1)]
    frame = pandas.DataFrame(X, columns=["a", "b", "c"])
    estimator = Classifier(hidden_layer_sizes=(16,), epochs=30, lr=0.01, random_state=0)
    estimator.fit(frame, labels)
    np.testing.assert_array_equal(estimator.classes_, ["cat", "dog", "emu"])
    np.testing.assert_array_equal(estimator.feature_names_in_, ["a", "b", "c"])
    assert estimator.n_features_in_ == 3
    predictions = estimator.predict(frame)
    assert predictions.dtype.kind == "U" and np.mean(predictions == labels) > 0.9
    assert estimator.predict_proba(frame).shape == (150, 3)
    with pytest.warns(UserWarning, match="feature names"):
        estimator.predict(X)


def test_the_regressor_takes_one_or_several_outputs():
    X = RNG.normal(size=(200, 5))
    Y = np.stack([X @ RNG.normal(size=5), X[:, 0] - X[:, 1]], axis=1)
    for model in ("linear", "mlp"):
        single = Regressor(model=model, epochs=40, lr=0.01, random_state=0).fit(X, Y[:, 0])
        assert single.predict(X).shape == (200,) and single.score(X, Y[:, 0]) > 0.9
        double = Regressor(model=model, epochs=40, lr=0.01, random_state=0).fit(X, Y)
        assert double.predict(X).shape == (200, 2) and double.score(X, Y) > 0.9
        assert double.n_outputs_ == 2


def test_early_stopping_holds_out_a_validation_split_and_restores_the_best_epoch(digits):
    estimator = Classifier(hidden_layer_sizes=(32,), epochs=200, lr=0.01, early_stopping=True,
                           patience=3, random_state=0).fit(digits.X_train, digits.y_train)
    assert estimator.n_iter_ < 200
    val_losses = [entry["val_loss"] for entry in estimator.history_]
    assert estimator.best_epoch_ == 1 + int(np.argmin(val_losses))


def test_partial_fit_refuses_weight_decay_it_could_not_apply():
    X = RNG.normal(size=(30, 3))
    y = (X[:, 0] > 0).astype(np.int64)
    estimator = Classifier(optimizer="sgd", weight_decay=0.01, epochs=1, random_state=0)
    estimator.partial_fit(X, y, classes=[0, 1])
    with pytest.raises(ValueError, match="decoupled"):
        estimator.partial_fit(X, y)
    Classifier(optimizer="adamw", weight_decay=0.01, random_state=0).partial_fit(
        X, y, classes=[0, 1]).partial_fit(X, y)


def test_torch_tensors_train_and_predict_in_torch():
    torch = pytest.importorskip("torch")
    X = RNG.normal(size=(120, 4))
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    estimator = Classifier(hidden_layer_sizes=(8,), epochs=20, lr=0.01, random_state=0)
    estimator.fit(torch.from_numpy(X), torch.from_numpy(y))
    assert isinstance(estimator.model_.params["W0"], torch.Tensor)
    predictions = estimator.predict(torch.from_numpy(X))
    assert isinstance(predictions, torch.Tensor)
    assert estimator.score(torch.from_numpy(X), torch.from_numpy(y)) > 0.9
    np.testing.assert_array_equal(estimator.classes_, [0, 1])
    numpy_estimator = Classifier(hidden_layer_sizes=(8,), epochs=20, lr=0.01,
                                 random_state=0).fit(X, y)
    np.testing.assert_allclose(estimator.model_.params["W0"].numpy(),
                               numpy_estimator.model_.params["W0"], rtol=1e-10)


def test_dask_arrays_train_as_fit_trains_them():
    da = pytest.importorskip("dask.array")
    X = RNG.normal(size=(200, 4))
    y = X @ np.array([1.0, -2.0, 0.5, 0.0])
    estimator = Regressor(model="linear", epochs=30, lr=0.05, batch_size=50, random_state=0)
    estimator.fit(da.from_array(X, chunks=50), da.from_array(y, chunks=50))
    assert isinstance(estimator.model_.params["W"], np.ndarray)
    assert estimator.n_features_in_ == 4
    np.testing.assert_allclose(estimator.model_.params["W"], [1.0, -2.0, 0.5, 0.0], atol=0.05)


def test_importing_optim_core_does_not_import_scikit_learn():
    script = ("import sys, optim_core, optim_core.pruning, optim_core.quantization, "
              "optim_core.explain\n"
              "assert 'sklearn' not in sys.modules and 'matplotlib' not in sys.modules\n"
              "import optim_core.sklearn\nassert 'sklearn' in sys.modules\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_the_flat_names_are_the_modules():
    import optim_core
    from optim_core.integrations import explain
    from optim_core.train import pruning, quantization

    assert optim_core.pruning is pruning and optim_core.quantization is quantization
    assert optim_core.explain is explain
    from optim_core.explain import integrated_gradients  # noqa: F401
    from optim_core.pruning import MagnitudePruning  # noqa: F401
    from optim_core.quantization import quantize  # noqa: F401
