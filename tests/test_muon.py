"""Muon: torch.optim.Muon's numbers for every option, on the generic and the staged fused
path; its AdamW groups; the rule language's matrix operation.

torch 2.13 always runs Newton-Schulz in bfloat16. The float64 comparisons take that one
cast out of torch's own function (its source with ``grad.bfloat16()`` replaced by
``grad.clone()``, everything else as shipped) and hold ours to 1e-9; the bfloat16
option is compared with torch as shipped, to bfloat16's rounding.
"""

from __future__ import annotations

import inspect
import shutil
import subprocess

import numpy as np
import pytest
import reference
from optim_core.backends._lowering import lower, lower_stages
from optim_db import BY_NAME
from reference import quadratic_gradient

import optim_core
from optim_core.optim import rules
from optim_core.optim.language import update_rule

INFO = BY_NAME["Muon"]
#: Tall, wide, square and empty matrices (tall ones are orthogonalized transposed).
SHAPES = {"tall": (7, 4), "wide": (3, 6), "square": (5, 5), "empty": (0, 4)}
MUON_CASES = [case for case in [*INFO.reference_cases, *INFO.fused_cases]
              if case.get("use_muon", True)]
STEPS = 15


def start(shapes=SHAPES, seed=3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape) for name, shape in shapes.items()}


def case_id(hyper: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in hyper.items())


@pytest.fixture
def torch_without_bfloat16(monkeypatch):
    """torch, its Muon iterating in the parameter's dtype: the shipped function with the
    bfloat16 cast (and nothing else) replaced."""
    torch = pytest.importorskip("torch")
    from torch.optim import _muon

    source = inspect.getsource(_muon._zeropower_via_newtonschulz)
    assert source.count("grad.bfloat16()") == 1
    namespace = dict(vars(_muon))
    exec(compile(source.replace("grad.bfloat16()", "grad.clone()"), "<torch muon>", "exec"),
         namespace)
    monkeypatch.setattr(_muon, "_zeropower_via_newtonschulz",
                        namespace["_zeropower_via_newtonschulz"])
    return torch


def torch_trajectory(torch, params, hyper, steps=STEPS, dtype="float64"):
    """torch.optim.Muon's parameters after each step, on ``quadratic_gradient``."""
    theirs = [torch.tensor(p, dtype=getattr(torch, dtype), requires_grad=True)
              for p in params.values()]
    opt = torch.optim.Muon(theirs, **hyper)
    out = []
    for step in range(steps):
        for t in theirs:
            t.grad = torch.tensor(quadratic_gradient(t.detach().double().numpy(), step),
                                  dtype=t.dtype)
        opt.step()
        out.append([t.detach().double().numpy().copy() for t in theirs])
    return out


def our_trajectory(params, hyper, steps=STEPS, impl="generic", dtype="float64"):
    ours = {k: v.astype(dtype) for k, v in params.items()}
    opt = optim_core.Muon(ours, **hyper, impl=impl)
    out = []
    for step in range(steps):
        opt.step({k: quadratic_gradient(v.astype("float64"), step).astype(dtype)
                  for k, v in ours.items()})
        out.append([v.astype("float64").copy() for v in ours.values()])
    return out, opt


@pytest.mark.parametrize("impl", ["generic", "fused"])
@pytest.mark.parametrize("hyper", MUON_CASES, ids=[case_id(h) for h in MUON_CASES])
def test_float64_trajectory_matches_torch_without_its_bfloat16_cast(torch_without_bfloat16,
                                                                     hyper, impl):
    params = start()
    theirs = torch_trajectory(torch_without_bfloat16, params, hyper)
    ours, opt = our_trajectory(params, hyper, impl=impl)
    assert opt.implementation.name == ("generic" if impl == "generic" else
                                       "staged-fused-numba")
    for step, (got, want) in enumerate(zip(ours, theirs, strict=True)):
        for name, g, w in zip(params, got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12,
                                       err_msg=f"{hyper} step {step + 1} {name}")


