"""Checkpoints: exact round trips, clear errors on bad files, and no code run on load."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from optim_db import OPTIM_DB

import optim_core
from optim_core import CheckpointError, load_checkpoint, save_checkpoint


def assert_same_tree(actual, expected):
    """Same structure and types (dict order included); arrays equal bit for bit."""
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray)
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        assert actual.tobytes() == np.ascontiguousarray(expected).tobytes()
    elif isinstance(expected, dict):
        assert type(actual) is dict and list(actual) == list(expected)
        for key in expected:
            assert_same_tree(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same_tree(a, e)
    elif isinstance(expected, float) and math.isnan(expected):
        assert type(actual) is float and math.isnan(actual)
    else:
        assert type(actual) is type(expected)
        assert actual == expected
        if isinstance(expected, float):
            assert math.copysign(1, actual) == math.copysign(1, expected)


def sample_tree():
    rng = np.random.default_rng(0)
    return {
        "params": [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5)],
        "epoch": 3,
        "step": 2**80 + 1,
        "scalars": [0.1, -0.0, float("nan"), float("inf"), -float("inf"), 1e-310],
        "flags": [True, False, None],
        "betas": (0.9, 0.999),
        "name": "Adam \N{GREEK SMALL LETTER ALPHA}",
        "nested": {"empty_list": [], "empty_dict": {}, "empty_tuple": ()},
        "special": [np.zeros((0, 3)), np.array(7.5), np.arange(6, dtype=np.int64),
                    np.array([True, False]), np.array([1 + 2j], dtype=np.complex64)],
    }


def test_round_trip_keeps_structure_scalars_and_arrays_exactly(tmp_path):
    tree = sample_tree()
    save_checkpoint(tmp_path / "ckpt", tree)
    assert_same_tree(load_checkpoint(tmp_path / "ckpt"), tree)


def _array_strategy():
    dtypes = ["float16", "float32", "float64", "int8", "int64", "uint16", "bool", "complex64"]
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
    native = st.sampled_from(dtypes).flatmap(lambda dtype: hnp.arrays(dtype, shapes))
    try:
        import ml_dtypes
    except ImportError:
        return native
    bfloat16 = hnp.arrays("uint16", shapes).map(lambda bits: bits.view(ml_dtypes.bfloat16))
    return st.one_of(native, bfloat16)


TREES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
              _array_strategy()),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=16)


@settings(max_examples=80, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tree=TREES)
def test_any_tree_round_trips_exactly(tmp_path, tree):
    save_checkpoint(tmp_path / "c", tree)
    assert_same_tree(load_checkpoint(tmp_path / "c"), tree)


def test_saves_to_the_exact_path_and_leaves_no_temporary_files(tmp_path):
    save_checkpoint(str(tmp_path / "run.ckpt"), {"a": np.ones(2)})
    save_checkpoint(str(tmp_path / "run.ckpt"), {"a": np.zeros(2)})
    assert os.listdir(tmp_path) == ["run.ckpt"]
    assert_same_tree(load_checkpoint(tmp_path / "run.ckpt"), {"a": np.zeros(2)})


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_float_dtypes_are_kept_bit_for_bit(tmp_path, dtype):
    bits = np.array([0, 1, 0x3C00, 0x7C00, 0xFC00, 0x7E01, 0x8000, 0x7BFF])
    values = bits.astype(f"u{np.dtype(dtype).itemsize}").view(dtype)  # NaN payloads included
    save_checkpoint(tmp_path / "c", [values, values[::-2]])
    loaded = load_checkpoint(tmp_path / "c")
    assert_same_tree(loaded, [values, values[::-2].copy()])


def test_bfloat16_is_kept_bit_for_bit(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = np.arange(0, 2**16, 97, dtype=np.uint16)  # every exponent, NaNs and infinities
    values = bits.view(ml_dtypes.bfloat16)
    save_checkpoint(tmp_path / "c", {"w": values, "w0d": values[3:4].reshape(())})
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded["w"].dtype == ml_dtypes.bfloat16
    assert loaded["w"].view(np.uint16).tolist() == bits.tolist()
    assert loaded["w0d"].shape == () and loaded["w0d"].view(np.uint16) == bits[3]


def test_torch_tensors_of_every_float_dtype_save_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    source = torch.randn(4, 3, dtype=torch.float64)
    tree = {name: source.to(getattr(torch, name))
            for name in ("float16", "bfloat16", "float32", "float64")}
    tree["strided"] = source.to(torch.bfloat16).t()
    save_checkpoint(tmp_path / "c", tree)
    loaded = load_checkpoint(tmp_path / "c")
    for name in ("float16", "float32", "float64"):
        assert loaded[name].dtype == np.dtype(name)
        assert np.array_equal(loaded[name], tree[name].numpy())
    for name in ("bfloat16", "strided"):
        assert loaded[name].dtype == ml_dtypes.bfloat16
        expected = tree[name].contiguous().view(torch.int16).numpy().view(np.uint16)
        assert loaded[name].view(np.uint16).tolist() == expected.tolist()


def test_array_api_strict_arrays_save(tmp_path):
    xps = pytest.importorskip("array_api_strict")
    save_checkpoint(tmp_path / "c", [xps.asarray([1.0, 2.0], dtype=xps.float32)])
    loaded = load_checkpoint(tmp_path / "c")
    assert_same_tree(loaded, [np.array([1.0, 2.0], dtype=np.float32)])


def test_numpy_scalars_come_back_as_zero_d_arrays(tmp_path):
    save_checkpoint(tmp_path / "c", [np.float32(1.5), np.int64(-3), np.bool_(True)])
    loaded = load_checkpoint(tmp_path / "c")
    assert_same_tree(loaded, [np.array(1.5, np.float32), np.array(-3), np.array(True)])


def test_loaded_arrays_are_writeable_copies(tmp_path):
    params = [np.ones(3)]
    save_checkpoint(tmp_path / "c", params)
    params[0][:] = 5
    loaded = load_checkpoint(tmp_path / "c")
    loaded[0][0] = 2.0  # must not raise
    assert loaded[0].tolist() == [2.0, 1.0, 1.0]


def test_identical_trees_give_identical_files(tmp_path):
    save_checkpoint(tmp_path / "a", sample_tree())
    save_checkpoint(tmp_path / "b", sample_tree())
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_file_is_an_npz_numpy_reads_without_pickle(tmp_path):
    tree = {"w": np.arange(4.0)}
    save_checkpoint(tmp_path / "c.npz", tree)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as npz:
        assert np.array_equal(npz["array_0"], tree["w"])
    with zipfile.ZipFile(tmp_path / "c.npz") as zf:
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["format"] == "optim-core-checkpoint"
    assert manifest["arrays"] == [{"dtype": "<f8", "storage": "<f8", "shape": [4]}]


def test_optimizer_state_dict_round_trips_and_resumes(tmp_path):
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal(5), "b": rng.standard_normal(2).astype(np.float32)}
    opt = optim_core.Adam(params, lr=0.01, amsgrad=True)
    for _ in range(3):
        opt.step({k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()})
    save_checkpoint(tmp_path / "c", {"params": params, "optimizer": opt.state_dict(),
                                     "epoch": 3})
    loaded = load_checkpoint(tmp_path / "c")
    assert_same_tree(loaded["optimizer"], opt.state_dict())
    assert loaded["epoch"] == 3
    restored_params = loaded["params"]
    restored = optim_core.Adam(restored_params, lr=0.5)
    restored.load_state_dict(loaded["optimizer"])
    grads = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
    opt.step(grads)
    restored.step(grads)
    assert_same_tree(restored_params, params)


@pytest.mark.parametrize("bad, where", [
    ({"a": {1, 2}}, "tree['a']"),
    ({"a": [object()]}, "tree['a'][0]"),
    ({1: 2}, "dict keys must be str"),
    ({"a": np.array(["text"])}, "dtype <U4"),
    ({"a": np.array([None], dtype=object)}, "dtype object"),
    ({"a": b"bytes"}, "bytes"),
])
def test_unsupported_content_is_refused_before_writing(tmp_path, bad, where):
    with pytest.raises(TypeError, match=re.escape(where)):
        save_checkpoint(tmp_path / "c", bad)
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "c", {"version": 1})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "c", {"version": 2, "bad": {1}})
    assert load_checkpoint(tmp_path / "c") == {"version": 1}
    assert os.listdir(tmp_path) == ["c"]


# --------------------------------------------------------------------------- bad files
def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing")


def test_every_truncation_is_detected(tmp_path):
    save_checkpoint(tmp_path / "c", sample_tree())
    data = (tmp_path / "c").read_bytes()
    for length in sorted({0, 1, 3, 4, 50, 200, *range(len(data) - 120, len(data))}):
        (tmp_path / "t").write_bytes(data[:length])
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / "t")


def test_every_single_flipped_byte_is_detected(tmp_path):
    save_checkpoint(tmp_path / "c", {"w": np.arange(3.0, dtype=np.float32), "step": 7})
    data = (tmp_path / "c").read_bytes()
    for i in range(len(data)):
        corrupt = bytearray(data)
        corrupt[i] ^= 0x10
        (tmp_path / "x").write_bytes(bytes(corrupt))
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / "x")


@pytest.mark.parametrize("content", [
    b"", b"hello world", os.urandom(4096), b"PK\x03\x04" + os.urandom(500),
    pickle.dumps({"a": 1}), b"\x93NUMPY" + os.urandom(100),
], ids=["empty", "text", "random", "zip-magic-random", "pickle", "npy-magic"])
def test_foreign_files_raise_checkpoint_error(tmp_path, content):
    (tmp_path / "f").write_bytes(content)
    with pytest.raises(CheckpointError, match="not an optim-core checkpoint|truncated"):
        load_checkpoint(tmp_path / "f")


def test_a_plain_npz_is_not_a_checkpoint(tmp_path):
    np.savez(tmp_path / "plain.npz", w=np.ones(3))
    with pytest.raises(CheckpointError, match="no optim-core checksum"):
        load_checkpoint(tmp_path / "plain.npz")


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def _forge(path, members: dict[str, bytes]) -> None:
    """A file with a valid checksum trailer around arbitrary members: what an attacker can make."""
    from optim_core import checkpoint

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.comment = checkpoint._CHECKSUM_PREFIX + b"0" * 64
        for name, data in members.items():
            zf.writestr(name, data)
    data = bytearray(buffer.getvalue())
    import hashlib

    data[-64:] = hashlib.sha256(bytes(data[:-64])).hexdigest().encode()
    path.write_bytes(bytes(data))


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _manifest(arrays) -> bytes:
    return json.dumps({"format": "optim-core-checkpoint", "version": 1,
                       "tree": {"array": 0}, "arrays": arrays}).encode()


def test_object_array_with_a_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    np.save(payload, np.array([_Exploit(str(marker))], dtype=object), allow_pickle=True)
    # The payload really is live: unpickling it the unsafe way creates the marker.
    payload.seek(0)
    np.load(io.BytesIO(payload.getvalue()), allow_pickle=True)
    assert marker.exists()
    marker.unlink()

    for storage in ("|O", "<f8"):
        _forge(tmp_path / "evil", {
            "manifest.json": _manifest([{"dtype": storage, "storage": storage, "shape": [1]}]),
            "array_0.npy": payload.getvalue()})
        with pytest.raises(CheckpointError, match="pickle|never uses|Object"):
            load_checkpoint(tmp_path / "evil")
        assert not marker.exists()


def test_a_raw_pickle_member_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    _forge(tmp_path / "evil", {
        "manifest.json": _manifest([{"dtype": "<f8", "storage": "<f8", "shape": [1]}]),
        "array_0.npy": pickle.dumps(_Exploit(str(marker)))})
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil")
    assert not marker.exists()


def test_a_pickled_checkpoint_file_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("manifest, match", [
    (b"not json", "manifest"),
    (b'{"format": "something-else", "version": 1, "tree": null, "arrays": []}', "not an optim"),
    (b'{"format": "optim-core-checkpoint", "version": 99, "tree": null, "arrays": []}',
     "version 99"),
    (b'{"format": "optim-core-checkpoint", "version": 1, "tree": NaN, "arrays": []}',
     "NaN"),
    (b'{"format": "optim-core-checkpoint", "version": 1, "tree": {"array": 3}, "arrays": []}',
     "malformed"),
    (b'{"format": "optim-core-checkpoint", "version": 1, "tree": {"x": 1, "y": 2},'
     b' "arrays": []}', "malformed"),
    (b'{"format": "optim-core-checkpoint", "version": 1, "tree": {"array": 0},'
     b' "arrays": [{"dtype": "x", "storage": "no-such-dtype", "shape": [1]}]}', "unknown dtype"),
    (b'{"format": "optim-core-checkpoint", "version": 1, "tree": {"array": 0},'
     b' "arrays": [{"dtype": "x", "storage": "V8", "shape": [1]}]}', "never uses"),
])
def test_forged_manifests_raise_checkpoint_error(tmp_path, manifest, match):
    _forge(tmp_path / "f", {"manifest.json": manifest})
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path / "f")


def test_array_not_matching_its_manifest_entry_is_refused(tmp_path):
    payload = io.BytesIO()
    np.save(payload, np.ones(3))
    _forge(tmp_path / "f", {
        "manifest.json": _manifest([{"dtype": "<f4", "storage": "<f4", "shape": [3]}]),
        "array_0.npy": payload.getvalue()})
    with pytest.raises(CheckpointError, match="manifest says"):
        load_checkpoint(tmp_path / "f")


def test_bfloat16_load_without_ml_dtypes_says_what_is_missing(tmp_path):
    pytest.importorskip("ml_dtypes")
    import ml_dtypes

    save_checkpoint(tmp_path / "c", [np.ones(2, dtype=ml_dtypes.bfloat16)])
    code = ("import sys; sys.modules['ml_dtypes'] = None\n"
            "import optim_core\n"
            "try:\n    optim_core.load_checkpoint(sys.argv[1])\n"
            "except ImportError as e:\n    print('ImportError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")],
                         capture_output=True, text=True, check=True).stdout
    assert "ImportError" in out and "ml_dtypes" in out and "bfloat16" in out


# --------------------------------------------------------------------------- resume
RESUME_OPTIONS = {info.name: info.resume for info in OPTIM_DB}
#: label -> (optimizer, options): every optimizer, and two with flat buffers.
RESUME_CASES = {name: (name, options) for name, options in RESUME_OPTIONS.items()}
RESUME_CASES["Adam-flat"] = ("Adam", {"amsgrad": True, "flat": True})
RESUME_CASES["SGD-flat"] = ("SGD", {**RESUME_OPTIONS["SGD"], "flat": True})
RESUME_SCRIPT = """
import sys
import numpy as np
import optim_core

