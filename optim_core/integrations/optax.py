"""Every optimizer as an ``optax.GradientTransformation``, usable in ``optax.chain``.

>>> import optax, optim_core                                        # doctest: +SKIP
>>> tx = optax.chain(optax.clip_by_global_norm(1.0),
...                  optim_core.as_optax(optim_core.Adam, lr=1e-3))  # doctest: +SKIP
>>> state = tx.init(params)                                          # doctest: +SKIP
>>> updates, state = tx.update(grads, state, params)                 # doctest: +SKIP
>>> params = optax.apply_updates(params, updates)                    # doctest: +SKIP

The transformation is :func:`optim_core.functional`'s ``init`` and ``update``, in
optax's conventions: ``update(updates, state, params)`` returns the change
``new_params - params`` as the updates, which ``optax.apply_updates`` adds back
(exactly where the new and old values are within a factor of 2 of each other, by
Sterbenz's lemma, else to one rounding). The rule needs the parameters (weight decay,
and the step itself is written as ``param - ...``), so ``params`` is required, as it
is for ``optax.adamw``. JAX and optax are imported when the function is called,
never by ``import optim_core``.
"""

from __future__ import annotations

from typing import Any

from ..optim.base import Optimizer
from ..optim.functional import functional

__all__ = ["as_optax"]


def as_optax(optimizer: type[Optimizer] | str, /, **hyperparameters: Any) -> Any:
    """The optimizer as an ``optax.GradientTransformation``.

    Parameters
    ----------
    optimizer : Optimizer subclass or str
        A registered optimizer class (``optim_core.Adam``) or its name.
    **hyperparameters
        Its hyperparameters, checked once as :func:`optim_core.functional` checks them.

    Returns
    -------
    optax.GradientTransformation
        ``init(params)`` gives a :class:`~optim_core.optim.functional.FunctionalState`;
        ``update(updates, state, params)`` gives ``(new_params - params, state)``.

    Raises
    ------
    ImportError
        If optax is not installed.
    """
    try:
        import jax
        import optax
    except ImportError as error:  # pragma: no cover - optax is a test extra
        raise ImportError("as_optax needs jax and optax: pip install jax optax") from error
    pure = functional(optimizer, **hyperparameters)

    def init(params: Any) -> Any:
        return pure.init(params)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError(f"as_optax({pure.optimizer.__name__}) needs params: call "
                             "update(updates, state, params)")
        new_params, state = pure.update(updates, state, params)
        change = jax.tree_util.tree_map(lambda new, old: new - old, new_params, params)
        return change, state

    return optax.GradientTransformation(init, update)
