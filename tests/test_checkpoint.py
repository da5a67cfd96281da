"""Checkpoints: exact round trips, clear errors on bad files, and no code run on load."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
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
        assert struct.pack("<d", actual) == struct.pack("<d", expected)  # sign and payload
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


def _forge(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> None:
    """A file with a valid checksum trailer around arbitrary members: what an attacker can make."""
    from optim_core import checkpoint

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
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


# --------------------------------------------------------------------------- bounded loading
def _npy(array) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def _npy_header(shape, descr="<f8") -> bytes:
    """A .npy header alone, declaring ``shape``: no data follows."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return out.getvalue()


def _peak_bytes_of(call) -> int:
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


BOMB = 32 << 20  # 32 MiB of zeros; the reported file inflated 3 KB into 7.7 GB the same way


@pytest.mark.parametrize("member", ["manifest", "array"])
@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_DEFLATED],
                         ids=["bzip2", "deflate"])
def test_a_compressed_member_is_refused_before_it_is_inflated(tmp_path, member, compression):
    count = BOMB // 8
    manifest = _manifest([{"dtype": "<f8", "storage": "<f8", "shape": [count]}])
    if member == "manifest":  # valid JSON padded with spaces to 32 MiB
        members = {"manifest.json": manifest + b" " * BOMB}
    else:
        members = {"manifest.json": manifest, "array_0.npy": _npy(np.zeros(count))}
    _forge(tmp_path / "bomb", members, compression)
    assert (tmp_path / "bomb").stat().st_size < 200_000

    def load():
        with pytest.raises(CheckpointError, match="compressed") as info:
            load_checkpoint(tmp_path / "bomb")
        assert str(tmp_path / "bomb") in str(info.value)

    assert _peak_bytes_of(load) < 2 << 20  # nothing inflated, nothing allocated


@pytest.mark.parametrize("shape", [[10**12], [2**62, 2**62], [2**40, 0, 2**40], [3, 10**15]])
def test_declared_sizes_beyond_the_file_are_refused_before_allocating(tmp_path, shape):
    _forge(tmp_path / "f", {"manifest.json": _manifest([{"dtype": "<f8", "storage": "<f8",
                                                         "shape": shape}]),
                            "array_0.npy": _npy_header(shape) + b"\0" * 64})

    def load():
        with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "f"))):
            load_checkpoint(tmp_path / "f")

    assert _peak_bytes_of(load) < 1 << 20


@pytest.mark.parametrize("tree, match", [
    ("[" * 100_000 + "]" * 100_000, "nests"),
    ('{"dict": {"a": ' * 50_000 + "null" + "}}" * 50_000, "nests"),
    ("[" * 150 + "]" * 150, "deeper than 100"),
    ('{"array": 0}, "extra": 1', "malformed|the tree holds"),
])
def test_deep_or_odd_manifests_raise_checkpoint_error(tmp_path, tree, match):
    manifest = ('{"format": "optim-core-checkpoint", "version": 1, "tree": ' + tree
                + ', "arrays": []}').encode()
    _forge(tmp_path / "f", {"manifest.json": manifest})
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path / "f")


@pytest.mark.parametrize("dtype, storage", [
    ("finfo", "<u8"), ("iinfo", "<u8"),  # ml_dtypes classes that are no array dtype
    ("float8_e5m2", "<u2"), ("bfloat16", "<f2"), ("object", "<u8"), ("<f8", "<f8 "),
    ("x", "<f1"), ("x", "<c4"), ("x", "(2,)<f8"), ("x", "<f8,<f8"), ("x", "<M8[s]"),
])
def test_dtype_names_that_are_not_array_dtypes_raise_checkpoint_error(tmp_path, dtype,
                                                                      storage):
    pytest.importorskip("ml_dtypes")
    _forge(tmp_path / "f", {
        "manifest.json": _manifest([{"dtype": dtype, "storage": storage, "shape": [2]}]),
        "array_0.npy": _npy(np.zeros(2, np.uint8 if storage == "<f1" else np.uint64))})
    with pytest.raises(CheckpointError, match="dtype"):
        load_checkpoint(tmp_path / "f")


@pytest.mark.parametrize("shape", [[-1], [2.0], [True], ["2"], [1] * 65, "2"])
def test_malformed_shapes_raise_checkpoint_error(tmp_path, shape):
    _forge(tmp_path / "f", {
        "manifest.json": _manifest([{"dtype": "<f8", "storage": "<f8", "shape": shape}]),
        "array_0.npy": _npy(np.zeros(2))})
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "f")


