"""The one table of optimizers and options that every test draws from (like torch's ``optim_db``).

Each registered optimizer has one :class:`OptimizerInfo` entry: its class, its float64
reference in ``tests/reference.py``, its ``torch.optim`` counterpart, and the option
sets the tests run it with. Adding an optimizer means adding its rule, its class (which
registers itself) and an entry here; ``test_every_registered_optimizer_has_an_entry``
(tests/test_optim_db.py) fails until it has one.

What each field drives
----------------------
``reference_cases``
    Option sets checked against the reference for 12 steps on every array library
    (test_reference.py) and against ``torch.optim`` for 15 (test_torch_parity.py). The
    first is the default configuration (only ``lr`` where the default is tiny).
``fused_cases``
    Option sets that together take both sides of every ``if`` of the rule (and both
    sides of ``lerp``), so every specialization a kernel can take is compared with the
    generic path: fused NumPy, flat buffers, the CUDA source and its launch emulation.
``rich``
    Options that switch on every optional state and branch at once: validation,
    low precision, state dicts.
``hyperparameters``
    A Hypothesis strategy over valid, sane values of every hyperparameter
    (test_properties.py), and ``fused_flags``, the flags fixed for its fused tests (each
    flag combination is a separate kernel, a second each to compile on a cold cache).
``parabola``, ``rosenbrock``
    Tuned options (and steps) under which it converges (test_convergence.py), or only
    reduces the loss where ``*_converges`` is false.
``resume``
    Options of the bit-exact resume test (test_checkpoint.py).
``matrix_only``
    The optimizer takes 2-D parameters only (Muon). The shared tests step parameters of
    every shape (vectors, 0-d arrays), so they draw from :data:`NAMES`, the others; such
    an optimizer's cases run in the test file named by ``tests`` instead, and only the
    checks of the table itself (test_optim_db.py) see it, through :data:`ALL_NAMES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import reference
import reference_schedule_free
from hypothesis import strategies as st

import optim_core
from optim_core.optim.registry import OPTIMIZERS

unit = st.floats(0.0, 0.999)
betas = st.tuples(unit, unit)
eps = st.one_of(st.just(0.0), st.floats(1e-10, 1e-3))
lr = st.one_of(st.just(0.0), st.floats(1e-5, 0.1))
decay = st.one_of(st.just(0.0), st.floats(0.0, 0.5))
flag = st.booleans()


@dataclass(frozen=True)
class OptimizerInfo:
    """Everything the tests know about one optimizer; see the module docstring."""

    cls: type
    reference: Callable[..., Any]
    torch_name: str | None
    reference_cases: list[dict]
    fused_cases: list[dict]
    rich: dict
    hyperparameters: Any
    fused_flags: dict = field(default_factory=dict)
    #: torch.optim's default learning rate (the paper's for Lion), for the reference
    #: functions when a case gives none; None where the case always gives one.
    default_lr: float | None = None
    #: ``optax_reference(optax, hyper)``: optax's transformation of the same algorithm
    #: and options (the tests negate the gradient for ``maximize``), checked in float64
    #: over 100+ steps by test_optax_parity.py; None where optax has no counterpart.
    optax_reference: Callable[..., Any] | None = None
    #: Options under which ``lr=0`` leaves the parameters unchanged, where that needs more
    #: than ``lr=0`` (the tests of that property add them).
    lr_zero: dict = field(default_factory=dict)
    parabola: dict = field(default_factory=dict)
    rosenbrock: tuple[dict, int] = ({}, 0)
    #: False: it only reduces the loss (by the factor test_convergence.py asks), it does
    #: not reach the minimum.
    parabola_converges: bool = True
    rosenbrock_converges: bool = True
    resume: dict = field(default_factory=dict)
    matrix_only: bool = False
    #: States shaped unlike the parameter (Adafactor's row and column factors): flat
    #: buffers and the fused kernels do not take them, so the shared tests leave it out
    #: as a matrix_only one, and its cases run in the test file named by ``tests``.
    shaped_states: bool = False
    #: The test file that runs a ``matrix_only`` or ``shaped_states`` optimizer's cases.
    tests: str | None = None

    @property
    def shared(self) -> bool:
        """Whether the shared tests (every shape, flat buffers, fused kernels) run it."""
        return not (self.matrix_only or self.shaped_states)

    @property
    def name(self) -> str:
        """The class name (``optim_core.<name>``)."""
        return self.cls.__name__

    @property
    def cli_name(self) -> str:
        return self.cls.cli_name

    def make(self, params: Any, **options: Any) -> optim_core.Optimizer:
        return self.cls(params, **options)


def _optax_adopt(optax, h: dict):
    """optax.contrib's ADOPT with our options (see ADOPT's docstring for the names)."""
    b1, b2 = h.get("betas", (0.9, 0.9999))
    exponent = h.get("clip_exponent", 0.25)
    scale = optax.contrib.scale_by_adopt(
        b1=b1, b2=b2, eps=h.get("eps", 1e-6), nesterov=h.get("nesterov", False),
        use_clipping=h.get("use_clipping", True),
        clip_value_fn=lambda count: count ** exponent)
    lr, wd = h.get("lr", 1e-3), h.get("weight_decay", 0.0)
    if wd and h.get("decoupled_weight_decay", False):
        return optax.chain(scale, optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr))
    return optax.chain(*([optax.add_decayed_weights(wd)] if wd else []), scale,
                       optax.scale_by_learning_rate(lr))


def _optax_ademamix(optax, h: dict):
    """optax.contrib's AdEMAMix with our options; the warmups as the schedules the
    authors give optax (alpha_scheduler, beta3_scheduler), of optax's count."""
    import jax.numpy as jnp

    b1, b2, b3 = h.get("betas", (0.9, 0.999, 0.9999))
    alpha, t_alpha, t_beta = h.get("alpha", 5.0), h.get("alpha_warmup", 0), h.get("beta3_warmup", 0)

    def alpha_schedule(count):
        warm = (count < t_alpha).astype(jnp.float64)
        a = count / float(t_alpha)
        return warm * ((1.0 - a) * 0.0 + a * alpha) + alpha * (1.0 - warm)

    def beta3_schedule(count):
        def half_life(beta):
            return jnp.log(0.5) / jnp.log(beta) - 1

        warm = (count < t_beta).astype(jnp.float64)
        a = count / float(t_beta)
        mixed = (1.0 - a) * half_life(b1) + a * half_life(b3)
        return warm * jnp.power(0.5, 1 / (mixed + 1)) + b3 * (1.0 - warm)

    return optax.contrib.ademamix(
        h.get("lr", 1e-3), b1=b1, b2=b2, b3=beta3_schedule if t_beta else b3,
        alpha=alpha_schedule if t_alpha else alpha, eps=h.get("eps", 1e-8),
        eps_root=h.get("eps_root", 0.0), weight_decay=h.get("weight_decay", 0.0))


