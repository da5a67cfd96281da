"""The fused NumPy path (numba) computes what the generic path computes, for every option."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
from fused_cases import CASES, IDS, TOLERANCE, gradient, start_params
from optim_db import RULES

import optim_core
from optim_core.optim import rules

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                reason="numba not installed")

STEPS = 12


def run(name: str, hyper: dict, dtype: str, impl: str, steps: int = STEPS):
    params = start_params(dtype)
    opt = getattr(optim_core, name)(params, **hyper, impl=impl)
    for step in range(steps):
        opt.step({k: gradient(v, step) for k, v in params.items()})
    return opt


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, hyper", CASES, ids=IDS)
def test_fused_equals_generic(name, hyper, dtype):
    fused = run(name, hyper, dtype, "fused")
    generic = run(name, hyper, dtype, "generic")
    assert fused.implementation.name == "fused-numba"
    for key, value in generic.params.items():
        got = fused.params[key]
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got, value, **TOLERANCE[dtype], err_msg=key)
    for got_state, want_state in zip(fused.state_dict()["state"], generic.state_dict()["state"],
                                     strict=True):
        assert got_state.keys() == want_state.keys()
        for state_name, want in want_state.items():
            np.testing.assert_allclose(got_state[state_name], want, **TOLERANCE[dtype],
                                       err_msg=state_name)


def test_auto_takes_numba_and_says_why():
    opt = optim_core.Adam([np.zeros(3)])
    assert opt.implementation.name == "fused-numba"
    assert "fused numpy kernel" in opt.implementation_reason


def test_generic_when_asked():
    opt = optim_core.Adam([np.zeros(3)], impl="generic")
    assert opt.implementation.name == "generic"


def test_fused_where_none_exists_is_an_error_not_a_fallback():
    xp = pytest.importorskip("array_api_strict")
    with pytest.raises(ValueError, match="impl='fused'"):
        optim_core.Adam([xp.zeros(3)], impl="fused")
    assert optim_core.Adam([xp.zeros(3)]).implementation.name == "generic"


def test_non_contiguous_tensors_are_updated_correctly():
    base = np.random.default_rng(0).standard_normal((8, 6))
    fused_param, generic_param = base.T.copy(order="F").T[:, ::2], base.copy()[:, ::2]
    assert not fused_param.flags.c_contiguous
    grad = np.asfortranarray(np.linspace(-1, 1, fused_param.size).reshape(fused_param.shape))
    fused = optim_core.Adam([fused_param], lr=0.1, impl="fused")
    generic = optim_core.Adam([generic_param], lr=0.1, impl="generic")
    for _ in range(3):
        fused.step([grad])
        generic.step([grad])
    np.testing.assert_array_equal(fused_param, generic_param)
    assert not np.array_equal(fused_param, base[:, ::2])


def test_changing_lr_does_not_recompile():
    opt = optim_core.Adam([np.ones(100, dtype=np.float32)], lr=0.1, impl="fused")
    opt.step([np.ones(100, dtype=np.float32)])
    compiled = len(opt.implementation.compiled)
    for lr in (0.05, 0.01, 0.2, 1e-4):
        opt.param_groups[0]["lr"] = lr
        opt.step([np.ones(100, dtype=np.float32)])
    assert len(opt.implementation.compiled) == compiled


def test_only_structural_flags_change_the_specialization():
    from optim_core.backends._lowering import lower

    base = dict(lr=0.1, momentum=0.9, dampening=0.25, weight_decay=0.0, nesterov=False,
                maximize=False, first_step=True, cautious=False)
    present = {"momentum_buffer"}
    first, _, _ = lower(rules.sgd, base, present, build=False)
    later, _, _ = lower(rules.sgd, {**base, "first_step": False}, present, build=False)
    other_lr, hoisted, _ = lower(rules.sgd, {**base, "first_step": False, "lr": 0.003}, present,
                                 build=False)
    assert first != later  # the first momentum step copies the gradient
    assert other_lr == later and 0.003 in hoisted  # lr is an argument, not code


def test_fused_step_allocates_no_full_size_temporary():
    n = 1_000_000
    params = [np.ones(n, dtype=np.float32)]
    grads = [np.full(n, 0.5, dtype=np.float32)]
    opt = optim_core.Adam(params, lr=0.1, amsgrad=True, weight_decay=0.1, impl="fused")
    opt.step(grads)  # allocates the state and compiles; not what is measured
    tracemalloc.start()
    try:
        opt.step(grads)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < params[0].nbytes / 20
    generic = optim_core.Adam([np.ones(n, dtype=np.float32)], lr=0.1, impl="generic")
    generic.step(grads)
    tracemalloc.start()
    try:
        generic.step(grads)
        _, generic_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert generic_peak > params[0].nbytes  # the measurement does see temporaries


def test_every_rule_lowers_to_a_numba_kernel():
    from optim_core.backends._lowering import unsupported_reason

    for rule in RULES.values():
        assert unsupported_reason(rule) is None, rule.name


def test_a_later_process_loads_compiled_kernels_from_disk(tmp_path):
    script = textwrap.dedent("""
        import numpy as np, optim_core
        opt = optim_core.Lion([np.ones(64, dtype=np.float32)], lr=0.1, weight_decay=0.5)
        opt.step([np.linspace(-1, 1, 64, dtype=np.float32)])
        (kernels,) = opt.implementation.compiled.values()
        kernel = kernels.serial  # 64 elements: the loop on the calling thread
        print(sum(kernel.stats.cache_hits.values()), sum(kernel.stats.cache_misses.values()))
    """)
    env = {"OPTIM_CORE_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, check=True).stdout.split()
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, check=True).stdout.split()
    assert first == ["0", "1"]  # compiled, then written to the cache
    assert second == ["1", "0"]  # loaded: no compilation in the later process
    assert list((tmp_path / "numba_kernels").glob("optim_core_kernel_lion_float32_*.py"))
    assert list((tmp_path / "numba_kernels" / "__pycache__").glob("*.nbi"))


def test_host_programs_equal_a_full_walk():
    from optim_core.backends._lowering import host_programs, lower

    present = {"exp_avg", "exp_avg_sq"}
    for step in range(1, 30):
        scalars = dict(lr=1e-3 * step, beta1=0.9 if step < 15 else 0.2, beta2=0.99, eps=1e-8,
                       weight_decay=0.1 * (step % 3), decoupled_weight_decay=step % 2 == 0,
                       maximize=False, bias_correction1=1 - 0.9**step,
                       bias_correction2_sqrt=(1 - 0.99**step) ** 0.5, rectify=step > 5,
                       rect=1.0 + step / 100)
        replayed = lower(rules.radam, scalars, present, build=False)
        walked = lower(rules.radam, scalars, present)
        assert replayed[:2] == walked[:2]
        assert walked[2].key == walked[0]
    programs = host_programs(rules.radam, present)
    # One straight-line program per specialization met: no loop, no eval, no walk.
    assert len({p.key for p in programs}) == len(programs) >= 2
    assert all("def host(" in p.source and "eval" not in p.source for p in programs)


def test_numba_is_imported_only_when_a_numpy_optimizer_takes_the_fused_path():
    script = textwrap.dedent("""
        import sys, numpy as np, optim_core
        assert "numba" not in sys.modules
        optim_core.Adam([np.ones(3)], impl="generic").step([np.ones(3)])
        assert "numba" not in sys.modules
        optim_core.Adam([np.ones(3)])
        assert "numba" in sys.modules and "cupy" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)


def test_float16_tensors_take_the_generic_path_inside_a_fused_step():
    params = [np.linspace(-1, 1, 50).astype(np.float16), np.linspace(-1, 1, 50)]
    grads = [np.linspace(1, -1, 50).astype(np.float16), np.linspace(1, -1, 50)]
    fused = optim_core.Adam([p.copy() for p in params], lr=0.1, impl="fused")
    generic = optim_core.Adam([p.copy() for p in params], lr=0.1, impl="generic")
    for _ in range(3):
        fused.step(grads)
        generic.step(grads)
    for got, want in zip(fused.params, generic.params, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
