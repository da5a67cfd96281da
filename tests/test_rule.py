"""The rule language: what a rule may contain, and that every backend runs one definition."""

from __future__ import annotations

import ctypes
import importlib.util
import math
import shutil
import subprocess

import numpy as np
import pytest
from optim_core.backends import OPERATIONS, generic_operations
from optim_core.backends._cuda import CUDA_TYPES, cuda_source, kernel_name
from optim_core.backends._lowering import lower, unsupported_reason
from optim_core.backends._operations import HOST_OPERATIONS
from optim_db import RULES

import optim_core
from optim_core.optim import rules
from optim_core.optim.language import update_rule

# Bound per backend by UpdateRule.bind; placeholders for linters, as in rules.py.
where = minimum = maximum = sign = norm = None


def test_every_rule_is_parsed_with_its_states_and_scalars():
    assert rules.adam.states == ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    assert rules.adam.optional_states == {"max_exp_avg_sq"}
    assert "step_size" in rules.adam.scalars
    for rule in RULES.values():
        assert rule.source.startswith(f"def {rule.name}(param, grad")


def test_bind_shares_the_code_object():
    bound = rules.lion.bind(generic_operations(np))
    assert bound.__code__ is rules.lion.function.__code__


def test_binding_requires_every_operation():
    with pytest.raises(ValueError, match="missing"):
        rules.sgd.bind({"sqrt": np.sqrt})


def test_lerp_is_exact_at_both_ends():
    lerp = generic_operations(np)["lerp"]
    start, end = np.array([1e16, 3.0]), np.array([1.0, -7.0])
    np.testing.assert_array_equal(lerp(start, end, 1.0), end)
    np.testing.assert_array_equal(lerp(start, end, 0.0), start)
    assert set(OPERATIONS) == set(generic_operations(np))


def _rule_with(body: str):
    source = "def bad(param, grad, s, *, lr):\n" + body + "\n    return param, s\n"
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - a rule made on the fly to test the checker
    function = namespace["bad"]
    function.__source__ = source
    return function


@pytest.mark.parametrize("body, message", [
    ("    param = np.exp(param)", "only"),
    ("    for i in range(3):\n        param = param", "a for loop"),
    ("    if param > 0:\n        param = param", "only test scalars"),
    ("    param, s = s, param", "one plain name"),
    ("    param = param ** 2", "the power operator"),
    ("    param = where(lr > 0, param, grad)", "one comparison of arrays"),
    ("    param = where(0 < param < 1, param, grad)", "one comparison of arrays"),
    ("    param = where(param > 0, param)", "takes \\(condition, a, b\\)"),
    ("    param = where(param > 0, lr, 1.0)", "needs an array as a or b"),
    ("    param = param * (grad > 0)", "compares arrays outside"),
    ("    d = grad - s\n    s = s * (d >= 0)", "compares arrays outside"),
])
def test_the_checker_rejects_what_kernels_cannot_express(body, message, monkeypatch):
    function = _rule_with(body)
    monkeypatch.setattr("inspect.getsource", lambda f: f.__source__)
    with pytest.raises(TypeError, match=message):
        update_rule()(function)


def test_rule_must_return_param_and_states_in_order(monkeypatch):
    source = "def bad(param, grad, s, *, lr):\n    return s, param\n"
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102
    monkeypatch.setattr("inspect.getsource", lambda f: source)
    with pytest.raises(TypeError, match="return param, s"):
        update_rule()(namespace["bad"])


# ----------------------------------------------------------------- where, minimum, maximum
@update_rule()
def choices(param, grad, s, *, low, high, up, down, lr):
    # Rprop's pattern, and every comparison where's condition may use.
    d = grad * s
    f = where(d > 0, up, where(d < 0, down, where(d == 0, 1.0, d)))
    s = minimum(maximum(s * f, low), minimum(high, 2 * up))  # the second one: host math
    g = where(d < 0, 0.0, grad)
    g = where(param >= g, g, where(param <= -g, -g, g * lr))
    g = where(param != grad, g, 2.0 * g)
    param = param - sign(g) * s + where(grad < param, minimum(grad, lr), maximum(low, grad))
    return param, s


SCALARS = {"low": 1e-3, "high": 0.75, "up": 1.25, "down": 0.5, "lr": 0.1}


