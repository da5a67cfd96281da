"""Schedule-Free SGD and AdamW match the schedulefree package, train()/eval() included.

``schedulefree`` 1.4.1 (torch, float64) is the oracle: 120 steps of every option, with
the parameters moved to the average x (``eval()``) and back to y (``train()``) every 25
steps and compared in both places. Our optimizers start in train mode, theirs in eval
mode: theirs get the ``train()`` call ours do not need (see optim_core.optim.schedule_free).
"""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest

import optim_core

STEPS = 120
SWITCH_EVERY = 25
SHAPES = {"matrix": (4, 3), "vector": (6,), "scalar": (), "empty": (0,)}

SGD_CASES = [
    {},
    {"lr": 0.5, "momentum": 0.5},
    {"momentum": 0.3, "weight_decay": 0.05, "warmup_steps": 10},  # lerp weights above 0.5
    {"momentum": 0.95, "r": 1.0, "weight_lr_power": 0.0},
    {"lr": 0.3, "warmup_steps": 20, "r": 0.5, "weight_lr_power": 3.0},
]
ADAMW_CASES = [
    {},
    {"lr": 0.01, "betas": (0.8, 0.99)},
    {"eps": 1e-4, "weight_decay": 0.1, "betas": (0.3, 0.999)},
    {"warmup_steps": 10, "r": 1.0, "weight_lr_power": 0.0},
    {"lr": 0.02, "warmup_steps": 25, "r": 0.5, "weight_lr_power": 3.0, "betas": (0.95, 0.9)},
]
CASES = [("ScheduleFreeSGD", "SGDScheduleFree", h) for h in SGD_CASES] + [
    ("ScheduleFreeAdamW", "AdamWScheduleFree", h) for h in ADAMW_CASES]
IDS = [f"{name}-{','.join(f'{k}={v}' for k, v in h.items()) or 'defaults'}"
       for name, _, h in CASES]


def start_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}


def gradient(param: np.ndarray, step: int) -> np.ndarray:
    """A quadratic's gradient plus a perturbation: stable for SGD's default lr of 1."""
    n = param.size
    scales = np.linspace(0.05, 0.5, n).reshape(param.shape) if n else param
    return scales * (param - 1.0) + 0.1 * np.cos(step + np.arange(n)).reshape(param.shape)


def assert_same(ours, theirs, what):
    for name, t in zip(SHAPES, theirs, strict=True):
        np.testing.assert_allclose(ours[name], t.detach().numpy(), rtol=1e-9, atol=1e-13,
                                   err_msg=f"{what}, param {name}")


@pytest.fixture
def torch():
    torch = pytest.importorskip("torch")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch
    torch.set_default_dtype(previous)


# Every case on the fused path; the generic path on the richest case of each (it is checked
# against the paper's form for every option on every library in test_reference.py).
RUNS = [(*case, "fused") for case in CASES] + [
    (*CASES[i], "generic") for i in (2, len(SGD_CASES) + 4)]
RUN_IDS = [f"{i}-fused" for i in IDS] + [f"{IDS[i]}-generic" for i in (2, len(SGD_CASES) + 4)]


@pytest.mark.parametrize("name, their_name, hyper, impl", RUNS, ids=RUN_IDS)
def test_trajectory_and_switches_match_schedulefree(torch, name, their_name, hyper, impl):
    schedulefree = pytest.importorskip("schedulefree")
    start = start_params()
    ours = {k: v.copy() for k, v in start.items()}
    opt = getattr(optim_core, name)(ours, **hyper, impl=impl)
    assert opt.implementation.name.startswith(impl)
    theirs = [torch.tensor(v, requires_grad=True) for v in start.values()]
    # foreach=True runs torch's _foreach kernels: the same operations, as one call per op.
    their_opt = getattr(schedulefree, their_name)(theirs, **hyper, foreach=bool(hyper))
    their_opt.train()
    for step in range(STEPS):
        opt.step({k: gradient(v, step) for k, v in ours.items()})
        for t in theirs:
            t.grad = torch.tensor(gradient(t.detach().numpy(), step))
        their_opt.step()
        assert_same(ours, theirs, f"step {step + 1}")
        if (step + 1) % SWITCH_EVERY == 0:
            opt.eval()
            their_opt.eval()
            assert not opt.train_mode
            assert_same(ours, theirs, f"eval() after step {step + 1}")
            opt.train()
            their_opt.train()
            assert opt.train_mode
            assert_same(ours, theirs, f"train() after step {step + 1}")
    group, their_group = opt.group_state[0], their_opt.param_groups[0]
    assert group["step"] == their_group["k"] == STEPS
    assert group["lr_max"] == their_group["lr_max"]
    assert group["weight_sum"] == pytest.approx(their_group["weight_sum"], rel=1e-14)
    assert opt.scheduled_lr(opt.param_groups[0], STEPS - 1) == their_group["scheduled_lr"]