def test_every_adjust_lr_fn_scales_by_torchs_ratio(torch_without_bfloat16):
    # One step from zero momentum on a tall matrix: the three settings differ only by
    # the ratio, sqrt(max(1, 7/4)) for None and "original", 0.2 sqrt(7) for the other.
    params = {"tall": start()["tall"]}
    moves = {}
    for fn in (None, "original", "match_rms_adamw"):
        hyper = {"lr": 0.01, "weight_decay": 0.0, "adjust_lr_fn": fn}
        [ours], _ = our_trajectory(params, hyper, steps=1)
        [theirs] = torch_trajectory(torch_without_bfloat16, params, hyper, steps=1)
        np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-12, atol=1e-15)
        moves[fn] = np.linalg.norm(ours[0] - params["tall"])
    assert moves[None] == moves["original"]
    assert moves["match_rms_adamw"] / moves[None] == pytest.approx(
        0.2 * np.sqrt(7) / np.sqrt(7 / 4), rel=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bfloat16_option_matches_torch_as_shipped_within_bfloat16_rounding(dtype):
    torch = pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    params = start({"tall": (12, 8), "wide": (4, 10)})
    hyper = {"lr": 0.02}
    theirs = torch_trajectory(torch, params, hyper, steps=5, dtype=dtype)
    ours, _ = our_trajectory(params, {**hyper, "ns_dtype": "bfloat16"}, steps=5, dtype=dtype)
    plain, _ = our_trajectory(params, hyper, steps=5, dtype=dtype)
    for name, shape in (("tall", (12, 8)), ("wide", (4, 10))):
        index = list(params).index(name)
        ratio = np.sqrt(max(1, shape[0] / shape[1]))
        # Each step moves every element by lr * ratio * O, |O| <= about 1.2: one bfloat16
        # ulp of that (2**-8 relative) a step bounds where float32 sums could round
        # otherwise than torch's (measured: no gap in float64, 0.001 ulp in float32).
        scale = hyper["lr"] * ratio * 2.0**-8
        for step in range(5):
            gap = np.abs(ours[step][index] - theirs[step][index]).max()
            assert gap < scale * (step + 1), (name, step, gap / scale)
        # The parameter's own dtype is further from torch's bfloat16 numbers than that.
        assert np.abs(plain[4][index] - theirs[4][index]).max() > \
            np.abs(ours[4][index] - theirs[4][index]).max()


@pytest.mark.parametrize("hyper", INFO.reference_cases[:2],
                         ids=[case_id(h) for h in INFO.reference_cases[:2]])
def test_matches_the_float64_reference_on_every_library(xp, hyper):
    params = start({"tall": (6, 4), "wide": (3, 5)})
    expected = {k: v.copy() for k, v in params.items()}
    ref_states = {k: {} for k in params}
    ours = {k: xp.asarray(v) for k, v in params.items()}
    opt = optim_core.Muon(ours, **hyper, impl="generic")
    for step in range(12):
        for k in params:
            expected[k] = reference.muon(expected[k], quadratic_gradient(expected[k], step),
                                         ref_states[k], hyper)
        current = opt.step({k: xp.asarray(quadratic_gradient(xp.to_numpy(v), step))
                            for k, v in opt.params.items()})
        for k in params:
            np.testing.assert_allclose(xp.to_numpy(current[k]), expected[k], rtol=1e-9,
                                       atol=1e-12, err_msg=f"{hyper} step {step + 1} {k}")


FUSED_CASES = INFO.fused_cases


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hyper", FUSED_CASES, ids=[case_id(h) for h in FUSED_CASES])
def test_staged_fused_path_equals_the_generic_path(hyper, dtype):
    # The same BLAS products and elementwise kernels generated from the rule: the same
    # numbers as the generic path, to the last bit in practice.
    params = start({"tall": (9, 5), "wide": (4, 7), "empty": (0, 3)}) \
        if hyper.get("use_muon", True) else start({"v": (11,), "s": (), "m": (3, 4)})
    generic, _ = our_trajectory(params, hyper, steps=8, dtype=dtype)
    fused, opt = our_trajectory(params, hyper, steps=8, impl="fused", dtype=dtype)
    assert opt.implementation.name == "staged-fused-numba"
    tolerance = {"float32": dict(rtol=1e-6, atol=1e-7),
                 "float64": dict(rtol=1e-12, atol=1e-14)}[dtype]
    for step, (got, want) in enumerate(zip(fused, generic, strict=True)):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, **tolerance, err_msg=f"step {step + 1}")


