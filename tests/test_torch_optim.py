"""optim_core.torch: every optimizer as a torch.optim.Optimizer, equal to torch.optim's.

A small ``nn.Module`` trained with ``optim_core.torch.<Name>`` (the fused kernels on
NumPy views of the tensors) and a torch LR scheduler follows the same run with
``torch.optim.<Name>`` to 1e-10 in float64, for every optimizer of tests/optim_db.py
that torch has; state dicts go both ways; None gradients, closures, GradScaler,
pickles, hooks and param groups behave as torch's.
"""

from __future__ import annotations

import copy
import inspect
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from optim_db import BY_NAME, OPTIM_DB, case_id

import optim_core
from optim_core.optim.registry import OPTIMIZERS

torch = pytest.importorskip("torch")
oct = pytest.importorskip("optim_core.torch")
lr_scheduler = torch.optim.lr_scheduler

STEPS = 8
TOL = {"rtol": 1e-10, "atol": 1e-12}
#: (our name, torch's name, options, impl) for every optimizer torch has: its fused cases
#: on the fused kernels (the specializations tests/test_fused_numpy.py compiles too, so
#: no kernel is compiled for this file alone), its other reference cases on the generic
#: path over the same NumPy views.
#: The model below has biases: an optimizer of matrices only (Muon) is tested with
#: optim_core.torch in its own file (tests/test_muon.py).
ANY_SHAPE = [info for info in OPTIM_DB if info.shared]
#: (cautious=True, Liang et al. 2024, is no torch.optim option: the reference checks it.)
TORCH_CASES = [(info.name, info.torch_name, hyper, "auto") for info in ANY_SHAPE
               if info.torch_name is not None for hyper in info.fused_cases
               if not hyper.get("cautious")] + [
    (info.name, info.torch_name, hyper, "generic") for info in ANY_SHAPE
    if info.torch_name is not None for hyper in info.reference_cases
    if hyper not in info.fused_cases and not hyper.get("cautious")]
#: Our options that torch.optim lacks (cautious: Liang et al. 2024), left out where groups
#: and defaults are compared with torch's.
EXTENSIONS = {"cautious"}
#: Optimizers torch has under the same name (their state dicts are exchanged).
SAME_NAMED = [info.name for info in ANY_SHAPE if info.torch_name == info.name]


@pytest.fixture(autouse=True)
def float64_torch():
    # torch keeps step counters and NAdam's mu_product in the default dtype: float64
    # makes its host scalars exact like ours.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return (torch.randn(8, 3, generator=generator), torch.randn(8, 2, generator=generator))


def backward(model: torch.nn.Module, step: int) -> torch.Tensor:
    x, y = data(step)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss


def train(model, opt, steps: int, scheduler=None, start: int = 0) -> None:
    for step in range(start, start + steps):
        opt.zero_grad()
        backward(model, step)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_params(ours, theirs, what: str = "") -> None:
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), **TOL,
                                   err_msg=f"{what} {name}")


def both(name: str, torch_name: str, hyper: dict, impl: str = "auto"):
    """Two copies of the model, ours and torch's optimizer over each (with our default
    lr where ``hyper`` gives none: GD's is not torch SGD's)."""
    ours_lr = inspect.signature(getattr(oct, name)).parameters["lr"].default
    hyper = {"lr": ours_lr, **hyper}
    ours_model, torch_model = make_model(), make_model()
    ours = getattr(oct, name)(ours_model.parameters(), **hyper, impl=impl)
    theirs = getattr(torch.optim, torch_name)(torch_model.parameters(), **hyper)
    return ours_model, ours, torch_model, theirs


# Schedulers the parity runs cycle through (every scheduler is run on its own below).
SCHEDULERS = [
    lambda opt: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
    lambda opt: lr_scheduler.LinearLR(opt, start_factor=0.3, total_iters=5),
    lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.9),
]


