"""Post-training quantization: symmetric per-channel int8 weights, integer activations,
sizes, the digits target, and quantization-aware fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest

from optim_core import datasets, fit, models
from optim_core.train.quantization import QuantizationAware, quantize, quantize_weight

RNG = np.random.default_rng(5)


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits", seed=0, dtype="float32")


@pytest.fixture(scope="module")
def digits_mlp(digits):
    model = models.MLP([64, 64, 10])
    fit(model, digits.X_train, digits.y_train, optimizer="adam", lr=0.003, epochs=15,
        batch_size=32, seed=0, progress=False)
    return model


def test_weights_are_rounded_to_int8_with_one_scale_per_output_channel(xp):
    host = RNG.normal(size=(9, 4)) * np.array([0.01, 1.0, 30.0, 0.0])
    q, scale = quantize_weight(xp.asarray(host))
    q, scale = xp.to_numpy(q), xp.to_numpy(scale)
    assert q.dtype == np.int8 and scale.shape == (4,)
    np.testing.assert_allclose(scale[:3], np.abs(host[:, :3]).max(axis=0) / 127, rtol=1e-12)
    assert scale[3] == 1.0 and not q[:, 3].any()  # an all-zero channel
    assert np.abs(q).max() == 127 and np.all(np.abs(q).max(axis=0)[:3] == 127)
    # Round to nearest: the error of each weight is at most half its channel's step.
    assert np.all(np.abs(q * scale - host) <= scale / 2 + 1e-12)


def test_per_tensor_scale_and_fewer_bits():
    host = RNG.normal(size=(16, 3))
    q, scale = quantize_weight(host, bits=4, per_channel=False)
    assert scale.shape == () and scale == pytest.approx(np.abs(host).max() / 7)
    assert set(np.unique(q)) <= set(range(-7, 8))
    errors = [np.abs(np.multiply(*quantize_weight(host, bits=b)) - host).max()
              for b in (8, 6, 4, 3, 2)]
    assert errors == sorted(errors)
    with pytest.raises(ValueError, match="at most 8"):
        quantize_weight(host, bits=9)


def test_predict_computes_with_the_int8_weights(digits, digits_mlp):
    quantized = quantize(digits_mlp)
    assert all(w.dtype == np.int8 for w in quantized.weights.values())
    assert set(quantized.weights) == {"W0", "W1"} and set(quantized.biases) == {"b0", "b1"}
    # Its outputs are the float model's outputs at the dequantized weights Q s.
    dequantized = quantized.dequantized()
    np.testing.assert_allclose(quantized.forward(digits.X_test),
                               dequantized.forward(np, dequantized.params, digits.X_test),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(quantized.predict(digits.X_test),
                                  dequantized.predict(digits.X_test))
    proba = quantized.predict_proba(digits.X_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    # The trained model is left as it was.
    assert digits_mlp.params["W0"].dtype == np.float32


def test_int8_is_within_half_a_point_of_float32_on_digits_at_a_quarter_of_the_bytes(
        digits, digits_mlp):
    float_accuracy = digits_mlp.score(digits.X_test, digits.y_test)
    quantized = quantize(digits_mlp)
    assert abs(quantized.score(digits.X_test, digits.y_test) - float_accuracy) <= 0.005
    size = quantized.nbytes()
    assert size["weights"] * 4 == size["float_weights"] == 4 * (64 * 64 + 64 * 10)
    assert size["scales"] == 4 * (64 + 10)
    assert size["float_total"] / size["total"] > 3.5


def test_calibrated_activations_run_as_integer_matrix_products(digits, digits_mlp):
    quantized = quantize(digits_mlp, calibration_data=digits.X_train)
    assert len(quantized.activation_scales) == 2
    # Layer 0 by hand: round the inputs to int8 levels, multiply in integers, rescale.
    a0, q0, s0 = quantized.activation_scales[0], quantized.weights["W0"], \
        quantized.scales["W0"]
    X = digits.X_test[:5]
    levels = np.clip(np.round(X / a0), -127, 127).astype(np.int64)
    expected = (levels @ q0.astype(np.int64)).astype(np.float32) * (s0 * a0) + \
        quantized.biases["b0"]
    np.testing.assert_allclose(quantized._dense(0, X), expected, rtol=1e-6, atol=1e-6)
    float_accuracy = digits_mlp.score(digits.X_test, digits.y_test)
    assert quantized.score(digits.X_test, digits.y_test) >= float_accuracy - 0.01


def test_every_bundled_model_quantizes(xp):
    X = RNG.normal(size=(40, 5))
    cases = [(models.LinearRegression(5), X @ RNG.normal(size=5)),
             (models.LogisticRegression(5), (X[:, 0] > 0).astype(np.int64)),
             (models.SoftmaxRegression(5, 3), np.argmax(X[:, :3], axis=1)),
             (models.MLP([5, 8, 2], task="regression"), X[:, :2] * 2.0)]
    for model, y in cases:
        fit(model, xp.asarray(X), xp.asarray(y, dtype=str(y.dtype)), optimizer="adam",
            lr=0.05, epochs=30, progress=False, seed=0, impl="generic")
        quantized = quantize(model, calibration_data=xp.asarray(X))
        predictions = xp.to_numpy(quantized.predict(xp.asarray(X)))
        reference = xp.to_numpy(model.predict(xp.asarray(X)))
        assert predictions.shape == reference.shape
        if model.task == "classification":
            assert np.mean(predictions == reference) > 0.9
        else:
            np.testing.assert_allclose(predictions, reference, atol=0.1 * np.abs(reference).max())


def test_quantize_refuses_what_it_cannot_quantize():
    with pytest.raises(RuntimeError, match="no parameters"):
        quantize(models.MLP([3, 2]))
    with pytest.raises(TypeError, match="Model"):
        quantize("mlp")


def test_quantization_aware_fine_tuning_uses_the_straight_through_gradient(digits, digits_mlp):
    model = models.MLP([64, 64, 10])
    model.params = {k: v.copy() for k, v in digits_mlp.params.items()}
    aware = QuantizationAware(model, bits=2)
    X, y = digits.X_train[:64], digits.y_train[:64]
    # The gradient of W is the gradient at the fake-quantized weights Q(W) s(W).
    _, grads = aware.loss_and_grad(X, y)
    fake = quantize(model, bits=2).dequantized()
    _, expected = fake.loss_and_grad(X, y)
    for name in grads:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-4, atol=1e-6)
    before = quantize(model, bits=2).score(digits.X_test, digits.y_test)
    fit(aware, digits.X_train, digits.y_train, optimizer="adam", lr=0.001, epochs=3,
        batch_size=32, seed=1, progress=False)
    after = quantize(model, bits=2).score(digits.X_test, digits.y_test)
    assert after > before + 0.05, (before, after)