def test_staged_cupy_path_equals_the_generic_numpy_path(xp):
    # On a GPU: the stages as CUDA kernels, Newton-Schulz through cuBLAS.
    if xp.name != "cupy":
        pytest.skip("the CuPy staged path needs a CUDA GPU")
    params = start({"tall": (33, 17), "wide": (8, 40)})
    for hyper in MUON_CASES[:3]:
        want, _ = our_trajectory(params, hyper, steps=5)
        ours = {k: xp.asarray(v) for k, v in params.items()}
        opt = optim_core.Muon(ours, **hyper, impl="fused")
        assert opt.implementation.name == "staged-fused-cuda"
        for step in range(5):
            opt.step({k: xp.asarray(quadratic_gradient(xp.to_numpy(v), step))
                      for k, v in ours.items()})
            for index, k in enumerate(params):
                np.testing.assert_allclose(xp.to_numpy(ours[k]), want[step][index],
                                           rtol=1e-10, atol=1e-12, err_msg=f"{hyper} {k}")


@pytest.mark.parametrize("impl", ["generic", "fused"])
def test_adamw_groups_step_exactly_as_adamw(impl):
    # Muon's documented way to train a whole model: matrices with Muon, the rest with
    # AdamW in use_muon=False groups of the same object.
    rng = np.random.default_rng(0)
    mine = {"W": rng.standard_normal((6, 4)), "b": rng.standard_normal(4),
            "gain": rng.standard_normal(()), "table": rng.standard_normal((3, 2, 2))}
    adamw = {k: v.copy() for k, v in mine.items() if k != "W"}
    opt = optim_core.Muon([
        {"params": {"W": mine["W"]}},
        {"params": {k: mine[k] for k in adamw}, "use_muon": False, "lr": 3e-3,
         "weight_decay": 0.02, "betas": (0.8, 0.95), "adamw_eps": 1e-6}], lr=0.02, impl=impl)
    other = optim_core.AdamW(adamw, lr=3e-3, weight_decay=0.02, betas=(0.8, 0.95), eps=1e-6,
                             impl=impl)
    for step in range(10):
        grads = {k: quadratic_gradient(v, step) for k, v in mine.items()}
        opt.step(grads)
        other.step({k: grads[k] for k in adamw})
        for k in adamw:
            assert np.array_equal(mine[k], adamw[k]), (step, k)
    assert set(opt.state[0][0]) == {"momentum_buffer"}
    assert set(opt.state[1][0]) == {"exp_avg", "exp_avg_sq"}


def test_adamw_groups_match_torch_adamw():
    torch = pytest.importorskip("torch")
    params = {"b": np.linspace(-1, 1, 5), "gain": np.asarray(0.5)}
    opt = optim_core.Muon([{"params": dict(params), "use_muon": False, "lr": 0.01}])
    theirs = [torch.tensor(v, requires_grad=True) for v in params.values()]
    torch_opt = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.1)  # Muon's default decay
    for step in range(15):
        for t in theirs:
            t.grad = torch.tensor(quadratic_gradient(t.detach().numpy(), step))
        torch_opt.step()
        out = opt.step({k: quadratic_gradient(v, step) for k, v in opt.params.items()})
    for got, want in zip(out.values(), theirs, strict=True):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-12, atol=1e-15)


def test_a_whole_models_dict_splits_into_muon_and_adamw_groups():
    model = optim_core.models.MLP([4, 8, 3])
    X = np.random.default_rng(1).standard_normal((64, 4))
    y = np.arange(64) % 3
    history = optim_core.fit(model, X, y, optimizer="muon", lr=0.02, epochs=4,
                             batch_size=16, seed=0, progress=False)
    opt = history.optimizer
    assert type(opt) is optim_core.Muon
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert [sorted(g["names"]) for g in opt.param_groups] == [["W0", "W1"], ["b0", "b1"]]
    assert history.train_loss[-1] < history.train_loss[0]


