"""8-bit and 4-bit optimizer states: the maps, quantize/dequantize, one fused pass, resume.

``state_bits=8`` (Dettmers et al. 2022) and ``state_bits=4`` (Li et al. 2023) store each
state of a tensor of at least 4096 elements as block-wise codes and float32 absmax
scales; the fused kernels dequantize, update and quantize again in one pass, generated
from the same rule the generic path runs (see ``optim_core/backends/_quantized.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from optim_core.backends._quantized import (
    BLOCK_SIZES,
    QUANTIZE_MIN_SIZE,
    QuantizedState,
    create_dynamic_map,
    dequantize,
    midpoints,
    quantization_map,
    quantize,
)

import optim_core

#: (optimizer, hyperparameters, bits): both widths, both maps of each, a state only stored
#: (SGD's first step), three quantized states (RMSprop), a state read only (Lion's update
#: reads exp_avg before it is written). Each is a compiled kernel: few, for the time.
CASES = [
    ("Adam", {"lr": 0.01}, 8),
    ("Lion", {"lr": 0.001, "weight_decay": 0.1}, 4),
    ("SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True}, 8),
    ("RMSprop", {"lr": 0.001, "centered": True, "momentum": 0.5}, 4),
]
IDS = [f"{name}-{bits}bit-{'-'.join(hyper)}" for name, hyper, bits in CASES]
#: A partial last block, and an odd size (the last byte of 4-bit codes half padding).
SIZE = QUANTIZE_MIN_SIZE + 333


def start_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"big": rng.standard_normal((SIZE,)).astype(np.float32),
            "small": rng.standard_normal((10, 10)).astype(np.float32)}


def gradient(param: np.ndarray, step: int) -> np.ndarray:
    """Depends on the parameter; magnitudes spread over decades, so the dynamic maps'
    small entries are used; exact zeros included."""
    scale = 10.0 ** -(np.arange(param.size) % 5).reshape(param.shape)
    g = (1.5 * (param - 0.5) + np.cos(step + param)) * scale
    g.reshape(-1)[::11] = 0
    return g.astype(param.dtype)


def _unpack(codes: np.ndarray) -> np.ndarray:
    """4-bit codes, one an element."""
    return np.stack([codes & 15, codes >> 4], axis=1).reshape(-1).astype(int)


def quantized_entries(opt) -> dict[str, QuantizedState]:
    return {k: v for k, v in opt.state[0][0].items() if isinstance(v, QuantizedState)}


# ------------------------------------------------------------------------- the maps
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_the_maps_are_sorted_tables_ending_at_one(bits, signed):
    qmap = quantization_map(bits, signed)
    assert qmap.dtype == np.float32 and qmap.shape == (2 ** bits,)
    assert np.all(np.diff(qmap) > 0) and qmap[-1] == 1
    assert (qmap.min() < 0) == signed and qmap.min() >= -1
    mids = midpoints(bits, signed)
    assert np.all((qmap[:-1] < mids) & (mids < qmap[1:]))


def test_the_4bit_second_moment_map_has_no_zero_and_the_others_do():
    # Li et al. 2023's zero-point problem: a second moment quantized to 0 divides the
    # update by eps alone. Every other map holds 0 exactly.
    assert 0 not in quantization_map(4, False)
    assert quantization_map(4, False)[0] == 1 / 16
    for bits, signed in ((8, True), (8, False), (4, True)):
        assert 0 in quantization_map(bits, signed)


def test_the_8bit_maps_are_the_dynamic_maps_of_the_paper():
    # Signed: 7 decimal exponents, each with twice the fraction steps of the one before,
    # both signs, then 0 and 1: 2 * 127 + 2 entries, the smallest magnitude ~1e-6.
    signed = quantization_map(8, True)
    assert np.array_equal(signed, create_dynamic_map(True, 7, 8))
    positive = signed[signed > 0]
    assert positive.size == 128 and np.isclose(positive[0], 0.55e-6, rtol=1e-6)
    unsigned = quantization_map(8, False)
    assert np.array_equal(unsigned, create_dynamic_map(False, 7, 8))
    assert np.count_nonzero(unsigned) == 255


# ------------------------------------------------------------------ quantize/dequantize
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_takes_the_nearest_map_entry_of_each_block(bits, signed):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(1000) * 10.0 ** rng.integers(-6, 2, 1000)).astype(np.float32)
    values = values if signed else np.abs(values)
    codes, absmax = quantize(np, values, bits, signed)
    block = BLOCK_SIZES[bits]
    assert absmax.dtype == np.float32 and absmax.shape == (-(-1000 // block),)
    np.testing.assert_array_equal(absmax, [np.abs(values[i:i + block]).max()
                                           for i in range(0, 1000, block)])
    if bits == 4:
        assert codes.shape == (500,)
        codes = np.stack([codes & 15, codes >> 4], axis=1).reshape(-1)
    x = values / np.repeat(absmax, block)[:1000]
    nearest = np.abs(x[:, None] - quantization_map(bits, signed)[None, :]).argmin(axis=1)
    np.testing.assert_array_equal(codes, nearest)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_the_fused_kernels_code_table_gives_searchsorted_codes(bits, signed):
    # The numba kernels code a float32 by one entry of code_table and one integer
    # comparison (see _numba._code); here that arithmetic in NumPy, against searchsorted,
    # on every bucket's first and last value, each midpoint and its neighbours, signed
    # zeros, NaN and random bit patterns.
    from optim_core.backends._quantized import CODE_TABLE_BITS, code_table

    packed, steps, mids = code_table(bits, signed)
    assert steps == 1 and packed.dtype == np.int32 and packed.size == 1 << CODE_TABLE_BITS
    shift = 32 - CODE_TABLE_BITS
    tops = np.arange(1 << CODE_TABLE_BITS, dtype=np.uint32) << shift
    rng = np.random.default_rng(2)
    x = np.concatenate([
        tops.view(np.float32), (tops | np.uint32((1 << shift) - 1)).view(np.float32),
        mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
        np.float32([0.0, -0.0, 1.0, -1.0, np.nan]),
        rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    x = x[~np.isinf(x)]  # a value over its block's absmax is at most 1 in magnitude, or NaN
    i = x.view(np.int32).astype(np.int64)
    entry = packed[(i >> shift) & ((1 << CODE_TABLE_BITS) - 1)].astype(np.int64)
    key = (i ^ (i >> 31)) & 0xFFFF
    codes = (entry >> 16) + ((((entry & 0xFFFF) - key) >> 63) & 1)
    np.testing.assert_array_equal(codes, np.searchsorted(mids, x, side="left"))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_dequantize_then_quantize_again_gives_the_same_codes_and_scales(bits, signed):
    rng = np.random.default_rng(1)
    values = rng.standard_normal(SIZE).astype(np.float32)
    block = BLOCK_SIZES[bits]
    if signed:
        # Each block's largest magnitude positive: the signed maps hold 1 but not -1 (as
        # bitsandbytes'), so a block led by a negative value shrinks by 1 - 0.99297 at
        # 8 bits when requantized.
        for i in range(0, SIZE, block):
            part = values[i:i + block]
            part *= np.sign(part[np.abs(part).argmax()])
    else:
        values = values ** 2
    codes, absmax = quantize(np, values, bits, signed)
    state = QuantizedState(codes, absmax, bits, signed, (SIZE,))
    restored = dequantize(np, state, np.float32)
    assert restored.shape == (SIZE,) and restored.dtype == np.float32
    # Within half the largest gap of the map, in units of the block's absmax, or the
    # distance from the end of the range to the map's first entry (the signed maps hold 1
    # but not -1, as bitsandbytes'; the 4-bit unsigned one starts at 1/16).
    qmap = quantization_map(bits, signed)
    bound = max(np.diff(qmap).max() / 2, 1 + qmap[0] if signed else qmap[0])
    per_element = np.repeat(absmax, block)[:SIZE]
    assert np.all(np.abs(restored - values) <= bound * per_element * (1 + 1e-5))
    again = quantize(np, restored, bits, signed)
    np.testing.assert_array_equal(again[0], codes)
    np.testing.assert_array_equal(again[1], absmax)


def test_an_all_zero_block_stays_zero_with_every_map():
    for bits in (8, 4):
        for signed in (True, False):
            codes, absmax = quantize(np, np.zeros(300, np.float32), bits, signed)
            state = QuantizedState(codes, absmax, bits, signed, (300,))
            assert not np.any(absmax) and not np.any(dequantize(np, state, np.float32))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_and_dequantize_agree_on_every_backend(xp, bits):
    rng = np.random.default_rng(2)
    values = rng.standard_normal(777).astype(np.float32)
    codes, absmax = quantize(np, values, bits, True)
    theirs = quantize(xp.xp, xp.asarray(values, "float32"), bits, True)
    np.testing.assert_array_equal(xp.to_numpy(theirs[0]), codes)
    np.testing.assert_array_equal(xp.to_numpy(theirs[1]), absmax)
    state = QuantizedState(theirs[0], theirs[1], bits, True, (777,))
    expected = dequantize(np, QuantizedState(codes, absmax, bits, True, (777,)), np.float32)
    np.testing.assert_array_equal(xp.to_numpy(dequantize(xp.xp, state, xp.xp.float32)),
                                  expected)


# ------------------------------------------------------------------------- optimizers
def test_large_tensors_are_quantized_small_ones_stay_float32():
    params = start_params()
    opt = optim_core.Adam(params, state_bits=8, impl="generic")
    opt.step({k: gradient(v, 0) for k, v in params.items()})
    big, small = opt.state[0]
    assert all(isinstance(v, QuantizedState) and v.bits == 8 for v in big.values())
    assert big["exp_avg"].signed and not big["exp_avg_sq"].signed
    assert all(v.dtype == np.float32 and v.shape == (10, 10) for v in small.values())


@pytest.mark.parametrize("bits, most", [(32, 8.0), (8, 2.1), (4, 1.1)])
def test_state_nbytes_counts_codes_and_scales(bits, most):
    param = np.zeros(1 << 16, np.float32)
    opt = optim_core.Adam([param], state_bits=bits, impl="generic")
    assert opt.state_nbytes() == 0
    opt.step([np.ones_like(param)])
    per_parameter = opt.state_nbytes() / param.size
    assert per_parameter <= most
    block = BLOCK_SIZES.get(bits)
    expected = 8.0 if bits == 32 else 2 * (bits / 8 + 4 / block)
    assert per_parameter == pytest.approx(expected)


def test_state_bits_is_checked_when_the_optimizer_is_made():
    param = [np.zeros(5000, np.float32)]
    with pytest.raises(ValueError, match="state_bits"):
        optim_core.Adam(param, state_bits=16)
    with pytest.raises(ValueError, match="no state that state_bits=8"):
        optim_core.Adagrad(param, state_bits=8)
    with pytest.raises(ValueError, match="flat=True"):
        optim_core.Adam(param, state_bits=8, flat=True)


@pytest.mark.parametrize("name, hyper, bits", CASES, ids=IDS)
def test_the_fused_pass_equals_the_generic_path_step_by_step(name, hyper, bits):
    """The fused kernel dequantizes, updates and quantizes in one pass; the generic path
    does the same with array API calls. From the same inputs every step, they agree bit
    for bit: parameters, codes and scales."""
    generic_params, fused_params = start_params(), start_params()
    generic = getattr(optim_core, name)(generic_params, **hyper, state_bits=bits,
                                        impl="generic")
    fused = getattr(optim_core, name)(fused_params, **hyper, state_bits=bits, impl="fused")
    for step in range(4):
        grads = {k: gradient(v, step) for k, v in generic_params.items()}
        launches = fused.implementation.launches
        generic.step(grads)
        fused.step(grads)
        assert fused.implementation.launches == launches + 2  # both tensors fused
        for key in generic_params:
            assert generic_params[key].tobytes() == fused_params[key].tobytes(), (step, key)
        ours, theirs = quantized_entries(generic), quantized_entries(fused)
        assert set(ours) == set(theirs) and ours
        for key, state in ours.items():
            np.testing.assert_array_equal(theirs[key].codes, state.codes, err_msg=key)
            np.testing.assert_array_equal(theirs[key].absmax, state.absmax, err_msg=key)
        for key, value in generic.state[0][1].items():
            np.testing.assert_array_equal(fused.state[0][1][key], value)
    assert any(len(k) == 4 and k[3][0][1] == bits for k in fused.implementation.compiled)


def test_the_multithreaded_loop_is_the_serial_loop_over_chunks_of_blocks():
    # Compiling numba's parallel variant costs more than this suite may spend; it is the
    # serial kernel's text but for its outer loop (prange over chunks of 16 blocks, which
    # are independent), so the serial kernel's bit-for-bit parity covers its arithmetic.
    from optim_core.backends._lowering import lower
    from optim_core.backends._numba import quantized_kernel_source

    from optim_core.optim import rules

    opt = optim_core.Adam([np.zeros(SIZE, np.float32)], state_bits=8)
    scalars, _ = opt.step_scalars(opt.param_groups[0], opt.group_state[0])
    _, _, kernel = lower(rules.adam, scalars, frozenset({"exp_avg", "exp_avg_sq"}))
    layout = (("exp_avg", 8, True), ("exp_avg_sq", 8, False))
    source = quantized_kernel_source(kernel, "float32", layout)
    parallel = source[source.index("@numba.njit(parallel=True"):source.index(
        "@numba.njit(parallel=False")].strip()
    serial = source[source.index("@numba.njit(parallel=False"):].strip()
    assert parallel.replace("parallel=True", "parallel=False").replace(
        "def kernel(", "def kernel_serial(").replace("numba.prange(", "range(") == serial


@pytest.mark.parametrize("bits", [8, 4])
def test_the_vbmi_kernels_give_the_gathered_values_bit_for_bit(bits):
    # Where this host has AVX512-VBMI the float32 kernels dequantize 64 codes at a time by
    # byte lookups in registers (_dequant64) instead of gathers, and look codes up by
    # 8-lane gathers (_codes8): both kernels, from the same inputs (every code, a last
    # partial block, zero and negative scales, NaN blocks), write the same parameters,
    # codes and scales.
    import hashlib

    from optim_core.backends._kernel_cache import import_kernel_module
    from optim_core.backends._lowering import lower
    from optim_core.backends._numba import (
        NumbaImplementation,
        byte_planes,
        quantized_kernel_source,
        vbmi_kernels,
    )

    from optim_core.optim import rules

    for signed in (True, False):
        qmap = quantization_map(bits, signed)
        planes = byte_planes(qmap).reshape(4, 256)
        entries = planes.T.copy().view(np.float32).reshape(-1)
        np.testing.assert_array_equal(entries[:qmap.size].view(np.uint32), qmap.view(np.uint32))
    if not vbmi_kernels():
        pytest.skip("no AVX512-VBMI, or numba compiles for another CPU")
    size = 64 * BLOCK_SIZES[bits] + 77
    opt = optim_core.Adam([np.zeros(size, np.float32)], state_bits=bits)
    scalars, _ = opt.step_scalars(opt.param_groups[0], opt.group_state[0])
    _, hoisted, kernel = lower(rules.adam, scalars, frozenset({"exp_avg", "exp_avg_sq"}))
    layout = (("exp_avg", bits, True), ("exp_avg_sq", bits, False))
    rng = np.random.default_rng(5)
    blocks = -(-size // BLOCK_SIZES[bits])
    codes = [rng.integers(0, 256, size if bits == 8 else (size + 1) // 2, dtype=np.uint8)
             for _ in layout]
    scales = [rng.standard_normal(blocks).astype(np.float32) for _ in layout]
    scales[0][:3] = [0.0, -1.0, 1e-30]
    param = rng.standard_normal(size).astype(np.float32)
    grad = rng.standard_normal(size).astype(np.float32)
    grad[[5, 6, 600, 1300]] = [np.nan, -np.inf, np.inf, 1e30]  # NaN blocks: past +-1 too
    results = []
    for vbmi in (True, False):
        source = quantized_kernel_source(kernel, "float32", layout, vbmi=vbmi)
        assert ("_dequant64(" in source) == vbmi and ("_lookup64(" in source) == vbmi
        digest = hashlib.sha256(source.encode()).hexdigest()[:20]
        module = import_kernel_module(f"optim_core_test_dequant_{digest}", source,
                                      ("kernel_serial",))
        arrays = [param.copy(), grad.copy()]
        for (_, _, sign), q, m in zip(layout, codes, scales):
            state = QuantizedState(q.copy(), m.copy(), bits, sign, (size,))
            arrays += NumbaImplementation().quantized_arrays(state)
        module.kernel_serial(*arrays, *[np.float32(h) for h in hoisted])
        results.append(arrays)
    for ours, theirs in zip(*results):
        assert ours.tobytes() == theirs.tobytes()


#: Appended to a generated 8-bit module: the codes _codes64 (_codes64_mirrored for a
#: signed map) writes for values / scale,
#: 256 (a block's stack buffer) at a time.
_CODES64_PROBE = """

