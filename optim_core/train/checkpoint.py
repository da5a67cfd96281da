"""Checkpoints: save and load nested trees of arrays, atomically, without pickle.

A checkpoint is one file, a valid ``.npz`` (an uncompressed zip of ``.npy`` members)
holding

* ``manifest.json``: the tree's structure and Python scalars, and for each array its
  dtype name and shape;
* ``array_<i>.npy``: the arrays, read back with ``allow_pickle=False``;
* a SHA-256 of every byte before it, in the zip's trailing comment.

Nothing on the load path can run code: there is no pickle anywhere, the manifest is
JSON, and every ``.npy`` header is parsed by NumPy's literal parser and refused if it
holds objects. The checksum covers the whole file, so a truncated, corrupted or
foreign file raises :class:`CheckpointError` before any array is read.

Loading is bounded and strict, since anyone can forge a file with a valid checksum: only
regular files are opened (a FIFO or device fails at once), only the members the writer
makes are accepted, each stored uncompressed (no decompression bomb), and every size is
checked against the file's before anything is allocated, so memory stays proportional
to the file. Every defect raises :class:`CheckpointError` naming the file.

Saving is atomic: the file is written to a temporary name in the same folder, flushed
and fsynced, renamed over the target, and the folder is fsynced. A crash at any
moment leaves either the previous checkpoint or the new one, never a mix. A crash
may leave a temporary file named ``.<name>.<random>.tmp`` next to the target; it is
never mistaken for the checkpoint and may be deleted at any time no save is running.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
import uuid
import zipfile
from collections.abc import Mapping
from typing import Any

import array_api_compat
import numpy as np

from .. import _namespace as ns

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]

FORMAT_NAME = "optim-core-checkpoint"
FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_CHECKSUM_PREFIX = b"optim-core sha256 "
_DIGEST_HEX_LEN = 64
_TRAILER_LEN = len(_CHECKSUM_PREFIX) + _DIGEST_HEX_LEN
# End-of-central-directory record: 22 bytes, the last two of which give the comment length.
_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_LEN = 22
_ZIP_MAGIC = b"PK\x03\x04"
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # identical trees give identical files
_CHUNK = 1 << 20
# Kinds NumPy stores natively: bool, signed/unsigned int, float, complex.
_NATIVE_KINDS = "biufc"
_ML_DTYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# A storage dtype as the writer spells it: byte order, kind, size ('<f8', '|b1', '>c16').
_STORAGE_NAME = re.compile(r"^[<>|][biufc][0-9]{1,2}$")
_ARRAY_MEMBER = re.compile(r"^array_(0|[1-9][0-9]*)\.npy$")
#: Containers nest at most this deep (JSON and the decoder stay far from Python's stack limit).
MAX_DEPTH = 100
# Python ints outside int64 go into the manifest as hex text: exact at any size, and parsed
# in linear time (Python refuses decimal text over 4300 digits, int('1' * 5000)).
_INT64 = 2**63
_HEX_INT = re.compile(r"^-?0x[0-9a-f]+$")
_CANONICAL_NAN = 0x7FF8000000000000
_NAN_BITS = re.compile(r"^nan:([0-9a-f]{16})$")
_NPY_MAX_DIMS = 64


class CheckpointError(ValueError):
    """A file is not a whole, valid optim-core checkpoint (truncated, corrupt or foreign)."""


# --------------------------------------------------------------------------- saving
def save_checkpoint(path: str | os.PathLike[str], tree: Any) -> None:
    """Write ``tree`` to ``path`` atomically.

    Parameters
    ----------
    path : str or path-like
        The checkpoint file, used as given (no suffix is added). Its folder must exist.
    tree : nested dicts, lists and tuples of arrays and Python scalars
        Dict keys must be strings; containers nest at most ``MAX_DEPTH`` (100) deep.
        Leaves may be ``None``, ``bool``, ``int`` (any size, kept exactly), ``float``
        (bit for bit: -0.0, infinities and NaN payloads included), ``str``, or arrays of
        any array API library and device (copied to the host). NumPy scalars such as
        ``np.float32(1)`` are saved as 0-d arrays. Array dtypes are kept exactly: every
        NumPy bool, integer, floating and complex dtype (either byte order, float16 and
        longdouble included) and every ``ml_dtypes`` type (bfloat16, the float8, float6
        and float4 formats, int4...); torch bfloat16 tensors too, bit for bit.

    Raises
    ------
    TypeError
        If the tree holds anything else (a set, an object, string or datetime array, a
        dtype that could not be read back, a non-string key...), naming where.
    ValueError
        If containers nest deeper than ``MAX_DEPTH`` (or hold themselves).

    Nothing is written when either is raised: whatever ``save_checkpoint`` accepts,
    :func:`load_checkpoint` returns.

    Notes
    -----
    The file is written to ``.<name>.<random>.tmp`` in the same folder, flushed and
    fsynced, renamed over ``path`` (:func:`os.replace`, atomic on POSIX and Windows),
    and the folder is fsynced, so a crash at any moment leaves the previous file or
    the new one. The temporary file is removed if saving fails with an exception; a
    killed process may leave it behind (it is never read, and may be deleted). A file
    replaced keeps its permission bits; a new one gets ``0o666`` less the umask.
    """
    path = os.fspath(path)
    arrays: list[tuple[np.ndarray, str]] = []
    encoded = _encode(tree, arrays, "tree", 0)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tree": encoded,
        "arrays": [{"dtype": name, "storage": stored.dtype.str, "shape": list(stored.shape)}
                   for stored, name in arrays],
    }
    manifest_bytes = json.dumps(manifest, allow_nan=False, separators=(",", ":")).encode()

    folder = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:16]}.tmp")
    mode = _mode_to_keep(path)
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if mode is not None and hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w+b") as f:
            _write_zip(f, manifest_bytes, arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)


def _mode_to_keep(path: str) -> int | None:
    """The permission bits (rwx only: never set-id bits on new contents) of the regular
    file ``path`` will replace, if there is one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mode & 0o777 if stat.S_ISREG(st.st_mode) else None


