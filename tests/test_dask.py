"""Dask arrays in fit and the models: NumPy's numbers, on a cluster, out of core.

Parameters stay NumPy arrays in the driver; each step is one distributed reduction
over the chunks. Full-batch training must give NumPy's parameters (float64, 1e-8
relative), a LocalCluster of worker processes must give the same, and data larger
than the workers' memory limit must train without a worker running out of memory.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from optim_core import EarlyStopping, fit, models
from optim_core import dask_support as ds

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

CHUNK = 97  # rows per chunk: batches and chunks never line up


def _regression(n=600, d=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, X @ rng.normal(size=d) + 0.3 + 0.1 * rng.normal(size=n)


def _classification(n=600, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, np.argmax(X @ rng.normal(size=(d, k)) + 0.3 * rng.normal(size=(n, k)), axis=1)


def _chunked(*arrays, rows=CHUNK):
    return tuple(da.from_array(a, chunks=(rows,) + a.shape[1:]) for a in arrays)


def _max_relative_difference(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]) / np.maximum(np.abs(a[k]), 1e-300)))
               for k in a)


MODELS = {
    "linear": (lambda: models.LinearRegression(5), _regression),
    "logistic": (lambda: models.LogisticRegression(5),
                 lambda: (_classification(k=2)[0], _classification(k=2)[1])),
    "softmax": (lambda: models.SoftmaxRegression(5, 3), _classification),
    "mlp": (lambda: models.MLP([5, 16, 3], activation="tanh"), _classification),
    "mlp-regression": (lambda: models.MLP([5, 8, 1], task="regression"), _regression),
}


# --------------------------------------------------------------------------- equality
@pytest.mark.parametrize("optimizer,lr", [("gd", 0.1), ("adam", 0.01)])
@pytest.mark.parametrize("name", MODELS)
def test_full_batch_training_gives_numpys_parameters(name, optimizer, lr):
    make_model, make_data = MODELS[name]
    X, y = make_data()
    reference, on_dask = make_model(), make_model()
    expected = fit(reference, X, y, optimizer=optimizer, lr=lr, epochs=15, seed=1,
                   progress=False)
    history = fit(on_dask, *_chunked(X, y), optimizer=optimizer, lr=lr, epochs=15, seed=1,
                  progress=False)
    assert all(type(p) is np.ndarray for p in on_dask.params.values())
    assert _max_relative_difference(reference.params, on_dask.params) < 1e-8
    np.testing.assert_allclose(history.train_loss, expected.train_loss, rtol=1e-8)
    np.testing.assert_allclose(history.train_metric, expected.train_metric, rtol=1e-8)


def test_unshuffled_minibatches_are_numpys_slices():
    X, y = _classification()
    reference, on_dask = models.SoftmaxRegression(5, 3), models.SoftmaxRegression(5, 3)
    fit(reference, X, y, optimizer="adam", lr=0.01, epochs=3, batch_size=130, shuffle=False,
        seed=0, progress=False)
    history = fit(on_dask, *_chunked(X, y), optimizer="adam", lr=0.01, epochs=3,
                  batch_size=130, shuffle=False, seed=0, progress=False)
    assert history.steps == 3 * 5  # 130 rows a batch, the fifth one 80
    assert _max_relative_difference(reference.params, on_dask.params) < 1e-8


def test_the_loss_and_gradient_of_a_batch_are_numpys():
    X, y = _classification()
    model = models.MLP([5, 16, 3])
    model.init_params(X, seed=0)
    loss, grads = model.loss_and_grad(X, y)
    dask_loss, dask_grads = model.loss_and_grad(*_chunked(X, y))
    assert dask_loss == pytest.approx(loss, rel=1e-12)
    assert all(type(g) is np.ndarray and g.flags.writeable for g in dask_grads.values())
    assert _max_relative_difference(grads, dask_grads) < 1e-10


def test_validation_data_and_early_stopping_work_on_dask():
    X, y = _regression()
    X_val, y_val = _regression(n=200, seed=1)
    model = models.LinearRegression(5)
    stopper = EarlyStopping(monitor="val_loss", patience=2, restore_best=True)
    history = fit(model, *_chunked(X, y), optimizer="adam", lr=0.5, epochs=40,
                  validation_data=_chunked(X_val, y_val), callbacks=[stopper], seed=0,
                  progress=False)
    assert history.val_loss[-1] is not None
    assert model.loss(X_val, y_val) == pytest.approx(min(history.val_loss), rel=1e-12)


# --------------------------------------------------------------------------- mini-batches
def test_epoch_order_shuffles_chunks_then_rows_within_each():
    chunks = (4, 3, 5, 2)
    order = ds.epoch_order(np.random.default_rng([7, 1, 1]), chunks)
    assert sorted(order) == list(range(14))
    starts = np.cumsum((0,) + chunks)
    chunk_of = np.searchsorted(starts, order, side="right") - 1
    runs = [chunk_of[0]] + [c for prev, c in zip(chunk_of, chunk_of[1:]) if c != prev]
    assert sorted(runs) == [0, 1, 2, 3]  # each chunk's rows come together
    again = ds.epoch_order(np.random.default_rng([7, 1, 1]), chunks)
    other = ds.epoch_order(np.random.default_rng([7, 1, 2]), chunks)
    assert np.array_equal(order, again) and not np.array_equal(order, other)


def test_a_shuffled_batch_reads_only_the_chunks_it_needs():
    features = _regression(n=1000)[0]
    X, y = _chunked(features, features[:, 0].copy(), rows=100)
    batch_size = 150
    rng = np.random.default_rng(0)
    seen = []
    for X_batch, y_batch in ds.batches(X, y, batch_size, True, rng):
        (culled,) = dask.optimize(X_batch)  # the tasks a compute of the batch would run
        graph = dict(culled.__dask_graph__())
        source_chunks = {key for key in graph if isinstance(key, tuple)
                         and key[0] == X.name}
        assert len(source_chunks) <= batch_size // 100 + 2
        rows, targets = dask.compute(X_batch, y_batch)
        np.testing.assert_array_equal(targets, rows[:, 0])  # y's rows are X's rows
        seen.append(rows)
    rows = np.concatenate(seen)
    assert rows.shape == (1000, 5)
    # Every row exactly once in the epoch.
    np.testing.assert_array_equal(np.sort(rows[:, 0]), np.sort(X.compute()[:, 0]))


def test_shuffled_minibatches_train_and_repeat_with_the_seed():
    X, y = _chunked(*_classification(n=900))
    runs = []
    for _ in range(2):
        model = models.SoftmaxRegression(5, 3)
        history = fit(model, X, y, optimizer="adam", lr=0.05, epochs=4, batch_size=128,
                      seed=3, progress=False)
        runs.append((history, model.params))
    assert runs[0][0].train_loss == runs[1][0].train_loss
    assert runs[0][0].train_loss[-1] < 0.5 * runs[0][0].train_loss[0]
    assert runs[0][0].train_metric[-1] > 0.8


def test_dropout_on_dask_trains_and_is_reproducible():
    X, y = _chunked(*_classification())
    params = []
    for _ in range(2):
        model = models.MLP([5, 16, 3], dropout=0.3)
        fit(model, X, y, optimizer="adam", lr=0.02, epochs=3, seed=5, progress=False)
        params.append(model.params)
    assert _max_relative_difference(*params) == 0.0


# --------------------------------------------------------------------------- models
def test_predictions_are_lazy_and_keep_the_parameters_they_were_made_with():
    X, y = _classification()
    X_d, y_d = _chunked(X, y)
    model = models.SoftmaxRegression(5, 3)
    fit(model, X_d, y_d, optimizer="adam", lr=0.01, epochs=1, seed=0, progress=False)
    labels, proba = model.predict(X_d), model.predict_proba(X_d)
    assert ds.is_dask_array(labels) and ds.is_dask_array(proba)
    expected = model.predict_proba(X)
    fit(model, X_d, y_d, optimizer="gd", lr=1.0, epochs=3, seed=0, progress=False)
    np.testing.assert_allclose(proba.compute(), expected, rtol=1e-12)
    np.testing.assert_array_equal(labels.compute(), np.argmax(expected, axis=1))
    assert model.score(X_d, y_d) == pytest.approx(model.score(X, y), rel=1e-12)


def test_init_params_on_dask_data_creates_numpy_parameters():
    X_d, _ = _chunked(*_regression())
    model = models.MLP([5, 4, 1], task="regression")
    params = model.init_params(X_d.astype(np.float32), seed=0)
    assert all(type(p) is np.ndarray and p.dtype == np.float32 for p in params.values())


def _cupy():
    cupy = pytest.importorskip("cupy")
    try:
        present = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device
        present = False
    if not present:
        pytest.skip("no CUDA GPU")
    return cupy


def test_cupy_chunks_train_cupy_parameters_to_numpys_numbers():
    cupy = _cupy()
    X, y = _classification(n=2000)
    X_gpu = da.from_array(cupy.asarray(X), chunks=(250, 5))
    y_gpu = da.from_array(cupy.asarray(y), chunks=250)
    reference, on_gpu = models.MLP([5, 16, 3]), models.MLP([5, 16, 3])
    expected = fit(reference, X, y, optimizer="adam", lr=0.02, epochs=10, seed=0,
                   progress=False)
    history = fit(on_gpu, X_gpu, y_gpu, optimizer="adam", lr=0.02, epochs=10, seed=0,
                  progress=False)
    assert all(isinstance(p, cupy.ndarray) for p in on_gpu.params.values())
    on_host = {name: cupy.asnumpy(p) for name, p in on_gpu.params.items()}
    assert _max_relative_difference(reference.params, on_host) < 1e-8
    np.testing.assert_allclose(history.train_metric, expected.train_metric, rtol=1e-8)
    assert on_gpu.score(X_gpu, y_gpu) == pytest.approx(reference.score(X, y), rel=1e-12)
    proba = on_gpu.predict_proba(X_gpu).compute()
    assert isinstance(proba, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(proba), reference.predict_proba(X), rtol=1e-8)
    shuffled = fit(models.SoftmaxRegression(5, 3), X_gpu, y_gpu, optimizer="adam", lr=0.05,
                   epochs=3, batch_size=300, seed=0, progress=False)
    assert shuffled.train_loss[-1] < shuffled.train_loss[0]


# --------------------------------------------------------------------------- validation
def test_dask_x_with_numpy_y_is_refused():
    X, y = _regression()
    with pytest.raises(TypeError, match="both be Dask arrays"):
        fit(models.LinearRegression(5), _chunked(X)[0], y, progress=False)


def test_unknown_chunk_sizes_are_refused_with_the_fix():
    X, y = _chunked(*_regression())
    X_unknown = X[X[:, 0] > -100]
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        fit(models.LinearRegression(5), X_unknown, y, progress=False)


def test_without_dask_the_error_says_what_to_install(monkeypatch):
    X, y = _chunked(*_regression())
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.array", None)
    with pytest.raises(ImportError, match=r"pip install 'optim-core\[dask\]'"):
        fit(models.LinearRegression(5), X, y, progress=False)


def test_too_old_a_dask_is_refused_with_the_same_hint(monkeypatch):
    monkeypatch.setattr(dask, "__version__", "2023.12.1")
    with pytest.raises(ImportError, match=r"2023\.12\.1 is too old.*optim-core\[dask\]"):
        ds.require_dask()


def test_the_library_imports_and_trains_without_dask():
    script = textwrap.dedent("""
        import sys
        sys.modules["dask"] = None  # as if it were not installed
        import numpy as np
        from optim_core import fit, models
        X = np.random.default_rng(0).normal(size=(50, 3))
        history = fit(models.LinearRegression(3), X, X.sum(axis=1), optimizer="gd", lr=0.1,
                      epochs=5, seed=0, progress=False)
        assert history.train_loss[-1] < history.train_loss[0]
        assert not [m for m in sys.modules if m.startswith("dask") and sys.modules[m]]
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --------------------------------------------------------------------------- cluster
# Per worker: ~65 MB for the interpreter, Dask and NumPy, the rest for a few chunks.
WORKER_MEMORY_LIMIT = 200 * 2**20


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       memory_limit=WORKER_MEMORY_LIMIT,
                                       dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        yield client