def test_param_groups_keep_their_own_schedules(torch):
    schedulefree = pytest.importorskip("schedulefree")
    start = start_params()
    ours = [v.copy() for v in start.values()]
    opt = optim_core.ScheduleFreeAdamW([{"params": ours[:2], "lr": 0.01, "warmup_steps": 7},
                                        {"params": ours[2:], "betas": (0.5, 0.9)}])
    theirs = [torch.tensor(v, requires_grad=True) for v in start.values()]
    their_opt = schedulefree.AdamWScheduleFree(
        [{"params": theirs[:2], "lr": 0.01, "warmup_steps": 7},
         {"params": theirs[2:], "betas": (0.5, 0.9)}], foreach=False)
    their_opt.train()
    for step in range(30):
        opt.step([gradient(v, step) for v in ours])
        for t in theirs:
            t.grad = torch.tensor(gradient(t.detach().numpy(), step))
        their_opt.step()
    opt.eval()
    their_opt.eval()
    assert_same(dict(zip(SHAPES, ours)), theirs, "eval() of two groups")


@pytest.mark.parametrize("name", ["ScheduleFreeSGD", "ScheduleFreeAdamW"])
def test_step_in_eval_mode_refuses_and_changes_nothing(name):
    params = start_params()
    opt = getattr(optim_core, name)(params, lr=0.1)
    opt.step({k: gradient(v, 0) for k, v in params.items()})
    opt.eval()
    before = {k: v.copy() for k, v in params.items()}
    state_before = opt.state_dict()
    with pytest.raises(RuntimeError, match=r"eval mode.*\.train\(\)"):
        opt.step({k: gradient(v, 1) for k, v in params.items()})
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    after = opt.state_dict()
    assert after["group_state"] == state_before["group_state"] and not after["train_mode"]
    opt.train()
    opt.step({k: gradient(v, 1) for k, v in params.items()})
    assert opt.group_state[0]["step"] == 2


@pytest.mark.parametrize("name", ["ScheduleFreeSGD", "ScheduleFreeAdamW"])
def test_switching_before_any_step_or_twice_moves_nothing(name):
    params = start_params()
    before = {k: v.copy() for k, v in params.items()}
    opt = getattr(optim_core, name)(params)
    assert opt.train_mode  # theirs start in eval mode: see the module docstring
    opt.eval()
    opt.eval()
    assert not opt.train_mode
    opt.train()
    opt.train()
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    opt.step({k: gradient(v, 0) for k, v in params.items()})
    opt.eval()
    at_x = {k: v.copy() for k, v in params.items()}
    opt.eval()  # already at x
    for k in params:
        np.testing.assert_array_equal(params[k], at_x[k])


@pytest.mark.parametrize("impl", ["generic", "fused"])
@pytest.mark.parametrize("name", ["ScheduleFreeSGD", "ScheduleFreeAdamW"])
def test_state_dict_round_trip_keeps_the_mode(name, impl):
    hyper = {"lr": 0.05, "warmup_steps": 3, "weight_decay": 0.01}
    params = start_params()
    opt = getattr(optim_core, name)(params, **hyper, impl=impl)
    for step in range(7):
        opt.step({k: gradient(v, step) for k, v in params.items()})
    opt.eval()  # as schedulefree advises: save in eval mode, the parameters at x
    saved = opt.state_dict()
    assert saved["train_mode"] is False
    copies = {k: v.copy() for k, v in params.items()}
    other = getattr(optim_core, name)(copies, **hyper, impl=impl)
    other.load_state_dict(saved)
    assert not other.train_mode
    assert other.state_dict()["group_state"] == saved["group_state"]
    for opt_ in (opt, other):
        opt_.train()
    for step in range(7, 12):
        opt.step({k: gradient(v, step) for k, v in params.items()})
        other.step({k: gradient(v, step) for k, v in copies.items()})
    for k in params:
        np.testing.assert_array_equal(copies[k], params[k])


def test_a_bad_mode_in_a_state_dict_changes_nothing():
    params = start_params()
    opt = optim_core.ScheduleFreeSGD(params, lr=0.1)
    opt.step({k: gradient(v, 0) for k, v in params.items()})
    saved = opt.state_dict()
    fresh = optim_core.ScheduleFreeSGD({k: v.copy() for k, v in params.items()}, lr=0.1)
    with pytest.raises(ValueError, match="train_mode"):
        fresh.load_state_dict({k: v for k, v in saved.items() if k != "train_mode"})
    with pytest.raises(TypeError, match="train_mode"):
        fresh.load_state_dict({**saved, "train_mode": 1})
    with pytest.raises(ValueError):
        fresh.load_state_dict({**saved, "group_state": [{"step": 1}]})  # lacks lr_max...
    assert fresh.group_state[0]["step"] == 0 and fresh.state[0][0] == {} and fresh.train_mode