def _write_zip(f: Any, manifest_bytes: bytes, arrays: list[tuple[np.ndarray, str]]) -> None:
    placeholder = _CHECKSUM_PREFIX + b"0" * _DIGEST_HEX_LEN
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.comment = placeholder
        zf.writestr(_member(_MANIFEST), manifest_bytes)
        for i, (stored, _) in enumerate(arrays):
            with zf.open(_member(f"array_{i}.npy"), "w", force_zip64=True) as out:
                np.lib.format.write_array(out, stored, allow_pickle=False)
    f.flush()
    size = f.seek(0, os.SEEK_END)
    f.seek(size - _TRAILER_LEN)
    if f.read(_TRAILER_LEN) != placeholder:  # pragma: no cover - zipfile wrote elsewhere
        raise RuntimeError("zip comment not at the end of the file")
    digest = _sha256(f, size - _DIGEST_HEX_LEN)
    f.seek(size - _DIGEST_HEX_LEN)
    f.write(digest.encode())


def _member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
    info.compress_type = zipfile.ZIP_STORED
    return info


def _fsync_folder(folder: str) -> None:
    """Make the rename durable (POSIX); Windows has no folder handles to fsync."""
    if os.name == "nt":  # pragma: no cover
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - a filesystem without folder fsync
        import errno

        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _sha256(f: Any, length: int) -> str:
    f.seek(0)
    digest = hashlib.sha256()
    left = length
    while left > 0:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def _encode(node: Any, arrays: list[tuple[np.ndarray, str]], where: str, depth: int) -> Any:
    """The JSON form of ``node``: JSON scalars and lists as themselves, else one-key objects."""
    if node is None or isinstance(node, (bool, str)):
        return node
    if isinstance(node, int):
        value = int(node)
        return value if -_INT64 <= value < _INT64 else {"int": hex(value)}
    if isinstance(node, float):
        return _encode_float(float(node))
    if isinstance(node, (Mapping, list, tuple)) and depth >= MAX_DEPTH:
        raise ValueError(f"{where}: containers nest deeper than {MAX_DEPTH} levels "
                         "(or a container holds itself)")
    if isinstance(node, Mapping):
        out = {}
        for key, value in node.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: dict keys must be str, got {key!r}")
            out[key] = _encode(value, arrays, f"{where}[{key!r}]", depth + 1)
        return {"dict": out}
    if isinstance(node, list):
        return [_encode(v, arrays, f"{where}[{i}]", depth + 1) for i, v in enumerate(node)]
    if isinstance(node, tuple):
        return {"tuple": [_encode(v, arrays, f"{where}[{i}]", depth + 1)
                          for i, v in enumerate(node)]}
    if array_api_compat.is_array_api_obj(node):
        arrays.append(_host_array(node, where))
        return {"array": len(arrays) - 1}
    raise TypeError(f"{where}: cannot save a {type(node).__name__}; a checkpoint holds dicts "
                    "with str keys, lists, tuples, arrays, None, bool, int, float and str")