@pytest.mark.parametrize("name, torch_name, hyper, impl", TORCH_CASES,
                         ids=[f"{impl}-{case_id(n, h, '-default')}"
                              for n, _, h, impl in TORCH_CASES])
def test_training_with_a_scheduler_equals_torch_optim(name, torch_name, hyper, impl):
    ours_model, ours, torch_model, theirs = both(name, torch_name, hyper, impl)
    if impl == "auto":
        assert ours._engines[("numpy", None)].implementation.name != "generic"
    make = SCHEDULERS[TORCH_CASES.index((name, torch_name, hyper, impl)) % len(SCHEDULERS)]
    train(ours_model, ours, STEPS, make(ours))
    train(torch_model, theirs, STEPS, make(theirs))
    assert_same_params(ours_model, torch_model, f"{name} {hyper}")
    assert isinstance(ours, torch.optim.Optimizer)


def _every_scheduler():
    """(id, optimizer name, options, scheduler factory) for each of torch's schedulers."""
    lam = lambda step: 0.9 ** step  # noqa: E731
    yield "LambdaLR", "Adam", {}, lambda o: lr_scheduler.LambdaLR(o, lam)
    yield "MultiplicativeLR", "Adam", {}, lambda o: lr_scheduler.MultiplicativeLR(o, lam)
    yield "StepLR", "Adam", {}, lambda o: lr_scheduler.StepLR(o, 2)
    yield "MultiStepLR", "Adam", {}, lambda o: lr_scheduler.MultiStepLR(o, [2, 5])
    yield "ConstantLR", "Adam", {}, lambda o: lr_scheduler.ConstantLR(o, 0.5, total_iters=3)
    yield "LinearLR", "Adam", {}, lambda o: lr_scheduler.LinearLR(o, 0.2, total_iters=4)
    yield "ExponentialLR", "Adam", {}, lambda o: lr_scheduler.ExponentialLR(o, 0.8)
    yield "PolynomialLR", "Adam", {}, lambda o: lr_scheduler.PolynomialLR(o, 6, power=2.0)
    yield "CosineAnnealingLR", "Adam", {}, lambda o: lr_scheduler.CosineAnnealingLR(o, 4)
    yield ("CosineAnnealingWarmRestarts", "Adam", {},
           lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, 3))
    yield ("SequentialLR", "Adam", {}, lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.ConstantLR(o, 0.5, total_iters=2), lr_scheduler.ExponentialLR(o, 0.9)],
        milestones=[3]))
    yield ("ChainedScheduler", "Adam", {}, lambda o: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(o, 0.5, total_iters=2), lr_scheduler.ExponentialLR(o, 0.9)]))
    yield ("ReduceLROnPlateau", "Adam", {},
           lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5))
    # Momentum cycling: Adam's betas[0], SGD's and RMSprop's momentum.
    for name, hyper in [("Adam", {}), ("NAdam", {}), ("SGD", {"momentum": 0.9}),
                        ("RMSprop", {"momentum": 0.5})]:
        yield (f"OneCycleLR-{name}", name, hyper,
               lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS))
    yield ("CyclicLR-SGD", "SGD", {"momentum": 0.9},
           lambda o: lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=3))
    yield ("CyclicLR-Adam", "Adam", {},
           lambda o: lr_scheduler.CyclicLR(o, 0.001, 0.01, step_size_up=3))
    yield ("SWALR", "SGD", {}, lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=0.05,
                                                                     anneal_epochs=3))


EVERY_SCHEDULER = list(_every_scheduler())


@pytest.mark.parametrize("label, name, hyper, make", EVERY_SCHEDULER,
                         ids=[s[0] for s in EVERY_SCHEDULER])
