"""A step that cannot run safely raises and changes nothing (issue 11, items 1, 5, 6 and 9).

* Memory safety: a parameter replaced in ``param_groups`` or resized in place after its
  state exists, a state replaced or resized, on every path (per tensor, CUDA's shared
  launches, flat buffers), is refused before any kernel runs.
* A failure in any group (a kernel that cannot be prepared, a bad gradient, a masked or
  sparse gradient) leaves every group, counter and scalar as it was; a fuzz test runs
  random sequences of valid and invalid calls and checks it bit for bit, and that the
  run then continues exactly as one that never saw the invalid calls.
* Parameters that share memory are refused.
* Several threads may call ``step`` and ``state_dict`` on one optimizer.
"""

from __future__ import annotations

import copy
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optim_db import NAMES, RICH

import optim_core

IMPLS = ["generic", "fused"]


def snapshot(opt) -> dict:
    """Bit-exact copies of everything a step or a load could change."""
    return {
        "params": [[(p.dtype.str, p.shape, p.tobytes()) for p in g["params"]]
                   for g in opt.param_groups],
        "hyper": [{k: v for k, v in g.items() if k not in ("params", "names")}
                  for g in opt.param_groups],
        "state": [[{k: (v.dtype.str, v.shape, v.tobytes()) for k, v in st.items()}
                   for st in states] for states in opt.state],
        "group_state": copy.deepcopy(opt.group_state),
        "skipped": opt.skipped_steps,
    }


def adam_after_a_step(impl: str, n: int = 10):
    param = np.linspace(-1.0, 1.0, n).copy()  # owns its data: resizable
    opt = optim_core.Adam([param], lr=0.1, impl=impl)
    opt.step([np.full(n, 0.5)])
    return param, opt


# --------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("impl", IMPLS)
def test_a_parameter_resized_in_place_after_its_state_is_refused(impl):
    param, opt = adam_after_a_step(impl)
    param.resize(4000, refcheck=False)  # reallocates: the states are still 10 long
    resized = param.copy()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="'0'.*resized or replaced"):
        opt.step([np.ones(4000)])
    assert snapshot(opt) == before and param.tobytes() == resized.tobytes()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("how", ["item", "list"])
def test_a_parameter_replaced_in_param_groups_after_its_state_is_refused(impl, how):
    _, opt = adam_after_a_step(impl)
    bigger = np.zeros(4000)
    if how == "item":
        opt.param_groups[0]["params"][0] = bigger
    else:
        opt.param_groups[0]["params"] = [bigger]
    state = snapshot(opt)["state"]
    with pytest.raises(ValueError, match="'0'.*resized or replaced"):
        opt.step([np.ones(4000)])
    assert snapshot(opt)["state"] == state and not bigger.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_replacement_of_the_same_shape_is_checked_and_stepped(impl):
    _, opt = adam_after_a_step(impl)
    other = np.linspace(1.0, 2.0, 10).copy()
    opt.param_groups[0]["params"] = [other]
    opt.step([np.full(10, 0.5)])
    assert not np.array_equal(other, np.linspace(1.0, 2.0, 10))
    opt.param_groups[0]["params"] = [np.ones(10, np.float32)]  # states are float64
    with pytest.raises(ValueError, match="dtype"):
        opt.step([np.ones(10, np.float32)])
    opt.param_groups[0]["params"] = [np.ones(10, np.int64)]
    with pytest.raises(TypeError, match="floating"):
        opt.step([np.ones(10)])


@pytest.mark.parametrize("impl", IMPLS)
def test_a_state_replaced_or_resized_is_refused(impl):
    param, opt = adam_after_a_step(impl)
    values = param.copy()
    opt.state[0][0]["exp_avg"] = np.zeros(3)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.step([np.ones(10)])
    assert snapshot(opt) == before and param.tobytes() == values.tobytes()
    opt.state[0][0]["exp_avg"] = np.zeros(10)
    opt.state[0][0]["exp_avg_sq"].resize(3, refcheck=False)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt.step([np.ones(10)])
    assert snapshot(opt) == before and param.tobytes() == values.tobytes()


def test_a_flat_buffer_that_disagrees_is_refused():
    opt = optim_core.Adam({"a": np.ones(6), "b": np.ones(4)}, lr=0.1, flat=True)
    opt.step(opt.grad_views)
    segment = opt._flat.segments[0][0]
    segment.states["exp_avg"] = np.zeros(3)  # what a bug in the flat layout would leave
    before = snapshot(opt)
    with pytest.raises(ValueError, match="flat buffer .*exp_avg"):
        opt.step({"a": np.ones(6), "b": np.ones(4)})
    assert snapshot(opt) == before


