"""The rule language: what a rule may contain, and that every backend runs one definition."""

from __future__ import annotations

import numpy as np
import pytest
from optim_core.backends import OPERATIONS, generic_operations
from optim_db import RULES

from optim_core.optim import rules
from optim_core.optim.language import update_rule


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
    ("    for i in range(3):\n        param = param", "For"),
    ("    if param > 0:\n        param = param", "only test scalars"),
    ("    param, s = s, param", "one plain name"),
    ("    param = param ** 2", "Pow"),
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
