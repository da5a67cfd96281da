"""Backend selection and per-library fast paths (installed as ``optim_core.backends``).

Two decisions are made here, and only here:

* :func:`select_backend` resolves what the user asked for ("auto", "numpy",
  "cupy" or an array API module) against the namespace of the parameters.
* :func:`select_implementation` decides whether a step runs a fused kernel or the
  generic array API code, and records why.

CuPy is never imported by this package unless the parameters are CuPy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optim_core import _namespace as ns

from ._generic import GENERIC
from ._operations import (
    AXIS_REDUCTIONS,
    MATRIX_OPERATIONS,
    OPERATIONS,
    REDUCTIONS,
    generic_operations,
)

if TYPE_CHECKING:
    from optim_core.optim.language import UpdateRule

__all__ = ["Backend", "select_backend", "select_implementation", "IMPLEMENTATIONS", "OPERATIONS",
           "REDUCTIONS", "AXIS_REDUCTIONS", "MATRIX_OPERATIONS", "generic_operations"]

IMPLEMENTATIONS = ("auto", "fused", "generic")


@dataclass(frozen=True)
class Backend:
    """An array library the optimizer runs on.

    Attributes
    ----------
    name : str
        "numpy", "cupy", or the namespace's module name for any other library.
    xp : module
        The array API namespace of the parameters.
    """

    name: str
    xp: Any


def _name_of(xp: Any) -> str:
    if ns.is_numpy_namespace(xp):
        return "numpy"
    if ns.is_cupy_namespace(xp):
        return "cupy"
    return xp.__name__.rsplit(".", 1)[-1] if xp.__name__.startswith("array_api_compat.") \
        else xp.__name__


def select_backend(spec: Any, xp: Any) -> Backend:
    """Resolve ``spec`` for parameters of namespace ``xp``.

    Parameters
    ----------
    spec : "auto", "numpy", "cupy", or an array API module
        "auto" takes the parameters' library. Anything else must name that same
        library: the backend is never a way to move arrays between libraries.
    xp : module
        The parameters' namespace.

    Raises
    ------
    TypeError
        If ``spec`` names another library than the parameters'.
    ValueError
        If ``spec`` is an unknown string.
    """
    actual = _name_of(xp)
    if isinstance(spec, str):
        if spec == "auto":
            return Backend(actual, xp)
        if spec not in ("numpy", "cupy"):
            raise ValueError(f"backend must be 'auto', 'numpy', 'cupy' or an array API module, "
                             f"got {spec!r}")
        wanted = spec
    elif hasattr(spec, "__name__"):
        wanted = _name_of(spec)
    else:
        raise TypeError(f"backend must be a string or a module, got {type(spec).__name__}")
    if wanted != actual:
        raise TypeError(f"backend {wanted!r} was asked for, but the parameters are {actual} "
                        "arrays; move them first (the optimizer never copies across libraries)")
    return Backend(actual, xp)


def select_implementation(impl: str, backend: Backend, rule: UpdateRule) -> tuple[Any, str]:
    """Choose what runs ``rule`` on ``backend``; return it and the reason.

    "generic" always runs the array API code. "auto" takes a fused kernel where
    this backend has one and the generic code otherwise. "fused" where no fused
    kernel exists is an error, never a silent fallback.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "generic":
        return GENERIC, "impl='generic' was asked for"
    fused, why_not = _fused_for(backend, rule)
    if fused is not None:
        return fused, f"fused {backend.name} kernel for {rule.name}"
    if impl == "fused":
        raise ValueError(f"impl='fused' was asked for, but {why_not}")
    return GENERIC, f"generic array API path: {why_not}"


def _fused_for(backend: Backend, rule: UpdateRule) -> tuple[Any | None, str]:
    """The fused implementation of ``rule`` on ``backend``, or None and why not.

    NumPy: numba's compiled loop (numba is imported here, on first use, never at
    import time). CuPy: a generated CUDA kernel (CuPy is already imported, since the
    parameters are CuPy arrays). Both are generated from ``rule.tree``.
    """
    from ._lowering import unsupported_reason

    why_not = unsupported_reason(rule)
    if why_not is not None:
        return None, why_not
    if backend.name == "numpy":
        elementwise, why_not = _numba_implementation()
    elif backend.name == "cupy":
        from ._cuda import CUDA

        elementwise, why_not = CUDA, ""
    else:
        return None, f"no fused kernel exists for {backend.name} arrays"
    if elementwise is not None and rule.matrix_operations:
        # Elementwise stages as kernels, the matrix operations through the library's matmul.
        return _staged_implementation(elementwise), ""
    return elementwise, why_not


_STAGED: dict[int, Any] = {}


def _staged_implementation(elementwise: Any) -> Any:
    """The staged implementation over ``elementwise`` (one per process, as it is)."""
    staged = _STAGED.get(id(elementwise))
    if staged is None:
        from ._staged import StagedImplementation

        staged = _STAGED[id(elementwise)] = StagedImplementation(elementwise)
    return staged


_NUMBA: list[tuple[Any | None, str]] = []


def _numba_implementation() -> tuple[Any | None, str]:
    """The shared numba implementation (its compiled kernels serve every optimizer)."""
    if not _NUMBA:
        try:
            from ._numba import NumbaImplementation

            _NUMBA.append((NumbaImplementation(), ""))
        except ImportError as exc:
            _NUMBA.append((None, f"numba is not importable ({exc}); install numba for the "
                                 "fused NumPy path"))
    return _NUMBA[0]
