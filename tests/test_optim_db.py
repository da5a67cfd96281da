"""The optimizer table (optim_db.py) covers every registered optimizer and every branch."""

from __future__ import annotations

import ast

import numpy as np
import pytest
from fused_cases import STEPS, GenericStepRecorder, gradient, start_params
from optim_core.backends._lowering import _Lowering
from optim_db import ALL_NAMES, BY_NAME, OPTIM_DB, registered_names

import optim_core


def test_every_registered_optimizer_has_an_entry():
    assert set(ALL_NAMES) == registered_names()
    assert len(ALL_NAMES) == len(OPTIM_DB)  # one entry each
    for info in OPTIM_DB:
        assert getattr(optim_core, info.name) is info.cls  # public under its name
        assert info.name in optim_core.__all__
        assert info.reference_cases and info.fused_cases
        assert info.shared or info.tests  # its cases run somewhere


def test_torch_counterparts_exist():
    torch = pytest.importorskip("torch")
    for info in OPTIM_DB:
        if info.torch_name is not None:
            assert issubclass(getattr(torch.optim, info.torch_name), torch.optim.Optimizer)


def test_every_option_set_is_accepted():
    for info in OPTIM_DB:
        for hyper in (*info.reference_cases, *info.fused_cases, info.rich, info.resume,
                      info.parabola, info.rosenbrock[0]):
            info.make([np.ones((2, 3) if info.matrix_only else 2)], **hyper)


def _outcomes(name: str, hyper: dict) -> set[tuple[int, bool]]:
    """(id of an if test or lerp call, outcome) of every host decision the case's steps make."""
    params = start_params("float64")
    if BY_NAME[name].matrix_only:
        params = {"matrix": params["matrix"]}
    opt = getattr(optim_core, name)(params, **hyper, impl="generic")
    opt.implementation = recorder = GenericStepRecorder()
    for step in range(STEPS):
        opt.step({k: gradient(v, step) for k, v in params.items()})
    seen = set()
    for call in recorder.calls:
        lowering = _Lowering(call["rule"], call["scalars"], frozenset(call["states"][0]), False,
                             staged=True)
        lowering.run()
        for kind, node, outcome in lowering.trace:
            if kind in ("test", "lerp"):
                seen.add((id(node), outcome))
    return seen


# A shaped_states optimizer has no fused kernel whose specializations its fused cases
# would need to cover (tests/test_adafactor.py takes every branch against torch).
RULES = {info.cls.rule.name: info.cls.rule for info in OPTIM_DB if not info.shaped_states}


@pytest.mark.parametrize("rule_name", RULES)
def test_fused_cases_take_both_sides_of_every_branch(rule_name):
    # Over every optimizer running the rule (GD runs SGD's, AdamW Adam's with some flags
    # fixed), the fused cases take each side of each if and of each lerp.
    rule = RULES[rule_name]
    seen = set().union(*(_outcomes(info.name, hyper) for info in OPTIM_DB
                         if info.cls.rule is rule for hyper in info.fused_cases))
    decisions = [(statement.test, ast.unparse(statement.test))
                 for statement in ast.walk(rule.tree) if isinstance(statement, ast.If)]
    decisions += [(call.args[2], f"abs({ast.unparse(call.args[2])}) < 0.5")
                  for call in ast.walk(rule.tree)
                  if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "lerp"]
    missing = [f"{text} is {outcome}" for node, text in decisions for outcome in (True, False)
               if (id(node), outcome) not in seen]
    assert not missing, f"no fused case of rule {rule_name} has {missing}"