def test_every_lr_scheduler_drives_ours_as_torch_optim(label, name, hyper, make):
    ours_model, ours, torch_model, theirs = both(name, name, {"lr": 0.01, **hyper})
    schedulers = make(ours), make(theirs)
    for step in range(STEPS):
        losses = []
        for model, opt in [(ours_model, ours), (torch_model, theirs)]:
            opt.zero_grad()
            losses.append(backward(model, step).item())
            opt.step()
        for scheduler, loss in zip(schedulers, losses):
            if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
                scheduler.step(loss)
            else:
                scheduler.step()
    assert_same_params(ours_model, torch_model, label)
    for mine, its in zip(ours.param_groups, theirs.param_groups):
        assert {k: v for k, v in mine.items() if k != "params" and k not in EXTENSIONS} == \
            {k: v for k, v in its.items() if k != "params"}


def test_onecycle_cycles_adam_betas_and_sgd_momentum():
    model = make_model()
    adam = oct.Adam(model.parameters())
    sgd = oct.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for opt, read in [(adam, lambda g: g["betas"][0]), (sgd, lambda g: g["momentum"])]:
        scheduler = lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
        seen = set()
        for _ in range(5):
            opt.step()  # no gradients: nothing moves, the schedule still advances
            scheduler.step()
            seen.add(read(opt.param_groups[0]))
        assert len(seen) == 5 and min(seen) < 0.9


# --------------------------------------------------------------------------- state dicts
def _keys(state_dict):
    return ([sorted(set(g) - EXTENSIONS) for g in state_dict["param_groups"]],
            {i: sorted(s) for i, s in state_dict["state"].items()})


def _tensors_equal(a, b):
    for index in b["state"]:
        for key, value in b["state"][index].items():
            np.testing.assert_allclose(a["state"][index][key].numpy(), value.numpy(), **TOL,
                                       err_msg=f"state {index} {key}")
    for group_a, group_b in zip(a["param_groups"], b["param_groups"], strict=True):
        assert {k: v for k, v in group_a.items() if k not in EXTENSIONS} == \
            {k: v for k, v in group_b.items() if k not in EXTENSIONS}


@pytest.mark.parametrize("name", SAME_NAMED)
def test_state_dicts_go_both_ways_with_the_same_keys_and_numbers(name):
    # Every optional state on (amsgrad, centered...); the generic path, as the exchange
    # does not depend on the implementation.
    hyper = BY_NAME[name].rich
    ours_model, ours, torch_model, theirs = both(name, name, {"lr": 0.01, **hyper}, "generic")
    train(ours_model, ours, 4)
    train(torch_model, theirs, 4)
    mine, its = ours.state_dict(), theirs.state_dict()
    assert _keys(mine) == _keys(its)
    _tensors_equal(mine, its)
    assert mine["state"][0]["exp_avg"].dtype == torch.float64 if "exp_avg" in its["state"][0] \
        else True
    # Ours -> torch and torch -> ours, then both go on as if nothing happened.
    torch_from_ours = getattr(torch.optim, name)(torch_model.parameters())
    ours_from_torch = getattr(oct, name)(ours_model.parameters())
    torch_from_ours.load_state_dict(copy.deepcopy(mine))
    ours_from_torch.load_state_dict(copy.deepcopy(its))
    assert _keys(ours_from_torch.state_dict()) == _keys(its)
    train(ours_model, ours_from_torch, 3, start=4)
    train(torch_model, torch_from_ours, 3, start=4)
    assert_same_params(ours_model, torch_model, name)


def test_a_bad_state_dict_is_refused_and_changes_nothing():
    model = make_model()
    opt = oct.Adam(model.parameters())
    train(model, opt, 2)
    before = copy.deepcopy(opt.state_dict())
    for corrupt in [
        lambda sd: sd["state"][0].update(exp_avg=torch.zeros(7)),          # wrong shape
        lambda sd: sd["state"][0].update(velocity=torch.zeros(5, 3)),      # unknown state
        lambda sd: sd["param_groups"][0].update(lr=-1.0),                  # bad value
        lambda sd: sd["param_groups"][0].update(lrr=0.1),                  # misspelt key
    ]:
        bad = copy.deepcopy(before)
        corrupt(bad)
        with pytest.raises((ValueError, TypeError)):
            opt.load_state_dict(bad)
        _tensors_equal(opt.state_dict(), before)


