"""Regularization and gradient clipping on plain arrays, in any array API namespace.

Every function here works on the arrays' own namespace and device, with no host
round trip: a global norm stays a 0-d array on the device, and dropout masks are
drawn on the device from a counter-based hash, so they are a pure function of
an integer key (the same mask on NumPy, CuPy and torch, and nothing to save for
a checkpoint beyond the step).

:func:`optim_core.fit` wires these up as follows, for each step:

1. ``l2``: the penalty :math:`\\tfrac{\\lambda_2}{2}\\lVert W\\rVert^2` is added to
   the loss, so :math:`\\lambda_2 W` is added to the gradient (:func:`add_l2_gradient`);
2. ``clip_value`` (:func:`clip_by_value`), then ``clip_norm``
   (:func:`clip_by_global_norm`);
3. ``weight_decay``: decoupled decay :math:`W \\leftarrow (1-\\gamma\\lambda) W`
   (Loshchilov & Hutter, ICLR 2019), by the optimizer where it has it, else by
   :func:`decay_weights`;
4. the optimizer's step;
5. ``l1``: the proximal step of :math:`\\lambda_1\\lVert W\\rVert_1`, a soft
   threshold by :math:`\\gamma\\lambda_1` (:func:`soft_threshold`), which sets
   small weights to exactly zero (ISTA: Daubechies, Defrise & De Mol, 2004).

Penalties and decay apply to the model's weights only (``Model.regularized``),
never to biases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import _namespace as ns

__all__ = [
    "add_l2_gradient",
    "clip_by_value",
    "global_norm",
    "clip_by_global_norm",
    "soft_threshold",
    "apply_soft_threshold",
    "decay_weights",
    "uniform_bits",
    "dropout_mask",
    "dropout_key",
]

#: torch.nn.utils.clip_grad_norm_'s guard against a zero norm.
_NORM_EPS = 1e-6


def add_l2_gradient(grads: Mapping[str, Any], params: Mapping[str, Any], l2: float,
                    names: Any) -> dict[str, Any]:
    """Return ``grads`` with :math:`\\lambda_2\\,\\theta` added for each parameter in ``names``."""
    if l2 == 0:
        return dict(grads)
    return {name: (g + l2 * params[name] if name in names else g) for name, g in grads.items()}


def clip_by_value(grads: Mapping[str, Any], clip_value: float, *,
                  xp: Any = None) -> dict[str, Any]:
    """Clip every gradient element to ``[-clip_value, clip_value]``.

    ``xp``, when given, is the gradients' namespace (saves looking it up per array).
    """
    out = {}
    for name, g in grads.items():
        out[name] = (xp or ns.namespace_of(g)).clip(g, -clip_value, clip_value)
    return out


def global_norm(grads: Mapping[str, Any], *, xp: Any = None) -> Any:
    """The 2-norm of all gradients taken together, as a 0-d array on their device.

    Without ``xp`` the gradients are checked to share one namespace and device.
    """
    if not grads:
        raise ValueError("no gradients given")
    arrays = list(grads.values())
    if xp is None:
        xp = ns.common_namespace(arrays, list(grads), what="gradient")
    total = None
    for g in arrays:
        squares = xp.sum(g * g)
        total = squares if total is None else total + squares
    return xp.sqrt(total)


def clip_by_global_norm(grads: Mapping[str, Any], max_norm: float, *,
                        xp: Any = None) -> tuple[dict[str, Any], Any]:
    """Scale all gradients together so their global norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: every gradient is multiplied by
    :math:`\\min(1, c / (\\lVert g\\rVert + 10^{-6}))`. The factor stays a 0-d
    array on the device (no host synchronization).

    Returns
    -------
    (dict, array)
        The clipped gradients and the global norm before clipping.
    """
    norm = global_norm(grads, xp=xp)
    xp = xp or ns.namespace_of(norm)
    scale = xp.minimum(max_norm / (norm + _NORM_EPS), xp.ones_like(norm))
    return {name: g * scale for name, g in grads.items()}, norm


def soft_threshold(x: Any, threshold: float, *, xp: Any = None) -> Any:
    """The proximal operator of :math:`t\\lVert x\\rVert_1`: ``sign(x) * max(|x| - t, 0)``."""
    xp = xp or ns.namespace_of(x)
    return xp.sign(x) * xp.maximum(xp.abs(x) - threshold, 0.0)


def _store(target: Any, value: Any) -> Any:
    """Write ``value`` into ``target`` in place where the library allows it."""
    if ns.is_writeable(target):
        target[...] = value
        return target
    xp = ns.namespace_of(target)
    return xp.asarray(value, dtype=target.dtype)


def apply_soft_threshold(params: dict[str, Any], names: Any, threshold: float) -> None:
    """Soft-threshold the parameters in ``names`` by ``threshold`` in place (new arrays for JAX)."""
    if threshold == 0:
        return
    for name in names:
        params[name] = _store(params[name], soft_threshold(params[name], threshold))


def decay_weights(params: dict[str, Any], names: Any, factor: float) -> None:
    """Multiply the parameters in ``names`` by ``factor`` in place (decoupled weight decay)."""
    if factor == 1:
        return
    for name in names:
        params[name] = _store(params[name], params[name] * factor)


# ----------------------------------------------------------------------------- randomness
_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _splitmix64(value: int) -> int:
    """SplitMix64's output function on a Python int (Steele, Lea & Flood, OOPSLA 2014)."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def dropout_key(*words: int) -> int:
    """Combine integers (a seed, a step, a layer) into one 64-bit key."""
    key = 0
    for word in words:
        key = _splitmix64(key ^ (int(word) & _MASK64))
    return key


def _shift_right(xp: Any, z: Any, bits: int) -> Any:
    # Logical shift on int64: arithmetic shift, then clear the sign-extended bits.
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def uniform_bits(xp: Any, shape: tuple[int, ...], key: int, *, device: Any = None,
                 bits: int = 24) -> Any:
    """Uniform random integers in ``[0, 2**bits)`` drawn on the device, as int64.

    Element ``i`` (in C order) is SplitMix64's output for counter ``i`` under
    ``key``, computed with int64 array arithmetic (which wraps in NumPy, CuPy and
    torch alike), so the result is the same on every library.
    """
    size = 1
    for extent in shape:
        size *= extent
    z = xp.arange(size, dtype=xp.int64, device=device) * _GOLDEN + _signed(_splitmix64(key))
    z = (z ^ _shift_right(xp, z, 30)) * _MIX1
    z = (z ^ _shift_right(xp, z, 27)) * _MIX2
    z = z ^ _shift_right(xp, z, 31)
    return xp.reshape(_shift_right(xp, z, 64 - bits), shape)


def dropout_mask(xp: Any, shape: tuple[int, ...], rate: float, key: int, *,
                 device: Any = None) -> Any:
    """A boolean keep-mask on the device: each element kept with probability ``1 - rate``."""
    if not 0 <= rate < 1:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate!r}")
    threshold = round(rate * (1 << 24))
    return uniform_bits(xp, shape, key, device=device) >= threshold