def test_members_the_writer_never_makes_are_refused(tmp_path):
    good = {"manifest.json": _manifest([{"dtype": "<f8", "storage": "<f8", "shape": [2]}]),
            "array_0.npy": _npy(np.zeros(2))}
    for extra in ({"array_1.npy": _npy(np.zeros(2))}, {"../evil": b"x"},
                  {"array_01.npy": b""}):
        _forge(tmp_path / "f", {**good, **extra})
        with pytest.raises(CheckpointError, match="member"):
            load_checkpoint(tmp_path / "f")
    # One array referenced twice by the tree: two leaves would share memory.
    _forge(tmp_path / "f", {
        "manifest.json": json.dumps({"format": "optim-core-checkpoint", "version": 1,
                                     "tree": [{"array": 0}, {"array": 0}],
                                     "arrays": [{"dtype": "<f8", "storage": "<f8",
                                                 "shape": [2]}]}).encode(),
        "array_0.npy": _npy(np.zeros(2))})
    with pytest.raises(CheckpointError, match="malformed"):
        load_checkpoint(tmp_path / "f")


@pytest.mark.parametrize("path", ["/proc/self/status", "/proc/self/mem", "/proc/self/pagemap",
                                  "/proc/self/environ", "/dev/null", "/dev/zero", "/"])
