"""Rule fragments: lines several rules share, written once and expanded into each rule.

A rule calling a fragment computes exactly what the same rule with the lines written out
computes, on the generic path and the fused kernels alike; the fragment's names never
collide with the rule's; a malformed fragment or call is refused when it is decorated.
"""

from __future__ import annotations

import ast
import importlib.util

import numpy as np
import pytest

from optim_core import Optimizer, RuleError, rule_fragment, update_rule
from optim_core.optim import rules

sqrt = lerp = None  # bound per backend inside rules


@rule_fragment
def momentum_of(grad, buffer, *, beta):
    t = beta * buffer  # 't' is also a name of the rules below: renamed apart
    buffer = t + (1 - beta) * grad
    return buffer


@rule_fragment
def flipped_and_decayed(param, grad, *, weight_decay, maximize):
    if maximize:
        grad = -grad
    if weight_decay != 0:
        param = param * (1 - weight_decay)
    return param, grad


@rule_fragment
def two_moments(grad, first, second, *, beta1, beta2):
    first = momentum_of(grad, first, beta=beta1)  # a fragment calling a fragment
    second = momentum_of(grad * grad, second, beta=beta2)
    return first, second


@update_rule
def with_fragments(param, grad, first, second, *, lr, beta1, beta2, eps, weight_decay,
                   maximize):
    t = lr / 2
    param, grad = flipped_and_decayed(param, grad, weight_decay=weight_decay,
                                      maximize=maximize)
    first, second = two_moments(grad, first, second, beta1=beta1, beta2=1 - (1 - beta2))
    param = param - (t + t) * first / (sqrt(second) + eps)
    return param, first, second


@update_rule
def written_out(param, grad, first, second, *, lr, beta1, beta2, eps, weight_decay,
                maximize):
    t = lr / 2
    if maximize:
        grad = -grad
    if weight_decay != 0:
        param = param * (1 - weight_decay)
    first = beta1 * first + (1 - beta1) * grad
    second = (1 - (1 - beta2)) * second + (1 - (1 - (1 - beta2))) * (grad * grad)
    param = param - (t + t) * first / (sqrt(second) + eps)
    return param, first, second


def _optimizer(rule):
    class TwoMoments(Optimizer):
        weight_decay_kind = "decoupled"

        def __init__(self, params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                     maximize=False, **options):
            super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                          weight_decay=weight_decay, maximize=maximize),
                             **options)

    TwoMoments.rule = rule
    return TwoMoments


def _run(rule, impl, dtype, **hyper):
    rng = np.random.default_rng(0)
    params = [np.asarray(rng.standard_normal(shape), dtype=dtype)
              for shape in ((7, 5), (300,), ())]
    opt = _optimizer(rule)(params, impl=impl, **hyper)
    for step in range(6):
        opt.step([np.asarray(np.sin(p * (step + 1)), dtype=dtype) for p in params])
    return opt.params, opt


@pytest.mark.parametrize("hyper", [{}, {"weight_decay": 0.1, "maximize": True}])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_rule_with_fragments_computes_what_it_computes_written_out(hyper, dtype):
    impls = ["generic", "fused"] if importlib.util.find_spec("numba") else ["generic"]
    for impl in impls:
        got, opt = _run(with_fragments, impl, dtype, **hyper)
        want, _ = _run(written_out, impl, dtype, **hyper)
        assert opt.implementation.name == ("generic" if impl == "generic" else "fused-numba")
        for a, b in zip(got, want, strict=True):
            assert a.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(a, b)


def test_the_expanded_source_renames_the_fragments_names_apart():
    source = with_fragments.source
    assert "flipped_and_decayed(" not in source and "two_moments(" not in source
    # Each call's names are its own: momentum_of's 't' twice (inside two_moments's
    # call), apart from each other and from the rule's own 't'.
    names = {n.id for n in ast.walk(with_fragments.tree) if isinstance(n, ast.Name)}
    assert {"two_moments_2_momentum_of_1_t", "two_moments_2_momentum_of_2_t", "t"} <= names
    assert source.count("t = lr / 2") == 1
    # The generic path runs the expanded lines (a fragment is never called at run time).
    with pytest.raises(RuntimeError, match="rule fragment"):
        momentum_of(np.ones(2), np.ones(2), beta=0.5)


