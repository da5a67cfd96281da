"""Writing your own optimizer: the README's AdaBelief, run from the README itself.

The README's "Writing your own optimizer" code block is extracted, written to a file and
imported, so the documented example and the tested one cannot drift apart. A user class
defined that way (public names only, no ``cli_name``, no kernel code) gets the generic
path, the fused numba kernel and the generated CUDA kernel, state dicts and ``fit``;
a rule outside the language is refused when it is decorated.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fused_cases import TOLERANCE, GenericStepRecorder, gradient, start_params

import optim_core
from optim_core import Hyperparameter, Optimizer, RuleError, fit, models, update_rule
from optim_core.optim.registry import OPTIMIZERS

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- custom-optimizer -->"
HYPER = dict(lr=0.02, betas=(0.8, 0.95), eps=1e-8)
STEPS = 12


def readme_block() -> str:
    """The Python code block right after the README's marker."""
    after = README.read_text().split(MARKER, 1)[1].lstrip()
    assert after.startswith("```python\n"), "the marker must precede the example's code block"
    return after[len("```python\n"):].split("\n```", 1)[0] + "\n"


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    """The README's example as a module (rules are read from their source file)."""
    path = tmp_path_factory.mktemp("readme") / "readme_adabelief.py"
    path.write_text(readme_block())
    spec = importlib.util.spec_from_file_location("readme_adabelief", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def groups(params: dict[str, np.ndarray]) -> list[dict]:
    """Two param groups, one with weight decay: both sides of the rule's ``if``."""
    return [{"params": [params["matrix"]], "weight_decay": 0.1},
            {"params": [params["vector"], params["scalar"]]}]


def run(cls, dtype: str, steps: int = STEPS, **options) -> list[np.ndarray]:
    opt = cls(groups(start_params(dtype)), **HYPER, **options)
    for step in range(steps):
        # opt.params: with flat=True the parameters live in the optimizer's buffer.
        opt.step([gradient(p, step) for p in opt.params])
    return [np.asarray(p) for p in opt.params], opt


def adabelief_by_hand(dtype: str, steps: int = STEPS) -> list[np.ndarray]:
    """AdaBelief as the paper's Algorithm 2 writes it, one NumPy array at a time."""
    params = start_params(dtype)
    lr, (beta1, beta2), eps = HYPER["lr"], HYPER["betas"], HYPER["eps"]
    decay = {"matrix": 0.1, "vector": 0.0, "scalar": 0.0}
    out = []
    for name in ("matrix", "vector", "scalar"):
        p = params[name].astype(np.float64)
        m, s = np.zeros_like(p), np.zeros_like(p)
        for t in range(1, steps + 1):
            g = gradient(p.astype(dtype), t - 1).astype(np.float64)
            p = p * (1 - lr * decay[name])
            m = beta1 * m + (1 - beta1) * g
            s = beta2 * s + (1 - beta2) * (g - m) ** 2 + eps
            m_hat, s_hat = m / (1 - beta1 ** t), s / (1 - beta2 ** t)
            p = p - lr * m_hat / (np.sqrt(s_hat) + eps)
        out.append(p)
    return out


# ---------------------------------------------------------------------------- the class
def test_the_readme_example_uses_public_names_only_and_registers_nothing(readme):
    tree = ast.parse(readme_block())
    imported = {alias.name if isinstance(node, ast.Import) else node.module
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert imported == {"optim_core", "optim_core.optim.language"}
    assert not any(part.startswith("_") for name in imported for part in name.split("."))
    assert issubclass(readme.AdaBelief, Optimizer)
    assert readme.AdaBelief.cli_name is None
    assert readme.AdaBelief not in OPTIMIZERS.values()
    assert readme.adabelief.states == ("exp_avg", "exp_avg_var")


def test_generic_path_follows_a_hand_written_numpy_loop(readme):
    got, opt = run(readme.AdaBelief, "float64", impl="generic")
    assert opt.implementation.name == "generic"
    for value, want in zip(got, adabelief_by_hand("float64"), strict=True):
        np.testing.assert_allclose(value, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_numba_kernel_equals_the_generic_path(readme, dtype):
    pytest.importorskip("numba")
    generic, _ = run(readme.AdaBelief, dtype, impl="generic")
    fused, opt = run(readme.AdaBelief, dtype, impl="fused")
    assert opt.implementation_reason == "fused numpy kernel for adabelief"
    flat, _ = run(readme.AdaBelief, dtype, impl="fused", flat=True)
    for a, b, c in zip(fused, generic, flat, strict=True):
        assert a.dtype == np.dtype(dtype)
        np.testing.assert_allclose(a, b, **TOLERANCE[dtype])
        np.testing.assert_allclose(c, b, **TOLERANCE[dtype])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_generated_cuda_source_compiles_and_computes_the_generic_steps(readme, tmp_path):
    # The text NVRTC compiles on a GPU, compiled by nvcc: the __global__ kernels
    # instantiated for sm_90, and a host program that runs the per-element function on
    # the inputs of every recorded generic step, compared with the generic outputs.
    from optim_core.backends._cuda import COMPILE_OPTIONS, CUDA_TYPES, cuda_source, kernel_name
    from optim_core.backends._lowering import lower
    from test_cuda_source import harness_source

    records, kernels = [], {}
    for dtype in CUDA_TYPES:
        params = start_params(dtype)
        opt = readme.AdaBelief(groups(params), **HYPER, impl="generic")
        opt.implementation = recorder = GenericStepRecorder()
        for step in range(4):
            opt.step([gradient(p, step) for p in (params["matrix"], params["vector"],
                                                  params["scalar"])])
        for call in recorder.calls:
            _, hoisted, kernel = lower(call["rule"], call["scalars"],
                                       frozenset(call["states"][0]))
            key = (kernel_name(kernel), dtype)
            kernels.setdefault(key, (len(kernels), kernel))
            for i, param in enumerate(call["params"]):
                records.append((kernels[key][0], kernel, hoisted, param, call["grads"][i],
                                call["states"][i], call["new_params"][i],
                                call["new_states"][i]))
    assert len(kernels) == 4  # weight decay or not, float or double
    source = harness_source(kernels)
    for (name, dtype), (_, kernel) in kernels.items():
        ctype = CUDA_TYPES[dtype]
        signature = cuda_source(kernel).split(f"__global__ void {name}(", 1)[1]
        signature = signature.split(")", 1)[0].replace("T*", f"{ctype}*").replace(
            "T h", f"{ctype} h")
        for variant in (name, f"{name}_vec"):
            source += f"template __global__ void {variant}<{ctype}>({signature});\n"
    (tmp_path / "adabelief.cu").write_text(source)
    result = subprocess.run(["nvcc", *COMPILE_OPTIONS, "-O2", "-arch=sm_90", "-o",
                             str(tmp_path / "harness"), str(tmp_path / "adabelief.cu")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    inputs = bytearray()
    for index, kernel, hoisted, param, grad, states, _, _ in records:
        arrays = [param, grad, *(states[s] for s in kernel.arrays[2:])]
        inputs += np.array([index, param.size, len(arrays), len(hoisted), param.itemsize],
                           dtype=np.int64).tobytes()
        for array in arrays:
            inputs += np.ascontiguousarray(array, dtype=param.dtype).tobytes()
        inputs += np.asarray(hoisted, dtype=np.float64).astype(param.dtype).tobytes()
    (tmp_path / "in.bin").write_bytes(bytes(inputs))
    subprocess.run([str(tmp_path / "harness"), str(tmp_path / "in.bin"),
                    str(tmp_path / "out.bin")], check=True, timeout=120)
    output, offset = memoryview((tmp_path / "out.bin").read_bytes()), 0
    for _, kernel, _, param, _, _, new_param, new_states in records:
        size = param.size * param.itemsize
        got = {}
        for name in kernel.arrays:
            got[name] = np.frombuffer(output[offset:offset + size], dtype=param.dtype)
            offset += size
        for name, want in {"param": new_param, **new_states}.items():
            np.testing.assert_allclose(got[name], want.reshape(-1),
                                       **TOLERANCE[param.dtype.name], err_msg=name)
    assert offset == len(output)


def test_state_dict_round_trip_resumes_exactly(readme, tmp_path):
    params = start_params("float64")
    opt = readme.AdaBelief(groups(params), **HYPER, impl="generic")
    grads = lambda step: [gradient(params[n], step)  # noqa: E731
                          for n in ("matrix", "vector", "scalar")]
    for step in range(3):
        opt.step(grads(step))
    path = tmp_path / "adabelief.ckpt"
    optim_core.save_checkpoint(path, {"optimizer": opt.state_dict(),
                                      "params": {k: v.copy() for k, v in params.items()}})
    saved = optim_core.load_checkpoint(path)
    assert saved["optimizer"]["optimizer"] == "AdaBelief"
    copies = {k: v.copy() for k, v in saved["params"].items()}
    other = readme.AdaBelief(groups(copies), lr=0.5, impl="generic")
    other.load_state_dict(saved["optimizer"])
    assert other.param_groups[0]["lr"] == HYPER["lr"]
    for step in range(3, 6):
        opt.step(grads(step))
        other.step([gradient(copies[n], step) for n in ("matrix", "vector", "scalar")])
    for name in params:
        np.testing.assert_array_equal(copies[name], params[name])
    np.testing.assert_array_equal(other.state[0][0]["exp_avg_var"],
                                  opt.state[0][0]["exp_avg_var"])
    assert other.group_state == opt.group_state == [{"step": 6}, {"step": 6}]


def test_fit_takes_the_class_itself_and_hands_weight_decay_over(readme):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.3
    history = fit(models.LinearRegression(3), X, y, optimizer=readme.AdaBelief, lr=0.05,
                  weight_decay=1e-3, epochs=4, batch_size=10, seed=0, progress=False)
    assert type(history.optimizer) is readme.AdaBelief
    assert history.optimizer.param_groups[0]["weight_decay"] == 1e-3  # decoupled: handed over
    assert history.train_loss[-1] < history.train_loss[0]


def test_the_torch_and_jax_adapters_take_it_too(readme):
    want, _ = run(readme.AdaBelief, "float64", steps=3, impl="generic")
    start = start_params("float64")
    torch = pytest.importorskip("torch")
    from optim_core.torch import torch_optimizer

    tensors = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in start.values()]
    opt = torch_optimizer(readme.AdaBelief)([{"params": tensors[:1], "weight_decay": 0.1},
                                            {"params": tensors[1:]}], **HYPER)
    for step in range(3):
        for t in tensors:
            t.grad = torch.from_numpy(gradient(t.detach().numpy(), step))
        opt.step()
    for t, w in zip(tensors, want, strict=True):
        np.testing.assert_allclose(t.detach().numpy(), w, rtol=1e-12, atol=1e-15)

    jax = pytest.importorskip("jax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        pure = optim_core.functional(readme.AdaBelief, **HYPER, weight_decay=0.0)
        params = {"vector": jax.numpy.asarray(start["vector"])}
        state, update = pure.init(params), jax.jit(pure.update)
        for step in range(3):
            grads = {"vector": jax.numpy.asarray(gradient(np.asarray(params["vector"]), step))}
            params, state = update(grads, state, params)
        np.testing.assert_allclose(np.asarray(params["vector"]), want[1], rtol=1e-12,
                                   atol=1e-15)
    finally:
        jax.config.update("jax_enable_x64", before)


# ---------------------------------------------------------------------------- refusals
# Functions outside the language, each with what the error names. They are plain
# functions here: update_rule refuses them in the test.
def _calls_numpy(param, grad, *, lr):
    param = param - lr * np.exp(grad)
    return (param,)


def _power(param, grad, *, lr):
    param = param - lr * grad ** 2
    return (param,)


def _augmented(param, grad, *, lr):
    param -= lr * grad
    return (param,)


def _loop(param, grad, *, lr):
    for _ in range(2):
        param = param - lr * grad
    return (param,)


def _if_on_an_array(param, grad, *, lr):
    if grad > 0:
        param = param - lr
    return (param,)


def _undefined(param, grad, *, lr):
    param = param - lrr * grad  # noqa: F821 - the misspelling is the point
    return (param,)


def _wrong_return(param, grad, velocity, *, lr):
    velocity = velocity + grad
    param = param - lr * velocity
    return (velocity, param)


def _array_comparison(param, grad, *, lr):
    param = param - lr * (grad > 0)
    return (param,)


REFUSED = [
    (_calls_numpy, "np.exp() cannot be called in a rule"),
    (_power, "the power operator **"),
    (_augmented, "augmented assignment"),
    (_loop, "a for loop"),
    (_if_on_an_array, "an if may only test scalars, not ['grad']"),
    (_undefined, "'lrr' is neither an argument nor assigned"),
    (_wrong_return, "must end with 'return param, velocity'"),
    (_array_comparison, "compares arrays outside where's condition"),
]


@pytest.mark.parametrize(("function", "message"), REFUSED,
                         ids=[f.__name__.strip("_") for f, _ in REFUSED])
def test_a_rule_outside_the_language_is_refused_when_it_is_decorated(function, message):
    with pytest.raises(RuleError) as error:
        update_rule(function)
    text = str(error.value)
    assert isinstance(error.value, TypeError)
    assert message in text
    assert text.startswith(f"rule {function.__name__}")
    if "line" in text:  # the place is the user's file and line
        assert Path(__file__).name in text


def test_class_attributes_are_checked_when_the_class_is_defined(readme):
    with pytest.raises(TypeError, match="rule must be an UpdateRule"):
        type("Bad", (Optimizer,), {"rule": lambda param, grad: (param,)})
    with pytest.raises(TypeError, match=r"initial_state names \['velocity'\]"):
        type("Bad", (Optimizer,), {"rule": readme.adabelief,
                                   "initial_state": {"velocity": "lr"}})
    with pytest.raises(TypeError, match="weight_decay_kind must be one of"):
        type("Bad", (Optimizer,), {"rule": readme.adabelief, "weight_decay_kind": "yes"})
    with pytest.raises(TypeError, match="has no update rule"):
        Optimizer([np.zeros(2)], {"lr": 0.1})


@update_rule
def _scaled_sign(param, grad, *, lr, gamma):
    param = param - lr * gamma * sign(grad)  # noqa: F821 - bound when the rule runs
    return (param,)


def test_own_hyperparameters_need_a_check_and_a_cli_name_is_optional():
    class Unchecked(Optimizer):
        rule = _scaled_sign

        def __init__(self, params, lr=0.1, gamma=1.0, **options):
            super().__init__(params, dict(lr=lr, gamma=gamma), **options)

    with pytest.raises(TypeError, match=r"\['gamma'\] that no check covers"):
        Unchecked([np.zeros(2)])

    def positive(name, value):
        if not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
        return float(value)

    class ScaledSign(Unchecked):
        hyperparameter_checks = {"gamma": Hyperparameter(positive)}
        cli_name = "test-scaled-sign"

    try:
        assert OPTIMIZERS["test-scaled-sign"] is ScaledSign
        with pytest.raises(ValueError, match="gamma must be > 0"):
            ScaledSign([np.zeros(2)], gamma=-1)
        param = np.zeros(3)
        ScaledSign([param], lr=0.5, gamma=2.0, impl="generic").step([np.array([1.0, -3.0, 0.0])])
        np.testing.assert_array_equal(param, [-1.0, 1.0, 0.0])
    finally:
        del OPTIMIZERS["test-scaled-sign"]  # the registry is the table of shipped optimizers