def choice_inputs(dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values meeting every side of every condition: signs, zeros, equal pairs, NaN, inf."""
    special = [0.0, -0.0, 1.0, -1.0, 0.5, np.nan, np.inf, -np.inf, 1e-4, 3.0]
    grid = np.array([(a, b, c) for a in special for b in special for c in special[:6]])
    param, grad, s = (np.ascontiguousarray(grid[:, k], dtype=dtype) for k in range(3))
    return param, grad, np.abs(s)


def expected_choices(param, grad, s):
    """The rule written with NumPy directly, every scalar in the arrays' dtype."""
    h = {k: param.dtype.type(v) for k, v in SCALARS.items()}
    one, zero, two = (param.dtype.type(v) for v in (1, 0, 2))
    with np.errstate(invalid="ignore"):
        d = grad * s
        f = np.where(d > 0, h["up"], np.where(d < 0, h["down"], np.where(d == 0, one, d)))
        s = np.minimum(np.maximum(s * f, h["low"]), h["high"])
        g = np.where(d < 0, zero, grad)
        g = np.where(param >= g, g, np.where(param <= -g, -g, g * h["lr"]))
        g = np.where(param != grad, g, two * g)
        extra = np.where(grad < param, np.minimum(grad, h["lr"]), np.maximum(h["low"], grad))
        return param - np.sign(g) * s + extra, s


class Choices(optim_core.Optimizer):
    """A test optimizer (no cli_name: not registered) running the rule above."""

    rule = choices

    def __init__(self, params, **options):
        super().__init__(params, {"lr": SCALARS["lr"]}, **options)

    def scalars(self, group, group_state):
        return {k: v for k, v in SCALARS.items() if k != "lr"}


def bitwise_equal(a, b) -> bool:
    """Equal bit for bit (signed zeros included), NaN equal to any NaN: which NaN an
    invalid operation makes is the compiler's choice, not the rule's."""
    unsigned = {4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    same = (a.view(unsigned) == b.view(unsigned)) | (np.isnan(a) & np.isnan(b))
    return a.shape == b.shape and bool(np.all(same))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_where_minimum_maximum_generic_meaning(dtype, xp):
    param, grad, s = choice_inputs(dtype)
    want_param, want_s = expected_choices(param, grad, s)
    p = xp.asarray(param, dtype)
    opt = Choices([p], impl="generic")
    opt.state[0][0]["s"] = xp.asarray(s, dtype)
    with np.errstate(invalid="ignore"):
        (got,) = opt.step([xp.asarray(grad, dtype)])
    np.testing.assert_array_equal(xp.to_numpy(got), want_param)
    np.testing.assert_array_equal(xp.to_numpy(opt.state[0][0]["s"]), want_s)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_where_minimum_maximum_on_0d_arrays_keep_the_dtype(dtype):
    # NumPy's functions return NumPy scalars for 0-d arrays (np.float64 is a float
    # subclass): they stay arrays of the parameter's dtype, not host floats.
    param, grad, s = (np.asarray(v[3], dtype=dtype) for v in choice_inputs(dtype))
    want_param, want_s = expected_choices(param[None], grad[None], s[None])
    opt = Choices([param], impl="generic")
    opt.state[0][0]["s"] = s
    opt.step([grad])
    assert param.dtype == dtype and opt.state[0][0]["s"].dtype == dtype
    np.testing.assert_array_equal(param[None], want_param)
    np.testing.assert_array_equal(opt.state[0][0]["s"][None], want_s)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_where_minimum_maximum_fused_numpy_is_the_generic_path_bit_for_bit(dtype):
    assert unsupported_reason(choices) is None
    results = []
    for impl in ("generic", "fused"):
        param, grad, s = choice_inputs(dtype)
        opt = Choices([param], impl=impl)
        opt.state[0][0]["s"] = s
        with np.errstate(invalid="ignore"):
            opt.step([grad])
        assert opt.implementation.name == ("generic" if impl == "generic" else "fused-numba")
        results.append((param, opt.state[0][0]["s"]))
    (gp, gs), (fp, fs) = results
    assert bitwise_equal(fp, gp) and bitwise_equal(fs, gs)


CXX = shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_where_minimum_maximum_cuda_source_is_the_generic_path_bit_for_bit(tmp_path):
    # The per-element function of the generated CUDA source, compiled for the host
    # (qualifiers defined away), on the same inputs as the generic path.
    _, hoisted, kernel = lower(choices, SCALARS, frozenset({"s"}))
    name = kernel_name(kernel)
    lines = ["#include <math.h>", "#define __host__", "#define __device__", "#define __global__",
             "struct oc_dim3 { unsigned int x, y, z; };",
             "static oc_dim3 threadIdx, blockIdx, blockDim, gridDim;", cuda_source(kernel)]
    for ctype in CUDA_TYPES.values():
        args = ", ".join(["i", *(f"({ctype}*)a[{k}]" for k in range(3)),
                          *(f"((const {ctype}*)h)[{k}]" for k in range(kernel.n_hoisted))])
        lines.append(f'extern "C" void run_{ctype}(long long n, void* const* a, const void* h) '
                     f"{{ for (long long i = 0; i < n; ++i) {name}_element<{ctype}>({args}); }}")
    (tmp_path / "k.cpp").write_text("\n".join(lines) + "\n")
    subprocess.run([CXX, "-std=c++14", "-O2", "-ffp-contract=off", "-fno-fast-math", "-fPIC",
                    "-shared", "-o", str(tmp_path / "k.so"), str(tmp_path / "k.cpp")],
                   check=True, capture_output=True, timeout=300)
    library = ctypes.CDLL(str(tmp_path / "k.so"))
    for dtype, ctype in CUDA_TYPES.items():
        param, grad, s = choice_inputs(dtype)
        want = [param.copy(), grad.copy(), {"s": s.copy()}]
        with np.errstate(invalid="ignore"):
            opt = Choices([want[0]], impl="generic")
            opt.state[0][0]["s"] = want[2]["s"]
            opt.step([want[1]])
        pointers = (ctypes.c_void_p * 3)(param.ctypes.data, grad.ctypes.data, s.ctypes.data)
        scalars = np.asarray(hoisted, dtype=dtype)
        getattr(library, f"run_{ctype}")(ctypes.c_longlong(param.size), pointers,
                                         ctypes.c_void_p(scalars.ctypes.data))
        assert bitwise_equal(param, want[0]), dtype
        assert bitwise_equal(s, opt.state[0][0]["s"]), dtype


def test_host_meanings_of_minimum_and_where_match_the_arrays():
    nan = math.nan
    pairs = [(1.0, 2.0), (2.0, 1.0), (0.0, -0.0), (nan, 1.0), (1.0, nan), (-math.inf, 3.0)]
    for a, b in pairs:
        for op in ("minimum", "maximum"):
            want = getattr(np, op)(np.float64(a), np.float64(b))
            got = HOST_OPERATIONS[op](a, b)
            assert (math.isnan(got) and math.isnan(want)) or got == want, (op, a, b)
    assert HOST_OPERATIONS["where"](True, 1.0, 2.0) == 1.0
    assert HOST_OPERATIONS["where"](False, 1.0, 2.0) == 2.0


def test_scalar_minimum_is_hoisted_and_array_comparisons_are_kernel_expressions():
    key, hoisted, kernel = lower(choices, SCALARS, frozenset({"s"}))
    kinds = set()

    def walk(expr):
        kinds.add(expr[0])
        for part in expr[1:]:
            if isinstance(part, tuple) and part and isinstance(part[0], str):
                walk(part)
            elif isinstance(part, tuple):
                for sub in part:
                    walk(sub)

    for _, expr in kernel.body:
        walk(expr)
    assert "cmp" in kinds and "call" in kinds
    # minimum(high, 2 * up) reads scalars only: computed on the host, one kernel argument.
    assert SCALARS["high"] in hoisted
    assert 2 * SCALARS["up"] not in hoisted


@update_rule
def _gated(param, grad, buffer, *, lr):
    # grad is read only in where's condition; t only in a condition inside a reduction.
    buffer = buffer * 0.5
    t = param * 2
    param = where(grad < 0, param - lr, param) - lr * sum(where(t < 0, param, param * 0))
    return param, buffer


def _with_lr(rule):
    """An optimizer of ``rule``, whose one hyperparameter is ``lr``."""
    class WithLr(optim_core.Optimizer):
        def __init__(self, params, lr=0.1, **options):
            super().__init__(params, dict(lr=lr), **options)

    WithLr.rule = rule
    return WithLr


_Gated = _with_lr(_gated)


def test_what_only_a_where_condition_reads_is_loaded_and_computed_by_the_kernels():
    # The kernels' loads and each reduction pass's body follow where's condition too (a
    # rule reading an array only there used to fail to compile: l_grad undefined).
    _, _, kernel = lower(_gated, {"lr": 0.1}, frozenset({"buffer"}))
    assert "grad" in kernel.loads
    assert any(target.startswith("t") for target, _ in kernel.reduction_pass(0).body)
    assert "const T l_grad = a_grad[i];" in cuda_source(kernel)  # the CUDA text too
    impls = ["generic", "fused"] if importlib.util.find_spec("numba") else ["generic"]
    results = []
    for impl in impls:
        param = np.linspace(-1.0, 1.0, 7)
        opt = _Gated([param], impl=impl)
        opt.step([np.linspace(1.0, -1.0, 7)])
        results.append(opt.params[0])
    for got in results[1:]:
        np.testing.assert_array_equal(got, results[0])
    assert not np.array_equal(results[0], np.linspace(-1.0, 1.0, 7))


@update_rule
def _thresholded(param, grad, buffer, *, lr):
    # A reduction read only in where's condition, inside another reduction (a second pass),
    # and a first-stage one the sum comes after in the rule (so they are renumbered).
    buffer = buffer * 0.5
    s = sum(where(grad < norm(param) * 0.1, grad, grad * 0))
    param = param - lr * s * norm(grad)
    return param, buffer


_Thresholded = _with_lr(_thresholded)


def test_a_reduction_read_in_a_where_condition_is_computed_in_an_earlier_pass():
    _, _, kernel = lower(_thresholded, {"lr": 0.1}, frozenset({"buffer"}))
    assert kernel.n_stages == 2
    impls = ["generic", "fused"] if importlib.util.find_spec("numba") else ["generic"]
    results = []
    for impl in impls:
        param = np.linspace(-1.0, 1.0, 9)
        opt = _Thresholded([param], impl=impl)
        opt.step([np.linspace(1.0, -1.0, 9) ** 3])
        results.append(opt.params[0])
    for got in results[1:]:
        np.testing.assert_allclose(got, results[0], rtol=1e-12)
    assert not np.array_equal(results[0], np.linspace(-1.0, 1.0, 9))
