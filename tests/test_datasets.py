"""optim_core.datasets: bundled real data and seeded synthetic data, split for training."""

from __future__ import annotations

import numpy as np
import pytest

from optim_core import datasets


def test_digits_is_a_stratified_75_25_split_scaled_to_unit_interval():
    data = datasets.load("digits")
    assert data.task == "classification" and data.n_classes == 10
    assert data.X_train.shape == (1347, 64) and data.X_test.shape == (450, 64)
    assert data.X_train.min() == 0.0 and data.X_train.max() == 1.0
    assert data.y_train.dtype == np.int64
    # Each class keeps (to rounding) a quarter of its samples in the test part.
    for label in range(10):
        n_test = np.sum(data.y_test == label)
        n_all = n_test + np.sum(data.y_train == label)
        assert n_test == round(0.25 * n_all)
    from sklearn.datasets import load_digits

    original = load_digits().data / 16.0
    # A split, not a resample: every original row appears exactly once.
    rows = np.concatenate([data.X_train, data.X_test])
    assert np.array_equal(np.unique(rows, axis=0), np.unique(original, axis=0))
    assert rows.shape[0] == original.shape[0]


def test_diabetes_is_standardized_with_training_statistics():
    data = datasets.load("diabetes")
    assert data.task == "regression" and data.n_classes is None
    assert data.X_train.shape == (332, 10) and data.X_test.shape == (110, 10)
    np.testing.assert_allclose(data.X_train.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(data.X_train.std(axis=0), 1, rtol=1e-12)
    assert abs(data.y_train.mean()) < 1e-12 and abs(data.y_train.std() - 1) < 1e-12
    # The test part is scaled with the training statistics, so it is only near 0 / 1.
    assert abs(data.X_test.mean()) < 0.3
    assert not np.allclose(data.X_test.mean(axis=0), 0, atol=1e-6)


@pytest.mark.parametrize("task", datasets.TASKS)
def test_synthetic_is_deterministic_in_the_seed_and_sized_by_the_flags(task):
    a = datasets.load("synthetic", task=task, n_samples=400, n_features=7, n_classes=4, seed=3)
    b = datasets.load("synthetic", task=task, n_samples=400, n_features=7, n_classes=4, seed=3)
    c = datasets.load("synthetic", task=task, n_samples=400, n_features=7, n_classes=4, seed=4)
    assert a.X_train.shape == (300, 7) and a.X_test.shape == (100, 7)
    assert a.task == task
    for name in ("X_train", "y_train", "X_test", "y_test"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.X_train, c.X_train)
    if task == "classification":
        assert a.n_classes == 4 and set(np.unique(a.y_train)) == {0, 1, 2, 3}
    else:
        assert a.n_classes is None and a.y_train.dtype == np.float64


def test_synthetic_classes_follow_a_linear_teacher_so_they_are_learnable():
    data = datasets.load("synthetic", n_samples=3000, n_features=5, n_classes=3, noise=0.0)
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=500).fit(data.X_train, data.y_train)
    assert clf.score(data.X_test, data.y_test) > 0.95


def test_dtype_is_applied_to_features_and_regression_targets():
    data = datasets.load("synthetic", task="regression", n_samples=50, dtype=np.float32)
    assert data.X_train.dtype == np.float32 and data.y_train.dtype == np.float32
    assert datasets.load("digits", dtype="float32").X_train.dtype == np.float32


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="mnist"), "unknown dataset 'mnist'; known: digits, diabetes, synthetic"),
    (dict(name="synthetic", task="ranking"), "unknown task"),
    (dict(name="synthetic", n_samples=0), "n_samples"),
    (dict(name="synthetic", n_features=2.5), "n_features"),
    (dict(name="synthetic", n_classes=1), "n_classes"),
    (dict(name="synthetic", noise=-1.0), "noise"),
    (dict(name="synthetic", n_samples=3, test_size=0.1), "too small"),
    (dict(name="digits", test_size=1.0), "test_size"),
    (dict(name="digits", dtype=np.int32), "floating dtype"),
])
def test_bad_arguments_raise_a_clear_value_error(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        datasets.load(name, **kwargs)


def test_describe_names_the_sizes():
    assert datasets.load("digits").describe() == (
        "digits (classification, 10 classes): 1347 train / 450 test samples, 64 features")