class DeviceArray:
    """What the CUDA path reads of a CuPy array, over host memory (no GPU needed)."""

    def __init__(self, n: int) -> None:
        self.host = np.zeros(n, np.float32)
        self.shape, self.size, self.dtype, self.flags = (n,), n, self.host.dtype, self.host.flags
        self.data = SimpleNamespace(ptr=self.host.ctypes.data)


def test_cuda_shared_launches_check_every_tensor_before_any_launch():
    from optim_core.backends._cuda import CudaImplementation, _Kernels, batch_length
    from optim_core.backends._lowering import lower

    from optim_core.optim import rules

    implementation = CudaImplementation()
    scalars = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                   maximize=False, first_step=False, cautious=False)
    key, _, kernel = lower(rules.sgd, scalars, frozenset())
    launched = []
    kernels = _Kernels(*(lambda *args, i=i: launched.append(i) for i in range(4)),
                       np.dtype([("v", np.int64, (batch_length(kernel),))]))
    implementation.compiled["sgd", key, "float32"] = kernels
    params = [DeviceArray(8) for _ in range(3)]
    grads = [DeviceArray(8), DeviceArray(8), DeviceArray(5)]  # the last one is short
    with pytest.raises(ValueError, match="tensor 2.*5 elements"):
        implementation.step(rules.sgd, None, params, grads, [{}, {}, {}], scalars)
    assert launched == []
    key, _, kernel = lower(rules.sgd, {**scalars, "momentum": 0.9}, frozenset({"momentum_buffer"}))
    implementation.compiled["sgd", key, "float32"] = kernels
    states = [{"momentum_buffer": DeviceArray(8)}, {"momentum_buffer": DeviceArray(2)},
              {"momentum_buffer": DeviceArray(8)}]
    with pytest.raises(ValueError, match="tensor 1.*momentum_buffer"):
        implementation.step(rules.sgd, None, params, [DeviceArray(8)] * 3, states,
                            {**scalars, "momentum": 0.9})
    assert launched == []


# --------------------------------------------------------------------------- item 5
def three_groups(name: str, impl: str, **options):
    """An optimizer with a float64 group, a float32 one with a 0-d parameter, and a
    float32 one: the last is where the failures below are put."""
    rng = np.random.default_rng(0)
    groups = [{"params": [rng.standard_normal((3, 2)), rng.standard_normal(4)]},
              {"params": [np.asarray(0.5, np.float32)]},
              {"params": [rng.standard_normal(5).astype(np.float32),
                          rng.standard_normal((2, 2)).astype(np.float32)]}]
    return getattr(optim_core, name)(groups, impl=impl, **{**RICH[name], **options})


def grads_for(opt, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in opt.params]


@pytest.mark.parametrize("name", ["Adam", "NAdam", "DGD"])
def test_a_kernel_that_cannot_be_prepared_in_a_later_group_changes_no_group(name,
                                                                              monkeypatch):
    from optim_core.backends._numba import NumbaImplementation

    opt = three_groups(name, "fused")
    opt.step(grads_for(opt, 0))
    before = snapshot(opt)
    original = NumbaImplementation.kernel_for

    def kernel_for(self, rule, scalars, present, dtype):
        # The float64 group 0 gets its kernel; the float32 groups after it cannot.
        if dtype == np.float32:
            raise OSError("simulated kernel cache failure")
        return original(self, rule, scalars, present, dtype)

    monkeypatch.setattr(NumbaImplementation, "kernel_for", kernel_for)
    with pytest.raises(OSError, match="simulated"):
        opt.step(grads_for(opt, 1))
    assert snapshot(opt) == before


@pytest.mark.parametrize("impl", IMPLS)
def test_a_masked_gradient_is_refused_before_any_group_is_written(impl):
    opt = three_groups("NAdam", impl)
    opt.step(grads_for(opt, 0))
    grads = grads_for(opt, 1)
    grads[-1] = np.ma.masked_array(grads[-1], mask=[[True, False], [False, False]])
    before = snapshot(opt)
    with pytest.raises(TypeError, match="masked"):
        opt.step(grads)
    assert snapshot(opt) == before