OPTIM_DB: list[OptimizerInfo] = [
    OptimizerInfo(
        optim_core.GD, reference.gd, "SGD",  # GD is SGD without momentum
        reference_cases=[{"lr": 0.05}],
        fused_cases=[{}],
        rich={},
        hyperparameters=st.fixed_dictionaries({"lr": lr}),
        parabola={"lr": 0.05}, rosenbrock=({"lr": 2e-3}, 20000),
    ),
    OptimizerInfo(
        optim_core.SGD, reference.sgd, "SGD",
        reference_cases=[
            {"lr": 0.05},
            {"lr": 0.05, "momentum": 0.9},
            {"lr": 0.05, "momentum": 0.9, "dampening": 0.3},
            {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
            {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.01, "maximize": True},
            {"lr": 0.05, "momentum": 0.9, "cautious": True},
            {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "cautious": True},
        ],
        fused_cases=[
            {"lr": 0.05},
            {"lr": 0.05, "momentum": 0.9, "dampening": 0.25, "weight_decay": 0.1},
            {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True},
            {"lr": 0.05, "momentum": 0.9, "dampening": 0.25, "cautious": True},
        ],
        rich={"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "momentum": st.one_of(st.just(0.0), unit),
            "dampening": st.floats(0.0, 1.0), "weight_decay": decay, "nesterov": flag,
            "maximize": flag, "cautious": flag}),
        fused_flags={"nesterov": True, "maximize": False, "dampening": 0.0, "cautious": False},
        parabola={"lr": 0.05, "momentum": 0.9, "nesterov": True},
        rosenbrock=({"lr": 1e-3, "momentum": 0.9}, 5000),
        resume={"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ),
    OptimizerInfo(
        optim_core.DGD, reference.dgd, None,  # the article's method: reference only
        reference_cases=[{"lr": 0.05}, {"lr": 0.02, "decay": 0.99}],
        fused_cases=[{"lr": 0.1, "decay": 0.5}],
        rich={},
        hyperparameters=st.fixed_dictionaries({"lr": lr, "decay": st.floats(0.0, 1.0)}),
        # No damping: it orbits the minimum instead of converging (see DGD's docstring),
        # so it is held to a loss reduction on both.
        parabola={"lr": 0.005, "decay": 0.995}, parabola_converges=False,
        rosenbrock=({"lr": 1e-4, "decay": 0.999}, 10000), rosenbrock_converges=False,
        resume={"decay": 0.95},
    ),
    OptimizerInfo(
        optim_core.Adagrad, reference.adagrad, "Adagrad",
        reference_cases=[
            {},
            {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.1, "initial_accumulator_value": 0.5},
            {"lr": 0.1, "eps": 1e-6, "maximize": True},
        ],
        fused_cases=[
            {},
            {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.5,
             "maximize": True},
        ],
        rich={"lr_decay": 0.1, "weight_decay": 0.1},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "lr_decay": st.floats(0.0, 1.0), "weight_decay": decay,
            "initial_accumulator_value": st.floats(0.0, 1.0), "eps": eps, "maximize": flag}),
        fused_flags={"maximize": True},
        default_lr=1e-2,
        parabola={"lr": 0.5}, rosenbrock=({"lr": 1.0}, 10000),
        resume={"lr_decay": 0.01},
    ),
    OptimizerInfo(
        optim_core.RMSprop, reference.rmsprop, "RMSprop",
        reference_cases=[
            {},
            {"lr": 0.01, "momentum": 0.9},
            {"lr": 0.01, "centered": True},
            {"lr": 0.01, "centered": True, "momentum": 0.5, "weight_decay": 0.1, "alpha": 0.9},
            {"lr": 0.01, "maximize": True, "eps": 1e-4},
        ],
        fused_cases=[
            {},
            {"momentum": 0.9, "weight_decay": 0.1, "maximize": True},
            {"centered": True, "momentum": 0.5, "alpha": 0.9},
            # alpha = 0.3 puts lerp's weight 1 - alpha above 0.5: the other side of its formula.
            {"centered": True, "alpha": 0.3},
        ],
        rich={"momentum": 0.5, "centered": True, "weight_decay": 0.1},
        # alpha within [0.5, 0.999]: with centered=True the variance v - m**2 of a near-0
        # or near-1 alpha cancels catastrophically in float32 (as in torch), which would
        # test rounding, not the rule.
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "alpha": st.floats(0.5, 0.999), "eps": eps, "weight_decay": decay,
            "momentum": st.one_of(st.just(0.0), unit), "centered": flag, "maximize": flag}),
        fused_flags={"centered": True, "maximize": False},
        default_lr=1e-2,
        parabola={"lr": 0.01}, rosenbrock=({"lr": 1e-3, "momentum": 0.9}, 10000),
        resume={"centered": True, "momentum": 0.5},
    ),
    OptimizerInfo(
        optim_core.Adadelta, reference.adadelta, "Adadelta",
        reference_cases=[
            {},
            {"lr": 0.5, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.1},
            {"lr": 1.0, "maximize": True},
        ],
        fused_cases=[
            {},
            {"lr": 0.5, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.1, "maximize": True},
        ],
        rich={"weight_decay": 0.1},
        hyperparameters=st.fixed_dictionaries({
            "lr": st.floats(0.0, 1.0), "rho": st.floats(0.0, 1.0), "eps": eps,
            "weight_decay": decay, "maximize": flag}),
        fused_flags={"maximize": False},
        default_lr=1.0,
        parabola={"lr": 1.0}, rosenbrock=({"lr": 0.05}, 15000), rosenbrock_converges=False,
    ),
    OptimizerInfo(
        optim_core.Adam, reference.adam, "Adam",
        reference_cases=[
            {},
            {"lr": 0.01, "amsgrad": True},
            {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1},
            {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "amsgrad": True},
            {"lr": 0.01, "maximize": True, "betas": (0.3, 0.5)},
            {"lr": 0.01, "cautious": True},
            {"lr": 0.01, "cautious": True, "amsgrad": True, "weight_decay": 0.1, "maximize": True},
        ],
        fused_cases=[
            {},
            {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1, "maximize": True},
            {"lr": 0.01, "cautious": True, "betas": (0.3, 0.5)},
            # beta1 = 0.3 puts lerp's weight 1 - beta1 above 0.5: the other side of its formula.
            {"lr": 0.01, "betas": (0.3, 0.5), "eps": 1e-6},
        ],
        rich={"amsgrad": True, "weight_decay": 0.1},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": decay, "amsgrad": flag,
            "maximize": flag, "decoupled_weight_decay": flag, "cautious": flag}),
        fused_flags={"amsgrad": True, "maximize": False, "decoupled_weight_decay": False,
                     "cautious": False},
        default_lr=1e-3,
        parabola={"lr": 0.05}, rosenbrock=({"lr": 0.02}, 5000),
        resume={"amsgrad": True},
    ),
    OptimizerInfo(
        optim_core.AdamW, reference.adamw, "AdamW",
        reference_cases=[
            {},
            {"lr": 0.01, "weight_decay": 0.5, "amsgrad": True},
            {"lr": 0.01, "maximize": True},
            {"lr": 0.01, "weight_decay": 0.5, "cautious": True},
        ],
        fused_cases=[{}, {"lr": 0.01, "weight_decay": 0.5, "amsgrad": True},
                     {"lr": 0.01, "weight_decay": 0.5, "cautious": True}],
        rich={"amsgrad": True},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": decay, "amsgrad": flag,
            "maximize": flag, "cautious": flag}),
        fused_flags={"amsgrad": False, "maximize": True, "cautious": False},
        default_lr=1e-3,
        parabola={"lr": 0.05, "weight_decay": 0.0},
        rosenbrock=({"lr": 0.02, "weight_decay": 0.0}, 5000),
    ),
    OptimizerInfo(
        optim_core.Adamax, reference.adamax, "Adamax",
        reference_cases=[
            {},
            {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.1},
            {"lr": 0.01, "maximize": True},
        ],
        fused_cases=[
            {},
            {"lr": 0.01, "betas": (0.3, 0.95), "weight_decay": 0.1, "maximize": True},
        ],
        rich={"weight_decay": 0.1},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": decay, "maximize": flag}),
        fused_flags={"maximize": False},
        default_lr=2e-3,
        parabola={"lr": 0.05}, rosenbrock=({"lr": 0.02}, 5000),
    ),
    OptimizerInfo(
        optim_core.NAdam, reference.nadam, "NAdam",
        reference_cases=[
            {},
            {"lr": 0.01, "momentum_decay": 0.01, "weight_decay": 0.1},
            {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
        ],
        fused_cases=[
            {},
            {"lr": 0.01, "momentum_decay": 0.01, "weight_decay": 0.1, "maximize": True,
             "betas": (0.3, 0.999)},  # lerp's other side, as for Adam
            {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
        ],
        rich={"weight_decay": 0.1},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": decay,
            "momentum_decay": st.floats(0.0, 0.05), "decoupled_weight_decay": flag,
            "maximize": flag}),
        fused_flags={"decoupled_weight_decay": True, "maximize": False},
        default_lr=2e-3,
        parabola={"lr": 0.05}, rosenbrock=({"lr": 0.02}, 10000),
    ),
    OptimizerInfo(
        optim_core.RAdam, reference.radam, "RAdam",
        reference_cases=[
            {},
            {"lr": 0.01, "betas": (0.9, 0.9)},
            {"lr": 0.01, "weight_decay": 0.1},
            {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
        ],
        fused_cases=[
            # betas[1] = 0.9 makes RAdam rectify from step 6 on, within the tested steps.
            {"lr": 0.01, "betas": (0.9, 0.9)},
            {"lr": 0.01, "weight_decay": 0.1, "maximize": True,
             "betas": (0.3, 0.999)},  # lerp's other side, as for Adam
            {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
        ],
        rich={"weight_decay": 0.1},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": decay,
            "decoupled_weight_decay": flag, "maximize": flag}),
        fused_flags={"decoupled_weight_decay": False, "maximize": True},
        default_lr=1e-3,
        parabola={"lr": 0.05}, rosenbrock=({"lr": 2e-3}, 10000),
    ),
    OptimizerInfo(
        optim_core.Lion, reference.lion, None,  # not in torch.optim: reference only
        reference_cases=[
            {},
            {"lr": 1e-3, "betas": (0.95, 0.98), "weight_decay": 0.5},
            {"lr": 1e-3, "maximize": True},
            {"lr": 1e-3, "weight_decay": 0.5, "cautious": True},
        ],
        fused_cases=[
            {},
            {"lr": 1e-3, "betas": (0.3, 0.98), "weight_decay": 0.5, "maximize": True},
            {"lr": 1e-3, "cautious": True},
        ],
        rich={"weight_decay": 0.1},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "betas": betas, "weight_decay": decay, "maximize": flag,
            "cautious": flag}),
        fused_flags={"maximize": False, "cautious": False},
        default_lr=1e-4,
        parabola={"lr": 0.01}, rosenbrock=({"lr": 1e-3}, 10000),
        resume={"weight_decay": 0.1},
    ),
    OptimizerInfo(
        optim_core.ASGD, reference.asgd, "ASGD",
        reference_cases=[
            {},
            # t0 = 3: averaging starts at step 5, within the tested steps.
            {"lr": 0.05, "lambd": 0.1, "alpha": 0.5, "t0": 3},
            {"lr": 0.05, "lambd": 0.01, "alpha": 1.5, "t0": 2.5, "weight_decay": 0.1,
             "maximize": True},
            {"lr": 0.02, "t0": -1, "weight_decay": 0.01},
        ],
        fused_cases=[
            {},
            {"lr": 0.05, "lambd": 0.1, "t0": 3, "weight_decay": 0.1, "maximize": True},
        ],
        rich={"lambd": 0.1, "t0": 2, "weight_decay": 0.1},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "lambd": st.floats(0.0, 1.0), "alpha": st.floats(0.0, 2.0),
            "t0": st.floats(-3.0, 6.0), "weight_decay": decay, "maximize": flag}),
        fused_flags={"maximize": True},
        default_lr=1e-2,
        parabola={"lr": 0.05, "lambd": 0.0}, rosenbrock=({"lr": 2e-3, "lambd": 0.0}, 20000),
        resume={"lambd": 0.1, "t0": 3},
    ),
    OptimizerInfo(
        optim_core.LAMB, reference.lamb, None,  # optax.lamb: test_lamb_lars_optax.py
        reference_cases=[
            {},
            {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": 0.1},
            {"lr": 0.01, "eps_root": 1e-6, "maximize": True},
        ],
        fused_cases=[
            {},
            {"lr": 0.01, "betas": (0.3, 0.9), "weight_decay": 0.1, "eps_root": 1e-8,
             "maximize": True},
        ],
        rich={"weight_decay": 0.1},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "betas": betas, "eps": st.floats(1e-10, 1e-3), "eps_root": eps,
            "weight_decay": decay, "maximize": flag}),
        fused_flags={"maximize": False},
        default_lr=1e-3,
        # Steps of lr times the parameter's norm: it hovers near the minimum, it does not
        # settle at a fixed lr; held to the loss reductions.
        parabola={"lr": 0.01}, parabola_converges=False,
        rosenbrock=({"lr": 0.005}, 20000), rosenbrock_converges=False,
        resume={"weight_decay": 0.1},
    ),
    OptimizerInfo(
        optim_core.LARS, reference.lars, None,  # optax.lars: test_lamb_lars_optax.py
        reference_cases=[
            {},
            {"lr": 0.5, "momentum": 0.5, "nesterov": True, "weight_decay": 0.1,
             "trust_coefficient": 0.01, "eps": 1e-6},
            {"lr": 0.05, "trust_ratio": False, "maximize": True, "momentum": 0.0},
        ],
        fused_cases=[
            {"lr": 0.5},
            {"lr": 0.5, "nesterov": True, "weight_decay": 0.1, "trust_coefficient": 0.01,
             "eps": 1e-6, "maximize": True},
            {"lr": 0.05, "trust_ratio": False},
        ],
        rich={"weight_decay": 0.1, "nesterov": True},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "momentum": unit, "nesterov": flag, "weight_decay": decay,
            "trust_coefficient": st.floats(1e-4, 0.1), "eps": eps, "trust_ratio": flag,
            "maximize": flag}),
        fused_flags={"nesterov": True, "trust_ratio": True, "maximize": False},
        default_lr=1e-3,
        parabola={"lr": 1.0}, parabola_converges=False,  # as LAMB
        rosenbrock=({"lr": 2.0}, 5000), rosenbrock_converges=False,
        resume={"weight_decay": 0.1, "nesterov": True},
    ),
    OptimizerInfo(
        optim_core.Rprop, reference.rprop, "Rprop",
        reference_cases=[
            {},
            # Steps reach both bounds within the tested steps.
            {"lr": 0.05, "etas": (0.3, 1.5), "step_sizes": (0.02, 0.1)},
            {"lr": 0.01, "etas": (0.6, 1.1), "step_sizes": (0.0, 0.012), "maximize": True},
        ],
        fused_cases=[
            {},
            {"lr": 0.01, "etas": (0.3, 1.5), "step_sizes": (5e-3, 2e-2), "maximize": True},
        ],
        rich={},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "etas": st.tuples(st.floats(0.05, 0.95), st.floats(1.05, 3.0)),
            "step_sizes": st.tuples(st.one_of(st.just(0.0), st.floats(1e-8, 1e-3)),
                                    st.floats(1e-2, 50.0)),
            "maximize": flag}),
        fused_flags={"maximize": False},
        default_lr=1e-2,
        # The first step clamps the step size lr up to step_sizes[0]: lr = 0 moves the
        # parameters unless that is 0 too (as in torch).
        lr_zero={"step_sizes": (0.0, 50.0)},
        parabola={"lr": 0.01}, rosenbrock=({"lr": 1e-3}, 5000),
        resume={"etas": (0.4, 1.3)},
    ),
    OptimizerInfo(
        optim_core.ADOPT, reference.adopt, None,  # not in torch.optim: optax's
        reference_cases=[
            {},
            {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-4, "nesterov": True},
            {"lr": 0.01, "use_clipping": False, "weight_decay": 0.1},
            {"lr": 0.01, "clip_exponent": 0.5, "weight_decay": 0.1,
             "decoupled_weight_decay": True, "maximize": True},
        ],
        fused_cases=[
            {},
            {"lr": 0.01, "betas": (0.8, 0.99), "nesterov": True, "use_clipping": False,
             "weight_decay": 0.1, "maximize": True},
            {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
        ],
        rich={"weight_decay": 0.1, "nesterov": True},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "betas": betas, "eps": st.floats(1e-8, 1e-3), "weight_decay": decay,
            "decoupled_weight_decay": flag, "use_clipping": flag,
            "clip_exponent": st.floats(0.0, 1.0), "nesterov": flag, "maximize": flag}),
        fused_flags={"use_clipping": True, "nesterov": False, "maximize": False,
                     "decoupled_weight_decay": False},
        default_lr=1e-3,
        optax_reference=_optax_adopt,
        # beta2 = 0.9999 normalizes by a second moment that forgets the large early
        # gradients too slowly for these step budgets.
        parabola={"lr": 0.01, "betas": (0.9, 0.99)},
        rosenbrock=({"lr": 5e-3, "betas": (0.9, 0.99)}, 5000),
        resume={"nesterov": True},
    ),
    OptimizerInfo(
        optim_core.AdEMAMix, reference.ademamix, None,  # not in torch.optim: optax's
        reference_cases=[
            {},
            {"lr": 0.01, "betas": (0.8, 0.99, 0.999), "alpha": 8.0, "eps": 1e-6,
             "eps_root": 1e-8, "weight_decay": 0.1},
            # Warmups shorter than the steps run: both schedules reach their ends.
            {"lr": 0.01, "alpha_warmup": 30, "beta3_warmup": 50, "maximize": True},
        ],
        fused_cases=[
            {},
            {"lr": 0.01, "betas": (0.8, 0.99, 0.999), "weight_decay": 0.1, "maximize": True,
             "alpha_warmup": 5, "beta3_warmup": 8},
        ],
        rich={"weight_decay": 0.1, "alpha_warmup": 3, "beta3_warmup": 4},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "betas": st.tuples(st.floats(0.01, 0.999), unit, st.floats(0.01, 0.9999)),
            "alpha": st.floats(0.0, 10.0), "eps": eps, "eps_root": st.floats(0.0, 1e-6),
            "weight_decay": decay, "alpha_warmup": st.integers(0, 6),
            "beta3_warmup": st.integers(0, 6), "maximize": flag}),
        fused_flags={"maximize": False},
        default_lr=1e-3,
        optax_reference=_optax_ademamix,
        # A slow momentum of beta3 = 0.9999 outlives these step budgets.
        parabola={"lr": 0.03, "betas": (0.9, 0.999, 0.99), "alpha": 2.0},
        rosenbrock=({"lr": 2e-3, "betas": (0.9, 0.99, 0.999), "alpha": 2.0}, 10000),
        resume={"alpha_warmup": 3, "beta3_warmup": 4},
    ),
]

