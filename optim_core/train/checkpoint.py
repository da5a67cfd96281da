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
        Dict keys must be strings. Leaves may be ``None``, ``bool``, ``int`` (any size,
        kept exactly), ``float`` (NaN and infinities included), ``str``, or arrays of
        any array API library and device (copied to the host). NumPy scalars such as
        ``np.float32(1)`` are saved as 0-d arrays. Array dtypes are kept exactly,
        bfloat16 and the other ``ml_dtypes`` types included (torch bfloat16 tensors too,
        bit for bit).

    Raises
    ------
    TypeError
        If the tree holds anything else (a set, an object array, a non-string key...),
        naming where; nothing is written then.

    Notes
    -----
    The file is written to ``.<name>.<random>.tmp`` in the same folder, flushed and
    fsynced, renamed over ``path`` (:func:`os.replace`, atomic on POSIX and Windows),
    and the folder is fsynced, so a crash at any moment leaves the previous file or
    the new one. The temporary file is removed if saving fails with an exception; a
    killed process may leave it behind (it is never read, and may be deleted).
    """
    path = os.fspath(path)
    arrays: list[tuple[np.ndarray, str]] = []
    encoded = _encode(tree, arrays, "tree")
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
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
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


def _encode(node: Any, arrays: list[tuple[np.ndarray, str]], where: str) -> Any:
    """The JSON form of ``node``: JSON scalars and lists as themselves, else one-key objects."""
    if node is None or isinstance(node, (bool, str)):
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        value = float(node)
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(node, Mapping):
        out = {}
        for key, value in node.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: dict keys must be str, got {key!r}")
            out[key] = _encode(value, arrays, f"{where}[{key!r}]")
        return {"dict": out}
    if isinstance(node, list):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, tuple):
        return {"tuple": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(node)]}
    if array_api_compat.is_array_api_obj(node):
        arrays.append(_host_array(node, where))
        return {"array": len(arrays) - 1}
    raise TypeError(f"{where}: cannot save a {type(node).__name__}; a checkpoint holds dicts "
                    "with str keys, lists, tuples, arrays, None, bool, int, float and str")


def _host_array(x: Any, where: str) -> tuple[np.ndarray, str]:
    """``x`` on the host as (array to store, logical dtype name); exotic floats as raw bits."""
    if array_api_compat.is_torch_array(x) and str(x.dtype) == "torch.bfloat16":
        import torch

        bits = x.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
        return bits.copy(), "bfloat16"
    host = np.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else ns.to_numpy(x)
    dtype = host.dtype
    if dtype.kind in _NATIVE_KINDS and dtype.names is None:
        return host, dtype.str
    if _is_ml_dtype(dtype):
        return host.view(f"u{dtype.itemsize}"), dtype.name
    raise TypeError(f"{where}: cannot save an array of dtype {dtype}; checkpoints hold "
                    "bool, integer, floating and complex arrays")


def _is_ml_dtype(dtype: np.dtype) -> bool:
    return dtype.kind == "V" and dtype.names is None and dtype.type.__module__.startswith(
        "ml_dtypes")


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
        If ``path`` does not exist.
    CheckpointError
        If the file is truncated, corrupted (checksum mismatch), not an optim-core
        checkpoint, or holds anything that would need pickle to load. No code from
        the file is ever run.
    ImportError
        If it holds ml_dtypes arrays (bfloat16...) and ml_dtypes is not installed.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        _verify_checksum(f, path)
        try:
            with zipfile.ZipFile(f) as zf:
                manifest = _read_manifest(zf, path)
                arrays = [_read_array(zf, i, entry, path)
                          for i, entry in enumerate(manifest["arrays"])]
        except (zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, EOFError, OSError,
                ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{path}: invalid checkpoint contents: {exc}") from exc
    return _decode(manifest["tree"], arrays, path)


def _verify_checksum(f: Any, path: str) -> None:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
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


def _read_manifest(zf: zipfile.ZipFile, path: str) -> dict[str, Any]:
    try:
        manifest = json.loads(zf.read(_MANIFEST).decode("utf-8"),
                              parse_constant=_refuse_constant)
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: missing or unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an optim-core checkpoint (no manifest)")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint version "
                              f"{manifest.get('version')!r} (this is version {FORMAT_VERSION})")
    if not isinstance(manifest.get("arrays"), list) or "tree" not in manifest:
        raise CheckpointError(f"{path}: malformed manifest")
    return manifest


def _refuse_constant(name: str) -> Any:
    raise CheckpointError(f"non-standard JSON constant {name} in the manifest")


def _read_array(zf: zipfile.ZipFile, index: int, entry: Any, path: str) -> np.ndarray:
    if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("storage"), str) and isinstance(entry.get("shape"), list)):
        raise CheckpointError(f"{path}: malformed manifest entry for array {index}")
    try:
        storage = np.dtype(entry["storage"])
    except TypeError as exc:
        raise CheckpointError(f"{path}: array {index} has unknown dtype {entry['storage']!r}") \
            from exc
    if storage.kind not in _NATIVE_KINDS or storage.names is not None:
        raise CheckpointError(f"{path}: array {index} has storage dtype {storage}, "
                              "which a checkpoint never uses")
    with zf.open(f"array_{index}.npy") as member:
        # allow_pickle=False: an object array raises here, before any unpickling.
        array = np.lib.format.read_array(member, allow_pickle=False)
    if array.dtype != storage or list(array.shape) != entry["shape"]:
        raise CheckpointError(f"{path}: array {index} is {array.dtype}{list(array.shape)}, "
                              f"the manifest says {storage}{entry['shape']}")
    name = entry["dtype"]
    if name == storage.str:
        return array
    return array.view(_ml_dtype(name, storage, path))


def _ml_dtype(name: str, storage: np.dtype, path: str) -> np.dtype:
    if not _ML_DTYPE_NAME.match(name):
        raise CheckpointError(f"{path}: unknown dtype {name!r}")
    try:
        import ml_dtypes
    except ImportError as exc:
        raise ImportError(f"{path} holds {name} arrays; loading them needs the ml_dtypes "
                          "package (pip install ml_dtypes)") from exc
    dtype_type = getattr(ml_dtypes, name, None)
    if not isinstance(dtype_type, type):
        raise CheckpointError(f"{path}: unknown dtype {name!r}")
    dtype = np.dtype(dtype_type)
    if dtype.itemsize != storage.itemsize:
        raise CheckpointError(f"{path}: dtype {name} does not fit its {storage} storage")
    return dtype


def _decode(node: Any, arrays: list[np.ndarray], path: str) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, arrays, path) for v in node]
    if isinstance(node, dict) and len(node) == 1:
        (kind, value), = node.items()
        if kind == "dict" and isinstance(value, dict):
            return {k: _decode(v, arrays, path) for k, v in value.items()}
        if kind == "tuple" and isinstance(value, list):
            return tuple(_decode(v, arrays, path) for v in value)
        if kind == "float" and value in ("nan", "inf", "-inf"):
            return float(value)
        if kind == "array" and isinstance(value, int) and not isinstance(value, bool) \
                and 0 <= value < len(arrays):
            return arrays[value]
    raise CheckpointError(f"{path}: malformed manifest node {str(node)[:80]}")