def test_invalid_options_and_shapes_are_refused_before_anything_changes():
    w = np.ones((3, 4))
    with pytest.raises(ValueError, match="2-D"):
        optim_core.Muon([np.ones(3)])
    with pytest.raises(ValueError, match="2-D"):
        optim_core.Muon([{"params": {"b": np.ones(3)}}])
    for bad in ({"ns_steps": 100}, {"ns_steps": -1}, {"adjust_lr_fn": "rms"},
                {"ns_coefficients": (1.0, 2.0)}, {"ns_dtype": "float16"}, {"lr": -1.0},
                {"momentum": -0.1}, {"weight_decay": -1.0}, {"flat": True}):
        with pytest.raises((ValueError, TypeError)):
            optim_core.Muon([w], **bad)
    opt = optim_core.Muon([{"params": [w]}, {"params": [np.ones(3)], "use_muon": False}])
    opt.param_groups[1]["use_muon"] = True  # a vector in a Muon group: the step refuses
    before = [p.copy() for p in opt.params]
    with pytest.raises(ValueError, match="2-D"):
        opt.step([np.ones((3, 4)), np.ones(3)])
    assert all(np.array_equal(a, b) for a, b in zip(before, opt.params, strict=True))
    assert opt.state == [[{}], [{}]] and opt.group_state[0]["step"] == 0