def _peak_worker_memory(client):
    """The largest resident set size each worker process reached, in bytes."""
    # Defined here, so it is sent by value: the workers cannot import this module.
    def _peak_rss() -> int:
        """The largest resident set size of this process, in bytes (Linux: VmHWM).

        Not ``ru_maxrss``: across fork and exec it keeps the parent's peak, so a worker
        spawned by a large process would report the parent's memory.
        """
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    return client.run(_peak_rss)


def test_on_a_cluster_full_batch_gives_numpys_parameters(client):
    X, y = _classification(n=2000)
    X_d, y_d = dask.persist(*_chunked(X, y, rows=250))
    reference, on_cluster = models.MLP([5, 16, 3]), models.MLP([5, 16, 3])
    fit(reference, X, y, optimizer="adam", lr=0.02, epochs=10, seed=0, progress=False)
    fit(on_cluster, X_d, y_d, optimizer="adam", lr=0.02, epochs=10, seed=0, progress=False)
    assert _max_relative_difference(reference.params, on_cluster.params) < 1e-8
    # Both workers took part: the persisted chunks are spread over them.
    assert len(client.who_has(X_d)) == 8
    assert len({w for holders in client.who_has(X_d).values() for w in holders}) == 2


def test_on_a_cluster_a_npy_file_is_read_chunk_by_chunk(client, tmp_path):
    X, y = _regression(n=20_000, d=20)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    X_d = ds.read_npy(tmp_path / "X.npy", chunk_rows=3000)
    y_d = ds.read_npy(tmp_path / "y.npy", chunk_rows=3000)
    assert X_d.numblocks == (7, 1)
    reference, on_cluster = models.LinearRegression(20), models.LinearRegression(20)
    fit(reference, X, y, optimizer="gd", lr=0.3, epochs=5, seed=0, progress=False)
    fit(on_cluster, X_d, y_d, optimizer="gd", lr=0.3, epochs=5, seed=0, progress=False)
    assert _max_relative_difference(reference.params, on_cluster.params) < 1e-8