# --------------------------------------------------------------------------- torch behaviour
@pytest.mark.parametrize("name", ["Adam", "NAdam", "Adagrad", "SGD"])
def test_none_grads_are_skipped_and_their_step_counts_stay(name):
    hyper = {"lr": 0.01, **({"momentum": 0.9} if name == "SGD" else {})}
    ours_model, ours, torch_model, theirs = both(name, name, hyper)
    for step in range(6):
        for model, opt in [(ours_model, ours), (torch_model, theirs)]:
            opt.zero_grad()  # set_to_none: the frozen layer's grads stay None
            frozen = step < 3
            model[0].weight.requires_grad_(not frozen)
            backward(model, step)
            opt.step()
    assert_same_params(ours_model, torch_model, name)
    mine, its = ours.state_dict(), theirs.state_dict()
    assert _keys(mine) == _keys(its)
    _tensors_equal(mine, its)
    if "step" in its["state"][0]:
        assert mine["state"][0]["step"].item() == 3 and mine["state"][1]["step"].item() == 6


def test_step_with_a_closure_returns_its_loss_and_matches_torch():
    ours_model, ours, torch_model, theirs = both("Adam", "Adam", {"lr": 0.01})
    for step in range(4):
        losses = []
        for model, opt in [(ours_model, ours), (torch_model, theirs)]:
            def closure(model=model, opt=opt, step=step):
                opt.zero_grad()
                return backward(model, step)

            with torch.no_grad():  # the closure runs with grad enabled all the same
                losses.append(opt.step(closure).item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    assert_same_params(ours_model, torch_model)


def test_grad_scaler_unscales_skips_inf_steps_and_matches_torch():
    ours_model, ours, torch_model, theirs = both("AdamW", "AdamW", {"lr": 0.01})
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)]
    for step in range(5):
        for model, opt, scaler in [(ours_model, ours, scalers[0]),
                                   (torch_model, theirs, scalers[1])]:
            opt.zero_grad()
            x, y = data(step)
            loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if step == 2:
                model[2].bias.grad[0] = float("inf")  # this step is skipped
            scaler.step(opt)
            scaler.update()
    assert_same_params(ours_model, torch_model)
    assert ours.state[ours_model[0].weight]["step"].item() == 4
    assert scalers[0].get_scale() == scalers[1].get_scale()


def test_pickle_and_deepcopy_carry_on_the_same_run():
    model = make_model()
    opt = oct.NAdam(model.parameters(), lr=0.01)
    scheduler = lr_scheduler.StepLR(opt, 2)  # patches opt.step: the pickle still works
    train(model, opt, 3, scheduler)
    copied_model, copied = copy.deepcopy((model, opt))
    loaded_model, loaded = pickle.loads(pickle.dumps((model, opt)))
    assert type(loaded) is oct.NAdam and type(copied) is oct.NAdam
    for m, o in [(model, opt), (copied_model, copied), (loaded_model, loaded)]:
        train(m, o, 3, start=3)
    assert_same_params(copied_model, model)
    assert_same_params(loaded_model, model)


