"""float16 and bfloat16 parameters: computed in float32, rounded once, never NaN from eps.

In float16 the default ``eps=1e-8`` rounds to 0, so an optimizer computing in float16
divides 0 by 0 on a zero gradient (``torch.optim`` on CPU does, and returns NaN).
optim-core computes each step of a 16-bit parameter in float32 from the stored
16-bit values and rounds the results once when storing them; parameters keep their
16-bit dtype. The states of a bfloat16 parameter are bfloat16 (float32's exponent range:
nothing underflows that float32 would keep); those of a float16 parameter are float32,
since a second moment (a squared gradient) under 6e-8 is 0 in float16: Adam would then
divide by ``eps`` alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from optim_db import NAMES, RICH

import optim_core

ml_dtypes = pytest.importorskip("ml_dtypes")

NUMPY_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
#: The dtype of the states of a parameter of each 16-bit dtype.
STATE_DTYPES = {"float16": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
#: Optimizers whose defaults change a parameter even with a zero gradient.
DECAYS_BY_DEFAULT = {name for name in NAMES
                     if getattr(optim_core, name)([np.ones(1)]).defaults.get("weight_decay")}


def test_float16_cannot_hold_the_default_eps():
    # The reason for computing in float32: this is what a float16 computation would use.
    assert np.float16(1e-8) == 0 and np.float32(1e-8) > 0


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_with_default_eps_give_no_nan(name, dtype):
    dtype, state_dtype = NUMPY_DTYPES[dtype], STATE_DTYPES[dtype]
    param = np.linspace(-2, 2, 7).astype(dtype)
    start = param.copy()
    opt = getattr(optim_core, name)([param])
    for _ in range(20):
        opt.step([np.zeros(7, dtype)])
    values = param.astype(np.float32)
    assert np.all(np.isfinite(values))
    if name not in DECAYS_BY_DEFAULT:
        assert param.tobytes() == start.tobytes()
    assert param.dtype == dtype
    assert all(s.dtype == state_dtype and np.all(np.isfinite(s.astype(np.float32)))
               for s in opt.state[0][0].values())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_give_no_nan_on_torch(name, dtype):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype)
    param = torch.linspace(-2, 2, 7).to(dtype)
    start = param.clone()
    opt = getattr(optim_core, name)([param])
    for _ in range(20):
        opt.step([torch.zeros(7, dtype=dtype)])
    assert torch.all(torch.isfinite(param)) and param.dtype == dtype
    if name not in DECAYS_BY_DEFAULT:
        assert torch.equal(param, start)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_each_step_is_the_float32_step_rounded_once(name, dtype):
    """The 16-bit trajectory equals a float32 run whose values are rounded to 16 bits
    after every step: one rounding per stored value, none inside the step."""
    dtype, state_dtype = NUMPY_DTYPES[dtype], STATE_DTYPES[dtype]
    rng = np.random.default_rng(7)
    low = rng.standard_normal((4, 5)).astype(dtype)
    wide = low.astype(np.float32)
    # An lr the 16-bit type holds exactly: a state that starts at lr (Rprop's step sizes)
    # then starts equal in both runs.
    options = {**RICH[name], "lr": float(np.asarray(0.05, dtype)), "impl": "generic"}
    opt_low = getattr(optim_core, name)([low], **options)
    opt_wide = getattr(optim_core, name)([wide], **options)
    for _ in range(6):
        grad = (rng.standard_normal((4, 5)) * rng.choice([1e-3, 1.0, 30.0])).astype(dtype)
        opt_low.step([grad])
        opt_wide.step([grad.astype(np.float32)])
        for arr in (wide, *opt_wide.state[0][0].values()):
            arr[...] = arr.astype(dtype if arr is wide else state_dtype).astype(np.float32)
    assert low.tobytes() == wide.astype(dtype).tobytes()
    for key, value in opt_low.state[0][0].items():
        assert value.dtype == state_dtype
        assert value.tobytes() == opt_wide.state[0][0][key].astype(state_dtype).tobytes()


def test_float16_second_moments_do_not_underflow():
    # (1e-5)**2 = 1e-10 is 0 in float16: a float16 second moment would make Adam's step
    # lr * m / eps, a thousand times too large. In float32 the step is about lr.
    param = np.zeros(4, np.float16)
    opt = optim_core.Adam([param], lr=1e-3)
    opt.step([np.full(4, 1e-5, np.float16)])
    assert opt.state[0][0]["exp_avg_sq"].dtype == np.float32
    assert np.float16(1e-5) ** 2 == 0 and opt.state[0][0]["exp_avg_sq"][0] > 0
    np.testing.assert_allclose(param.astype(np.float32), -1e-3, rtol=1e-2)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_small_gradients_stay_finite(dtype):
    dtype = NUMPY_DTYPES[dtype]
    for name in NAMES:
        param = np.ones(5, dtype)
        opt = getattr(optim_core, name)([param], **RICH[name])
        for scale in (1e-7, 1e-5, 1e-3):
            opt.step([np.full(5, scale).astype(dtype)])
        assert np.all(np.isfinite(param.astype(np.float32))), name


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_low_precision_state_checkpoints_and_resumes_exactly(tmp_path, dtype):
    dtype = NUMPY_DTYPES[dtype]
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(6).astype(dtype) for _ in range(6)]
    param = rng.standard_normal(6).astype(dtype)
    opt = optim_core.Adam([param], lr=0.01, amsgrad=True)
    for g in grads[:3]:
        opt.step([g])
    optim_core.save_checkpoint(tmp_path / "c", {"params": [param], "optimizer": opt.state_dict()})
    loaded = optim_core.load_checkpoint(tmp_path / "c")
    resumed_param = loaded["params"][0]
    assert resumed_param.dtype == dtype
    resumed = optim_core.Adam([resumed_param], lr=0.01, amsgrad=True)
    resumed.load_state_dict(loaded["optimizer"])
    for g in grads[3:]:
        opt.step([g])
        resumed.step([g])
    assert resumed_param.tobytes() == param.tobytes()


def test_torch_bfloat16_state_dict_round_trips():
    torch = pytest.importorskip("torch")
    param = torch.linspace(-1, 1, 5).to(torch.bfloat16)
    opt = optim_core.Adam([param], lr=0.1)
    opt.step([torch.ones(5, dtype=torch.bfloat16)])
    state_dict = opt.state_dict()
    assert state_dict["state"][0]["exp_avg"].dtype == ml_dtypes.bfloat16
    other = optim_core.Adam([param.clone()], lr=0.1)
    other.load_state_dict(state_dict)
    for key, value in opt.state[0][0].items():
        assert other.state[0][0][key].dtype == torch.bfloat16
        assert torch.equal(other.state[0][0][key], value)