def test_special_files_raise_checkpoint_error_naming_them(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist here")
    with pytest.raises(CheckpointError, match=re.escape(path)):
        load_checkpoint(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_fails_at_once_instead_of_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            load_checkpoint(fifo)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(10)
    if worker.is_alive():  # release the blocked open() so the thread can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
        pytest.fail("load_checkpoint blocked on a FIFO")
    print(f"FIFO refused in {time.monotonic() - started:.3f} s")
    assert len(outcome) == 1 and isinstance(outcome[0], CheckpointError), outcome
    assert "FIFO" in str(outcome[0]) and str(fifo) in str(outcome[0])


# --------------------------------------------------------------------------- whatever save accepts
def _every_dtype():
    """Every dtype NumPy and ml_dtypes offer: scalar types in both byte orders, parametrized
    kinds, structured dtypes (a subarray dtype is no array's dtype: NumPy expands it)."""
    found = {}
    for scalar_type in set(np.sctypeDict.values()):
        dtype = np.dtype(scalar_type)
        for variant in {dtype, dtype.newbyteorder(">"), dtype.newbyteorder("<")}:
            found[variant.str + variant.name] = variant
    for text in ("M8[s]", ">m8[ns]", "S5", "U3", "V4", "<f8,<i4", "<f8,(2,)<i4"):
        found[text] = np.dtype(text)
    if hasattr(np, "dtypes") and hasattr(np.dtypes, "StringDType"):
        found["StringDType"] = np.dtypes.StringDType()
    try:
        import ml_dtypes
    except ImportError:
        pass
    else:
        for name in dir(ml_dtypes):
            candidate = getattr(ml_dtypes, name)
            if isinstance(candidate, type) and name not in ("finfo", "iinfo"):
                found[name] = np.dtype(candidate)
                swapped = found[name].newbyteorder()
                found[swapped.str + name] = swapped
    unique = {(d.str, d.name, d.type.__module__): d for d in found.values()}
    return sorted(unique.values(), key=lambda d: (d.type.__module__, d.name, d.str))


EVERY_DTYPE = _every_dtype()


def _array_of(dtype, shape, data):
    """An array of ``dtype`` and ``shape`` filled from the random bytes ``data``."""
    count = math.prod(shape)
    if dtype.hasobject or dtype.kind == "T":
        values = [str(b) for b in data[:count]] + ["x"] * max(0, count - len(data))
        return np.array(values, dtype=dtype).reshape(shape)
    if not dtype.itemsize:
        return np.zeros(shape, dtype)
    size = count * dtype.itemsize
    raw = (data * (size // max(len(data), 1) + 1))[:size] if data else bytes(size)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _refused_by_design(dtype):
    """What a checkpoint does not hold: datetimes, strings, bytes, objects, structured
    records, and ml_dtypes types in non-native byte order."""
    if dtype.type.__module__.startswith("ml_dtypes"):
        return not dtype.isnative
    return dtype.kind in "MmSUVOT" or dtype.names is not None


ROUND_TRIPS = {"tried": 0, "round-tripped": 0, "refused": 0}


@settings(max_examples=400, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(dtype=st.sampled_from(EVERY_DTYPE),
       shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
       data=st.binary(min_size=0, max_size=64), transpose=st.booleans())
def test_every_dtype_round_trips_or_is_refused_before_touching_the_file(tmp_path, dtype,
                                                                         shape, data,
                                                                         transpose):
    path = tmp_path / "run.ckpt"
    save_checkpoint(path, {"previous": np.arange(3)})
    previous = path.read_bytes()
    array = _array_of(dtype, shape, data)
    if transpose:
        array = array.T  # Fortran order when 2-D or more
    ROUND_TRIPS["tried"] += 1
    try:
        save_checkpoint(path, {"a": array})
    except TypeError:
        ROUND_TRIPS["refused"] += 1
        assert path.read_bytes() == previous  # the good checkpoint is untouched
        assert os.listdir(tmp_path) == ["run.ckpt"]
        assert _refused_by_design(dtype), dtype
        return
    assert not _refused_by_design(dtype), dtype
    loaded = load_checkpoint(path)["a"]
    ROUND_TRIPS["round-tripped"] += 1
    assert loaded.dtype == array.dtype and loaded.shape == array.shape
    assert loaded.tobytes(order="A") == array.tobytes(order="A")
    assert loaded.flags.writeable


def test_the_dtype_property_test_covered_both_outcomes():
    if not ROUND_TRIPS["tried"]:
        pytest.skip("run with the property test")
    print(f"\ndtype round trips: {ROUND_TRIPS} over {len(EVERY_DTYPE)} dtypes")
    assert ROUND_TRIPS["round-tripped"] and ROUND_TRIPS["refused"]


@pytest.mark.parametrize("dtype", EVERY_DTYPE, ids=lambda d: f"{d.str}-{d.name}")
def test_each_dtype_round_trips_or_is_refused(tmp_path, dtype):
    array = _array_of(dtype, (2, 3), bytes(range(7, 256, 3)))
    try:
        save_checkpoint(tmp_path / "c", [array])
    except TypeError:
        assert not os.listdir(tmp_path)
        assert _refused_by_design(dtype), dtype
        return
    assert not _refused_by_design(dtype), dtype
    (loaded,) = load_checkpoint(tmp_path / "c")
    assert loaded.dtype == dtype and loaded.tobytes() == array.tobytes()


def test_float8_e5m2_and_complex32_round_trip(tmp_path):
    """Both register with NumPy as native kinds ('<f1', '<c4') that np.dtype cannot parse."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    tree = {"f8": np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e5m2),
            "c32": np.arange(8, dtype=np.uint32).view(ml_dtypes.complex32)}
    save_checkpoint(tmp_path / "c", tree)
    assert_same_tree(load_checkpoint(tmp_path / "c"), tree)


@pytest.mark.parametrize("value", [10**5000, -(10**5000), 2**63, -(2**63) - 1, 2**63 - 1,
                                   -(2**63), 2**100_000 + 1],
                         ids=["1e5000", "-1e5000", "2**63", "-2**63-1", "2**63-1", "-2**63",
                              "2**100000+1"])
def test_integers_of_any_size_round_trip(tmp_path, value):
    save_checkpoint(tmp_path / "c", {"step": value})
    assert load_checkpoint(tmp_path / "c") == {"step": value}


def test_nan_payloads_and_signs_round_trip(tmp_path):
    bits = [0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001, 0x7FF4000000000000,
            0xFFFFFFFFFFFFFFFF]
    values = [struct.unpack("<d", struct.pack("<Q", b))[0] for b in bits]
    save_checkpoint(tmp_path / "c", values)
    loaded = load_checkpoint(tmp_path / "c")
    assert [struct.unpack("<Q", struct.pack("<d", v))[0] for v in loaded] == bits


def test_trees_too_deep_or_holding_themselves_are_refused_before_writing(tmp_path):
    deep = []
    for _ in range(150):
        deep = [deep]
    cycle = []
    cycle.append(cycle)
    for bad in (deep, cycle, {"a": cycle}):
        with pytest.raises(ValueError, match="nest deeper than 100"):
            save_checkpoint(tmp_path / "c", bad)
    assert not os.listdir(tmp_path)
    ok = []
    for _ in range(99):
        ok = [ok]
    save_checkpoint(tmp_path / "c", ok)
    assert load_checkpoint(tmp_path / "c") == ok


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o604, 0o660])
def test_replacing_a_checkpoint_keeps_its_mode(tmp_path, mode):
    path = tmp_path / "run.ckpt"
    save_checkpoint(path, {"v": 1})
    path.chmod(mode)
    save_checkpoint(path, {"v": 2})
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert load_checkpoint(path) == {"v": 2}


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