def test_out_of_core_data_larger_than_the_workers_memory_trains(client):
    # 600 MB of float64 features, generated chunk by chunk (8 MB each) at every pass:
    # 1.4 times the two workers' limits together. Two epochs of three large mini-batches.
    n_samples, n_features = 750_000, 100
    X, y, _ = ds.synthetic(n_samples, n_features, chunk_rows=10_000, seed=0)
    assert X.nbytes > 1.4 * 2 * WORKER_MEMORY_LIMIT
    workers = set(client.scheduler_info()["workers"])
    model = models.LinearRegression(n_features)
    history = fit(model, X, y, optimizer="gd", lr=0.5, epochs=2, batch_size=n_samples // 3,
                  seed=0, progress=False)
    assert history.steps == 6
    # From zero weights (R^2 = 0) to the teacher (R^2 = 1 - MSE / Var(y), noise 0.1).
    assert history.train_loss[1] < 0.1 * history.train_loss[0]
    assert history.train_metric[1] > 0.95
    # No worker was lost or restarted, and none went past its limit.
    assert set(client.scheduler_info()["workers"]) == workers
    peaks = _peak_worker_memory(client)
    assert max(peaks.values()) < WORKER_MEMORY_LIMIT, peaks
    print(f"\nout-of-core: {X.nbytes / 2**20:.0f} MiB, limit {WORKER_MEMORY_LIMIT / 2**20:.0f} "
          f"MiB per worker, peak {max(peaks.values()) / 2**20:.0f} MiB, "
          f"epochs {history.time[0]:.1f} s and {history.time[1]:.1f} s")