def test_constructed_as_torch_users_do():
    model = make_model()
    # Positional hyperparameters in torch's order, named parameters, param-group dicts.
    by_position = oct.SGD(model.parameters(), 0.1, 0.9)
    assert by_position.param_groups[0]["momentum"] == 0.9
    named = oct.Adam(model.named_parameters(), lr=0.01)
    assert named.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    grouped = oct.Adam([{"params": model[0].parameters(), "lr": 0.1},
                        {"params": model[2].parameters()}], lr=0.01, weight_decay=0.1)
    assert [g["lr"] for g in grouped.param_groups] == [0.1, 0.01]
    assert grouped.param_groups[1]["weight_decay"] == 0.1
    assert grouped.state_dict()["param_groups"][1]["params"] == [2, 3]
    # add_param_group, zero_grad as torch's.
    opt = oct.Adam(model[0].parameters(), lr=0.01)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.1})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["betas"] == (0.9, 0.999)
    backward(model, 0)
    opt.step()
    assert all(len(opt.state[p]) == 3 for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_bad_hyperparameters_are_refused_when_written_and_change_nothing():
    model = make_model()
    opt = oct.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    group = opt.param_groups[0]
    with pytest.raises(ValueError, match="lr"):
        group["lr"] = -1.0
    with pytest.raises(ValueError, match="nesterov"):
        group["momentum"] = 0.0
    with pytest.raises(ValueError, match="unknown"):
        group["lrr"] = 0.1
    assert group["lr"] == 0.1 and group["momentum"] == 0.9 and "lrr" not in group
    with pytest.raises(ValueError, match="lr"):
        oct.Adam(model.parameters(), lr=-1)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -1})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="differentiable"):
        oct.Adam(model.parameters(), differentiable=True)
    with pytest.raises(TypeError):
        oct.Adam(model.parameters(), 0.1, (0.9, 0.99), 1e-8, 0, False, True)  # one too many


def test_a_step_that_raises_changes_nothing():
    model = make_model()
    opt = oct.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    backward(model, 0)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    backward(model, 1)
    model[2].bias.grad = model[2].bias.grad.to_sparse()  # the second group's is sparse
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    _tensors_equal(opt.state_dict(), state)


