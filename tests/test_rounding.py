"""bfloat16 and float16 parameters that still learn: stochastic rounding and compensation.

Rounded to nearest, a bfloat16 parameter near 4 loses every update under 2**-6 and a long
run of small Adam steps stalls. ``stochastic_rounding=True`` keeps them on average, from
a counter-based generator (the same numbers on every library); ``compensated=True``
keeps what rounding dropped in a 16-bit buffer (Zamirai et al. 2020).
"""

from __future__ import annotations

import numpy as np
import pytest
from optim_core.backends._rounding import Rounding, hash32, stochastic_round, uniform

import optim_core

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)


def test_the_hash_is_lowbias32_without_overflow():
    # Reference values of lowbias32 computed with uint64 arithmetic.
    x = np.array([0, 1, 2, 0xFFFFFFFF, 123456789], dtype=np.int64)

    def reference(v):
        v = int(v)
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    assert hash32(np, x).tolist() == [reference(v) for v in x]


def test_uniform_numbers_are_a_function_of_the_key_and_the_index():
    a = uniform(np, 10000, 42, like=np.zeros(1))
    assert a.dtype == np.float32 and 0 <= a.min() and a.max() < 1
    assert abs(float(a.mean()) - 0.5) < 0.01
    assert np.array_equal(uniform(np, 100, 42, like=np.zeros(1)), a[:100])
    assert not np.array_equal(uniform(np, 100, 43, like=np.zeros(1)), a[:100])


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=["bfloat16", "float16"])
def test_stochastic_rounding_takes_a_neighbour_and_is_right_on_average(dtype):
    gap = float(np.finfo(dtype).eps) if dtype == np.float16 else 2.0 ** -7
    for value in (1 + gap / 3, -3 * (1 + 0.75 * gap), 1e-6, 2.5e-7):
        x = np.full(20000, value, np.float32)
        rounded = stochastic_round(np, x, dtype, key=7).astype(np.float64)
        below, above = np.sort(np.unique(rounded))[[0, -1]]
        assert set(np.unique(rounded)) <= {below, above} and below <= value <= above
        assert abs(rounded.mean() - value) < 0.02 * (above - below) + 1e-12, value
    exact = np.array([0.0, -0.0, 1.0, -2.5, np.inf, -np.inf], np.float32)
    out = stochastic_round(np, exact, dtype, key=1).astype(np.float32)
    assert out.tobytes() == exact.tobytes()
    assert np.isnan(stochastic_round(np, np.array([np.nan], np.float32), dtype, key=1)[0])


def test_stochastic_rounding_is_the_same_on_every_backend(xp):
    if xp.name == "array_api_strict":  # no 16-bit floats: the rounded values in float32
        dtype, theirs_dtype = BF16, "bfloat16"
    elif xp.name == "torch":
        import torch

        dtype, theirs_dtype = BF16, torch.bfloat16
    else:
        dtype, theirs_dtype = BF16, BF16
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32) * 30
    ours = stochastic_round(np, x, dtype, key=99).astype(np.float32)
    theirs = stochastic_round(xp.xp, xp.asarray(x, "float32"), theirs_dtype, key=99)
    np.testing.assert_array_equal(xp.to_numpy(theirs).astype(np.float32), ours)


def stalling_task():
    """Noisy least squares with weights near 4, where bfloat16's gap is 2**-5: Adam's
    steps of about lr = 3e-3 are lost to nearest rounding. The noise (variance 1) makes the
    loss floor large beside what weights on bfloat16's grid add to it (< 1%)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 32)).astype(np.float32)
    target = a @ (4 + rng.standard_normal(32).astype(np.float32) * 0.5) \
        + rng.standard_normal(256).astype(np.float32)
    return a, target


def train(dtype, steps=1000, **options):
    a, target = stalling_task()
    w = np.full(32, 4.0, np.float32).astype(dtype)
    opt = optim_core.Adam([w], lr=3e-3, **options)
    for _ in range(steps):
        wide = w.astype(np.float32)
        opt.step([(2 * a.T @ (a @ wide - target) / 256).astype(dtype)])
    return float(np.mean((a @ w.astype(np.float32) - target) ** 2)), w, opt


def test_bfloat16_stalls_to_nearest_and_learns_with_either_remedy():
    full, _, _ = train(np.float32)
    nearest, _, _ = train(BF16)
    stochastic, _, _ = train(BF16, stochastic_rounding=True, seed=1)
    compensated, _, opt = train(BF16, compensated=True)
    assert nearest > 3 * full
    assert stochastic < 1.01 * full and compensated < 1.01 * full
    assert opt.state[0][0]["compensation"].dtype == BF16


def test_stochastic_rounding_is_reproducible_and_seeded():
    _, first, _ = train(BF16, steps=30, stochastic_rounding=True, seed=1)
    _, again, _ = train(BF16, steps=30, stochastic_rounding=True, seed=1)
    _, other, _ = train(BF16, steps=30, stochastic_rounding=True, seed=2)
    assert first.tobytes() == again.tobytes() and first.tobytes() != other.tobytes()


def test_the_remedies_leave_wider_parameters_alone():
    _, plain, _ = train(np.float32, steps=20)
    _, stochastic, _ = train(np.float32, steps=20, stochastic_rounding=True)
    _, compensated, opt = train(np.float32, steps=20, compensated=True)
    assert plain.tobytes() == stochastic.tobytes() == compensated.tobytes()
    assert "compensation" not in opt.state[0][0]


@pytest.mark.parametrize("options", [{"stochastic_rounding": True, "seed": 3},
                                     {"compensated": True}], ids=["stochastic", "compensated"])
def test_a_16bit_run_resumes_bit_for_bit(tmp_path, options):
    a, target = stalling_task()
    w = np.full(32, 4.0, np.float32).astype(BF16)
    opt = optim_core.Adam([w], lr=3e-3, **options)

    def grad(param):
        return (2 * a.T @ (a @ param.astype(np.float32) - target) / 256).astype(BF16)

    for _ in range(5):
        opt.step([grad(w)])
    optim_core.save_checkpoint(tmp_path / "c", {"w": w, "optimizer": opt.state_dict()})
    loaded = optim_core.load_checkpoint(tmp_path / "c")
    resumed = optim_core.Adam([loaded["w"]], lr=3e-3, **options)
    resumed.load_state_dict(loaded["optimizer"])
    for _ in range(5):
        opt.step([grad(w)])
        resumed.step([grad(loaded["w"])])
    assert loaded["w"].tobytes() == w.tobytes()


def test_the_options_are_checked():
    with pytest.raises(ValueError, match="choose one"):
        optim_core.Adam([np.zeros(3)], stochastic_rounding=True, compensated=True)
    with pytest.raises(ValueError, match="flat=False"):
        optim_core.Adam([np.zeros(3)], compensated=True, flat=True)
    assert Rounding("stochastic", 1, 1, 0).key(0) != Rounding("stochastic", 1, 2, 0).key(0)
