"""The one place where optim_core touches array libraries.

Everything else in ``optim_core`` reaches arrays through these helpers, which
delegate to `array-api-compat`_.  No array library other than NumPy is imported
here; CuPy, torch, JAX and friends are only ever seen through the arrays the user
hands us.

.. _array-api-compat: https://data-apis.org/array-api-compat/
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "namespace_of",
    "common_namespace",
    "check_same_library",
    "device_of",
    "is_floating",
    "is_writeable",
    "is_read_only",
    "identity_key",
    "is_numpy_namespace",
    "is_cupy_namespace",
    "to_numpy",
    "from_numpy",
    "is_dask_array",
]


def namespace_of(x: Any) -> Any:
    """Return the array API namespace of one array (TypeError if it is not an array)."""
    try:
        return array_api_compat.array_namespace(x)
    except TypeError as exc:
        raise TypeError(f"expected an array, got {type(x).__name__}") from exc


def device_of(x: Any) -> Any:
    """Return the device of ``x`` as the array API defines it."""
    return array_api_compat.device(x)


def common_namespace(arrays: Sequence[Any], names: Sequence[str], what: str = "parameter") -> Any:
    """Return the namespace shared by ``arrays``; all must also share one device.

    Raises
    ------
    TypeError
        Naming the first array whose namespace or device differs from the first one's.
    """
    if not arrays:
        raise ValueError(f"no {what}s given")
    xp = namespace_of(arrays[0])
    device = device_of(arrays[0])
    for name, x in zip(names, arrays):
        try:
            other = namespace_of(x)
        except TypeError as exc:
            raise TypeError(f"{what} {name!r}: {exc}") from None
        if other is not xp:
            raise TypeError(
                f"{what} {name!r} is a {other.__name__} array, but {what}s of this optimizer "
                f"are {xp.__name__} arrays; all must share one array library"
            )
        if device_of(x) != device:
            raise TypeError(
                f"{what} {name!r} is on device {device_of(x)!r}, but the first is on "
                f"{device!r}; all must share one device"
            )
    return xp


def check_same_library(x: Any, like: Any, what: str) -> None:
    """TypeError naming ``what`` unless ``x`` shares ``like``'s namespace and device."""
    # One array type belongs to one library: the namespace lookup (several microseconds,
    # paid per gradient per step) is needed only when the types differ.
    if type(x) is not type(like):
        try:
            xp = namespace_of(x)
        except TypeError as exc:
            raise TypeError(f"{what}: {exc}") from None
        expected = namespace_of(like)
        if xp is not expected:
            raise TypeError(f"{what} is a {xp.__name__} array, but the parameter is a "
                            f"{expected.__name__} array")
    if _device_quick(x) != _device_quick(like):
        raise TypeError(f"{what} is on device {device_of(x)!r}, the parameter on "
                        f"{device_of(like)!r}")


def _device_quick(x: Any) -> Any:
    # x.device where it is an attribute (NumPy 2, CuPy, torch, array_api_strict): two arrays
    # of one type compare the same way as device_of's answers, without its type probing.
    device = getattr(x, "device", None)
    return device_of(x) if device is None or callable(device) else device


def is_floating(xp: Any, x: Any) -> bool:
    """Whether ``x`` has a real floating dtype (float16/bfloat16 included)."""
    try:
        return bool(xp.isdtype(x.dtype, "real floating"))
    except (TypeError, ValueError):
        # bfloat16 and friends from ml_dtypes are not array API dtypes; NumPy calls them "V".
        return np.dtype(x.dtype).kind == "V" and "float" in np.dtype(x.dtype).name


def is_writeable(x: Any) -> bool:
    """Whether ``x`` can be updated in place (False for JAX arrays and read-only NumPy arrays)."""
    return bool(array_api_compat.is_writeable_array(x))


def is_read_only(x: Any) -> bool:
    """Whether ``x`` belongs to a mutable library but was marked read-only (NumPy, CuPy)."""
    flags = getattr(x, "flags", None)
    writeable = getattr(flags, "writeable", True)
    return writeable is False


def identity_key(x: Any) -> Any:
    """A key equal for two arrays that are the same memory (views included, for NumPy)."""
    if isinstance(x, np.ndarray) and x.size > 0:
        return ("numpy", x.__array_interface__["data"][0])
    return ("object", id(x))


def is_numpy_namespace(xp: Any) -> bool:
    return array_api_compat.is_numpy_namespace(xp)


def is_cupy_namespace(xp: Any) -> bool:
    return array_api_compat.is_cupy_namespace(xp)


def to_numpy(x: Any) -> np.ndarray:
    """Copy any array (any namespace, any device) into a new host NumPy array."""
    if isinstance(x, np.ndarray):
        return x.copy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        if str(x.dtype) == "torch.bfloat16":
            return _torch_bfloat16_to_numpy(x)
        return x.detach().cpu().numpy().copy()
    try:
        return np.asarray(x).copy()
    except (TypeError, ValueError, RuntimeError):
        pass
    # Off the host: move it to the library's CPU device, which not every library calls "cpu"
    # (array_api_strict's is Device("CPU_DEVICE"); its first listed device).
    errors = []
    for cpu in ("cpu", *namespace_of(x).__array_namespace_info__().devices()[:1]):
        try:
            on_host = array_api_compat.to_device(x, cpu)
            try:
                return np.asarray(on_host).copy()
            except (TypeError, ValueError, RuntimeError):
                return np.from_dlpack(on_host).copy()
        except (TypeError, ValueError, RuntimeError) as exc:
            errors.append(exc)
    raise TypeError(f"cannot copy a {type(x).__name__} to the host: {errors[-1]}")


def _torch_bfloat16_to_numpy(x: Any) -> np.ndarray:
    """NumPy has no bfloat16: ml_dtypes' bfloat16 bit for bit, or float32 (exact) without it."""
    import torch

    x = x.detach().cpu()
    try:
        import ml_dtypes
    except ImportError:
        return x.to(torch.float32).numpy()
    return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()


def from_numpy(xp: Any, array: np.ndarray, *, like: Any) -> Any:
    """Put a host NumPy array on ``like``'s namespace and device, with ``like``'s dtype."""
    if array.dtype.kind == "V" and not isinstance(like, np.ndarray):
        # ml_dtypes types (bfloat16...) are NumPy-only: other libraries take float32,
        # which holds every one of their values exactly.
        array = array.astype(np.float32)
    # np.asarray keeps 0-d arrays 0-d (np.ascontiguousarray makes them 1-d).
    out = xp.asarray(np.asarray(array, order="C"), device=device_of(like), copy=True)
    if out.dtype != like.dtype:
        out = xp.astype(out, like.dtype)
    return out


def is_dask_array(x: Any) -> bool:
    """Whether ``x`` is a Dask array (answered without importing Dask)."""
    return bool(array_api_compat.is_dask_array(x))