def _encode_float(value: float) -> Any:
    if math.isfinite(value):
        return value
    if not math.isnan(value):
        return {"float": repr(value)}  # "inf", "-inf"
    bits = struct.unpack("<Q", struct.pack("<d", value))[0]
    return {"float": "nan" if bits == _CANONICAL_NAN else f"nan:{bits:016x}"}


def _host_array(x: Any, where: str) -> tuple[np.ndarray, str]:
    """``x`` on the host as (array to store, logical dtype name); exotic floats as raw bits.

    A dtype is accepted only if the loader resolves its stored name back to it exactly.
    """
    if array_api_compat.is_torch_array(x) and str(x.dtype) == "torch.bfloat16":
        import torch

        bits = x.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
        return bits.copy(), "bfloat16"
    host = np.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else ns.to_numpy(x)
    dtype = host.dtype
    if _native_storage(dtype.str) == dtype and dtype.type.__module__ == "numpy":
        return host, dtype.str
    if _is_ml_dtype(dtype):
        bits = np.dtype(f"u{dtype.itemsize}")
        if _ml_dtype_named(dtype.name, bits) == dtype:
            return host.view(bits), dtype.name
    raise TypeError(f"{where}: cannot save an array of dtype {dtype}; checkpoints hold "
                    "NumPy's bool, integer, floating and complex arrays and ml_dtypes arrays")


def _native_storage(name: str) -> np.dtype | None:
    """The dtype a storage name stands for, or None if a checkpoint never stores it."""
    if not _STORAGE_NAME.match(name):
        return None
    try:
        dtype = np.dtype(name)
    except TypeError:
        return None
    if dtype.str != name or dtype.kind not in _NATIVE_KINDS or dtype.type.__module__ != "numpy":
        return None  # '<f1' (ml_dtypes' float8_e5m2 registers as a float), '<c4'...
    return dtype


def _is_ml_dtype(dtype: np.dtype) -> bool:
    return (dtype.names is None and not dtype.hasobject
            and dtype.type.__module__.split(".")[0] == "ml_dtypes")


def _ml_dtype_named(name: str, storage: np.dtype) -> np.dtype | None:
    """The ml_dtypes dtype called ``name`` stored as ``storage`` bits, or None.

    Raises ImportError if ml_dtypes is not installed.
    """
    if not _ML_DTYPE_NAME.match(name) or storage.kind != "u":
        return None
    import ml_dtypes

    dtype_type = getattr(ml_dtypes, name, None)
    if not isinstance(dtype_type, type):
        return None
    try:
        dtype = np.dtype(dtype_type)
    except TypeError:
        return None
    # Not finfo or iinfo (object dtypes: a view would forge pointers), nor an alias.
    if not _is_ml_dtype(dtype) or dtype.name != name or dtype.itemsize != storage.itemsize:
        return None
    return dtype


