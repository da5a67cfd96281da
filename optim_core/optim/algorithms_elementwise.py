"""The newer elementwise optimizers (issue 13): hyperparameters, host scalars and documentation.

The math lives in :mod:`optim_core.optim.rules_elementwise`. Names, defaults and
numbers follow ``torch.optim`` where torch has the optimizer, and the reference
implementation each docstring names otherwise (the mapping of names is documented
where the reference's differ).
"""

from __future__ import annotations

__all__: list[str] = []