@pytest.mark.parametrize("name", ["ScheduleFreeSGD", "ScheduleFreeAdamW"])
def test_flat_buffers_and_every_library_agree_with_numpy(xp, name):
    start = start_params()
    hyper = {"lr": 0.05, "warmup_steps": 2, "weight_decay": 0.01}
    expected = {k: v.copy() for k, v in start.items()}
    opt = getattr(optim_core, name)(expected, **hyper, impl="generic")
    params = {k: xp.asarray(v) for k, v in start.items()}
    ours = getattr(optim_core, name)(params, **hyper, flat=xp.name != "array_api_strict")
    for step in range(6):
        opt.step({k: gradient(v, step) for k, v in expected.items()})
        current = {k: xp.to_numpy(v) for k, v in ours.params.items()}
        ours.step({k: xp.asarray(gradient(v, step)) for k, v in current.items()})
    for switch in ("eval", "train", "eval"):
        getattr(opt, switch)()
        getattr(ours, switch)()
        for k in start:
            np.testing.assert_allclose(xp.to_numpy(ours.params[k]), expected[k], rtol=1e-12,
                                       atol=1e-15, err_msg=f"{switch}() {k}")


@pytest.mark.parametrize("bad, error", [
    ({"momentum": 0.0}, ValueError), ({"momentum": 1.0}, ValueError),
    ({"warmup_steps": -1}, ValueError), ({"warmup_steps": 2.5}, TypeError),
    ({"weight_lr_power": -1.0}, ValueError), ({"r": float("nan")}, ValueError),
])
def test_bad_hyperparameters_are_refused(bad, error):
    with pytest.raises(error, match=next(iter(bad))):
        optim_core.ScheduleFreeSGD([np.ones(2)], **bad)


def test_adamw_needs_a_positive_beta1():
    # x = (y - (1 - beta1) z) / beta1: eval() divides by beta1.
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        optim_core.ScheduleFreeAdamW([np.ones(2)], betas=(0.0, 0.999))
    opt = optim_core.ScheduleFreeAdamW([np.ones(2)])
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        opt.param_groups[0]["betas"] = (0.0, 0.9)


def test_switch_kernel_of_numba_matches_generic():
    from optim_core.backends._generic import GENERIC
    from optim_core.backends._numba import NumbaImplementation

    from optim_core.optim.rules_schedule_free import schedule_free_switch

    rng = np.random.default_rng(0)
    # train() and eval() weights (1 - beta, 1 - 1/beta), on both sides of lerp's formula.
    for weight, dtype in itertools.product((0.1, 0.7, -1 / 9, -2.5), ("float32", "float64")):
        param, z = (rng.standard_normal(257).astype(dtype) for _ in range(2))
        expected = param.copy()
        GENERIC.step(schedule_free_switch, np, [expected], [expected], [{"z": z}],
                     {"weight": weight})
        NumbaImplementation().step(schedule_free_switch, np, [param], [param], [{"z": z}],
                                   {"weight": weight})
        np.testing.assert_array_equal(param, expected)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_switch_kernel_cuda_source_matches_generic_on_the_host(tmp_path):
    # The CUDA text of the switch (eval() and train() on a GPU), compiled by nvcc for the
    # host with the harness of test_cuda_source.py, against the generic path.
    import subprocess

    from optim_core.backends._cuda import kernel_name
    from optim_core.backends._generic import GENERIC
    from optim_core.backends._lowering import lower
    from test_cuda_source import harness_source

    from optim_core.optim.rules_schedule_free import schedule_free_switch

    rng = np.random.default_rng(1)
    kernels, inputs, expected = {}, bytearray(), []
    for weight in (0.1, 0.7, -1 / 9, -2.5):
        for dtype in (np.dtype("float32"), np.dtype("float64")):
            _, hoisted, kernel = lower(schedule_free_switch, {"weight": weight},
                                       frozenset({"z"}))
            key = (kernel_name(kernel), dtype.name)
            kernels.setdefault(key, (len(kernels), kernel))
            param, z = (rng.standard_normal(33).astype(dtype) for _ in range(2))
            arrays = {"param": param, "grad": param.copy(), "z": z}
            inputs += np.array([kernels[key][0], 33, len(kernel.arrays), len(hoisted),
                                dtype.itemsize], dtype=np.int64).tobytes()
            for name in kernel.arrays:
                inputs += arrays[name].tobytes()
            inputs += np.asarray(hoisted, dtype=np.float64).astype(dtype).tobytes()
            want = param.copy()
            GENERIC.step(schedule_free_switch, np, [want], [want], [{"z": z.copy()}],
                         {"weight": weight})
            expected.append((kernel.arrays, dtype, {"param": want, "z": z}))
    (tmp_path / "harness.cu").write_text(harness_source(kernels))
    subprocess.run(["nvcc", "--fmad=false", "-O2", "-std=c++14", "-o", str(tmp_path / "h"),
                    str(tmp_path / "harness.cu")], check=True, capture_output=True, timeout=600)
    (tmp_path / "in.bin").write_bytes(bytes(inputs))
    subprocess.run([str(tmp_path / "h"), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                   check=True, timeout=120)
    output, offset = (tmp_path / "out.bin").read_bytes(), 0
    for names, dtype, want in expected:
        for name in names:
            got = np.frombuffer(output[offset:offset + 33 * dtype.itemsize], dtype=dtype)
            offset += 33 * dtype.itemsize
            if name in want:
                np.testing.assert_array_equal(got, want[name], err_msg=name)
    assert offset == len(output)