@numba.njit(cache=False)
def codes_of(planes, values, scale, out, signed):
    buf = _stack(T(0))
    for start in range(0, values.shape[0], 256):
        for k in range(256):
            buf[k] = values[start + k]
        view = out[start:start + 256]
        for j in range(0, 256, 64):
            if signed:
                _codes64_mirrored(planes, buf, j, scale, view)
            else:
                _codes64(planes, buf, j, scale, view)
"""


def test_the_vbmi_8bit_codes_are_the_nearest_entrys_at_every_midpoint():
    # _codes64 codes x = value / scale with no table in memory: an estimate from two
    # lines of x's pair of octaves (code_estimate), then one comparison with the midpoint
    # it names. The estimate may be off by one only where that comparison corrects it:
    # every midpoint and the floats up to 3 apart either side, each map entry, the
    # decade boundaries and their neighbours, signed zeros, subnormals, +-1, values past
    # +-1 (a NaN block's scale is 1), infinities and NaN (the last code, as code_table),
    # random values of every decade, and divisions by scales other than 1: the codes of
    # searchsorted over the midpoints of x rounded to float32.
    import hashlib

    from optim_core.backends._kernel_cache import import_kernel_module
    from optim_core.backends._lowering import lower
    from optim_core.backends._numba import (
        kernel_planes,
        quantized_kernel_source,
        vbmi_kernels,
    )

    from optim_core.optim import rules

    if not vbmi_kernels():
        pytest.skip("no AVX512-VBMI, or numba compiles for another CPU")
    opt = optim_core.Adam([np.zeros(QUANTIZE_MIN_SIZE, np.float32)], state_bits=8)
    scalars, _ = opt.step_scalars(opt.param_groups[0], opt.group_state[0])
    _, _, kernel = lower(rules.adam, scalars, frozenset({"exp_avg", "exp_avg_sq"}))
    layout = (("exp_avg", 8, True), ("exp_avg_sq", 8, False))
    source = quantized_kernel_source(kernel, "float32", layout, vbmi=True) + _CODES64_PROBE
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    module = import_kernel_module(f"optim_core_test_codes64_{digest}", source, ("codes_of",))
    rng = np.random.default_rng(11)
    for signed in (True, False):
        mids, qmap = midpoints(8, signed), quantization_map(8, signed)
        near = (mids.view(np.int32)[:, None] + np.arange(-3, 4)).view(np.float32).ravel()
        tens = np.float32(10.0 ** np.arange(-9, 1))
        tens = (tens.view(np.int32)[:, None] + np.arange(-2, 3)).view(np.float32).ravel()
        x = np.concatenate([
            near, -near, qmap, -qmap, tens, -tens,
            np.float32([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1e-40, -3e-39, 1.0000001,
                        -1.0000001, 2.0, -3.5, 1e30, -1e30, 3.4e38, np.inf, -np.inf, np.nan,
                        -np.nan]),
            (rng.choice([-1, 1], 20000) * 10.0 ** rng.uniform(-9, 0, 20000)).astype(np.float32),
            rng.uniform(-1, 1, 20000).astype(np.float32)])
        x = np.concatenate([x, np.zeros(-x.size % 256, np.float32)])
        planes = kernel_planes(8, signed)
        for scale in (1.0, 3.0, 0.1, 1e-30, 7e25):
            with np.errstate(over="ignore", invalid="ignore"):
                values = (x.astype(np.float64) * scale).astype(np.float32)
                unit = values / np.float32(scale)
            codes = np.empty(x.size, np.uint8)
            module.codes_of(planes, values, np.float32(scale), codes, signed)
            expected = np.searchsorted(mids, unit, side="left")
            expected[np.isinf(unit)] = mids.size  # as code_table
            wrong = np.flatnonzero(codes != expected)
            assert wrong.size == 0, (signed, scale, unit[wrong[:5]], codes[wrong[:5]],
                                     expected[wrong[:5]])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_states_resume_bit_for_bit_from_a_checkpoint(tmp_path, bits):
    params = start_params()
    opt = optim_core.Adam(params, lr=0.01, state_bits=bits, impl="generic")
    for step in range(3):
        opt.step({k: gradient(v, step) for k, v in params.items()})
    saved = opt.state_dict()
    assert saved["state"][0]["exp_avg"]["codes"].dtype == np.uint8
    optim_core.save_checkpoint(tmp_path / "c", {"params": params, "optimizer": saved})
    loaded = optim_core.load_checkpoint(tmp_path / "c")
    resumed = optim_core.Adam(loaded["params"], lr=0.01, state_bits=bits, impl="generic")
    resumed.load_state_dict(loaded["optimizer"])
    for key, state in quantized_entries(opt).items():
        np.testing.assert_array_equal(quantized_entries(resumed)[key].codes, state.codes)
    for step in range(3, 6):
        opt.step({k: gradient(v, step) for k, v in params.items()})
        resumed.step({k: gradient(v, step) for k, v in loaded["params"].items()})
    for key in params:
        assert params[key].tobytes() == loaded["params"][key].tobytes()


def test_a_state_dict_of_other_state_bits_is_refused_and_changes_nothing():
    params = start_params()
    eight = optim_core.Adam(params, state_bits=8)
    eight.step({k: gradient(v, 0) for k, v in params.items()})
    four = optim_core.Adam(start_params(), state_bits=4)
    plain = optim_core.Adam(start_params())
    for target in (four, plain):
        with pytest.raises(ValueError, match="state_bits|bits=8"):
            target.load_state_dict(eight.state_dict())
        assert target.state == [[{}, {}]]
    with pytest.raises(ValueError, match="unquantized"):
        four.load_state_dict(plain.state_dict() | {"state": [
            {"exp_avg": np.zeros(SIZE, np.float32), "exp_avg_sq": np.zeros(SIZE, np.float32)},
            {}]})


def test_the_generic_path_runs_quantized_states_on_every_backend(xp):
    """The trajectory of NumPy's, step after step: parameters to float32 rounding (torch
    evaluates some float32 expressions with a wider intermediate), codes the same but for
    the rare value a rounding moves across a midpoint, and then by one code."""
    host = start_params()
    theirs = {k: xp.asarray(v, "float32") for k, v in host.items()}
    ours_opt = optim_core.Adam(host, lr=0.01, state_bits=4, impl="generic")
    their_opt = optim_core.Adam(theirs, lr=0.01, state_bits=4, impl="generic")
    for step in range(3):
        grads = {k: gradient(v, step) for k, v in host.items()}
        ours_opt.step(grads)
        theirs = their_opt.step({k: xp.asarray(v, "float32") for k, v in grads.items()})
    for key in host:
        np.testing.assert_allclose(xp.to_numpy(theirs[key]), host[key], rtol=1e-5, atol=1e-6)
    for key, state in quantized_entries(ours_opt).items():
        other = xp.to_numpy(quantized_entries(their_opt)[key].codes)
        moved = np.abs(_unpack(other) - _unpack(state.codes))
        assert moved.max() <= 1 and np.count_nonzero(moved) <= 0.01 * SIZE, key
        np.testing.assert_allclose(xp.to_numpy(quantized_entries(their_opt)[key].absmax),
                                   state.absmax, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_adam_still_solves_a_least_squares_problem(bits):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((64, 64)).astype(np.float32)
    target = rng.standard_normal((64, 80)).astype(np.float32)
    losses = {}
    for state_bits in (32, bits):
        w = np.zeros((64, 80), np.float32)
        opt = optim_core.Adam([w], lr=0.05, state_bits=state_bits, impl="generic")
        for _ in range(150):
            opt.step([a.T @ (a @ w - target) / 64])
        losses[state_bits] = float(np.mean((a @ w - target) ** 2))
    start = float(np.mean(target ** 2))
    assert losses[bits] < 0.05 * start
    assert losses[bits] < 2 * losses[32] + 1e-3 * start


def test_fit_trains_with_8bit_states_and_resumes_them_bit_for_bit(tmp_path):
    from optim_core import fit, models

    rng = np.random.default_rng(6)
    X = rng.standard_normal((200, 64)).astype(np.float32)
    y = (X[:, :3].argmax(axis=1)).astype(np.int64)

    def run(epochs, **options):
        model = models.MLP([64, 96, 3])  # a 6144-element weight: quantized
        history = fit(model, X, y, optimizer="adam", lr=0.01, epochs=epochs, batch_size=50,
                      seed=1, progress=False, state_bits=8, **options)
        return model, history

    model, history = run(4)
    assert isinstance(history.optimizer.state[0][0]["exp_avg"], QuantizedState)
    assert float(model.score(X, y)) > 0.8
    path = tmp_path / "run.ckpt"
    run(2, checkpoint=path)
    resumed, _ = run(4, checkpoint=path, resume=True)
    for name, value in model.params.items():
        assert np.asarray(resumed.params[name]).tobytes() == np.asarray(value).tobytes()


def test_the_cli_passes_state_bits_to_the_optimizers_that_take_it():
    from optim_core.tools.cli import _state_bits, build_parser

    args = build_parser().parse_args(["compare", "--state-bits", "4"])
    assert _state_bits("adam", args) == {"state_bits": 4}
    assert _state_bits("adagrad", args) == {}  # keeps 32-bit states
    assert _state_bits("adam", build_parser().parse_args(["compare"])) == {}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--state-bits", "16"])