def test_the_packaged_rules_share_their_preamble_and_moments_through_fragments():
    # Adam, NAdam and RAdam take the same decay and moments, written once.
    for rule in (rules.adam, rules.nadam, rules.radam):
        assert "decayed_1_grad" in rule.source and "adam_moments_2_exp_avg" in rule.source
    for rule in (rules.sgd, rules.adagrad, rules.rmsprop, rules.adadelta, rules.adamax):
        assert "l2_decayed_1_grad" in rule.source


def test_a_fragment_inside_an_if_is_expanded_there():
    @update_rule
    def maybe(param, grad, buffer, *, beta, use):
        if use:
            buffer = momentum_of(grad, buffer, beta=beta)
        param = param - buffer
        return param, buffer

    (branch,) = [n for n in maybe.tree.body if isinstance(n, ast.If)]
    assert "momentum_of(" not in maybe.source
    assert "buffer = momentum_of_1_buffer" in ast.unparse(branch.body[-1])


@pytest.mark.parametrize("source, message", [
    ("param, grad, extra = flipped_and_decayed(param, grad, weight_decay=lr, maximize=m)",
     "returns 2 value"),
    ("param = flipped_and_decayed(param, grad, weight_decay=lr, maximize=m)",
     "returns 2 value"),
    ("param, grad = flipped_and_decayed(param, weight_decay=lr, maximize=m)",
     "positionally"),
    ("param, grad = flipped_and_decayed(param, grad, weight_decay=lr)", "by keyword"),
    ("param, grad = flipped_and_decayed(param, grad, lr, weight_decay=lr, maximize=m)",
     "positionally"),
    ("param, grad = flipped_and_decayed(param, grad, weight_decay=lr, maximize=m, x=m)",
     "by keyword"),
])
def test_a_malformed_call_is_refused_at_its_line(tmp_path, source, message):
    path = tmp_path / "bad_call.py"
    path.write_text(
        "from test_rule_fragments import flipped_and_decayed\n"
        "from optim_core import update_rule\n\n\n"
        "@update_rule\n"
        "def bad(param, grad, *, lr, m):\n"
        f"    {source}\n"
        "    return (param,)\n")
    namespace = {"__name__": "bad_call", "__file__": str(path)}
    with pytest.raises(RuleError, match=message) as error:
        exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102
    assert f"{path}, line 7" in str(error.value)


def _fragment(body: str, tmp_path, signature: str = "(a, b, *, s)"):
    path = tmp_path / "fragment_case.py"
    path.write_text("from optim_core import rule_fragment\n\n\n@rule_fragment\n"
                    f"def case{signature}:\n" + "".join(f"    {line}\n" for line in body))
    exec(compile(path.read_text(), str(path), "exec"), {"__name__": "fragment_case"})  # noqa: S102


@pytest.mark.parametrize("body, message", [
    (["c = a + elsewhere", "return c"], "neither an argument nor assigned"),
    (["s = a + b", "return s"], "assigns its scalar arguments"),
    (["c = a + b"], "ends with 'return a, b'"),
    (["c = a + b", "return c + a"], "ends with 'return a, b'"),
    (["c = a + b", "return d"], "neither an argument nor assigned"),
    (["c = a[0]", "return c"], "indexing"),
    (["if a > 0:", "    a = b", "return a"], "an if may only test scalars"),
])
def test_a_fragment_outside_the_language_is_refused(tmp_path, body, message):
    with pytest.raises(RuleError, match=message):
        _fragment(body, tmp_path)


@pytest.mark.parametrize("signature", ["(*, s)", "(a, b=1, *, s)", "(a, *rest)"])
def test_a_fragment_takes_arrays_then_keyword_scalars_without_defaults(tmp_path, signature):
    with pytest.raises(RuleError, match="arguments are"):
        _fragment(["return a"], tmp_path, signature)


def test_a_calls_names_never_collide_with_names_the_rule_chose():
    @update_rule
    def crowded(param, grad, buffer, *, beta):
        momentum_of_1_t = grad * 2  # the name the first call's 't' would have taken
        buffer = momentum_of(momentum_of_1_t, buffer, beta=beta)
        param = param - buffer + momentum_of_1_t
        return param, buffer

    names = {n.id for n in ast.walk(crowded.tree) if isinstance(n, ast.Name)}
    assert "momentum_of_2_t" in names
    grad, buffer = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    new_param, new_buffer = crowded(np, np.zeros(2), grad, {"buffer": buffer}, {"beta": 0.5})
    np.testing.assert_array_equal(new_buffer, 0.5 * buffer + 0.5 * (2 * grad))
    np.testing.assert_array_equal(new_param, -new_buffer + 2 * grad)