# Schedule-Free SGD and AdamW (optim_core/optim/schedule_free.py): checked against the
# paper's three-sequence form here, and against the schedulefree package over 120 steps,
# with the train()/eval() switch, in tests/test_schedule_free.py.
OPTIM_DB += [
    OptimizerInfo(
        optim_core.ScheduleFreeSGD, reference_schedule_free.schedule_free_sgd, None,
        reference_cases=[
            {"lr": 0.1},  # the default lr=1.0 diverges on the test quadratic
            {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.1},
            {"lr": 0.2, "warmup_steps": 5, "r": 0.5, "weight_lr_power": 1.0},
        ],
        fused_cases=[
            {"lr": 0.1},
            {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.1, "warmup_steps": 3, "r": 1.0},
        ],
        rich={"weight_decay": 0.1, "warmup_steps": 2},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "momentum": st.floats(0.05, 0.95), "weight_decay": decay,
            "warmup_steps": st.integers(0, 4), "r": st.floats(0.0, 2.0),
            "weight_lr_power": st.floats(0.0, 3.0)}),
        default_lr=1.0,
        parabola={"lr": 0.1}, rosenbrock=({"lr": 2e-3, "r": 4.0}, 10000),
        resume={"weight_decay": 0.01, "warmup_steps": 3},
    ),
    OptimizerInfo(
        optim_core.ScheduleFreeAdamW, reference_schedule_free.schedule_free_adamw, None,
        reference_cases=[
            {},
            {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1},
            {"lr": 0.05, "warmup_steps": 4, "r": 1.0, "weight_lr_power": 0.0},
        ],
        fused_cases=[
            {},
            {"lr": 0.01, "betas": (0.3, 0.9), "weight_decay": 0.1, "warmup_steps": 3, "r": 0.5},
        ],
        rich={"weight_decay": 0.1, "warmup_steps": 2},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "betas": st.tuples(st.floats(0.05, 0.95), unit), "eps": eps,
            "weight_decay": decay, "warmup_steps": st.integers(0, 4), "r": st.floats(0.0, 2.0),
            "weight_lr_power": st.floats(0.0, 3.0)}),
        default_lr=0.0025,
        parabola={"lr": 0.05}, rosenbrock=({"lr": 0.02, "r": 2.0}, 5000),
        resume={"weight_decay": 0.01, "warmup_steps": 3},
    ),
    OptimizerInfo(
        optim_core.Muon, reference.muon, "Muon",
        reference_cases=[
            {"lr": 0.02},
            {"lr": 0.02, "nesterov": False, "adjust_lr_fn": "original"},
            {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0,
             "momentum": 0.9},
            {"lr": 0.02, "ns_steps": 3, "ns_coefficients": (2.0, -1.5, 0.5), "eps": 1e-3,
             "weight_decay": 0.5},
        ],
        fused_cases=[
            {"lr": 0.02},
            {"lr": 0.02, "momentum": 0.3},  # momentum 0.3: both lerps take their other side
            {"lr": 0.02, "nesterov": False, "weight_decay": 0.0},
            {"lr": 0.02, "use_muon": False, "betas": (0.3, 0.9)},
            {"lr": 0.02, "use_muon": False, "weight_decay": 0.0},
        ],
        rich={"weight_decay": 0.1},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "weight_decay": decay, "momentum": unit, "nesterov": flag,
            "adjust_lr_fn": st.sampled_from([None, "original", "match_rms_adamw"])}),
        default_lr=1e-3,
        parabola={"lr": 0.05}, rosenbrock=({"lr": 1e-3}, 100),
        resume={"nesterov": False},
        matrix_only=True, tests="tests/test_muon.py",
    ),
    OptimizerInfo(
        optim_core.Adafactor, reference.adafactor, "Adafactor",
        reference_cases=[
            {},
            {"lr": 0.05, "beta2_decay": -0.5, "eps": (1e-20, 1e-2), "d": 1.5,
             "weight_decay": 0.1},
            {"lr": 0.05, "eps": (1e-6, 0.0), "maximize": True},
        ],
        fused_cases=[
            {},
            {"lr": 0.05, "beta2_decay": -0.5, "d": 2.0, "weight_decay": 0.1,
             "maximize": True},
        ],
        rich={"weight_decay": 0.1},
        hyperparameters=st.fixed_dictionaries({
            "lr": lr, "beta2_decay": st.floats(-1.0, 0.0),
            "eps": st.tuples(st.one_of(st.none(), st.floats(0.0, 1e-3)), st.floats(0.0, 1e-2)),
            "d": st.floats(1.0, 4.0), "weight_decay": decay, "maximize": flag}),
        default_lr=1e-2,
        parabola={"lr": 0.05}, parabola_converges=False,
        rosenbrock=({"lr": 0.01}, 5000), rosenbrock_converges=False,
        resume={"weight_decay": 0.1},
        shaped_states=True, tests="tests/test_adafactor.py",
    ),
]