def test_state_dict_round_trip_resumes_bit_for_bit():
    params = start({"tall": (6, 4)})
    a = {k: v.copy() for k, v in params.items()}
    opt = optim_core.Muon(a, lr=0.02)
    for step in range(3):
        opt.step({k: quadratic_gradient(v, step) for k, v in a.items()})
    b = {k: v.copy() for k, v in a.items()}
    resumed = optim_core.Muon(b, lr=0.02)
    resumed.load_state_dict(opt.state_dict())
    for step in range(3, 6):
        opt.step({k: quadratic_gradient(v, step) for k, v in a.items()})
        resumed.step({k: quadratic_gradient(v, step) for k, v in b.items()})
    assert all(np.array_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- the language
SCALARS = dict(lr=0.1, weight_decay=0.1, momentum=0.95, nesterov=True, ns_a=3.4445,
               ns_b=-4.775, ns_c=2.0315, eps=1e-7, ns_steps=5, ns_bfloat16=False,
               adjusted_lr=0.2, use_muon=True, beta1=0.9, beta2=0.999, adamw_eps=1e-8,
               step_size=0.1, bias_correction2_sqrt=1.0)


def test_muon_is_cut_into_two_kernels_around_orthogonalize():
    _, hoisted, staged = lower_stages(rules.muon, SCALARS, {"momentum_buffer"})
    first, second = staged.stages
    # The momentum and the operand in one pass; then the decay and the step in another.
    assert first.stores == ("momentum_buffer", "t_in0")
    assert first.loads == ("grad", "momentum_buffer")
    assert second.stores == ("param",) and second.loads == ("param", "t_out0")
    [matrix] = staged.matrix
    assert (matrix.operation, matrix.source, matrix.target) == (
        "orthogonalize", "t_in0", "t_out0")
    assert [hoisted[i] for i in matrix.arguments] == [3.4445, -4.775, 2.0315, 1e-7, 5, False]
    assert staged.temporaries == ("t_in0",)
    # AdamW groups take no matrix operation: one stage, the kernel lower() gives.
    adamw = {**SCALARS, "use_muon": False}
    _, _, single = lower_stages(rules.muon, adamw, {"exp_avg", "exp_avg_sq"})
    assert not single.matrix
    assert single.stages[0].body == lower(rules.muon, adamw, {"exp_avg", "exp_avg_sq"})[2].body
    with pytest.raises(NotImplementedError, match="matrix operation"):
        lower(rules.muon, SCALARS, {"momentum_buffer"})


def test_a_local_read_after_the_matrix_operation_is_kept_in_an_array():
    @update_rule()
    def scaled(param, grad, velocity, *, a, b, c, eps, steps, low):
        velocity = velocity + grad
        keep = grad * 2
        step = orthogonalize(velocity, a, b, c, eps, steps, low)  # noqa: F821
        param = param - keep * step
        velocity = velocity * 0.5
        return param, velocity

    scalars = dict(a=3.4445, b=-4.775, c=2.0315, eps=1e-7, steps=2, low=False)
    _, _, staged = lower_stages(scaled, scalars, {"velocity"})
    first, second = staged.stages
    assert "t_keep_keep_0" in first.stores and "t_keep_keep_0" in second.loads
    # velocity's last value is the second stage's, so that stage writes it.
    assert "velocity" in second.stores and "velocity" not in first.stores
    rng = np.random.default_rng(2)
    arrays = {"param": rng.standard_normal((5, 3)), "grad": rng.standard_normal((5, 3)),
              "velocity": rng.standard_normal((5, 3))}
    from optim_core.backends import _numba_implementation, _staged_implementation
    from optim_core.backends._generic import GENERIC

    staged_impl = _staged_implementation(_numba_implementation()[0])
    results = []
    for impl in (GENERIC, staged_impl):
        copy = {k: v.copy() for k, v in arrays.items()}
        import array_api_compat.numpy as xp

        impl.prepare(scaled, xp, [copy["param"]], [copy["grad"]],
                     [{"velocity": copy["velocity"]}], scalars).run()
        results.append(copy)
    for k in ("param", "velocity"):
        np.testing.assert_allclose(results[1][k], results[0][k], rtol=1e-13, atol=1e-15)


def test_matrix_operations_are_whole_assignments_of_one_array_and_scalars():
    with pytest.raises(TypeError, match="whole value of an assignment"):
        @update_rule()
        def inside(param, grad, *, a):
            param = param - orthogonalize(grad, a, a, a, a, a, a)  # noqa: F821
            return (param,)
    with pytest.raises(TypeError, match="must be scalars"):
        @update_rule()
        def array_argument(param, grad, *, a):
            param = orthogonalize(grad, grad, a, a, a, a, a)  # noqa: F821
            return (param,)
    with pytest.raises(TypeError, match="nested"):
        @update_rule()
        def nested(param, grad, *, a):
            param = orthogonalize(orthogonalize(grad, a), a)  # noqa: F821
            return (param,)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_muons_stage_kernels_compile_for_the_device(tmp_path):
    from optim_core.backends._cuda import COMPILE_OPTIONS, CUDA_TYPES, cuda_source, kernel_name

    parts, lines = [], []
    for scalars, present in ((SCALARS, {"momentum_buffer"}),
                             ({**SCALARS, "nesterov": False, "weight_decay": 0.0},
                              {"momentum_buffer"})):
        _, _, staged = lower_stages(rules.muon, scalars, present)
        for kernel in staged.stages:
            source, name = cuda_source(kernel), kernel_name(kernel)
            if source in parts:
                continue
            parts.append(source)
            for ctype in CUDA_TYPES.values():
                signature = source.split(f"__global__ void {name}(", 1)[1].split(")", 1)[0]
                signature = signature.replace("T*", f"{ctype}*").replace("T h", f"{ctype} h")
                lines.append(f"template __global__ void {name}_vec<{ctype}>({signature});")
    path = tmp_path / "muon.cu"
    path.write_text("\n".join(parts + lines) + "\n")
    result = subprocess.run(["nvcc", *COMPILE_OPTIONS, "-arch=sm_90", "-c", "-o",
                             str(tmp_path / "muon.o"), str(path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_muons_cuda_stages_compute_what_the_generic_path_does_on_the_host(tmp_path):
    # The stage kernels' CUDA text, compiled by nvcc into a host program (as
    # test_cuda_source.py does for the elementwise rules), with NumPy's orthogonalize
    # between the two stages: the generic path's numbers.
    import array_api_compat.numpy as xp
    from optim_core.backends._cuda import CUDA_TYPES, kernel_name
    from optim_core.backends._generic import GENERIC
    from optim_core.backends._operations import orthogonalize
    from test_cuda_source import harness_source

    cases = [(scalars, dtype) for scalars in (
        SCALARS, {**SCALARS, "nesterov": False, "weight_decay": 0.0, "momentum": 0.3})
        for dtype in CUDA_TYPES]
    staged_of = [lower_stages(rules.muon, s, {"momentum_buffer"}) for s, _ in cases]
    kernels = {}
    for (_, dtype), (_, _, staged) in zip(cases, staged_of, strict=True):
        for kernel in staged.stages:
            kernels.setdefault((kernel_name(kernel), dtype), (len(kernels), kernel))
    (tmp_path / "harness.cu").write_text(harness_source(kernels))
    subprocess.run(["nvcc", "--fmad=false", "-O2", "-std=c++14", "-o",
                    str(tmp_path / "harness"), str(tmp_path / "harness.cu")],
                   check=True, capture_output=True, timeout=600)

    def run_stage(kernel, dtype, arrays, hoisted):
        index = kernels[kernel_name(kernel), dtype][0]
        n = arrays[0].size
        head = np.array([index, n, len(arrays), len(hoisted), np.dtype(dtype).itemsize],
                        dtype=np.int64)
        (tmp_path / "in.bin").write_bytes(
            head.tobytes() + b"".join(np.ascontiguousarray(a, dtype).tobytes() for a in arrays)
            + np.asarray(hoisted, dtype=np.float64).astype(dtype).tobytes())
        subprocess.run([str(tmp_path / "harness"), str(tmp_path / "in.bin"),
                        str(tmp_path / "out.bin")], check=True, timeout=60)
        out = np.frombuffer((tmp_path / "out.bin").read_bytes(), dtype=dtype)
        return dict(zip(kernel.arrays, out.reshape(len(arrays), n), strict=True))

    rng = np.random.default_rng(5)
    for (scalars, dtype), (_, hoisted, staged) in zip(cases, staged_of, strict=True):
        start = {k: rng.standard_normal((7, 4)).astype(dtype)
                 for k in ("param", "grad", "momentum_buffer")}
        want = {k: v.copy() for k, v in start.items()}
        GENERIC.prepare(rules.muon, xp, [want["param"]], [want["grad"]],
                        [{"momentum_buffer": want["momentum_buffer"]}], scalars).run()
        first, second = staged.stages
        arrays = {**{k: v.reshape(-1) for k, v in start.items()},
                  "t_in0": np.zeros(28, dtype)}
        arrays.update(run_stage(first, dtype, [arrays[a] for a in first.arrays], hoisted))
        [matrix] = staged.matrix
        arrays["t_out0"] = orthogonalize(xp, arrays["t_in0"].reshape(7, 4),
                                         *(hoisted[i] for i in matrix.arguments)).reshape(-1)
        arrays.update(run_stage(second, dtype, [arrays[a] for a in second.arrays], hoisted))
        tolerance = {"float32": dict(rtol=1e-5, atol=1e-6),
                     "float64": dict(rtol=1e-12, atol=1e-14)}[dtype]
        for name in ("param", "momentum_buffer"):
            np.testing.assert_allclose(arrays[name], want[name].reshape(-1), **tolerance,
                                       err_msg=f"{scalars} {dtype} {name}")


def test_optim_core_torch_muon_with_an_adamw_group_equals_torch_muon_and_adamw(
        torch_without_bfloat16):
    # The torch entry point: a model's weights with Muon, its biases in a use_muon=False
    # group, against torch's two optimizers (Muon without its cast, AdamW).
    torch = torch_without_bfloat16
    oct = pytest.importorskip("optim_core.torch")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        def model():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
                                       torch.nn.Linear(5, 2))

        ours_model, torch_model = model(), model()
        ours = oct.Muon([{"params": [p for p in ours_model.parameters() if p.ndim == 2]},
                         {"params": [p for p in ours_model.parameters() if p.ndim != 2],
                          "use_muon": False, "lr": 3e-3, "weight_decay": 0.01}], lr=0.02)
        theirs = [torch.optim.Muon([p for p in torch_model.parameters() if p.ndim == 2],
                                   lr=0.02),
                  torch.optim.AdamW([p for p in torch_model.parameters() if p.ndim != 2],
                                    lr=3e-3, weight_decay=0.01)]
        for step in range(8):
            generator = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 3, generator=generator), torch.randn(8, 2, generator=generator)
            for net, opts in ((ours_model, [ours]), (torch_model, theirs)):
                for opt in opts:
                    opt.zero_grad()
                torch.nn.functional.mse_loss(net(x), y).backward()
                for opt in opts:
                    opt.step()
        for a, b in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
            np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-10,
                                       atol=1e-12)
    finally:
        torch.set_default_dtype(previous)
