"""Regularization, clipping and dropout randomness, on every namespace; and their use in fit."""

from __future__ import annotations

import numpy as np
import pytest

from optim_core import fit, models, regularization

RNG = np.random.default_rng(7)


def test_soft_threshold_is_the_l1_proximal_operator(xp):
    x = xp.asarray([-3.0, -0.5, 0.0, 0.2, 0.5, 2.0])
    out = xp.to_numpy(regularization.soft_threshold(x, 0.5))
    np.testing.assert_array_equal(out, [-2.5, 0.0, 0.0, 0.0, 0.0, 1.5])
    assert np.sum(out == 0) == 4  # exact zeros, not tiny numbers


def test_clip_by_value(xp):
    grads = {"a": xp.asarray([-5.0, 0.3, 7.0]), "b": xp.asarray([[0.1, -0.2]])}
    clipped = regularization.clip_by_value(grads, 1.0)
    np.testing.assert_array_equal(xp.to_numpy(clipped["a"]), [-1.0, 0.3, 1.0])
    np.testing.assert_array_equal(xp.to_numpy(clipped["b"]), [[0.1, -0.2]])


def test_clip_by_global_norm_scales_all_gradients_together(xp):
    grads = {"a": xp.asarray([3.0, 0.0]), "b": xp.asarray([[0.0, 4.0]])}
    clipped, norm = regularization.clip_by_global_norm(grads, 1.0)
    assert float(norm) == pytest.approx(5.0)
    np.testing.assert_allclose(xp.to_numpy(clipped["a"]), [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(xp.to_numpy(clipped["b"]), [[0.0, 0.8]], rtol=1e-6)
    unchanged, _ = regularization.clip_by_global_norm(grads, 10.0)
    np.testing.assert_array_equal(xp.to_numpy(unchanged["a"]), [3.0, 0.0])


def test_clip_by_global_norm_matches_torch():
    torch = pytest.importorskip("torch")
    arrays = [RNG.normal(size=(4, 3)), RNG.normal(size=(3,))]
    tensors = [torch.nn.Parameter(torch.zeros(a.shape, dtype=torch.float64)) for a in arrays]
    for t, a in zip(tensors, arrays, strict=True):
        t.grad = torch.from_numpy(a.copy())
    torch.nn.utils.clip_grad_norm_(tensors, 0.5)
    clipped, _ = regularization.clip_by_global_norm({"0": arrays[0], "1": arrays[1]}, 0.5)
    for t, name in zip(tensors, ["0", "1"], strict=True):
        np.testing.assert_allclose(clipped[name], t.grad.numpy(), rtol=1e-12)


def test_l2_gradient_touches_only_the_named_parameters():
    params = {"W": np.array([1.0, -2.0]), "b": np.array(3.0)}
    grads = {"W": np.zeros(2), "b": np.array(0.0)}
    out = regularization.add_l2_gradient(grads, params, 0.1, {"W"})
    np.testing.assert_allclose(out["W"], [0.1, -0.2])
    assert out["b"] == 0.0


def test_uniform_bits_are_the_same_on_every_namespace(xp):
    bits = regularization.uniform_bits(xp.xp, (64, 33), key=2024)
    reference = regularization.uniform_bits(np, (64, 33), key=2024)
    np.testing.assert_array_equal(xp.to_numpy(bits), reference)


def test_uniform_bits_look_uniform_and_depend_on_the_key():
    bits = regularization.uniform_bits(np, (100_000,), key=1)
    assert bits.min() >= 0 and bits.max() < 2**24
    assert bits.mean() / 2**24 == pytest.approx(0.5, abs=0.005)
    assert np.std(bits / 2**24) == pytest.approx(np.sqrt(1 / 12), abs=0.005)
    counts = np.bincount(bits >> 20, minlength=16)  # 16 equal bins
    assert counts.min() > 0.9 * 100_000 / 16
    other = regularization.uniform_bits(np, (100_000,), key=2)
    assert np.mean(bits == other) < 0.001
    assert regularization.dropout_key(1, 2, 3) == regularization.dropout_key(1, 2, 3)
    assert regularization.dropout_key(1, 2, 3) != regularization.dropout_key(1, 3, 2)


def test_dropout_mask_keeps_the_right_fraction():
    mask = regularization.dropout_mask(np, (200, 500), 0.3, key=5)
    assert mask.dtype == bool
    assert mask.mean() == pytest.approx(0.7, abs=0.005)
    with pytest.raises(ValueError, match="dropout"):
        regularization.dropout_mask(np, (2,), 1.0, key=5)


# --------------------------------------------------------------------------- in fit
def _regression(n=40, d=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    true_w = np.zeros(d)
    true_w[:2] = [3.0, -2.0]  # only two relevant features
    return X, X @ true_w + 0.5 + 0.1 * rng.normal(size=n)


def _one_gd_step(**kwargs):
    X, y = _regression()
    model = models.LinearRegression(X.shape[1])
    model.init_params(X)
    model.params["W"][...] = np.linspace(-1, 1, X.shape[1])
    W0, b0 = model.params["W"].copy(), float(model.params["b"])
    _, grads = model.loss_and_grad(X, y)
    fit(model, X, y, optimizer="gd", lr=0.1, epochs=1, seed=0, progress=False, **kwargs)
    return W0, b0, grads, model.params


def test_l2_adds_its_gradient_to_the_weights_only():
    W0, b0, grads, params = _one_gd_step(l2=0.5)
    np.testing.assert_allclose(params["W"], W0 - 0.1 * (grads["W"] + 0.5 * W0), rtol=1e-12)
    assert float(params["b"]) == pytest.approx(b0 - 0.1 * float(grads["b"]))


def test_fit_applies_decoupled_weight_decay_for_optimizers_without_it():
    W0, b0, grads, params = _one_gd_step(weight_decay=0.5)
    np.testing.assert_allclose(params["W"], W0 * (1 - 0.1 * 0.5) - 0.1 * grads["W"],
                               rtol=1e-12)
    assert float(params["b"]) == pytest.approx(b0 - 0.1 * float(grads["b"]))


def test_clip_value_and_clip_norm_bound_each_step():
    W0, b0, grads, params = _one_gd_step(clip_value=0.01)
    assert np.max(np.abs(grads["W"])) > 0.01  # the bound is active
    np.testing.assert_allclose(params["W"], W0 - 0.1 * np.clip(grads["W"], -0.01, 0.01))
    W0, b0, grads, params = _one_gd_step(clip_norm=0.5)
    norm = np.sqrt(np.sum(grads["W"] ** 2) + float(grads["b"]) ** 2)
    assert norm > 0.5
    scale = 0.5 / (norm + 1e-6)
    np.testing.assert_allclose(params["W"], W0 - 0.1 * scale * grads["W"], rtol=1e-12)


def test_l1_soft_thresholds_after_the_step():
    W0, b0, grads, params = _one_gd_step(l1=0.3)
    expected = regularization.soft_threshold(W0 - 0.1 * grads["W"], 0.1 * 0.3)
    np.testing.assert_allclose(params["W"], expected, rtol=1e-12)


def test_l1_makes_irrelevant_weights_exactly_zero():
    X, y = _regression(n=200)
    sparse = models.LinearRegression(X.shape[1])
    fit(sparse, X, y, optimizer="gd", lr=0.1, epochs=200, l1=0.2, seed=0, progress=False)
    assert np.all(sparse.params["W"][2:] == 0.0)
    assert np.all(np.abs(sparse.params["W"][:2]) > 1.0)
    dense = models.LinearRegression(X.shape[1])
    fit(dense, X, y, optimizer="gd", lr=0.1, epochs=200, seed=0, progress=False)
    assert np.all(dense.params["W"] != 0.0)


def test_adam_with_weight_decay_is_adamw():
    X, y = _regression()
    runs = {}
    for name in ("adam", "AdamW"):
        model = models.LinearRegression(X.shape[1])
        history = fit(model, X, y, optimizer=name, lr=0.05, epochs=5, batch_size=8,
                      weight_decay=0.1, seed=3, progress=False)
        runs[name] = model.params["W"]
        assert history.optimizer.param_groups[0]["weight_decay"] == 0.1
        assert history.optimizer.param_groups[0]["decoupled_weight_decay"] is True
    np.testing.assert_array_equal(runs["adam"], runs["AdamW"])


def test_weight_decay_none_keeps_the_optimizers_default():
    X, y = _regression()
    history = fit(models.LinearRegression(X.shape[1]), X, y, optimizer="adamw", epochs=1,
                  seed=0, progress=False)
    assert history.optimizer.param_groups[0]["weight_decay"] == 0.01
    history = fit(models.LinearRegression(X.shape[1]), X, y, optimizer="adamw", epochs=1,
                  weight_decay=0.0, seed=0, progress=False)
    assert history.optimizer.param_groups[0]["weight_decay"] == 0.0


def test_dropout_in_fit_is_reproducible_and_regularizes(xp):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 4))
    y = (X[:, 0] > 0).astype(np.int64)
    results = []
    for _ in range(2):
        model = models.MLP([4, 16, 2], dropout=0.5)
        history = fit(model, xp.asarray(X), xp.asarray(y, dtype="int64"), lr=0.01, epochs=3,
                      batch_size=16, seed=11, progress=False)
        results.append((history.train_loss, xp.to_numpy(model.params["W0"])))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    plain = models.MLP([4, 16, 2])
    history = fit(plain, xp.asarray(X), xp.asarray(y, dtype="int64"), lr=0.01, epochs=3,
                  batch_size=16, seed=11, progress=False)
    assert history.train_loss != results[0][0]