def test_state_never_requires_grad_and_create_graph_grads_stay_out_of_it():
    model = make_model()
    opt = oct.RMSprop(model.parameters(), lr=0.01, momentum=0.5, centered=True)
    for step in range(3):
        opt.zero_grad()
        x, y = data(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        for p, g in zip(model.parameters(), grads):
            p.grad = g  # carries a graph
        opt.step()  # outside torch.no_grad(): fine, as torch.optim
    for state in opt.state.values():
        assert not any(t.requires_grad or t.grad_fn is not None for t in state.values())
    assert all(p.is_leaf and p.grad_fn is None for p in model.parameters())


def test_step_hooks_run_as_torch_runs_them():
    model = make_model()
    opt = oct.Adam(model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("state_dict"))
    backward(model, 0)
    opt.step()
    opt.state_dict()
    assert calls == ["pre", "post", "state_dict"]


def test_cpu_tensors_take_the_fused_kernels_through_numpy_views():
    model = make_model()
    opt = oct.Adam(model.parameters())
    backward(model, 0)
    opt.step()
    engine = opt._engines[("numpy", None)]
    assert engine.implementation.name != "generic"
    weight = model[0].weight
    view = opt._slots[id(weight)].view
    assert isinstance(view, np.ndarray) and view.ctypes.data == weight.data_ptr()


def test_every_registered_optimizer_is_a_torch_optimizer_here():
    for core in OPTIMIZERS.values():
        cls = getattr(oct, core.__name__)
        assert issubclass(cls, torch.optim.Optimizer) and cls.core is core
        assert cls.__module__ == "optim_core.torch"


@pytest.mark.parametrize("name", SAME_NAMED)
def test_arguments_and_defaults_are_torchs(name):
    ours, theirs = inspect.signature(getattr(oct, name)), inspect.signature(
        getattr(torch.optim, name))
    # torch's positional hyperparameters, up to its first implementation switch.
    positional = []
    for p in theirs.parameters.values():
        if p.kind is not p.POSITIONAL_OR_KEYWORD or p.name in ("foreach", "capturable"):
            break
        positional.append(p.name)
    assert [p.name for p in ours.parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD][:len(positional)] == positional
    model = make_model()
    defaults = getattr(oct, name)(model.parameters()).defaults
    assert {k: v for k, v in defaults.items() if k not in EXTENSIONS} == \
        getattr(torch.optim, name)(model.parameters()).defaults


@pytest.mark.parametrize("name", [info.name for info in ANY_SHAPE if info.torch_name is None])
def test_optimizers_torch_lacks_equal_the_core_on_numpy(name):
    hyper = BY_NAME[name].reference_cases[-1]
    model = make_model()
    arrays = [p.detach().numpy().copy() for p in model.parameters()]
    core = getattr(optim_core, name)(arrays, **hyper)
    opt = getattr(oct, name)(model.parameters(), **hyper)
    for step in range(STEPS):
        opt.zero_grad()
        backward(model, step)
        grads = [p.grad.numpy().copy() for p in model.parameters()]
        opt.step()
        core.step(grads)
    for p, a in zip(model.parameters(), arrays):
        np.testing.assert_allclose(p.detach().numpy(), a, rtol=1e-13, atol=1e-15)


def test_the_torch_bench_compares_every_optimizer_torch_has(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from bench import torch_optim as bench

    pairs = dict(bench._pairs())
    assert {name: pairs[name] for name in ("Adam", "AdamW", "SGD", "Adagrad")} == dict.fromkeys(
        ("Adam", "AdamW", "SGD", "Adagrad"), "fused")
    assert set(SAME_NAMED) <= set(pairs)
    assert all(mode == "foreach" for name, mode in pairs.items()
               if name not in ("Adam", "AdamW", "SGD", "Adagrad"))
    out = tmp_path / "torch.json"
    assert bench.main(["--quick", "--optimizers", "Adam", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["optimizer"], r["workload"], r["torch_mode"]) for r in report["results"]] == [
        ("Adam", "1e4", "fused"), ("Adam", "20x100", "fused")]
    # A quick run judges no target; each side was timed as often as the other.
    assert all(r["holds"] is None and len(r["ours_times_s"]) == len(r["torch_times_s"]) == 4
               for r in report["results"])
    assert "| optimizer | workload |" in out.with_suffix(".md").read_text()


def test_complex_parameters_step_as_their_real_views_like_torch():
    start = torch.randn(4, 3, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    ours_p, torch_p = start.clone().requires_grad_(), start.clone().requires_grad_()
    ours, theirs = oct.Adam([ours_p], lr=0.1), torch.optim.Adam([torch_p], lr=0.1)
    for step in range(4):
        grad = torch.randn(4, 3, dtype=torch.complex128,
                           generator=torch.Generator().manual_seed(step))
        ours_p.grad, torch_p.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    np.testing.assert_allclose(ours_p.detach().numpy(), torch_p.detach().numpy(), **TOL)
    assert ours.state[ours_p]["exp_avg"].dtype == torch.complex128


def test_dtypes_numpy_lacks_take_the_generic_path_on_the_tensors():
    param = torch.ones(6, dtype=torch.bfloat16, requires_grad=True)
    opt = oct.SGD([param], lr=0.5, momentum=0.9)
    param.grad = torch.full((6,), 0.5, dtype=torch.bfloat16)
    opt.step()
    assert opt._slots[id(param)].kind == ("torch", torch.device("cpu"))
    assert torch.equal(param.detach(), torch.full((6,), 0.75, dtype=torch.bfloat16))
    assert opt.state[param]["momentum_buffer"].dtype == torch.bfloat16


@pytest.mark.parametrize("name", [info.name for info in OPTIM_DB
                                  if hasattr(info.cls, "eval") and hasattr(info.cls, "train")])
def test_schedule_free_eval_and_train_move_the_tensors_as_the_core_does(name):
    hyper = BY_NAME[name].reference_cases[0]
    model = make_model()
    arrays = [p.detach().numpy().copy() for p in model.parameters()]
    core = getattr(optim_core, name)(arrays, **hyper)
    opt = getattr(oct, name)(model.parameters(), **hyper)

    def same():
        for p, a in zip(model.parameters(), arrays):
            np.testing.assert_allclose(p.detach().numpy(), a, rtol=1e-13, atol=1e-15)

    for step in range(5):
        opt.zero_grad()
        backward(model, step)
        core.step([p.grad.numpy().copy() for p in model.parameters()])
        opt.step()
        if step == 2:
            opt.eval()
            core.eval()
            same()
            assert opt.state_dict()["train_mode"] is False
            with pytest.raises(RuntimeError, match="eval mode"):
                opt.step()
            restored = pickle.loads(pickle.dumps(opt))
            assert restored.train_mode is False
            opt.train()
            core.train()
    same()


def test_import_optim_core_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, optim_core, optim_core.integrations\n"
            "assert 'torch' not in sys.modules, 'import optim_core imported torch'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_cuda_path_views_tensors_through_dlpack_on_torchs_stream(monkeypatch):
    # No GPU here: a stand-in CuPy (NumPy behind DLPack) and a stand-in current stream walk
    # the CUDA branch (engine, zero-copy views, stream and device contexts) on CPU tensors.
    import contextlib
    import types

    from optim_core.integrations import torch_optim

    entered = []

    @contextlib.contextmanager
    def context(what, *args):
        entered.append(what)
        yield

    fake = types.SimpleNamespace(
        from_dlpack=np.from_dlpack, zeros=np.zeros,
        cuda=types.SimpleNamespace(Device=lambda index: context("device", index),
                                   ExternalStream=lambda ptr, index: context("stream", ptr)))
    monkeypatch.setattr(torch_optim, "_CUPY", [fake])
    monkeypatch.setattr(torch_optim, "_kind", lambda param: ("cupy", 0))
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: types.SimpleNamespace(cuda_stream=1234))
    ours_model, ours, torch_model, theirs = both("Adam", "Adam", {"lr": 0.01})
    train(ours_model, ours, 3)
    train(torch_model, theirs, 3)
    assert_same_params(ours_model, torch_model)
    assert ("cupy", 0) in ours._engines and {"device", "stream"} <= set(entered)
    weight = ours_model[0].weight
    assert ours._slots[id(weight)].view.ctypes.data == weight.data_ptr()


def test_float16_parameters_keep_float32_states_as_the_core_and_exchange_with_torch():
    ours_p = torch.ones(5, dtype=torch.float16, requires_grad=True)
    torch_p = ours_p.detach().clone().requires_grad_()
    ours, theirs = oct.Adam([ours_p], lr=0.1), torch.optim.Adam([torch_p], lr=0.1)
    for _ in range(3):
        ours_p.grad = torch.full((5,), 0.5, dtype=torch.float16)
        torch_p.grad = ours_p.grad.clone()
        ours.step()
        theirs.step()
    assert torch.equal(ours_p, torch_p)
    assert ours.state[ours_p]["exp_avg_sq"].dtype == torch.float32
    ours.load_state_dict(theirs.state_dict())  # torch's float16 states, widened exactly
    assert ours.state[ours_p]["exp_avg_sq"].dtype == torch.float32


def test_large_cpu_states_are_plain_tensors_that_follow_torch_and_survive_a_pickle():
    # From 4 MiB a contiguous CPU state is allocated by NumPy (which asks for huge pages):
    # still an ordinary contiguous tensor of torch's dtype, stepped as torch.optim steps,
    # exchanged and pickled like any other; channels_last ones keep the parameter's layout.
    from optim_core.integrations.torch_optim import _HUGE_PAGE_BYTES

    n = _HUGE_PAGE_BYTES // 8 + 3  # float64: just past the size
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(n, generator=generator)
    image = torch.randn(2, 3, 64, 2048, generator=generator).to(
        memory_format=torch.channels_last)
    ours_p, theirs_p = start.clone().requires_grad_(), start.clone().requires_grad_()
    ours_i, theirs_i = image.clone().requires_grad_(), image.clone().requires_grad_()
    ours = oct.AdamW([ours_p, ours_i], lr=0.01)
    theirs = torch.optim.AdamW([theirs_p, theirs_i], lr=0.01)
    for step in range(3):
        for p in (ours_p, theirs_p):
            p.grad = torch.sin(p.detach() * (step + 1))
        for p in (ours_i, theirs_i):
            p.grad = torch.cos(p.detach() * (step + 1))
        ours.step()
        theirs.step()
    torch.testing.assert_close(ours_p, theirs_p, **TOL)
    torch.testing.assert_close(ours_i, theirs_i, **TOL)
    state = ours.state[ours_p]
    for name in ("exp_avg", "exp_avg_sq"):
        tensor = state[name]
        assert tensor.is_contiguous() and tensor.dtype == torch.float64
        assert tensor.shape == ours_p.shape and not tensor.requires_grad
        assert ours.state[ours_i][name].is_contiguous(memory_format=torch.channels_last)
    _tensors_equal(ours.state_dict(), theirs.state_dict())
    loaded = pickle.loads(pickle.dumps(ours))
    _tensors_equal(loaded.state_dict(), ours.state_dict())


def test_hooks_global_hooks_and_the_profiler_see_every_step_as_torchs_do():
    # The step is not wrapped by torch's hooks-and-profiler wrapper (it costs 17 us a step);
    # it takes that wrapper itself whenever a hook is registered or the profiler runs.
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    model = make_model()
    opt = oct.SGD(model.parameters(), lr=0.1)
    assert type(opt).step is oct.TorchOptimizer.step
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append("global post")),
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre")),
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post")),
    ]
    backward(model, 0)
    opt.step()
    assert calls == ["global pre", "pre", "post", "global post"]
    for handle in handles:
        handle.remove()
    calls.clear()
    backward(model, 1)
    opt.step()
    assert calls == []
    # A pre-hook may replace the arguments: here the closure, whose loss step returns.
    opt.register_step_pre_hook(lambda o, args, kwargs: ((o,), {"closure": lambda: 7.0}))
    assert opt.step() == 7.0
    with torch.profiler.profile() as profile:
        opt.step()
    assert "Optimizer.step#SGD.step" in {event.name for event in profile.events()}


