"""Review of the torch step plans' fast path (218d4cf, 12a1545, 184300c, 441fd01, 02a76ee).

Each test fails on main as it is (022604e). Those marked "fast path" pass once the plans
are bypassed (``opt._plans.clear()`` before each step); those marked "full path" show a
hole of the same kind (a layout change the record misses) in the full path, against
torch.optim.
"""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
oct = pytest.importorskip("optim_core.torch")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                reason="numba not installed")


def _grad(k: int, shape) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return torch.cos(torch.arange(n, dtype=torch.float64) * (k + 1.5)).reshape(shape)


@pytest.mark.parametrize("bypass", [False, True], ids=["planned", "bypassed"])
def test_fast_path_a_state_given_another_shape_of_its_memory_is_seen(bypass):
    # exp_avg.data = exp_avg.data.view(4) on a (2, 2) parameter: the same address, still
    # contiguous, another shape. The full path refuses it (TensorMismatch: the state's
    # shape is not its parameter's) and so does torch.optim (lerp_ cannot broadcast (4,)
    # with (2, 2)); the plan checks the parameters' shapes but not the states', and
    # steps it as the planned (2, 2) state.
    p = torch.arange(4.0, dtype=torch.float64).reshape(2, 2).requires_grad_()
    opt = oct.Adam([p], lr=0.1)
    for k in range(3):
        p.grad = _grad(k, (2, 2))
        if bypass:
            opt._plans.clear()
        opt.step()
    assert bypass or 0 in opt._plans
    state = opt.state[p]
    state["exp_avg"].data = state["exp_avg"].data.view(4)
    before = p.detach().clone()
    counts = state["step"].clone()
    p.grad = _grad(3, (2, 2))
    if bypass:
        opt._plans.clear()
    with pytest.raises(ValueError):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert torch.equal(state["step"], counts)


def test_full_path_a_gradient_transposed_in_place_is_stepped_as_laid_out():
    # p.grad.t_() on a square parameter: the same gradient object at the same address,
    # laid out otherwise (as p.data = p.data.t() for a parameter, which 02a76ee handles).
    # The plan sees it (it checks contiguity every step) and leaves the step to the full
    # path; there _Slot.grad_of keeps the NumPy view of the gradient while it is the same
    # object at the same address, so the gradient is read in its old layout.
    p = torch.arange(9.0, dtype=torch.float64).reshape(3, 3).requires_grad_()
    q = p.detach().clone().requires_grad_()
    ours, theirs = oct.SGD([p], lr=0.1, momentum=0.9), torch.optim.SGD([q], lr=0.1, momentum=0.9)
    ours._plan_group = lambda index: None  # the full path every step
    for k in range(4):
        grad = _grad(k, (3, 3))
        if p.grad is None:
            p.grad, q.grad = grad.clone(), grad.clone()
        else:  # as backward accumulating into kept gradients (zero_grad(set_to_none=False))
            with torch.no_grad():
                p.grad.copy_(grad)
                q.grad.copy_(grad)
        if k == 2:
            p.grad.t_()
            q.grad.t_()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_full_path_a_state_given_a_smaller_slice_of_its_memory_is_seen():
    # exp_avg.data = exp_avg.data[:2] on a (4,) parameter: the same address and strides,
    # another shape. torch.optim raises (the sizes do not match); the full path's record
    # compares a state's address and strides (_address) but not its shape, keeps its old
    # view of 4 elements and steps them (2 of them memory the state no longer has).
    p = torch.arange(4.0, dtype=torch.float64).requires_grad_()
    opt = oct.Adam([p], lr=0.1)
    opt._plan_group = lambda index: None  # the full path every step
    for k in range(2):
        p.grad = _grad(k, (4,))
        opt.step()
    state = opt.state[p]
    state["exp_avg"].data = state["exp_avg"].data[:2]
    before = p.detach().clone()
    p.grad = _grad(2, (4,))
    with pytest.raises(ValueError):
        opt.step()
    assert torch.equal(p.detach(), before)
