"""Magnitude pruning: masks, the Zhu & Gupta schedule, exact zeros through every optimizer,
resume with the masks, sparse storage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optim_core import fit, models
from optim_core.optim.registry import OPTIMIZERS
from optim_core.train.pruning import (
    MagnitudePruning,
    layer_sparsity,
    load_sparse,
    magnitude_masks,
    polynomial_sparsity,
    save_sparse,
    sparsity,
    storage_bytes,
)

RNG = np.random.default_rng(11)
X = RNG.normal(size=(96, 6))
Y = (X[:, 0] + 0.5 * X[:, 1] - X[:, 2] > 0).astype(np.int64) + (X[:, 3] > 1).astype(np.int64)


# ----------------------------------------------------------------------------- masks

def test_masks_prune_exactly_the_share_asked_with_the_smallest_magnitudes(xp):
    weights = {"W0": xp.asarray(RNG.normal(size=(10, 7))), "W1": xp.asarray(RNG.normal(size=13))}
    for scope in ("layer", "global"):
        masks = magnitude_masks(weights, 0.6, scope=scope)
        host = {n: xp.to_numpy(m) for n, m in masks.items()}
        assert {n: m.shape for n, m in host.items()} == {"W0": (10, 7), "W1": (13,)}
        if scope == "layer":
            assert [int((~host[n]).sum()) for n in ("W0", "W1")] == [42, 8]
        else:
            assert int(sum((~m).sum() for m in host.values())) == round(0.6 * 83)
        for name, keep in host.items():
            if scope == "layer":
                magnitude = np.abs(xp.to_numpy(weights[name]))
                assert magnitude[keep].min() >= magnitude[~keep].max()
    together = np.concatenate([np.abs(xp.to_numpy(weights[n])).ravel() for n in weights])
    kept = np.concatenate([xp.to_numpy(m).ravel() for m in
                           magnitude_masks(weights, 0.6, scope="global").values()])
    assert together[kept].min() >= together[~kept].max()


def test_global_ranking_gives_more_of_the_budget_to_the_layer_of_larger_weights():
    weights = {"W0": RNG.normal(size=(20, 20)), "W1": 10 * RNG.normal(size=(20, 20))}
    masks = magnitude_masks(weights, 0.5, scope="global")
    assert masks["W1"].mean() > 0.85 and masks["W0"].mean() < 0.15
    per_layer = magnitude_masks(weights, 0.5, scope="layer")
    assert per_layer["W0"].mean() == per_layer["W1"].mean() == 0.5


def test_previous_masks_rank_first_so_a_rising_sparsity_only_grows_them():
    weights = {"W": RNG.normal(size=50)}
    first = magnitude_masks(weights, 0.3)
    # The weights move (a pruned one is not zero here, to make the point): a new mask
    # at a higher sparsity still prunes every entry the old one did.
    moved = {"W": weights["W"] + RNG.normal(size=50)}
    second = magnitude_masks(moved, 0.6, previous=first)
    assert not np.any(second["W"] & ~first["W"])
    assert int((~second["W"]).sum()) == 30


def test_ties_are_broken_by_position_so_masks_are_reproducible():
    weights = {"W": np.zeros(10)}
    keep = magnitude_masks(weights, 0.4)["W"]
    np.testing.assert_array_equal(keep, [False] * 4 + [True] * 6)


def test_the_polynomial_schedule_of_zhu_and_gupta():
    def at(step):
        return polynomial_sparsity(step, final=0.9, initial=0.1, begin_step=100, end_step=300)

    assert at(0) == 0.0 and at(99) == 0.0
    assert at(100) == pytest.approx(0.1)
    assert at(200) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5 ** 3)
    assert at(300) == at(1000) == 0.9
    values = [at(t) for t in range(100, 301, 10)]
    assert values == sorted(values)
    # Cubic: most of the pruning happens early.
    assert at(150) - at(100) > at(300) - at(250)


def test_bad_settings_are_refused_when_the_callback_is_made():
    with pytest.raises(ValueError, match="sparsity"):
        MagnitudePruning(1.0)
    with pytest.raises(ValueError, match="end_step"):
        MagnitudePruning(0.5, begin_step=10, end_step=10)
    with pytest.raises(ValueError, match="initial_sparsity"):
        MagnitudePruning(0.5, end_step=10, initial_sparsity=0.6)
    with pytest.raises(ValueError, match="scope"):
        MagnitudePruning(0.5, scope="row")
    with pytest.raises(ValueError, match="no parameters"):
        fit(models.MLP([6, 8, 3]), X, Y, epochs=1, progress=False, seed=0,
            callbacks=[MagnitudePruning(0.5, params=["W7"])])


# ----------------------------------------------------------------------------- through fit

#: Options turning on each optimizer's momentum-like state where it has one.
MOMENTUM = {"sgd": {"momentum": 0.9, "nesterov": True}, "rmsprop": {"momentum": 0.9,
            "centered": True}, "adam": {"amsgrad": True}, "dgd": {}}


def _trained_mlp(seed: int = 0) -> models.MLP:
    model = models.MLP([6, 16, 3])
    fit(model, X, Y, optimizer="adam", lr=0.01, epochs=3, batch_size=16, seed=seed,
        progress=False)
    return model


# Adafactor's factored states (one value per row and per column) are no per-weight state
# a mask could zero: it is left out.
@pytest.mark.parametrize("name", sorted(n for n, c in OPTIMIZERS.items()
                                        if not c.rule.state_shapes))
def test_pruned_weights_stay_exactly_zero_through_every_optimizer(name):
    # Pruning in the middle of the run (step 6, after the optimizer has built momentum
    # and moment estimates for every weight), with decoupled weight decay, an L2 term and
    # clipping on: the pruned weights and their optimizer state are zero at the end.
    model = _trained_mlp()
    pruner = MagnitudePruning(0.7, begin_step=6)
    before = {k: v.copy() for k, v in model.params.items()}
    history = fit(model, X, Y, optimizer=name, lr=0.01, epochs=3, batch_size=16, seed=1,
                  weight_decay=0.05, l2=1e-3, clip_norm=5.0, progress=False,
                  callbacks=[pruner], **MOMENTUM.get(name, {}))
    assert pruner.last_pruned_step == 6
    optimizer = history.optimizer
    # One group (Muon: its matrices and an AdamW group of the biases).
    assert sorted(n for g in optimizer.param_groups for n in g["names"]) == [
        "W0", "W1", "b0", "b1"]
    for group_names, group_states in zip([g["names"] for g in optimizer.param_groups],
                                         optimizer.state, strict=True):
        for param_name, state in zip(group_names, group_states, strict=True):
            if param_name not in pruner.masks:
                continue
            pruned = ~pruner.masks[param_name]
            assert pruned.mean() > 0.5
            assert np.all(model.params[param_name][pruned] == 0), param_name
            for key, buffer in state.items():
                assert np.all(buffer[pruned] == 0), (param_name, key)
            kept = ~pruned
            assert not np.array_equal(model.params[param_name][kept],
                                      before[param_name][kept]), "the kept weights train"
    assert sparsity(model.params) == pytest.approx(0.7, abs=0.005)  # 101 of 144
    assert np.array_equal(model.params["b0"] != 0, before["b0"] != 0)  # biases never pruned


def test_clipping_sees_the_masked_networks_gradient():
    # The masks come first in the step: the global norm is the masked gradients' norm. A
    # hand-written loop doing that, full batch, gives the same weights.
    model = _trained_mlp()
    start = {k: v.copy() for k, v in model.params.items()}
    pruner = MagnitudePruning(0.6)
    fit(model, X, Y, optimizer="sgd", lr=0.1, momentum=0.9, epochs=5, clip_norm=0.05,
        progress=False, seed=0, callbacks=[pruner])

    from optim_core import SGD, regularization

    manual = models.MLP([6, 16, 3])
    masks = magnitude_masks({n: start[n] for n in ("W0", "W1")}, 0.6)
    manual.params = {k: v.copy() for k, v in start.items()}
    optimizer = SGD(manual.params, lr=0.1, momentum=0.9)
    for step in range(5):
        _, grads = manual.loss_and_grad(X, Y)
        if step == 0:  # the pruning step: its gradient was taken before the weights were cut
            for name, keep in masks.items():
                manual.params[name] *= keep
        grads = {k: (g * masks[k] if k in masks else g) for k, g in grads.items()}
        optimizer.step(regularization.clip_by_global_norm(grads, 0.05)[0])
        for name, keep in masks.items():
            manual.params[name] *= keep
    for name in start:
        np.testing.assert_allclose(model.params[name], manual.params[name], rtol=1e-12,
                                   atol=1e-15)


def test_gradual_pruning_follows_the_schedule_and_its_masks_only_grow():
    model = _trained_mlp()
    steps_per_epoch = math.ceil(X.shape[0] / 16)
    pruner = MagnitudePruning(0.8, end_step=4 * steps_per_epoch, frequency=steps_per_epoch)
    seen = []

    class Record:
        def on_epoch_end(self, epoch, logs, model):
            seen.append((sparsity(model.params), pruner.current_sparsity,
                         {n: m.copy() for n, m in pruner.masks.items()}))

    fit(model, X, Y, optimizer="sgd", lr=0.05, momentum=0.9, epochs=6, batch_size=16, seed=0,
        progress=False, callbacks=[pruner, Record()])
    expected = [polynomial_sparsity(epoch * steps_per_epoch, final=0.8, begin_step=0,
                                    end_step=4 * steps_per_epoch) for epoch in range(6)]
    # The last pruning of each epoch was at its first step: the schedule at that step.
    assert [round(target, 6) for _, target, _ in seen] == [round(e, 6) for e in expected]
    for (zeros, target, _), _ in zip(seen, expected, strict=True):
        assert zeros == pytest.approx(target, abs=0.01)
    for (_, _, earlier), (_, _, later) in zip(seen, seen[1:]):
        for name in earlier:
            assert not np.any(later[name] & ~earlier[name])
    assert seen[-1][0] == pytest.approx(0.8, abs=0.005)


def test_one_shot_pruning_of_a_trained_model_then_fine_tuning_keeps_the_masks():
    model = _trained_mlp()
    pruner = MagnitudePruning(0.5, scope="layer")
    fit(model, X, Y, optimizer="adam", lr=0.01, epochs=2, batch_size=16, seed=0,
        progress=False, callbacks=[pruner])
    assert pruner.last_pruned_step == 0
    assert layer_sparsity(model.params) == {"W0": 0.5, "W1": pytest.approx(0.5)}
    # Fitting on with the same callback: the model stays pruned to the same masks.
    masks = {n: m.copy() for n, m in pruner.masks.items()}
    fit(model, X, Y, optimizer="adam", lr=0.01, epochs=1, batch_size=16, seed=0,
        progress=False, callbacks=[pruner])
    for name, keep in masks.items():
        np.testing.assert_array_equal(pruner.masks[name], keep)
        assert np.all(model.params[name][~keep] == 0)


def test_resume_continues_with_the_masks_bit_for_bit(tmp_path):
    start = _trained_mlp()
    options = dict(optimizer="adam", lr=0.01, batch_size=16, seed=3, progress=False)

    def pruner():
        return MagnitudePruning(0.75, end_step=20, frequency=6)

    straight = models.MLP([6, 16, 3])
    straight.params = {k: v.copy() for k, v in start.params.items()}
    reference = pruner()
    fit(straight, X, Y, epochs=5, callbacks=[reference], **options)

    path = tmp_path / "run.ckpt"
    interrupted = models.MLP([6, 16, 3])
    interrupted.params = {k: v.copy() for k, v in start.params.items()}
    fit(interrupted, X, Y, epochs=2, callbacks=[pruner()], checkpoint=path, **options)
    resumed = models.MLP([6, 16, 3])  # a new process: new model, new callback
    resumed.params = {k: v.copy() for k, v in start.params.items()}
    again = pruner()
    fit(resumed, X, Y, epochs=5, callbacks=[again], checkpoint=path, resume=True, **options)
    for name in straight.params:
        np.testing.assert_array_equal(resumed.params[name], straight.params[name])
    for name, keep in reference.masks.items():
        np.testing.assert_array_equal(again.masks[name], keep)
    assert again.current_sparsity == reference.current_sparsity == 0.75


def test_a_checkpointed_state_is_checked_before_it_is_loaded():
    pruner = MagnitudePruning(0.5)
    with pytest.raises(ValueError, match="lacks"):
        pruner.load_state_dict({"masks": None})
    with pytest.raises(TypeError, match="boolean"):
        pruner.load_state_dict({"masks": {"W0": np.ones(3)}, "current_sparsity": 0.5,
                                "last_pruned_step": 0})
    assert pruner.state_dict() == {"masks": None, "current_sparsity": 0.0,
                                   "last_pruned_step": None}


def test_pruning_runs_on_every_array_library(xp):
    model = models.MLP([6, 8, 3])
    X_, Y_ = xp.asarray(X), xp.xp.asarray(Y)
    pruner = MagnitudePruning(0.6, begin_step=2)
    fit(model, X_, Y_, optimizer="adam", lr=0.01, epochs=2, batch_size=32, seed=0,
        progress=False, callbacks=[pruner], impl="generic")
    for name, keep in pruner.masks.items():
        values = xp.to_numpy(model.params[name])
        assert np.all(values[~xp.to_numpy(keep)] == 0)
    assert sparsity(model.params) == pytest.approx(0.6, abs=0.01)


# ----------------------------------------------------------------------------- storage

def test_the_sparse_file_round_trips_exactly_and_is_smaller(tmp_path):
    weights = RNG.normal(size=(64, 128)).astype(np.float32)
    weights[magnitude_masks({"W": weights}, 0.9)["W"] == 0] = 0
    weights[0, 0] = -0.0
    params = {"W0": weights, "b0": RNG.normal(size=128).astype(np.float32)}
    path = save_sparse(tmp_path / "model.sparse", params)
    back = load_sparse(path)
    assert list(back) == ["W0", "b0"]
    for name in params:
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], params[name])
    sizes = storage_bytes(params)
    assert sizes["raw"] == 64 * 128 * 4 + 128 * 4
    assert sizes["sparse_compressed"] == path.stat().st_size
    # 10% of the weights kept: a bit per weight plus the kept values, a quarter of the raw.
    assert sizes["sparse_compressed"] < sizes["raw"] / 4
    assert sizes["sparse_compressed"] < sizes["dense_compressed"]


def test_a_damaged_sparse_file_is_refused(tmp_path):
    path = save_sparse(tmp_path / "m.sparse", {"W": np.array([[0.0, 1.5], [2.0, 0.0]])})
    data = path.read_bytes()
    for damaged, message in [(b"not a sparse file", "not an optim-core sparse file"),
                             (data[:-3], "does not match"),
                             (data + b"extra", "does not match"),
                             (data.replace(b'"nonzeros":2', b'"nonzeros":3'), "does not match"),
                             (data.replace(b'"shape":[2,2]', b'"shape":[4,4]'),
                              "does not match")]:
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=message):
            load_sparse(path)