def grads_at(step, params):
    rng = np.random.default_rng([7, step])
    return {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}

folder, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for label, (name, options) in CASES.items():
    tree = optim_core.load_checkpoint(f"{folder}/{label}.ckpt")
    opt = getattr(optim_core, name)(tree["params"], **options)
    opt.load_state_dict(tree["optimizer"])
    params = opt.params
    assert tree["step"] == first
    for step in range(first, last):
        opt.step(grads_at(step, params))
    optim_core.save_checkpoint(f"{folder}/{label}.final",
                               {"params": params, "optimizer": opt.state_dict(), "step": last})
"""


def _grads_at(step, params):
    rng = np.random.default_rng([7, step])
    return {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}


def _fresh_params():
    rng = np.random.default_rng(11)
    return {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3),
            "s": np.array(0.25)}


def test_resume_in_a_fresh_process_equals_the_uninterrupted_run_bit_for_bit(tmp_path):
    first, last = 4, 9
    uninterrupted = {}
    for label, (name, options) in RESUME_CASES.items():
        opt = getattr(optim_core, name)(_fresh_params(), **options)
        params = opt.params  # views into the flat buffer with flat=True
        for step in range(last):
            if step == first:
                save_checkpoint(tmp_path / f"{label}.ckpt",
                                {"params": params, "optimizer": opt.state_dict(), "step": step})
            opt.step(_grads_at(step, params))
        uninterrupted[label] = {"params": params, "optimizer": opt.state_dict(), "step": last}
    script = f"CASES = {RESUME_CASES!r}\n" + RESUME_SCRIPT
    subprocess.run([sys.executable, "-c", script, str(tmp_path), str(first), str(last)],
                   check=True, capture_output=True, text=True)
    for name, expected in uninterrupted.items():
        resumed = load_checkpoint(tmp_path / f"{name}.final")
        assert_same_tree(resumed, expected)
        assert resumed["optimizer"]["group_state"][0]["step"] == last


def test_the_same_run_in_two_processes_writes_identical_checkpoints(tmp_path):
    """Nothing in a checkpoint depends on the process (string hashing, timestamps)."""
    script = (
        "import sys, numpy as np, optim_core\n"
        "tree = {}\n"
        "for name, options in [('Adam', {'amsgrad': True}),\n"
        "                      ('RMSprop', {'centered': True, 'momentum': 0.5}),\n"
        "                      ('SGD', {'momentum': 0.9, 'flat': True})]:\n"
        "    opt = getattr(optim_core, name)({'w': np.ones(3), 'b': np.zeros(2)}, **options)\n"
        "    for step in range(3):\n"
        "        opt.step({'w': np.full(3, step + 0.5), 'b': np.full(2, -1.0)})\n"
        "    tree[name] = {'params': opt.params, 'optimizer': opt.state_dict()}\n"
        "optim_core.save_checkpoint(sys.argv[1], tree)\n")
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / seed)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
    assert (tmp_path / "1").read_bytes() == (tmp_path / "2").read_bytes()