def test_torch_leaf_tensors_that_require_grad_are_stepped_like_plain_tensors():
    torch = pytest.importorskip("torch")
    plain = [torch.linspace(-1, 1, 6, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    leaves = [p.clone().requires_grad_(True) for p in plain]
    opt_plain = optim_core.NAdam([{"params": [plain[0]]}, {"params": [plain[1]]}], lr=0.1)
    opt_leaves = optim_core.NAdam([{"params": [leaves[0]]}, {"params": [leaves[1]]}], lr=0.1)
    for step in range(3):
        grads = [torch.full(p.shape, 0.5 + step, dtype=torch.float64) for p in plain]
        opt_plain.step(grads)
        opt_leaves.step(grads)
    for a, b in zip(plain, leaves, strict=True):
        assert b.requires_grad and b.is_leaf and torch.equal(a, b.detach())
    assert opt_leaves.group_state == opt_plain.group_state


def test_a_sparse_torch_gradient_is_refused_before_any_group_is_written():
    torch = pytest.importorskip("torch")
    params = [torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]
    opt = optim_core.Adam([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1)
    opt.step([torch.ones(4, dtype=torch.float64)] * 2)
    before = [p.clone() for p in params], copy.deepcopy(opt.group_state)
    sparse = torch.ones(4, dtype=torch.float64).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step([torch.ones(4, dtype=torch.float64), sparse])
    assert all(torch.equal(a, b) for a, b in zip(params, before[0], strict=True))
    assert opt.group_state == before[1]


class FailInGroup:
    """An implementation that fails while preparing (or, for an implementation without
    a prepare phase, stepping) the ``fail_at``-th group of a step."""

    def __init__(self, inner, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls, self.name = inner, fail_at, 0, inner.name

    def prepare(self, *args, **options):
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError("simulated failure")
        return self.inner.prepare(*args, **options)

    def step(self, *args):
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError("simulated failure")
        return self.inner.step(*args)


def _invalid_call(op: str, opt, seed: int) -> None:
    """Make one call that must raise (setting up what it needs, and undoing the setup)."""
    grads = grads_for(opt, seed)
    last = opt.param_groups[2]
    if op == "bad_shape_grad":
        grads[-1] = np.ones((3, 3), np.float32)
        opt.step(grads)
    elif op == "int_grad":
        grads[-1] = np.ones((2, 2), np.int64)
        opt.step(grads)
    elif op == "nan_grad":
        grads[-1] = np.full((2, 2), np.nan, np.float32)
        opt.step(grads)
    elif op == "bad_hyperparameter":
        last["lr"] = -1.0
    elif op == "replace_param":
        # A view into the group's first parameter, of another shape than the second's:
        # it overlaps, and disagrees with any state the second has.
        original = last["params"][1]
        last["params"][1] = last["params"][0][1:5]
        try:
            grads[-1] = np.ones(4, np.float32)
            opt.step(grads)
        finally:
            last["params"][1] = original
    elif op == "replace_state":
        state = opt.state[2][0]
        if not state:
            raise ValueError("no state yet (nothing to replace)")
        name = next(iter(state))
        original = state[name]
        state[name] = np.zeros(2, np.float32)
        try:
            opt.step(grads)
        finally:
            state[name] = original
    elif op == "failing_group":
        implementation = opt.implementation
        opt.implementation = FailInGroup(implementation, fail_at=3)
        try:
            opt.step(grads)
        finally:
            opt.implementation = implementation
    elif op == "bad_group_state":
        state_dict = opt.state_dict()
        extra = [k for k in state_dict["group_state"][2] if k != "step"]
        state_dict["group_state"][2][extra[0] if extra else "step"] = "x"
        opt.load_state_dict(state_dict)
    elif op == "partial_state":
        state_dict = opt.state_dict()
        if not state_dict["state"][-1]:
            raise ValueError("no state yet (nothing to leave out)")
        state_dict["state"][-1].popitem()
        opt.load_state_dict(state_dict)
    else:
        raise AssertionError(op)


INVALID = ["bad_shape_grad", "int_grad", "nan_grad", "bad_hyperparameter", "replace_param",
           "replace_state", "failing_group", "bad_group_state", "partial_state"]


@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), impl=st.sampled_from(IMPLS),
       calls=st.lists(st.sampled_from(["step", "step", "set_lr", *INVALID]), min_size=1,
                      max_size=10))
def test_random_calls_that_raise_change_nothing_and_the_run_continues_as_without_them(
        name, impl, calls):
    opt = three_groups(name, impl, nonfinite="raise")
    twin = three_groups(name, impl, nonfinite="raise")  # sees only the calls that succeed
    for seed, call in enumerate(calls):
        if call == "step":
            grads = grads_for(opt, seed)
            opt.step(grads)
            twin.step(grads)
        elif call == "set_lr":
            for o in (opt, twin):
                o.param_groups[seed % 3]["lr"] = 0.01 * (seed + 1)
        else:
            before = snapshot(opt)
            with pytest.raises((ValueError, TypeError, OSError)):
                _invalid_call(call, opt, seed)
            assert snapshot(opt) == before, call
    grads = grads_for(opt, len(calls))
    opt.step(grads)
    twin.step(grads)
    assert snapshot(opt) == snapshot(twin)


# --------------------------------------------------------------------------- item 6
def test_overlapping_views_are_refused():
    buf = np.zeros(8)
    with pytest.raises(ValueError, match="overlap"):
        optim_core.SGD([buf[0:4], buf[2:6]])
    with pytest.raises(ValueError, match="overlap"):
        optim_core.SGD([{"params": [buf[2:6]]}, {"params": [buf[0:4]]}])
    with pytest.raises(ValueError, match="overlap"):
        optim_core.SGD({"a": buf.reshape(2, 4)[:, 1], "b": buf[4:6]})
    grid = np.zeros((4, 4))
    with pytest.raises(ValueError, match="overlap"):
        optim_core.SGD([grid[:2], grid[:, :1]])


def test_views_that_interleave_without_sharing_an_element_are_stepped_once_each():
    buf = np.zeros(8)
    opt = optim_core.SGD([buf[0::2], buf[1::2], buf[4:4]], lr=1.0)
    opt.step([np.ones(4), np.full(4, 2.0), np.ones(0)])
    assert buf.tolist() == [-1.0, -2.0] * 4


def test_a_replacement_overlapping_another_parameter_is_refused():
    buf = np.zeros(8)
    a, b = buf[0:4], np.zeros(4)
    opt = optim_core.SGD([a, b], lr=1.0)
    opt.param_groups[0]["params"][1] = buf[3:7]
    with pytest.raises(ValueError, match="overlap"):
        opt.step([np.ones(4), np.ones(4)])
    assert not buf.any() and opt.group_state[0]["step"] == 0


def test_the_same_torch_storage_twice_is_refused():
    torch = pytest.importorskip("torch")
    t = torch.zeros(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="overlap"):
        optim_core.SGD([t[0:4], t[2:6]])
    with pytest.raises(ValueError, match="overlap"):
        optim_core.SGD([t, t.view(2, 4)])
    optim_core.SGD([t[0:4], t[4:8]])  # adjacent, not overlapping
    optim_core.SGD([t[0::2], t[1::2]])  # interleaved, not overlapping


# --------------------------------------------------------------------------- item 9
@pytest.mark.parametrize("impl", IMPLS)
def test_two_threads_stepping_one_optimizer_lose_no_update(impl):
    n, steps = (1 << 20) + 1, 12
    grad = np.full(n, 0.25, np.float32)
    param = np.zeros(n, np.float32)
    opt = optim_core.Adam([param], lr=0.01, impl=impl)
    reference = np.zeros(n, np.float32)
    ref = optim_core.Adam([reference], lr=0.01, impl=impl)
    for _ in range(2 * steps):
        ref.step([grad])
    start = threading.Barrier(2)
    errors = []

    def worker():
        try:
            start.wait()
            for _ in range(steps):
                opt.step([grad])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert opt.group_state[0]["step"] == 2 * steps
    # Every step saw the same gradient: in whatever order, the same 2 * steps updates.
    assert param.tobytes() == reference.tobytes()


def test_state_dict_taken_while_another_thread_steps_is_a_consistent_snapshot():
    n, steps = 1 << 18, 16
    grad = np.linspace(-1, 1, n).astype(np.float32)
    reference = optim_core.Adam([np.zeros(n, np.float32)], lr=0.01)
    expected = {0: reference.state_dict()["state"][0]}
    for k in range(1, steps + 1):
        reference.step([grad])
        expected[k] = reference.state_dict()["state"][0]
    opt = optim_core.Adam([np.zeros(n, np.float32)], lr=0.01)
    done = threading.Event()

    def stepper():
        for _ in range(steps):
            opt.step([grad])
        done.set()

    def check(state_dict) -> None:
        k = state_dict["group_state"][0]["step"]
        got = state_dict["state"][0]
        assert got.keys() == expected[k].keys()
        for name in got:
            assert got[name].tobytes() == expected[k][name].tobytes(), (k, name)

    thread = threading.Thread(target=stepper)
    thread.start()
    taken = 0
    try:
        while not done.is_set():
            check(opt.state_dict())
            taken += 1
    finally:
        thread.join()
    check(opt.state_dict())
    assert taken


def test_a_copy_of_an_optimizer_has_its_own_lock_and_steps():
    p = np.ones(3)
    opt = optim_core.SGD([p], lr=0.5)
    other = copy.copy(opt)
    assert other._lock is not opt._lock
    other.step([np.ones(3)])
    opt.step([np.ones(3)])
    assert p.tolist() == [0.0, 0.0, 0.0]