def test_a_schedule_free_step_in_eval_mode_runs_its_hooks_once_and_raises():
    model = make_model()
    opt = oct.ScheduleFreeSGD(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.train()
    backward(model, 0)
    opt.step()
    assert calls == ["pre"]
    opt.eval()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    assert calls == ["pre", "pre"]
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), q)


def test_a_state_set_to_none_starts_afresh_as_in_torch_optim():
    runs = []
    for module in (oct, torch.optim):
        p = torch.ones(3, dtype=torch.float64, requires_grad=True)
        opt = module.SGD([p], lr=0.1, momentum=0.9)
        for k in range(2):
            p.grad = torch.full_like(p, 1.0 + k)
            opt.step()
        opt.state[p]["momentum_buffer"] = None
        for k in range(2):
            p.grad = torch.full_like(p, 3.0 + k)
            opt.step()
        runs.append((p.detach().clone(), opt.state[p]["momentum_buffer"].clone()))
    (ours, ours_buffer), (theirs, their_buffer) = runs
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours_buffer, their_buffer, rtol=1e-12, atol=0)


def test_a_step_that_raises_leaves_a_plain_dict_group_where_the_user_put_it():
    a = torch.ones(3, dtype=torch.float64, requires_grad=True)
    b = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = oct.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    plain = dict(opt.param_groups[0])
    opt.param_groups[0] = plain
    a.grad = torch.ones(3, dtype=torch.float64)
    b.grad = torch.ones(3, dtype=torch.float64).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert opt.param_groups[0] is plain
    assert torch.equal(a.detach(), torch.ones(3, dtype=torch.float64))
    b.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert type(opt.param_groups[0]) is not dict  # checked and stored by a step that wrote
    assert torch.equal(a.detach(), torch.full((3,), 0.9, dtype=torch.float64))