#: The entries by class name.
BY_NAME: dict[str, OptimizerInfo] = {info.name: info for info in OPTIM_DB}
#: Every optimizer's class name, in the table's order.
ALL_NAMES: list[str] = list(BY_NAME)
#: The optimizers the shared tests run on parameters of any shape (all but matrix_only
#: and shaped_states ones).
NAMES: list[str] = [info.name for info in OPTIM_DB if info.shared]


def case_id(name: str, hyper: dict, empty: str = "") -> str:
    """A readable test id for an optimizer and its options."""
    return name + ("-" + ",".join(f"{k}={v}" for k, v in hyper.items()) if hyper else empty)


def reference_cases() -> list[tuple[str, Callable, dict]]:
    """(name, reference function, options) of every reference case of every optimizer."""
    return [(info.name, info.reference, hyper) for info in OPTIM_DB
            if info.shared for hyper in info.reference_cases]


def fused_cases() -> list[tuple[str, dict]]:
    """(name, options) of every fused case of every optimizer."""
    return [(info.name, hyper) for info in OPTIM_DB if info.shared
            for hyper in info.fused_cases]


def with_default_lr(name: str, hyper: dict) -> dict:
    """``hyper`` with the optimizer's default lr filled in, for the reference functions."""
    return {"lr": BY_NAME[name].default_lr, **hyper}


def registered_names() -> set[str]:
    """Class names of every optimizer in the registry (what the table must cover)."""
    return {cls.__name__ for cls in OPTIMIZERS.values()}


#: Every rule an optimizer of the table runs, by rule name: what the fused tests cover
#: (a matrix_only optimizer's rule, with a matrix operation, in its own test file).
RULES: dict[str, Any] = {info.cls.rule.name: info.cls.rule for info in OPTIM_DB
                         if info.shared}

#: Each optimizer's ``rich`` options, by class name.
RICH: dict[str, dict] = {info.name: info.rich for info in OPTIM_DB if info.shared}