# --------------------------------------------------------------------------- loading
def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns
    -------
    The saved tree, with the same dicts, lists, tuples and Python scalars, and every
    array as a new, writeable NumPy array of exactly the saved dtype and shape
    (bfloat16 and other ``ml_dtypes`` types need ``ml_dtypes`` installed).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (PermissionError if it may not be read).
    CheckpointError
        If the file is not a regular file (a folder, FIFO or device fails at once,
        without waiting on it), cannot be read, is truncated, corrupted (checksum
        mismatch), not an optim-core checkpoint, holds a compressed or unexpected
        member, declares more data than it holds, nests deeper than ``MAX_DEPTH``, or
        holds anything that would need pickle to load. No code from the file is ever
        run, and memory stays proportional to the file's size.
    ImportError
        If it holds ml_dtypes arrays (bfloat16...) and ml_dtypes is not installed.
    """
    path = os.fspath(path)
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            _verify_checksum(f, size, path)
            with zipfile.ZipFile(f) as zf:
                _check_members(zf, size, path)
                manifest = _read_manifest(zf, path)
                specs = [_array_spec(i, entry, path) for i, entry in enumerate(manifest["arrays"])]
                _check_array_members(zf, len(specs), path)
                arrays = [_read_array(zf, i, *spec, path) for i, spec in enumerate(specs)]
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, EOFError, OSError,
                ValueError, RuntimeError, NotImplementedError, OverflowError) as exc:
            raise CheckpointError(f"{path}: invalid checkpoint contents "
                                  f"({type(exc).__name__}: {exc})") from exc
    used: set[int] = set()
    tree = _decode(manifest["tree"], arrays, path, used, 0)
    if len(used) != len(arrays):
        raise CheckpointError(f"{path}: the manifest lists {len(arrays)} arrays, the tree "
                              f"holds {len(used)}")
    return tree


def _open_regular(path: str) -> Any:
    """``path`` opened for reading if it is a regular file; a FIFO, device, socket or
    folder raises CheckpointError at once (``O_NONBLOCK``: opening never waits)."""
    st = os.stat(path)  # FileNotFoundError as documented
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file ({_file_kind(st.st_mode)}); "
                              "a checkpoint is one")
    flags = (os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_NOCTTY", 0))
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)  # what was opened, should the path have changed meanwhile
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path} is not a regular file ({_file_kind(st.st_mode)})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _verify_checksum(f: Any, size: int, path: str) -> None:
    head = f.read(len(_ZIP_MAGIC))
    if head != _ZIP_MAGIC:
        raise CheckpointError(f"{path} is not an optim-core checkpoint (not a zip/npz file)")
    tail_len = _EOCD_LEN + _TRAILER_LEN
    if size < len(_ZIP_MAGIC) + tail_len:
        raise CheckpointError(f"{path} is truncated or not an optim-core checkpoint "
                              f"({size} bytes)")
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    eocd, trailer = tail[:_EOCD_LEN], tail[_EOCD_LEN:]
    if not (eocd.startswith(_EOCD_SIGNATURE)
            and int.from_bytes(eocd[-2:], "little") == _TRAILER_LEN
            and trailer.startswith(_CHECKSUM_PREFIX)):
        raise CheckpointError(f"{path} has no optim-core checksum trailer: the file is "
                              "truncated, or it is not a checkpoint written by "
                              "optim_core.save_checkpoint")
    expected = trailer[len(_CHECKSUM_PREFIX):].decode("ascii", "replace")
    actual = _sha256(f, size - _DIGEST_HEX_LEN)
    if actual != expected:
        raise CheckpointError(f"{path} is corrupt: SHA-256 {actual} does not match the "
                              f"recorded {expected}")
    f.seek(0)


def _check_members(zf: zipfile.ZipFile, size: int, path: str) -> None:
    """Only members the writer makes: stored (never compressed), unencrypted, unique,
    and declaring no more bytes than the file holds."""
    names: set[str] = set()
    total = 0
    for info in zf.infolist():
        name = info.filename
        if name != _MANIFEST and not _ARRAY_MEMBER.match(name):
            raise CheckpointError(f"{path}: unexpected member {name[:80]!r}")
        if name in names:
            raise CheckpointError(f"{path}: member {name!r} appears twice")
        names.add(name)
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path}: member {name!r} is compressed (zip method "
                                  f"{info.compress_type}); checkpoints store members "
                                  "uncompressed, so this file was not written by "
                                  "optim_core.save_checkpoint")
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{path}: member {name!r} is encrypted")
        if info.file_size != info.compress_size:
            raise CheckpointError(f"{path}: member {name!r} declares {info.file_size} bytes "
                                  f"stored in {info.compress_size}")
        total += info.compress_size
        if info.header_offset + info.compress_size > size or total > size:
            raise CheckpointError(f"{path}: member {name!r} declares {info.compress_size} "
                                  f"bytes, more than the file's {size}")
    if _MANIFEST not in names:
        raise CheckpointError(f"{path}: missing manifest ({_MANIFEST})")


def _check_array_members(zf: zipfile.ZipFile, count: int, path: str) -> None:
    expected = {_MANIFEST, *(f"array_{i}.npy" for i in range(count))}
    present = set(zf.namelist())
    if present != expected:
        odd = sorted(present ^ expected)[:5]
        raise CheckpointError(f"{path}: the members do not match the manifest's {count} "
                              f"arrays (missing or extra: {odd})")


def _read_manifest(zf: zipfile.ZipFile, path: str) -> dict[str, Any]:
    try:
        manifest = json.loads(zf.read(_MANIFEST).decode("utf-8"),
                              parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError as exc:
        raise CheckpointError(f"{path}: the manifest nests too deeply") from exc
    except (KeyError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError included
        if isinstance(exc, CheckpointError):
            raise CheckpointError(f"{path}: {exc}") from exc
        raise CheckpointError(f"{path}: missing or unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an optim-core checkpoint (no manifest)")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint version "
                              f"{str(manifest.get('version'))[:40]} (this is version "
                              f"{FORMAT_VERSION})")
    if not isinstance(manifest.get("arrays"), list) or "tree" not in manifest:
        raise CheckpointError(f"{path}: malformed manifest")
    return manifest


def _refuse_constant(name: str) -> Any:
    raise CheckpointError(f"non-standard JSON constant {name} in the manifest")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # '1e999': the writer spells infinities {"float": "inf"}
        raise CheckpointError(f"out-of-range number {text[:40]} in the manifest")
    return value


def _array_spec(index: int, entry: Any, path: str) -> tuple[np.dtype, np.dtype, list[int]]:
    """(storage dtype, dtype, shape) of a manifest entry, each checked."""
    where = f"{path}: array {index}"
    if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("storage"), str) and isinstance(entry.get("shape"), list)):
        raise CheckpointError(f"{where}: malformed manifest entry")
    storage = _native_storage(entry["storage"])
    if storage is None:
        raise CheckpointError(f"{where} has storage dtype {entry['storage'][:40]!r}, "
                              "which a checkpoint never uses (unknown dtype)")
    shape = entry["shape"]
    if len(shape) > _NPY_MAX_DIMS or not all(
            type(n) is int and 0 <= n < _INT64 for n in shape):
        raise CheckpointError(f"{where} has an invalid shape {str(shape)[:80]}")
    name = entry["dtype"]
    dtype = storage if name == storage.str else _ml_dtype(name, storage, path)
    return storage, dtype, shape


def _read_array(zf: zipfile.ZipFile, index: int, storage: np.dtype, dtype: np.dtype,
                shape: list[int], path: str) -> np.ndarray:
    where = f"{path}: array {index}"
    nbytes = math.prod(shape) * storage.itemsize
    info = zf.getinfo(f"array_{index}.npy")
    with zf.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(member)
        else:
            raise CheckpointError(f"{where}: .npy format version {version} is not one the "
                                  "writer uses")
        header_shape, fortran_order, header_dtype = header
        if header_dtype.hasobject:
            raise CheckpointError(f"{where} holds Python objects, which would need pickle "
                                  "to load; it is not read")
        if header_dtype != storage or list(header_shape) != shape:
            raise CheckpointError(f"{where} is {header_dtype}{list(header_shape)}, the "
                                  f"manifest says {storage}{shape}")
        data_bytes = info.file_size - member.tell()
        if nbytes != data_bytes:  # checked before anything is allocated
            raise CheckpointError(f"{where} declares {nbytes} bytes of data, its member "
                                  f"holds {data_bytes}")
        array = np.empty(shape, dtype=storage, order="F" if fortran_order else "C")
        _read_into(member, array, where)
    return array if dtype is storage else array.view(dtype)


def _read_into(member: Any, array: np.ndarray, where: str) -> None:
    buffer = memoryview(array.reshape(-1, order="A").view(np.uint8))
    filled = 0
    while filled < len(buffer):
        n = member.readinto(buffer[filled:filled + _CHUNK])
        if not n:
            raise CheckpointError(f"{where}: data ends early")
        filled += n


def _ml_dtype(name: str, storage: np.dtype, path: str) -> np.dtype:
    if not _ML_DTYPE_NAME.match(name):
        raise CheckpointError(f"{path}: unknown dtype {name[:40]!r}")
    try:
        import ml_dtypes  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{path} holds {name} arrays; loading them needs the ml_dtypes "
                          "package (pip install ml_dtypes)") from exc
    dtype = _ml_dtype_named(name, storage)
    if dtype is None:
        raise CheckpointError(f"{path}: unknown dtype {name!r} for {storage} storage (not an "
                              "ml_dtypes array dtype of that size)")
    return dtype


def _decode(node: Any, arrays: list[np.ndarray], path: str, used: set[int], depth: int) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if depth >= MAX_DEPTH:
        raise CheckpointError(f"{path}: the tree nests deeper than {MAX_DEPTH} levels")
    if isinstance(node, list):
        return [_decode(v, arrays, path, used, depth + 1) for v in node]
    if isinstance(node, dict) and len(node) == 1:
        (kind, value), = node.items()
        if kind == "dict" and isinstance(value, dict):
            return {k: _decode(v, arrays, path, used, depth + 1) for k, v in value.items()}
        if kind == "tuple" and isinstance(value, list):
            return tuple(_decode(v, arrays, path, used, depth + 1) for v in value)
        if kind == "float" and isinstance(value, str):
            if value in ("nan", "inf", "-inf"):
                return float(value)
            match = _NAN_BITS.match(value)
            if match:
                number = struct.unpack("<d", struct.pack("<Q", int(match[1], 16)))[0]
                if math.isnan(number):
                    return number
        if kind == "int" and isinstance(value, str) and _HEX_INT.match(value):
            return int(value, 16)
        if kind == "array" and type(value) is int and 0 <= value < len(arrays) \
                and value not in used:
            used.add(value)
            return arrays[value]
    raise CheckpointError(f"{path}: malformed manifest node {str(node)[:80]}")
