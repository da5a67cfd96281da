"""On a GPU: the generated CUDA kernels compute what the generic path computes on CuPy arrays.

Every test here needs a CUDA GPU (the ``gpu`` fixture skips elsewhere); the
arithmetic of the same kernel source is checked without one in test_cuda_source.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from fused_cases import CASES, IDS, TOLERANCE, gradient, start_params

import optim_core

STEPS = 12


def run(cupy, name: str, hyper: dict, dtype: str, impl: str, *, flat: bool = False):
    params = {k: cupy.asarray(v) for k, v in start_params(dtype).items()}
    opt = getattr(optim_core, name)(params, **hyper, impl=impl, flat=flat)
    for step in range(STEPS):
        opt.step({k: cupy.asarray(gradient(cupy.asnumpy(v), step))
                  for k, v in opt.params.items()})
    return opt


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, hyper", CASES, ids=IDS)
def test_fused_equals_generic_on_cupy(gpu, name, hyper, dtype):
    import cupy

    fused = run(cupy, name, hyper, dtype, "fused")
    generic = run(cupy, name, hyper, dtype, "generic")
    assert fused.implementation.name == "fused-cuda"
    for key, want in generic.params.items():
        got = fused.params[key]
        assert isinstance(got, cupy.ndarray) and got.dtype == want.dtype
        np.testing.assert_allclose(cupy.asnumpy(got), cupy.asnumpy(want),
                                   **TOLERANCE[dtype], err_msg=key)
    for got, want in zip(fused.state_dict()["state"], generic.state_dict()["state"],
                         strict=True):
        assert got.keys() == want.keys()
        for state_name in want:
            np.testing.assert_allclose(got[state_name], want[state_name], **TOLERANCE[dtype])


@pytest.mark.parametrize("name, hyper", CASES[::3], ids=IDS[::3])
def test_flat_fused_equals_generic_on_cupy(gpu, name, hyper):
    import cupy

    fused = run(cupy, name, hyper, "float32", "fused", flat=True)
    generic = run(cupy, name, hyper, "float32", "generic")
    for key, want in generic.params.items():
        np.testing.assert_allclose(cupy.asnumpy(fused.params[key]), cupy.asnumpy(want),
                                   **TOLERANCE["float32"], err_msg=key)


def test_auto_takes_the_cuda_kernel(gpu):
    import cupy

    opt = optim_core.Adam([cupy.zeros(3)])
    assert opt.implementation.name == "fused-cuda"
    assert "fused cupy kernel" in opt.implementation_reason


def test_step_allocates_nothing_on_the_device(gpu):
    import cupy

    n = 1 << 20
    params = [cupy.ones(n, dtype=cupy.float32), cupy.ones(n // 2, dtype=cupy.float32)]
    grads = [cupy.full(p.shape, 0.5, dtype=p.dtype) for p in params]
    opt = optim_core.Adam(params, lr=0.1, amsgrad=True, weight_decay=0.1, impl="fused")
    opt.step(grads)  # allocates the state and compiles
    opt.step(grads)  # makes the step plan: its device tables, once
    cupy.cuda.Device().synchronize()
    pool = cupy.get_default_memory_pool()
    used, total = pool.used_bytes(), pool.total_bytes()
    for _ in range(3):
        opt.step(grads)
    cupy.cuda.Device().synchronize()
    assert pool.used_bytes() == used
    assert pool.total_bytes() == total


def test_changing_lr_reuses_the_compiled_kernel(gpu):
    import cupy

    opt = optim_core.Adam([cupy.ones(1000, dtype=cupy.float32)], lr=0.1, impl="fused")
    grads = [cupy.ones(1000, dtype=cupy.float32)]
    opt.step(grads)
    compiled = len(opt.implementation.compiled)
    for lr in (0.05, 0.01, 1e-4):
        opt.param_groups[0]["lr"] = lr
        opt.step(grads)
    assert len(opt.implementation.compiled) == compiled


def test_flat_group_is_one_launch(gpu):
    import cupy

    params = {f"w{i}": cupy.full((i % 7 + 1, 13), 0.1 * i, dtype=cupy.float32)
              for i in range(300)}
    opt = optim_core.Lion(params, lr=1e-3, impl="fused", flat=True)
    grads = {k: cupy.ones_like(v) for k, v in opt.params.items()}
    opt.step(grads)
    before = opt.implementation.launches
    opt.step(opt.grad_views)
    assert opt.implementation.launches - before == 1


def test_small_tensors_share_launches_and_equal_generic(gpu):
    import cupy

    # 100 small tensors, every fourth one a view one float off 16-byte alignment, and one
    # tensor above MULTI_MAX_SIZE with a launch of its own.
    from optim_core.backends._cuda import MULTI_MAX_SIZE, MULTI_TENSORS

    rng = np.random.default_rng(0)
    sizes = [int(rng.integers(1, 300)) for _ in range(100)] + [MULTI_MAX_SIZE + 3]
    pool = rng.standard_normal(sum(sizes) + 4 * len(sizes)).astype(np.float32)

    def make_params():
        out, at = [], 0
        for index, n in enumerate(sizes):
            if index % 4 == 3:
                storage = cupy.asarray(pool[at:at + n + 1])
                out.append(storage[1:])  # 4 bytes past the allocation's alignment
            else:
                out.append(cupy.asarray(pool[at:at + n]))
            at += n + 1
        return out

    grads = [cupy.asarray(rng.standard_normal(n).astype(np.float32)) for n in sizes]
    fused = optim_core.Adam(make_params(), lr=0.01, amsgrad=True, impl="fused")
    generic = optim_core.Adam(make_params(), lr=0.01, amsgrad=True, impl="generic")
    for step in range(3):
        before = fused.implementation.launches
        fused.step(grads)
        generic.step(grads)
        misaligned = sum(1 for index in range(100) if index % 4 == 3)
        # The first step takes the full path: 32 small tensors a launch, by alignment.
        # Then the step plan: one table launch for every small tensor, aligned or not.
        expected = (-(-(100 - misaligned) // MULTI_TENSORS) + -(-misaligned // MULTI_TENSORS)
                    if step == 0 else 1) + 1
        assert fused.implementation.launches - before == expected
    for got, want in zip(fused.params, generic.params, strict=True):
        np.testing.assert_allclose(cupy.asnumpy(got), cupy.asnumpy(want),
                                   **TOLERANCE["float32"])


def test_planned_steps_follow_new_gradient_arrays_and_replaced_states(gpu):
    import cupy

    # New gradient arrays every step (new addresses to copy to the device, or the same
    # ones again from the memory pool), a state replaced mid-run: the step plans' table
    # launch equals the generic path throughout.
    rng = np.random.default_rng(1)
    sizes = [1, 255, 1025, 4096, (1 << 20) + 5, 33, 0]
    host = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    fused = optim_core.Adam([cupy.asarray(h) for h in host], lr=0.01, impl="fused")
    generic = optim_core.Adam([cupy.asarray(h) for h in host], lr=0.01, impl="generic")
    for step in range(6):
        grads = [cupy.asarray(rng.standard_normal(n).astype(np.float32)) for n in sizes]
        fused.step(grads)
        generic.step(grads)
        if step == 3:
            for opt in (fused, generic):
                opt.state[0][1]["exp_avg"] = opt.state[0][1]["exp_avg"].copy()
    assert fused._caches[0]["plan"].data is not None
    for got, want in zip(fused.params, generic.params, strict=True):
        np.testing.assert_allclose(cupy.asnumpy(got), cupy.asnumpy(want),
                                   **TOLERANCE["float32"])
