"""bitsandbytes (0.50.2, CPU) as an oracle of ``state_bits=8``: what agrees and what differs.

* The dynamic maps: the same construction; bitsandbytes rounds its float32 ``linspace``
  as it goes, ours is computed in float64 and rounded once, so 72 signed and 100
  unsigned entries differ, by at most 2 units in the last place.
* Blockwise quantization (blocks of 256, absmax): the same scales; the same code for
  99.5% of elements or more, the others one code apart, all within a hair of a
  midpoint (bitsandbytes' CPU kernel finds the bucket with an approximate search; ours
  compares with the exact midpoints, so it is the nearest map entry). Dequantizing the
  same codes gives the same values.
* One Adam8bit update against ``Adam(state_bits=8)``: the same scales to float32
  rounding, codes equal for 99% or more, parameters within half a step.
"""

from __future__ import annotations

import numpy as np
import pytest
from optim_core.backends._quantized import QuantizedState, dequantize, quantization_map, quantize

import optim_core

torch = pytest.importorskip("torch")
try:
    import bitsandbytes
    import bitsandbytes.functional as bnb_functional
except Exception as exc:  # noqa: BLE001 - a wheel that does not load here is absent
    pytest.skip(f"bitsandbytes does not import: {exc}", allow_module_level=True)


@pytest.mark.parametrize("signed", [True, False])
def test_the_dynamic_maps_agree_to_two_units_in_the_last_place(signed):
    theirs = bnb_functional.create_dynamic_map(signed=signed).numpy()
    ours = quantization_map(8, signed)
    assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
    ulps = np.abs(theirs.view(np.int32).astype(np.int64) - ours.view(np.int32))
    assert ulps.max() <= 2
    assert np.count_nonzero(ulps) == (72 if signed else 100)


def test_blockwise_quantization_agrees_but_for_values_at_a_midpoint():
    torch.manual_seed(0)
    x = torch.randn(5000)
    codes, state = bnb_functional.quantize_blockwise(x, blocksize=256)
    ours, absmax = quantize(np, x.numpy(), 8, True)
    np.testing.assert_array_equal(state.absmax.numpy(), absmax)
    theirs = codes.numpy()
    differ = theirs != ours
    assert differ.mean() <= 0.005
    assert np.abs(theirs[differ].astype(int) - ours[differ]).max() == 1
    # Where they differ, x lies within 5% of a gap from the midpoint between the codes.
    qmap = quantization_map(8, True)
    x_norm = x.numpy() / np.repeat(absmax, 256)[:5000]
    low = np.minimum(theirs[differ], ours[differ])
    middle = (qmap[low].astype(np.float64) + qmap[low + 1]) / 2
    assert np.all(np.abs(x_norm[differ] - middle) <= 0.05 * (qmap[low + 1] - qmap[low]))
    same = QuantizedState(theirs.copy(), absmax, 8, True, (5000,))
    np.testing.assert_allclose(dequantize(np, same, np.float32),
                               bnb_functional.dequantize_blockwise(codes, state).numpy(),
                               rtol=3e-7, atol=0)


def test_one_8bit_adam_update_agrees_with_bitsandbytes():
    torch.manual_seed(1)
    start = torch.randn(8192)
    theirs = torch.nn.Parameter(start.clone())
    opt = bitsandbytes.optim.Adam8bit([theirs], lr=1e-2, min_8bit_size=4096)
    ours = start.numpy().copy()
    mine = optim_core.Adam([ours], lr=1e-2, state_bits=8)
    for _ in range(3):
        grad = torch.randn(8192)
        theirs.grad = grad.clone()
        opt.step()
        mine.step([grad.numpy()])
    state, quantized = opt.state[theirs], mine.state[0][0]
    assert state["absmax1"].shape == quantized["exp_avg"].absmax.shape == (32,)
    for name, key in (("exp_avg", "1"), ("exp_avg_sq", "2")):
        np.testing.assert_allclose(state["absmax" + key].numpy(), quantized[name].absmax,
                                   rtol=1e-6)
        assert (state["state" + key].numpy() == quantized[name].codes).mean() >= 0.99
    difference = np.abs(theirs.detach().numpy() - ours)
    assert difference.max() <= 0.5 * 1e-2 and np.median(difference) < 1e-6
